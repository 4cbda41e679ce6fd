public import ConveyorCore
public import ConveyorPostgres
public import Foundation

/// A task to create.
public struct NewTask: Sendable {
    public var id = UUID()
    public var namespace = "default"
    public var name: String
    public var executor: String
    public var parameters: JSONValue = .object([:])
    public var schedule: Schedule
    public var queue = "default"
    public var timeoutSeconds: Double = 300
    /// First due time; `nil` means now (the database clock).
    public var startAt: Date?
    public var traceParent: String?

    public init(name: String, executor: String, schedule: Schedule) {
        self.name = name
        self.executor = executor
        self.schedule = schedule
    }

    /// Checks the fields a database constraint would otherwise reject with a less helpful message.
    public func validate() throws(ValidationError) {
        guard !name.isEmpty, name.count <= 200, name.allSatisfy({ !$0.isWhitespace && !$0.isNewline }) else {
            throw ValidationError(field: "name", value: name, hint: "1 to 200 characters, no spaces")
        }
        guard !executor.isEmpty else { throw ValidationError(field: "executor", value: executor, hint: "name an executor that your workers offer, e.g. 'noop'") }
        guard !queue.isEmpty, queue.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." }) else {
            throw ValidationError(field: "queue", value: queue, hint: "letters, digits, '-', '_' and '.' only")
        }
        guard timeoutSeconds > 0, timeoutSeconds.isFinite else {
            throw ValidationError(field: "timeout", value: String(timeoutSeconds), hint: "a positive number of seconds")
        }
    }
}

/// A task as stored.
public struct TaskRecord: Sendable {
    public var id: UUID
    public var name: String
    public var executor: String
    public var parameters: String
    public var schedule: String
    public var queue: String
    public var timeoutSeconds: Double
    public var paused: Bool
    public var nextRunAt: Date?
}

/// A run as stored.
public struct RunRecord: Sendable {
    public var id: UUID
    public var taskID: UUID
    public var occurrence: Date
    public var attempt: Int
    public var state: RunState
    public var workerID: String?
    public var exitCode: Int?
    public var output: String?
    public var errorClass: String?
    public var errorMessage: String?
    public var traceID: String?
    public var traceparent: String?
    public var publishCount: Int
    public var dispatchedAt: Date?
    public var startedAt: Date?
    public var finishedAt: Date?
}

/// A run claimed for publishing: everything its task message needs.
public struct ClaimedRun: Sendable {
    public var message: TaskMessage
    public var traceparent: String
}

/// What one status batch did.
public struct RecordResult: Sendable, Equatable {
    /// Events that moved a run forward.
    public var applied: Int
    /// Duplicates, late events, unknown runs: recorded as no-ops.
    public var ignored: Int
    /// Outcomes recorded (final states set): at most one per run, ever.
    public var outcomes: Int
}

/// The SQL of tasks, runs and workers. Every statement uses bound parameters; hot paths take
/// whole batches through `unnest` arrays, one statement per batch.
public struct Store: Sendable {
    public let pool: PostgresPool

    public init(pool: PostgresPool) { self.pool = pool }

    // MARK: tasks

    /// Inserts tasks in one statement. Fails with a unique violation if a name exists.
    public func createTasks(_ tasks: [NewTask]) async throws {
        for t in tasks { try t.validate() }
        guard !tasks.isEmpty else { return }
        _ = try await pool.withConnection { c in
            try await c.query("""
                INSERT INTO tasks (id, namespace, name, executor, parameters, schedule, queue, timeout_seconds, next_run_at, shard, trace_parent)
                SELECT u.id, u.ns, u.name, u.executor, u.params::jsonb, u.schedule, u.queue, u.timeout,
                       coalesce(u.start_at, now()), abs(hashtext(u.id::text)), u.tp
                FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                            $8::float8[], $9::timestamptz[], $10::text[])
                     AS u(id, ns, name, executor, params, schedule, queue, timeout, start_at, tp)
                """, [
                    tasks.map(\.id), tasks.map(\.namespace), tasks.map(\.name), tasks.map(\.executor),
                    tasks.map { String(decoding: MessageCodec.encode($0.parameters), as: UTF8.self) },
                    tasks.map(\.schedule.text), tasks.map(\.queue), tasks.map(\.timeoutSeconds),
                    tasks.map(\.startAt), tasks.map(\.traceParent),
                ])
        }
    }

