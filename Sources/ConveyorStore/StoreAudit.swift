package import ConveyorCore
import ConveyorPostgres
package import Foundation

extension Store {
    // MARK: audit

    package struct AuditEntry: Sendable {
        package var id: Int64 = 0
        package var at: Date?
        package var actor: String
        package var role: String
        package var namespace: String
        package var action: String
        package var target: String
        package var requestID: String
        package var client: String?
        package var detail: JSONValue

        package init(
            actor: String, role: String, namespace: String, action: String, target: String, requestID: String,
            client: String?, detail: JSONValue = .object([:])
        ) {
            self.actor = actor
            self.role = role
            self.namespace = namespace
            self.action = action
            self.target = target
            self.requestID = requestID
            self.client = client
            self.detail = detail
        }
    }

    package func audit(_ e: AuditEntry) async throws {
        _ = try await pool.withConnection { c in
            try await c.query(
                """
                INSERT INTO audit_log (actor, role, namespace, action, target, request_id, client, detail)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)
                """,
                [
                    e.actor, e.role, e.namespace, e.action, e.target, e.requestID, e.client,
                    String(decoding: MessageCodec.encode(e.detail), as: UTF8.self),
                ])
        }
    }

    /// Audit entries, newest first, before the entry id `before` (the cursor).
    package func auditLog(namespace: String?, action: String?, before: Int64?, limit: Int) async throws -> [AuditEntry]
    {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT id, at, actor, role, namespace, action, target, request_id, client, detail::text FROM audit_log
                WHERE ($1::text IS NULL OR namespace = $1) AND ($2::text IS NULL OR action = $2) AND ($3::bigint IS
                    NULL OR id < $3)
                ORDER BY id DESC LIMIT $4
                """, [namespace, action, before, limit]
            ).rows.map { r in
                var e = AuditEntry(
                    actor: try r.string(2), role: try r.string(3), namespace: try r.string(4), action: try r.string(5),
                    target: try r.string(6), requestID: try r.string(7), client: r[8],
                    detail: try Store.json(r[9] ?? "{}"))
                e.id = Int64(try r.int(0))
                e.at = try r.date(1)
                return e
            }
        }
    }
}
