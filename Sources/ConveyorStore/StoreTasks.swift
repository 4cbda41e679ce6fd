import ConveyorCore
import ConveyorPostgres
package import Foundation

extension Store {
    /// A task that was not created because another holds its uniqueness key: the holder.
    package struct Holder: Sendable, Equatable {
        package var id: UUID
        package var name: String
    }

    /// Inserts tasks in one transaction. Fails with a unique violation if a name exists, and with
    /// a `ValidationError` for a bad field, an unknown upstream, a cycle or a DAG with two roots.
    /// Throws `StoreError` `.taskExists` when a name is taken in its namespace (checked by the
    /// unique index, so concurrent requests cannot both create it).
    ///
    /// A task whose uniqueness key another task holds is not created; the answer maps its index
    /// in `tasks` to the holder (a task already there, or an earlier one of `tasks` with the same
    /// key). The key is claimed by the primary key of `task_unique_keys`, so concurrent requests
    /// with one key create one task.
    @discardableResult
    package func createTasks(_ tasks: [NewTask]) async throws -> [Int: Holder] {
        for t in tasks { try t.validate() }
        guard !tasks.isEmpty else { return [:] }
        do {
            return try await insertTasks(tasks)
        } catch let e as PostgresError where e.isUniqueViolation {
            throw StoreError(
                kind: .taskExists,
                message: "a task of one of these names exists: \(tasks.map(\.name).joined(separator: ", "))")
        }
    }

    private func insertTasks(_ all: [NewTask]) async throws -> [Int: Holder] {
        try await pool.withTransaction { c in
            let held = try await Self.claimUniqueKeys(all, c)
            let tasks = all.indices.filter { held[$0] == nil }.map { all[$0] }
            guard !tasks.isEmpty else { return held }
            let now = try await c.query("SELECT now()").rows[0].date(0)
            let edges = try await Self.resolveDependencies(tasks, connection: c)
            var nextTimes: [Date?] = []
            for t in tasks { nextTimes.append(try Self.firstDue(t, now: now)) }
            try await c.query(
                """
                INSERT INTO tasks (id, namespace, name, executor, parameters, schedule, queue, timeout_seconds,
                    next_run_at, anchor_at,
                                   shard, trace_parent, timezone, misfire_policy, max_catchup, priority, max_attempts,
                                       retry_policy,
                                   overlap_policy, concurrency_key, concurrency_limit, group_name, labels,
                                       trigger_rule, callback_url, paused,
                                   spec, batch_id, trace_baggage, schedule_to_start_seconds, next_run_id)
                SELECT u.id, u.ns, u.name, u.executor, u.params::jsonb, u.schedule, u.queue, u.timeout, u.next, u.next,
                       hashtext(u.id::text) & 2147483647, u.tp, u.tz, u.misfire, u.catchup, u.prio, u.attempts,
                           u.retry::jsonb,
                       u.overlap, u.ckey, u.climit, u.grp, u.labels::jsonb, u.rule, u.cb, u.paused, u.spec::jsonb,
                           u.batch, u.baggage, u.s2s,
                       CASE WHEN u.next IS NOT NULL THEN gen_random_uuid() END
                FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                    $8::float8[],
                            $9::timestamptz[], $10::text[], $11::text[], $12::text[], $13::int[], $14::smallint[],
                                $15::int[],
                            $16::text[], $17::text[], $18::text[], $19::int[], $20::text[], $21::text[], $22::text[],
                                $23::text[], $24::bool[],
                            $25::text[], $26::uuid[], $27::text[], $28::float8[])
                     AS u(id, ns, name, executor, params, schedule, queue, timeout, next, tp, tz, misfire, catchup,
                         prio, attempts,
                          retry, overlap, ckey, climit, grp, labels, rule, cb, paused, spec, batch, baggage, s2s)
                """,
                [
                    tasks.map(\.id), tasks.map(\.namespace), tasks.map(\.name), tasks.map(\.executor),
                    tasks.map { String(decoding: MessageCodec.encode($0.parameters), as: UTF8.self) },
                    tasks.map(\.schedule.text), tasks.map(\.queue), tasks.map(\.timeoutSeconds), nextTimes,
                    tasks.map(\.traceParent),
                    tasks.map(\.timeZone), tasks.map(\.misfire.rawValue), tasks.map(\.maxCatchup),
                    tasks.map(\.priority.rawValue),
                    tasks.map(\.retry.maxAttempts),
                    tasks.map { String(decoding: MessageCodec.encode($0.retry.json), as: UTF8.self) },
                    tasks.map(\.overlap.rawValue), tasks.map(\.concurrencyKey), tasks.map(\.concurrencyLimit),
                    tasks.map(\.group),
                    tasks.map {
                        String(
                            decoding: MessageCodec.encode(.object($0.labels.mapValues(JSONValue.string))), as: UTF8.self
                        )
                    },
                    tasks.map(\.triggerRule.rawValue), tasks.map(\.callbackURL), tasks.map(\.paused),
                    tasks.map { String(decoding: MessageCodec.encode(TaskSpec.encode($0)), as: UTF8.self) },
                    tasks.map(\.batchID),
                    tasks.map(\.traceBaggage), tasks.map(\.scheduleToStartSeconds),
                ])
            if !edges.isEmpty {
                try await c.query(
                    """
                    INSERT INTO task_dependencies (task_id, upstream_id) SELECT * FROM unnest($1::uuid[], $2::uuid[])
                    """, [edges.map(\.task), edges.map(\.upstream)])
            }
            return held
        }
    }

