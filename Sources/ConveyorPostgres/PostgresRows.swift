public import Foundation
import ConveyorCore

/// The rows a statement returned, in text format, copied out of libpq's result.
public struct PostgresRows: Sendable {
    public var columns: [String]
    public var rows: [PostgresRow]
    /// Rows affected by INSERT/UPDATE/DELETE (`PQcmdTuples`).
    public var affectedRows: Int

    public var count: Int { rows.count }
    public var first: PostgresRow? { rows.first }
}

/// One row; columns are read by position.
public struct PostgresRow: Sendable {
    public var values: [String?]

    public init(values: [String?]) { self.values = values }

    public subscript(_ i: Int) -> String? { values[i] }

    public func string(_ i: Int) throws(PostgresError) -> String {
        guard let v = values[i] else { throw PostgresError(code: .decoding, message: "column \(i) is NULL, expected text") }
        return v
    }
    public func int(_ i: Int) throws(PostgresError) -> Int {
        guard let s = values[i], let v = Int(s) else { throw PostgresError(code: .decoding, message: "column \(i) is not an integer") }
        return v
    }
    public func double(_ i: Int) throws(PostgresError) -> Double {
        guard let s = values[i], let v = Double(s) else { throw PostgresError(code: .decoding, message: "column \(i) is not a number") }
        return v
    }
    public func bool(_ i: Int) throws(PostgresError) -> Bool {
        guard let s = values[i] else { throw PostgresError(code: .decoding, message: "column \(i) is NULL, expected boolean") }
        return s == "t"
    }
    public func uuid(_ i: Int) throws(PostgresError) -> UUID {
        guard let s = values[i], let v = UUID(canonical: s) else { throw PostgresError(code: .decoding, message: "column \(i) is not a uuid") }
        return v
    }
    public func date(_ i: Int) throws(PostgresError) -> Date {
        guard let s = values[i], let v = Timestamp.parse(s) else { throw PostgresError(code: .decoding, message: "column \(i) is not a timestamptz") }
        return v
    }
    public func optionalDate(_ i: Int) throws(PostgresError) -> Date? { values[i] == nil ? nil : try date(i) }
    public func optionalInt(_ i: Int) throws(PostgresError) -> Int? { values[i] == nil ? nil : try int(i) }
}
