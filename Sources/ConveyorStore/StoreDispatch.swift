public import ConveyorCore
import ConveyorPostgres
public import Foundation

/// A run claimed for publishing: everything its task message needs.
public struct ClaimedRun: Sendable {
    public var message: TaskMessage
    public var traceparent: String
    /// W3C baggage of the request behind the run, for the message's `baggage` header.
    public var baggage: String?
    /// The run's priority (a metrics label; the message itself does not carry it).
    public var priority: Priority = .normal
}

/// What a scan tick learns before claiming (`Store.scanProbe`).
public struct ScanProbe: Sendable {
    /// Seconds until something is due; ≤ 0 means due now, `nil` nothing scheduled.
    public var nextDueIn: Double?
    /// Whether a `scheduled` run is ready now (a retry, a held-back run, work over a backlog).
    /// When none is, due tasks may skip `scheduled` and go straight to `queued`.
    public var runsReady = true
    public var backlog: [String: Int] = [:]
    /// Queues with a rate limit (`queue_limits`).
    public var rateLimited: Set<String> = []

    public init() {}

    public var due: Bool { (nextDueIn ?? 1) <= 0 }
}

/// How one task group is claimed (see docs/architecture.md, "Dispatch").
public struct ClaimRequest: Sendable {
    public var group: Int
    public var groups: Int
    /// Runs claimed per transaction.
    public var limit: Int
    /// The outbox lease: a `queued` run not confirmed by then is republished by any dispatcher.
    public var lease: Duration
    /// Occurrences older than this are *missed* and go by the task's misfire policy.
    public var misfireGrace: Duration
    /// How many more runs each queue may have `queued` or `dispatched` (its broker backlog), for
    /// this group; queues not named get `defaultRoom`.
    public var room: [String: Int] = [:]
    public var defaultRoom = Int.max
    /// Queues with a rate limit; the token buckets are read only when a candidate is in one.
    public var rateLimited: Set<String> = []
    /// Due occurrences may be written straight as `queued` (claimed) when nothing else is ready
    /// ahead of them (no `scheduled` run ready, from the probe), their queue has room, and no
    /// concurrency key, rate limit or overlap wait applies. One row version fewer per run.
    public var straightToQueue = false
    /// Makes the trace context of a new run, given the task's stored context (if any).
    public var newTraceParent: @Sendable (String?) -> String

    public init(group: Int, groups: Int, limit: Int, lease: Duration, misfireGrace: Duration,
                newTraceParent: @escaping @Sendable (String?) -> String) {
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
    public var shards: (lower: Int, upper: Int) {
        let span = 1 << 31
        return (group * span / groups, (group + 1) * span / groups)
    }
}

/// What one claim did.
public struct ClaimResult: Sendable {
    /// Runs to publish now.
    public var runs: [ClaimedRun] = []
    /// Runs cancelled in the claim (overlap `replace`): their workers are told.
    public var cancelled: [UUID] = []
    /// New runs created from due tasks.
    public var created = 0
    /// Ready runs held back by a concurrency key or a queue's rate limit.
    public var heldBack = 0
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
    public func claimDue(_ q: ClaimRequest) async throws -> ClaimResult {
        try await pool.withTransaction { c in
            var result = ClaimResult()
            let (created, cancelled, direct, roomLeft) = try await Self.materialize(q, c)
            result.created = created
            result.cancelled = cancelled
            var rest = q
            rest.room = roomLeft
            let (ready, held) = try await Self.claimReady(rest, c)
            result.runs = direct + ready
            result.heldBack = held
            let room = q.limit - result.runs.count
            if room > 0 { result.runs += try await Self.claimExpiredLeases(q, room: room, c) }
            return result
        }
    }

