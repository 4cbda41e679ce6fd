import ConveyorAPI
import ConveyorCore
import ConveyorStore
import ConveyorWorker
import Foundation
import Testing

/// Succeeds with a line of output, so the run page has something to show.
struct EchoExecutor: Executor {
    func execute(_ context: ExecutionContext) async -> ExecutionResult {
        ExecutionResult(
            outcome: .succeeded, exitCode: 0,
            output: "report for \(context.parameters["customer"]?.stringValue ?? "?") written\n",
            result: ["customer": context.parameters["customer"] ?? .null, "rows": 12])
    }
}

/// The dashboard as a person sees it: headless Chromium (scripts/dashboard_check.py) signs in
/// with a key, opens every page of a running system with data, and reports the text shown.
@Suite("Dashboard in headless Chromium (real PostgreSQL, RabbitMQ, browser)", .serialized)
struct DashboardTests {
    @Test func everyPageShowsTheSystemsDataAndUpdatesLive() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let worker = sys.worker(
                ["echo": EchoExecutor(), "scripted": ScriptedExecutor(recorder: recorder)], id: "dash-worker"
            ) {
                $0.heartbeatInterval = .milliseconds(300)
            }
            try await withServices([sys.dispatcher(), worker]) {
                try await APITests.withAPI(sys, broker: true) { api, _ in
                    // The workers page is the fleet's (docs/api.md, "Scope"): a key for every namespace.
                    let key = try await APITests.key(sys, role: .admin, namespace: "*")
                    for body in [
                        """
                        {\"name\": \"nightly-report\", \"executor\": \"echo\", \"queue\": \"\(sys.queue)\", \
                        \"parameters\": {\"customer\": \"acme\"}}
                        """,
                        """
                        {\"name\": \"flaky-import\", \"executor\": \"scripted\", \"queue\": \"\(sys.queue)\", \
                        \"parameters\": {\"fail\": true}, \"retry\": {\"max_attempts\": 2, \"base_seconds\": 0.1, \
                        \"jitter\": false}}
                        """,
                    ] {
                        #expect(try await api.call("POST", "/v1/tasks", key: key, body: body).status == 201)
                    }
                    _ = try await sys.eventually(timeout: .seconds(20), "one run succeeds and one is dead") {
                        try await sys.count("SELECT count(*) FROM runs WHERE state IN ('succeeded', 'dead')") == 2
                    }
                    let run = try #require(
                        try await sys.rows(
                            """
                            SELECT r.id::text, r.trace_id FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name =
                                'nightly-report'
                            """
                        ).first)
                    let runID = try #require(run[0])
                    let traceID = try #require(run[1])
                    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("dash-\(UUID())")
                    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
                    defer { try? FileManager.default.removeItem(at: dir) }
                    try key.write(to: dir.appendingPathComponent("key"), atomically: true, encoding: .utf8)

                    let p = try Process.required(
                        "python3",
                        [
                            FileManager.default.currentDirectoryPath + "/scripts/dashboard_check.py", "--url", api.base,
                            "--key-file", dir.appendingPathComponent("key").path, "--task", "nightly-report", "--run",
                            runID,
                            "--shots", dir.appendingPathComponent("shots").path,
                        ])
                    let r = try runCapturing(p)
                    try #require(r.status == 0, "dashboard_check.py failed: \(r.err)")
                    let seen = try JSONDecoder().decode(JSONValue.self, from: Data(r.out.utf8))
                    func page(_ name: String) -> String { seen[name]?.stringValue ?? "" }

                    #expect(page("signin").contains("API key or token"))
                    #expect(page("overview").contains("Runs by state"), "\(page("overview"))")
                    #expect(page("overview").contains("succeeded") && page("overview").contains("dead"))
                    #expect(
                        Int(seen["overview_chart_total"]?.stringValue ?? "") ?? 0 >= 2,
                        "the chart counts both finished runs")
                    #expect(seen["overview_live"] == true, "the overview redraws from the event stream")
                    #expect(page("overview").contains(sys.queue), "queues are listed")
                    #expect(page("tasks").contains("nightly-report") && page("tasks").contains("flaky-import"))
                    #expect(
                        page("task").contains("Run history") && page("task").contains(traceID),
                        "the task page shows its runs with trace ids")
                    #expect(page("run").contains(runID) && page("run").contains(traceID), "\(page("run"))")
                    #expect(page("run").contains("report for acme written"), "the run's output")
                    #expect(page("run").contains(#""rows": 12"#), "the run's result: \(page("run"))")
                    #expect(page("run").contains("Attempts of this occurrence") && page("run").contains("(this)"))
                    #expect(page("workers").contains("dash-worker"))
                    #expect(page("dead").contains("Re-drive"), "\(page("dead"))")
                    #expect(seen["redrive"]?.stringValue == "Re-driven as attempt 3", "\(seen["redrive"] ?? .null)")
                    #expect(
                        try await sys.count(
                            """
                            SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = \
                            'flaky-import' AND r.attempt = 3
                            """
                        ) == 1)
                    #expect(seen["signed_out_storage"] == .null, "signing out forgets the key")
                    for shot in ["signin", "overview", "tasks", "task", "run", "runs", "workers", "dead"] {
                        let size =
                            (try? FileManager.default.attributesOfItem(
                                atPath: dir.appendingPathComponent("shots/\(shot).png").path)[.size] as? Int) ?? 0
                        #expect(size > 5_000, "a screenshot of \(shot)")
                    }
                }
            }
        }
    }
}
