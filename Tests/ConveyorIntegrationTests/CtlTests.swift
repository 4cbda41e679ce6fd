import ConveyorAPI
import ConveyorCore
import ConveyorStore
import Foundation
import Testing
import Yams

/// `conveyorctl`, the separate client binary, against the real API and database.
@Suite("conveyorctl (real processes)", .serialized)
struct CtlTests {
    /// Runs `conveyorctl <args>`; returns its exit status, standard output and error.
    /// In `directory` (default: a fresh temporary one, so a `.local/conveyorctl.yaml` left by
    /// `conveyor dev` in the project is never read). Standard input is a pipe holding `stdin`;
    /// with `terminal`, a pseudo-terminal instead, with `terminal` typed into it.
    static func ctl(
        _ args: [String], env: [String: String], stdin: String? = nil, terminal: String? = nil,
        in directory: URL? = nil
    ) throws
        -> (status: Int32, out: String, err: String)
    {
        var tty: (typed: FileHandle, input: FileHandle)?
        if let terminal {
            let (master, slave) = try pseudoTerminal()
            tty = (FileHandle(fileDescriptor: master, closeOnDealloc: true), FileHandle(fileDescriptor: slave))
            // Typed ahead: the terminal holds the line until conveyorctl reads it.
            tty?.typed.write(Data(terminal.utf8))
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try conveyorBinary("conveyorctl"))
        p.arguments = args
        p.currentDirectoryURL = directory ?? FileManager.default.temporaryDirectory
        var e = ProcessInfo.processInfo.environment
        e.removeValue(forKey: "CONVEYOR_API_KEY")
        e.removeValue(forKey: "CONVEYOR_URL")
        e["HOME"] = NSTemporaryDirectory()
        for (k, v) in env { e[k] = v }
        p.environment = e
        let out = Pipe()
        let err = Pipe()
        let input = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = tty?.input ?? input
        try p.run()
        if let tty { try tty.input.close() }
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try input.fileHandleForWriting.close()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let r = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        withExtendedLifetime(tty) {}
        return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: r, as: UTF8.self))
    }

    @Test func submitsListsTriggersAndManagesKeysWithErrorsThatSayWhatToDo() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let admin = try await APITests.key(sys, role: .admin, namespace: "default")
                let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ctl-\(UUID())")
                try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
                defer { try? FileManager.default.removeItem(at: dir) }
                let keyFile = dir.appendingPathComponent("key").path
                try admin.write(toFile: keyFile, atomically: true, encoding: .utf8)
                let env = ["CONVEYOR_URL": api.base]

                // 1,200 tasks from one YAML file, in batches of 500.
                var yaml = "tasks:\n"
                for i in 0..<1200 {
                    yaml +=
                        "  - {name: t-\(String(format: "%04d", i)), executor: noop, schedule: manual, group: bulk}\n"
                }
                let file = dir.appendingPathComponent("tasks.yaml").path
                try yaml.write(toFile: file, atomically: true, encoding: .utf8)
                let submit = try Self.ctl(["task", "submit", "-f", file, "--key-file", keyFile], env: env)
                #expect(submit.status == 0, "\(submit.err)")
                #expect(submit.out.hasPrefix("submitted 1200 tasks in 3 batches"), "\(submit.out)")
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE group_name = 'bulk'") == 1200)
                #expect(try await sys.count("SELECT count(DISTINCT batch_id) FROM tasks") == 3)

                let keyEnv = env.merging(["CONVEYOR_API_KEY": admin]) { a, _ in a }
                let list = try Self.ctl(["task", "list", "--prefix", "t-000", "--json"], env: keyEnv)
                #expect(list.status == 0, "\(list.err)")
                let listed = try JSONDecoder().decode(JSONValue.self, from: Data(list.out.utf8))
                #expect(listed["tasks"]?.arrayValue?.count == 10)
                let all = try Self.ctl(
                    ["task", "list", "--group", "bulk", "--limit", "100", "--all", "--json"], env: keyEnv)
                #expect(
                    try JSONDecoder().decode(JSONValue.self, from: Data(all.out.utf8))["tasks"]?.arrayValue?.count
                        == 1200, "--all follows every page")
                let table = try Self.ctl(["task", "list", "--prefix", "t-0001"], env: keyEnv)
                #expect(
                    table.out.split(separator: "\n").first?.hasPrefix("NAME") == true && table.out.contains("t-0001"),
                    "\(table.out)")

                #expect(
                    try Self.ctl(["task", "trigger", "t-0001"], env: keyEnv).out.hasPrefix("triggered t-0001: run "))
                #expect(try Self.ctl(["task", "pause", "t-0002"], env: keyEnv).status == 0)
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE name = 't-0002' AND paused") == 1)
                #expect(
                    try Self.ctl(["group", "get", "bulk", "--json"], env: keyEnv).out.contains("\"paused_tasks\":1"))
                #expect(try Self.ctl(["group", "pause", "bulk"], env: keyEnv).out == "paused 1199 tasks of bulk\n")
                #expect(try Self.ctl(["group", "resume", "bulk"], env: keyEnv).out == "resumed 1200 tasks of bulk\n")
                #expect(try Self.ctl(["group", "cancel", "bulk", "--yes"], env: keyEnv).out.hasPrefix("cancelled "))
                let cancel = try Self.ctl(["run", "cancel", UUID().uuidString], env: keyEnv)
                #expect(cancel.status != 0 && cancel.err.contains("no run"), "\(cancel.err)")
                #expect(try Self.ctl(["task", "get", "t-0001"], env: keyEnv).out.contains("recent runs:"))
                #expect(try Self.ctl(["task", "delete", "t-0003", "-y"], env: keyEnv).status == 0)
                #expect(try Self.ctl(["run", "list", "--json"], env: keyEnv).status == 0)
                // Workers are the fleet's: an admin of one namespace is refused, naming the rule;
                // a viewer key for every namespace lists them.
                let refused = try Self.ctl(["worker", "list"], env: keyEnv)
                #expect(refused.status != 0 && refused.err.contains("every namespace"), "\(refused.err)")
                let fleet = try await APITests.key(sys, role: .viewer, namespace: "*")
                #expect(
                    try Self.ctl(["worker", "list"], env: env.merging(["CONVEYOR_API_KEY": fleet]) { a, _ in a }).out
                        .hasPrefix("WORKER"))

                let created = try Self.ctl(["key", "create", "--name", "ci", "--role", "viewer"], env: keyEnv)
                #expect(created.status == 0, "\(created.err)")
                let newKey = created.out.trimmingCharacters(in: .whitespacesAndNewlines)
                #expect(APIKeyFormat.parse(newKey) != nil, "the key alone on standard output: \(created.out)")
                let viewerEnv = env.merging(["CONVEYOR_API_KEY": newKey]) { a, _ in a }
                let denied = try Self.ctl(["task", "trigger", "t-0001"], env: viewerEnv)
                #expect(denied.status != 0)
                #expect(denied.err.contains("forbidden") && denied.err.contains("fix: ask an admin"), "\(denied.err)")
                #expect(denied.err.contains("request id:"))

                // Errors that say what to do.
                let noKey = try Self.ctl(["task", "list"], env: env)
                #expect(noKey.status != 0 && noKey.err.contains("fix: set CONVEYOR_API_KEY"), "\(noKey.err)")
                let down = try Self.ctl(
                    ["task", "list"], env: ["CONVEYOR_URL": "http://127.0.0.1:1", "CONVEYOR_API_KEY": admin])
                #expect(down.err.contains("cannot reach the API at http://127.0.0.1:1"), "\(down.err)")
                let badURL = try Self.ctl(["task", "list", "--url", "ftp://x"], env: keyEnv)
                #expect(badURL.err.contains("is not an http or https URL"), "\(badURL.err)")
                let missing = try Self.ctl(["task", "get", "nope"], env: keyEnv)
                #expect(
                    missing.err.contains("no task named 'nope'") && missing.err.contains("namespace"), "\(missing.err)")
                var broken = "tasks:\n"
                for i in 0..<700 { broken += "  - {name: u-\(i), executor: noop}\n" }
                broken += "  - {name: u-bad, executor: noop, schedule: \"61 * * * *\"}\n"
                let partial = try Self.ctl(["task", "submit", "-f", "-"], env: keyEnv, stdin: broken)
                #expect(partial.status != 0)
                #expect(
                    partial.err.contains("tasks[700].schedule"),
                    "the field path is the task's place in the file: \(partial.err)")
                #expect(partial.err.contains("500 tasks before it were created"), "\(partial.err)")
                #expect(
                    try await sys.count("SELECT count(*) FROM tasks WHERE name LIKE 'u-%'") == 500,
                    "the failing batch is not half-created")

                let prefix = try #require(APIKeyFormat.parse(newKey)?.prefix)
                #expect(try Self.ctl(["key", "revoke", prefix, "--yes"], env: keyEnv).status == 0)
                #expect(try Self.ctl(["key", "list", "--json"], env: keyEnv).out.contains("\"revoked_at\""))
            }
        }
    }

    /// What replaced `conveyor task|run|group|queue` (database access, no audit): a task from
    /// flags, a workflow file, cancelling a task's runs and a queue's rate limit, through the API.
    /// And the newcomer's path: with nothing configured, conveyorctl reads the configuration
    /// `conveyor dev` leaves in `.local/` of the directory it runs in.
    @Test func operatesTasksAndQueuesThroughTheAPIAndReadsTheDevConfiguration() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ctl-dev-\(UUID())")
                try FileManager.default.createDirectory(
                    at: dir.appendingPathComponent(".local/dev"), withIntermediateDirectories: true)
                defer { try? FileManager.default.removeItem(at: dir) }
                // As `conveyor dev` writes them (Dev.writeCtlConfig): a key for every namespace.
                let admin = try await APITests.key(sys, role: .admin, namespace: "*")
                let keyPath = dir.appendingPathComponent(".local/dev/api-key").path
                try (admin + "\n").write(toFile: keyPath, atomically: true, encoding: .utf8)
                try "url: \(api.base)\nkey_file: \(keyPath)\n".write(
                    to: dir.appendingPathComponent(".local/conveyorctl.yaml"), atomically: true, encoding: .utf8)
                func ctl(_ args: [String], stdin: String? = nil) throws -> (status: Int32, out: String, err: String) {
                    try CtlTests.ctl(args, env: [:], stdin: stdin, in: dir)
                }

                let add = try ctl([
                    "task", "add", "hello", "--executor", "shell", "--params", #"{"argv": ["/bin/echo", "hi"]}"#,
                    "--schedule", "every 1h", "--queue", "greetings", "--group", "demo",
                ])
                #expect(add.status == 0 && add.out == "created hello\n", "\(add.err)")
                let hello = try #require(try await sys.store.task(named: "hello"))
                #expect(hello.executor == "shell" && hello.queue == "greetings" && hello.group == "demo")
                let badParams = try ctl(["task", "add", "x", "--executor", "noop", "--params", "[1]"])
                #expect(badParams.status != 0 && badParams.err.contains("--params"), "\(badParams.err)")
                let badMisfire = try ctl(
                    ["task", "submit", "-f", "-"], stdin: "{name: x, executor: noop, misfire: sometimes}")
                #expect(
                    badMisfire.status != 0 && badMisfire.err.contains("misfire")
                        && badMisfire.err.contains("skip, once, all"),
                    "\(badMisfire.err)")

                // A workflow file: cron with seconds and a zone, retries, a dependent with a concurrency key.
                let workflow = """
                    tasks:
                      - name: extract
                        executor: shell
                        parameters: {argv: [/bin/echo, extract]}
                        schedule: "0 30 2 * * MON-FRI"
                        timezone: Europe/London
                        misfire: skip
                        priority: high
                        retry: {max_attempts: 4, base_seconds: 5, retry_on: [timeout, "exit:75"]}
                        group: nightly
                      - name: load
                        executor: noop
                        depends_on: [extract]
                        concurrency: {key: "warehouse", limit: 1}
                    """
                let submitted = try ctl(["task", "submit", "-f", "-"], stdin: workflow)
                #expect(submitted.status == 0, "\(submitted.err)")
                let extract = try #require(try await sys.store.task(named: "extract"))
                #expect(extract.schedule == "0 30 2 * * MON-FRI" && extract.timeZone == "Europe/London")
                #expect(extract.priority == .high && extract.maxAttempts == 4 && extract.misfire == "skip")
                let load = try #require(try await sys.store.task(named: "load"))
                #expect(load.dependsOn == ["extract"] && load.nextRunAt == nil && load.concurrencyLimit == 1)
                let bad = try ctl(
                    ["task", "submit", "-f", "-"],
                    stdin: "[{name: ok, executor: noop}, {name: bad, executor: noop, retry: {factor: 0}}]")
                #expect(bad.status != 0 && bad.err.contains("tasks[1].retry.factor"), "\(bad.err)")
                #expect(try await sys.store.task(named: "ok") == nil, "a batch is all or nothing")

                // Cancelling a task's open runs: `hello` is due at once; one claim (no dispatcher
                // runs here) makes its run.
                _ = try await sys.store.claimDue(
                    ClaimRequest(
                        group: 0, groups: 1, limit: 10, lease: .seconds(60), misfireGrace: .seconds(60),
                        newTraceParent: { _ in "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" }))
                let open = try await sys.count(
                    "SELECT count(*) FROM runs WHERE task_id = $1 AND finished_at IS NULL", [hello.id])
                #expect(open == 1)
                let cancel = try ctl(["task", "cancel", "hello", "--yes"])
                #expect(cancel.status == 0 && cancel.out == "cancelled 1 runs of hello\n", "\(cancel.out)\(cancel.err)")
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM runs WHERE task_id = $1 AND state = 'cancelled'", [hello.id]) == 1)

                // A queue's rate limit, set and removed; audited.
                let limit = try ctl(["queue", "limit", "greetings", "--rate", "5", "--burst", "10"])
                #expect(limit.status == 0 && limit.out.contains("at most 5"), "\(limit.err)")
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM queue_limits WHERE queue = 'greetings' AND burst = 10") == 1)
                #expect(try ctl(["queue", "limit", "greetings", "--rate", "0"]).status != 0)
                #expect(try ctl(["queue", "list"]).out.contains("greetings"))
                #expect(try ctl(["queue", "unlimit", "greetings"]).status == 0)
                #expect(try await sys.count("SELECT count(*) FROM queue_limits WHERE queue = 'greetings'") == 0)
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM audit_log WHERE action IN ('queue.limit', 'queue.unlimit', 'task.cancel')"
                    )
                        == 3)

                // Pause, drain and resume (issue 23 item 4). Drain waits until nothing of the queue
                // is published or running: a run left running makes it time out, non-zero.
                let pause = try ctl(["queue", "pause", "greetings"])
                #expect(pause.status == 0 && pause.out == "queue greetings paused\n", "\(pause.out)\(pause.err)")
                #expect(try ctl(["queue", "pause", "greetings"]).out.contains("already paused"))
                #expect(try await sys.count("SELECT count(*) FROM queue_pauses WHERE queue = 'greetings'") == 1)
                let listed = try ctl(["queue", "list"]).out
                #expect(listed.contains("PAUSED") && listed.contains("paused"), "\(listed)")
                let drained = try ctl(["queue", "drain", "greetings", "--timeout", "5"])
                #expect(drained.status == 0 && drained.out.contains("drained"), "\(drained.out)\(drained.err)")
                _ = try await sys.rows(
                    """
                    INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at, started_at)
                    VALUES (gen_random_uuid(), '\(hello.id.lowercasedString)', now(), 1, 'running', 'greetings', 0,
                            now(), now()) RETURNING id
                    """)
                let busy = try ctl(["queue", "drain", "greetings", "--timeout", "1"])
                #expect(
                    busy.status == 3 && busy.err.contains("not drained") && busy.err.contains("1 running"),
                    "\(busy.out)\(busy.err)")
                #expect(try ctl(["queue", "resume", "greetings"]).out == "queue greetings resumed\n")

                // Runs a page at a time, and every page with --all; a task changed by a merge patch.
                func runs(_ args: [String]) throws -> [JSONValue] {
                    let r = try ctl(["run", "list", "--task", "hello", "--json"] + args)
                    let v = try JSONDecoder().decode(JSONValue.self, from: Data(r.out.utf8))
                    return v["runs"]?.arrayValue ?? []
                }
                #expect(try runs(["--limit", "1"]).count == 1)
                #expect(try runs(["--limit", "1", "--all"]).count == 2, "the cancelled run and the running one")
                let updated = try ctl(["task", "update", "hello", "--set", "timeout=900", "--set", "group=renamed"])
                #expect(updated.status == 0, "\(updated.out)\(updated.err)")
                let changed = try #require(try await sys.store.task(named: "hello"))
                #expect(changed.timeoutSeconds == 900 && changed.group == "renamed")
                let unknown = try ctl(["task", "update", "hello", "--set", "colour=blue"])
                #expect(unknown.status == 1 && unknown.err.contains("colour"), "\(unknown.err)")
                #expect(try ctl(["task", "update", "hello"]).status == 1)
                #expect(try await sys.count("SELECT count(*) FROM queue_pauses") == 0)
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM audit_log WHERE action IN ('queue.pause', 'queue.resume')")
                        == 2)

                // A queue is the fleet's: a key for one namespace may not limit it.
                let scoped = try await APITests.key(sys, role: .admin, namespace: "default")
                let refused = try CtlTests.ctl(
                    ["queue", "limit", "greetings", "--rate", "1"],
                    env: ["CONVEYOR_URL": api.base, "CONVEYOR_API_KEY": scoped])
                #expect(refused.status == 4 && refused.err.contains("whole fleet"), "\(refused.err)")
                // Exit statuses by kind: not found 5, conflict 6, unreachable 8, usage 64.
                #expect(try ctl(["task", "get", "no-such-task"]).status == 5)
                #expect(
                    try ctl(["task", "add", "hello", "--executor", "noop"]).status == 6, "hello exists: a conflict")
                #expect(
                    try CtlTests.ctl(
                        ["task", "list"], env: ["CONVEYOR_URL": "http://127.0.0.1:1", "CONVEYOR_API_KEY": "x"]
                    )
                    .status == 8)
                #expect(try ctl(["queue", "limit", "greetings", "--rate", "0"]).status == 64)
                // The environment wins over the dev file.
                let env = try CtlTests.ctl(
                    ["task", "list"], env: ["CONVEYOR_URL": "http://127.0.0.1:1"], in: dir)
                #expect(env.status != 0 && env.err.contains("127.0.0.1:1"), "\(env.err)")
            }
        }
    }

    /// A pseudo-terminal's two ends (both close-on-exec). `posix_openpt` and its friends need
    /// `_XOPEN_SOURCE`, which the Glibc module is not built with: they are looked up by name.
    static func pseudoTerminal() throws -> (master: Int32, slave: Int32) {
        let libc = dlopen(nil, RTLD_NOW)
        func function<F>(_ name: String, as: F.Type) throws -> F {
            unsafeBitCast(try #require(dlsym(libc, name), "no \(name) in libc"), to: F.self)
        }
        let openpt = try function("posix_openpt", as: (@convention(c) (Int32) -> Int32).self)
        let grantpt = try function("grantpt", as: (@convention(c) (Int32) -> Int32).self)
        let unlockpt = try function("unlockpt", as: (@convention(c) (Int32) -> Int32).self)
        let ptsname = try function("ptsname", as: (@convention(c) (Int32) -> UnsafeMutablePointer<CChar>?).self)
        let master = openpt(O_RDWR | O_NOCTTY | O_CLOEXEC)
        try #require(master >= 0 && grantpt(master) == 0 && unlockpt(master) == 0, "no pseudo-terminal")
        let name = try #require(ptsname(master).map { String(cString: $0) })
        let slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)
        try #require(slave >= 0, "cannot open \(name)")
        return (master, slave)
    }

    /// A value printed with `-o yaml`, loaded back as JSON would be.
    static func yaml(_ text: String) throws -> JSONValue {
        JSONValue(loaded: try Yams.load(yaml: text))
    }

    static func json(_ text: String) throws -> JSONValue {
        try JSONDecoder().decode(JSONValue.self, from: Data(text.utf8))
    }

    /// `-o table|wide|json|yaml|name` on every kind of listing, as kubectl users expect; `--json`
    /// still works; a wrong value is a usage error naming the choices.
    @Test func printsTablesWideTablesJSONYAMLAndNames() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let admin = try await APITests.key(sys, role: .admin, namespace: "*")
                func ctl(_ args: [String], stdin: String? = nil) throws -> (status: Int32, out: String, err: String) {
                    try CtlTests.ctl(args, env: ["CONVEYOR_URL": api.base, "CONVEYOR_API_KEY": admin], stdin: stdin)
                }
                // Text that YAML would read as something else, several lines, a fraction.
                let file = """
                    tasks:
                      - name: fmt-a
                        executor: noop
                        group: fmt
                        labels: {team: data, tier: "1"}
                        parameters: {note: "yes", when: "2024-01-01", none: "null", lines: "one\\ntwo\\n", n: 1.5}
                      - {name: fmt-b, executor: noop, schedule: "0 2 * * *", timezone: Europe/London, group: fmt}
                    """
                let submitted = try ctl(["task", "submit", "-f", "-", "-o", "name"], stdin: file)
                #expect(submitted.status == 0 && submitted.out == "task/fmt-a\ntask/fmt-b\n", "\(submitted)")

                // YAML: the same value as the JSON.
                for args in [["task", "get", "fmt-a"], ["task", "list", "--group", "fmt"], ["group", "get", "fmt"]] {
                    let json = try ctl(args + ["-o", "json"])
                    let yaml = try ctl(args + ["-o", "yaml"])
                    #expect(json.status == 0 && yaml.status == 0, "\(json.err)\(yaml.err)")
                    #expect(!yaml.out.hasPrefix("{"), "YAML, not JSON: \(yaml.out)")
                    #expect(try Self.yaml(yaml.out) == Self.json(json.out), "\(args): \(yaml.out)\n\(json.out)")
                }
                let yaml = try ctl(["task", "get", "fmt-a", "-o", "yaml"]).out
                #expect(yaml.contains("\nname: fmt-a\n") && yaml.contains("note: 'yes'"), "\(yaml)")

                // Names, one kind/name a line.
                let names = try ctl(["task", "list", "--group", "fmt", "-o", "name"])
                #expect(names.status == 0 && names.out == "task/fmt-a\ntask/fmt-b\n", "\(names)")
                let triggered = try ctl(["task", "trigger", "fmt-a", "-o", "name"]).out
                #expect(
                    triggered.range(of: #"^run/[0-9a-f-]{36}\n$"#, options: .regularExpression) != nil, "\(triggered)")
                #expect(try ctl(["group", "list", "-o", "name"]).out == "group/fmt\n")
                #expect(try ctl(["group", "pause", "fmt", "-o", "name"]).out == "group/fmt\n")
                #expect(try ctl(["task", "pause", "fmt-b", "-o", "name"]).out == "task/fmt-b\n")
                let keys = try ctl(["key", "list", "-o", "name"]).out.split(separator: "\n")
                #expect(!keys.isEmpty && keys.allSatisfy { $0.hasPrefix("key/") && $0.count == 16 }, "\(keys)")

                // Wide: more columns where there are more useful ones.
                let table = try ctl(["task", "list", "--group", "fmt"]).out
                let wide = try ctl(["task", "list", "--group", "fmt", "-o", "wide"]).out
                #expect(table.hasPrefix("NAME") && !table.contains("LABELS"), "\(table)")
                let header = wide.prefix { $0 != "\n" }
                #expect(["GROUP", "LABELS", "TIMEZONE", "NEXT RUN"].allSatisfy { header.contains($0) }, "\(wide)")
                #expect(wide.contains("team=data,tier=1") && wide.contains("Europe/London"), "\(wide)")
                let runs = try ctl(["run", "list", "-o", "wide"]).out
                let runsHeader = runs.prefix { $0 != "\n" }
                #expect(["TASK ID", "STARTED", "FINISHED", "ERROR"].allSatisfy { runsHeader.contains($0) }, "\(runs)")
                #expect(!(try ctl(["run", "list"]).out.contains("TASK ID")))
                let workers = try ctl(["worker", "list", "-o", "wide"])
                #expect(workers.status == 0 && workers.out.hasPrefix("WORKER") && workers.out.contains("EXECUTORS"))

                // --json is -o json; a wrong -o is a usage error that names the choices.
                let old = try ctl(["task", "get", "fmt-b", "--json"])
                let new = try ctl(["task", "get", "fmt-b", "-o", "json"])
                #expect(old.status == 0 && old.out == new.out, "\(old.out)\(old.err)")
                let bad = try ctl(["task", "list", "-o", "xml"])
                let choices = "'table', 'wide', 'json', 'yaml' or 'name'"
                #expect(bad.status == 64 && bad.err.contains(choices), "\(bad.err)")
                #expect(try ctl(["task", "list", "--json", "-o", "yaml"]).status == 64)
                // -o name would lose a new key (shown once): refused before it is made.
                let keysBefore = try await sys.count("SELECT count(*) FROM api_keys")
                let lost = try ctl(["key", "create", "--name", "x", "--role", "viewer", "-o", "name"])
                #expect(lost.status == 64 && lost.err.contains("-o name"), "\(lost.err)")
                #expect(try await sys.count("SELECT count(*) FROM api_keys") == keysBefore)
            }
        }
    }

    /// Delete, purge, cancel and revoke ask on a terminal; without one they need --yes, and
    /// refuse (64) before sending anything.
    @Test func destructiveCommandsAskOnATerminalAndOtherwiseNeedYes() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let admin = try await APITests.key(sys, role: .admin, namespace: "default")
                let env = ["CONVEYOR_URL": api.base, "CONVEYOR_API_KEY": admin]
                func ctl(_ args: [String], terminal: String? = nil) throws -> (status: Int32, out: String, err: String)
                {
                    try CtlTests.ctl(args, env: env, terminal: terminal)
                }
                for name in ["del-a", "del-b"] {
                    #expect(try ctl(["task", "add", name, "--executor", "noop", "--group", "dels"]).status == 0)
                }
                let created = try ctl(["key", "create", "--name", "doomed", "--role", "viewer"])
                let prefix = try #require(
                    APIKeyFormat.parse(created.out.trimmingCharacters(in: .whitespacesAndNewlines))?.prefix)
                let destructive = "('task.delete', 'task.purge', 'task.cancel', 'group.cancel', 'key.revoke')"

                // No terminal, no --yes: refused, naming the fix; nothing changes.
                for args in [
                    ["task", "delete", "del-a"], ["task", "delete", "del-a", "--purge"], ["task", "cancel", "del-a"],
                    ["group", "cancel", "dels"], ["key", "revoke", prefix],
                ] {
                    let refused = try ctl(args)
                    #expect(refused.status == 64 && refused.err.contains("fix: pass --yes"), "\(args): \(refused.err)")
                }
                #expect(try await sys.store.task(named: "del-a") != nil)
                #expect(try await sys.count("SELECT count(*) FROM audit_log WHERE action IN \(destructive)") == 0)
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM api_keys WHERE prefix = $1 AND revoked_at IS NULL", [prefix]) == 1)

                // A terminal: asked on standard error; anything but y changes nothing.
                let no = try ctl(["task", "delete", "del-a"], terminal: "n\n")
                #expect(no.status == 1 && no.err.contains("delete task del-a? [y/N]"), "\(no.err)")
                #expect(try await sys.store.task(named: "del-a") != nil)
                let yes = try ctl(["task", "delete", "del-a"], terminal: "y\n")
                #expect(yes.status == 0 && yes.out == "deleted del-a\n", "\(yes.out)\(yes.err)")
                #expect(try await sys.store.task(named: "del-a") == nil)

                // --yes (-y): done without asking.
                #expect(try ctl(["task", "cancel", "del-b", "--yes"]).out == "cancelled 0 runs of del-b\n")
                #expect(try ctl(["group", "cancel", "dels", "-y"]).status == 0)
                let purged = try ctl(["task", "delete", "del-b", "--purge", "--yes"])
                #expect(purged.status == 0 && purged.out.hasPrefix("purged del-b"), "\(purged.err)")
                #expect(try ctl(["key", "revoke", prefix, "-y", "-o", "name"]).out == "key/\(prefix)\n")
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM api_keys WHERE prefix = $1 AND revoked_at IS NOT NULL", [prefix]) == 1)
                #expect(try await sys.count("SELECT count(*) FROM audit_log WHERE action IN \(destructive)") == 5)
            }
        }
    }

    /// Templates (put, list, get, create-task) and the audit log (filter, pages, all), through
    /// the API's routes.
    @Test func managesTemplatesAndReadsTheAuditLog() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let admin = try await APITests.key(sys, role: .admin, namespace: "default")
                func ctl(_ args: [String], stdin: String? = nil, key: String? = nil) throws
                    -> (status: Int32, out: String, err: String)
                {
                    try CtlTests.ctl(
                        args, env: ["CONVEYOR_URL": api.base, "CONVEYOR_API_KEY": key ?? admin], stdin: stdin)
                }
                let template = """
                    parameters: [region, minutes]
                    task:
                      executor: shell
                      parameters: {argv: [/bin/echo, "report {{region}}"]}
                      timeout: "{{minutes}}"
                      group: reports
                    """
                let put = try ctl(["template", "put", "report", "-f", "-"], stdin: template)
                #expect(
                    put.status == 0 && put.out == "stored template report (parameters: region,minutes)\n",
                    "\(put.out)\(put.err)")
                let badFile = try ctl(["template", "put", "broken", "-f", "-"], stdin: "[1, 2]")
                #expect(badFile.status == 1 && badFile.err.contains("not a YAML or JSON mapping"), "\(badFile.err)")

                let list = try ctl(["template", "list"])
                #expect(list.out.hasPrefix("NAME") && list.out.contains("region,minutes"), "\(list.out)")
                #expect(try ctl(["template", "list", "-o", "name"]).out == "template/report\n")
                let listed = try Self.json(try ctl(["template", "list", "-o", "json"]).out)
                #expect(try Self.yaml(try ctl(["template", "list", "-o", "yaml"]).out) == listed)
                let one = try ctl(["template", "get", "report"])
                #expect(one.status == 0 && one.out.contains("task:") && one.out.contains("{{region}}"), "\(one.out)")
                #expect(
                    try Self.json(try ctl(["template", "get", "report", "-o", "json"]).out)
                        == listed["templates"]?.arrayValue?.first)
                #expect(try ctl(["template", "get", "nope"]).status == 5)

                let made = try ctl([
                    "template", "create-task", "report", "--name", "report-eu", "--set", "region=eu", "--set",
                    "minutes=60",
                ])
                #expect(made.status == 0 && made.out == "created report-eu from template report\n", "\(made.err)")
                let task = try Self.json(try ctl(["task", "get", "report-eu", "-o", "json"]).out)
                #expect(task["parameters"]?["argv"] == ["/bin/echo", "report eu"] && task["timeout"] == 60, "\(task)")
                #expect(task["group"] == "reports")
                let missing = try ctl(["template", "create-task", "report", "--name", "x", "--set", "region=us"])
                #expect(missing.status == 1 && missing.err.contains("values.minutes"), "\(missing.err)")
                #expect(
                    try ctl([
                        "template", "create-task", "report", "--name", "report-us", "--set", "region=us", "--set",
                        "minutes=5", "-o", "name",
                    ]).out == "task/report-us\n")

                // The audit log: what was just done, newest first.
                let total = try await sys.count("SELECT count(*) FROM audit_log")
                #expect(total == 3, "template.put and two task.create")
                let puts = try Self.json(try ctl(["audit", "list", "--action", "template.put", "-o", "json"]).out)
                #expect(puts["entries"]?.arrayValue?.compactMap { $0["target"] } == ["report"], "\(puts)")
                let table = try ctl(["audit", "list"])
                #expect(
                    table.status == 0 && table.out.hasPrefix("ID") && table.out.contains("template.put")
                        && table.out.contains("task.create"), "\(table.out)\(table.err)")
                #expect(try ctl(["audit", "list", "-o", "wide"]).out.contains("REQUEST ID"))
                let names = try ctl(["audit", "list", "-o", "name"]).out.split(separator: "\n")
                #expect(names.count == 3 && names.allSatisfy { $0.hasPrefix("audit/") }, "\(names)")
                let first = try Self.json(try ctl(["audit", "list", "--limit", "1", "-o", "json"]).out)
                let cursor = try #require(first["next_cursor"]?.stringValue)
                let second = try Self.json(
                    try ctl(["audit", "list", "--limit", "1", "--cursor", cursor, "-o", "json"]).out)
                #expect(
                    (second["entries"]?.arrayValue?.first?["id"]?.doubleValue ?? .infinity)
                        < (first["entries"]?.arrayValue?.first?["id"]?.doubleValue ?? 0), "the page after, older")
                let all = try Self.json(try ctl(["audit", "list", "--limit", "1", "--all", "-o", "json"]).out)
                #expect(all["entries"]?.arrayValue?.count == 3 && all["next_cursor"] == nil)
                let viewer = try await APITests.key(sys, role: .viewer, namespace: "default")
                #expect(try ctl(["audit", "list"], key: viewer).status == 4, "the audit log is an admin's")
            }
        }
    }

    /// Every command's help ends with an example of itself; completion scripts are generated for
    /// bash, zsh and fish, and know the newest commands.
    /// Numbers JSON cannot carry, or no clock can hold, are refused before any request: an
    /// infinite `--timeout` used to go as null, which the API reads as "the default" (300 s).
    @Test(arguments: [
        ["task", "add", "t", "--executor", "noop", "--timeout", "inf"],
        ["task", "add", "t", "--executor", "noop", "--timeout", "nan"],
        ["task", "add", "t", "--executor", "noop", "--timeout", "31536001"],
        ["task", "add", "t", "--executor", "noop", "--schedule-to-start-timeout", "inf"],
        ["run", "wait", "00000000-0000-0000-0000-000000000000", "--timeout", "1e30"],
        ["queue", "drain", "q", "--timeout", "1e30"],
    ])
    func numbersNoRequestCanCarryAreRefusedNamingTheFlag(_ args: [String]) throws {
        let r = try Self.ctl(args, env: ["CONVEYOR_API_URL": "http://127.0.0.1:9", "CONVEYOR_API_KEY": "k"])
        #expect(r.status != 0 && r.err.contains("--") && r.err.contains("timeout must be"), "\(r.err)")
    }

    @Test func everyCommandsHelpHasAnExampleAndCompletionsAreGenerated() throws {
        let dump = try Self.ctl(["--experimental-dump-help"], env: [:])
        let root = try #require(try Self.json(dump.out)["command"], "\(dump.err)")
        var paths: [[String]] = []
        func walk(_ command: JSONValue, _ parent: [String]) {
            guard let name = command["commandName"]?.stringValue, name != "help" else { return }
            let path = parent + [name]
            paths.append(path)
            for sub in command["subcommands"]?.arrayValue ?? [] { walk(sub, path) }
        }
        walk(root, [])
        #expect(paths.count >= 46, "every command is walked: \(paths.map { $0.joined(separator: " ") })")
        for path in paths {
            let help = try Self.ctl(Array(path.dropFirst()) + ["--help"], env: [:])
            // Help wraps its text: compare with the line breaks as spaces.
            let text = help.out.split(whereSeparator: \.isWhitespace).joined(separator: " ")
            let example = "Example: " + path.joined(separator: " ")
            #expect(help.status == 0 && text.contains(example), "no '\(example)' in \(help.out)")
        }
        for shell in ["bash", "zsh", "fish"] {
            let script = try Self.ctl(["--generate-completion-script", shell], env: [:])
            #expect(
                script.status == 0 && script.out.contains("create-task") && script.out.contains("audit"),
                "\(shell): \(script.err)")
        }
    }
}
