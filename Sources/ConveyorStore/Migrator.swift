package import ConveyorPostgres
import Foundation
package import Logging

/// Applies the plain SQL files in `Migrations/` in order, each in its own transaction, under an
/// advisory lock: safe to run twice, or from several processes at once.
package struct Migrator: Sendable {
    /// The lock key (`pg_advisory_lock`), fixed for all Conveyor versions.
    static let lockKey: Int64 = 0x636f_6e76_6579_6f72 & 0x7fff_ffff_ffff_ffff

    package struct Migration: Sendable {
        package var version: String
        package var sql: String
    }

    package let migrations: [Migration]
    let logger: Logger

    package init(logger: Logger) throws {
        guard let dir = Bundle.module.url(forResource: "Migrations", withExtension: nil) else {
            throw PostgresError(
                code: .closed, message: "migrations are missing from the conveyor bundle (ConveyorStore resources)")
        }
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".sql") }
            .sorted()
        migrations = try files.map { f in
            Migration(
                version: String(f.dropLast(4)),
                sql: try String(contentsOf: dir.appendingPathComponent(f), encoding: .utf8))
        }
        self.logger = logger
    }

    /// The migrations this build knows that the database has not applied, in order (all of them
    /// on an empty database). Processes wait for none to be missing before they use the schema.
    package func pending(_ pool: PostgresPool) async throws -> [String] {
        try await pool.withConnection { c in
            guard try await c.query("SELECT to_regclass('schema_migrations') IS NOT NULL").rows[0].bool(0) else {
                return migrations.map(\.version)
            }
            let done = Set(try await c.query("SELECT version FROM schema_migrations").rows.compactMap { $0[0] })
            return migrations.map(\.version).filter { !done.contains($0) }
        }
    }

    /// What a process waiting for `missing` logs and answers on `/readyz`.
    package static func waitingMessage(_ missing: [String]) -> String {
        """
        the database schema is older than this version: migration\(missing.count == 1 ? "" : "s") \
        \(missing.joined(separator: ", ")) not applied; run `conveyor migrate` (on Kubernetes, the Job \
        conveyor-migrate-<version>)
        """
    }

    /// Applies what is missing; returns the versions applied now.
    @discardableResult
    package func migrate(_ pool: PostgresPool) async throws -> [String] {
        try await pool.withConnection { c in
            try await c.query("SELECT pg_advisory_lock($1)", [Self.lockKey])
            do {
                let applied = try await apply(on: c)
                try await c.query("SELECT pg_advisory_unlock($1)", [Self.lockKey])
                return applied
            } catch {
                _ = try? await c.query("SELECT pg_advisory_unlock($1)", [Self.lockKey])
                throw error
            }
        }
    }

    private func apply(on c: PostgresConnection) async throws -> [String] {
        try await c.simple(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL \
            DEFAULT now())
            """
        )
        let done = Set(try await c.query("SELECT version FROM schema_migrations").rows.compactMap { $0[0] })
        var applied: [String] = []
        for m in migrations where !done.contains(m.version) {
            try await c.simple("BEGIN")
            do {
                try await c.simple(m.sql)
                try await c.query("INSERT INTO schema_migrations (version) VALUES ($1)", [m.version])
                try await c.simple("COMMIT")
            } catch {
                _ = try? await c.simple("ROLLBACK")
                throw PostgresError(
                    code: .query, sqlState: error.sqlState,
                    message: "migration \(m.version) failed and was rolled back: \(error.message)")
            }
            logger.info("migration applied", metadata: ["migration.version": "\(m.version)"])
            applied.append(m.version)
        }
        return applied
    }
}
