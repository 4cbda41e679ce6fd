public import ConveyorCore
import ConveyorPostgres
public import Foundation

/// What one status batch did.
public struct RecordResult: Sendable, Equatable {
    /// Events that moved a run forward.
    public var applied: Int
    /// Duplicates, late events, unknown runs: recorded as no-ops.
    public var ignored: Int
    /// Outcomes recorded (final states set): at most one per run, ever.
    public var outcomes: Int
    /// What followed from the outcomes (retries, dead runs, dependents).
    public var settled = SettleResult()
}

/// What followed from runs ending.
public struct SettleResult: Sendable, Equatable {
    /// New attempts scheduled by retry policy.
    public var retried = 0
    /// Runs ended `dead` (retries exhausted, or a poison message).
    public var dead = 0
    /// Dependent runs created (`scheduled`) or ended `skipped`.
    public var dependentsScheduled = 0
    public var dependentsSkipped = 0
    /// Waiting runs released (overlap `queue`).
    public var released = 0
    /// Callbacks queued.
    public var callbacks = 0

    static func + (a: Self, b: Self) -> Self {
        SettleResult(retried: a.retried + b.retried, dead: a.dead + b.dead, dependentsScheduled: a.dependentsScheduled + b.dependentsScheduled,
                     dependentsSkipped: a.dependentsSkipped + b.dependentsSkipped, released: a.released + b.released,
                     callbacks: a.callbacks + b.callbacks)
    }
}

/// A message the broker dead-lettered.
public struct DeadLetter: Sendable {
    public var runID: UUID?
    public var reason: String
    public var source: String
    public var type: String?
    public var body: String

    /// Every text is kept `storable`: a dead letter is whatever reached the broker.
    public init(runID: UUID?, reason: String, source: String, type: String?, body: String) {
        self.runID = runID
        self.reason = reason.storable
        self.source = source.storable
        self.type = type?.storable
        self.body = body.storable
    }
}

/// A run that just reached a final state, with what deciding its follow-up needs.
struct Ended {
    var id: UUID, task: UUID, occurrence: Date, attempt: Int, state: RunState, exitCode: Int?, errorClass: String?
    var workflow: UUID?, queue: String, shard: Int, priority: Int, key: String?, traceparent: String?, baggage: String?

    static let columns = """
        runs.id, runs.task_id, runs.occurrence, runs.attempt, runs.state, runs.exit_code, runs.error_class, runs.workflow_run_id,
        runs.queue, runs.shard, runs.priority, runs.concurrency_key, runs.traceparent, runs.baggage
        """

    init(_ r: PostgresRow) throws {
        id = try r.uuid(0); task = try r.uuid(1); occurrence = try r.date(2); attempt = try r.int(3)
        state = RunState(rawValue: try r.string(4)) ?? .failed; exitCode = try r.optionalInt(5); errorClass = r[6]
        workflow = r[7].flatMap(UUID.init(uuidString:)); queue = try r.string(8); shard = try r.int(9); priority = try r.int(10)
        key = r[11]; traceparent = r[12]; baggage = r[13]
    }
}

extension Store {
    // MARK: status

