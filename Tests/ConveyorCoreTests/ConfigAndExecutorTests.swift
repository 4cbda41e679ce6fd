import ConveyorAMQP
import ConveyorConfig
import ConveyorCore
import ConveyorWorker
import Foundation
import Logging
import Synchronization
import Testing

@Suite struct SettingsTests {
    func yaml(_ text: String) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("conveyor-\(UUID()).yaml").path
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func environmentOverridesTheFileAndMissingKeysTakeDefaults() async throws {
        let file = try yaml("worker:\n  concurrency: 8\n  queues: [a, b]\n")
        let s = try await Settings.load(file: file, environment: ["CONVEYOR_WORKER_CONCURRENCY": "12"])
        let c = try WorkerConfiguration(settings: s)
        #expect(c.concurrency == 12)
        #expect(c.queues == ["a", "b"])
        #expect(c.executorNames == ["noop"])
        #expect(c.shutdownGrace == .seconds(25))
    }

    @Test func aBadEnvironmentValueNamesTheKeyTheVariableAndTheValue() async throws {
        let s = try await Settings.load(file: nil, environment: ["CONVEYOR_WORKER_CONCURRENCY": "lots"])
        #expect { try WorkerConfiguration(settings: s) } throws: { e in
            let text = "\(e)"
            return text.contains("worker.concurrency") && text.contains("CONVEYOR_WORKER_CONCURRENCY")
                && text.contains("lots") && text.contains("whole number")
        }
        let zero = try await Settings.load(file: nil, environment: ["CONVEYOR_WORKER_CONCURRENCY": "0"])
        #expect(throws: ValidationError.self) { try WorkerConfiguration(settings: zero) }
    }

    /// A worker id the dispatcher would refuse (statuses and heartbeats carry at most 200
    /// characters) is refused at start-up, naming the key.
    @Test func aWorkerIDPast200CharactersIsRefusedAtStartUp() async throws {
        let long = try await Settings.load(
            file: nil, environment: ["CONVEYOR_WORKER_ID": String(repeating: "w", count: 201)])
        #expect { try WorkerConfiguration(settings: long) } throws: { e in
            "\(e)".contains("worker.id") && "\(e)".contains("200")
        }
        let ok = try await Settings.load(file: nil, environment: ["CONVEYOR_WORKER_ID": "pod-7"])
        #expect(try WorkerConfiguration(settings: ok).id == "pod-7")
    }

    @Test func theReconnectCapComesFromSettingsAndIsBounded() async throws {
        let none = try await Settings.load(file: nil, environment: [:])
        #expect(
            try AMQPConfiguration(settings: none).reconnectCap == .seconds(2),
            "the default keeps a reconnect within 5 s of the broker's return")
        let set = try await Settings.load(file: nil, environment: ["CONVEYOR_AMQP_RECONNECT_MAX_MS": "750"])
        #expect(try AMQPConfiguration(settings: set).reconnectCap == .milliseconds(750))
        let tiny = try await Settings.load(file: nil, environment: ["CONVEYOR_AMQP_RECONNECT_MAX_MS": "5"])
        #expect { try AMQPConfiguration(settings: tiny) } throws: { e in
            let text = "\(e)"
            return text.contains("amqp.reconnect_max_ms") && text.contains("5") && text.contains("from 100 to 60000")
        }
    }

    /// Issue 25: several brokers, as one comma-separated URL or as a list; each entry checked at
    /// start-up and named when wrong, passwords never shown.
    @Test func aBrokerListIsReadCheckedAndRedacted() async throws {
        let env = [
            "CONVEYOR_AMQP_URL": "amqp://u:s1@a:5672/%2F, amqp://u:s1@b:5673/%2F,amqp://u:s1@c/v"
        ]
        let joined = try AMQPConfiguration(settings: try await Settings.load(file: nil, environment: env))
        #expect(try joined.endpoints().map(\.host) == ["a", "b", "c"])
        #expect(try joined.endpoints().map(\.port) == [5672, 5673, 5672])
        #expect(try joined.endpoints().map(\.vhost) == ["/", "/", "v"])
        #expect(!joined.redactedURL.contains("s1"))
        #expect(try joined.endpoints().allSatisfy { !$0.redacted.contains("s1") })

        let file = try yaml("amqp:\n  endpoints:\n    - amqp://u:p@a:5672/%2F\n    - amqp://u:p@b:5672/%2F\n")
        let listed = try AMQPConfiguration(settings: try await Settings.load(file: file, environment: [:]))
        #expect(try listed.endpoints().map(\.host) == ["a", "b"])

        let both = try await Settings.load(file: file, environment: ["CONVEYOR_AMQP_URL": "amqp://u:p@x/%2F"])
        #expect { try AMQPConfiguration(settings: both) } throws: { e in
            "\(e)".contains("amqp.endpoints") && "\(e)".contains("CONVEYOR_AMQP_URL")
        }
        // A password with a raw comma splits the entry: the tail is named, the fix given.
        #expect { try AMQPConfiguration(url: "amqp://u:hunter,two@h:5672/%2F").validate() } throws: { e in
            let text = "\(e)"
            return text.contains("entry 2 of 2") && text.contains("%2C") && !text.contains("hunter")
                && !text.contains("two@")
        }
        #expect { try AMQPConfiguration(url: "amqps://u:secret@h:5671/%2F").validate() } throws: { e in
            "\(e)".contains("TLS") && !"\(e)".contains("secret")
        }
        #expect { try AMQPConfiguration(url: " , ").validate() } throws: { "\($0)".contains("empty") }
        #expect(throws: Never.self) { try AMQPConfiguration(url: "amqp://u:pa%2Css@h:5672/%2F").validate() }
        #expect(try AMQPConfiguration(url: "amqp://u:pa%2Css@h:5672/%2F").endpoints()[0].password == "pa,ss")
    }

    @Test func malformedYAMLIsAClearError() async throws {
        let file = try yaml("worker: [unclosed\n")
        await #expect { try await Settings.load(file: file) } throws: { "\($0)".contains(file) }
    }

    @Test func unknownExecutorTypeStopsStartUpNamingFileAndKey() async throws {
        let file = try yaml("worker:\n  executors: [x]\nexecutors:\n  x:\n    type: teleport\n")
        let s = try await Settings.load(file: file, environment: [:])
        #expect { try ExecutorFactory().make(names: ["x"], settings: s) } throws: { e in
            let text = "\(e)"
            return text.contains(file) && text.contains("executors.x.type") && text.contains("teleport")
                && text.contains("shell")
        }
        let missing = try await Settings.load(file: try yaml("executors: {}\n"), environment: [:])
        #expect { try ExecutorFactory().make(names: ["y"], settings: missing) } throws: {
            "\($0)".contains("executors.y.type")
        }
    }

    @Test func shellNeedsAnAllowlistOfAbsolutePaths() async throws {
        let s = try await Settings.load(file: try yaml("executors:\n  sh:\n    type: shell\n"), environment: [:])
        #expect { try ExecutorFactory().make(names: ["sh"], settings: s) } throws: {
            "\($0)".contains("allowed_commands")
        }
        let rel = try await Settings.load(
            file: try yaml("executors:\n  sh:\n    type: shell\n    allowed_commands: [echo]\n"), environment: [:])
        #expect { try ExecutorFactory().make(names: ["sh"], settings: rel) } throws: { "\($0)".contains("absolute") }
    }

    @Test func customTypesCanBeRegistered() async throws {
        struct Custom: Executor { func execute(_ c: ExecutionContext) async -> ExecutionResult { .succeeded } }
        var f = ExecutorFactory()
        f.register("custom") { _ in Custom() }
        let s = try await Settings.load(file: try yaml("executors:\n  mine:\n    type: custom\n"), environment: [:])
        let made = try f.make(names: ["mine"], settings: s)
        #expect(made["mine"] is Custom)
    }
}

