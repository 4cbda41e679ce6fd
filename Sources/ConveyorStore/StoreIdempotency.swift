import ConveyorCore
import ConveyorPostgres

extension Store {
    /// What a request carrying an `Idempotency-Key` finds.
    package enum IdempotencyClaim: Sendable, Equatable {
        /// The key is new (or its first request was abandoned): this request goes ahead, and
        /// records its answer with `completeIdempotencyKey` or gives the key up with
        /// `releaseIdempotencyKey`.
        case fresh
        /// The first request's answer, to send again.
        case replay(status: Int, body: String, batchID: String?)
        /// The key was first used for another route or another body.
        case mismatch(route: String)
        /// The first request with this key is still being answered.
        case inProgress
    }

    /// How long a key's first answer is kept; how long an unanswered first request holds its key.
    package static let idempotencyWindow: Duration = .seconds(86_400)
    package static let idempotencyAbandonedAfter: Duration = .seconds(60)

    /// Takes `key` for this request, or finds what its first request did.
    package func claimIdempotencyKey(namespace: String, key: String, route: String, hash: String) async throws
        -> IdempotencyClaim
    {
        try await pool.withConnection { c in
            // Expired answers are forgotten, and a first request that never answered (its API
            // process died) gives its key to the next one.
            let taken =
                try await c.query(
                    """
                    WITH gone AS (
                        DELETE FROM idempotency_keys WHERE namespace = $1 AND key = $2
                          AND (created_at < now() - make_interval(secs => $5)
                               OR (status IS NULL AND created_at < now() - make_interval(secs => $6)))
                        RETURNING 1)
                    INSERT INTO idempotency_keys (namespace, key, route, request_hash)
                    SELECT $1, $2, $3, $4 FROM (SELECT count(*) FROM gone) g
                    ON CONFLICT (namespace, key) DO NOTHING
                    RETURNING 1
                    """,
                    [
                        namespace, key, route, hash, Self.idempotencyWindow.inSeconds,
                        Self.idempotencyAbandonedAfter.inSeconds,
                    ]
                ).rows.count == 1
            if taken { return .fresh }
            guard
                let r = try await c.query(
                    "SELECT route, request_hash, status, body, batch_id FROM idempotency_keys WHERE namespace = $1 AND key = $2",
                    [namespace, key]
                ).rows.first
            else { return .inProgress }  // deleted in between: the client retries
            if try r.string(0) != route || r.string(1) != hash { return .mismatch(route: try r.string(0)) }
            guard let status = try r.optionalInt(2) else { return .inProgress }
            return .replay(status: status, body: r[3] ?? "null", batchID: r[4])
        }
    }

    /// Records the answer of the request that took `key`.
    package func completeIdempotencyKey(namespace: String, key: String, status: Int, body: String, batchID: String?)
        async throws
    {
        _ = try await pool.withConnection { c in
            try await c.query(
                "UPDATE idempotency_keys SET status = $3, body = $4, batch_id = $5 WHERE namespace = $1 AND key = $2",
                [namespace, key, status, body, batchID])
        }
    }

    /// Gives `key` up (its request failed): a retry with it runs again.
    package func releaseIdempotencyKey(namespace: String, key: String) async throws {
        _ = try await pool.withConnection { c in
            try await c.query(
                "DELETE FROM idempotency_keys WHERE namespace = $1 AND key = $2 AND status IS NULL", [namespace, key])
        }
    }
}
