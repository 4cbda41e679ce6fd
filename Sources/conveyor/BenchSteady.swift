import ArgumentParser
import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import Foundation

/// `conveyor bench --rate R --duration D`: load as schedules make it. R tasks run `every 1s`,
/// their first due times spread evenly over one second, so R runs fall due each second, one every
/// 1/R s. After a warm-up (a fifth of D, at most 5 s) the next D seconds are measured: fire
/// lateness (started − due) of the runs due in that window, throughput, and the CPU each process
/// (dispatcher, workers, RabbitMQ, PostgreSQL) spent per run in it.
extension Bench {
    func runSteady(
        pool: PostgresPool, store: Store, queue: String, children: [(role: String, process: Process)]
    ) async throws {
        let warmUp = min(5, max(1, duration / 5))
        try await createTasks(rate, schedule: .interval(seconds: 1), queue: queue, pool: pool, store: store)
        // Task i is first due at start + i/R s; every second after that again.
        let start = try await pool.withConnection { c in
            try await c.query(
                """
                WITH s AS (SELECT now() + interval '2 seconds' AS t)
                UPDATE tasks SET next_run_at = s.t + make_interval(secs => split_part(name, '-', 3)::int / $2::float8),
                       anchor_at = s.t + make_interval(secs => split_part(name, '-', 3)::int / $2::float8)
                FROM s WHERE queue = $1 AND split_part(name, '-', 3) ~ '^[0-9]+$' RETURNING s.t
                """, [queue, rate]
            ).first!.date(0)
        }
        let windowStart = start.addingTimeInterval(Double(warmUp))
        let windowEnd = windowStart.addingTimeInterval(Double(duration))
        func untilDatabaseTime(_ t: Date) async throws {
            let now = try await pool.withConnection { c in try await c.query("SELECT now()").first!.date(0) }
            let wait = t.timeIntervalSince(now)
            if wait > 0 { try await Task.sleep(for: .milliseconds(Int64(wait * 1000))) }
        }
        var peakRSS: [String: Double] = [:]
        func samplePeaks() {
            for (role, p) in children { peakRSS[role] = max(peakRSS[role] ?? 0, rssMB(p.processIdentifier)) }
        }
        // The broker's totals are read outside the timed window (a read costs about 2 s of an
        // Erlang VM) and counted by the broker's own clock.
        try await untilDatabaseTime(start.addingTimeInterval(0.5))
        let brokerBefore = await BrokerTotals.read()
        try await untilDatabaseTime(windowStart)
        let cpuBefore = processCPU(children)
        while Date() < windowEnd {
            samplePeaks()
            try await Task.sleep(for: .milliseconds(500))
        }
        try await untilDatabaseTime(windowEnd)
        let cpuAfter = processCPU(children)
        let brokerAfter = await BrokerTotals.read()
        let brokerSeconds = Double((brokerAfter?.atMilliseconds ?? 0) - (brokerBefore?.atMilliseconds ?? 0)) / 1000
        // Stop the schedules once every occurrence due in the window has its run, then let what is
        // due or running end. (Only the steady tasks: `--idle-tasks` share the queue.)
        while try await pool.withConnection({ c in
            try await c.query(
                "SELECT EXISTS (SELECT 1 FROM tasks WHERE queue = $1 AND next_run_at < $2)", [queue, windowEnd]
            ).first!.bool(0)
        }) {
            try await Task.sleep(for: .milliseconds(50))
        }
        _ = try await pool.withConnection { c in
            try await c.query(
                "UPDATE tasks SET next_run_at = NULL WHERE queue = $1 AND split_part(name, '-', 3) ~ '^[0-9]+$'",
                [queue])
        }
        let deadline = ContinuousClock.now + .seconds(timeout)
        var completed = false
        while ContinuousClock.now < deadline {
            let open = try await pool.withConnection { c in
                try await c.query(
                    """
                    SELECT EXISTS (SELECT 1 FROM runs WHERE state IN ('scheduled', 'queued', 'dispatched', 'running')
                                   AND queue = $1)
                    """, [queue]
                ).first!.bool(0)
            }
            if !open {
                completed = true
                break
            }
            try await Task.sleep(for: .milliseconds(200))
        }
        let stats = try await pool.withConnection { c in
            try await c.query(
                """
                SELECT count(*), count(started_at), count(*) FILTER (WHERE state = 'succeeded'),
                       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY
                           extract(epoch FROM started_at - occurrence)),
                       max(extract(epoch FROM started_at - occurrence)),
                       count(*) - count(DISTINCT (task_id, occurrence))
                FROM runs WHERE queue = $1 AND occurrence >= $2 AND occurrence < $3
                """, [queue, windowStart, windowEnd]
            ).first!
        }
        for (_, p) in children where p.isRunning { p.terminate() }
        try await removeRows(pool, queue: queue)
        let runs = try stats.int(0)
        let lateness = float8Array(stats[3])
        var cpuMS: [String: Double] = [:]
        for (k, after) in cpuAfter {
            cpuMS[k] = ((after - (cpuBefore[k] ?? 0)) * 1000 / Double(max(runs, 1)) * 100).rounded() / 100
        }
        let result = SteadyResult(
            rate: rate, seconds: duration, warmUpSeconds: warmUp, workers: workers, dispatchers: dispatchers,
            completed: completed, expectedRuns: rate * duration, runs: runs, started: try stats.int(1),
            succeeded: try stats.int(2), duplicateRuns: try stats.int(5),
            throughputPerSecond: Double(try stats.int(1)) / Double(duration),
            latenessP50ms: (lateness.first ?? 0) * 1000, latenessP95ms: (lateness.dropFirst().first ?? 0) * 1000,
            latenessP99ms: (lateness.last ?? 0) * 1000, latenessMaxms: (Double(stats[4] ?? "") ?? 0) * 1000,
            cpuMillisecondsPerRun: cpuMS, peakRSSMB: peakRSS,
            broker: BrokerPerRun(from: brokerBefore, to: brokerAfter, runs: Double(rate) * brokerSeconds))
        try emit(result, text: result.text)
        if !completed || result.started < result.expectedRuns { throw ExitCode(2) }
    }
}

