import ConveyorCore
import ConveyorPostgres
import Foundation

extension Store {
    /// Step 2: ready runs by priority within each queue's room, rate limit and concurrency keys.
    static func claimReady(_ q: ClaimRequest, _ c: PostgresConnection) async throws -> ([ClaimedRun], Int) {
        let full = q.room.filter { $0.value <= 0 }.map(\.key)
        if q.defaultRoom <= 0 { return ([], 0) }
        // No join: the task's concurrency limit and namespace are looked up only for runs that
        // have a key. The limit is the room: candidates past it would be locked for nothing.
        let roomBound = max(q.defaultRoom, q.room.values.max() ?? 0)
        let candidates = try await c.query(
            """
            SELECT r.id, r.queue, r.concurrency_key,
                   CASE WHEN r.concurrency_key IS NOT NULL THEN (SELECT t.concurrency_limit FROM tasks t WHERE t.id =
                       r.task_id) END,
                   CASE WHEN r.concurrency_key IS NOT NULL THEN (SELECT t.namespace FROM tasks t WHERE t.id =
                       r.task_id) END
            FROM runs r
            WHERE r.state = 'scheduled' AND r.available_at <= now() AND r.shard >= $1::bigint AND r.shard < $2::bigint
                AND r.queue <> ALL($4::text[])
            ORDER BY r.priority, r.available_at
            LIMIT $3
            FOR UPDATE OF r SKIP LOCKED
            """, [q.shards.lower, q.shards.upper, min(q.limit, roomBound), full])
        guard !candidates.rows.isEmpty else { return ([], 0) }
        struct Candidate {
            var id: UUID
            var queue: String
            var key: ScopedKey?
            var limit: Int?
        }
        let list = try candidates.rows.map { r in
            Candidate(
                id: try r.uuid(0), queue: try r.string(1),
                key: r[2].map { ScopedKey(namespace: r[4] ?? "default", key: $0) }, limit: try r.optionalInt(3))
        }

        // Rate limits: refill the token buckets of the limited queues among the candidates (row
        // locks serialize dispatchers per queue). Most claims touch no limited queue and skip this.
        var tokens: [String: Double] = [:]
        var rates: [String: Double] = [:]
        let limited = Array(Set(list.map(\.queue)).intersection(q.rateLimited)).sorted()
        let buckets =
            limited.isEmpty
            ? []
            : try await c.query(
                """
                UPDATE queue_limits SET tokens = least(burst, tokens + extract(epoch FROM now() - refilled_at) *
                    rate_per_second),
                                        refilled_at = now()
                WHERE queue IN (SELECT queue FROM queue_limits WHERE queue = ANY($1::text[]) ORDER BY queue FOR UPDATE)
                RETURNING queue, tokens, rate_per_second
                """, [limited]
            ).rows
        for r in buckets {
            tokens[try r.string(0)] = try r.double(1)
            rates[try r.string(0)] = try r.double(2)
        }
        // Concurrency keys belong to a namespace: tenants that pick the same key name must not
        // hold each other's slots. One advisory lock per (namespace, key), taken in hash order
        // (the order of the locks themselves, so two claims never wait on each other in a cycle),
        // then a count of what is in flight. Runs carry no namespace: the count finds the key's
        // open runs by `runs_open_by_key` and keeps those whose task is in the namespace. Open
        // runs of one key name are few (each namespace's are held to its limits, and all of them
        // to the queues' backlog bound and the workers' capacity), so the join stays cheap.
        let keys = Array(Set(list.compactMap(\.key)))
        var inFlight: [ScopedKey: Int] = [:]
        if !keys.isEmpty {
            let namespaces = keys.map(\.namespace)
            let names = keys.map(\.key)
            try await c.query(
                """
                SELECT pg_advisory_xact_lock(h) FROM (
                    SELECT DISTINCT hashtext('conveyor.key:' || length(ns) || ':' || ns || ':' || k) AS h
                    FROM unnest($1::text[], $2::text[]) AS u(ns, k) ORDER BY h) s
                """, [namespaces, names])
            for r in try await c.query(
                """
                SELECT t.namespace, r.concurrency_key, count(*) FROM runs r JOIN tasks t ON t.id = r.task_id
                WHERE r.concurrency_key = ANY($2::text[]) AND r.state IN ('queued', 'dispatched', 'running')
                  AND (t.namespace, r.concurrency_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))
                GROUP BY 1, 2
                """, [namespaces, names]
            ).rows {
                inFlight[ScopedKey(namespace: try r.string(0), key: try r.string(1))] = try r.int(2)
            }
        }
        var room = q.room
        var accepted: [UUID] = []
        var heldKey: [UUID] = []
        var heldRate: [UUID: Double] = [:]
        var used: [String: Double] = [:]
        for cand in list {
            let queueRoom = room[cand.queue] ?? q.defaultRoom
            if queueRoom <= 0 { continue }
            if let t = tokens[cand.queue], t - used[cand.queue, default: 0] < 1 {
                heldRate[cand.id] = 1 / (rates[cand.queue] ?? 1)
                continue
            }
            if let k = cand.key, let limit = cand.limit, inFlight[k, default: 0] >= limit {
                heldKey.append(cand.id)
                continue
            }
            accepted.append(cand.id)
            room[cand.queue] = queueRoom - 1
            if tokens[cand.queue] != nil { used[cand.queue, default: 0] += 1 }
            if let k = cand.key { inFlight[k, default: 0] += 1 }
        }
        if !used.isEmpty {
            try await c.query(
                """
                UPDATE queue_limits SET tokens = tokens - u.used FROM unnest($1::text[], $2::float8[]) AS u(queue, used)
                WHERE queue_limits.queue = u.queue
                """, [Array(used.keys), Array(used.values)])
        }
        // Held back: they step aside briefly so that runs behind them are not starved; their
        // priority still orders them first among what is ready.
        let held = heldKey.map { ($0, 1.0) } + heldRate.map { ($0.key, min(max($0.value, 0.05), 5)) }
        if !held.isEmpty {
            try await c.query(
                """
                UPDATE runs SET available_at = now() + make_interval(secs => u.delay)
                FROM unnest($1::uuid[], $2::float8[]) AS u(id, delay) WHERE runs.id = u.id
                """, [held.map(\.0), held.map(\.1)])
        }
        guard !accepted.isEmpty else { return ([], held.count) }
        let rows = try await c.query(
            """
            UPDATE runs r SET state = 'queued', available_at = now() + make_interval(secs => $2), publish_count =
                r.publish_count + 1
            FROM tasks t
            WHERE t.id = r.task_id AND r.id = ANY($1::uuid[])
            RETURNING \(messageColumns)
            """, [accepted, q.lease.inSeconds])
        // RETURNING comes in the table's order: published in the claim's (priority, then due
        // time), a batch reaches the broker, and so the workers, in that order too.
        let position = Dictionary(uniqueKeysWithValues: accepted.enumerated().map { ($1, $0) })
        let runs = try rows.rows.map { try claimed($0, q) }.sorted {
            position[$0.message.runID, default: 0] < position[$1.message.runID, default: 0]
        }
        return (runs, held.count)
    }

