package import ConveyorCore
import ConveyorPostgres
package import Foundation

/// A run claimed for publishing: everything its task message needs.
package struct ClaimedRun: Sendable {
    package var message: TaskMessage
    package var traceparent: String
    /// W3C baggage of the request behind the run, for the message's `baggage` header.
    package var baggage: String?
    /// The run's priority (a metrics label; the message itself does not carry it).
    package var priority: Priority = .normal
    /// The task's schedule-to-start timeout: the message's `start_by` is its publish time plus this.
    package var scheduleToStartSeconds = NewTask.defaultScheduleToStartSeconds
}

/// What a scan tick learns before claiming (`Store.scanProbe`).
package struct ScanProbe: Sendable {
    /// Seconds until something is due; ≤ 0 means due now, `nil` nothing scheduled.
    package var nextDueIn: Double?
    /// Whether a `scheduled` run is ready now (a retry, a held-back run, work over a backlog).
    /// When none is, due tasks may skip `scheduled` and go straight to `queued`.
    package var runsReady = true
    /// Whether a `queued` run's lease has run out (its dispatcher died before the broker's
    /// confirm): only then does a claim look for them (step 3).
    package var leasesExpired = true
    /// Seconds until the first task due after the probe's `since` (≤ 0: one is due now; nil: none,
    /// or no `since`): whether a walk that saw every due task up to `since` would find a new one.
    package var newDueIn: Double?
    package var backlog: [String: Int] = [:]
    /// Queues with a rate limit (`queue_limits`).
    package var rateLimited: Set<String> = []
    /// Paused queues (`queue_pauses`): nothing new is published to them.
    package var paused: Set<String> = []

    package init() {}

    package var due: Bool { (nextDueIn ?? 1) <= 0 }
}

/// How one task group is claimed (see docs/architecture.md, "Dispatch").
package struct ClaimRequest: Sendable {
    package var group: Int
    package var groups: Int
    /// Runs claimed per transaction.
    package var limit: Int
    /// The outbox lease: a `queued` run not confirmed by then is republished by any dispatcher.
    package var lease: Duration
    /// Occurrences older than this are *missed* and go by the task's misfire policy.
    package var misfireGrace: Duration
    /// How many more runs each queue may have `queued` or `dispatched` (its broker backlog), for
    /// this group; queues not named get `defaultRoom`.
    package var room: [String: Int] = [:]
    package var defaultRoom = Int.max
    /// Queues with a rate limit; the token buckets are read only when a candidate is in one.
    package var rateLimited: Set<String> = []
    /// Due occurrences may be written straight as `queued` (claimed) when nothing else is ready
    /// ahead of them (no `scheduled` run ready, from the probe), their queue has room, and no
    /// concurrency key, rate limit or overlap wait applies. One row version fewer per run.
    package var straightToQueue = false
    /// Whether to look for `queued` runs past their lease (step 3): the probe saw one.
    package var leasesExpired = true
    /// Where this group's walk of due tasks goes on from (`Store.dueTasks`); nil: from the start.
    package var seenUpTo: DuePosition?
    /// Where this group's claims of each waiting queue go on from, by priority (`DueWalk.waitingFrom`).
    package var waitingFrom: [String: [Int: DuePosition]] = [:]
    /// Queues known to have due tasks waiting for room, taken by priority when they have room
    /// (step 1 of `Store.dueTasks`); the other steps leave them to it.
    package var waiting: Set<String> = []
    /// The waiting queues this claim reads (step 1), across every shard, with their whole room:
    /// one group of a tick does, for the queues the dispatcher judged worth a claim.
    package var claimWaiting: Set<String> = []
    /// Whether a due task may have waited half the misfire grace (the probe's oldest due time says
    /// so); if not, step 0 of `Store.dueTasks` is not run.
    package var agedPossible = true
    /// Whether a task may have fallen due since this group's walk reached its end (the probe's
    /// first task due after it says so); if not, step 2 of `Store.dueTasks` is not run.
    package var newDuePossible = true
    /// Makes the trace context of a new run, given the task's stored context (if any).
    package var newTraceParent: @Sendable (String?) -> String

    package init(
        group: Int, groups: Int, limit: Int, lease: Duration, misfireGrace: Duration,
        newTraceParent: @escaping @Sendable (String?) -> String
    ) {
        self.group = group
        self.groups = groups
        self.limit = limit
        self.lease = lease
        self.misfireGrace = misfireGrace
        self.newTraceParent = newTraceParent
    }

    /// The shards of this group: a contiguous slice of `0 ..< 2^31`. A range (not `shard % groups`)
    /// so that PostgreSQL estimates it from the column's histogram and walks the ready index in
    /// priority order, stopping at the limit; with a modulus it guessed 0.5 % and sorted every
    /// ready row instead (docs/benchmarks.md, "100,000 tasks due at once").
    package var shards: (lower: Int, upper: Int) {
        let span = Self.allShards.upper
        return (group * span / groups, (group + 1) * span / groups)
    }

    /// Every shard: what the waiting queues' read covers (`Store.dueTasks`, step 1).
    package static let allShards = (lower: 0, upper: 1 << 31)
}

