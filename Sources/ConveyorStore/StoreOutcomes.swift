package import ConveyorCore
import ConveyorPostgres
import Foundation

/// What one status batch did.
package struct RecordResult: Sendable, Equatable {
    /// Events that moved a run forward.
    package var applied: Int
    /// Duplicates, late events, unknown runs: recorded as no-ops.
    package var ignored: Int
    /// Outcomes recorded (final states set): at most one per run, ever.
    package var outcomes: Int
    /// What followed from the outcomes (retries, dead runs, dependents).
    package var settled = SettleResult()

    /// Nothing recorded.
    package static let none = RecordResult(applied: 0, ignored: 0, outcomes: 0)

    /// The two results together (a batch recorded in parts).
    package func adding(_ o: RecordResult) -> RecordResult {
        var r = self
        r.applied += o.applied
        r.ignored += o.ignored
        r.outcomes += o.outcomes
        r.settled.retried += o.settled.retried
        r.settled.dead += o.settled.dead
        r.settled.dependentsScheduled += o.settled.dependentsScheduled
        r.settled.dependentsSkipped += o.settled.dependentsSkipped
        r.settled.released += o.settled.released
        r.settled.callbacks += o.settled.callbacks
        return r
    }
}

/// What followed from runs ending.
package struct SettleResult: Sendable, Equatable {
    /// New attempts scheduled by retry policy.
    package var retried = 0
    /// Runs ended `dead` (retries exhausted, or a poison message).
    package var dead = 0
    /// Dependent runs created (`scheduled`) or ended `skipped`.
    package var dependentsScheduled = 0
    package var dependentsSkipped = 0
    /// Waiting runs released (overlap `queue`).
    package var released = 0
    /// Callbacks queued.
    package var callbacks = 0
}

/// A run that just reached a final state, with what deciding its follow-up needs.
struct Ended {
    var id: UUID, task: UUID, occurrence: Date, attempt: Int, state: RunState, exitCode: Int?, errorClass: String?
    var workflow: UUID?, queue: String, shard: Int, priority: Int, key: String?, traceparent: String?, baggage: String?
    var backfill: UUID?

    /// The columns read, in select-list order (of `runs`, in a RETURNING or a SELECT).
    enum Column: Int, RowColumn {
        case id, task, occurrence, attempt, state, exitCode, errorClass, workflow, queue, shard, priority, key
        case traceparent, baggage, backfill

        func sql(alias _: String) -> String {
            switch self {
            case .id: "runs.id"
            case .task: "runs.task_id"
            case .occurrence: "runs.occurrence"
            case .attempt: "runs.attempt"
            case .state: "runs.state"
            case .exitCode: "runs.exit_code"
            case .errorClass: "runs.error_class"
            case .workflow: "runs.workflow_run_id"
            case .queue: "runs.queue"
            case .shard: "runs.shard"
            case .priority: "runs.priority"
            case .key: "runs.concurrency_key"
            case .traceparent: "runs.traceparent"
            case .baggage: "runs.baggage"
            case .backfill: "runs.backfill_id"
            }
        }
    }

    static let columns = Column.selectList()

    init(_ r: PostgresRow) throws {
        typealias C = Column
        id = try r.uuid(C.id)
        task = try r.uuid(C.task)
        occurrence = try r.date(C.occurrence)
        attempt = try r.int(C.attempt)
        state = RunState(rawValue: try r.string(C.state)) ?? .failed
        exitCode = try r.optionalInt(C.exitCode)
        errorClass = r[C.errorClass]
        workflow = r[C.workflow].flatMap(UUID.init(uuidString:))
        queue = try r.string(C.queue)
        shard = try r.int(C.shard)
        priority = try r.int(C.priority)
        key = r[C.key]
        traceparent = r[C.traceparent]
        baggage = r[C.baggage]
        backfill = r[C.backfill].flatMap(UUID.init(uuidString:))
    }
}

extension Store {
    // MARK: status

