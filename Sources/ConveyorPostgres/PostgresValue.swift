import ConveyorCore
package import Foundation

/// A Swift value sent as a bound parameter in PostgreSQL's text format.
///
/// Values never become SQL text: they travel as `PQexecParams` parameters. Cast in SQL where the
/// type matters (`$1::uuid[]`, `$2::timestamptz`).
package protocol PostgresEncodable: Sendable {
    /// The text form, or `nil` for SQL NULL.
    var postgresText: String? { get }
    /// Appends this value as an element of an array literal: quoted and escaped, `NULL` for nil.
    func appendArrayElement(to out: inout [UInt8])
}

extension PostgresEncodable {
    package func appendArrayElement(to out: inout [UInt8]) {
        guard let t = postgresText else { return out.append(contentsOf: "NULL".utf8) }
        out.append(UInt8(ascii: "\""))
        for b in t.utf8 {
            if b == UInt8(ascii: "\"") || b == UInt8(ascii: "\\") { out.append(UInt8(ascii: "\\")) }
            out.append(b)
        }
        out.append(UInt8(ascii: "\""))
    }
}

extension String: PostgresEncodable { package var postgresText: String? { self } }
extension Int: PostgresEncodable { package var postgresText: String? { String(self) } }
extension Int32: PostgresEncodable { package var postgresText: String? { String(self) } }
extension Int64: PostgresEncodable { package var postgresText: String? { String(self) } }
extension Double: PostgresEncodable { package var postgresText: String? { String(self) } }
extension Bool: PostgresEncodable { package var postgresText: String? { self ? "t" : "f" } }
extension UUID: PostgresEncodable {
    package var postgresText: String? { lowercasedString }
    /// Hex digits and dashes need no quotes: written in place, with no string per element (run
    /// ids fill these arrays on the hot path).
    package func appendArrayElement(to out: inout [UInt8]) { appendLowercased(to: &out) }
}
extension Date: PostgresEncodable {
    package var postgresText: String? { Timestamp.format(self) }  // the session runs with TimeZone=UTC
    /// Digits and `-:T.Z` need no quotes or escapes.
    package func appendArrayElement(to out: inout [UInt8]) { out.append(contentsOf: Timestamp.format(self).utf8) }
}
extension Optional: PostgresEncodable where Wrapped: PostgresEncodable {
    package var postgresText: String? { self?.postgresText }
    package func appendArrayElement(to out: inout [UInt8]) {
        guard let self else { return out.append(contentsOf: "NULL".utf8) }
        self.appendArrayElement(to: &out)
    }
}
extension Array: PostgresEncodable where Element: PostgresEncodable {
    /// An array literal (`{"a","b",NULL}`) with every element quoted and escaped.
    /// Built as UTF-8 bytes: the quote and backslash escaped are ASCII, so no character is split,
    /// and run ids go into these arrays on the hot path, where appending scalar by scalar is costly.
    package var postgresText: String? {
        var out: [UInt8] = [UInt8(ascii: "{")]
        out.reserveCapacity(2 + count * 40)
        var first = true
        for e in self {
            if !first { out.append(UInt8(ascii: ",")) }
            first = false
            e.appendArrayElement(to: &out)
        }
        out.append(UInt8(ascii: "}"))
        return String(decoding: out, as: UTF8.self)
    }
}