/// What one claim did.
package struct ClaimResult: Sendable {
    /// Runs to publish now.
    package var runs: [ClaimedRun] = []
    /// Runs cancelled in the claim (overlap `replace`): their workers are told.
    package var cancelled: [UUID] = []
    /// New runs created from due tasks.
    package var created = 0
    /// Ready runs held back by a concurrency key or a queue's rate limit.
    package var heldBack = 0
    /// What the claim learned of the due tasks waiting for room; nil when due tasks did not wait
    /// (`straightToQueue` off: every due task became a run).
    package var walk: DueWalk?
}

extension Store {
    /// Claims due work of one task group in one transaction:
    ///
    /// 1. due tasks (`FOR UPDATE SKIP LOCKED`) become `scheduled` runs, by misfire and overlap
    ///    policy, and their `next_run_at` advances;
    /// 2. ready `scheduled` runs are claimed by priority, then due time, within each queue's room,
    ///    rate limit and concurrency keys, and become `queued` with a lease;
    /// 3. `queued` runs whose lease ran out (their dispatcher died before the confirm) are
    ///    claimed again.
    package func claimDue(_ q: ClaimRequest) async throws -> ClaimResult {
        try await pool.withTransaction { c in
            var result = ClaimResult()
            let made = try await Self.materialize(q, c)
            result.created = made.created
            result.cancelled = made.cancelled
            result.walk = made.walk
            var rest = q
            rest.room = made.roomLeft
            // Step 2 only when something may be ready: the probe saw a ready run, or step 1 made
            // `scheduled` ones (held by a key, a rate limit or a full queue).
            if !q.straightToQueue || made.scheduled > 0 {
                let (ready, held) = try await Self.claimReady(rest, c)
                result.runs = made.queued + ready
                result.heldBack = held
            } else {
                result.runs = made.queued
            }
            let room = q.limit - result.runs.count
            if room > 0 && q.leasesExpired { result.runs += try await Self.claimExpiredLeases(q, room: room, c) }
            return result
        }
    }

    /// What step 1 did: runs created, active runs cancelled (overlap `replace`), the runs it wrote
    /// `queued`, and each queue's room left after them.
    struct Materialized {
        var created = 0
        /// Of `created`, the runs written `scheduled`.
        var scheduled = 0
        var cancelled: [UUID] = []
        var queued: [ClaimedRun] = []
        var roomLeft: [String: Int]
        var walk: DueWalk?
    }

    /// What step 1 reads of each due task, in select-list order.
    enum DueColumn: Int, RowColumn {
        case id, schedule, timezone, misfire, maxCatchup, nextRunAt, now, overlap, queue, priority, concurrencyKey
        case shard, traceParent, anchor, active, waiting, isRoot, baggage, nextRunID
        // What a run written `queued` at once carries in its task message.
        case name, executor, parameters, timeoutSeconds, scheduleToStart

