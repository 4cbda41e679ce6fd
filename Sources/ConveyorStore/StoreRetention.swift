import ConveyorCore
import ConveyorPostgres
import Foundation

extension Store {
    /// Refreshes the planner's statistics of the tables a burst changes (see the dispatcher's
    /// `refreshStatisticsAfterBursts`).
    package func analyze() async throws {
        try await pool.withConnection { c in _ = try await c.query("ANALYZE runs, tasks") }
    }

    /// Deletes, in one batch, ended runs older than `runsAge`, then soft-deleted tasks older
    /// than `tasksAge` (their runs first), and workers `stopped` or `lost` and silent for
    /// `workersAge`. Returns rows deleted; call until 0.
    package func purgeBatch(
        runsAge: Duration, tasksAge: Duration, workersAge: Duration = .seconds(86_400), batch: Int = 1000
    ) async throws -> Int {
        try await pool.withConnection { c in
            var n = try await c.query(
                """
                DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE finished_at < now() - make_interval(secs => $1)
                    LIMIT $2)
                """, [runsAge.inSeconds, batch]
            ).affectedRows
            n += try await c.query(
                """
                DELETE FROM runs WHERE id IN (SELECT r.id FROM runs r JOIN tasks t ON t.id = r.task_id
                                              WHERE t.deleted_at < now() - make_interval(secs => $1) LIMIT $2)
                """, [tasksAge.inSeconds, batch]
            ).affectedRows
            if n == 0 {
                n += try await c.query(
                    """
                    DELETE FROM tasks WHERE id IN (SELECT id FROM tasks t WHERE deleted_at < now() - make_interval(secs
                        => $1)
                                                   AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.task_id = t.id) LIMIT
                                                       $2)
                    """, [tasksAge.inSeconds, batch]
                ).affectedRows
            }
            n += try await c.query(
                """
                DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE received_at < now() -
                    make_interval(secs => $1) LIMIT $2)
                """, [runsAge.inSeconds, batch]
            ).affectedRows
            n += try await c.query(
                """
                DELETE FROM callbacks WHERE id IN (SELECT id FROM callbacks WHERE created_at < now() -
                    make_interval(secs => $1) LIMIT $2)
                """, [runsAge.inSeconds, batch]
            ).affectedRows
            n += try await c.query(
                """
                DELETE FROM idempotency_keys WHERE (namespace, key) IN (SELECT namespace, key FROM idempotency_keys
                    WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)
                """, [Self.idempotencyWindow.inSeconds, batch]
            ).affectedRows
            n += try await c.query(
                """
                DELETE FROM workers WHERE id IN (SELECT id FROM workers WHERE state IN ('stopped', 'lost')
                    AND last_heartbeat < now() - make_interval(secs => $1) LIMIT $2)
                """, [workersAge.inSeconds, batch]
            ).affectedRows
            return n
        }
    }
}
