package import ConveyorCore
import ConveyorPostgres
package import Foundation

extension Store {
    // MARK: operations

    /// Cancels runs that have not ended; workers holding them are told (`cancel_pending`).
    /// Returns the runs cancelled.
    @discardableResult
    package func cancel(runs ids: [UUID], reason: String = "cancelled by an operator") async throws -> [UUID] {
        try await cancel(where: "id = ANY($1::uuid[])", [ids], reason: reason)
    }

    /// Cancels every open run of a task.
    @discardableResult
    package func cancel(task: UUID, reason: String = "task cancelled by an operator") async throws -> [UUID] {
        try await cancel(where: "task_id = $1", [task], reason: reason)
    }

    func cancel(where condition: String, _ params: [any PostgresEncodable], reason: String) async throws -> [UUID] {
        try await pool.withTransaction { c in
            let ended = try await c.query(
                """
                UPDATE runs SET state = 'cancelled', finished_at = now(), reason = $\(params.count + 1),
                                cancel_pending = state IN ('queued', 'dispatched', 'running')
                WHERE id IN (SELECT id FROM runs WHERE \(condition) AND state IN ('scheduled', 'queued', 'dispatched',
                    'running')
                             ORDER BY id FOR UPDATE)
                RETURNING \(Ended.columns)
                """, params + [reason]
            ).rows.map(Ended.init)
            _ = try await Self.settle(ended, c)
            return ended.map(\.id)
        }
    }

    /// Cancelled runs whose workers have not been told yet.
    package func pendingCancels(limit: Int = 500) async throws -> [UUID] {
        try await pool.withConnection { c in
            try await c.query("SELECT id FROM runs WHERE cancel_pending LIMIT $1", [limit]).rows.map { try $0.uuid(0) }
        }
    }

    package func markCancelsSent(_ ids: [UUID]) async throws {
        guard !ids.isEmpty else { return }
        _ = try await pool.withConnection { c in
            try await c.query("UPDATE runs SET cancel_pending = false WHERE id = ANY($1::uuid[])", [ids])
        }
    }

    /// Re-drives an ended run (dead, failed, timed out, lost or cancelled) as a new attempt of its
    /// occurrence, due now, in the same trace. Refused when a newer attempt exists.
    package func redrive(run id: UUID) async throws -> UUID {
        let newID = UUID()
        let done = try await pool.withTransaction { c in
            try await c.query(
                """
                INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at, priority,
                    concurrency_key,
                                  workflow_run_id, trace_id, traceparent, baggage)
                SELECT $2, r.task_id, r.occurrence, r.attempt + 1, 'scheduled', r.queue, r.shard, now(), r.priority,
                    r.concurrency_key,
                       r.workflow_run_id, r.trace_id, r.traceparent, r.baggage
                FROM runs r
                WHERE r.id = $1 AND r.state IN ('dead', 'failed', 'timed_out', 'lost', 'expired', 'cancelled')
                  AND NOT EXISTS (SELECT 1 FROM runs x WHERE x.task_id = r.task_id AND x.occurrence = r.occurrence AND
                      x.attempt > r.attempt)
                """, [id, newID]
            ).affectedRows
        }
        guard done == 1 else {
            throw ValidationError(
                field: "run", value: id.lowercasedString,
                hint:
                    """
                    only the latest attempt of an occurrence that ended dead, failed, timed_out, lost, expired or cancelled \
                    can be re-driven
                    """
            )
        }
        return newID
    }

    /// Pauses or resumes tasks by name, or every task of a group. Returns how many changed.
    @discardableResult
    package func setPaused(_ paused: Bool, names: [String] = [], group: String? = nil, namespace: String = "default")
        async throws -> Int
    {
        try await pool.withConnection { c in
            try await c.query(
                """
                UPDATE tasks SET paused = $1, updated_at = now()
                WHERE namespace = $2 AND deleted_at IS NULL AND paused <> $1 AND (name = ANY($3::text[]) OR group_name
                    = $4)
                """, [paused, namespace, names, group]
            ).affectedRows
        }
    }

    /// Soft-deletes a task: it stops being scheduled; it is purged after the retention period.
    @discardableResult
    package func deleteTask(named name: String, namespace: String = "default") async throws -> Bool {
        try await pool.withConnection { c in
            try await c.query(
                """
                UPDATE tasks SET deleted_at = now(), updated_at = now() WHERE namespace = $1 AND name = $2 AND \
                deleted_at IS NULL
                """,
                [namespace, name]
            ).affectedRows == 1
        }
    }

    /// Runs by state for one group's tasks (or every task).
    package func runCounts(group: String? = nil) async throws -> [RunState: Int] {
        try await pool.withConnection { c in
            var out: [RunState: Int] = [:]
            for r in try await c.query(
                """
                SELECT r.state, count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE $1::text IS NULL OR
                    t.group_name = $1 GROUP BY r.state
                """, [group]
            ).rows {
                if let s = RunState(rawValue: try r.string(0)) { out[s] = try r.int(1) }
            }
            return out
        }
    }

    /// Retries in all (attempts after the first, re-drives included), for one group's tasks or every task.
    package func retryCount(group: String? = nil) async throws -> Int {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE r.attempt > 1 AND ($1::text IS NULL
                    OR t.group_name = $1)
                """, [group]
            ).rows[0].int(0)
        }
    }

    /// Sets (or with `rate` nil removes) a queue's rate limit in runs per second.
    package func setRateLimit(queue: String, rate: Double?, burst: Double? = nil) async throws {
        _ = try await pool.withConnection { c in
            if let rate {
                let b = burst ?? max(1, rate)
                try await c.query(
                    """
                    INSERT INTO queue_limits (queue, rate_per_second, burst, tokens) VALUES ($1, $2, $3, $3)
                    ON CONFLICT (queue) DO UPDATE SET rate_per_second = $2, burst = $3, tokens =
                        least(queue_limits.tokens, $3)
                    """, [queue, rate, b])
            } else {
                try await c.query("DELETE FROM queue_limits WHERE queue = $1", [queue])
            }
        }
    }

    /// Pauses a work queue (no run is published to it until resumed); false if it already was.
    package func pauseQueue(_ queue: String, by actor: String) async throws -> Bool {
        try await pool.withConnection { c in
            try await c.query(
                "INSERT INTO queue_pauses (queue, paused_by) VALUES ($1, $2) ON CONFLICT (queue) DO NOTHING",
                [queue, actor]
            ).affectedRows == 1
        }
    }

    /// Resumes a paused work queue, and wakes the dispatchers; false if it was not paused.
    package func resumeQueue(_ queue: String) async throws -> Bool {
        try await pool.withTransaction { c in
            let resumed = try await c.query("DELETE FROM queue_pauses WHERE queue = $1", [queue]).affectedRows == 1
            if resumed { _ = try await c.query("SELECT pg_notify('conveyor_due', '')") }
            return resumed
        }
    }

    /// The paused work queues, with when and by whom.
    package func pausedQueues() async throws -> [String: (at: Date, by: String)] {
        try await pool.withConnection { c in
            var out: [String: (at: Date, by: String)] = [:]
            for r in try await c.query("SELECT queue, paused_at, paused_by FROM queue_pauses").rows {
                out[try r.string(0)] = (try r.date(1), try r.string(2))
            }
            return out
        }
    }
}