    /// Applies status events in one transaction: `started` moves a run to `running` (with a
    /// deadline of timeout + `lostGrace`), `finished` to its outcome. Guards in SQL make every
    /// transition forward-only, so a duplicate or late event changes nothing and each attempt's
    /// outcome is recorded exactly once. Outcomes are settled in the same transaction.
    public func record(_ events: [StatusMessage], lostGrace: Duration) async throws -> RecordResult {
        var started: [UUID: StatusMessage] = [:]
        var finished: [UUID: StatusMessage] = [:]
        for e in events {
            switch e.event {
            case .started:
                // Keep the first start; a later one may add that the run was detached.
                if var first = started[e.runID] {
                    if e.detached == true { first.detached = true; started[e.runID] = first }
                } else {
                    started[e.runID] = e
                }
            case .finished: if finished[e.runID] == nil { finished[e.runID] = e }
            case .heartbeat: break
            }
        }
        let startable = RunState.predecessors(of: .running).map(\.rawValue)
        let finishable = RunState.predecessors(of: .succeeded).map(\.rawValue)
        let s = Array(started.values), f = Array(finished.values)
        let allIDs = Array(Set(s.map(\.runID) + f.map(\.runID))).sorted { $0.precedes($1) }
        return try await pool.withTransaction { c in
            var n = 0
            // Lock the rows in one order (by id) first: dispatchers recording overlapping
            // batches then wait for each other instead of deadlocking.
            try await c.query("SELECT 1 FROM runs WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE", [allIDs])
            if !s.isEmpty {
                n += try await c.query("""
                    UPDATE runs r SET state = 'running', started_at = coalesce(r.started_at, u.at), worker_id = u.worker,
                                      deadline_at = now() + make_interval(secs => t.timeout_seconds + $5),
                                      detached = r.detached OR u.detached
                    FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $6::bool[]) AS u(id, at, worker, detached), tasks t
                    WHERE r.id = u.id AND t.id = r.task_id AND r.state = ANY($4::text[])
                    """, [s.map(\.runID), s.map(\.at), s.map(\.workerID), startable, lostGrace.inSeconds,
                          s.map { $0.detached ?? false }]).affectedRows
                // A run already running that its worker has now detached (acknowledged to the broker).
                let detaching = s.filter { $0.detached == true }
                if !detaching.isEmpty {
                    try await c.query("""
                        UPDATE runs SET detached = true
                        FROM unnest($1::uuid[], $2::text[]) AS u(id, worker)
                        WHERE runs.id = u.id AND runs.state = 'running' AND runs.worker_id = u.worker AND NOT runs.detached
                        """, [detaching.map(\.runID), detaching.map(\.workerID)])
                }
            }
            var ended: [Ended] = []
            if !f.isEmpty {
                ended = try await c.query("""
                    UPDATE runs SET state = u.state, finished_at = u.at, started_at = coalesce(runs.started_at, u.started, u.at),
                                    worker_id = u.worker, exit_code = u.exit_code, output = u.output,
                                    error_class = u.error_class, error_message = u.error_message
                    FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::int[], $6::text[], $7::text[], $8::text[], $10::timestamptz[])
                         AS u(id, state, at, worker, exit_code, output, error_class, error_message, started)
                    WHERE runs.id = u.id AND runs.state = ANY($9::text[])
                    RETURNING \(Ended.columns)
                    """, [f.map(\.runID), f.map { ($0.outcome ?? .failed).runState.rawValue }, f.map(\.at), f.map(\.workerID),
                          f.map { $0.exitCode }, f.map(\.output), f.map(\.errorClass), f.map(\.errorMessage), finishable,
                          f.map(\.startedAt)]).rows.map(Ended.init)
                n += ended.count
                // A worker that refuses a message reports why, then rejects it; the dead letter can
                // be recorded first. The run stays dead, and gets the worker's error when it has none.
                let endedIDs = Set(ended.map(\.id))
                let late = f.filter { !endedIDs.contains($0.runID) && $0.errorClass.map(RetryPolicy.poisonClasses.contains) == true }
                if !late.isEmpty {
                    try await c.query("""
                        UPDATE runs SET error_class = u.error_class, error_message = u.error_message, worker_id = coalesce(runs.worker_id, u.worker)
                        FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS u(id, error_class, error_message, worker)
                        WHERE runs.id = u.id AND runs.state = 'dead' AND runs.error_class IS NULL
                        """, [late.map(\.runID), late.map(\.errorClass), late.map(\.errorMessage), late.map(\.workerID)])
                }
            }
            let settled = try await Self.settle(ended, c)
            return RecordResult(applied: n, ignored: events.count - n, outcomes: ended.count, settled: settled)
        }
    }

    // MARK: what follows an outcome

