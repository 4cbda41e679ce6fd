package import ConveyorCore
import ConveyorPostgres
import Foundation

extension Store {
    // MARK: templates

    package struct TemplateRecord: Sendable {
        package var namespace: String
        package var name: String
        package var body: JSONValue
        package var parameters: [String]

        package init(namespace: String, name: String, body: JSONValue, parameters: [String]) {
            self.namespace = namespace
            self.name = name
            self.body = body
            self.parameters = parameters
        }
    }

    /// Creates or replaces a template.
    package func putTemplate(_ t: TemplateRecord) async throws {
        _ = try await pool.withConnection { c in
            try await c.query(
                """
                INSERT INTO task_templates (namespace, name, body, parameters) VALUES ($1, $2, $3::jsonb, $4::text[])
                ON CONFLICT (namespace, name) DO UPDATE SET body = EXCLUDED.body, parameters = EXCLUDED.parameters,
                    updated_at = now()
                """, [t.namespace, t.name, String(decoding: MessageCodec.encode(t.body), as: UTF8.self), t.parameters])
        }
    }

    package func templates(namespace: String?) async throws -> [TemplateRecord] {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.templateColumns) FROM task_templates
                WHERE $1::text IS NULL OR namespace = $1 ORDER BY namespace, name LIMIT 1000
                """, [namespace]
            ).rows.map(Self.template)
        }
    }

    package func template(named name: String, namespace: String) async throws -> TemplateRecord? {
        try await pool.withConnection { c in
            try await c.query(
                """
                SELECT \(Self.templateColumns) FROM task_templates WHERE
                    namespace = $1 AND name = $2
                """, [namespace, name]
            ).rows.first.map(Self.template)
        }
    }

    /// The columns `template(_:)` reads, in select-list order.
    enum TemplateColumn: Int, RowColumn {
        case namespace, name, body, parameters

        func sql(alias a: String) -> String {
            switch self {
            case .namespace: "\(a)namespace"
            case .name: "\(a)name"
            case .body: "\(a)body::text"
            case .parameters: "array_to_string(\(a)parameters, ',')"
            }
        }
    }

    static let templateColumns = TemplateColumn.selectList()

    static func template(_ r: PostgresRow) throws -> TemplateRecord {
        typealias C = TemplateColumn
        return TemplateRecord(
            namespace: try r.string(C.namespace), name: try r.string(C.name), body: try json(try r.string(C.body)),
            parameters: (r[C.parameters] ?? "").split(separator: ",").map(String.init))
    }
}
