package import ConveyorCore
import ConveyorPostgres
package import Foundation

extension Store {
    // MARK: runs

    package func runs(taskID: UUID? = nil, limit: Int = 100) async throws -> [RunRecord] {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.runColumns)
                FROM runs WHERE ($1::uuid IS NULL OR task_id = $1) ORDER BY occurrence DESC, attempt DESC LIMIT $2
                """, [taskID, limit]
            ).rows.map(Self.run)
        }
    }

    /// A filter over runs for listings; every part is optional.
    package struct RunFilter: Sendable {
        package var namespace: String?
        package var taskID: UUID?
        package var state: RunState?
        package var since: Date?
        package var until: Date?
        /// The last run of the previous page (occurrence and id): the page continues after it.
        package var after: (occurrence: Date, id: UUID)?
        package init() {}
    }

    /// Runs, newest occurrence first, one page. Only the filters given become conditions (all
    /// bound parameters): an `x IS NULL OR …` form would keep PostgreSQL from walking the
    /// `runs_by_occurrence` index and make it hash every task of the namespace first.
    package func runs(_ f: RunFilter, limit: Int) async throws -> [RunRecord] {
        var conditions: [String] = []
        var params: [any PostgresEncodable] = []
        func bind(_ v: any PostgresEncodable) -> String {
            params.append(v)
            return "$\(params.count)"
        }
        if let id = f.taskID {
            conditions.append("task_id = \(bind(id))")
        } else if let ns = f.namespace {
            conditions.append("EXISTS (SELECT 1 FROM tasks t WHERE t.id = runs.task_id AND t.namespace = \(bind(ns)))")
        }
        if let s = f.state { conditions.append("state = \(bind(s.rawValue))") }
        if let d = f.since { conditions.append("occurrence >= \(bind(d))") }
        if let d = f.until { conditions.append("occurrence < \(bind(d))") }
        if let (d, id) = f.after {
            conditions.append("(occurrence, id) < (\(bind(d))::timestamptz, \(bind(id))::uuid)")
        }
        let whereClause = conditions.isEmpty ? "" : "WHERE " + conditions.joined(separator: " AND ")
        let limitParam = bind(limit)
        return try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.runColumns) FROM runs \(whereClause) ORDER BY occurrence DESC, id DESC LIMIT \(limitParam)
                """, params
            ).rows.map(Self.run)
        }
    }

    /// The namespace of a task (deleted or not).
    package func namespace(ofTask id: UUID) async throws -> String? {
        try await pool.withConnection { c in
            try await c.query("SELECT namespace FROM tasks WHERE id = $1", [id]).rows.first?[0]
        }
    }

    package func run(id: UUID) async throws -> RunRecord? {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.runColumns) FROM runs WHERE id = $1
                """, [id]
            ).rows.first.map(Self.run)
        }
    }
}
