import ConveyorCore
import Foundation
import Testing

/// The message reader against the serializer a worker written in Python uses: `json.dumps` with
/// its defaults (`ensure_ascii`, so every non-ASCII character is a `\u` escape and each emoji a
/// surrogate pair; `", "` and `": "` between members), and what we write read back by
/// `json.loads`.
@Suite struct PythonJSONTests {
    static let runID = UUID(uuidString: "0af76519-16cd-43dd-8448-eb211c80319c")!
    static let taskID = UUID(uuidString: "5b0e2c8a-9f41-4d3e-8a7b-1c2d3e4f5a6b")!

    @Test func messagesWrittenByPythonsJSONAreReadAsWritten() async throws {
        let script = """
            import json, sys
            run, task = sys.argv[1], sys.argv[2]
            text = "caf\\u00e9 \\U0001F600 tab\\t ctl\\u0001 quote\\" back\\\\ </script>"
            print(json.dumps({"version": 1, "run_id": run, "task_id": task, "task_name": text,
                "occurrence": "2026-11-23T12:00:00.250000Z", "attempt": 2, "queue": "q", "executor": "shell",
                "parameters": {"argv": ["/bin/echo", text], "big": 2**63 - 1, "small": -2**63, "f": 1.5,
                               "e": 1e300, "z": None, "t": True},
                "timeout_seconds": 30, "idempotency_key": run, "proof": "p", "x-added-later": [1, {"a": None}]}))
            status = json.dumps({"version": 1, "run_id": run, "attempt": 2, "event": "finished",
                "outcome": "succeeded", "exit_code": 0, "output": text, "worker_id": "py-1",
                "at": "2026-11-23T12:00:01Z", "started_at": None, "result": {"rows": [1, 2.5, text]}})
            print(status)
            print(json.dumps({"version": 1, "statuses": [{"body": status, "seal": "s", "traceparent": None}]}))
            """
        let r = try await runRequired("python3", ["-c", script, Self.runID.lowercasedString, Self.taskID.uuidString])
        #expect(r.status == 0, "\(r.err)")
        let lines = r.out.split(separator: "\n").map { Array($0.utf8) }
        try #require(lines.count == 3, "\(r.out)")
        #expect(!r.out.contains("é") && r.out.contains(#"\ud83d\ude00"#), "Python escaped every non-ASCII character")
        let text = "café 😀 tab\t ctl\u{01} quote\" back\\ </script>"

        let task = try MessageCodec.decodeTask(lines[0])
        #expect(task.runID == Self.runID && task.taskID == Self.taskID && task.taskName == text)
        #expect(task.occurrence == Timestamp.parse("2026-11-23T12:00:00.25Z") && task.timeoutSeconds == 30)
        #expect(
            task.parameters
                == [
                    "argv": ["/bin/echo", .string(text)], "big": .number(Double(Int.max)),
                    "small": .number(Double(Int.min)), "f": 1.5, "e": 1e300, "z": .null, "t": true,
                ])

        let status = try MessageCodec.decodeStatus(lines[1])
        #expect(status.output == text && status.outcome == .succeeded && status.exitCode == 0)
        #expect(status.startedAt == nil && status.result == ["rows": [1, 2.5, .string(text)]])

        let batch = try MessageCodec.decode(batch: lines[2])
        #expect(batch.count == 1 && batch[0].body == lines[1] && batch[0].seal == "s" && batch[0].traceparent == nil)
        #expect(try MessageCodec.decodeStatus(batch[0].body) == status, "a batch's status reads as it did alone")
    }

    @Test func whatWeWritePythonReads() async throws {
        let text = "café 😀 tab\t ctl\u{01} quote\" back\\ </script>"
        var s = StatusMessage(
            runID: Self.runID, attempt: 2, event: .finished, outcome: .timedOut, exitCode: -9, output: text,
            workerID: "w", at: Date(timeIntervalSince1970: 1_795_435_200.25), result: ["n": 12])
        s.errorClass = "timeout"
        let body = String(decoding: MessageCodec.encode(s), as: UTF8.self)
        let script = """
            import json, sys
            s = json.loads(sys.argv[1])
            print(json.dumps([s["output"] == sys.argv[2], s["outcome"], s["exit_code"], s["at"], s["result"]["n"]]))
            """
        let r = try await runRequired("python3", ["-c", script, body, text])
        #expect(r.status == 0, "\(r.err)")
        #expect(
            r.out.trimmingCharacters(in: .whitespacesAndNewlines)
                == #"[true, "timed_out", -9, "2026-11-23T12:00:00.250000Z", 12]"#)
    }
}
