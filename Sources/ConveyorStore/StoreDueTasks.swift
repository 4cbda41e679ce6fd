import ConveyorCore
import ConveyorPostgres
package import Foundation

/// How far one task group's walk of the due tasks got: every due task up to here (in
/// `next_run_at`, then id order) was seen once, and was made a run or left waiting for room (its
/// queue is then among the waiting queues). See `Store.dueTasks`.
package struct DuePosition: Sendable, Equatable {
    package var at: Date
    package var id: UUID

    package init(at: Date, id: UUID) {
        self.at = at
        self.id = id
    }

    /// The id of a position at the end of a walk: past every task due at its instant.
    package static let end = UUID.max
}

/// What one group's claim learned about the due tasks that wait for room (`ClaimResult.walk`).
package struct DueWalk: Sendable {
    /// Where the next walk of this group starts.
    package var seenUpTo: DuePosition?
    /// For each waiting queue, by priority, the last due task this group took: the next claim goes
    /// on after it (tasks due later sort after it within their priority).
    package var waitingFrom: [String: [Int: DuePosition]] = [:]
    /// Queues whose due tasks were left waiting for room.
    package var leftWaiting: Set<String> = []
    /// Waiting queues in which this group found no due task left.
    package var drained: Set<String> = []
}

extension Store {
    /// Where a due task came from in `dueTasks`: it decides whether it may wait for room.
    enum DueSource {
        /// Due for half the misfire grace: made a run now, room or not, before it is missed.
        case aged
        /// Of a queue known to have due tasks waiting for room, taken by priority.
        case waiting
        /// Found by the walk of tasks not seen before; also every row when runs are made `scheduled`
        /// first (no `DueWalk`), where nothing reads the source.
        case found
    }

