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
    /// IANA time zone of a cron schedule.
    public var timeZone = "UTC"
    public var misfire: MisfirePolicy = .once
    /// Most missed occurrences run by misfire policy `all` (and per catch-up otherwise).
    public var maxCatchup = 10
    public var queue = "default"
    public var priority: Priority = .normal
    public var timeoutSeconds: Double = 300
    public var retry = RetryPolicy()
    public var overlap: OverlapPolicy = .allow
    /// At most `concurrencyLimit` runs in flight per key, across dispatchers.
    public var concurrencyKey: String?
    public var concurrencyLimit: Int?
    public var group: String?
    public var labels: [String: String] = [:]
    /// Names of upstream tasks (same namespace); a dependent runs per `triggerRule`.
    public var dependsOn: [String] = []
    public var triggerRule: TriggerRule = .allSuccess
    /// Notified with a POST of the outcome (succeeded, failed, dead).
    public var callbackURL: String?
    public var paused = false
    /// First due time; `nil` means now (the database clock), or for cron the first fire after now.
    public var startAt: Date?
    /// The context of the request that created the task: the parent of its first dispatch span.
    public var traceParent: String?
    /// That request's W3C `baggage`, carried by the first occurrence's messages.
    public var traceBaggage: String?
    /// Shared by the tasks of one API batch (`X-Batch-ID`).
    public var batchID: UUID?

    public init(name: String, executor: String, schedule: Schedule) {
        self.name = name
        self.executor = executor
        self.schedule = schedule
    }

    /// Largest `parameters` (encoded JSON): they are copied into every run's message.
    public static let maxParameterBytes = 64 * 1024

    /// Checks the fields a database constraint would otherwise reject with a less helpful message.
    public func validate() throws(ValidationError) {
        guard !name.isEmpty, name.count <= 200, name.allSatisfy({ !$0.isWhitespace && !$0.isNewline }) else {
            throw ValidationError(field: "name", value: name, hint: "1 to 200 characters, no spaces")
        }
        guard !executor.isEmpty, executor.count <= 100, executor.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }) else {
            throw ValidationError(
                field: "executor", value: executor, hint: "name an executor that your workers offer, e.g. 'noop' (letters, digits, '-', '_', '.'; at most 100)")
        }
        let parameterBytes = MessageCodec.encode(parameters).count
        guard parameterBytes <= Self.maxParameterBytes else {
            throw ValidationError(
                field: "parameters", value: "\(parameterBytes) bytes",
                hint: "at most \(Self.maxParameterBytes) bytes of JSON travel in each task message; store large inputs elsewhere and pass a reference")
        }
        guard QueueName.isValid(queue) else {
            throw ValidationError(field: "queue", value: queue, hint: QueueName.hint)
        }
        guard timeoutSeconds > 0, timeoutSeconds.isFinite else {
            throw ValidationError(field: "timeout", value: String(timeoutSeconds), hint: "a positive number of seconds")
        }
        guard TimeZone(identifier: timeZone) != nil else {
            throw ValidationError(field: "timezone", value: timeZone, hint: "an IANA time zone such as UTC, Europe/London or America/New_York")
        }
        guard (1...10_000).contains(maxCatchup) else {
            throw ValidationError(field: "max_catchup", value: String(maxCatchup), hint: "a whole number from 1 to 10000")
        }
        if concurrencyKey != nil || concurrencyLimit != nil {
            guard let k = concurrencyKey, !k.isEmpty, k.count <= 200 else {
                throw ValidationError(field: "concurrency_key", value: concurrencyKey ?? "", hint: "1 to 200 characters, given together with concurrency_limit")
            }
            guard let n = concurrencyLimit, n >= 1 else {
                throw ValidationError(
                    field: "concurrency_limit", value: concurrencyLimit.map(String.init) ?? "(missing)",
                    hint: "a whole number of at least 1, given together with concurrency_key '\(k)'")
            }
        }
        if let g = group, g.isEmpty || g.count > 200 {
            throw ValidationError(field: "group", value: g, hint: "1 to 200 characters")
        }
        if let u = callbackURL {
            guard let url = URL(string: u), ["http", "https"].contains(url.scheme?.lowercased() ?? ""), url.host != nil else {
                throw ValidationError(field: "callback_url", value: u, hint: "an absolute http or https URL")
            }
        }
        if !dependsOn.isEmpty {
            if dependsOn.contains(name) {
                throw ValidationError(field: "depends_on", value: name, hint: "a task cannot depend on itself")
            }
            if Set(dependsOn).count != dependsOn.count {
                let dup = dependsOn.first { d in dependsOn.filter { $0 == d }.count > 1 }!
                throw ValidationError(field: "depends_on", value: dup, hint: "listed twice; name each upstream once")
            }
            if case .manual = schedule {
            } else {
                throw ValidationError(
                    field: "schedule", value: schedule.text,
                    hint: "a task with depends_on runs when its upstreams end; give it schedule 'manual'")
            }
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
    public var timeZone: String
    public var misfire: String
    public var priority: Priority
    public var overlap: String
    public var maxAttempts: Int
    public var retryPolicy: String
    public var group: String?
    public var concurrencyKey: String?
    public var concurrencyLimit: Int?
    public var skippedOccurrences: Int
    public var dependsOn: [String]
    public var triggerRule: String
    public var callbackURL: String?
    public var namespace = "default"
    public var labels: [String: String] = [:]
    public var batchID: UUID?
    /// The definition as submitted (`TaskSpec.encode`), which PATCH merges into.
    public var spec = "{}"
    public var createdAt: Date?
    public var updatedAt: Date?
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
    public var reason: String?
    public var priority: Priority
    public var workflowRunID: UUID?
    public var availableAt: Date?
}