@Suite struct ShippedConfigTests {
    @Test func theShippedWorkerConfigBuildsEveryExecutorItOffers() async throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let s = try await Settings.load(file: root.appendingPathComponent("config/worker.yaml").path, environment: [:])
        let c = try WorkerConfiguration(settings: s)
        let made = try ExecutorFactory().make(names: c.executorNames, settings: s)
        #expect(Set(made.keys) == ["noop", "sleep", "shell", "http"])
        #expect(c.executorLimits == ["shell": 8])
        let shell = try #require(made["shell"] as? ShellExecutor)
        #expect(!shell.allowedCommands.contains("/bin/sh") && !shell.allowedCommands.contains("/usr/bin/env"))
        let r = await shell.execute(
            ExecutionContext(
                runID: UUID(), taskName: "t", attempt: 1, parameters: ["argv": ["/bin/echo", "-e", "x"]],
                timeout: .seconds(5), traceparent: nil, tracestate: nil, idempotencyKey: "k"))
        #expect(r.errorClass == "argument_blocked")
    }
}

@Suite struct ShellExecutorTests {
    /// A shell executor; `extra` adds settings, and may replace `allowed_commands`.
    func shell(_ extra: String = "") async throws -> ShellExecutor {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sh-\(UUID()).yaml").path
        let commands = extra.contains("allowed_commands:") ? "" : "allowed_commands: [/bin/echo, /bin/sh, /bin/sleep]\n"
        try "type: shell\n\(commands)kill_grace_ms: 200\n\(extra)".write(
            toFile: path, atomically: true, encoding: .utf8)
        return try ShellExecutor(settings: try await Settings.load(file: path, environment: [:]))
    }