    /// Step 1: due tasks → `scheduled` runs (or `queued`, see `straightToQueue`). Returns how many
    /// runs it created, which active runs it cancelled (overlap `replace`), the runs it wrote
    /// `queued`, and each queue's room left after them.
    static func materialize(_ q: ClaimRequest, _ c: PostgresConnection) async throws -> (Int, [UUID], [ClaimedRun], [String: Int]) {
        let due = try await c.query("""
            SELECT t.id, t.schedule, t.timezone, t.misfire_policy, t.max_catchup, t.next_run_at, now(), t.overlap_policy,
                   t.queue, t.priority, t.concurrency_key, t.shard, t.trace_parent, coalesce(t.anchor_at, t.next_run_at),
                   CASE WHEN t.overlap_policy <> 'allow' THEN
                       (SELECT count(*) FROM runs r WHERE r.task_id = t.id AND r.state IN ('scheduled', 'queued', 'dispatched', 'running')
                          AND r.available_at < 'infinity') ELSE 0 END,
                   CASE WHEN t.overlap_policy = 'queue' THEN
                       (SELECT count(*) FROM runs r WHERE r.task_id = t.id AND r.state = 'scheduled' AND r.available_at = 'infinity') ELSE 0 END,
                   EXISTS (SELECT 1 FROM task_dependencies d WHERE d.upstream_id = t.id), t.trace_baggage
            FROM tasks t
            WHERE t.next_run_at <= now() AND NOT t.paused AND t.deleted_at IS NULL AND t.next_run_at IS NOT NULL
              AND t.shard >= $1::bigint AND t.shard < $2::bigint
            ORDER BY t.next_run_at
            LIMIT $3
            FOR UPDATE SKIP LOCKED
            """, [q.shards.lower, q.shards.upper, q.limit])
        guard !due.rows.isEmpty else { return (0, [], [], q.room) }
        var runs = NewRuns(), direct = NewRuns()
        var room = q.room
        var taskIDs: [UUID] = [], nextTimes: [Date?] = [], skips: [Int] = []
        var replaceTasks: [UUID] = []
        var workflows: (ids: [UUID], roots: [UUID], occurrences: [Date]) = ([], [], [])
        var zones: [String: TimeZone] = [:]
        for r in due.rows {
            let taskID = try r.uuid(0)
            let now = try r.date(6)
            let schedule = try Schedule(parsing: try r.string(1))
            let zoneName = try r.string(2)
            let zone = zones[zoneName] ?? TimeZone(identifier: zoneName) ?? .gmt
            zones[zoneName] = zone
            let misfire = (try? MisfirePolicy(parsing: try r.string(3))) ?? .once
            let overlap = (try? OverlapPolicy(parsing: try r.string(7))) ?? .allow
            let dueAt = try r.date(5)
            let plan = schedule.plan(due: dueAt, anchor: try r.date(13), now: now, timeZone: zone, misfire: misfire,
                                     maxCatchup: try r.int(4), grace: q.misfireGrace.inSeconds)
            var fire = plan.fire
            var skipped = plan.skipped
            var waiting = false
            let active = try r.int(14)
            if overlap != .allow && fire.count > 1 { skipped += fire.count - 1; fire = [fire[fire.count - 1]] }
            if active > 0 {
                switch overlap {
                case .allow: break
                case .forbid: skipped += fire.count; fire = []
                case .queue:
                    if try r.int(15) == 0 && !fire.isEmpty { waiting = true } else { skipped += fire.count; fire = [] }
                case .replace: replaceTasks.append(taskID)
                }
            }
            let isRoot = try r.bool(16)
            for occurrence in fire {
                let tp = q.newTraceParent(r[12])
                var workflow: UUID?
                if isRoot {
                    workflow = UUID()
                    workflows.ids.append(workflow!); workflows.roots.append(taskID); workflows.occurrences.append(occurrence)
                }
                let queue = try r.string(8)
                let queueRoom = room[queue] ?? q.defaultRoom
                if q.straightToQueue && !waiting && r[10] == nil && !q.rateLimited.contains(queue) && queueRoom > 0 {
                    room[queue] = queueRoom - 1
                    direct.append(id: UUID(), task: taskID, occurrence: occurrence, attempt: 1, queue: queue, shard: try r.int(11),
                                  delay: q.lease.inSeconds, priority: try r.int(9), key: nil, workflow: workflow, traceparent: tp, baggage: r[17])
                } else {
                    runs.append(id: UUID(), task: taskID, occurrence: occurrence, attempt: 1, queue: queue, shard: try r.int(11),
                                delay: waiting ? nil : 0, priority: try r.int(9), key: r[10], workflow: workflow, traceparent: tp, baggage: r[17])
                }
            }
            taskIDs.append(taskID); nextTimes.append(plan.next); skips.append(skipped)
        }
        var cancelled: [UUID] = []
        if !replaceTasks.isEmpty {
            let ended = try await c.query("""
                UPDATE runs SET state = 'cancelled', finished_at = now(), reason = 'replaced by a newer occurrence (overlap policy replace)',
                                cancel_pending = state IN ('queued', 'dispatched', 'running')
                WHERE id IN (SELECT id FROM runs WHERE task_id = ANY($1::uuid[])
                             AND state IN ('scheduled', 'queued', 'dispatched', 'running') ORDER BY id FOR UPDATE)
                RETURNING \(Ended.columns)
                """, [replaceTasks]).rows.map(Ended.init)
            cancelled = ended.map(\.id)
            _ = try await settle(ended, c)
        }
        if !workflows.ids.isEmpty {
            try await c.query("""
                INSERT INTO workflow_runs (id, root_task_id, occurrence) SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[])
                """, [workflows.ids, workflows.roots, workflows.occurrences])
        }
        var created = try await runs.insert(state: "scheduled", c)
        var queued: [ClaimedRun] = []
        if !direct.isEmpty {
            created += try await direct.insert(state: "queued", c)
            // The inserted ones (a conflict on the occurrence key inserts nothing), as messages.
            queued = try await c.query("""
                SELECT \(messageColumns) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE r.id = ANY($1::uuid[]) AND r.state = 'queued'
                """, [direct.ids]).rows.map { try claimed($0, q) }
        }
        try await c.query("""
            UPDATE tasks SET next_run_at = u.next, skipped_occurrences = skipped_occurrences + u.skipped, updated_at = now(),
                             trace_parent = NULL, trace_baggage = NULL
            FROM unnest($1::uuid[], $2::timestamptz[], $3::int[]) AS u(id, next, skipped)
            WHERE tasks.id = u.id
            """, [taskIDs, nextTimes, skips])
        return (created, cancelled, queued, room)
    }

