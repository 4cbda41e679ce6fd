import ArgumentParser
import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import Foundation

/// `conveyor bench --trigger-latency N`: how soon a triggered task starts on an idle system. One
/// no-op task is triggered N times (the UPDATE that makes it due now, whose NOTIFY wakes the
/// dispatchers), each time once its previous run has ended and a random 50–150 ms later, so the
/// triggers do not fall in step with the dispatcher's scan interval. Trigger → start is the run's
/// `started_at − occurrence`: the occurrence is the database time of the trigger.
extension Bench {
    func runTriggers(pool: PostgresPool, store: Store, queue: String) async throws {
        try await createTasks(1, schedule: .once, queue: queue, pool: pool, store: store)
        let taskID = try await pool.withConnection { c in
            try await c.query("SELECT id FROM tasks WHERE name = $1", ["\(queue)-0"]).first!.uuid(0)
        }
        func removeRows() async throws {
            try await pool.withConnection { c in
                _ = try await c.query("DELETE FROM runs WHERE task_id = $1", [taskID])
                _ = try await c.query("DELETE FROM tasks WHERE id = $1", [taskID])
            }
        }
        do { try await trigger(taskID, pool: pool, store: store, queue: queue) } catch {
            try? await removeRows()
            throw error
        }
        let stats = try await pool.withConnection { c in
            try await c.query(
                """
                SELECT count(*), percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY
                           extract(epoch FROM started_at - occurrence)),
                       max(extract(epoch FROM started_at - occurrence))
                FROM runs WHERE task_id = $1 AND started_at IS NOT NULL
                """, [taskID]
            ).first!
        }
        try await removeRows()
        let p = float8Array(stats[1])
        let max = Double(stats[2] ?? "") ?? 0
        func ms(_ s: Double?) -> String { String(format: "%.1f", (s ?? 0) * 1000) }
        let result = TriggerResult(
            triggers: triggerLatency, started: try stats.int(0), p50ms: (p.first ?? 0) * 1000,
            p95ms: (p.dropFirst().first ?? 0) * 1000, p99ms: (p.last ?? 0) * 1000, maxms: max * 1000)
        try emit(
            result,
            text: """
                conveyor bench --trigger-latency \(triggerLatency): one task triggered on an idle system, \
                \(dispatchers) dispatcher(s), \(workers) worker(s)
                  started          \(result.started) of \(triggerLatency)
                  trigger → start  p50 \(ms(p.first)) ms   p95 \(ms(p.dropFirst().first)) ms   \
                p99 \(ms(p.last)) ms   max \(ms(max)) ms
                """)
        if result.started < triggerLatency { throw ExitCode(2) }
    }

    /// Triggers the task `triggerLatency` times, each once the run before it has ended.
    func trigger(_ taskID: UUID, pool: PostgresPool, store: Store, queue: String) async throws {
        let deadline = ContinuousClock.now + .seconds(timeout)
        var ended = 0
        for i in 1...triggerLatency {
            try await Task.sleep(for: .milliseconds(Int64.random(in: 50...150)))
            guard try await store.trigger(taskID: taskID) != nil else {
                throw ValidationError(field: "task", value: "\(queue)-0", hint: "it disappeared during the bench")
            }
            // Polled only to know when to trigger again: the figure comes from the run's own times.
            while ended < i {
                guard ContinuousClock.now < deadline else {
                    throw ValidationError(
                        field: "--trigger-latency", value: String(triggerLatency),
                        hint: "\(ended) of \(triggerLatency) runs ended within \(timeout) s; is a dispatcher running?")
                }
                try await Task.sleep(for: .milliseconds(10))
                ended = try await pool.withConnection { c in
                    try await c.query(
                        "SELECT count(*) FROM runs WHERE task_id = $1 AND finished_at IS NOT NULL", [taskID]
                    ).first!.int(0)
                }
            }
        }
    }
}

struct TriggerResult: Encodable {
    var triggers, started: Int
    var p50ms, p95ms, p99ms, maxms: Double
}