    /// Claims the uniqueness keys of `tasks` (all of one namespace) in the caller's transaction;
    /// returns the tasks that must not be created, by index, with the holder of their key.
    ///
    /// A key is free when nobody holds it, when its `window` has passed, or (scope `active`) when
    /// its holder is no longer active: deleted, or a one-off task with nothing due and no run
    /// open. Three statements, because whether a holder is active must be judged on a snapshot
    /// taken after the holder committed: (1) insert the keys nobody holds (a concurrent insert of
    /// the same key waits for the first and then conflicts); (2) lock the rows of the others;
    /// (3) with them locked, a new statement (a new snapshot in READ COMMITTED, which sees every
    /// holder that committed before the lock was granted) takes over those that are free. One
    /// `INSERT … ON CONFLICT DO UPDATE WHERE <holder inactive>` is not enough: its subquery reads
    /// the statement's snapshot, from before the racing holder committed, and judged it absent
    /// (16 concurrent submitters made 13 tasks for 10 keys).
    static func claimUniqueKeys(_ tasks: [NewTask], _ c: PostgresConnection) async throws -> [Int: Holder] {
        var firstWithKey: [String: Int] = [:]
        var sameAsEarlier: [Int: Int] = [:]
        for (i, t) in tasks.enumerated() {
            guard let key = t.uniqueKey else { continue }
            if let j = firstWithKey[key] { sameAsEarlier[i] = j } else { firstWithKey[key] = i }
        }
        guard !firstWithKey.isEmpty else { return [:] }
        let namespace = tasks[0].namespace
        // In key order, so two batches sharing keys lock them in the same order.
        var open = firstWithKey.sorted { $0.key < $1.key }.map(\.value)
        var won: Set<UUID> = []
        for _ in 0..<3 where !open.isEmpty {
            won.formUnion(
                try await c.query(
                    """
                    INSERT INTO task_unique_keys (namespace, key, task_id, scope, expires_at)
                    SELECT $1, u.key, u.task, CASE WHEN u.secs IS NULL THEN 'active' ELSE 'window' END,
                           now() + make_interval(secs => u.secs)
                    FROM unnest($2::text[], $3::uuid[], $4::float8[]) AS u(key, task, secs)
                    ON CONFLICT (namespace, key) DO NOTHING
                    RETURNING task_id
                    """,
                    [
                        namespace, open.map { tasks[$0].uniqueKey! }, open.map { tasks[$0].id },
                        open.map { tasks[$0].uniqueWindowSeconds },
                    ]
                ).rows.map { try $0.uuid(0) })
            open = open.filter { !won.contains(tasks[$0].id) }
            guard !open.isEmpty else { break }
            let locked = Set(
                try await c.query(
                    """
                    SELECT key FROM task_unique_keys WHERE namespace = $1 AND key = ANY($2::text[])
                    ORDER BY key FOR UPDATE
                    """, [namespace, open.map { tasks[$0].uniqueKey! }]
                ).rows.map { try $0.string(0) })
            // A row gone between the two statements (its holder was purged): insert again.
            let gone = open.filter { !locked.contains(tasks[$0].uniqueKey!) }
            let present = open.filter { locked.contains(tasks[$0].uniqueKey!) }
            if !present.isEmpty {
                won.formUnion(
                    try await c.query(
                        """
                        UPDATE task_unique_keys k
                        SET task_id = u.task, scope = CASE WHEN u.secs IS NULL THEN 'active' ELSE 'window' END,
                            expires_at = now() + make_interval(secs => u.secs), created_at = now()
                        FROM unnest($2::text[], $3::uuid[], $4::float8[]) AS u(key, task, secs)
                        WHERE k.namespace = $1 AND k.key = u.key
                          AND CASE k.scope WHEN 'window' THEN k.expires_at <= now()
                              ELSE NOT EXISTS (
                                  SELECT 1 FROM tasks t WHERE t.id = k.task_id AND t.deleted_at IS NULL
                                    AND (t.schedule <> 'once' OR t.next_run_at IS NOT NULL
                                         OR EXISTS (SELECT 1 FROM runs r WHERE r.task_id = t.id
                                                    AND r.state IN ('scheduled', 'queued', 'dispatched', 'running'))))
                              END
                        RETURNING u.task
                        """,
                        [
                            namespace, present.map { tasks[$0].uniqueKey! }, present.map { tasks[$0].id },
                            present.map { tasks[$0].uniqueWindowSeconds },
                        ]
                    ).rows.map { try $0.uuid(0) })
            }
            open = gone
        }
        let lost = firstWithKey.values.filter { !won.contains(tasks[$0].id) }
        var holderOfKey: [String: Holder] = [:]
        if !lost.isEmpty {
            for r in try await c.query(
                """
                SELECT k.key, t.id, t.name FROM task_unique_keys k JOIN tasks t ON t.id = k.task_id
                WHERE k.namespace = $1 AND k.key = ANY($2::text[])
                """, [namespace, lost.map { tasks[$0].uniqueKey! }]
            ).rows {
                holderOfKey[try r.string(0)] = Holder(id: try r.uuid(1), name: try r.string(2))
            }
        }
        var held: [Int: Holder] = [:]
        for i in lost {
            guard let h = holderOfKey[tasks[i].uniqueKey!] else {
                throw PostgresError(
                    code: .query, sqlState: "40001",
                    message: "the holder of unique key '\(tasks[i].uniqueKey!)' went away while it was claimed; retry")
            }
            held[i] = h
        }
        for (i, j) in sameAsEarlier {
            held[i] = held[j] ?? Holder(id: tasks[j].id, name: tasks[j].name)
        }
        return held
    }

