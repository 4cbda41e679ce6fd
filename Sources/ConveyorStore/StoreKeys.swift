public import ConveyorCore
import ConveyorPostgres
public import Foundation

/// Who may do what through the API.
public enum Role: String, Sendable, CaseIterable, Comparable {
    case viewer, submitter, `operator`, admin

    var rank: Int { Self.allCases.firstIndex(of: self) ?? 0 }
    public static func < (a: Role, b: Role) -> Bool { a.rank < b.rank }
}

/// What a new API key may be, for every way of making one (`conveyor apikey create`,
/// `POST /v1/keys`, `conveyorctl key create`). `fields` names the inputs as the caller spells them.
public enum APIKeyRules {
    public static func check(role: String, namespace: String, expiresDays: Int?,
                             fields: (role: String, namespace: String, expiresDays: String)) throws(ValidationError) -> Role {
        guard let r = Role(rawValue: role) else {
            throw ValidationError(field: fields.role, value: role, hint: "one of admin, operator, submitter, viewer")
        }
        // Every namespace: to administer all, or to read all (a fleet viewer: dashboards of the
        // whole fleet, a Prometheus scraper). Never to submit or operate in all at once.
        guard namespace != "*" || r == .admin || r == .viewer else {
            throw ValidationError(field: fields.namespace, value: namespace, hint: "'*' (every namespace) is for admin and viewer keys only")
        }
        guard namespace == "*" || (!namespace.isEmpty && namespace.count <= 63 && namespace.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" })) else {
            throw ValidationError(field: fields.namespace, value: namespace, hint: "letters, digits, '-' and '_', at most 63")
        }
        if let d = expiresDays, !(1...3650).contains(d) {
            throw ValidationError(field: fields.expiresDays, value: String(d), hint: "a whole number of days from 1 to 3650")
        }
        return r
    }
}

/// An API key as stored (never its secret).
public struct APIKeyRecord: Sendable, Equatable {
    public var id: UUID
    public var prefix: String
    public var secretHash: String
    public var name: String
    public var role: Role
    public var namespace: String
    public var expiresAt: Date?
    public var revokedAt: Date?
    public var lastUsedAt: Date?
    public var useCount: Int
}

extension Store {
    public func createAPIKey(id: UUID = UUID(), prefix: String, secretHash: String, name: String, role: Role,
                             namespace: String, expiresAt: Date?) async throws {
        try await pool.withConnection { c in
            _ = try await c.query("""
                INSERT INTO api_keys (id, prefix, secret_hash, name, role, namespace, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)
                """, [id, prefix, secretHash, name, role.rawValue, namespace, expiresAt])
        }
    }

    /// The key with this prefix, revoked or not.
    public func apiKey(prefix: String) async throws -> APIKeyRecord? {
        try await pool.withConnection { c in
            try await c.query("SELECT \(Self.keyColumns) FROM api_keys WHERE prefix = $1", [prefix]).rows.first.map(Self.key)
        }
    }

    public func apiKeys() async throws -> [APIKeyRecord] {
        try await pool.withConnection { c in
            try await c.query("SELECT \(Self.keyColumns) FROM api_keys ORDER BY created_at").rows.map(Self.key)
        }
    }

    /// Revokes the key; returns whether one was revoked now.
    @discardableResult
    public func revokeAPIKey(prefix: String) async throws -> Bool {
        try await pool.withConnection { c in
            try await c.query("UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL", [prefix]).affectedRows == 1
        }
    }

    /// Adds uses counted in memory since the last call, one statement for all keys.
    public func recordAPIKeyUse(_ uses: [String: Int]) async throws {
        guard !uses.isEmpty else { return }
        let keys = uses.keys.sorted()
        try await pool.withConnection { c in
            _ = try await c.query("""
                UPDATE api_keys SET use_count = use_count + u.n, last_used_at = now()
                FROM unnest($1::text[], $2::bigint[]) AS u(prefix, n) WHERE api_keys.prefix = u.prefix
                """, [keys, keys.map { uses[$0]! }])
        }
    }

    static let keyColumns = "id, prefix, secret_hash, name, role, namespace, expires_at, revoked_at, last_used_at, use_count"

    static func key(_ r: PostgresRow) throws -> APIKeyRecord {
        APIKeyRecord(id: try r.uuid(0), prefix: try r.string(1), secretHash: try r.string(2), name: try r.string(3),
                     role: Role(rawValue: try r.string(4)) ?? .viewer, namespace: try r.string(5), expiresAt: try r.optionalDate(6),
                     revokedAt: try r.optionalDate(7), lastUsedAt: try r.optionalDate(8), useCount: try r.int(9))
    }
}