/// The SQL of tasks, runs and workers. Every statement uses bound parameters; hot paths take
/// whole batches through `unnest` arrays, one statement per batch.
public struct Store: Sendable {
    public let pool: PostgresPool

    public init(pool: PostgresPool) { self.pool = pool }

    // MARK: tasks

    /// The dispatchers' shared secret for status proofs (migration 0008), 32 bytes.
    public func statusKey() async throws -> [UInt8] {
        let hex = try await pool.withConnection { c in
            try await c.query("SELECT encode(secret, 'hex') FROM status_keys WHERE id = 1").rows.first.map { try $0.string(0) }
        }
        let missing = ValidationError(
            field: "status_keys", value: hex ?? "(no row)",
            hint: "run `conveyor migrate`: migration 0008 creates the dispatchers' status key")
        guard let hex, hex.utf8.count == 64 else { throw missing }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(32)
        var i = hex.startIndex
        while i < hex.endIndex {
            let j = hex.index(i, offsetBy: 2)
            guard let b = UInt8(hex[i..<j], radix: 16) else { throw missing }
            bytes.append(b)
            i = j
        }
        return bytes
    }

    /// Inserts tasks in one transaction. Fails with a unique violation if a name exists, and with
    /// a `ValidationError` for a bad field, an unknown upstream, a cycle or a DAG with two roots.
    /// Throws `StoreError` `.taskExists` when a name is taken in its namespace (checked by the
    /// unique index, so concurrent requests cannot both create it).
    public func createTasks(_ tasks: [NewTask]) async throws {
        for t in tasks { try t.validate() }
        guard !tasks.isEmpty else { return }
        do {
            try await insertTasks(tasks)
        } catch let e as PostgresError where e.isUniqueViolation {
            throw StoreError(kind: .taskExists, message: "a task of one of these names exists: \(tasks.map(\.name).joined(separator: ", "))")
        }
    }

    /// Whether the database answers (a round trip on a pooled connection).
    public func ping() async throws {
        _ = try await pool.withConnection { c in try await c.query("SELECT 1") }
    }