        func sql(alias t: String) -> String {
            switch self {
            case .id: "\(t)id"
            case .schedule: "\(t)schedule"
            case .timezone: "\(t)timezone"
            case .misfire: "\(t)misfire_policy"
            case .maxCatchup: "\(t)max_catchup"
            case .nextRunAt: "\(t)next_run_at"
            case .now: "now()"
            case .overlap: "\(t)overlap_policy"
            case .queue: "\(t)queue"
            case .priority: "\(t)priority"
            case .concurrencyKey: "\(t)concurrency_key"
            case .shard: "\(t)shard"
            case .traceParent: "\(t)trace_parent"
            case .anchor: "coalesce(\(t)anchor_at, \(t)next_run_at)"
            case .nextRunID: "\(t)next_run_id"
            // Runs of the task in flight, counted only when its overlap policy needs them.
            case .active:
                """
                CASE WHEN \(t)overlap_policy <> 'allow' THEN (SELECT count(*) FROM runs r WHERE r.task_id = \(t)id
                    AND r.state IN ('scheduled', 'queued', 'dispatched', 'running') AND r.available_at < 'infinity')
                    ELSE 0 END
                """
            // A run already waiting behind the active one (overlap queue).
            case .waiting:
                """
                CASE WHEN \(t)overlap_policy = 'queue' THEN (SELECT count(*) FROM runs r WHERE r.task_id = \(t)id
                    AND r.state = 'scheduled' AND r.available_at = 'infinity') ELSE 0 END
                """
            // The root of a workflow: some task depends on it.
            case .isRoot: "EXISTS (SELECT 1 FROM task_dependencies d WHERE d.upstream_id = \(t)id)"
            case .baggage: "\(t)trace_baggage"
            case .name: "\(t)name"
            case .executor: "\(t)executor"
            case .parameters: "\(t)parameters::text"
            case .timeoutSeconds: "\(t)timeout_seconds"
            case .scheduleToStart: "\(t)schedule_to_start_seconds"
            }
        }
    }

    static let dueColumns = DueColumn.selectList(alias: "t.")