    public func tasks(limit: Int = 100) async throws -> [TaskRecord] {
        try await pool.withConnection { c in
            try await c.query("""
                SELECT id, name, executor, parameters::text, schedule, queue, timeout_seconds, paused, next_run_at
                FROM tasks WHERE deleted_at IS NULL ORDER BY name LIMIT $1
                """, [limit]).rows.map(Self.task)
        }
    }

    public func task(named name: String, namespace: String = "default") async throws -> TaskRecord? {
        try await pool.withConnection { c in
            try await c.query("""
                SELECT id, name, executor, parameters::text, schedule, queue, timeout_seconds, paused, next_run_at
                FROM tasks WHERE namespace = $1 AND name = $2 AND deleted_at IS NULL
                """, [namespace, name]).rows.first.map(Self.task)
        }
    }

    /// Makes a task due now; dispatchers are woken through NOTIFY.
    @discardableResult
    public func trigger(taskID: UUID) async throws -> Bool {
        try await pool.withConnection { c in
            try await c.query("UPDATE tasks SET next_run_at = now(), updated_at = now() WHERE id = $1 AND deleted_at IS NULL", [taskID]).affectedRows == 1
        }
    }

    static func task(_ r: PostgresRow) throws -> TaskRecord {
        TaskRecord(id: try r.uuid(0), name: try r.string(1), executor: try r.string(2), parameters: try r.string(3),
                   schedule: try r.string(4), queue: try r.string(5), timeoutSeconds: try r.double(6),
                   paused: try r.bool(7), nextRunAt: try r.optionalDate(8))
    }

    // MARK: dispatch

    /// Claims due work of task group `group` (of `groups`) in one transaction: due tasks become
    /// new `queued` runs (and their `next_run_at` advances), and runs left `queued` past their
    /// lease (a dispatcher died before the broker confirmed) or `scheduled` and due are claimed
    /// again. Every claimed run gets a new lease of `lease`.
    ///
    /// - Parameter newTraceParent: makes the trace context of a new run, given the task's stored
    ///   context (the request that created or triggered it), if any.
    public func claimDue(group: Int, groups: Int, limit: Int, lease: Duration,
                         newTraceParent: @Sendable (String?) -> String) async throws -> [ClaimedRun] {
        let leaseSeconds = lease.inSeconds
        return try await pool.withTransaction { c in
            let due = try await c.query("""
                SELECT id, name, executor, parameters::text, schedule, queue, timeout_seconds, next_run_at, now(), trace_parent, shard
                FROM tasks
                WHERE next_run_at <= now() AND NOT paused AND deleted_at IS NULL AND next_run_at IS NOT NULL
                  AND shard % $1 = $2
                ORDER BY next_run_at
                LIMIT $3
                FOR UPDATE SKIP LOCKED
                """, [groups, group, limit])
            var claimed: [ClaimedRun] = []
            var ids: [UUID] = [], taskIDs: [UUID] = [], occurrences: [Date] = [], queues: [String] = []
            var traceIDs: [String] = [], traceparents: [String] = [], shards: [Int] = []
            var advanceIDs: [UUID] = [], nextTimes: [Date?] = []
            for r in due.rows {
                let taskID = try r.uuid(0)
                let occurrence = try r.date(7)
                let now = try r.date(8)
                let schedule = try Schedule(parsing: try r.string(4))
                let tp = newTraceParent(r[9])
                let runID = UUID()
                let params = try Self.json(try r.string(3))
                let m = TaskMessage(runID: runID, taskID: taskID, taskName: try r.string(1), occurrence: occurrence, attempt: 1,
                                    queue: try r.string(5), executor: try r.string(2), parameters: params, timeoutSeconds: try r.double(6))
                claimed.append(ClaimedRun(message: m, traceparent: tp))
                ids.append(runID); taskIDs.append(taskID); occurrences.append(occurrence); queues.append(m.queue)
                traceIDs.append(Self.traceID(of: tp)); traceparents.append(tp); shards.append(try r.int(10))
                advanceIDs.append(taskID); nextTimes.append(schedule.next(after: occurrence, now: now))
            }
            if !ids.isEmpty {
                let inserted = try await c.query("""
                    INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at, trace_id, traceparent, publish_count)
                    SELECT u.id, u.task_id, u.occ, 1, 'queued', u.queue, u.shard, now() + make_interval(secs => $8), u.trace_id, u.tp, 1
                    FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[], $5::int[], $6::text[], $7::text[])
                         AS u(id, task_id, occ, queue, shard, trace_id, tp)
                    ON CONFLICT (task_id, occurrence, attempt) DO NOTHING
                    RETURNING id
                    """, [ids, taskIDs, occurrences, queues, shards, traceIDs, traceparents, leaseSeconds])
                let insertedIDs = Set(try inserted.rows.map { try $0.uuid(0) })
                claimed.removeAll { !insertedIDs.contains($0.message.runID) }
                try await c.query("""
                    UPDATE tasks SET next_run_at = u.next, updated_at = now()
                    FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, next)
                    WHERE tasks.id = u.id
                    """, [advanceIDs, nextTimes])
            }
            // The outbox: runs whose lease ran out while queued, and scheduled runs now due.
            let room = limit - claimed.count
            if room > 0 {
                let again = try await c.query("""
                    UPDATE runs r SET state = 'queued', available_at = now() + make_interval(secs => $4),
                                      publish_count = r.publish_count + 1
                    FROM tasks t
                    WHERE t.id = r.task_id AND r.id IN (
                        SELECT id FROM runs
                        WHERE state IN ('scheduled', 'queued') AND available_at <= now() AND shard % $1 = $2
                        ORDER BY available_at LIMIT $3 FOR UPDATE SKIP LOCKED)
                    RETURNING r.id, r.task_id, t.name, t.executor, t.parameters::text, r.queue, t.timeout_seconds,
                              r.occurrence, r.attempt, r.traceparent
                    """, [groups, group, room, leaseSeconds])
                for r in again.rows {
                    let tp = r[9] ?? newTraceParent(nil)
                    let m = TaskMessage(runID: try r.uuid(0), taskID: try r.uuid(1), taskName: try r.string(2), occurrence: try r.date(7),
                                        attempt: try r.int(8), queue: try r.string(5), executor: try r.string(3),
                                        parameters: try Self.json(try r.string(4)), timeoutSeconds: try r.double(6))
                    claimed.append(ClaimedRun(message: m, traceparent: tp))
                }
            }
            return claimed
        }
    }

