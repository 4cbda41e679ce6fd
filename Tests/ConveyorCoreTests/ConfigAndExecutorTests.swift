import ConveyorConfig
import ConveyorCore
import ConveyorWorker
import Foundation
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
            return text.contains("worker.concurrency") && text.contains("CONVEYOR_WORKER_CONCURRENCY") && text.contains("lots") && text.contains("whole number")
        }
        let zero = try await Settings.load(file: nil, environment: ["CONVEYOR_WORKER_CONCURRENCY": "0"])
        #expect(throws: ValidationError.self) { try WorkerConfiguration(settings: zero) }
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
            return text.contains(file) && text.contains("executors.x.type") && text.contains("teleport") && text.contains("shell")
        }
        let missing = try await Settings.load(file: try yaml("executors: {}\n"), environment: [:])
        #expect { try ExecutorFactory().make(names: ["y"], settings: missing) } throws: { "\($0)".contains("executors.y.type") }
    }

    @Test func shellNeedsAnAllowlistOfAbsolutePaths() async throws {
        let s = try await Settings.load(file: try yaml("executors:\n  sh:\n    type: shell\n"), environment: [:])
        #expect { try ExecutorFactory().make(names: ["sh"], settings: s) } throws: { "\($0)".contains("allowed_commands") }
        let rel = try await Settings.load(file: try yaml("executors:\n  sh:\n    type: shell\n    allowed_commands: [echo]\n"), environment: [:])
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

@Suite struct ShellExecutorTests {
    func shell(_ extra: String = "") async throws -> ShellExecutor {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sh-\(UUID()).yaml").path
        try "type: shell\nallowed_commands: [/bin/echo, /bin/sh, /bin/sleep]\nkill_grace_ms: 200\n\(extra)".write(toFile: path, atomically: true, encoding: .utf8)
        return try ShellExecutor(settings: try await Settings.load(file: path, environment: [:]))
    }

    func context(_ params: JSONValue, timeout: Duration = .seconds(10)) -> ExecutionContext {
        ExecutionContext(runID: UUID(), taskName: "t", attempt: 3, parameters: params, timeout: timeout,
                         traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", tracestate: nil, idempotencyKey: "key-1")
    }

    @Test func runsArgvWithoutAShellAndCapturesOutput() async throws {
        let r = try await shell().execute(context(.object(["argv": .array([.string("/bin/echo"), .string("$HOME; rm -rf /")])])))
        #expect(r.outcome == .succeeded)
        #expect(r.exitCode == 0)
        #expect(r.output == "$HOME; rm -rf /\n", "arguments reach the program verbatim: no shell expansion")
    }

    @Test func exitCodeEnvironmentAndStderrAreRecorded() async throws {
        let script = "echo run=$CONVEYOR_RUN_ID attempt=$CONVEYOR_ATTEMPT tp=$TRACEPARENT home=${HOME:-unset}; echo oops >&2; exit 3"
        let r = try await shell().execute(context(.object(["argv": .array([.string("/bin/sh"), .string("-c"), .string(script)])])))
        #expect(r.outcome == .failed)
        #expect(r.exitCode == 3)
        let out = try #require(r.output)
        #expect(out.contains("run=key-1 attempt=3 tp=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 home=unset"))
        #expect(out.contains("oops"))
    }

    @Test func commandsOutsideTheAllowlistAndReservedEnvAreRefused() async throws {
        let r = try await shell().execute(context(.object(["argv": .array([.string("/usr/bin/id")])])))
        #expect(r.errorClass == "command_not_allowed")
        let e = try await shell().execute(context(.object(["argv": .array([.string("/bin/echo")]), "env": .object(["LD_PRELOAD": .string("x")])])))
        #expect(e.errorClass == "bad_parameters")
        let noArgv = try await shell().execute(context(.object([:])))
        #expect(noArgv.errorClass == "bad_parameters")
    }

    @Test func outputIsCappedKeepingTheTail() async throws {
        let s = try await shell("output_limit_bytes: 100\n")
        let r = await s.execute(context(.object(["argv": .array([.string("/bin/sh"), .string("-c"), .string("i=0; while [ $i -lt 500 ]; do echo line$i; i=$((i+1)); done")])])))
        let out = try #require(r.output)
        #expect(out.contains("line499"))
        #expect(!out.contains("line1\n"))
        #expect(out.contains("bytes dropped"))
    }

    @Test func timeoutKillsTheWholeProcessGroup() async throws {
        let marker = FileManager.default.temporaryDirectory.appendingPathComponent("child-\(UUID())").path
        // The shell starts a grandchild that would write the marker after 2 s, then waits.
        let script = "(/bin/sleep 2; /bin/echo late > \(marker)) & /bin/sleep 30"
        let started = ContinuousClock.now
        let result = await Worker.runForTesting(try await shell(), context(.object(["argv": .array([.string("/bin/sh"), .string("-c"), .string(script)])]),
                                                                          timeout: .milliseconds(300)))
        #expect(result.outcome == .timedOut)
        #expect(ContinuousClock.now - started < .seconds(5))
        try await Task.sleep(for: .seconds(2.5))
        #expect(!FileManager.default.fileExists(atPath: marker), "the grandchild in the process group was killed too")
    }
}
