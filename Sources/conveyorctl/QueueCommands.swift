import ArgumentParser
import ConveyorCore
import Foundation
import NIOHTTP1

struct QueueGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "queue", abstract: "Work queues: backlogs, and rate limits across all dispatchers.",
        subcommands: [List.self, Limit.self, Unlimit.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Queues with open runs, running runs and completions in the last minute.")
        @OptionGroup var global: GlobalOptions
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/queues").json
            Output.print(r, json: global.json) {
                TextTable.render(
                    ["QUEUE", "TASKS", "BACKLOG", "RUNNING", "FINISHED/MIN"],
                    (r["queues"]?.arrayValue ?? []).map { q in
                        [
                            Output.text(q["name"]), Output.text(q["tasks"]), Output.text(q["backlog"]),
                            Output.text(q["running"]), Output.text(q["finished_last_minute"]),
                        ]
                    })
            }
        }
    }

    struct Limit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "At most --rate runs per second start from the queue, across all dispatchers.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The queue's name.") var queue: String
        @Option(help: "Runs per second (above 0).") var rate: Double
        @Option(help: "Runs that may start at once after an idle spell (default: the rate, at least 1).")
        var burst: Double?

        func validate() throws {
            guard rate.isFinite, rate > 0 else { throw ValidationError("--rate must be above 0; got \(rate)") }
            if let burst, !(burst.isFinite && burst >= 1) {
                throw ValidationError("--burst must be at least 1; got \(burst)")
            }
        }

        func run() async throws {
            var body: [String: JSONValue] = ["rate": .number(rate)]
            if let burst { body["burst"] = .number(burst) }
            let r = try await global.client().call(.PUT, "/v1/queues/\(path(queue))/limit", body: .object(body)).json
            Output.print(r, json: global.json) {
                "queue \(queue): at most \(Output.text(r["rate"])) runs/s (burst \(Output.text(r["burst"])))"
            }
        }
    }

    struct Unlimit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove the queue's rate limit.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The queue's name.") var queue: String
        func run() async throws {
            let r = try await global.client().call(.DELETE, "/v1/queues/\(path(queue))/limit").json
            Output.print(r, json: global.json) { "queue \(queue): no rate limit" }
        }
    }
}

enum CancelTask: PostAction {
    static let name = "cancel", abstract = "Cancel every open run of a task; workers kill the executor.",
        argument = "The task's name."
    static func path(_ s: String) -> String { "/v1/tasks/\(s)/cancel" }
    static func said(_ s: String, _ r: JSONValue) -> String {
        "cancelled \(Output.text(r["runs_cancelled"])) runs of \(s)"
    }
}
