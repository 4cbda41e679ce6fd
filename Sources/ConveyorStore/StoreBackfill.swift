package import ConveyorCore
import ConveyorPostgres
package import Foundation

extension Store {
    /// The most occurrences one backfill may run.
    package static let maxBackfill = 10_000

    /// One occurrence of a backfill and what became of it.
    package struct BackfillEntry: Sendable, Equatable {
        package var occurrence: Date
        /// The run made for it: nil on a dry run, or when the occurrence had a run already.
        package var runID: UUID?
        /// The state of the occurrence's latest attempt, when it had one before the backfill.
        package var existing: String?
    }

    /// Runs the past occurrences of a recurring task in `[from, to)` that have no run yet: each as
    /// attempt 1, due now, at `priority` (the task's when nil). An occurrence that has a run, in
    /// any state, keeps it: the `(task_id, occurrence, attempt)` key decides, so a backfill
    /// repeated, or racing a dispatcher or another backfill, never makes a second run of one
    /// occurrence. On a dry run nothing is written. Returns nil if the task does not exist.
    ///
    /// Refused (`ValidationError`): `to` not after `from`, `to` in the future (the scheduler runs
    /// what is to come), a task without a recurring schedule, more occurrences than `maxRuns`
    /// (named with the count, up to `maxBackfill`).
    package func backfill(
        taskID: UUID, from: Date, to: Date, maxRuns: Int, priority: Priority?, dryRun: Bool, oneAtATime: Bool = false,
        traceParent: String? = nil, baggage: String? = nil
    ) async throws -> [BackfillEntry]? {
        guard (1...Self.maxBackfill).contains(maxRuns) else {
            throw ValidationError(
                field: "max_runs", value: String(maxRuns), hint: "a whole number from 1 to \(Self.maxBackfill)")
        }
        guard to > from else {
            throw ValidationError(
                field: "to", value: Timestamp.format(to),
                hint: "the end of the range, after from (\(Timestamp.format(from)))")
        }
        return try await pool.withTransaction { c -> [BackfillEntry]? in
            // The task's row lock: two backfills of one task take turns (the occurrence key would
            // keep them apart anyway; this keeps their answers exact).
            guard
                let row = try await c.query(
                    """
                    SELECT schedule, timezone, coalesce(anchor_at, next_run_at, created_at), queue, shard, priority,
                           concurrency_key, EXISTS (SELECT 1 FROM task_dependencies d WHERE d.upstream_id = t.id), now()
                    FROM tasks t WHERE id = $1 AND deleted_at IS NULL FOR UPDATE
                    """, [taskID]
                ).rows.first
            else { return nil }
            let now = try row.date(8)
            guard to <= now else {
                throw ValidationError(
                    field: "to", value: Timestamp.format(to),
                    hint:
                        """
                        a backfill runs past occurrences: at most now (\(Timestamp.format(now))); the schedule runs \
                        the ones to come
                        """)
            }
            let schedule = try Schedule(parsing: try row.string(0))
            guard schedule.repeats else {
                throw ValidationError(
                    field: "schedule", value: schedule.text,
                    hint: "only a recurring task (cron or 'every …') has past occurrences; trigger this one instead")
            }
            let zone = TimeZone(identifier: try row.string(1)) ?? .gmt
            let occurrences = schedule.occurrences(
                from: from, to: to, anchor: try row.date(2), timeZone: zone, limit: Self.maxBackfill)
            guard occurrences.count <= maxRuns else {
                let count =
                    occurrences.count > Self.maxBackfill ? "more than \(Self.maxBackfill)" : "\(occurrences.count)"
                throw ValidationError(
                    field: "max_runs", value: String(maxRuns),
                    hint:
                        """
                        the range holds \(count) occurrences of '\(schedule.text)'; max_runs is \(maxRuns) (at most \
                        \(Self.maxBackfill)): narrow the range, or raise max_runs
                        """)
            }
            var existing: [Date: String] = [:]
            for r in try await c.query(
                """
                SELECT DISTINCT ON (occurrence) occurrence, state FROM runs
                WHERE task_id = $1 AND occurrence = ANY($2::timestamptz[])
                ORDER BY occurrence, attempt DESC
                """, [taskID, occurrences]
            ).rows {
                existing[try r.date(0)] = try r.string(1)
            }
            var entries = occurrences.map { BackfillEntry(occurrence: $0, runID: nil, existing: existing[$0]) }
            guard !dryRun else { return entries }
            let isRoot = try row.bool(7)
            var runs = NewRuns()
            var workflows: (ids: [UUID], occurrences: [Date]) = ([], [])
            // One at a time (overlap queue): the first is due now, each other waits for the
            // occurrence before it to end (released in `settle`), oldest first.
            let backfillID = oneAtATime ? UUID() : nil
            for i in entries.indices where entries[i].existing == nil {
                let id = UUID()
                var workflow: UUID?
                if isRoot {
                    workflow = UUID()
                    workflows.ids.append(workflow!)
                    workflows.occurrences.append(entries[i].occurrence)
                }
                runs.append(
                    id: id, task: taskID, occurrence: entries[i].occurrence, attempt: 1, queue: try row.string(3),
                    shard: try row.int(4), delay: oneAtATime && !runs.isEmpty ? nil : 0,
                    priority: try priority?.rawValue ?? row.int(5),
                    key: row[6], workflow: workflow, traceparent: traceParent, baggage: baggage, backfill: backfillID)
                entries[i].runID = id
            }
            if !workflows.ids.isEmpty {
                try await c.query(
                    """
                    INSERT INTO workflow_runs (id, root_task_id, occurrence)
                    SELECT u.id, $2, u.occ FROM unnest($1::uuid[], $3::timestamptz[]) AS u(id, occ)
                    """, [workflows.ids, taskID, workflows.occurrences])
            }
            let inserted = try await runs.insert(state: "scheduled", c)
            if inserted > 0 { try await c.query("SELECT pg_notify('conveyor_due', '')") }
            if inserted < runs.ids.count {
                // A dispatcher made some of these occurrences' runs meanwhile (a misfire catch-up):
                // theirs stand, and the answer says so.
                let made = Set(
                    try await c.query("SELECT id FROM runs WHERE id = ANY($1::uuid[])", [runs.ids]).rows.map {
                        try $0.uuid(0)
                    })
                for i in entries.indices where entries[i].runID.map({ !made.contains($0) }) ?? false {
                    entries[i].runID = nil
                    entries[i].existing = "scheduled"
                }
            }
            return entries
        }
    }
}