    /// Marks runs the broker confirmed as `dispatched` (forward only).
    public func markDispatched(_ runIDs: [UUID]) async throws {
        guard !runIDs.isEmpty else { return }
        _ = try await pool.withConnection { c in
            // Rows locked in id order, as status recording does, so the two never deadlock.
            try await c.query("""
                UPDATE runs SET state = 'dispatched', dispatched_at = now()
                WHERE id IN (SELECT id FROM runs WHERE id = ANY($1::uuid[]) AND state = 'queued' ORDER BY id FOR UPDATE)
                """, [runIDs])
        }
    }

    /// Shortens the lease of runs whose publish failed, so they are republished after `delay`.
    public func retryPublishSoon(_ runIDs: [UUID], delay: Duration) async throws {
        guard !runIDs.isEmpty else { return }
        let secs = delay.inSeconds
        _ = try await pool.withConnection { c in
            try await c.query("""
                UPDATE runs SET available_at = now() + make_interval(secs => $2)
                WHERE id IN (SELECT id FROM runs WHERE id = ANY($1::uuid[]) AND state = 'queued' ORDER BY id FOR UPDATE)
                """, [runIDs, secs])
        }
    }

    /// Seconds until the next task or run falls due (capped by the caller), `nil` if nothing is scheduled.
    public func secondsUntilNextDue() async throws -> Double? {
        try await pool.withConnection { c in
            let r = try await c.query("""
                SELECT extract(epoch FROM (least(
                    (SELECT min(next_run_at) FROM tasks WHERE NOT paused AND deleted_at IS NULL AND next_run_at IS NOT NULL),
                    (SELECT min(available_at) FROM runs WHERE state IN ('scheduled', 'queued'))) - now()))
                """)
            return r.first?[0].flatMap(Double.init)
        }
    }

    // MARK: status