    private func insertTasks(_ tasks: [NewTask]) async throws {
        try await pool.withTransaction { c in
            let now = try await c.query("SELECT now()").rows[0].date(0)
            let edges = try await Self.resolveDependencies(tasks, connection: c)
            var nextTimes: [Date?] = []
            for t in tasks { nextTimes.append(try Self.firstDue(t, now: now)) }
            try await c.query(
                """
                INSERT INTO tasks (id, namespace, name, executor, parameters, schedule, queue, timeout_seconds, next_run_at, anchor_at,
                                   shard, trace_parent, timezone, misfire_policy, max_catchup, priority, max_attempts, retry_policy,
                                   overlap_policy, concurrency_key, concurrency_limit, group_name, labels, trigger_rule, callback_url, paused,
                                   spec, batch_id, trace_baggage)
                SELECT u.id, u.ns, u.name, u.executor, u.params::jsonb, u.schedule, u.queue, u.timeout, u.next, u.next,
                       hashtext(u.id::text) & 2147483647, u.tp, u.tz, u.misfire, u.catchup, u.prio, u.attempts, u.retry::jsonb,
                       u.overlap, u.ckey, u.climit, u.grp, u.labels::jsonb, u.rule, u.cb, u.paused, u.spec::jsonb, u.batch, u.baggage
                FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::float8[],
                            $9::timestamptz[], $10::text[], $11::text[], $12::text[], $13::int[], $14::smallint[], $15::int[],
                            $16::text[], $17::text[], $18::text[], $19::int[], $20::text[], $21::text[], $22::text[], $23::text[], $24::bool[],
                            $25::text[], $26::uuid[], $27::text[])
                     AS u(id, ns, name, executor, params, schedule, queue, timeout, next, tp, tz, misfire, catchup, prio, attempts,
                          retry, overlap, ckey, climit, grp, labels, rule, cb, paused, spec, batch, baggage)
                """,
                [
                    tasks.map(\.id), tasks.map(\.namespace), tasks.map(\.name), tasks.map(\.executor),
                    tasks.map { String(decoding: MessageCodec.encode($0.parameters), as: UTF8.self) },
                    tasks.map(\.schedule.text), tasks.map(\.queue), tasks.map(\.timeoutSeconds), nextTimes, tasks.map(\.traceParent),
                    tasks.map(\.timeZone), tasks.map(\.misfire.rawValue), tasks.map(\.maxCatchup), tasks.map(\.priority.rawValue),
                    tasks.map(\.retry.maxAttempts), tasks.map { String(decoding: MessageCodec.encode($0.retry.json), as: UTF8.self) },
                    tasks.map(\.overlap.rawValue), tasks.map(\.concurrencyKey), tasks.map(\.concurrencyLimit), tasks.map(\.group),
                    tasks.map { String(decoding: MessageCodec.encode(.object($0.labels.mapValues(JSONValue.string))), as: UTF8.self) },
                    tasks.map(\.triggerRule.rawValue), tasks.map(\.callbackURL), tasks.map(\.paused),
                    tasks.map { String(decoding: MessageCodec.encode(TaskSpec.encode($0)), as: UTF8.self) }, tasks.map(\.batchID),
                    tasks.map(\.traceBaggage),
                ])
            if !edges.isEmpty {
                try await c.query(
                    """
                    INSERT INTO task_dependencies (task_id, upstream_id) SELECT * FROM unnest($1::uuid[], $2::uuid[])
                    """, [edges.map(\.task), edges.map(\.upstream)])
            }
        }
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
                    field: "schedule", value: t.schedule.text, hint: "this expression never fires after \(Timestamp.format(t.startAt ?? now))")
            }
            return first
        }
    }

    /// Upstream names → ids (from the batch or existing tasks of the namespace); refuses unknown
    /// upstreams, cycles, and a DAG with more than one root (a workflow run starts at one task).
    static func resolveDependencies(_ tasks: [NewTask], connection c: PostgresConnection) async throws -> [(task: UUID, upstream: UUID)] {
        guard tasks.contains(where: { !$0.dependsOn.isEmpty }) else { return [] }
        let namespace = tasks[0].namespace
        var idByName: [String: UUID] = [:]
        var upstreams: [UUID: [UUID]] = [:]
        var nameByID: [UUID: String] = [:]
        for r in try await c.query("SELECT id, name FROM tasks WHERE namespace = $1 AND deleted_at IS NULL", [namespace]).rows {
            idByName[try r.string(1)] = try r.uuid(0)
            nameByID[try r.uuid(0)] = try r.string(1)
        }
        for r in try await c.query(
            """
            SELECT d.task_id, d.upstream_id FROM task_dependencies d JOIN tasks t ON t.id = d.task_id
            WHERE t.namespace = $1 AND t.deleted_at IS NULL
            """, [namespace]
        ).rows {
            upstreams[try r.uuid(0), default: []].append(try r.uuid(1))
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
                        field: "depends_on", value: u, hint: "no task named '\(u)' in namespace '\(namespace)'; create it first or in the same file")
                }
                upstreams[t.id, default: []].append(uid)
                edges.append((t.id, uid))
            }
        }
        // Cycles: depth-first search from each new task, naming the cycle found.
        func findCycle(_ start: UUID) -> [UUID]? {
            var path: [UUID] = []
            var onPath: Set<UUID> = []
            var done: Set<UUID> = []
            func visit(_ n: UUID) -> [UUID]? {
                if onPath.contains(n) { return Array(path[path.firstIndex(of: n)!...]) + [n] }
                if done.contains(n) { return nil }
                path.append(n)
                onPath.insert(n)
                for u in upstreams[n] ?? [] { if let c = visit(u) { return c } }
                path.removeLast()
                onPath.remove(n)
                done.insert(n)
                return nil
            }
            return visit(start)
        }
        for t in tasks {
            if let cycle = findCycle(t.id) {
                let names = cycle.reversed().map { nameByID[$0] ?? $0.uuidString }
                throw ValidationError(field: "depends_on", value: t.name, hint: "dependencies form a cycle: \(names.joined(separator: " → ")); remove one edge")
            }
        }
        func roots(_ n: UUID) -> Set<UUID> {
            let ups = upstreams[n] ?? []
            return ups.isEmpty ? [n] : ups.reduce(into: Set<UUID>()) { $0.formUnion(roots($1)) }
        }
        for t in tasks where !t.dependsOn.isEmpty {
            let r = roots(t.id)
            if r.count > 1 {
                throw ValidationError(
                    field: "depends_on", value: t.dependsOn.joined(separator: ","),
                    hint:
                        "these upstreams start from different root tasks (\(r.compactMap { nameByID[$0] }.sorted().joined(separator: ", "))); a workflow has one root task"
                )
            }
        }
        return edges
    }

    static let taskColumns = """
        t.id, t.name, t.executor, t.parameters::text, t.schedule, t.queue, t.timeout_seconds, t.paused, t.next_run_at,
        t.timezone, t.misfire_policy, t.priority, t.overlap_policy, t.max_attempts, t.retry_policy::text, t.group_name,
        t.concurrency_key, t.concurrency_limit, t.skipped_occurrences, t.trigger_rule, t.callback_url,
        coalesce((SELECT array_agg(u.name ORDER BY u.name) FROM task_dependencies d JOIN tasks u ON u.id = d.upstream_id
                  WHERE d.task_id = t.id), '{}')::text,
        t.namespace, t.labels::text, t.batch_id, coalesce(t.spec, '{}'::jsonb)::text, t.created_at, t.updated_at
        """

    public func tasks(limit: Int = 100, group: String? = nil) async throws -> [TaskRecord] {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.taskColumns)
                FROM tasks t WHERE t.deleted_at IS NULL AND ($2::text IS NULL OR t.group_name = $2) ORDER BY t.name LIMIT $1
                """, [limit, group]
            ).rows.map(Self.task)
        }
    }

    /// One page of a namespace's tasks by name, after `after` (the cursor); `nil` namespace is every one.
    public func tasks(namespace: String?, after: String?, limit: Int) async throws -> [TaskRecord] {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.taskColumns)
                FROM tasks t WHERE t.deleted_at IS NULL AND ($1::text IS NULL OR t.namespace = $1) AND ($2::text IS NULL OR t.name > $2)
                ORDER BY t.name LIMIT $3
                """, [namespace, after, limit]
            ).rows.map(Self.task)
        }
    }

    public func task(named name: String, namespace: String = "default") async throws -> TaskRecord? {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.taskColumns) FROM tasks t WHERE t.namespace = $1 AND t.name = $2 AND t.deleted_at IS NULL
                """, [namespace, name]
            ).rows.first.map(Self.task)
        }
    }

    /// Makes a task due now; dispatchers are woken through NOTIFY. `traceParent`, the context of the request that triggered it,
    /// becomes the parent of the next occurrence's dispatch span; `baggage` travels with it.
    @discardableResult
    public func trigger(taskID: UUID, traceParent: String? = nil, baggage: String? = nil) async throws -> Bool {
        try await pool.withConnection { c in
            try await c.query(
                """
                UPDATE tasks SET next_run_at = now(), updated_at = now(), trace_parent = $2, trace_baggage = $3
                WHERE id = $1 AND deleted_at IS NULL
                """, [taskID, traceParent, baggage]
            ).affectedRows == 1
        }
    }

    static func task(_ r: PostgresRow) throws -> TaskRecord {
        TaskRecord(
            id: try r.uuid(0), name: try r.string(1), executor: try r.string(2), parameters: try r.string(3),
            schedule: try r.string(4), queue: try r.string(5), timeoutSeconds: try r.double(6),
            paused: try r.bool(7), nextRunAt: try r.optionalDate(8), timeZone: try r.string(9), misfire: try r.string(10),
            priority: Priority(rawValue: try r.int(11)) ?? .normal, overlap: try r.string(12), maxAttempts: try r.int(13),
            retryPolicy: try r.string(14), group: r[15], concurrencyKey: r[16], concurrencyLimit: try r.optionalInt(17),
            skippedOccurrences: try r.int(18), dependsOn: Self.textArray(r[21] ?? "{}"), triggerRule: try r.string(19),
            callbackURL: r[20], namespace: try r.string(22),
            labels: (try? json(r[23] ?? "{}"))?.objectValue?.compactMapValues(\.stringValue) ?? [:],
            batchID: r[24].flatMap(UUID.init(uuidString:)), spec: r[25] ?? "{}", createdAt: try r.optionalDate(26),
            updatedAt: try r.optionalDate(27))
    }

    /// Parses a PostgreSQL text array of simple names (`{a,b}`, quoted elements allowed).
    static func textArray(_ s: String) -> [String] {
        let inner = s.dropFirst().dropLast()
        guard !inner.isEmpty else { return [] }
        return inner.split(separator: ",").map { $0.hasPrefix("\"") ? String($0.dropFirst().dropLast()) : String($0) }
    }

    // MARK: runs

    public func runs(taskID: UUID? = nil, limit: Int = 100) async throws -> [RunRecord] {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.runColumns)
                FROM runs WHERE ($1::uuid IS NULL OR task_id = $1) ORDER BY occurrence DESC, attempt DESC LIMIT $2
                """, [taskID, limit]
            ).rows.map(Self.run)
        }
    }

    /// A filter over runs for listings; every part is optional.
    public struct RunFilter: Sendable {
        public var namespace: String?
        public var taskID: UUID?
        public var state: RunState?
        public var since: Date?
        public var until: Date?
        /// The last run of the previous page (occurrence and id): the page continues after it.
        public var after: (occurrence: Date, id: UUID)?
        public init() {}
    }

    /// Runs, newest occurrence first, one page. Only the filters given become conditions (all
    /// bound parameters): an `x IS NULL OR …` form would keep PostgreSQL from walking the
    /// `runs_by_occurrence` index and make it hash every task of the namespace first.
    public func runs(_ f: RunFilter, limit: Int) async throws -> [RunRecord] {
        var conditions: [String] = []
        var params: [any PostgresEncodable] = []
        func bind(_ v: any PostgresEncodable) -> String {
            params.append(v)
            return "$\(params.count)"
        }
        if let id = f.taskID {
            conditions.append("task_id = \(bind(id))")
        } else if let ns = f.namespace {
            conditions.append("EXISTS (SELECT 1 FROM tasks t WHERE t.id = runs.task_id AND t.namespace = \(bind(ns)))")
        }
        if let s = f.state { conditions.append("state = \(bind(s.rawValue))") }
        if let d = f.since { conditions.append("occurrence >= \(bind(d))") }
        if let d = f.until { conditions.append("occurrence < \(bind(d))") }
        if let (d, id) = f.after { conditions.append("(occurrence, id) < (\(bind(d))::timestamptz, \(bind(id))::uuid)") }
        let whereClause = conditions.isEmpty ? "" : "WHERE " + conditions.joined(separator: " AND ")
        let limitParam = bind(limit)
        return try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.runColumns) FROM runs \(whereClause) ORDER BY occurrence DESC, id DESC LIMIT \(limitParam)
                """, params
            ).rows.map(Self.run)
        }
    }

    /// The namespace of a task (deleted or not).
    public func namespace(ofTask id: UUID) async throws -> String? {
        try await pool.withConnection { c in try await c.query("SELECT namespace FROM tasks WHERE id = $1", [id]).rows.first?[0] }
    }

    public func run(id: UUID) async throws -> RunRecord? {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.runColumns) FROM runs WHERE id = $1
                """, [id]
            ).rows.first.map(Self.run)
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

    static let runColumns = runColumns(of: "")

    /// The columns `run(_:)` reads, of the runs table under `alias` (`"l."`, or `""` for none).
    static func runColumns(of a: String) -> String {
        """
        \(a)id, \(a)task_id, \(a)occurrence, \(a)attempt, \(a)state, \(a)worker_id, \(a)exit_code, \(a)output, \(a)error_class,
        \(a)error_message, \(a)trace_id, \(a)traceparent, \(a)publish_count, \(a)dispatched_at, \(a)started_at, \(a)finished_at,
        \(a)reason, \(a)priority, \(a)workflow_run_id, CASE WHEN \(a)available_at < 'infinity' THEN \(a)available_at END
        """
    }

    static func run(_ r: PostgresRow) throws -> RunRecord {
        RunRecord(
            id: try r.uuid(0), taskID: try r.uuid(1), occurrence: try r.date(2), attempt: try r.int(3),
            state: RunState(rawValue: try r.string(4)) ?? .lost, workerID: r[5], exitCode: try r.optionalInt(6),
            output: r[7], errorClass: r[8], errorMessage: r[9], traceID: r[10], traceparent: r[11],
            publishCount: try r.int(12), dispatchedAt: try r.optionalDate(13), startedAt: try r.optionalDate(14),
            finishedAt: try r.optionalDate(15), reason: r[16], priority: Priority(rawValue: try r.int(17)) ?? .normal,
            workflowRunID: r[18].flatMap(UUID.init(uuidString:)), availableAt: try r.optionalDate(19))
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
