package import ConveyorCore
import ConveyorPostgres
package import Foundation

extension Store {
    // MARK: queues and the overview

    package struct QueueFigures: Sendable {
        package var queue: String
        package var tasks: Int
        /// Runs queued or dispatched (waiting for a worker, as the database sees it).
        package var backlog: Int
        package var running: Int
        package var finishedLastMinute: Int
        /// Work due and waiting in PostgreSQL to be published (over the backlog bound, held by a
        /// concurrency key or rate limit, or its queue paused): runs, and due tasks that wait for
        /// room as tasks.
        package var waiting = 0
        /// Paused (`queue_pauses`): nothing new is published to it.
        package var paused = false
    }

    /// The queues a namespace's tasks use, with their open runs and last minute's completions.
    package func queueStats(namespace: String?) async throws -> [QueueFigures] {
        try await pool.withConnection { c in
            try await c.query(
                """
                WITH q AS (SELECT queue, count(*) AS n,
                                  count(*) FILTER (WHERE next_run_at <= now() AND NOT paused) AS due
                           FROM tasks WHERE deleted_at IS NULL AND ($1::text IS NULL OR namespace = $1) GROUP BY queue),
                     o AS (SELECT r.queue, count(*) FILTER (WHERE r.state IN ('queued', 'dispatched')) AS backlog,
                                  count(*) FILTER (WHERE r.state = 'running') AS running,
                                  count(*) FILTER (WHERE r.state = 'scheduled' AND r.available_at <= now()) AS waiting
                           FROM runs r WHERE r.state IN ('scheduled', 'queued', 'dispatched', 'running')
                             AND ($1::text IS NULL OR r.task_id IN (SELECT id FROM tasks WHERE namespace = $1)) GROUP
                                 BY r.queue),
                     f AS (SELECT r.queue, count(*) AS n FROM runs r WHERE r.finished_at > now() - interval '1 minute'
                             AND ($1::text IS NULL OR r.task_id IN (SELECT id FROM tasks WHERE namespace = $1)) GROUP
                                 BY r.queue)
                SELECT q.queue, q.n, coalesce(o.backlog, 0), coalesce(o.running, 0), coalesce(f.n, 0),
                       coalesce(o.waiting, 0) + q.due, EXISTS (SELECT 1 FROM queue_pauses p WHERE p.queue = q.queue)
                FROM q LEFT JOIN o USING (queue) LEFT JOIN f USING (queue) ORDER BY q.queue LIMIT 1000
                """, [namespace]
            ).rows.map { r in
                QueueFigures(
                    queue: try r.string(0), tasks: try r.int(1), backlog: try r.int(2), running: try r.int(3),
                    finishedLastMinute: try r.int(4), waiting: try r.int(5), paused: try r.bool(6))
            }
        }
    }

    package struct Overview: Sendable {
        package var at: Date
        /// Runs of occurrences in the last 24 hours, by state.
        package var runsByState: [RunState: Int]
        package var perMinute: [(minute: Date, succeeded: Int, failed: Int)]
        package var queues: [QueueFigures]
        package var activeWorkers: Int
    }

    /// What the dashboard's overview shows, read through indexes (last 24 h of runs, last 30 min of completions).
    package func overview(namespace: String?) async throws -> Overview {
        let queues = try await queueStats(namespace: namespace)
        return try await pool.withConnection { c in
            let at = try await c.query("SELECT now()").rows[0].date(0)
            var byState: [RunState: Int] = [:]
            for r in try await c.query(
                """
                SELECT state, count(*) FROM runs WHERE occurrence > now() - interval '24 hours'
                  AND ($1::text IS NULL OR task_id IN (SELECT id FROM tasks WHERE namespace = $1)) GROUP BY state
                """, [namespace]
            ).rows {
                if let s = RunState(rawValue: try r.string(0)) { byState[s] = try r.int(1) }
            }
            let minutes = try await c.query(
                """
                SELECT date_trunc('minute', finished_at), count(*) FILTER (WHERE state = 'succeeded'),
                       count(*) FILTER (WHERE state IN ('failed', 'timed_out', 'lost', 'expired', 'dead'))
                FROM runs WHERE finished_at > now() - interval '30 minutes'
                  AND ($1::text IS NULL OR task_id IN (SELECT id FROM tasks WHERE namespace = $1))
                GROUP BY 1 ORDER BY 1
                """, [namespace]
            ).rows.map { r in (minute: try r.date(0), succeeded: try r.int(1), failed: try r.int(2)) }
            let workers = try await c.query("SELECT count(*) FROM workers WHERE state = 'active'").rows[0].int(0)
            return Overview(at: at, runsByState: byState, perMinute: minutes, queues: queues, activeWorkers: workers)
        }
    }
}
