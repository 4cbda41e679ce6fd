import Foundation

/// Columns for people: each padded to its widest cell (at most 48 characters), the last left ragged.
package enum TextTable {
    package static func render(_ header: [String], _ rows: [[String]]) -> String {
        var widths = header.map(\.count)
        for r in rows {
            for (i, c) in r.enumerated() where i < widths.count { widths[i] = max(widths[i], min(c.count, 48)) }
        }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, c in
                i == cells.count - 1 || i >= widths.count
                    ? c : c.padding(toLength: max(widths[i], c.count), withPad: " ", startingAt: 0)
            }
            .joined(separator: "  ")
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n")
    }
}