    /// Step 3: the outbox. Runs left `queued` past their lease are published again.
    static func claimExpiredLeases(_ q: ClaimRequest, room: Int, _ c: PostgresConnection) async throws -> [ClaimedRun] {
        try await c.query(
            """
            UPDATE runs r SET available_at = now() + make_interval(secs => $4), publish_count = r.publish_count + 1
            FROM tasks t
            WHERE t.id = r.task_id AND r.id IN (
                SELECT id FROM runs WHERE state = 'queued' AND available_at <= now() AND shard >= $1::bigint AND shard
                    < $2::bigint
                ORDER BY available_at LIMIT $3 FOR UPDATE SKIP LOCKED)
            RETURNING \(messageColumns)
            """, [q.shards.lower, q.shards.upper, room, q.lease.inSeconds]
        ).rows.map { try claimed($0, q) }
    }

    /// What a claimed run's task message is made of, in select-list order (runs as `r`, tasks as `t`).
    enum MessageColumn: Int, RowColumn {
        case runID, taskID, taskName, executor, parameters, queue, timeoutSeconds, occurrence, attempt, traceparent
        case priority, baggage, scheduleToStart, startBy, inputs

        func sql(alias _: String) -> String {
            switch self {
            case .runID: "r.id"
            case .taskID: "r.task_id"
            case .taskName: "t.name"
            case .executor: "t.executor"
            case .parameters: "t.parameters::text"
            case .queue: "r.queue"
            case .timeoutSeconds: "t.timeout_seconds"
            case .occurrence: "r.occurrence"
            case .attempt: "r.attempt"
            case .traceparent: "r.traceparent"
            case .priority: "r.priority"
            case .baggage: "r.baggage"
            case .scheduleToStart: "t.schedule_to_start_seconds"
            // On the database's clock, as every deadline is (a dispatcher's clock may be off).
            case .startBy: "now() + make_interval(secs => t.schedule_to_start_seconds)"
            // A dependent's upstream results in its workflow run (the latest attempt of each that
            // returned one), by upstream name; only runs of a workflow pay for the lookup.
            case .inputs:
                """
                CASE WHEN r.workflow_run_id IS NOT NULL THEN (
                    SELECT jsonb_object_agg(u.name, x.result)::text
                    FROM task_dependencies d JOIN tasks u ON u.id = d.upstream_id
                    JOIN LATERAL (SELECT y.result FROM runs y WHERE y.task_id = d.upstream_id
                                    AND y.workflow_run_id = r.workflow_run_id AND y.result IS NOT NULL
                                  ORDER BY y.attempt DESC LIMIT 1) x ON true
                    WHERE d.task_id = r.task_id) END
                """
            }
        }
    }