    /// Step 1: due tasks → `scheduled` runs, or `queued` ones when they may go straight to their
    /// queue (`straightToQueue`); then a due task of a full queue waits for room as a task.
    static func materialize(_ q: ClaimRequest, _ c: PostgresConnection) async throws -> Materialized {
        typealias C = DueColumn
        let due: [(PostgresRow, DueSource)]
        var walk: DueWalk?
        if q.straightToQueue {
            (due, walk) = try await dueTasks(q, room: q.room, c)
        } else {
            due = try await c.query(
                """
                SELECT \(dueColumns)
                FROM tasks t
                WHERE \(dueTask) AND t.next_run_at <= now()
                ORDER BY t.next_run_at
                LIMIT $3
                FOR UPDATE SKIP LOCKED
                """, [q.shards.lower, q.shards.upper, q.limit]
            ).rows.map { ($0, .found) }
        }
        guard !due.isEmpty else { return Materialized(roomLeft: q.room, walk: walk) }
        var runs = NewRuns()
        var direct = NewRuns()
        var messages: [UUID: ClaimedRun] = [:]
        var room = q.room
        var taskIDs: [UUID] = []
        var nextTimes: [Date?] = []
        var skips: [Int] = []
        var fired: [Bool] = []
        var replaceTasks: [UUID] = []
        var workflows: (ids: [UUID], roots: [UUID], occurrences: [Date]) = ([], [], [])
        var zones: [String: TimeZone] = [:]
        for (r, source) in due {
            // A due task of a full queue that would go straight to it waits for room as a task,
            // untouched (unless it has waited half the misfire grace: then it becomes a run).
            let queue = try r.string(C.queue)
            if walk != nil, source != .aged, r[C.concurrencyKey] == nil {
                if !q.rateLimited.contains(queue) && (room[queue] ?? q.defaultRoom) <= 0 {
                    walk?.leftWaiting.insert(queue)
                    // Taken from a waiting queue but left (catch-up runs used its room): its next
                    // claim starts from the start again, not after this task.
                    if source == .waiting { walk?.waitingFrom[queue] = nil }
                    continue
                }
            }
            let taskID = try r.uuid(C.id)
            let now = try r.date(C.now)
            let schedule = try Schedule(parsing: try r.string(C.schedule))
            let zoneName = try r.string(C.timezone)
            let zone = zones[zoneName] ?? TimeZone(identifier: zoneName) ?? .gmt
            zones[zoneName] = zone
            let misfire = (try? MisfirePolicy(parsing: try r.string(C.misfire))) ?? .once
            let overlap = (try? OverlapPolicy(parsing: try r.string(C.overlap))) ?? .allow
            let dueAt = try r.date(C.nextRunAt)
            let plan = schedule.plan(
                due: dueAt, anchor: try r.date(C.anchor), now: now, timeZone: zone, misfire: misfire,
                maxCatchup: try r.int(C.maxCatchup), grace: q.misfireGrace.inSeconds)
            var fire = plan.fire
            var skipped = plan.skipped
            var waiting = false
            let active = try r.int(C.active)
            if overlap != .allow && fire.count > 1 {
                skipped += fire.count - 1
                fire = [fire[fire.count - 1]]
            }
            if active > 0 {
                switch overlap {
                case .allow: break
                case .forbid:
                    skipped += fire.count
                    fire = []
                case .queue:
                    if try r.int(C.waiting) == 0 && !fire.isEmpty {
                        waiting = true
                    } else {
                        skipped += fire.count
                        fire = []
                    }
                case .replace: replaceTasks.append(taskID)
                }
            }
            let isRoot = try r.bool(C.isRoot)
            // The first run made takes the task's run handle (`next_run_id`, which creating or
            // triggering the task returned); later ones (catch-up) get ids of their own.
            var handle = r[C.nextRunID].flatMap(UUID.init(uuidString:))
            for occurrence in fire {
                let id = handle ?? UUID()
                handle = nil
                let tp = q.newTraceParent(r[C.traceParent])
                var workflow: UUID?
                if isRoot {
                    workflow = UUID()
                    workflows.ids.append(workflow!)
                    workflows.roots.append(taskID)
                    workflows.occurrences.append(occurrence)
                }
                let queueRoom = room[queue] ?? q.defaultRoom
                if q.straightToQueue && !waiting && r[C.concurrencyKey] == nil && !q.rateLimited.contains(queue)
                    && queueRoom > 0
                {
                    room[queue] = queueRoom - 1
                    messages[id] = try directRun(
                        r, id: id, taskID: taskID, occurrence: occurrence, now: now, traceparent: tp)
                    direct.append(
                        id: id, task: taskID, occurrence: occurrence, attempt: 1, queue: queue,
                        shard: try r.int(C.shard),
                        delay: q.lease.inSeconds, priority: try r.int(C.priority), key: nil, workflow: workflow,
                        traceparent: tp,
                        baggage: r[C.baggage])
                } else {
                    runs.append(
                        id: id, task: taskID, occurrence: occurrence, attempt: 1, queue: queue,
                        shard: try r.int(C.shard),
                        delay: waiting ? nil : 0, priority: try r.int(C.priority), key: r[C.concurrencyKey],
                        workflow: workflow,
                        traceparent: tp, baggage: r[C.baggage])
                }
            }
            taskIDs.append(taskID)
            nextTimes.append(plan.next)
            skips.append(skipped)
            fired.append(!fire.isEmpty)
        }
        var cancelled: [UUID] = []
        if !replaceTasks.isEmpty {
            let ended = try await c.query(
                """
                UPDATE runs SET state = 'cancelled', finished_at = now(), reason =
                    'replaced by a newer occurrence (overlap policy replace)',
                                cancel_pending = state IN ('queued', 'dispatched', 'running')
                WHERE id IN (SELECT id FROM runs WHERE task_id = ANY($1::uuid[])
                             AND state IN ('scheduled', 'queued', 'dispatched', 'running') ORDER BY id FOR UPDATE)
                RETURNING \(Ended.columns)
                """, [replaceTasks]
            ).rows.map(Ended.init)
            cancelled = ended.map(\.id)
            _ = try await settle(ended, c)
        }
        if !workflows.ids.isEmpty {
            try await c.query(
                """
                INSERT INTO workflow_runs (id, root_task_id, occurrence) SELECT * FROM unnest($1::uuid[], $2::uuid[],
                    $3::timestamptz[])
                """, [workflows.ids, workflows.roots, workflows.occurrences])
        }
        let scheduled = try await runs.insert(state: "scheduled", c)
        var created = scheduled
        var queued: [ClaimedRun] = []
        if !direct.isEmpty {
            // The inserted ones (a conflict on the occurrence key inserts nothing), in claim order.
            let inserted = try await direct.insertReturningIDs(state: "queued", c)
            created += inserted.count
            queued = direct.ids.filter(inserted.contains).compactMap { messages[$0] }
        }
        if taskIDs.isEmpty {  // every due task read waits for room
            return Materialized(roomLeft: room, walk: walk)
        }
        try await c.query(
            """
            UPDATE tasks SET next_run_at = u.next, skipped_occurrences = skipped_occurrences + u.skipped, updated_at =
                now(),
                             trace_parent = NULL, trace_baggage = NULL,
                             next_run_id = CASE WHEN u.next IS NULL THEN NULL
                                                WHEN u.fired OR tasks.next_run_id IS NULL THEN gen_random_uuid()
                                                ELSE tasks.next_run_id END
            FROM unnest($1::uuid[], $2::timestamptz[], $3::int[], $4::bool[]) AS u(id, next, skipped, fired)
            WHERE tasks.id = u.id
            """, [taskIDs, nextTimes, skips, fired])
        return Materialized(
            created: created, scheduled: scheduled, cancelled: cancelled, queued: queued, roomLeft: room, walk: walk)
    }

