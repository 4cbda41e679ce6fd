package import ConveyorCore
import ConveyorPostgres
package import Foundation

extension Store {
    // MARK: lost runs and dead letters

    /// Declares `lost` the running runs whose deadline (timeout + grace from their start) passed
    /// with no outcome, and settles them (retry by policy). Returns how many.
    package func declareLost(limit: Int = 500) async throws -> (lost: Int, settled: SettleResult) {
        try await pool.withTransaction { c in
            let ended = try await c.query(
                """
                UPDATE runs SET state = 'lost', finished_at = now(),
                                reason = 'no outcome from worker ' || coalesce(worker_id, '?') ||
                                    ' within the timeout plus grace'
                WHERE id IN (SELECT id FROM runs WHERE state = 'running' AND deadline_at < now() ORDER BY id LIMIT $1
                    FOR UPDATE SKIP LOCKED)
                RETURNING \(Ended.columns)
                """, [limit]
            ).rows.map(Ended.init)
            return (ended.count, try await Self.settle(ended, c))
        }
    }

    /// Ends `expired` the dispatched runs past their start deadline (published more than their
    /// task's schedule-to-start timeout plus the lost grace ago, and never reported started), and
    /// settles them (retry by policy). Workers refuse a task message past its `start_by`, which
    /// is earlier than this deadline by the grace, so an expired attempt does not start.
    /// Returns how many, by queue.
    package func expireUnstarted(limit: Int = 500) async throws -> (byQueue: [String: Int], settled: SettleResult) {
        try await pool.withTransaction { c in
            let ended = try await c.query(
                """
                UPDATE runs SET state = 'expired', finished_at = now(),
                                reason = 'not started within the schedule-to-start timeout (published ' ||
                                    to_char(dispatched_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') ||
                                    '): the broker no longer holds its message, or no worker took it'
                WHERE id IN (SELECT id FROM runs WHERE state = 'dispatched' AND deadline_at < now() ORDER BY id
                    LIMIT $1 FOR UPDATE SKIP LOCKED)
                RETURNING \(Ended.columns)
                """, [limit]
            ).rows.map(Ended.init)
            return (Dictionary(grouping: ended, by: \.queue).mapValues(\.count), try await Self.settle(ended, c))
        }
    }