    /// Step 2: ready runs by priority within each queue's room, rate limit and concurrency keys.
    static func claimReady(_ q: ClaimRequest, _ c: PostgresConnection) async throws -> ([ClaimedRun], Int) {
        let full = q.room.filter { $0.value <= 0 }.map(\.key)
        if q.defaultRoom <= 0 { return ([], 0) }
        // No join: the task's concurrency limit and namespace are looked up only for runs that
        // have a key. The limit is the room: candidates past it would be locked for nothing.
        let roomBound = max(q.defaultRoom, q.room.values.max() ?? 0)
        let candidates = try await c.query("""
            SELECT r.id, r.queue, r.concurrency_key,
                   CASE WHEN r.concurrency_key IS NOT NULL THEN (SELECT t.concurrency_limit FROM tasks t WHERE t.id = r.task_id) END,
                   CASE WHEN r.concurrency_key IS NOT NULL THEN (SELECT t.namespace FROM tasks t WHERE t.id = r.task_id) END
            FROM runs r
            WHERE r.state = 'scheduled' AND r.available_at <= now() AND r.shard >= $1::bigint AND r.shard < $2::bigint AND r.queue <> ALL($4::text[])
            ORDER BY r.priority, r.available_at
            LIMIT $3
            FOR UPDATE OF r SKIP LOCKED
            """, [q.shards.lower, q.shards.upper, min(q.limit, roomBound), full])
        guard !candidates.rows.isEmpty else { return ([], 0) }
        struct Candidate { var id: UUID; var queue: String; var key: ScopedKey?; var limit: Int? }
        let list = try candidates.rows.map { r in
            Candidate(id: try r.uuid(0), queue: try r.string(1),
                      key: r[2].map { ScopedKey(namespace: r[4] ?? "default", key: $0) }, limit: try r.optionalInt(3))
        }

        // Rate limits: refill the token buckets of the limited queues among the candidates (row
        // locks serialize dispatchers per queue). Most claims touch no limited queue and skip this.
        var tokens: [String: Double] = [:], rates: [String: Double] = [:]
        let limited = Array(Set(list.map(\.queue)).intersection(q.rateLimited)).sorted()
        let buckets = limited.isEmpty ? [] : try await c.query("""
            UPDATE queue_limits SET tokens = least(burst, tokens + extract(epoch FROM now() - refilled_at) * rate_per_second),
                                    refilled_at = now()
            WHERE queue IN (SELECT queue FROM queue_limits WHERE queue = ANY($1::text[]) ORDER BY queue FOR UPDATE)
            RETURNING queue, tokens, rate_per_second
            """, [limited]).rows
        for r in buckets { tokens[try r.string(0)] = try r.double(1); rates[try r.string(0)] = try r.double(2) }
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
            let namespaces = keys.map(\.namespace), names = keys.map(\.key)
            try await c.query("""
                SELECT pg_advisory_xact_lock(h) FROM (
                    SELECT DISTINCT hashtext('conveyor.key:' || length(ns) || ':' || ns || ':' || k) AS h
                    FROM unnest($1::text[], $2::text[]) AS u(ns, k) ORDER BY h) s
                """, [namespaces, names])
            for r in try await c.query("""
                SELECT t.namespace, r.concurrency_key, count(*) FROM runs r JOIN tasks t ON t.id = r.task_id
                WHERE r.concurrency_key = ANY($2::text[]) AND r.state IN ('queued', 'dispatched', 'running')
                  AND (t.namespace, r.concurrency_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))
                GROUP BY 1, 2
                """, [namespaces, names]).rows {
                inFlight[ScopedKey(namespace: try r.string(0), key: try r.string(1))] = try r.int(2)
            }
        }
        var room = q.room
        var accepted: [UUID] = [], heldKey: [UUID] = [], heldRate: [UUID: Double] = [:]
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
            try await c.query("""
                UPDATE queue_limits SET tokens = tokens - u.used FROM unnest($1::text[], $2::float8[]) AS u(queue, used)
                WHERE queue_limits.queue = u.queue
                """, [Array(used.keys), Array(used.values)])
        }
        // Held back: they step aside briefly so that runs behind them are not starved; their
        // priority still orders them first among what is ready.
        let held = heldKey.map { ($0, 1.0) } + heldRate.map { ($0.key, min(max($0.value, 0.05), 5)) }
        if !held.isEmpty {
            try await c.query("""
                UPDATE runs SET available_at = now() + make_interval(secs => u.delay)
                FROM unnest($1::uuid[], $2::float8[]) AS u(id, delay) WHERE runs.id = u.id
                """, [held.map(\.0), held.map(\.1)])
        }
        guard !accepted.isEmpty else { return ([], held.count) }
        let rows = try await c.query("""
            UPDATE runs r SET state = 'queued', available_at = now() + make_interval(secs => $2), publish_count = r.publish_count + 1
            FROM tasks t
            WHERE t.id = r.task_id AND r.id = ANY($1::uuid[])
            RETURNING \(messageColumns)
            """, [accepted, q.lease.inSeconds])
        return (try rows.rows.map { try claimed($0, q) }, held.count)
    }

    /// Step 3: the outbox. Runs left `queued` past their lease are published again.
    static func claimExpiredLeases(_ q: ClaimRequest, room: Int, _ c: PostgresConnection) async throws -> [ClaimedRun] {
        try await c.query("""
            UPDATE runs r SET available_at = now() + make_interval(secs => $4), publish_count = r.publish_count + 1
            FROM tasks t
            WHERE t.id = r.task_id AND r.id IN (
                SELECT id FROM runs WHERE state = 'queued' AND available_at <= now() AND shard >= $1::bigint AND shard < $2::bigint
                ORDER BY available_at LIMIT $3 FOR UPDATE SKIP LOCKED)
            RETURNING \(messageColumns)
            """, [q.shards.lower, q.shards.upper, room, q.lease.inSeconds]).rows.map { try claimed($0, q) }
    }

    static let messageColumns = """
        r.id, r.task_id, t.name, t.executor, t.parameters::text, r.queue, t.timeout_seconds, r.occurrence, r.attempt, r.traceparent, r.priority, r.baggage
        """

    static func claimed(_ r: PostgresRow, _ q: ClaimRequest) throws -> ClaimedRun {
        let m = TaskMessage(runID: try r.uuid(0), taskID: try r.uuid(1), taskName: try r.string(2), occurrence: try r.date(7),
                            attempt: try r.int(8), queue: try r.string(5), executor: try r.string(3),
                            parameters: try json(try r.string(4)), timeoutSeconds: try r.double(6))
        return ClaimedRun(message: m, traceparent: r[9] ?? q.newTraceParent(nil), baggage: r[11],
                          priority: Priority(rawValue: try r.int(10)) ?? .normal)
    }

    /// One round trip before a scan: when something is next due (a task, a ready run, an expired
    /// lease: due now when ≤ 0), each queue's broker backlog (runs `queued` or `dispatched`), and
    /// the queues with a rate limit. Every part is an index probe, so an idle tick costs one query
    /// whatever the number of tasks or waiting runs.
    public func scanProbe() async throws -> ScanProbe {
        try await pool.withConnection { c in
            var probe = ScanProbe()
            for r in try await c.query(Self.probeSQL, [Priority.allCases.map(\.rawValue)]).rows {
                probe.nextDueIn = r[0].flatMap(Double.init)
                probe.rateLimited = Set(Self.textArray(r[1] ?? "{}"))
                if let q = r[2] { probe.backlog[q] = try r.int(3) }
                probe.runsReady = try r.bool(4)
            }
            return probe
        }
    }

    /// `runs_ready` is ordered by (priority, available_at), so the earliest ready run is found with
    /// one probe per priority; waiting runs (`'infinity'`) are not due.
    public static let probeSQL = """
        WITH ready AS (
            SELECT min((SELECT r.available_at FROM runs r WHERE r.state = 'scheduled' AND r.priority = p AND r.available_at < 'infinity'
                        ORDER BY r.available_at LIMIT 1)) AS at FROM unnest($1::smallint[]) p
        ), next AS (
            SELECT least(
                (SELECT min(next_run_at) FROM tasks WHERE NOT paused AND deleted_at IS NULL AND next_run_at IS NOT NULL),
                (SELECT at FROM ready),
                (SELECT min(available_at) FROM runs WHERE state = 'queued')) AS at,
                (SELECT coalesce(array_agg(queue ORDER BY queue), '{}') FROM queue_limits) AS limited,
                coalesce((SELECT at <= now() FROM ready), false) AS runs_ready
        ), backlog AS (
            SELECT queue, count(*) AS n FROM runs WHERE state IN ('queued', 'dispatched') GROUP BY queue
        )
        SELECT extract(epoch FROM next.at - now()), next.limited::text, backlog.queue, backlog.n, next.runs_ready
        FROM next LEFT JOIN backlog ON true
        """

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
}