    /// The message of a run written `queued` by step 1, from its task's row: what `claimed` reads
    /// back for other runs. Its `start_by` is on the database's clock (the row's `now()`); a run
    /// made here starts a new workflow run if any, so no upstream has a result for it yet.
    static func directRun(
        _ r: PostgresRow, id: UUID, taskID: UUID, occurrence: Date, now: Date, traceparent: String
    ) throws -> ClaimedRun {
        typealias C = DueColumn
        let scheduleToStart = try r.double(C.scheduleToStart)
        return try claimedRun(
            runID: id, taskID: taskID, name: try r.string(C.name), occurrence: occurrence, attempt: 1,
            queue: try r.string(C.queue), executor: try r.string(C.executor), parameters: try r.string(C.parameters),
            timeoutSeconds: try r.double(C.timeoutSeconds), startBy: now.addingTimeInterval(scheduleToStart),
            inputs: nil, traceparent: traceparent, baggage: r[C.baggage], priority: try r.int(C.priority),
            scheduleToStartSeconds: scheduleToStart)
    }

    /// One round trip before a scan: when something is next due (a task, a ready run, an expired
    /// lease: due now when ≤ 0), each queue's broker backlog (runs `queued` or `dispatched`), and
    /// the queues with a rate limit. Every part is an index probe, so an idle tick costs one query
    /// whatever the number of tasks or waiting runs.
    package func scanProbe(since: Date? = nil) async throws -> ScanProbe {
        try await pool.withConnection { c in
            var probe = ScanProbe()
            for r in try await c.query(Self.probeSQL, [Priority.allCases.map(\.rawValue), since]).rows {
                probe.nextDueIn = r[0].flatMap(Double.init)
                probe.rateLimited = Set(Self.textArray(r[1] ?? "{}"))
                if let q = r[2] { probe.backlog[q] = try r.int(3) }
                probe.runsReady = try r.bool(4)
                probe.paused = Set(Self.textArray(r[5] ?? "{}"))
                probe.leasesExpired = try r.bool(6)
                probe.newDueIn = r[7].flatMap(Double.init)
            }
            return probe
        }
    }