    /// Records heartbeats: one row per worker, back to `active` if it had been declared lost.
    /// The database clock stamps them, so a worker's clock cannot make it look alive or lost.
    /// While a worker is active its interval only grows, at most doubling per heartbeat: anyone on
    /// the status exchange can send a heartbeat under a worker's id (heartbeats carry no proof),
    /// and a short interval there would get the worker declared lost, and its detached runs
    /// retried while they still run; one forged long interval moves the bound by a factor of two,
    /// not to an hour. A worker restarted with a shorter interval is judged by the longer one
    /// until it is lost.
    ///
    /// A goodbye (`leaving`, a drained worker's last heartbeat) makes the worker `stopped`, which
    /// is never declared lost. A heartbeat the worker sent before its goodbye but recorded after
    /// it (two dispatchers share the status queue) changes nothing: `beat_at`, the worker's own
    /// time of its latest heartbeat, orders them. Returns the ids of the workers that said goodbye.
    @discardableResult
    package func recordHeartbeats(_ beats: [HeartbeatMessage]) async throws -> [String] {
        guard !beats.isEmpty else { return [] }
        var latest: [String: HeartbeatMessage] = [:]
        for b in beats where latest[b.workerID].map({ $0.at <= b.at }) ?? true { latest[b.workerID] = b }
        let l = latest.values.sorted { $0.workerID < $1.workerID }
        return try await pool.withConnection { c in
            try await c.query(
                """
                INSERT INTO workers (id, host, queues, executors, concurrency, in_flight, heartbeat_interval_ms,
                    last_heartbeat, state, beat_at, stopped_at)
                SELECT u.id, u.host, string_to_array(u.queues, ','), string_to_array(u.executors, ','), u.concurrency,
                       coalesce(string_to_array(u.in_flight, ',')::uuid[], '{}'), u.interval_ms, now(),
                       CASE WHEN u.leaving THEN 'stopped' ELSE 'active' END, u.at,
                       CASE WHEN u.leaving THEN now() END
                FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::int[],
                            $8::timestamptz[], $9::bool[])
                     AS u(id, host, queues, executors, concurrency, in_flight, interval_ms, at, leaving)
                ON CONFLICT (id) DO UPDATE SET host = EXCLUDED.host, queues = EXCLUDED.queues, executors =
                    EXCLUDED.executors,
                    concurrency = EXCLUDED.concurrency, in_flight = EXCLUDED.in_flight,
                    heartbeat_interval_ms = CASE WHEN workers.state = 'active'
                        THEN least(greatest(workers.heartbeat_interval_ms, EXCLUDED.heartbeat_interval_ms), 2 *
                            workers.heartbeat_interval_ms)
                        ELSE EXCLUDED.heartbeat_interval_ms END,
                    last_heartbeat = now(), state = EXCLUDED.state, lost_at = NULL, beat_at = EXCLUDED.beat_at,
                    stopped_at = EXCLUDED.stopped_at
                WHERE workers.state <> 'stopped' OR EXCLUDED.state = 'stopped' OR workers.beat_at IS NULL
                   OR EXCLUDED.beat_at > workers.beat_at
                RETURNING id, state
                """,
                [
                    l.map(\.workerID), l.map(\.host), l.map { $0.queues.joined(separator: ",") },
                    l.map { $0.executors.joined(separator: ",") },
                    l.map(\.concurrency),
                    l.map {
                        $0.inFlight.isEmpty ? nil : $0.inFlight.map { $0.lowercasedString }.joined(separator: ",")
                    },
                    l.map { Int(($0.intervalSeconds * 1000).rounded()) }, l.map(\.at), l.map { $0.leaving == true },
                ]
            ).rows.filter { $0[1] == "stopped" }.compactMap { $0[0] }
        }
    }

    /// Declares `lost` the workers silent for `missed` of their heartbeat intervals, and with
    /// them the runs they had detached from the broker. A `stopped` worker (it said goodbye) is
    /// judged too while it still holds a detached running run: heartbeats carry no proof, so a
    /// goodbye forged under a live worker's id must not hide its death. A real goodbye comes after
    /// the drain, when the worker holds none. (acknowledged early because they ran
    /// long): nobody else will redeliver those, so they are ended `lost` and retried by policy.
    /// A lost worker's other runs are still unacknowledged: the broker redelivers them when it
    /// drops the worker's connection, and retrying them here as well would run them twice.
    ///
    /// `heardFor` is how long, in seconds, the caller has been able to hear heartbeats (its
    /// broker link up and not blocked). A worker is judged only when that covers its `missed`
    /// intervals: silence while the caller could not listen, or while a broker alarm blocked every
    /// publisher, says nothing about the worker.
    package func declareLostWorkers(missed: Int, heardFor: Double, limit: Int = 500) async throws -> (
        workers: [String], runs: Int, settled: SettleResult
    ) {
        try await pool.withTransaction { c in
            let workers = try await c.query(
                """
                UPDATE workers SET state = 'lost', lost_at = now()
                WHERE id IN (SELECT id FROM workers w
                             WHERE (state = 'active' OR (state = 'stopped' AND EXISTS (SELECT 1 FROM runs r WHERE
                                 r.state = 'running' AND r.detached AND r.worker_id = w.id)))
                             AND last_heartbeat < now() - make_interval(secs => heartbeat_interval_ms * $1 / 1000.0)
                             AND heartbeat_interval_ms * $1 / 1000.0 < $2::float8
                             FOR UPDATE SKIP LOCKED)
                RETURNING id
                """, [missed, heardFor]
            ).rows.compactMap { $0[0] }
            // Also the detached runs of workers declared lost earlier (a dispatcher that died
            // between the two statements, or more runs than `limit`).
            let ended = try await c.query(
                """
                UPDATE runs SET state = 'lost', finished_at = now(),
                                reason = 'worker ' || worker_id || ' stopped sending heartbeats while running it'
                WHERE id IN (SELECT r.id FROM runs r JOIN workers w ON w.id = r.worker_id
                             WHERE r.state = 'running' AND r.detached AND w.state = 'lost'
                             ORDER BY r.id LIMIT $1 FOR UPDATE OF r SKIP LOCKED)
                RETURNING \(Ended.columns)
                """, [limit]
            ).rows.map(Ended.init)
            return (workers, ended.count, try await Self.settle(ended, c))
        }
    }

