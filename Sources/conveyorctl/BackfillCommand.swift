import ArgumentParser
import ConveyorCore
import Foundation
import NIOHTTP1

extension TaskGroup {
    struct Backfill: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a recurring task's past occurrences in a range that have no run yet.",
            discussion: """
                Occurrences in [--from, --to) of the task's schedule (cron in its time zone, or its interval's \
                grid); one that already has a run, in any state, keeps it, so a backfill may be repeated. \
                --dry-run lists them and changes nothing. Example: conveyorctl task backfill nightly-report \
                --from 2026-11-01T00:00:00Z --to 2026-11-08T00:00:00Z --dry-run
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The task's name.") var name: String
        @Option(help: "The range's start (ISO-8601), included.") var from: String
        @Option(help: "The range's end (ISO-8601), excluded; at most now.") var to: String
        @Option(help: "Refuse if the range holds more occurrences than this (1 to 10000).") var maxRuns = 1000
        @Option(help: "The runs' priority (default the task's).") var priority: String?
        @Option(help: "allow (every occurrence due at once) or queue (one at a time, oldest first).")
        var overlap: String?
        @Flag(help: "List the occurrences and what each has; run nothing.") var dryRun = false

        func run() async throws {
            var body: [String: JSONValue] = [
                "from": .string(from), "to": .string(to), "max_runs": .number(Double(maxRuns)),
                "dry_run": .bool(dryRun),
            ]
            if let priority { body["priority"] = .string(priority) }
            if let overlap { body["overlap"] = .string(overlap) }
            let r = try await global.client().call(
                .POST, "/v1/tasks/" + path(name) + "/backfill", body: .object(body), accept: [200, 202]
            ).json
            let runs = r["runs"]?.arrayValue ?? []
            global.show(r, names: runs.compactMap { $0["run_id"]?.stringValue.map { "run/\($0)" } }) { _ in
                TextTable.render(
                    ["OCCURRENCE", "RUN", "ALREADY"],
                    runs.map {
                        [Output.text($0["occurrence"]), Output.text($0["run_id"]), Output.text($0["existing_state"])]
                    }
                )
                    + "\n\(Output.text(r["occurrences"])) occurrences: "
                    + (dryRun
                        ? "\(Output.text(r["existing"])) have a run, the others would run (dry run: nothing changed)"
                        : "\(Output.text(r["created"])) runs made, \(Output.text(r["existing"])) already had one")
            }
        }
    }
}