    /// When a new (or re-scheduled) task first comes due: `nil` for manual tasks.
    static func firstDue(_ t: NewTask, now: Date) throws(ValidationError) -> Date? {
        switch t.schedule {
        case .manual: return nil
        case .once, .interval: return t.startAt ?? now
        case .cron(let cron):
            let zone = TimeZone(identifier: t.timeZone) ?? TimeZone(identifier: "UTC")!
            guard let first = cron.next(after: (t.startAt ?? now).addingTimeInterval(-0.001), in: zone) else {
                throw ValidationError(
                    field: "schedule", value: t.schedule.text,
                    hint: "this expression never fires after \(Timestamp.format(t.startAt ?? now))")
            }
            return first
        }
    }

    /// Upstream names → ids (from the batch or existing tasks of the namespace); refuses unknown
    /// upstreams, cycles, and a DAG with more than one root (a workflow run starts at one task).
    static func resolveDependencies(_ tasks: [NewTask], connection c: PostgresConnection) async throws -> [(
        task: UUID, upstream: UUID
    )] {
        guard tasks.contains(where: { !$0.dependsOn.isEmpty }) else { return [] }
        let namespace = tasks[0].namespace
        var idByName: [String: UUID] = [:]
        var graph = DependencyGraph<UUID>()
        var nameByID: [UUID: String] = [:]
        for r in try await c.query(
            "SELECT id, name FROM tasks WHERE namespace = $1 AND deleted_at IS NULL", [namespace]
        ).rows {
            idByName[try r.string(1)] = try r.uuid(0)
            nameByID[try r.uuid(0)] = try r.string(1)
        }
        for r in try await c.query(
            """
            SELECT d.task_id, d.upstream_id FROM task_dependencies d JOIN tasks t ON t.id = d.task_id
            WHERE t.namespace = $1 AND t.deleted_at IS NULL
            """, [namespace]
        ).rows {
            graph.add(try r.uuid(0), dependsOn: try r.uuid(1))
        }
        for t in tasks {
            idByName[t.name] = t.id
            nameByID[t.id] = t.name
        }
        var edges: [(task: UUID, upstream: UUID)] = []
        for t in tasks {
            for u in t.dependsOn {
                guard let uid = idByName[u] else {
                    throw ValidationError(
                        field: "depends_on", value: u,
                        hint: "no task named '\(u)' in namespace '\(namespace)'; create it first or in the same file")
                }
                graph.add(t.id, dependsOn: uid)
                edges.append((t.id, uid))
            }
        }
        for t in tasks {
            if let cycle = graph.cycle(from: t.id) {
                let names = cycle.reversed().map { nameByID[$0] ?? $0.uuidString }
                throw ValidationError(
                    field: "depends_on", value: t.name,
                    hint: "dependencies form a cycle: \(names.joined(separator: " → ")); remove one edge")
            }
        }
        for t in tasks where !t.dependsOn.isEmpty {
            let roots = graph.roots(of: t.id).compactMap { nameByID[$0] }.sorted()
            if roots.count > 1 {
                throw ValidationError(
                    field: "depends_on", value: t.dependsOn.joined(separator: ","),
                    hint: "these upstreams start from different root tasks (\(roots.joined(separator: ", "))); "
                        + "a workflow has one root task")
            }
        }
        return edges
    }

