import ConveyorAPI
import ConveyorCore
import ConveyorStore
import Foundation
import Testing

/// `conveyorctl`, the separate client binary, against the real API and database.
@Suite("conveyorctl (real processes)", .serialized)
struct CtlTests {
    /// Runs `conveyorctl <args>`; returns its exit status, standard output and error.
    /// In `directory` (default: a fresh temporary one, so a `.local/conveyorctl.yaml` left by
    /// `conveyor dev` in the project is never read).
    static func ctl(_ args: [String], env: [String: String], stdin: String? = nil, in directory: URL? = nil) throws
        -> (status: Int32, out: String, err: String)
    {
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
        p.standardInput = input
        try p.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try input.fileHandleForWriting.close()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let r = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
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
                #expect(try Self.ctl(["group", "cancel", "bulk"], env: keyEnv).out.hasPrefix("cancelled "))
                let cancel = try Self.ctl(["run", "cancel", UUID().uuidString], env: keyEnv)
                #expect(cancel.status != 0 && cancel.err.contains("no run"), "\(cancel.err)")
                #expect(try Self.ctl(["task", "get", "t-0001"], env: keyEnv).out.contains("recent runs:"))
                #expect(try Self.ctl(["task", "delete", "t-0003"], env: keyEnv).status == 0)
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
                #expect(try Self.ctl(["key", "revoke", prefix], env: keyEnv).status == 0)
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
                let cancel = try ctl(["task", "cancel", "hello"])
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
}
