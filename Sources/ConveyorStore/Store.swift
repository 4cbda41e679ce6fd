import ConveyorCore
package import ConveyorPostgres
import Foundation

/// The SQL of tasks, runs and workers. Every statement uses bound parameters; hot paths take
/// whole batches through `unnest` arrays, one statement per batch.
package struct Store: Sendable {
    package let pool: PostgresPool

    package init(pool: PostgresPool) { self.pool = pool }

    /// The dispatchers' shared secret for status proofs (migration 0008), 32 bytes.
    package func statusKey() async throws -> [UInt8] {
        let hex = try await pool.withConnection { c in
            try await c.query("SELECT encode(secret, 'hex') FROM status_keys WHERE id = 1").rows.first.map {
                try $0.string(0)
            }
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

    /// Whether the database answers (a round trip on a pooled connection).
    package func ping() async throws {
        _ = try await pool.withConnection { c in try await c.query("SELECT 1") }
    }

    /// Connects once, retrying with backoff for up to the pool's `connectRetryFor`: for start-up.
    package func waitUntilReachable() async throws {
        try await pool.waitUntilReachable()
    }
}
