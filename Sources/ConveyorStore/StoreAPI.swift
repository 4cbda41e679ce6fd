public import ConveyorCore
import ConveyorPostgres
public import Foundation

/// What the API reads and writes beyond creating tasks: filtered task pages with their last run,
/// updates, purges, templates, group summaries and the audit log.
extension Store {
    /// A filter over tasks; every part is optional.
    public struct TaskFilter: Sendable {
        public var namespace: String?
        /// The state of the task's latest run.
        public var state: RunState?
        public var queue: String?
        public var group: String?
        /// `key` or `key=value`.
        public var label: (key: String, value: String?)?
        public var batchID: UUID?
        public var prefix: String?
        public var paused: Bool?
        /// The last name of the previous page.
        public var after: String?
        public var names: [String]?
        public init() {}
    }

    /// A page of tasks by name (byte order), each with its latest run: one statement, no query
    /// per task. Only the filters given become conditions, so each plan fits its filters.
    public func tasks(_ f: TaskFilter, limit: Int) async throws -> [(task: TaskRecord, last: RunRecord?)] {
        var conditions = ["t.deleted_at IS NULL"]
        var params: [any PostgresEncodable] = []
        func bind(_ v: any PostgresEncodable) -> String { params.append(v); return "$\(params.count)" }
        if let ns = f.namespace { conditions.append("t.namespace = \(bind(ns))") }
        if let s = f.state { conditions.append("l.state = \(bind(s.rawValue))") }
        if let q = f.queue { conditions.append("t.queue = \(bind(q))") }
        if let g = f.group { conditions.append("t.group_name = \(bind(g))") }
        if let (key, value) = f.label {
            conditions.append(value == nil ? "t.labels ? \(bind(key))" : "t.labels ->> \(bind(key)) = \(bind(value!))")
        }
        if let b = f.batchID { conditions.append("t.batch_id = \(bind(b))") }
        if let p = f.prefix {
            let escaped = p.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "%", with: "\\%").replacingOccurrences(of: "_", with: "\\_")
            conditions.append("(t.name COLLATE \"C\") LIKE \(bind(escaped + "%"))")
        }
        if let p = f.paused { conditions.append("t.paused = \(bind(p))") }
        if let a = f.after { conditions.append("(t.name COLLATE \"C\") > \(bind(a))") }
        if let n = f.names { conditions.append("t.name = ANY(\(bind(n)))") }
        let limitParam = bind(limit)
        return try await pool.withConnection { c in
            try await c.query("""
                SELECT \(Self.taskColumns), l.id IS NOT NULL, \(Self.runColumns(of: "l."))
                FROM tasks t
                LEFT JOIN LATERAL (SELECT * FROM runs r WHERE r.task_id = t.id ORDER BY r.occurrence DESC, r.attempt DESC LIMIT 1) l ON true
                WHERE \(conditions.joined(separator: " AND "))
                ORDER BY (t.name COLLATE "C") LIMIT \(limitParam)
                """, params).rows.map { r in
                let task = try Self.task(r)
                guard r[28] == "t" else { return (task, nil) }
                return (task, try Self.run(PostgresRow(values: Array(r.values.dropFirst(29)))))
            }
        }
    }

    /// Replaces a task's definition (after a PATCH was merged and validated). Returns false when
    /// the task is gone. `reschedule` recomputes the next due time (the schedule or zone changed);
    /// `paused` is applied only when given.
    public func updateTask(id: UUID, _ t: NewTask, reschedule: Bool, paused: Bool?) async throws -> Bool {
        try t.validate()
        return try await pool.withTransaction { c in
            let now = try await c.query("SELECT now()").rows[0].date(0)
            let next = reschedule ? try Self.firstDue(t, now: now) : nil
            return try await c.query("""
                UPDATE tasks SET executor = $2, parameters = $3::jsonb, schedule = $4, queue = $5, timeout_seconds = $6, timezone = $7,
                                 misfire_policy = $8, max_catchup = $9, priority = $10, max_attempts = $11, retry_policy = $12::jsonb,
                                 overlap_policy = $13, concurrency_key = $14, concurrency_limit = $15, group_name = $16, labels = $17::jsonb,
                                 trigger_rule = $18, callback_url = $19, paused = coalesce($20, paused), spec = $21::jsonb,
                                 next_run_at = CASE WHEN $22 THEN $23 ELSE next_run_at END,
                                 anchor_at = CASE WHEN $22 THEN $23 ELSE anchor_at END, updated_at = now()
                WHERE id = $1 AND deleted_at IS NULL
                """, [id, t.executor, String(decoding: MessageCodec.encode(t.parameters), as: UTF8.self), t.schedule.text, t.queue,
                      t.timeoutSeconds, t.timeZone, t.misfire.rawValue, t.maxCatchup, t.priority.rawValue, t.retry.maxAttempts,
                      String(decoding: MessageCodec.encode(t.retry.json), as: UTF8.self), t.overlap.rawValue, t.concurrencyKey,
                      t.concurrencyLimit, t.group, String(decoding: MessageCodec.encode(.object(t.labels.mapValues(JSONValue.string))), as: UTF8.self),
                      t.triggerRule.rawValue, t.callbackURL, paused, String(decoding: MessageCodec.encode(TaskSpec.encode(t)), as: UTF8.self),
                      reschedule, next]).affectedRows == 1
        }
    }

    /// Deletes a task and its runs for good (soft-deleted or not). Refused while it has open
    /// runs or other tasks depend on it. Returns the runs deleted, or nil when no such task.
    public func purgeTask(id: UUID) async throws -> Int? {
        try await pool.withTransaction { c in
            guard try await c.query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", [id]).rows.first != nil else { return nil }
            let open = try await c.query("""
                SELECT count(*) FROM runs WHERE task_id = $1 AND state IN ('scheduled', 'queued', 'dispatched', 'running')
                """, [id]).rows[0].int(0)
            if open > 0 {
                throw ValidationError(field: "name", value: "\(open) open runs", hint: "cancel its open runs first (POST /v1/runs/{id}/cancel), then purge")
            }
            if let dependent: String = try await c.query("""
                SELECT t.name FROM task_dependencies d JOIN tasks t ON t.id = d.task_id WHERE d.upstream_id = $1 LIMIT 1
                """, [id]).rows.first?[0] {
                throw ValidationError(field: "name", value: dependent, hint: "task '\(dependent)' depends on this one; purge or change it first")
            }
            try await c.query("DELETE FROM callbacks WHERE run_id IN (SELECT id FROM runs WHERE task_id = $1)", [id])
            let runs = try await c.query("DELETE FROM runs WHERE task_id = $1", [id]).affectedRows
            try await c.query("DELETE FROM workflow_runs WHERE root_task_id = $1", [id])
            try await c.query("DELETE FROM tasks WHERE id = $1", [id])
            return runs
        }
    }

    /// Every attempt of a run's occurrence, first to last.
    public func attempts(of run: RunRecord) async throws -> [RunRecord] {
        try await pool.withConnection { c in
            try await c.query("""
                SELECT \(Self.runColumns) FROM runs WHERE task_id = $1 AND occurrence = $2 ORDER BY attempt
                """, [run.taskID, run.occurrence]).rows.map(Self.run)
        }
    }

    // MARK: groups

    /// A group's tasks and runs by state, in one namespace (`nil`: every namespace).
    public struct GroupSummary: Sendable {
        public var name: String
        public var tasks: Int
        public var paused: Int
        public var runs: [RunState: Int]
    }

    public func groups(namespace: String?, name: String? = nil) async throws -> [GroupSummary] {
        try await pool.withConnection { c in
            var out: [String: GroupSummary] = [:]
            for r in try await c.query("""
                SELECT group_name, count(*), count(*) FILTER (WHERE paused) FROM tasks
                WHERE group_name IS NOT NULL AND deleted_at IS NULL AND ($1::text IS NULL OR namespace = $1) AND ($2::text IS NULL OR group_name = $2)
                GROUP BY group_name
                """, [namespace, name]).rows {
                let g = try r.string(0)
                out[g] = GroupSummary(name: g, tasks: try r.int(1), paused: try r.int(2), runs: [:])
            }
            for r in try await c.query("""
                SELECT t.group_name, r.state, count(*) FROM runs r JOIN tasks t ON t.id = r.task_id
                WHERE t.group_name IS NOT NULL AND ($1::text IS NULL OR t.namespace = $1) AND ($2::text IS NULL OR t.group_name = $2)
                GROUP BY t.group_name, r.state
                """, [namespace, name]).rows {
                let g = try r.string(0), n = try r.int(2)
                if let s = RunState(rawValue: try r.string(1)) { out[g, default: GroupSummary(name: g, tasks: 0, paused: 0, runs: [:])].runs[s] = n }
            }
            return out.values.sorted { $0.name < $1.name }
        }
    }

    /// Cancels every open run of a group's tasks in one namespace.
    @discardableResult
    public func cancel(group: String, namespace: String, reason: String) async throws -> [UUID] {
        try await cancel(where: "task_id IN (SELECT id FROM tasks WHERE group_name = $1 AND namespace = $2)", [group, namespace], reason: reason)
    }

    // MARK: workers

    /// One worker and the runs it holds now (in `namespace` only, when given).
    public func worker(id: String, namespace: String?) async throws -> (WorkerRecord, [RunRecord])? {
        guard let w = try await workers(id: id).first else { return nil }
        let runs = try await pool.withConnection { c in
            try await c.query("""
                SELECT \(Self.runColumns) FROM runs
                WHERE worker_id = $1 AND state = 'running'
                  AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM tasks t WHERE t.id = runs.task_id AND t.namespace = $2))
                ORDER BY started_at LIMIT 1000
                """, [id, namespace]).rows.map(Self.run)
        }
        return (w, runs)
    }

    /// Whether a namespace has a group of this name (among tasks not deleted).
    public func groupExists(_ name: String, namespace: String) async throws -> Bool {
        try await pool.withConnection { c in
            try await c.query("""
                SELECT EXISTS (SELECT 1 FROM tasks WHERE namespace = $1 AND group_name = $2 AND deleted_at IS NULL)
                """, [namespace, name]).rows[0].bool(0)
        }
    }

    // MARK: templates

    public struct TemplateRecord: Sendable {
        public var namespace: String
        public var name: String
        public var body: JSONValue
        public var parameters: [String]

        public init(namespace: String, name: String, body: JSONValue, parameters: [String]) {
            self.namespace = namespace
            self.name = name
            self.body = body
            self.parameters = parameters
        }
    }

    /// Creates or replaces a template.
    public func putTemplate(_ t: TemplateRecord) async throws {
        _ = try await pool.withConnection { c in
            try await c.query("""
                INSERT INTO task_templates (namespace, name, body, parameters) VALUES ($1, $2, $3::jsonb, $4::text[])
                ON CONFLICT (namespace, name) DO UPDATE SET body = EXCLUDED.body, parameters = EXCLUDED.parameters, updated_at = now()
                """, [t.namespace, t.name, String(decoding: MessageCodec.encode(t.body), as: UTF8.self), t.parameters])
        }
    }

    public func templates(namespace: String?) async throws -> [TemplateRecord] {
        try await pool.withConnection { c in
            try await c.query("""
                SELECT namespace, name, body::text, array_to_string(parameters, ',') FROM task_templates
                WHERE $1::text IS NULL OR namespace = $1 ORDER BY namespace, name LIMIT 1000
                """, [namespace]).rows.map(Self.template)
        }
    }

    public func template(named name: String, namespace: String) async throws -> TemplateRecord? {
        try await pool.withConnection { c in
            try await c.query("""
                SELECT namespace, name, body::text, array_to_string(parameters, ',') FROM task_templates WHERE namespace = $1 AND name = $2
                """, [namespace, name]).rows.first.map(Self.template)
        }
    }

    static func template(_ r: PostgresRow) throws -> TemplateRecord {
        TemplateRecord(namespace: try r.string(0), name: try r.string(1), body: try json(try r.string(2)),
                       parameters: (r[3] ?? "").split(separator: ",").map(String.init))
    }

    // MARK: audit

    public struct AuditEntry: Sendable {
        public var id: Int64 = 0
        public var at: Date?
        public var actor: String
        public var role: String
        public var namespace: String
        public var action: String
        public var target: String
        public var requestID: String
        public var client: String?
        public var detail: JSONValue

        public init(actor: String, role: String, namespace: String, action: String, target: String, requestID: String,
                    client: String?, detail: JSONValue = .object([:])) {
            self.actor = actor
            self.role = role
            self.namespace = namespace
            self.action = action
            self.target = target
            self.requestID = requestID
            self.client = client
            self.detail = detail
        }
    }

    public func audit(_ e: AuditEntry) async throws {
        _ = try await pool.withConnection { c in
            try await c.query("""
                INSERT INTO audit_log (actor, role, namespace, action, target, request_id, client, detail)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)
                """, [e.actor, e.role, e.namespace, e.action, e.target, e.requestID, e.client,
                      String(decoding: MessageCodec.encode(e.detail), as: UTF8.self)])
        }
    }

    /// Audit entries, newest first, before the entry id `before` (the cursor).
    public func auditLog(namespace: String?, action: String?, before: Int64?, limit: Int) async throws -> [AuditEntry] {
        try await pool.withConnection { c in
            try await c.query("""
                SELECT id, at, actor, role, namespace, action, target, request_id, client, detail::text FROM audit_log
                WHERE ($1::text IS NULL OR namespace = $1) AND ($2::text IS NULL OR action = $2) AND ($3::bigint IS NULL OR id < $3)
                ORDER BY id DESC LIMIT $4
                """, [namespace, action, before, limit]).rows.map { r in
                var e = AuditEntry(actor: try r.string(2), role: try r.string(3), namespace: try r.string(4), action: try r.string(5),
                                   target: try r.string(6), requestID: try r.string(7), client: r[8], detail: try Store.json(r[9] ?? "{}"))
                e.id = Int64(try r.int(0))
                e.at = try r.date(1)
                return e
            }
        }
    }

    // MARK: queues and the overview

    public struct QueueFigures: Sendable {
        public var queue: String
        public var tasks: Int
        /// Runs queued or dispatched (waiting for a worker, as the database sees it).
        public var backlog: Int
        public var running: Int
        public var finishedLastMinute: Int
    }

    /// The queues a namespace's tasks use, with their open runs and last minute's completions.
    public func queueStats(namespace: String?) async throws -> [QueueFigures] {
        try await pool.withConnection { c in
            try await c.query("""
                WITH q AS (SELECT queue, count(*) AS n FROM tasks WHERE deleted_at IS NULL AND ($1::text IS NULL OR namespace = $1) GROUP BY queue),
                     o AS (SELECT r.queue, count(*) FILTER (WHERE r.state IN ('queued', 'dispatched')) AS backlog,
                                  count(*) FILTER (WHERE r.state = 'running') AS running
                           FROM runs r WHERE r.state IN ('queued', 'dispatched', 'running')
                             AND ($1::text IS NULL OR r.task_id IN (SELECT id FROM tasks WHERE namespace = $1)) GROUP BY r.queue),
                     f AS (SELECT r.queue, count(*) AS n FROM runs r WHERE r.finished_at > now() - interval '1 minute'
                             AND ($1::text IS NULL OR r.task_id IN (SELECT id FROM tasks WHERE namespace = $1)) GROUP BY r.queue)
                SELECT q.queue, q.n, coalesce(o.backlog, 0), coalesce(o.running, 0), coalesce(f.n, 0)
                FROM q LEFT JOIN o USING (queue) LEFT JOIN f USING (queue) ORDER BY q.queue LIMIT 1000
                """, [namespace]).rows.map { r in
                QueueFigures(queue: try r.string(0), tasks: try r.int(1), backlog: try r.int(2), running: try r.int(3), finishedLastMinute: try r.int(4))
            }
        }
    }

    public struct Overview: Sendable {
        public var at: Date
        /// Runs of occurrences in the last 24 hours, by state.
        public var runsByState: [RunState: Int]
        public var perMinute: [(minute: Date, succeeded: Int, failed: Int)]
        public var queues: [QueueFigures]
        public var activeWorkers: Int
    }

    /// What the dashboard's overview shows, read through indexes (last 24 h of runs, last 30 min of completions).
    public func overview(namespace: String?) async throws -> Overview {
        let queues = try await queueStats(namespace: namespace)
        return try await pool.withConnection { c in
            let at = try await c.query("SELECT now()").rows[0].date(0)
            var byState: [RunState: Int] = [:]
            for r in try await c.query("""
                SELECT state, count(*) FROM runs WHERE occurrence > now() - interval '24 hours'
                  AND ($1::text IS NULL OR task_id IN (SELECT id FROM tasks WHERE namespace = $1)) GROUP BY state
                """, [namespace]).rows {
                if let s = RunState(rawValue: try r.string(0)) { byState[s] = try r.int(1) }
            }
            let minutes = try await c.query("""
                SELECT date_trunc('minute', finished_at), count(*) FILTER (WHERE state = 'succeeded'),
                       count(*) FILTER (WHERE state IN ('failed', 'timed_out', 'lost', 'dead'))
                FROM runs WHERE finished_at > now() - interval '30 minutes'
                  AND ($1::text IS NULL OR task_id IN (SELECT id FROM tasks WHERE namespace = $1))
                GROUP BY 1 ORDER BY 1
                """, [namespace]).rows.map { r in (minute: try r.date(0), succeeded: try r.int(1), failed: try r.int(2)) }
            let workers = try await c.query("SELECT count(*) FROM workers WHERE state = 'active'").rows[0].int(0)
            return Overview(at: at, runsByState: byState, perMinute: minutes, queues: queues, activeWorkers: workers)
        }
    }
}