    static let messageColumns = MessageColumn.selectList()

    static func claimed(_ r: PostgresRow, _ q: ClaimRequest) throws -> ClaimedRun {
        typealias C = MessageColumn
        return try claimedRun(
            runID: try r.uuid(C.runID), taskID: try r.uuid(C.taskID), name: try r.string(C.taskName),
            occurrence: try r.date(C.occurrence), attempt: try r.int(C.attempt), queue: try r.string(C.queue),
            executor: try r.string(C.executor), parameters: try r.string(C.parameters),
            timeoutSeconds: try r.double(C.timeoutSeconds), startBy: try r.date(C.startBy), inputs: r[C.inputs],
            traceparent: r[C.traceparent] ?? q.newTraceParent(nil), baggage: r[C.baggage],
            priority: try r.int(C.priority), scheduleToStartSeconds: try r.double(C.scheduleToStart))
    }

    /// A claimed run and its task message, from the fields of its run and task: the one builder of
    /// both paths that make runs `queued` (`claimed` from a run's row, `directRun` from a due task's),
    /// so that a message field is never added to one and missed in the other.
    static func claimedRun(
        runID: UUID, taskID: UUID, name: String, occurrence: Date, attempt: Int, queue: String, executor: String,
        parameters: String, timeoutSeconds: Double, startBy: Date, inputs: String?, traceparent: String,
        baggage: String?, priority: Int, scheduleToStartSeconds: Double
    ) throws -> ClaimedRun {
        var m = TaskMessage(
            runID: runID, taskID: taskID, taskName: name, occurrence: occurrence, attempt: attempt, queue: queue,
            executor: executor, parameters: try json(parameters), timeoutSeconds: timeoutSeconds)
        m.startBy = startBy
        m.inputs = TaskMessage.bounded(inputs: try inputs.map(json))
        return ClaimedRun(
            message: m, traceparent: traceparent, baggage: baggage, priority: Priority(rawValue: priority) ?? .normal,
            scheduleToStartSeconds: scheduleToStartSeconds)
    }
}