    /// Applies status events in one transaction: `started` moves a run to `running` (with a
    /// deadline of timeout + `lostGrace`), `finished` to its outcome. Guards in SQL make every
    /// transition forward-only, so a duplicate or late event changes nothing and each attempt's
    /// outcome is recorded exactly once. Outcomes are settled in the same transaction.
    package func record(_ events: [StatusMessage], lostGrace: Duration) async throws -> RecordResult {
        var started: [UUID: StatusMessage] = [:]
        var finished: [UUID: StatusMessage] = [:]
        for e in events {
            switch e.event {
            case .started:
                // Keep the first start; a later one may add that the run was detached.
                if var first = started[e.runID] {
                    if e.detached == true {
                        first.detached = true
                        started[e.runID] = first
                    }
                } else {
                    started[e.runID] = e
                }
            case .finished: if finished[e.runID] == nil { finished[e.runID] = e }
            case .heartbeat: break
            }
        }
        let startable = RunState.predecessors(of: .running).map(\.rawValue)
        let finishable = RunState.predecessors(of: .succeeded).map(\.rawValue)
        let s = Array(started.values)
        let f = Array(finished.values)
        let allIDs = Array(Set(s.map(\.runID) + f.map(\.runID))).sorted { $0.precedes($1) }
        return try await pool.withTransaction { c in
            var n = 0
            // Lock the rows in one order (by id) first: dispatchers recording overlapping
            // batches then wait for each other instead of deadlocking.
            try await c.query("SELECT 1 FROM runs WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE", [allIDs])
            // A status is usually recorded before the dispatcher marks its run dispatched (the mark
            // waits a moment after the confirm, and then finds the run past `queued`): a delivered
            // run was dispatched by the time it started, so `dispatched_at` is never left empty,
            // and never later than the start its worker reports (nor than now).
            if !s.isEmpty {
                n += try await c.query(
                    """
                    UPDATE runs r SET state = 'running', started_at = coalesce(r.started_at, u.at), worker_id =
                        u.worker, dispatched_at = coalesce(r.dispatched_at, least(u.at, now())),
                                      deadline_at = now() + make_interval(secs => t.timeout_seconds + $5),
                                      detached = r.detached OR u.detached
                    FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $6::bool[]) AS u(id, at, worker, detached),
                        tasks t
                    WHERE r.id = u.id AND t.id = r.task_id AND r.state = ANY($4::text[])
                    """,
                    [
                        s.map(\.runID), s.map(\.at), s.map(\.workerID), startable, lostGrace.inSeconds,
                        s.map { $0.detached ?? false },
                    ]
                ).affectedRows
                // A run already running that its worker has now detached (acknowledged to the broker).
                let detaching = s.filter { $0.detached == true }
                if !detaching.isEmpty {
                    try await c.query(
                        """
                        UPDATE runs SET detached = true
                        FROM unnest($1::uuid[], $2::text[]) AS u(id, worker)
                        WHERE runs.id = u.id AND runs.state = 'running' AND runs.worker_id = u.worker AND NOT
                            runs.detached
                        """, [detaching.map(\.runID), detaching.map(\.workerID)])
                }
            }
            var ended: [Ended] = []
            if !f.isEmpty {
                ended = try await c.query(
                    """
                    UPDATE runs SET state = u.state, finished_at = u.at, started_at = coalesce(runs.started_at,
                        u.started, u.at), dispatched_at = coalesce(runs.dispatched_at,
                        least(runs.started_at, u.started, u.at, now())),
                                    worker_id = u.worker, exit_code = u.exit_code, output = u.output,
                                    error_class = u.error_class, error_message = u.error_message,
                                    result = u.result::jsonb
                    FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::int[], $6::text[],
                        $7::text[], $8::text[], $10::timestamptz[], $11::text[])
                         AS u(id, state, at, worker, exit_code, output, error_class, error_message, started, result)
                    WHERE runs.id = u.id AND runs.state = ANY($9::text[])
                    RETURNING \(Ended.columns)
                    """,
                    [
                        f.map(\.runID), f.map { ($0.outcome ?? .failed).runState.rawValue }, f.map(\.at),
                        f.map(\.workerID),
                        f.map { $0.exitCode }, f.map(\.output), f.map(\.errorClass), f.map(\.errorMessage), finishable,
                        f.map(\.startedAt), f.map { $0.result.map { String(decoding: $0.jsonBytes, as: UTF8.self) } },
                    ]
                ).rows.map(Ended.init)
                n += ended.count
                // A worker that refuses a message reports why, then rejects it; the dead letter can
                // be recorded first. The run stays dead, and gets the worker's error when it has none.
                let endedIDs = Set(ended.map(\.id))
                let late = f.filter {
                    !endedIDs.contains($0.runID) && $0.errorClass.map(RetryPolicy.poisonClasses.contains) == true
                }
                if !late.isEmpty {
                    try await c.query(
                        """
                        UPDATE runs SET error_class = u.error_class, error_message = u.error_message, worker_id =
                            coalesce(runs.worker_id, u.worker)
                        FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS u(id, error_class,
                            error_message, worker)
                        WHERE runs.id = u.id AND runs.state = 'dead' AND runs.error_class IS NULL
                        """,
                        [late.map(\.runID), late.map(\.errorClass), late.map(\.errorMessage), late.map(\.workerID)])
                }
            }
            let settled = try await Self.settle(ended, c)
            return RecordResult(applied: n, ignored: events.count - n, outcomes: ended.count, settled: settled)
        }
    }
}
