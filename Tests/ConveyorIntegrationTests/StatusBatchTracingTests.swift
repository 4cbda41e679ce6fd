import ConveyorCore
import ConveyorStore
import Foundation
import Testing

/// A batched status keeps its trace context (docs/tracing.md): with 300 runs at once the worker
/// process sends most statuses in `conveyor.status-batch.v1` messages, and still every run's
/// execute span, exported over OTLP, is linked from a dispatcher's record span, with the run's id
/// and outcome on the link.
@Suite(
    "Status batches carry trace context (real PostgreSQL, RabbitMQ and processes)",
    .enabled(if: Servers.available, Comment(rawValue: Servers.skipMessage)), .serialized)
struct StatusBatchTracingTests {
    @Test func everyBatchedStatusLinksItsExecuteSpan() async throws {
        try await System.with { sys in
            let collector = try await HTTPReceiver { _, _ in
                .init(status: 200, headers: [("content-type", "application/json")], body: "{}")
            }
            defer { Task { await collector.close() } }
            let fleet = try await TracedFleet.start(
                sys, collector: collector.url, protocol: "http/json", workerID: "batch-worker", executors: "noop",
                worker: ["CONVEYOR_WORKER_CONCURRENCY": "64"])
            defer { fleet.stop() }
            let n = 300
            try await sys.store.createTasks(sys.tasks(n, executor: "noop"))
            try await sys.eventually(timeout: .seconds(60), "\(n) runs succeeded") {
                try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == n
            }
            func spans() -> [ExportedSpan] {
                collector.received(path: "/v1/traces").flatMap { ExportedSpan.parse($0.body) }
            }
            func unlinked() -> [ExportedSpan] {
                let all = spans()
                return all.filter { $0.name == "execute noop" }.filter { e in
                    !ExportedSpan.records(linking: e, in: all).contains {
                        $0["conveyor.run.id"] == e.attributes["conveyor.run.id"]
                            && $0["conveyor.outcome"] == "succeeded"
                    }
                }
            }
            _ = try await sys.eventually(timeout: .seconds(30), "\(n) execute spans, each linked from a record span") {
                spans().filter { $0.name == "execute noop" }.count == n && unlinked().isEmpty
            }
            // The statuses did travel in batches: a record span with more statuses than the
            // deliveries its transaction took (a `conveyor.status.v1` delivery carries one).
            let records = spans().filter { $0.service == "conveyor-dispatcher" && $0.name.hasPrefix("record ") }
            #expect(
                records.contains {
                    (Int($0.attributes["conveyor.statuses"] ?? "") ?? 0)
                        > (Int($0.attributes["messaging.batch.message_count"] ?? "") ?? Int.max)
                }, "\(records.map(\.attributes))")
        }
    }
}