struct SteadyResult: Encodable {
    var rate, seconds, warmUpSeconds, workers, dispatchers: Int
    var completed: Bool
    /// Runs the window should hold (rate × seconds), those it holds, those that started and succeeded.
    var expectedRuns, runs, started, succeeded, duplicateRuns: Int
    /// Runs of the window that started, per second of it.
    var throughputPerSecond: Double
    var latenessP50ms, latenessP95ms, latenessP99ms, latenessMaxms: Double
    /// CPU milliseconds per run in the window, per process (and for RabbitMQ and PostgreSQL).
    var cpuMillisecondsPerRun: [String: Double]
    var peakRSSMB: [String: Double]
    /// What the broker carried per run (at `rate` runs/s between two readings of its totals).
    var broker: BrokerPerRun?

    var text: String {
        func f(_ d: Double, _ p: Int = 1) -> String { String(format: "%.\(p)f", d) }
        return """
            conveyor bench --rate \(rate) --duration \(seconds): \(rate) tasks every 1 s, \
            \(dispatchers) dispatcher(s), \(workers) worker(s); measured after a \(warmUpSeconds) s warm-up
              completed        \(completed ? "yes" : "NO (timed out)")  runs due \(runs) of \(expectedRuns), \
            started \(started), succeeded \(succeeded), duplicate runs \(duplicateRuns)
              throughput       \(f(throughputPerSecond, 0)) runs started/s
              fire lateness    p50 \(f(latenessP50ms)) ms   p95 \(f(latenessP95ms)) ms   p99 \(f(latenessP99ms)) ms   \
            max \(f(latenessMaxms)) ms
              CPU ms per run   \(cpuMillisecondsPerRun.keys.sorted().map { "\($0) \(cpuMillisecondsPerRun[$0]!)" }
                .joined(separator: "; "))
              peak RSS (MB)    \(peakRSSMB.keys.sorted().map { "\($0) \(peakRSSMB[$0]!)" }.joined(separator: "; "))
            """ + (broker.map { "\n  broker per run   " + $0.text } ?? "")
    }
}
