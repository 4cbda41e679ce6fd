import ConveyorAMQP
import ConveyorCore
import ConveyorStore
import Foundation
import Testing

/// Logs of real processes with `CONVEYOR_LOG_FORMAT=json`: every line a JSON object, run lines
/// with `run.id` and `trace.id`, and credentials never written.
@Suite("Structured logs of real processes (real PostgreSQL and RabbitMQ)")
struct LogTests {
    @Test func workerLinesAreJSONWithRunAndTraceIdsAndNoCredentials() async throws {
        try await System.with { sys in
            let log = FileManager.default.temporaryDirectory.appendingPathComponent("worker-\(UUID()).log")
            _ = FileManager.default.createFile(atPath: log.path, contents: nil)
            defer { try? FileManager.default.removeItem(at: log) }
            var env = sys.workerEnvironment(id: "json-worker", executors: "shell")
            env["CONVEYOR_LOG_FORMAT"] = "json"
            // The worker's own login (workerEnvironment's): its URL carries a password to hide.
            let password = try #require(URLComponents(string: sys.workerAMQPURL)?.password)
            let p = try conveyorProcess(["worker"], env: env)
            p.standardOutput = FileHandle.nullDevice
            p.standardError = try FileHandle(forWritingTo: log)
            try p.run()
            defer { if p.isRunning { p.terminate() } }
            var task = NewTask(name: "echo", executor: "shell", schedule: .once)
            task.queue = sys.queue
            task.parameters = ["argv": ["/bin/echo", "hello from the json test"]]
            try await sys.store.createTasks([task])
            try await withServices([sys.dispatcher()]) {
                _ = try await sys.eventually(timeout: .seconds(30), "the run succeeds") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 1
                }
            }
            p.terminate()
            p.waitUntilExit()
            let lines = String(decoding: try Data(contentsOf: log), as: UTF8.self).split(separator: "\n").map(
                String.init)
            #expect(lines.count >= 3)
            var objects: [[String: Any]] = []
            for line in lines {
                guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                    Issue.record("not a JSON object: \(line)")
                    continue
                }
                #expect(o["time"] is String && o["level"] is String && o["message"] is String, "\(line)")
                objects.append(o)
            }
            let output = try #require(
                objects.first { ($0["message"] as? String)?.contains("hello from the json test") == true }, "\(lines)")
            let runID = try await sys.rows("SELECT id::text, trace_id FROM runs").first
            #expect((output["run.id"] as? String)?.lowercased() == runID?[0]?.lowercased())
            #expect(output["trace.id"] as? String == runID?[1], "the run's trace id is on its log lines")
            #expect(output["task.name"] as? String == "echo")
            // The broker URL's password never appears; the URL does, masked.
            #expect(!lines.joined().contains(password), "the AMQP password is in the log")
            #expect(lines.contains { $0.contains("amqp://conveyor-worker:***@") }, "\(lines.prefix(3))")

            // A canary password in the database URL of a failing command.
            let failed = try runConveyor(
                ["task", "list"],
                env: [
                    "CONVEYOR_DATABASE_URL": "postgresql://conveyor:canary-db-pw@127.0.0.1:1/x",
                    "CONVEYOR_LOG_FORMAT": "json",
                ])
            #expect(failed.status != 0)
            #expect(!failed.err.contains("canary-db-pw") && !failed.out.contains("canary-db-pw"), "\(failed.err)")
        }
    }

    /// A server notice ("relation … already exists, skipping", sent when `migrate` finds the schema
    /// there) is a log line like any other. libpq's default printed it raw on standard error,
    /// where it broke the JSON log's one object per line.
    @Test func serverNoticesAreLogLinesNotRawStandardError() async throws {
        try await System.with { sys in
            let env = [
                "CONVEYOR_DATABASE_URL": sys.databaseURL, "CONVEYOR_LOG_FORMAT": "json", "CONVEYOR_LOG_LEVEL": "debug",
            ]
            let r = try runConveyor(["migrate"], env: env)
            #expect(r.status == 0, "\(r.err)")
            let lines = r.err.split(separator: "\n").map(String.init)
            var notices: [[String: Any]] = []
            for line in lines {
                guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                    Issue.record("not a JSON object: \(line)")
                    continue
                }
                if o["db.severity"] as? String == "NOTICE" { notices.append(o) }
            }
            let notice = try #require(notices.first, "no notice logged: \(lines)")
            #expect((notice["message"] as? String)?.contains("already exists, skipping") == true, "\(notice)")
            #expect(notice["level"] as? String == "debug")
            #expect(notice["db.sqlstate"] as? String == "42P07")
        }
    }
}
