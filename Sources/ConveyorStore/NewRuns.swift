import ConveyorCore
import ConveyorPostgres
import Foundation

/// A concurrency key as the claim counts it: per namespace (the same name in two namespaces is
/// two keys).
struct ScopedKey: Hashable {
    var namespace: String
    var key: String
}

/// New run rows, inserted with one statement.
struct NewRuns {
    var ids: [UUID] = [], tasks: [UUID] = [], occurrences: [Date] = [], attempts: [Int] = [], queues: [String] = []
    var shards: [Int] = [], delays: [Double?] = [], priorities: [Int] = [], keys: [String?] = [],
        workflows: [UUID?] = []
    var traceIDs: [String] = [], traceparents: [String?] = [], baggages: [String?] = [], reasons: [String?] = []
    /// The backfill a row belongs to, when it is one run of a backfill run one at a time.
    var backfills: [UUID?] = []

    var isEmpty: Bool { ids.isEmpty }

    /// `delay` in seconds from now; `nil` waits until released (overlap `queue`).
    mutating func append(
        id: UUID, task: UUID, occurrence: Date, attempt: Int, queue: String, shard: Int, delay: Double?,
        priority: Int, key: String?, workflow: UUID?, traceparent: String?, baggage: String?, reason: String? = nil,
        backfill: UUID? = nil
    ) {
        ids.append(id)
        tasks.append(task)
        occurrences.append(occurrence)
        attempts.append(attempt)
        queues.append(queue)
        shards.append(shard)
        delays.append(delay)
        priorities.append(priority)
        keys.append(key)
        workflows.append(workflow)
        traceIDs.append(Traceparent.traceID(traceparent) ?? "")
        traceparents.append(traceparent)
        baggages.append(baggage)
        reasons.append(reason)
        backfills.append(backfill)
    }

    /// Inserts as `state`; an occurrence's attempt that exists already is left alone. Returns the rows inserted.
    func insert(state: String, _ c: PostgresConnection) async throws -> Int {
        guard !isEmpty else { return 0 }
        return try await c.query(Self.insertSQL, parameters(state: state)).affectedRows
    }

    /// Inserts as `insert(state:_:)` does; returns the ids of the rows inserted.
    func insertReturningIDs(state: String, _ c: PostgresConnection) async throws -> Set<UUID> {
        guard !isEmpty else { return [] }
        return Set(
            try await c.query(Self.insertSQL + " RETURNING id", parameters(state: state)).rows.map { try $0.uuid(0) })
    }

    private func parameters(state: String) -> [any PostgresEncodable] {
        [
            ids, tasks, occurrences, attempts, queues, shards, delays, priorities, keys, workflows, traceIDs,
            traceparents, reasons, state, baggages, backfills,
        ]
    }

    private static let insertSQL = """
        INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at, priority,
            concurrency_key,
                          workflow_run_id, trace_id, traceparent, reason, finished_at, publish_count, baggage,
                          backfill_id)
        SELECT u.id, u.task, u.occ, u.attempt, $14::text, u.queue, u.shard,
               CASE WHEN u.delay IS NULL THEN 'infinity'::timestamptz ELSE now() + make_interval(secs => u.delay)
                   END,
               u.prio, u.key, u.wf, nullif(u.trace_id, ''), u.tp, u.reason,
               CASE WHEN $14::text = 'skipped' THEN now() END, CASE WHEN $14::text = 'queued' THEN 1 ELSE 0 END,
                   u.baggage, u.backfill
        FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::int[], $5::text[], $6::int[], $7::float8[],
            $8::smallint[],
                    $9::text[], $10::uuid[], $11::text[], $12::text[], $13::text[], $15::text[], $16::uuid[])
             AS u(id, task, occ, attempt, queue, shard, delay, prio, key, wf, trace_id, tp, reason, baggage,
                  backfill)
        ON CONFLICT (task_id, occurrence, attempt) DO NOTHING
        """
}