    func context(_ params: JSONValue, timeout: Duration = .seconds(10)) -> ExecutionContext {
        ExecutionContext(
            runID: UUID(), taskName: "t", attempt: 3, parameters: params, timeout: timeout,
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", tracestate: nil,
            idempotencyKey: "key-1")
    }

    @Test func runsArgvWithoutAShellAndCapturesOutput() async throws {
        let r = try await shell().execute(
            context(.object(["argv": .array([.string("/bin/echo"), .string("$HOME; rm -rf /")])])))
        #expect(r.outcome == .succeeded)
        #expect(r.exitCode == 0)
        #expect(r.output == "$HOME; rm -rf /\n", "arguments reach the program verbatim: no shell expansion")
    }

    @Test func exitCodeEnvironmentAndStderrAreRecorded() async throws {
        let script =
            """
            echo run=$CONVEYOR_RUN_ID attempt=$CONVEYOR_ATTEMPT tp=$TRACEPARENT home=${HOME:-unset}; echo oops >&2; \
            exit 3
            """
        let r = try await shell().execute(
            context(.object(["argv": .array([.string("/bin/sh"), .string("-c"), .string(script)])])))
        #expect(r.outcome == .failed)
        #expect(r.exitCode == 3)
        let out = try #require(r.output)
        // TRACEPARENT is the executor's own span: the run's trace id, a new span id.
        #expect(out.contains("run=key-1 attempt=3 tp=00-0af7651916cd43dd8448eb211c80319c-"))
        #expect(!out.contains("b7ad6b7169203331"))
        #expect(out.contains(" home=unset"))
        #expect(out.contains("oops"))
    }

    @Test func commandsOutsideTheAllowlistAndReservedEnvAreRefused() async throws {
        let r = try await shell().execute(context(.object(["argv": .array([.string("/usr/bin/id")])])))
        #expect(r.errorClass == "command_not_allowed")
        let e = try await shell().execute(
            context(.object(["argv": .array([.string("/bin/echo")]), "env": .object(["LD_PRELOAD": .string("x")])])))
        #expect(e.errorClass == "bad_parameters")
        let noArgv = try await shell().execute(context(.object([:])))
        #expect(noArgv.errorClass == "bad_parameters")
    }