    /// The workers known from heartbeats, by id (or the one with `id`): those in `state` when
    /// given, after the id `after` (a page's cursor), at most `limit`.
    package func workers(id: String? = nil, state: String? = nil, after: String? = nil, limit: Int = 10_000)
        async throws -> [WorkerRecord]
    {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT id, host, array_to_string(queues, ','), array_to_string(executors, ','), concurrency,
                       cardinality(in_flight), state, extract(epoch FROM now() - last_heartbeat)::float8
                FROM workers WHERE ($1::text IS NULL OR id = $1) AND ($2::text IS NULL OR state = $2)
                    AND ($3::text IS NULL OR id > $3)
                ORDER BY id LIMIT $4
                """, [id, state, after, limit]
            ).rows.map { r in
                WorkerRecord(
                    id: r[0] ?? "", host: r[1] ?? "", queues: (r[2] ?? "").split(separator: ",").map(String.init),
                    executors: (r[3] ?? "").split(separator: ",").map(String.init), concurrency: Int(r[4] ?? "") ?? 0,
                    inFlight: Int(r[5] ?? "") ?? 0, state: r[6] ?? "", secondsSinceHeartbeat: Double(r[7] ?? "") ?? 0)
            }
        }
    }

    /// Keeps dead-lettered messages and ends their runs (when identifiable and not yet final) `dead`.
    package func recordDeadLetters(_ letters: [DeadLetter]) async throws -> Int {
        guard !letters.isEmpty else { return 0 }
        return try await pool.withTransaction { c in
            try await c.query(
                """
                INSERT INTO dead_letters (run_id, reason, source, type, body) SELECT * FROM unnest($1::uuid[],
                    $2::text[], $3::text[], $4::text[], $5::text[])
                """,
                [
                    letters.map(\.runID), letters.map(\.reason), letters.map(\.source), letters.map(\.type),
                    letters.map(\.body),
                ])
            let withRun = letters.filter { $0.runID != nil }
            guard !withRun.isEmpty else { return 0 }
            let open = RunState.predecessors(of: .dead).map(\.rawValue)
            let ended = try await c.query(
                """
                UPDATE runs SET state = 'dead', finished_at = now(), reason = 'dead-lettered: ' || u.reason
                FROM unnest($1::uuid[], $2::text[]) AS u(id, reason)
                WHERE runs.id = u.id AND runs.id IN (SELECT id FROM runs WHERE id = ANY($1::uuid[]) AND state =
                    ANY($3::text[]) ORDER BY id FOR UPDATE)
                RETURNING \(Ended.columns)
                """, [withRun.map(\.runID), withRun.map(\.reason), open]
            ).rows.map(Ended.init)
            // Dead is final: no retry, but dependents, callbacks and waiting runs still follow.
            _ = try await Self.settle(ended, c)
            return ended.count
        }
    }
}

/// A message the broker dead-lettered.
package struct DeadLetter: Sendable {
    package var runID: UUID?
    package var reason: String
    package var source: String
    package var type: String?
    package var body: String

    /// Every text is kept `storable`: a dead letter is whatever reached the broker.
    package init(runID: UUID?, reason: String, source: String, type: String?, body: String) {
        self.runID = runID
        self.reason = reason.storable
        self.source = source.storable
        self.type = type?.storable
        self.body = body.storable
    }
}
/// A worker as its heartbeats describe it.
package struct WorkerRecord: Sendable {
    package var id: String
    package var host: String
    package var queues: [String]
    package var executors: [String]
    package var concurrency: Int
    package var inFlight: Int
    package var state: String
    package var secondsSinceHeartbeat: Double
}