    /// Decides what follows runs that just ended, in the caller's transaction: a retry (a new
    /// attempt `scheduled` at `now() + backoff`, same trace), or `dead` when retries are used up
    /// or the message was poison; callbacks; the waiting run of an overlap `queue` task; and the
    /// dependents of a workflow run, repeatedly, until nothing more follows.
    static func settle(_ initial: [Ended], _ c: PostgresConnection) async throws -> SettleResult {
        var result = SettleResult()
        var pending = initial
        while !pending.isEmpty {
            let batch = pending
            pending = []
            let taskIDs = Array(Set(batch.map(\.task)))
            struct Policy { var retry: RetryPolicy; var overlap: String; var callback: String?; var name: String }
            var policies: [UUID: Policy] = [:]
            // Retry policies are decoded only for tasks with a failed ending: the common case
            // (everything succeeded) decodes no JSON.
            let failing = Set(batch.filter { [.failed, .timedOut, .lost].contains($0.state) }.map(\.task))
            for r in try await c.query("""
                SELECT id, max_attempts, CASE WHEN id = ANY($2::uuid[]) THEN retry_policy::text END, overlap_policy, callback_url, name
                FROM tasks WHERE id = ANY($1::uuid[])
                """, [taskIDs, Array(failing)]).rows {
                var retry = RetryPolicy()
                if let text = r[2] { retry = (try? RetryPolicy(maxAttempts: try r.int(1), json: try json(text))) ?? RetryPolicy() }
                policies[try r.uuid(0)] = Policy(retry: retry, overlap: try r.string(3), callback: r[4], name: try r.string(5))
            }
            var retries = NewRuns()
            var dead: [(UUID, String)] = []
            var occurrenceDone: [Ended] = []
            var callbacks: [(UUID, String, String)] = []
            for e in batch {
                guard let p = policies[e.task] else { continue }
                var finalState = e.state
                if p.retry.shouldRetry(attempt: e.attempt, state: e.state, exitCode: e.exitCode, errorClass: e.errorClass) {
                    retries.append(id: UUID(), task: e.task, occurrence: e.occurrence, attempt: e.attempt + 1, queue: e.queue, shard: e.shard,
                                   delay: p.retry.delay(afterAttempt: e.attempt), priority: e.priority, key: e.key, workflow: e.workflow,
                                   traceparent: e.traceparent, baggage: e.baggage)
                    continue
                }
                let poison = e.errorClass.map(RetryPolicy.poisonClasses.contains) ?? false
                if poison || p.retry.isRetryable(state: e.state, exitCode: e.exitCode, errorClass: e.errorClass) {
                    let why = poison ? "the worker refused the message (\(e.errorClass!))"
                        : "retries exhausted: attempt \(e.attempt) of \(p.retry.maxAttempts) ended \(e.state.rawValue)"
                    dead.append((e.id, why))
                    finalState = .dead
                }
                var done = e
                done.state = finalState
                occurrenceDone.append(done)
                if let url = p.callback, [.succeeded, .failed, .dead, .timedOut, .lost].contains(finalState) {
                    callbacks.append((e.id, url, Self.callbackPayload(done, task: p.name)))
                }
            }
            result.retried += try await retries.insert(state: "scheduled", c)
            if !dead.isEmpty {
                result.dead += try await c.query("""
                    UPDATE runs SET state = 'dead', reason = u.reason, finished_at = coalesce(finished_at, now())
                    FROM unnest($1::uuid[], $2::text[]) AS u(id, reason) WHERE runs.id = u.id
                    """, [dead.map(\.0), dead.map(\.1)]).affectedRows
            }
            if !callbacks.isEmpty {
                result.callbacks += try await c.query("""
                    INSERT INTO callbacks (run_id, url, payload) SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])
                    """, [callbacks.map(\.0), callbacks.map(\.1), callbacks.map(\.2)]).affectedRows
            }
            let queueTasks = Array(Set(occurrenceDone.filter { policies[$0.task]?.overlap == "queue" }.map(\.task)))
            if !queueTasks.isEmpty {
                result.released += try await c.query("""
                    UPDATE runs SET available_at = now()
                    WHERE task_id = ANY($1::uuid[]) AND state = 'scheduled' AND available_at = 'infinity'
                    """, [queueTasks]).affectedRows
            }
            let (next, scheduled) = try await dependents(of: occurrenceDone.filter { $0.workflow != nil }, c)
            result.dependentsScheduled += scheduled
            result.dependentsSkipped += next.count
            pending = next
        }
        return result
    }

