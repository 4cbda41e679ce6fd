import Foundation
import Testing

/// The one table of what the machine must have (`scripts/requirements.tsv`), as the test harness
/// reads it. The harness spawns another program only through `program(_:)`, so a program without
/// a row (and so without an install step) fails the test that spawns it, naming the table, on
/// every machine, not only on a fresh one. `SetupTests` checks that the code names no program the
/// table lacks.
enum Requirements {
    struct Row: Equatable {
        var name: String
        /// An absolute path, `PATH`, `pkg-config` or `python`.
        var check: String
        /// `apt:PACKAGE` or `pip:REQUIREMENT`.
        var package: String
    }

    static let table = FileManager.default.currentDirectoryPath + "/scripts/requirements.tsv"

    static func rows(of path: String = table) throws -> [Row] {
        try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").compactMap { line in
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            if trimmed.isEmpty || trimmed.hasPrefix("#") { return nil }
            let fields = trimmed.split(whereSeparator: \.isWhitespace).map(String.init)
            guard fields.count >= 3 else { return nil }
            return Row(name: fields[0], check: fields[1], package: fields[2])
        }
    }

    /// The absolute path of program `name` from its row. A row checked on `PATH` resolves
    /// through `/usr/bin/env`, so the argv starts `["/usr/bin/env", name]`: use `argv(_:)`.
    static func program(_ name: String) throws -> String {
        let row = try #require(
            try rows().first { $0.name == name && $0.check.hasPrefix("/") },
            """
            program '\(name)' has no row with an absolute path in scripts/requirements.tsv: add one with its Debian \
            package, so scripts/requirements.sh installs it
            """
        )
        return row.check
    }

    /// The argv prefix that runs program `name`: its absolute path, or `/usr/bin/env name` for a
    /// row found on `PATH` (python3 comes from pyenv on some machines, Debian on others).
    static func argv(_ name: String) throws -> [String] {
        let row = try #require(
            try rows().first { $0.name == name && ($0.check.hasPrefix("/") || $0.check == "PATH") },
            """
            program '\(name)' has no row in scripts/requirements.tsv: add one with its Debian package, so \
            scripts/requirements.sh installs it
            """
        )
        return row.check == "PATH" ? [try program("env"), name] : [row.check]
    }
}

extension Process {
    /// A process that runs program `name` of the requirements table with `arguments`, not started.
    static func required(_ name: String, _ arguments: [String]) throws -> Process {
        let argv = try Requirements.argv(name)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: argv[0])
        p.arguments = Array(argv.dropFirst()) + arguments
        return p
    }
}

/// Runs program `name` of the requirements table to completion on a thread of its own, so an
/// in-process API, dispatcher or worker keeps the (two-thread) cooperative pool meanwhile.
func runRequired(_ name: String, _ arguments: [String]) async throws -> (status: Int32, out: String, err: String) {
    try await withCheckedThrowingContinuation {
        (c: CheckedContinuation<(status: Int32, out: String, err: String), any Error>) in
        Thread.detachNewThread { c.resume(with: Result { try runCapturing(try Process.required(name, arguments)) }) }
    }
}
