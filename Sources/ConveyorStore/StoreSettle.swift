import ConveyorCore
import ConveyorPostgres
import Foundation

extension Store {
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
            struct Policy {
                var retry: RetryPolicy
                var overlap: String
                var callback: String?
                var name: String
            }
            var policies: [UUID: Policy] = [:]
            // Retry policies are decoded only for tasks with a failed ending: the common case
            // (everything succeeded) decodes no JSON.
            let failing = Set(batch.filter { RunState.retryableEndings.contains($0.state) }.map(\.task))
            for r in try await c.query(
                """
                SELECT id, max_attempts, CASE WHEN id = ANY($2::uuid[]) THEN retry_policy::text END, overlap_policy,
                    callback_url, name
                FROM tasks WHERE id = ANY($1::uuid[])
                """, [taskIDs, Array(failing)]
            ).rows {
                var retry = RetryPolicy()
                if let text = r[2] {
                    retry = (try? RetryPolicy(maxAttempts: try r.int(1), json: try json(text))) ?? RetryPolicy()
                }
                policies[try r.uuid(0)] = Policy(
                    retry: retry, overlap: try r.string(3), callback: r[4], name: try r.string(5))
            }
            var retries = NewRuns()
            var dead: [(UUID, String)] = []
            var occurrenceDone: [Ended] = []
            var callbacks: [(UUID, String, String)] = []
            for e in batch {
                guard let p = policies[e.task] else { continue }
                var finalState = e.state
                if p.retry.shouldRetry(
                    attempt: e.attempt, state: e.state, exitCode: e.exitCode, errorClass: e.errorClass)
                {
                    retries.append(
                        id: UUID(), task: e.task, occurrence: e.occurrence, attempt: e.attempt + 1, queue: e.queue,
                        shard: e.shard,
                        delay: p.retry.delay(afterAttempt: e.attempt), priority: e.priority, key: e.key,
                        workflow: e.workflow,
                        traceparent: e.traceparent, baggage: e.baggage, backfill: e.backfill)
                    continue
                }
                let poison = e.errorClass.map(RetryPolicy.poisonClasses.contains) ?? false
                if poison || p.retry.isRetryable(state: e.state, exitCode: e.exitCode, errorClass: e.errorClass) {
                    let why =
                        poison
                        ? "the worker refused the message (\(e.errorClass!))"
                        : "retries exhausted: attempt \(e.attempt) of \(p.retry.maxAttempts) ended \(e.state.rawValue)"
                    dead.append((e.id, why))
                    finalState = .dead
                }
                var done = e
                done.state = finalState
                occurrenceDone.append(done)
                if let url = p.callback, [.succeeded, .failed, .dead, .timedOut, .lost, .expired].contains(finalState) {
                    callbacks.append((e.id, url, Self.callbackPayload(done, task: p.name)))
                }
            }
            result.retried += try await retries.insert(state: "scheduled", c)
            if !dead.isEmpty {
                result.dead += try await c.query(
                    """
                    UPDATE runs SET state = 'dead', reason = u.reason, finished_at = coalesce(finished_at, now())
                    FROM unnest($1::uuid[], $2::text[]) AS u(id, reason) WHERE runs.id = u.id
                    """, [dead.map(\.0), dead.map(\.1)]
                ).affectedRows
            }
            if !callbacks.isEmpty {
                result.callbacks += try await c.query(
                    """
                    INSERT INTO callbacks (run_id, url, payload) SELECT * FROM unnest($1::uuid[], $2::text[],
                        $3::text[])
                    """, [callbacks.map(\.0), callbacks.map(\.1), callbacks.map(\.2)]
                ).affectedRows
            }
            let queueTasks = Array(Set(occurrenceDone.filter { policies[$0.task]?.overlap == "queue" }.map(\.task)))
            if !queueTasks.isEmpty {
                result.released += try await c.query(
                    """
                    UPDATE runs SET available_at = now()
                    WHERE task_id = ANY($1::uuid[]) AND state = 'scheduled' AND available_at = 'infinity'
                    """, [queueTasks]
                ).affectedRows
            }
            // A backfill run one at a time: the occurrence after the one that ended may start.
            let backfills = Array(Set(occurrenceDone.compactMap(\.backfill)))
            if !backfills.isEmpty {
                result.released += try await c.query(
                    """
                    UPDATE runs SET available_at = now()
                    WHERE id IN (SELECT DISTINCT ON (backfill_id) id FROM runs
                                 WHERE backfill_id = ANY($1::uuid[]) AND state = 'scheduled'
                                   AND available_at = 'infinity'
                                 ORDER BY backfill_id, occurrence)
                    """, [backfills]
                ).affectedRows
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
        try await c.query(
            """
            SELECT pg_advisory_xact_lock(hashtext('conveyor.wf:' || w::text)) FROM (SELECT w FROM unnest($1::uuid[]) \
            w ORDER BY w) s
            """,
            [workflows])
        var skipped: [Ended] = []
        var toRun = NewRuns()
        var toSkip = NewRuns()
        var decided: Set<String> = []
        for e in done {
            guard let wf = e.workflow else { continue }
            let deps = try await c.query(
                """
                SELECT t.id, t.trigger_rule, t.queue, t.shard, t.priority, t.concurrency_key, w.occurrence,
                       EXISTS (SELECT 1 FROM runs x WHERE x.workflow_run_id = $2 AND x.task_id = t.id)
                FROM task_dependencies d JOIN tasks t ON t.id = d.task_id JOIN workflow_runs w ON w.id = $2
                WHERE d.upstream_id = $1 AND t.deleted_at IS NULL
                """, [e.task, wf])
            for d in deps.rows {
                let depID = try d.uuid(0)
                guard !(try d.bool(7)), decided.insert("\(wf)/\(depID)").inserted else { continue }
                let ups = try await c.query(
                    """
                    SELECT u.name, (SELECT r.state FROM runs r WHERE r.workflow_run_id = $1 AND r.task_id =
                        d.upstream_id
                                    ORDER BY r.attempt DESC LIMIT 1)
                    FROM task_dependencies d JOIN tasks u ON u.id = d.upstream_id WHERE d.task_id = $2
                    """, [wf, depID])
                var finals: [RunState] = []
                var failedNames: [String] = []
                for u in ups.rows {
                    guard let st = u[1].flatMap(RunState.init(rawValue:)), st.isFinal else { continue }
                    finals.append(st)
                    if st != .succeeded { failedNames.append("\(try u.string(0)) ended \(st.rawValue)") }
                }
                let rule = (try? TriggerRule(parsing: try d.string(1))) ?? .allSuccess
                guard let run = rule.decide(final: finals, total: ups.rows.count) else { continue }
                let id = UUID()
                let reason =
                    run
                    ? nil
                    : (failedNames.isEmpty
                        ? "no upstream failed (trigger rule \(rule.rawValue))"
                        : "upstream \(failedNames.joined(separator: ", ")) (trigger rule \(rule.rawValue))")
                if run {
                    toRun.append(
                        id: id, task: depID, occurrence: try d.date(6), attempt: 1, queue: try d.string(2),
                        shard: try d.int(3),
                        delay: 0, priority: try d.int(4), key: d[5], workflow: wf, traceparent: e.traceparent,
                        baggage: e.baggage)
                } else {
                    toSkip.append(
                        id: id, task: depID, occurrence: try d.date(6), attempt: 1, queue: try d.string(2),
                        shard: try d.int(3),
                        delay: 0, priority: try d.int(4), key: d[5], workflow: wf, traceparent: e.traceparent,
                        baggage: e.baggage, reason: reason)
                    var s = e
                    s.id = id
                    s.task = depID
                    s.state = .skipped
                    s.attempt = 1
                    s.exitCode = nil
                    s.errorClass = nil
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
        // Receivers can find the run's trace by its id.
        if let id = Traceparent.traceID(e.traceparent) { fields["trace_id"] = .string(id) }
        let payload: JSONValue = .object(fields)
        return String(decoding: MessageCodec.encode(payload), as: UTF8.self)
    }
}