    /// Runs or skips the dependents of occurrences that ended in a workflow run. Returns the
    /// dependents ended `skipped` (whose own dependents are decided next) and how many were scheduled.
    static func dependents(of done: [Ended], _ c: PostgresConnection) async throws -> ([Ended], Int) {
        guard !done.isEmpty else { return ([], 0) }
        // One workflow run at a time: two dispatchers ending two upstreams of one dependent
        // serialize here, and the second sees the first's outcome.
        let workflows = Array(Set(done.compactMap(\.workflow))).sorted { $0.precedes($1) }
        try await c.query("SELECT pg_advisory_xact_lock(hashtext('conveyor.wf:' || w::text)) FROM (SELECT w FROM unnest($1::uuid[]) w ORDER BY w) s",
                          [workflows])
        var skipped: [Ended] = []
        var toRun = NewRuns(), toSkip = NewRuns()
        var decided: Set<String> = []
        for e in done {
            guard let wf = e.workflow else { continue }
            let deps = try await c.query("""
                SELECT t.id, t.trigger_rule, t.queue, t.shard, t.priority, t.concurrency_key, w.occurrence,
                       EXISTS (SELECT 1 FROM runs x WHERE x.workflow_run_id = $2 AND x.task_id = t.id)
                FROM task_dependencies d JOIN tasks t ON t.id = d.task_id JOIN workflow_runs w ON w.id = $2
                WHERE d.upstream_id = $1 AND t.deleted_at IS NULL
                """, [e.task, wf])
            for d in deps.rows {
                let depID = try d.uuid(0)
                guard !(try d.bool(7)), decided.insert("\(wf)/\(depID)").inserted else { continue }
                let ups = try await c.query("""
                    SELECT u.name, (SELECT r.state FROM runs r WHERE r.workflow_run_id = $1 AND r.task_id = d.upstream_id
                                    ORDER BY r.attempt DESC LIMIT 1)
                    FROM task_dependencies d JOIN tasks u ON u.id = d.upstream_id WHERE d.task_id = $2
                    """, [wf, depID])
                var finals: [RunState] = [], failedNames: [String] = []
                for u in ups.rows {
                    guard let st = u[1].flatMap(RunState.init(rawValue:)), st.isFinal else { continue }
                    finals.append(st)
                    if st != .succeeded { failedNames.append("\(try u.string(0)) ended \(st.rawValue)") }
                }
                let rule = (try? TriggerRule(parsing: try d.string(1))) ?? .allSuccess
                guard let run = rule.decide(final: finals, total: ups.rows.count) else { continue }
                let id = UUID()
                let reason = run ? nil : (failedNames.isEmpty ? "no upstream failed (trigger rule \(rule.rawValue))"
                                                              : "upstream \(failedNames.joined(separator: ", ")) (trigger rule \(rule.rawValue))")
                if run {
                    toRun.append(id: id, task: depID, occurrence: try d.date(6), attempt: 1, queue: try d.string(2), shard: try d.int(3),
                                 delay: 0, priority: try d.int(4), key: d[5], workflow: wf, traceparent: e.traceparent, baggage: e.baggage)
                } else {
                    toSkip.append(id: id, task: depID, occurrence: try d.date(6), attempt: 1, queue: try d.string(2), shard: try d.int(3),
                                  delay: 0, priority: try d.int(4), key: d[5], workflow: wf, traceparent: e.traceparent, baggage: e.baggage, reason: reason)
                    var s = e
                    s.id = id; s.task = depID; s.state = .skipped; s.attempt = 1; s.exitCode = nil; s.errorClass = nil
                    skipped.append(s)
                }
            }
        }
        let scheduled = try await toRun.insert(state: "scheduled", c)
        _ = try await toSkip.insert(state: "skipped", c)
        return (skipped, scheduled)
    }

