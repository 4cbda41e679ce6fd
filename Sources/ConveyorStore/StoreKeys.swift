import ConveyorCore
import ConveyorPostgres
package import Foundation

/// An API key as stored (never its secret).
package struct APIKeyRecord: Sendable, Equatable {
    package var id: UUID
    package var prefix: String
    package var secretHash: String
    package var name: String
    /// The API's role name (`viewer`, `submitter`, `operator`, `admin`); the API gives it meaning.
    package var role: String
    package var namespace: String
    package var expiresAt: Date?
    package var revokedAt: Date?
    package var lastUsedAt: Date?
    package var useCount: Int
}

extension Store {
    package func createAPIKey(
        id: UUID = UUID(), prefix: String, secretHash: String, name: String, role: String,
        namespace: String, expiresAt: Date?
    ) async throws {
        try await pool.withConnection { c in
            _ = try await c.query(
                """
                INSERT INTO api_keys (id, prefix, secret_hash, name, role, namespace, expires_at) VALUES ($1, $2, $3,
                    $4, $5, $6, $7)
                """, [id, prefix, secretHash, name, role, namespace, expiresAt])
        }
    }

    /// The key with this prefix, revoked or not.
    package func apiKey(prefix: String) async throws -> APIKeyRecord? {
        try await pool.withConnection { c in
            try await c.query("SELECT \(Self.keyColumns) FROM api_keys WHERE prefix = $1", [prefix]).rows.first.map(
                Self.key)
        }
    }

    package func apiKeys() async throws -> [APIKeyRecord] {
        try await pool.withConnection { c in
            try await c.query("SELECT \(Self.keyColumns) FROM api_keys ORDER BY created_at").rows.map(Self.key)
        }
    }

    /// Revokes the key; returns whether one was revoked now.
    @discardableResult
    package func revokeAPIKey(prefix: String) async throws -> Bool {
        try await pool.withConnection { c in
            try await c.query(
                "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL", [prefix]
            ).affectedRows == 1
        }
    }

    /// Adds uses counted in memory since the last call, one statement for all keys.
    package func recordAPIKeyUse(_ uses: [String: Int]) async throws {
        guard !uses.isEmpty else { return }
        let keys = uses.keys.sorted()
        try await pool.withConnection { c in
            _ = try await c.query(
                """
                UPDATE api_keys SET use_count = use_count + u.n, last_used_at = now()
                FROM unnest($1::text[], $2::bigint[]) AS u(prefix, n) WHERE api_keys.prefix = u.prefix
                """, [keys, keys.map { uses[$0]! }])
        }
    }

    /// The columns `key(_:)` reads, in select-list order.
    enum KeyColumn: Int, RowColumn {
        case id, prefix, secretHash, name, role, namespace, expiresAt, revokedAt, lastUsedAt, useCount

        func sql(alias a: String) -> String {
            switch self {
            case .id: "\(a)id"
            case .prefix: "\(a)prefix"
            case .secretHash: "\(a)secret_hash"
            case .name: "\(a)name"
            case .role: "\(a)role"
            case .namespace: "\(a)namespace"
            case .expiresAt: "\(a)expires_at"
            case .revokedAt: "\(a)revoked_at"
            case .lastUsedAt: "\(a)last_used_at"
            case .useCount: "\(a)use_count"
            }
        }
    }

    static let keyColumns = KeyColumn.selectList()

    static func key(_ r: PostgresRow) throws -> APIKeyRecord {
        typealias C = KeyColumn
        return APIKeyRecord(
            id: try r.uuid(C.id), prefix: try r.string(C.prefix), secretHash: try r.string(C.secretHash),
            name: try r.string(C.name), role: try r.string(C.role), namespace: try r.string(C.namespace),
            expiresAt: try r.optionalDate(C.expiresAt), revokedAt: try r.optionalDate(C.revokedAt),
            lastUsedAt: try r.optionalDate(C.lastUsedAt), useCount: try r.int(C.useCount))
    }
}
