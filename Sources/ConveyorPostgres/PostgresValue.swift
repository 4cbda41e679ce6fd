public import Foundation
import ConveyorCore

/// A Swift value sent as a bound parameter in PostgreSQL's text format.
///
/// Values never become SQL text: they travel as `PQexecParams` parameters. Cast in SQL where the
/// type matters (`$1::uuid[]`, `$2::timestamptz`).
public protocol PostgresEncodable: Sendable {
    /// The text form, or `nil` for SQL NULL.
    var postgresText: String? { get }
}

extension String: PostgresEncodable { public var postgresText: String? { self } }
extension Int: PostgresEncodable { public var postgresText: String? { String(self) } }
extension Int32: PostgresEncodable { public var postgresText: String? { String(self) } }
extension Int64: PostgresEncodable { public var postgresText: String? { String(self) } }
extension Double: PostgresEncodable { public var postgresText: String? { String(self) } }
extension Bool: PostgresEncodable { public var postgresText: String? { self ? "t" : "f" } }
extension UUID: PostgresEncodable { public var postgresText: String? { uuidString.lowercased() } }
extension Date: PostgresEncodable {
    public var postgresText: String? { Timestamp.format(self) }   // the session runs with TimeZone=UTC
}
extension Optional: PostgresEncodable where Wrapped: PostgresEncodable {
    public var postgresText: String? { self?.postgresText }
}
extension Array: PostgresEncodable where Element: PostgresEncodable {
    /// An array literal (`{"a","b",NULL}`) with every element quoted and escaped.
    public var postgresText: String? {
        var out = "{"
        for (i, e) in enumerated() {
            if i > 0 { out += "," }
            guard let t = e.postgresText else { out += "NULL"; continue }
            out += "\""
            for ch in t.unicodeScalars {
                if ch == "\"" || ch == "\\" { out += "\\" }
                out.unicodeScalars.append(ch)
            }
            out += "\""
        }
        return out + "}"
    }
}