    /// The JSON POSTed to a task's callback URL (docs/scheduling.md, "Callbacks").
    static func callbackPayload(_ e: Ended, task: String) -> String {
        var fields: [String: JSONValue] = [
            "attempt": .number(Double(e.attempt)), "occurrence": .string(Timestamp.format(e.occurrence)),
            "run_id": .string(e.id.lowercasedString), "state": .string(e.state.rawValue), "task": .string(task),
            "task_id": .string(e.task.lowercasedString),
        ]
        if let code = e.exitCode { fields["exit_code"] = .number(Double(code)) }
        if let c = e.errorClass { fields["error_class"] = .string(c) }
        if let w = e.workflow { fields["workflow_run_id"] = .string(w.lowercasedString) }
        // traceparent is 00-<trace id>-<span id>-<flags>: receivers can find the run's trace.
        if let tp = e.traceparent?.split(separator: "-"), tp.count == 4 { fields["trace_id"] = .string(String(tp[1])) }
        let payload: JSONValue = .object(fields)
        return String(decoding: MessageCodec.encode(payload), as: UTF8.self)
    }

    // MARK: lost runs and dead letters

    /// Declares `lost` the running runs whose deadline (timeout + grace from their start) passed
    /// with no outcome, and settles them (retry by policy). Returns how many.
    public func declareLost(limit: Int = 500) async throws -> (lost: Int, settled: SettleResult) {
        try await pool.withTransaction { c in
            let ended = try await c.query("""
                UPDATE runs SET state = 'lost', finished_at = now(),
                                reason = 'no outcome from worker ' || coalesce(worker_id, '?') || ' within the timeout plus grace'
                WHERE id IN (SELECT id FROM runs WHERE state = 'running' AND deadline_at < now() ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                RETURNING \(Ended.columns)
                """, [limit]).rows.map(Ended.init)
            return (ended.count, try await Self.settle(ended, c))
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
    public func recordHeartbeats(_ beats: [HeartbeatMessage]) async throws {
        guard !beats.isEmpty else { return }
        var latest: [String: HeartbeatMessage] = [:]
        for b in beats where latest[b.workerID].map({ $0.at <= b.at }) ?? true { latest[b.workerID] = b }
        let l = latest.values.sorted { $0.workerID < $1.workerID }
        try await pool.withConnection { c in
            _ = try await c.query("""
                INSERT INTO workers (id, host, queues, executors, concurrency, in_flight, heartbeat_interval_ms, last_heartbeat, state)
                SELECT u.id, u.host, string_to_array(u.queues, ','), string_to_array(u.executors, ','), u.concurrency,
                       coalesce(string_to_array(u.in_flight, ',')::uuid[], '{}'), u.interval_ms, now(), 'active'
                FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::int[])
                     AS u(id, host, queues, executors, concurrency, in_flight, interval_ms)
                ON CONFLICT (id) DO UPDATE SET host = EXCLUDED.host, queues = EXCLUDED.queues, executors = EXCLUDED.executors,
                    concurrency = EXCLUDED.concurrency, in_flight = EXCLUDED.in_flight,
                    heartbeat_interval_ms = CASE WHEN workers.state = 'active'
                        THEN least(greatest(workers.heartbeat_interval_ms, EXCLUDED.heartbeat_interval_ms), 2 * workers.heartbeat_interval_ms)
                        ELSE EXCLUDED.heartbeat_interval_ms END,
                    last_heartbeat = now(), state = 'active', lost_at = NULL
                """, [l.map(\.workerID), l.map(\.host), l.map { $0.queues.joined(separator: ",") }, l.map { $0.executors.joined(separator: ",") },
                      l.map(\.concurrency), l.map { $0.inFlight.isEmpty ? nil : $0.inFlight.map { $0.lowercasedString }.joined(separator: ",") },
                      l.map { Int(($0.intervalSeconds * 1000).rounded()) }])
        }
    }

    /// Declares `lost` the workers silent for `missed` of their heartbeat intervals, and with
    /// them the runs they had detached from the broker (acknowledged early because they ran
    /// long): nobody else will redeliver those, so they are ended `lost` and retried by policy.
    /// A lost worker's other runs are still unacknowledged: the broker redelivers them when it
    /// drops the worker's connection, and retrying them here as well would run them twice.
    ///
    /// `heardFor` is how long, in seconds, the caller has been able to hear heartbeats (its
    /// broker link up and not blocked). A worker is judged only when that covers its `missed`
    /// intervals: silence while the caller could not listen, or while a broker alarm blocked every
    /// publisher, says nothing about the worker.
    public func declareLostWorkers(missed: Int, heardFor: Double, limit: Int = 500) async throws -> (workers: [String], runs: Int, settled: SettleResult) {
        try await pool.withTransaction { c in
            let workers = try await c.query("""
                UPDATE workers SET state = 'lost', lost_at = now()
                WHERE id IN (SELECT id FROM workers WHERE state = 'active'
                             AND last_heartbeat < now() - make_interval(secs => heartbeat_interval_ms * $1 / 1000.0)
                             AND heartbeat_interval_ms * $1 / 1000.0 < $2::float8
                             FOR UPDATE SKIP LOCKED)
                RETURNING id
                """, [missed, heardFor]).rows.compactMap { $0[0] }
            // Also the detached runs of workers declared lost earlier (a dispatcher that died
            // between the two statements, or more runs than `limit`).
            let ended = try await c.query("""
                UPDATE runs SET state = 'lost', finished_at = now(),
                                reason = 'worker ' || worker_id || ' stopped sending heartbeats while running it'
                WHERE id IN (SELECT r.id FROM runs r JOIN workers w ON w.id = r.worker_id
                             WHERE r.state = 'running' AND r.detached AND w.state = 'lost'
                             ORDER BY r.id LIMIT $1 FOR UPDATE OF r SKIP LOCKED)
                RETURNING \(Ended.columns)
                """, [limit]).rows.map(Ended.init)
            return (workers, ended.count, try await Self.settle(ended, c))
        }
    }

    /// The workers known from heartbeats, most recently heard first (or the one with `id`).
    public func workers(id: String? = nil) async throws -> [WorkerRecord] {
        try await pool.withConnection { c in
            try await c.query("""
                SELECT id, host, array_to_string(queues, ','), array_to_string(executors, ','), concurrency,
                       cardinality(in_flight), state, extract(epoch FROM now() - last_heartbeat)::float8
                FROM workers WHERE $1::text IS NULL OR id = $1 ORDER BY last_heartbeat DESC
                """, [id]).rows.map { r in
                WorkerRecord(id: r[0] ?? "", host: r[1] ?? "", queues: (r[2] ?? "").split(separator: ",").map(String.init),
                             executors: (r[3] ?? "").split(separator: ",").map(String.init), concurrency: Int(r[4] ?? "") ?? 0,
                             inFlight: Int(r[5] ?? "") ?? 0, state: r[6] ?? "", secondsSinceHeartbeat: Double(r[7] ?? "") ?? 0)
            }
        }
    }

    /// Keeps dead-lettered messages and ends their runs (when identifiable and not yet final) `dead`.
    public func recordDeadLetters(_ letters: [DeadLetter]) async throws -> Int {
        guard !letters.isEmpty else { return 0 }
        return try await pool.withTransaction { c in
            try await c.query("""
                INSERT INTO dead_letters (run_id, reason, source, type, body) SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
                """, [letters.map(\.runID), letters.map(\.reason), letters.map(\.source), letters.map(\.type), letters.map(\.body)])
            let withRun = letters.filter { $0.runID != nil }
            guard !withRun.isEmpty else { return 0 }
            let open = RunState.predecessors(of: .dead).map(\.rawValue)
            let ended = try await c.query("""
                UPDATE runs SET state = 'dead', finished_at = now(), reason = 'dead-lettered: ' || u.reason
                FROM unnest($1::uuid[], $2::text[]) AS u(id, reason)
                WHERE runs.id = u.id AND runs.id IN (SELECT id FROM runs WHERE id = ANY($1::uuid[]) AND state = ANY($3::text[]) ORDER BY id FOR UPDATE)
                RETURNING \(Ended.columns)
                """, [withRun.map(\.runID), withRun.map(\.reason), open]).rows.map(Ended.init)
            // Dead is final: no retry, but dependents, callbacks and waiting runs still follow.
            _ = try await Self.settle(ended, c)
            return ended.count
        }
    }

    // MARK: operations

    /// Cancels runs that have not ended; workers holding them are told (`cancel_pending`).
    /// Returns the runs cancelled.
    @discardableResult
    public func cancel(runs ids: [UUID], reason: String = "cancelled by an operator") async throws -> [UUID] {
        try await cancel(where: "id = ANY($1::uuid[])", [ids], reason: reason)
    }

    /// Cancels every open run of a task.
    @discardableResult
    public func cancel(task: UUID, reason: String = "task cancelled by an operator") async throws -> [UUID] {
        try await cancel(where: "task_id = $1", [task], reason: reason)
    }

    /// Cancels every open run of the tasks of a group.
    @discardableResult
    public func cancel(group: String, reason: String = "group cancelled by an operator") async throws -> [UUID] {
        try await cancel(where: "task_id IN (SELECT id FROM tasks WHERE group_name = $1)", [group], reason: reason)
    }

    func cancel(where condition: String, _ params: [any PostgresEncodable], reason: String) async throws -> [UUID] {
        try await pool.withTransaction { c in
            let ended = try await c.query("""
                UPDATE runs SET state = 'cancelled', finished_at = now(), reason = $\(params.count + 1),
                                cancel_pending = state IN ('queued', 'dispatched', 'running')
                WHERE id IN (SELECT id FROM runs WHERE \(condition) AND state IN ('scheduled', 'queued', 'dispatched', 'running')
                             ORDER BY id FOR UPDATE)
                RETURNING \(Ended.columns)
                """, params + [reason]).rows.map(Ended.init)
            _ = try await Self.settle(ended, c)
            return ended.map(\.id)
        }
    }

    /// Cancelled runs whose workers have not been told yet.
    public func pendingCancels(limit: Int = 500) async throws -> [UUID] {
        try await pool.withConnection { c in
            try await c.query("SELECT id FROM runs WHERE cancel_pending LIMIT $1", [limit]).rows.map { try $0.uuid(0) }
        }
    }

    public func markCancelsSent(_ ids: [UUID]) async throws {
        guard !ids.isEmpty else { return }
        _ = try await pool.withConnection { c in
            try await c.query("UPDATE runs SET cancel_pending = false WHERE id = ANY($1::uuid[])", [ids])
        }
    }

    /// Re-drives an ended run (dead, failed, timed out, lost or cancelled) as a new attempt of its
    /// occurrence, due now, in the same trace. Refused when a newer attempt exists.
    public func redrive(run id: UUID) async throws -> UUID {
        let newID = UUID()
        let done = try await pool.withTransaction { c in
            try await c.query("""
                INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at, priority, concurrency_key,
                                  workflow_run_id, trace_id, traceparent, baggage)
                SELECT $2, r.task_id, r.occurrence, r.attempt + 1, 'scheduled', r.queue, r.shard, now(), r.priority, r.concurrency_key,
                       r.workflow_run_id, r.trace_id, r.traceparent, r.baggage
                FROM runs r
                WHERE r.id = $1 AND r.state IN ('dead', 'failed', 'timed_out', 'lost', 'cancelled')
                  AND NOT EXISTS (SELECT 1 FROM runs x WHERE x.task_id = r.task_id AND x.occurrence = r.occurrence AND x.attempt > r.attempt)
                """, [id, newID]).affectedRows
        }
        guard done == 1 else {
            throw ValidationError(field: "run", value: id.lowercasedString,
                                  hint: "only the latest attempt of an occurrence that ended dead, failed, timed_out, lost or cancelled can be re-driven")
        }
        return newID
    }

    /// Pauses or resumes tasks by name, or every task of a group. Returns how many changed.
    @discardableResult
    public func setPaused(_ paused: Bool, names: [String] = [], group: String? = nil, namespace: String = "default") async throws -> Int {
        try await pool.withConnection { c in
            try await c.query("""
                UPDATE tasks SET paused = $1, updated_at = now()
                WHERE namespace = $2 AND deleted_at IS NULL AND paused <> $1 AND (name = ANY($3::text[]) OR group_name = $4)
                """, [paused, namespace, names, group]).affectedRows
        }
    }

    /// Soft-deletes a task: it stops being scheduled; it is purged after the retention period.
    @discardableResult
    public func deleteTask(named name: String, namespace: String = "default") async throws -> Bool {
        try await pool.withConnection { c in
            try await c.query("UPDATE tasks SET deleted_at = now(), updated_at = now() WHERE namespace = $1 AND name = $2 AND deleted_at IS NULL",
                              [namespace, name]).affectedRows == 1
        }
    }

    /// Runs by state for one group's tasks (or every task).
    public func runCounts(group: String? = nil) async throws -> [RunState: Int] {
        try await pool.withConnection { c in
            var out: [RunState: Int] = [:]
            for r in try await c.query("""
                SELECT r.state, count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE $1::text IS NULL OR t.group_name = $1 GROUP BY r.state
                """, [group]).rows {
                if let s = RunState(rawValue: try r.string(0)) { out[s] = try r.int(1) }
            }
            return out
        }
    }

    /// Retries in all (attempts after the first, re-drives included), for one group's tasks or every task.
    public func retryCount(group: String? = nil) async throws -> Int {
        try await pool.withConnection { c in
            try await c.query("""
                SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE r.attempt > 1 AND ($1::text IS NULL OR t.group_name = $1)
                """, [group]).rows[0].int(0)
        }
    }

    /// Sets (or with `rate` nil removes) a queue's rate limit in runs per second.
    public func setRateLimit(queue: String, rate: Double?, burst: Double? = nil) async throws {
        _ = try await pool.withConnection { c in
            if let rate {
                let b = burst ?? max(1, rate)
                try await c.query("""
                    INSERT INTO queue_limits (queue, rate_per_second, burst, tokens) VALUES ($1, $2, $3, $3)
                    ON CONFLICT (queue) DO UPDATE SET rate_per_second = $2, burst = $3, tokens = least(queue_limits.tokens, $3)
                    """, [queue, rate, b])
            } else {
                try await c.query("DELETE FROM queue_limits WHERE queue = $1", [queue])
            }
        }
    }

    /// Refreshes the planner's statistics of the tables a burst changes (see the dispatcher's
    /// `refreshStatisticsAfterBursts`).
    public func analyze() async throws {
        try await pool.withConnection { c in _ = try await c.query("ANALYZE runs, tasks") }
    }

    /// Deletes, in one batch, ended runs older than `runsAge` and then soft-deleted tasks older
    /// than `tasksAge` (their runs first). Returns rows deleted; call until 0.
    public func purgeBatch(runsAge: Duration, tasksAge: Duration, batch: Int = 1000) async throws -> Int {
        try await pool.withConnection { c in
            var n = try await c.query("""
                DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE finished_at < now() - make_interval(secs => $1) LIMIT $2)
                """, [runsAge.inSeconds, batch]).affectedRows
            n += try await c.query("""
                DELETE FROM runs WHERE id IN (SELECT r.id FROM runs r JOIN tasks t ON t.id = r.task_id
                                              WHERE t.deleted_at < now() - make_interval(secs => $1) LIMIT $2)
                """, [tasksAge.inSeconds, batch]).affectedRows
            if n == 0 {
                n += try await c.query("""
                    DELETE FROM tasks WHERE id IN (SELECT id FROM tasks t WHERE deleted_at < now() - make_interval(secs => $1)
                                                   AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.task_id = t.id) LIMIT $2)
                    """, [tasksAge.inSeconds, batch]).affectedRows
            }
            n += try await c.query("""
                DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE received_at < now() - make_interval(secs => $1) LIMIT $2)
                """, [runsAge.inSeconds, batch]).affectedRows
            n += try await c.query("""
                DELETE FROM callbacks WHERE id IN (SELECT id FROM callbacks WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)
                """, [runsAge.inSeconds, batch]).affectedRows
            return n
        }
    }
}

/// A worker as its heartbeats describe it.
public struct WorkerRecord: Sendable {
    public var id: String
    public var host: String
    public var queues: [String]
    public var executors: [String]
    public var concurrency: Int
    public var inFlight: Int
    public var state: String
    public var secondsSinceHeartbeat: Double
}