/// A concurrency key as the claim counts it: per namespace (the same name in two namespaces is
/// two keys).
struct ScopedKey: Hashable {
    var namespace: String
    var key: String
}

/// New run rows, inserted with one statement.
struct NewRuns {
    var ids: [UUID] = [], tasks: [UUID] = [], occurrences: [Date] = [], attempts: [Int] = [], queues: [String] = []
    var shards: [Int] = [], delays: [Double?] = [], priorities: [Int] = [], keys: [String?] = [], workflows: [UUID?] = []
    var traceIDs: [String] = [], traceparents: [String?] = [], baggages: [String?] = [], reasons: [String?] = []

    var isEmpty: Bool { ids.isEmpty }

    /// `delay` in seconds from now; `nil` waits until released (overlap `queue`).
    mutating func append(id: UUID, task: UUID, occurrence: Date, attempt: Int, queue: String, shard: Int, delay: Double?,
                         priority: Int, key: String?, workflow: UUID?, traceparent: String?, baggage: String?, reason: String? = nil) {
        ids.append(id); tasks.append(task); occurrences.append(occurrence); attempts.append(attempt); queues.append(queue)
        shards.append(shard); delays.append(delay); priorities.append(priority); keys.append(key); workflows.append(workflow)
        traceIDs.append(traceparent.map(Store.traceID(of:)) ?? ""); traceparents.append(traceparent); baggages.append(baggage)
        reasons.append(reason)
    }