    /// Applies status events in one transaction: `started` moves a run to `running`, `finished`
    /// to its outcome. Guards in SQL make every transition forward-only, so a duplicate or late
    /// event changes nothing and each attempt's outcome is recorded exactly once.
    public func record(_ events: [StatusMessage]) async throws -> RecordResult {
        var started: [UUID: StatusMessage] = [:]
        var finished: [UUID: StatusMessage] = [:]
        var duplicatesInBatch = 0
        for e in events {
            switch e.event {
            case .started: if started[e.runID] == nil { started[e.runID] = e } else { duplicatesInBatch += 1 }
            case .finished: if finished[e.runID] == nil { finished[e.runID] = e } else { duplicatesInBatch += 1 }
            case .heartbeat: duplicatesInBatch += 1
            }
        }
        let startable = RunState.predecessors(of: .running).map(\.rawValue)
        let finishable = RunState.predecessors(of: .succeeded).map(\.rawValue)
        let s = Array(started.values), f = Array(finished.values)
        let allIDs = Array(Set(s.map(\.runID) + f.map(\.runID))).sorted { $0.uuidString < $1.uuidString }
        let (applied, outcomes): (Int, Int) = try await pool.withTransaction { c in
            var n = 0, outcomes = 0
            // Lock the rows in one order (by id) first: dispatchers recording overlapping
            // batches then wait for each other instead of deadlocking.
            try await c.query("SELECT 1 FROM runs WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE", [allIDs])
            if !s.isEmpty {
                n += try await c.query("""
                    UPDATE runs r SET state = 'running', started_at = coalesce(r.started_at, u.at), worker_id = u.worker
                    FROM unnest($1::uuid[], $2::timestamptz[], $3::text[]) AS u(id, at, worker)
                    WHERE r.id = u.id AND r.state = ANY($4::text[])
                    """, [s.map(\.runID), s.map(\.at), s.map(\.workerID), startable]).affectedRows
            }
            if !f.isEmpty {
                outcomes = try await c.query("""
                    UPDATE runs r SET state = u.state, finished_at = u.at, started_at = coalesce(r.started_at, u.at),
                                      worker_id = u.worker, exit_code = u.exit_code, output = u.output,
                                      error_class = u.error_class, error_message = u.error_message
                    FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::int[], $6::text[], $7::text[], $8::text[])
                         AS u(id, state, at, worker, exit_code, output, error_class, error_message)
                    WHERE r.id = u.id AND r.state = ANY($9::text[])
                    """, [f.map(\.runID), f.map { ($0.outcome ?? .failed).runState.rawValue }, f.map(\.at), f.map(\.workerID),
                          f.map { $0.exitCode }, f.map(\.output), f.map(\.errorClass), f.map(\.errorMessage), finishable]).affectedRows
                n += outcomes
            }
            return (n, outcomes)
        }
        return RecordResult(applied: applied, ignored: events.count - applied, outcomes: outcomes)
    }

    // MARK: runs

    public func runs(taskID: UUID? = nil, limit: Int = 100) async throws -> [RunRecord] {
        try await pool.withConnection { c in
            try await c.query("""
                SELECT id, task_id, occurrence, attempt, state, worker_id, exit_code, output, error_class, error_message,
                       trace_id, traceparent, publish_count, dispatched_at, started_at, finished_at
                FROM runs WHERE ($1::uuid IS NULL OR task_id = $1) ORDER BY occurrence DESC, attempt DESC LIMIT $2
                """, [taskID, limit]).rows.map(Self.run)
        }
    }

    public func run(id: UUID) async throws -> RunRecord? {
        try await pool.withConnection { c in
            try await c.query("""
                SELECT id, task_id, occurrence, attempt, state, worker_id, exit_code, output, error_class, error_message,
                       trace_id, traceparent, publish_count, dispatched_at, started_at, finished_at
                FROM runs WHERE id = $1
                """, [id]).rows.first.map(Self.run)
        }
    }

    /// Runs by state.
    public func runCounts() async throws -> [RunState: Int] {
        try await pool.withConnection { c in
            var out: [RunState: Int] = [:]
            for r in try await c.query("SELECT state, count(*) FROM runs GROUP BY state").rows {
                if let s = RunState(rawValue: try r.string(0)) { out[s] = try r.int(1) }
            }
            return out
        }
    }

    static func run(_ r: PostgresRow) throws -> RunRecord {
        RunRecord(id: try r.uuid(0), taskID: try r.uuid(1), occurrence: try r.date(2), attempt: try r.int(3),
                  state: RunState(rawValue: try r.string(4)) ?? .lost, workerID: r[5], exitCode: try r.optionalInt(6),
                  output: r[7], errorClass: r[8], errorMessage: r[9], traceID: r[10], traceparent: r[11],
                  publishCount: try r.int(12), dispatchedAt: try r.optionalDate(13), startedAt: try r.optionalDate(14),
                  finishedAt: try r.optionalDate(15))
    }

    static func json(_ text: String) throws -> JSONValue {
        try JSONDecoder().decode(JSONValue.self, from: Data(text.utf8))
    }

    /// The trace id (32 hex digits) inside a `traceparent`.
    static func traceID(of traceparent: String) -> String {
        let parts = traceparent.split(separator: "-")
        return parts.count >= 2 ? String(parts[1]) : ""
    }
}
