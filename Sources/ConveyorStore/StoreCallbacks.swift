import ConveyorCore
import ConveyorPostgres
package import Foundation

/// A callback to deliver: a task's outcome POSTed to its `callback_url`.
package struct CallbackDelivery: Sendable {
    package var id: Int
    package var runID: UUID
    package var url: String
    package var payload: String
    /// This delivery's attempt number, from 1.
    package var attempt: Int
    /// The run's stored trace context: the callback's client span is a child of it.
    package var traceparent: String?
    /// The run's W3C baggage, sent on as the callback's `baggage`.
    package var baggage: String?
}

/// What became of one delivery attempt.
package enum CallbackOutcome: Sendable {
    case delivered(status: Int)
    /// Try again at `now() + after`.
    case retry(after: Duration, status: Int?, error: String)
    /// Given up: a final refusal, or the attempts are used up.
    case failed(status: Int?, error: String)
}

/// A callback as `GET /v1/runs/{id}` (and `conveyorctl run get`) lists it.
package struct CallbackRecord: Sendable {
    package var url: String
    package var attempts: Int
    package var state: String
    package var lastStatus: Int?
    package var lastError: String?
}

extension Store {
    /// Claims callbacks that are due: each is leased (its `next_at` pushed by `lease`) and its
    /// attempt counted, so a dispatcher that dies mid-delivery leaves it to be tried again, by any
    /// dispatcher, when the lease ends. Receivers see at-least-once delivery.
    package func claimCallbacks(limit: Int, lease: Duration) async throws -> [CallbackDelivery] {
        try await pool.withConnection { c in
            try await c.query(
                """
                UPDATE callbacks c SET attempts = c.attempts + 1, next_at = now() + make_interval(secs => $2)
                WHERE c.id IN (SELECT id FROM callbacks WHERE delivered_at IS NULL AND failed_at IS NULL AND next_at <=
                    now()
                               ORDER BY next_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                RETURNING c.id, c.run_id, c.url, c.payload, c.attempts,
                          (SELECT traceparent FROM runs WHERE runs.id = c.run_id), (SELECT baggage FROM runs WHERE
                              runs.id = c.run_id)
                """, [limit, lease.inSeconds]
            ).rows.map {
                CallbackDelivery(
                    id: try $0.int(0), runID: try $0.uuid(1), url: try $0.string(2), payload: try $0.string(3),
                    attempt: try $0.int(4),
                    traceparent: $0[5], baggage: $0[6])
            }
        }
    }

    /// Records what became of delivery attempts, in one statement.
    package func finishCallbacks(_ outcomes: [(id: Int, outcome: CallbackOutcome)]) async throws {
        guard !outcomes.isEmpty else { return }
        var ids: [Int] = []
        var states: [String] = []
        var delays: [Double?] = []
        var statuses: [Int?] = []
        var errors: [String?] = []
        for (id, o) in outcomes {
            ids.append(id)
            switch o {
            case .delivered(let s):
                states.append("delivered")
                delays.append(nil)
                statuses.append(s)
                errors.append(nil)
            case .retry(let d, let s, let e):
                states.append("retry")
                delays.append(d.inSeconds)
                statuses.append(s)
                errors.append(e)
            case .failed(let s, let e):
                states.append("failed")
                delays.append(nil)
                statuses.append(s)
                errors.append(e)
            }
        }
        try await pool.withConnection { c in
            _ = try await c.query(
                """
                UPDATE callbacks SET
                    delivered_at = CASE WHEN u.state = 'delivered' THEN now() END,
                    failed_at = CASE WHEN u.state = 'failed' THEN now() END,
                    next_at = CASE WHEN u.state = 'retry' THEN now() + make_interval(secs => u.delay) ELSE
                        callbacks.next_at END,
                    last_status = u.status, last_error = u.error
                FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::int[], $5::text[]) AS u(id, state, delay,
                    status, error)
                WHERE callbacks.id = u.id
                """, [ids, states, delays, statuses, errors])
        }
    }

    /// The callbacks of one run.
    package func callbacks(run: UUID) async throws -> [CallbackRecord] {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT url, attempts, CASE WHEN delivered_at IS NOT NULL THEN 'delivered' WHEN failed_at IS NOT NULL
                    THEN 'failed' ELSE 'pending' END,
                       last_status, last_error
                FROM callbacks WHERE run_id = $1 ORDER BY id
                """, [run]
            ).rows.map {
                CallbackRecord(
                    url: try $0.string(0), attempts: try $0.int(1), state: try $0.string(2),
                    lastStatus: $0[3].flatMap { Int($0) }, lastError: $0[4])
            }
        }
    }
}