    /// Step 1's due tasks when due tasks may wait for room as tasks (`ClaimRequest.straightToQueue`):
    ///
    /// 0. tasks due for half the misfire grace, oldest first (they become runs whatever the room);
    /// 1. for each of `request.claimWaiting` with room, its due tasks of every shard by priority, then due time, up to the room (one statement per queue, through
    ///    `tasks_waiting`), each priority from where the last such claim took its last
    ///    (`request.waitingFrom`);
    /// 2. due tasks of the other queues not seen by this group's earlier walks, from
    ///    `request.seenUpTo` on, in due order (`tasks_due`).
    ///
    /// A due task of a full queue is seen by step 2 once; after that its queue is *waiting* and only
    /// step 1 reads it, when the queue has room. So a tick that finds every queue full reads index
    /// entries only, whatever the number of due tasks waiting (docs/architecture.md, "Due tasks wait
    /// for room as tasks").
    static func dueTasks(
        _ q: ClaimRequest, room: [String: Int], _ c: PostgresConnection
    ) async throws -> (rows: [(PostgresRow, DueSource)], walk: DueWalk) {
        let half = q.misfireGrace.inSeconds / 2
        var rows: [(PostgresRow, DueSource)] = []
        var walk = DueWalk(seenUpTo: q.seenUpTo, waitingFrom: q.waitingFrom)
        if q.agedPossible {
            for r in try await c.query(
                """
                SELECT \(dueColumns) FROM tasks t
                WHERE \(dueTask) AND t.next_run_at <= now() - make_interval(secs => $4)
                ORDER BY t.next_run_at LIMIT $3 FOR UPDATE SKIP LOCKED
                """, [q.shards.lower, q.shards.upper, q.limit, half]
            ).rows {
                rows.append((r, .aged))
            }
        }
        let priorities = Priority.allCases.map(\.rawValue)
        for queue in q.claimWaiting.sorted() {
            let room = min(room[queue] ?? q.defaultRoom, q.limit - rows.count)
            if room <= 0 { continue }
            // Each priority in turn, in due order within it, from the last taken (or from half the
            // misfire grace ago: older ones are step 0's): index range scans that stop at the room,
            // and never walk back over the tasks taken before (their old index entries stay until
            // a vacuum). The bounds are row comparisons led by the priority, which only
            // `tasks_waiting` can serve: PostgreSQL would otherwise walk `tasks_due` and filter.
            let from = priorities.map { q.waitingFrom[queue]?[$0] }
            let taken = try await c.query(
                """
                SELECT \(dueColumns) FROM (
                    SELECT u.priority, greatest(u.at, a.at) AS at, CASE WHEN u.at > a.at THEN u.id ELSE $9::uuid END AS id
                    FROM unnest($5::smallint[], $7::timestamptz[], $8::uuid[]) u(priority, at, id),
                         (SELECT now() - make_interval(secs => $4) AS at) a) p
                CROSS JOIN LATERAL (
                    SELECT * FROM tasks t
                    WHERE t.queue = $6 AND t.priority = p.priority AND \(dueTask)
                      AND (t.priority, t.next_run_at) <= (p.priority, now())
                      AND (t.priority, t.next_run_at, t.id) > (p.priority, p.at, p.id)
                    ORDER BY t.next_run_at, t.id LIMIT $3 FOR UPDATE SKIP LOCKED) t
                LIMIT $3
                """,
                [
                    ClaimRequest.allShards.lower, ClaimRequest.allShards.upper, room, half, priorities, queue,
                    from.map { $0?.at ?? Self.earliest }, from.map { $0?.id ?? UUID.min }, DuePosition.end,
                ]
            ).rows
            // None left (not merely fewer than the room: another dispatcher may hold some locked,
            // and it goes on taking them).
            if taken.isEmpty { walk.drained.insert(queue) }
            for r in taken {
                walk.waitingFrom[queue, default: [:]][try r.int(DueColumn.priority)] = DuePosition(
                    at: try r.date(DueColumn.nextRunAt), id: try r.uuid(DueColumn.id))
            }
            rows += taken.map { ($0, .waiting) }
        }
        let limit = q.limit - rows.count
        // Step 2 when it may find something: not after a walk to the end with nothing due since.
        guard limit > 0, q.newDuePossible || q.seenUpTo?.id != DuePosition.end else { return (rows, walk) }
        // The queue is compared as an expression: PostgreSQL would otherwise estimate from the
        // column's statistics that few rows pass (all due tasks may be in a waiting queue) and sort
        // a sequential scan of the table instead of walking `tasks_due` from the position.
        // The position is a row comparison, so that it bounds the scan of `tasks_due (next_run_at, id)`.
        let after = q.seenUpTo == nil ? "" : "AND (t.next_run_at, t.id) > ($6::timestamptz, $7::uuid)"
        var parameters: [any PostgresEncodable] = [q.shards.lower, q.shards.upper, limit, half, q.waiting.sorted()]
        if let from = q.seenUpTo { parameters += [from.at, from.id] }
        let found = try await c.query(
            """
            SELECT \(dueColumns) FROM tasks t
            WHERE \(dueTask) AND t.next_run_at <= now() AND t.next_run_at > now() - make_interval(secs => $4)
              \(after) AND (t.queue || '') <> ALL($5::text[])
            ORDER BY t.next_run_at, t.id LIMIT $3 FOR UPDATE SKIP LOCKED
            """, parameters
        ).rows
        if found.count == limit, let last = found.last {
            walk.seenUpTo = DuePosition(at: try last.date(DueColumn.nextRunAt), id: try last.uuid(DueColumn.id))
        } else {
            // Every due task up to now() was seen: the next walk starts there. now() is the
            // transaction's start, the same in every row read; only a claim that read none asks.
            var now = try (found.last ?? rows.last?.0)?.date(DueColumn.now)
            if now == nil { now = try await c.query("SELECT now()").rows[0].date(0) }
            walk.seenUpTo = now.map { DuePosition(at: $0, id: DuePosition.end) }
        }
        // Found in due order; a queue's room goes to the highest priority among them.
        // Stable: within a priority, due order stays.
        let priority = try found.map { try $0.int(DueColumn.priority) }
        let ordered = found.indices.sorted { a, b in
            priority[a] != priority[b] ? priority[a] < priority[b] : a < b
        }
        rows += ordered.map { (found[$0], .found) }
        return (rows, walk)
    }
}

extension Store {
    /// Before every due time a task can have (the API and the enqueue function refuse earlier ones).
    static let earliest = Date(timeIntervalSince1970: Double(Timestamp.earliestSeconds))

    /// What makes a task (`t`) one that step 1 may read when due, in the shards `[$1, $2)`: every
    /// read of due tasks starts from it.
    static let dueTask = """
        NOT t.paused AND t.deleted_at IS NULL AND t.next_run_at IS NOT NULL AND t.shard >= $1::bigint AND t.shard <
            $2::bigint
        """
}

extension UUID {
    /// The least UUID: a position before every task due at one instant.
    static let min = UUID(uuid: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    /// The greatest UUID: a position past every task due at one instant.
    static let max = UUID(
        uuid: (255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255))
}
