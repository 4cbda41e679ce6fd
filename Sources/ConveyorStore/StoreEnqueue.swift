import ConveyorPostgres

extension Store {
    /// Lets `role` (an existing PostgreSQL role) call `conveyor_enqueue(...)` for `namespace`:
    /// EXECUTE on the function and a row in `enqueue_grants`. Nothing
    /// on any table. Fails naming the role when it does not exist.
    package func grantEnqueue(role: String, namespace: String) async throws {
        _ = try await pool.withConnection { c in
            try await c.query("SELECT conveyor_grant_enqueue($1, $2)", [role, namespace])
        }
    }

    /// Takes a grant back; with the role's last one, its privileges on the schema and function.
    package func revokeEnqueue(role: String, namespace: String) async throws {
        _ = try await pool.withConnection { c in
            try await c.query("SELECT conveyor_revoke_enqueue($1, $2)", [role, namespace])
        }
    }

    /// The roles that may enqueue, and where.
    package func enqueueGrants() async throws -> [(role: String, namespace: String)] {
        try await pool.withConnection { c in
            try await c.query("SELECT role::text, namespace FROM enqueue_grants ORDER BY role, namespace").rows.map {
                (try $0.string(0), try $0.string(1))
            }
        }
    }
}