    @Test func outputIsCappedKeepingTheTail() async throws {
        let s = try await shell("output_limit_bytes: 100\n")
        let r = await s.execute(
            context(
                .object([
                    "argv": .array([
                        .string("/bin/sh"), .string("-c"),
                        .string("i=0; while [ $i -lt 500 ]; do echo line$i; i=$((i+1)); done"),
                    ])
                ])))
        let out = try #require(r.output)
        #expect(out.contains("line499"))
        #expect(!out.contains("line1\n"))
        #expect(out.contains("bytes dropped"))
    }

    @Test func injectionAttemptsNeverCreateTheCanary() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("inj-\(UUID())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let canary = dir + "/canary"
        let s = try await shell(
            """
            allowed_commands: [/bin/echo, /usr/bin/find, /bin/cat]
            blocked_arguments: ["^-", "(^|/)\\\\.\\\\.(/|$)"]
            allowed_roots: [\(dir)]
            """)
        let touch = "/usr/bin/touch \(canary)"
        let attempts: [JSONValue] = [
            ["argv": ["/bin/echo", .string("; \(touch)")]],
            ["argv": ["/bin/echo", .string("$(\(touch))")]],
            ["argv": ["/bin/echo", .string("`\(touch)`")]],
            ["argv": ["/bin/echo", .string("x | \(touch)")]],
            ["argv": ["/bin/echo", .string("x\n\(touch)")]],
            ["argv": ["/bin/echo", .string("x && \(touch)")]],
            ["argv": [.string("/bin/echo; \(touch)")]],
            ["argv": [.string(touch)]],
            ["argv": ["/bin/sh", "-c", .string(touch)]],
            ["argv": ["/bin/../usr/bin/touch", .string(canary)]],
            ["argv": ["/usr/bin/find", .string(dir), "-exec", "/usr/bin/touch", .string(canary), ";"]],
            ["argv": ["/usr/bin/find", "-fprint", .string(canary)]],
            ["argv": ["/bin/cat", "../../../etc/passwd"]],
            ["argv": ["/bin/echo", "x"], "cwd": "../../"],
            ["argv": ["/bin/echo", "x"], "env": ["LD_PRELOAD": .string(dir + "/evil.so")]],
            ["argv": ["/bin/echo", "x"], "env": ["BASH_ENV": .string(dir + "/evil.sh")]],
            ["argv": ["/bin/echo", "x"], "env": ["PATH": .string(dir)]],
        ]
        for a in attempts {
            let r = await s.execute(context(a))
            if r.outcome == .succeeded {
                // Only the echoes may run, and they print their argument verbatim.
                #expect(a["argv"]?.arrayValue?.first == "/bin/echo", "\(a) ran: \(r)")
                #expect(r.output?.contains("touch") == true, "\(a): \(r)")
            } else {
                #expect(
                    ["command_not_allowed", "argument_blocked", "bad_parameters", "cwd_not_allowed"].contains(
                        r.errorClass ?? ""), "\(a): \(r)")
            }
        }
        #expect(!FileManager.default.fileExists(atPath: canary), "an injection attempt created the canary")
    }

    @Test func workingDirectoryStaysInsideTheAllowedRoots() async throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("root-\(UUID())").path
        try FileManager.default.createDirectory(atPath: root + "/jobs", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: root + "/etc-link", withDestinationPath: "/etc")
        let s = try await shell("allowed_commands: [/bin/pwd]\nallowed_roots: [\(root)]\n")
        let inside = await s.execute(context(["argv": ["/bin/pwd"], "cwd": "jobs"]))
        #expect(inside.outcome == .succeeded && inside.output == root + "/jobs\n", "\(inside)")
        let byDefault = await s.execute(context(["argv": ["/bin/pwd"]]))
        #expect(byDefault.output == root + "\n")
        for escape in ["..", "jobs/../..", "etc-link", "/etc", "/"] {
            let r = await s.execute(context(["argv": ["/bin/pwd"], "cwd": .string(escape)]))
            #expect(r.errorClass == "cwd_not_allowed", "\(escape): \(r)")
        }
    }

    @Test func theChildInheritsNoDescriptorOfTheWorker() async throws {
        // A descriptor opened without O_CLOEXEC, as a C library might.
        let fd = open("/dev/null", O_RDONLY)
        #expect(fd > 2)
        defer { close(fd) }
        let s = try await shell("allowed_commands: [/bin/ls]\n")
        let r = await s.execute(context(["argv": ["/bin/ls", "/proc/self/fd"]]))
        let fds = Set((r.output ?? "").split(separator: "\n").map(String.init))
        // 0-2, and the descriptor ls opened to list the folder.
        #expect(fds.isSubset(of: ["0", "1", "2", "3"]), "descriptors seen by the child: \(fds.sorted())")
        #expect(!fds.contains(String(fd)) || fd == 3)
    }

    @Test func whatTheCommandLeavesRunningIsKilledWhenItExits() async throws {
        let s = try await shell()
        let started = ContinuousClock.now
        let r = await s.execute(context(["argv": ["/bin/sh", "-c", "/bin/sleep 30 & echo $!"]]))
        #expect(r.outcome == .succeeded)
        #expect(ContinuousClock.now - started < .seconds(5), "a background child held the run open")
        let pid = try #require(Int32((r.output ?? "").trimmingCharacters(in: .whitespacesAndNewlines)))
        var stat = ""
        let ended = try await Self.eventually {
            stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
            let state = stat.split(separator: ")").last?.split(separator: " ").first.map(String.init)
            return state == nil || state == "Z"
        }
        #expect(ended, "the background sleep is still running: \(stat)")
    }

    @Test func resourceLimitsHoldFromTheFirstInstruction() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lim-\(UUID())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let s = try await shell("allowed_roots: [\(dir)]\nlimits:\n  file_size_bytes: 1000\n")
        let r = await s.execute(
            context(["argv": ["/bin/sh", "-c", "/usr/bin/head -c 5000 /dev/zero > big; echo wrote"]]))
        // The file exists (the command ran in the root) and stopped at the limit.
        let size = try #require(try FileManager.default.attributesOfItem(atPath: dir + "/big")[.size] as? Int)
        #expect(size <= 1000, "the file grew past the limit: \(size) bytes; \(r)")
    }

    @Test func outputLinesAreStreamedToTheLog() async throws {
        let lines = Recorded<[String]>([])
        let logger = Logger(label: "test") { _ in CapturingLogHandler(lines: lines) }
        var c = context(["argv": ["/bin/sh", "-c", "echo one; echo two >&2; echo three"]])
        c.logger = logger
        let r = try await shell().execute(c)
        #expect(r.outcome == .succeeded)
        #expect(Set(lines.value) == ["stdout: one", "stderr: two", "stdout: three"])
    }

    @Test func cleanupRunsAfterEveryEnding() async throws {
        let seen = Recorded<[Outcome]>([])
        struct Probe: Executor {
            let seen: Recorded<[Outcome]>
            func execute(_ context: ExecutionContext) async -> ExecutionResult {
                if context.parameters["fail"] != nil { return .failed("x", "asked to fail") }
                if context.parameters["hang"] != nil { try? await Task.sleep(for: .seconds(30)) }
                return .succeeded
            }
            func cleanup(_ context: ExecutionContext, result: ExecutionResult) async {
                seen.update { $0.append(result.outcome) }
            }
        }
        let probe = Probe(seen: seen)
        _ = await Worker.runForTesting(probe, context([:]))
        _ = await Worker.runForTesting(probe, context(["fail": true]))
        _ = await Worker.runForTesting(probe, context(["hang": true], timeout: .milliseconds(100)))
        #expect(seen.value == [.succeeded, .failed, .timedOut])
    }

    /// Descriptors open in this process.
    static func openDescriptors() -> Int { descriptors().count }

    /// Each open descriptor and what it refers to.
    static func descriptors() -> Set<String> {
        Set(
            ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).map { fd in
                "\(fd)->" + ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? "?")
            })
    }

    /// This process's children that are zombies (exited, never reaped).
    static func zombieChildren() -> [String] {
        let me = getpid()
        return ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { pid in
            guard Int32(pid) != nil, let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
                let tail = stat.split(separator: ")").last?.split(separator: " "), tail.count > 2
            else { return nil }
            return tail[0] == "Z" && Int32(tail[1]) == me ? pid : nil
        }
    }

    @Test func tenThousandRunsLeaveNoZombieAndNoDescriptor() async throws {
        let s = try await shell("allowed_commands: [/bin/true, /bin/false]\nlog_output: false\n")
        // Warm up first: the runtime opens a few descriptors once (dispatch queues, timers).
        for _ in 0..<20 { _ = await s.execute(context(["argv": ["/bin/true"]])) }
        let before = Self.descriptors()
        let failures = await withTaskGroup(of: Int.self) { group in
            for lane in 0..<16 {
                group.addTask {
                    var failed = 0
                    for i in stride(from: lane, to: 10_000, by: 16) {
                        let r = await s.execute(self.context(["argv": [i % 10 == 0 ? "/bin/false" : "/bin/true"]]))
                        if r.outcome != (i % 10 == 0 ? .failed : .succeeded) { failed += 1 }
                    }
                    return failed
                }
            }
            return await group.reduce(0, +)
        }
        #expect(failures == 0)
        // The reader threads close their pipe ends as they finish.
        var after = Set<String>()
        let closed = try await Self.eventually {
            after = Self.descriptors()
            return after.count <= before.count
        }
        #expect(closed, "new descriptors: \(after.subtracting(before).sorted())")
        #expect(Self.zombieChildren().isEmpty, "zombies: \(Self.zombieChildren())")
    }

    @Test func timeoutKillsTheWholeProcessGroup() async throws {
        let marker = FileManager.default.temporaryDirectory.appendingPathComponent("child-\(UUID())").path
        // The shell starts a grandchild that would write the marker after 2 s, then waits.
        let script = "(/bin/sleep 2; /bin/echo late > \(marker)) & /bin/sleep 30"
        let started = ContinuousClock.now
        let result = await Worker.runForTesting(
            try await shell(),
            context(
                .object(["argv": .array([.string("/bin/sh"), .string("-c"), .string(script)])]),
                timeout: .milliseconds(300)))
        #expect(result.outcome == .timedOut)
        #expect(ContinuousClock.now - started < .seconds(5))
        // Once no process of the group is left (killed, or, were it not, after writing the marker),
        // the marker tells which.
        let gone = try await Self.eventually(timeout: .seconds(10)) { Self.processes(mentioning: marker).isEmpty }
        #expect(gone, "processes of the group are left: \(Self.processes(mentioning: marker))")
        #expect(!FileManager.default.fileExists(atPath: marker), "the grandchild in the process group was killed too")
    }

    /// Live processes (not zombies) whose command line holds `text`.
    static func processes(mentioning text: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).filter { pid in
            guard Int32(pid) != nil,
                let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"),
                String(decoding: cmdline, as: UTF8.self).contains(text),
                let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
            else { return false }
            return stat.split(separator: ")").last?.split(separator: " ").first != "Z"
        }
    }

    /// Polls `condition` every 20 ms until it holds (true) or `timeout` passes (false).
    static func eventually(timeout: Duration = .seconds(5), _ condition: () throws -> Bool) async throws -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try condition() { return true }
            try await Task.sleep(for: .milliseconds(20))
        }
        return try condition()
    }
}

/// Collects `"<output.stream>: <message>"` of each record.
struct CapturingLogHandler: LogHandler {
    let lines: Recorded<[String]>
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        let stream = event.metadata?["output.stream"].map { "\($0)" } ?? "-"
        lines.update { $0.append("\(stream): \(event.message)") }
    }
}

/// A value shared with concurrent code under a lock.
final class Recorded<Value: Sendable>: Sendable {
    private let state: Mutex<Value>
    init(_ value: Value) { state = Mutex(value) }
    var value: Value { state.withLock { $0 } }
    func update(_ body: (inout Value) -> Void) { state.withLock { body(&$0) } }
}
