package import ConveyorCore
import ConveyorPostgres
package import Foundation

/// What the API reads and writes beyond creating tasks: filtered task pages with their last run,
/// updates, purges, templates, group summaries and the audit log.
extension Store {
    /// A filter over tasks; every part is optional.
    package struct TaskFilter: Sendable {
        package var namespace: String?
        /// The state of the task's latest run.
        package var state: RunState?
        package var queue: String?
        package var group: String?
        /// `key` or `key=value`.
        package var label: (key: String, value: String?)?
        package var batchID: UUID?
        package var prefix: String?
        package var paused: Bool?
        /// The last name of the previous page.
        package var after: String?
        package var names: [String]?
        package init() {}
    }

    /// A page of tasks by name (byte order), each with its latest run: one statement, no query
    /// per task. Only the filters given become conditions, so each plan fits its filters.
    package func tasks(_ f: TaskFilter, limit: Int) async throws -> [(task: TaskRecord, last: RunRecord?)] {
        var conditions = ["t.deleted_at IS NULL"]
        var params: [any PostgresEncodable] = []
        func bind(_ v: any PostgresEncodable) -> String {
            params.append(v)
            return "$\(params.count)"
        }
        if let ns = f.namespace { conditions.append("t.namespace = \(bind(ns))") }
        if let s = f.state { conditions.append("l.state = \(bind(s.rawValue))") }
        if let q = f.queue { conditions.append("t.queue = \(bind(q))") }
        if let g = f.group { conditions.append("t.group_name = \(bind(g))") }
        if let (key, value) = f.label {
            conditions.append(value == nil ? "t.labels ? \(bind(key))" : "t.labels ->> \(bind(key)) = \(bind(value!))")
        }
        if let b = f.batchID { conditions.append("t.batch_id = \(bind(b))") }
        if let p = f.prefix {
            let escaped = p.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "%", with: "\\%")
                .replacingOccurrences(of: "_", with: "\\_")
            conditions.append("(t.name COLLATE \"C\") LIKE \(bind(escaped + "%"))")
        }
        if let p = f.paused { conditions.append("t.paused = \(bind(p))") }
        if let a = f.after { conditions.append("(t.name COLLATE \"C\") > \(bind(a))") }
        if let n = f.names { conditions.append("t.name = ANY(\(bind(n)))") }
        let limitParam = bind(limit)
        return try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.taskColumns), l.id IS NOT NULL, \(Self.runColumns(of: "l."))
                FROM tasks t
                LEFT JOIN LATERAL (SELECT * FROM runs r WHERE r.task_id = t.id ORDER BY r.occurrence DESC, r.attempt
                    DESC LIMIT 1) l ON true
                WHERE \(conditions.joined(separator: " AND "))
                ORDER BY (t.name COLLATE "C") LIMIT \(limitParam)
                """, params
            ).rows.map { r in
                // The task's columns, whether it has a run, then the run's columns.
                let task = try Self.task(r)
                let tasks = TaskColumn.allCases.count
                guard r[tasks] == "t" else { return (task, nil) }
                return (task, try Self.run(PostgresRow(values: Array(r.values.dropFirst(tasks + 1)))))
            }
        }
    }

    /// Replaces a task's definition (after a PATCH was merged and validated). Returns false when
    /// the task is gone. `reschedule` recomputes the next due time (the schedule or zone changed);
    /// `paused` is applied only when given.
    package func updateTask(id: UUID, _ t: NewTask, reschedule: Bool, paused: Bool?) async throws -> Bool {
        try t.validate()
        return try await pool.withTransaction { c in
            let now = try await c.query("SELECT now()").rows[0].date(0)
            let next = reschedule ? try Self.firstDue(t, now: now) : nil
            return try await c.query(
                """
                UPDATE tasks SET executor = $2, parameters = $3::jsonb, schedule = $4, queue = $5, timeout_seconds =
                    $6, timezone = $7,
                                 misfire_policy = $8, max_catchup = $9, priority = $10, max_attempts = $11,
                                     retry_policy = $12::jsonb,
                                 overlap_policy = $13, concurrency_key = $14, concurrency_limit = $15, group_name =
                                     $16, labels = $17::jsonb,
                                 trigger_rule = $18, callback_url = $19, paused = coalesce($20, paused), spec =
                                     $21::jsonb,
                                 next_run_at = CASE WHEN $22 THEN $23 ELSE next_run_at END,
                                 anchor_at = CASE WHEN $22 THEN $23 ELSE anchor_at END, updated_at = now(),
                                 next_run_id = CASE WHEN NOT $22 THEN next_run_id WHEN $23::timestamptz IS NULL THEN NULL
                                                    ELSE coalesce(next_run_id, gen_random_uuid()) END,
                                 schedule_to_start_seconds = $24
                WHERE id = $1 AND deleted_at IS NULL
                """,
                [
                    id, t.executor, String(decoding: MessageCodec.encode(t.parameters), as: UTF8.self), t.schedule.text,
                    t.queue,
                    t.timeoutSeconds, t.timeZone, t.misfire.rawValue, t.maxCatchup, t.priority.rawValue,
                    t.retry.maxAttempts,
                    String(decoding: MessageCodec.encode(t.retry.json), as: UTF8.self), t.overlap.rawValue,
                    t.concurrencyKey,
                    t.concurrencyLimit, t.group,
                    String(decoding: MessageCodec.encode(.object(t.labels.mapValues(JSONValue.string))), as: UTF8.self),
                    t.triggerRule.rawValue, t.callbackURL, paused,
                    String(decoding: MessageCodec.encode(TaskSpec.encode(t)), as: UTF8.self),
                    reschedule, next, t.scheduleToStartSeconds,
                ]
            ).affectedRows == 1
        }
    }

    /// Deletes a task and its runs for good (soft-deleted or not). Refused while it has open
    /// runs or other tasks depend on it. Returns the runs deleted, or nil when no such task.
    package func purgeTask(id: UUID) async throws -> Int? {
        try await pool.withTransaction { c in
            guard try await c.query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", [id]).rows.first != nil else {
                return nil
            }
            let open = try await c.query(
                """
                SELECT count(*) FROM runs WHERE task_id = $1 AND state IN ('scheduled', 'queued', 'dispatched',
                    'running')
                """, [id]
            ).rows[0].int(0)
            if open > 0 {
                throw ValidationError(
                    field: "name", value: "\(open) open runs",
                    hint: "cancel its open runs first (POST /v1/runs/{id}/cancel), then purge")
            }
            if let dependent: String = try await c.query(
                """
                SELECT t.name FROM task_dependencies d JOIN tasks t ON t.id = d.task_id WHERE d.upstream_id = $1 LIMIT 1
                """, [id]
            ).rows.first?[0] {
                throw ValidationError(
                    field: "name", value: dependent,
                    hint: "task '\(dependent)' depends on this one; purge or change it first")
            }
            try await c.query("DELETE FROM callbacks WHERE run_id IN (SELECT id FROM runs WHERE task_id = $1)", [id])
            let runs = try await c.query("DELETE FROM runs WHERE task_id = $1", [id]).affectedRows
            try await c.query("DELETE FROM workflow_runs WHERE root_task_id = $1", [id])
            try await c.query("DELETE FROM tasks WHERE id = $1", [id])
            return runs
        }
    }

    /// Every attempt of a run's occurrence, first to last.
    package func attempts(of run: RunRecord) async throws -> [RunRecord] {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.runColumns) FROM runs WHERE task_id = $1 AND occurrence = $2 ORDER BY attempt
                """, [run.taskID, run.occurrence]
            ).rows.map(Self.run)
        }
    }

    // MARK: groups

    /// A group's tasks and runs by state, in one namespace (`nil`: every namespace).
    package struct GroupSummary: Sendable {
        package var name: String
        package var tasks: Int
        package var paused: Int
        package var runs: [RunState: Int]
        /// Attempts after the first (retries and re-drives) among those runs.
        package var retries = 0
    }

    package func groups(namespace: String?, name: String? = nil) async throws -> [GroupSummary] {
        try await pool.withConnection { c in
            var out: [String: GroupSummary] = [:]
            for r in try await c.query(
                """
                SELECT group_name, count(*), count(*) FILTER (WHERE paused) FROM tasks
                WHERE group_name IS NOT NULL AND deleted_at IS NULL AND ($1::text IS NULL OR namespace = $1) AND
                    ($2::text IS NULL OR group_name = $2)
                GROUP BY group_name
                """, [namespace, name]
            ).rows {
                let g = try r.string(0)
                out[g] = GroupSummary(name: g, tasks: try r.int(1), paused: try r.int(2), runs: [:])
            }
            for r in try await c.query(
                """
                SELECT t.group_name, r.state, count(*), count(*) FILTER (WHERE r.attempt > 1)
                FROM runs r JOIN tasks t ON t.id = r.task_id
                WHERE t.group_name IS NOT NULL AND ($1::text IS NULL OR t.namespace = $1) AND ($2::text IS NULL OR
                    t.group_name = $2)
                GROUP BY t.group_name, r.state
                """, [namespace, name]
            ).rows {
                let g = try r.string(0)
                let n = try r.int(2)
                if let s = RunState(rawValue: try r.string(1)) {
                    out[g, default: GroupSummary(name: g, tasks: 0, paused: 0, runs: [:])].runs[s] = n
                }
                out[g]?.retries += try r.int(3)
            }
            return out.values.sorted { $0.name < $1.name }
        }
    }

    /// Cancels every open run of a group's tasks in one namespace.
    @discardableResult
    package func cancel(group: String, namespace: String, reason: String) async throws -> [UUID] {
        try await cancel(
            where: "task_id IN (SELECT id FROM tasks WHERE group_name = $1 AND namespace = $2)", [group, namespace],
            reason: reason)
    }

    // MARK: workers

    /// One worker and the runs it holds now (in `namespace` only, when given).
    package func worker(id: String, namespace: String?) async throws -> (WorkerRecord, [RunRecord])? {
        guard let w = try await workers(id: id).first else { return nil }
        let runs = try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.runColumns) FROM runs
                WHERE worker_id = $1 AND state = 'running'
                  AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM tasks t WHERE t.id = runs.task_id AND t.namespace =
                      $2))
                ORDER BY started_at LIMIT 1000
                """, [id, namespace]
            ).rows.map(Self.run)
        }
        return (w, runs)
    }

    /// Whether a namespace has a group of this name (among tasks not deleted).
    package func groupExists(_ name: String, namespace: String) async throws -> Bool {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT EXISTS (SELECT 1 FROM tasks WHERE namespace = $1 AND group_name = $2 AND deleted_at IS NULL)
                """, [namespace, name]
            ).rows[0].bool(0)
        }
    }
}