    package func task(named name: String, namespace: String = "default") async throws -> TaskRecord? {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.taskColumns) FROM tasks t WHERE t.namespace = $1 AND t.name = $2 AND t.deleted_at IS NULL
                """, [namespace, name]
            ).rows.first.map(Self.task)
        }
    }

    /// Makes a task due now; dispatchers are woken through NOTIFY. `traceParent`, the context of
    /// the request that triggered it, becomes the parent of the next occurrence's dispatch span;
    /// `baggage` travels with it.
    @discardableResult
    /// Makes the task due now; returns its run handle (the id its next run will have) and the
    /// occurrence, or nil if the task is gone. A task already due and not yet dispatched keeps
    /// its handle: two triggers before a dispatcher's scan make one run, and both get its id.
    package func trigger(taskID: UUID, traceParent: String? = nil, baggage: String? = nil) async throws -> (
        runID: UUID, occurrence: Date
    )? {
        try await pool.withConnection { c in
            try await c.query(
                """
                UPDATE tasks SET next_run_id = CASE WHEN next_run_at <= now() AND next_run_id IS NOT NULL
                                                     THEN next_run_id ELSE gen_random_uuid() END,
                                 next_run_at = now(), updated_at = now(), trace_parent = $2, trace_baggage = $3
                WHERE id = $1 AND deleted_at IS NULL
                RETURNING next_run_id, next_run_at
                """, [taskID, traceParent, baggage]
            ).rows.first.map { (try $0.uuid(0), try $0.date(1)) }
        }
    }

    /// The task whose next run has this handle (not made yet), with that run's due time.
    package func pendingRun(id: UUID) async throws -> (task: TaskRecord, occurrence: Date)? {
        try await pool.withConnection { c in
            try await c.query(
                "SELECT \(Self.taskColumns) FROM tasks t WHERE t.next_run_id = $1 AND t.deleted_at IS NULL", [id]
            ).rows.first.map { r in
                let t = try Self.task(r)
                return (t, t.nextRunAt ?? Date())
            }
        }
    }
}
