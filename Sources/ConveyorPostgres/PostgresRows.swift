import ConveyorCore
package import Foundation

/// The rows a statement returned, in text format, copied out of libpq's result.
package struct PostgresRows: Sendable {
    package var columns: [String]
    package var rows: [PostgresRow]
    /// Rows affected by INSERT/UPDATE/DELETE (`PQcmdTuples`).
    package var affectedRows: Int

    package var count: Int { rows.count }
    package var first: PostgresRow? { rows.first }
}

/// One row; columns are read by position.
package struct PostgresRow: Sendable {
    package var values: [String?]

    package init(values: [String?]) { self.values = values }

    package subscript(_ i: Int) -> String? { values[i] }

    package func string(_ i: Int) throws(PostgresError) -> String {
        guard let v = values[i] else {
            throw PostgresError(code: .decoding, message: "column \(i) is NULL, expected text")
        }
        return v
    }
    package func int(_ i: Int) throws(PostgresError) -> Int {
        guard let s = values[i], let v = Int(s) else {
            throw PostgresError(code: .decoding, message: "column \(i) is not an integer")
        }
        return v
    }
    package func double(_ i: Int) throws(PostgresError) -> Double {
        guard let s = values[i], let v = Double(s) else {
            throw PostgresError(code: .decoding, message: "column \(i) is not a number")
        }
        return v
    }
    package func bool(_ i: Int) throws(PostgresError) -> Bool {
        guard let s = values[i] else {
            throw PostgresError(code: .decoding, message: "column \(i) is NULL, expected boolean")
        }
        return s == "t"
    }
    package func uuid(_ i: Int) throws(PostgresError) -> UUID {
        guard let s = values[i], let v = UUID(canonical: s) else {
            throw PostgresError(code: .decoding, message: "column \(i) is not a uuid")
        }
        return v
    }
    package func date(_ i: Int) throws(PostgresError) -> Date {
        guard let s = values[i], let v = Timestamp.parse(s) else {
            throw PostgresError(code: .decoding, message: "column \(i) is not a timestamptz")
        }
        return v
    }
    package func optionalDate(_ i: Int) throws(PostgresError) -> Date? { values[i] == nil ? nil : try date(i) }
    package func optionalInt(_ i: Int) throws(PostgresError) -> Int? { values[i] == nil ? nil : try int(i) }
}

/// A record's columns, in select-list order, as the cases of an `Int` enum: the select list is made
/// from the cases (`selectList(alias:)`), and a row's values are read by case, so no decoder counts
/// positions and a column added to the list is added to the reader in the same place.
package protocol RowColumn: RawRepresentable, CaseIterable, Sendable where RawValue == Int {
    /// The select-list expression, its table written as `alias` (`"t."`, or `""` for none).
    func sql(alias: String) -> String
}

extension RowColumn {
    package static func selectList(alias: String = "") -> String {
        allCases.map { $0.sql(alias: alias) }.joined(separator: ", ")
    }
}

extension PostgresRow {
    package subscript<C: RowColumn>(_ c: C) -> String? { values[c.rawValue] }

    /// Runs a positional read, naming the column in its error.
    private func read<C: RowColumn, T>(_ c: C, _ body: (Int) throws(PostgresError) -> T) throws(PostgresError) -> T {
        do { return try body(c.rawValue) } catch {
            throw PostgresError(code: .decoding, message: "\(C.self).\(c): \(error.message)")
        }
    }
    package func string<C: RowColumn>(_ c: C) throws(PostgresError) -> String { try read(c, string) }
    package func int<C: RowColumn>(_ c: C) throws(PostgresError) -> Int { try read(c, int) }
    package func double<C: RowColumn>(_ c: C) throws(PostgresError) -> Double { try read(c, double) }
    package func bool<C: RowColumn>(_ c: C) throws(PostgresError) -> Bool { try read(c, bool) }
    package func uuid<C: RowColumn>(_ c: C) throws(PostgresError) -> UUID { try read(c, uuid) }
    package func date<C: RowColumn>(_ c: C) throws(PostgresError) -> Date { try read(c, date) }
    package func optionalDate<C: RowColumn>(_ c: C) throws(PostgresError) -> Date? { try read(c, optionalDate) }
    package func optionalInt<C: RowColumn>(_ c: C) throws(PostgresError) -> Int? { try read(c, optionalInt) }
}