    /// Inserts as `state`; an occurrence's attempt that exists already is left alone. Returns the rows inserted.
    func insert(state: String, _ c: PostgresConnection) async throws -> Int {
        guard !isEmpty else { return 0 }
        return try await c.query("""
            INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at, priority, concurrency_key,
                              workflow_run_id, trace_id, traceparent, reason, finished_at, publish_count, baggage)
            SELECT u.id, u.task, u.occ, u.attempt, $14::text, u.queue, u.shard,
                   CASE WHEN u.delay IS NULL THEN 'infinity'::timestamptz ELSE now() + make_interval(secs => u.delay) END,
                   u.prio, u.key, u.wf, nullif(u.trace_id, ''), u.tp, u.reason,
                   CASE WHEN $14::text = 'skipped' THEN now() END, CASE WHEN $14::text = 'queued' THEN 1 ELSE 0 END, u.baggage
            FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::int[], $5::text[], $6::int[], $7::float8[], $8::smallint[],
                        $9::text[], $10::uuid[], $11::text[], $12::text[], $13::text[], $15::text[])
                 AS u(id, task, occ, attempt, queue, shard, delay, prio, key, wf, trace_id, tp, reason, baggage)
            ON CONFLICT (task_id, occurrence, attempt) DO NOTHING
            """, [ids, tasks, occurrences, attempts, queues, shards, delays, priorities, keys, workflows, traceIDs, traceparents,
                  reasons, state, baggages]).affectedRows
    }
}
