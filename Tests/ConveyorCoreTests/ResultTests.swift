import ConveyorConfig
import ConveyorCore
import Foundation
import Testing

@testable import ConveyorWorker

/// Structured results: what executors return, and how a status carries one.
@Suite struct ResultTests {
    @Test func aStatusCarriesItsResultAndBoundsAnOversizedOneWithAMarker() throws {
        var m = StatusMessage(
            runID: UUID(), attempt: 1, event: .finished, outcome: .succeeded, workerID: "w",
            result: ["rows": 3, "files": ["a", "b"]])
        let back = try MessageCodec.decodeStatus(MessageCodec.encode(m))
        #expect(back.result == m.result)

        // A status from a worker that does not bound its result (or not ours): bounded on decode.
        m.result = ["blob": .string(String(repeating: "x", count: 40_000))]
        let bounded = try MessageCodec.decodeStatus(MessageCodec.encode(m))
        #expect(bounded.result?["conveyor_truncated"] == true, "\(String(describing: bounded.result?["bytes"]))")
        #expect(bounded.result?["bytes"]?.doubleValue ?? 0 > 40_000)
        #expect(bounded.result?["head"]?.stringValue?.hasPrefix(#"{"blob":"xxx"#) == true)
        #expect(bounded.result.map { $0.jsonBytes.count } ?? 0 < StatusMessage.maxResultBytes)
        // Text PostgreSQL's jsonb cannot hold (NUL) is replaced, in keys and values.
        m.result = ["a\u{0}b": ["c\u{0}"]]
        #expect(try MessageCodec.decodeStatus(MessageCodec.encode(m)).result == ["a\u{FFFD}b": ["c\u{FFFD}"]])
        m.result = nil
        #expect(!String(decoding: MessageCodec.encode(m), as: UTF8.self).contains("result"), "absent, not null")
    }

    @Test func aTaskMessageCarriesItsInputsBoundedPerUpstream() throws {
        var m = TaskMessage(
            runID: UUID(), taskID: UUID(), taskName: "load", occurrence: Date(timeIntervalSince1970: 1_800_000_000),
            attempt: 1, queue: "q", executor: "sh", parameters: [:], timeoutSeconds: 5)
        m.inputs = ["extract": ["rows": 3]]
        #expect(try MessageCodec.decodeTask(MessageCodec.encode(m)).inputs == m.inputs)
        m.inputs = nil
        #expect(try MessageCodec.decodeTask(MessageCodec.encode(m)).inputs == nil)
        // Four upstreams of 30 KB each: over 96 KiB in all, so each past an even share is marked;
        // a small one beside them stays.
        var many: [String: JSONValue] = ["small": ["n": 1]]
        for i in 0..<4 { many["big\(i)"] = .string(String(repeating: "z", count: 30_000)) }
        let bounded = try #require(TaskMessage.bounded(inputs: .object(many)))
        #expect(bounded.jsonBytes.count <= TaskMessage.maxInputsBytes, "\(bounded.jsonBytes.count)")
        #expect(bounded["small"] == ["n": 1])
        #expect(bounded["big0"]?["conveyor_truncated"] == true)
    }

    func shell(_ commands: String = "[/bin/echo, /bin/sh]") async throws -> ShellExecutor {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sh-\(UUID()).yaml").path
        try "type: shell\nallowed_commands: \(commands)\n".write(toFile: path, atomically: true, encoding: .utf8)
        return try ShellExecutor(settings: try await Settings.load(file: path, environment: [:]))
    }

    func context(_ params: JSONValue) -> ExecutionContext {
        ExecutionContext(
            runID: UUID(), taskName: "t", attempt: 1, parameters: params, timeout: .seconds(10), traceparent: nil,
            tracestate: nil, idempotencyKey: "k")
    }

    @Test func aShellCommandsLastLineIsItsResultWhenAsked() async throws {
        let sh = try await shell()
        let script = #"echo working; echo '{"rows": 3, "ok": true}'; echo"#
        let r = await sh.execute(context(["argv": ["/bin/sh", "-c", .string(script)], "result": "last_line"]))
        #expect(r.outcome == .succeeded && r.result == ["rows": 3, "ok": true], "\(r)")
        let plain = await sh.execute(context(["argv": ["/bin/echo", #"{"rows": 3}"#]]))
        #expect(plain.outcome == .succeeded && plain.result == nil, "not asked: no result")
        let notJSON = await sh.execute(context(["argv": ["/bin/echo", "done"], "result": "last_line"]))
        #expect(notJSON.outcome == .failed && notJSON.errorClass == "invalid_result", "\(notJSON)")
        #expect(notJSON.errorMessage?.contains("done") == true)
        let policy = try RetryPolicy(maxAttempts: 3, json: .object([:]))
        #expect(
            !policy.isRetryable(state: .failed, exitCode: 0, errorClass: "invalid_result"),
            "the same command prints the same last line: not retried by default")
        let bad = await sh.execute(context(["argv": ["/bin/echo", "x"], "result": "stdout"]))
        #expect(bad.errorClass == "bad_parameters", "\(bad)")
    }
}