    /// `runs_ready` is ordered by (priority, available_at), so the earliest ready run is found with
    /// one probe per priority; waiting runs (`'infinity'`) are not due. `$2`, when given, asks for
    /// the first task due after it (`ScanProbe.newDueIn`): one more probe of `tasks_due`.
    package static let probeSQL = """
        WITH ready AS (
            SELECT min((SELECT r.available_at FROM runs r WHERE r.state = 'scheduled' AND r.priority = p AND
                r.available_at < 'infinity'
                        ORDER BY r.available_at LIMIT 1)) AS at FROM unnest($1::smallint[]) p
        ), lease AS (
            SELECT min(available_at) AS at FROM runs WHERE state = 'queued'
        ), next AS (
            SELECT least(
                (SELECT min(next_run_at) FROM tasks WHERE NOT paused AND deleted_at IS NULL AND next_run_at IS NOT
                    NULL),
                (SELECT at FROM ready),
                (SELECT at FROM lease)) AS at,
                (SELECT coalesce(array_agg(queue ORDER BY queue), '{}') FROM queue_limits) AS limited,
                coalesce((SELECT at <= now() FROM ready), false) AS runs_ready,
                (SELECT coalesce(array_agg(queue ORDER BY queue), '{}') FROM queue_pauses) AS paused,
                coalesce((SELECT at <= now() FROM lease), false) AS leases_expired
        ), backlog AS (
            SELECT queue, count(*) AS n FROM runs WHERE state IN ('queued', 'dispatched') GROUP BY queue
        )
        SELECT extract(epoch FROM next.at - now()), next.limited::text, backlog.queue, backlog.n, next.runs_ready,
            next.paused::text, next.leases_expired,
            extract(epoch FROM (SELECT min(next_run_at) FROM tasks WHERE NOT paused AND deleted_at IS NULL AND
                next_run_at IS NOT NULL AND next_run_at > $2::timestamptz) - now())
        FROM next LEFT JOIN backlog ON true
        """

    /// Marks runs the broker confirmed `age` seconds ago as `dispatched` (forward only: a run a
    /// status moved on is left alone), dated from the confirm, each with its start deadline:
    /// `startWithin` seconds (its task's schedule-to-start timeout) plus `grace` from the confirm.
    package func markDispatched(
        _ runs: [(id: UUID, startWithin: Double, age: Double)], grace: Duration
    ) async throws {
        guard !runs.isEmpty else { return }
        _ = try await pool.withConnection { c in
            // Rows locked in id order, as status recording does, so the two never deadlock.
            try await c.query(
                """
                UPDATE runs SET state = 'dispatched', dispatched_at = now() - make_interval(secs => u.age),
                                deadline_at = now() + make_interval(secs => u.within + $3 - u.age)
                FROM unnest($1::uuid[], $2::float8[], $4::float8[]) AS u(id, within, age)
                WHERE runs.id = u.id AND runs.id IN (SELECT id FROM runs WHERE id = ANY($1::uuid[]) AND state = 'queued'
                    ORDER BY id FOR UPDATE)
                """, [runs.map(\.id), runs.map(\.startWithin), grace.inSeconds, runs.map(\.age)])
        }
    }

    /// Shortens the lease of runs whose publish failed, so they are republished after `delay`.
    package func retryPublishSoon(_ runIDs: [UUID], delay: Duration) async throws {
        guard !runIDs.isEmpty else { return }
        let secs = delay.inSeconds
        _ = try await pool.withConnection { c in
            try await c.query(
                """
                UPDATE runs SET available_at = now() + make_interval(secs => $2)
                WHERE id IN (SELECT id FROM runs WHERE id = ANY($1::uuid[]) AND state = 'queued' ORDER BY id FOR UPDATE)
                """, [runIDs, secs])
        }
    }
}
