import ArgumentParser
import ConveyorCore
import Foundation
import NIOHTTP1

struct QueueGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "queue",
        abstract: "Work queues: backlogs, pauses and drains, and rate limits across all dispatchers.",
        discussion: "Example: conveyorctl queue list",
        subcommands: [List.self, Pause.self, Resume.self, Drain.self, Limit.self, Unlimit.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Queues with open runs, running runs and completions in the last minute.",
            discussion: "Example: conveyorctl queue list -o yaml")
        @OptionGroup var global: GlobalOptions
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/queues").json
            let queues = r["queues"]?.arrayValue ?? []
            global.show(r, names: queues.map { "queue/" + Output.text($0["name"]) }) { _ in
                TextTable.render(
                    ["QUEUE", "TASKS", "WAITING", "BACKLOG", "RUNNING", "FINISHED/MIN", "PAUSED"],
                    queues.map { q in
                        [
                            Output.text(q["name"]), Output.text(q["tasks"]), Output.text(q["waiting"]),
                            Output.text(q["backlog"]), Output.text(q["running"]),
                            Output.text(q["finished_last_minute"]),
                            q["paused"] == true ? "paused" : "",
                        ]
                    })
            }
        }
    }

    struct Pause: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Publish nothing new to the queue: its due runs wait in PostgreSQL, in order.",
            discussion: """
                Runs already published keep running. Needs a key for every namespace (a work queue is the \
                fleet's). Example: conveyorctl queue pause reports
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The queue's name.") var queue: String
        func run() async throws {
            let r = try await global.client().call(.POST, "/v1/queues/\(path(queue))/pause").json
            global.show(r, names: ["queue/\(queue)"]) { _ in
                r["changed"] == true ? "queue \(queue) paused" : "queue \(queue) was already paused"
            }
        }
    }

    struct Resume: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Publish the queue's runs again, waiting ones first by priority and due time.",
            discussion: "Example: conveyorctl queue resume reports")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The queue's name.") var queue: String
        func run() async throws {
            let r = try await global.client().call(.POST, "/v1/queues/\(path(queue))/resume").json
            global.show(r, names: ["queue/\(queue)"]) { _ in
                r["changed"] == true ? "queue \(queue) resumed" : "queue \(queue) was not paused"
            }
        }
    }

    struct Drain: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Pause the queue, then wait until none of its runs is published or running.",
            discussion: """
                For maintenance: when it returns, no worker holds a run of the queue and none waits in the \
                broker; new ones wait in PostgreSQL until 'conveyorctl queue resume'. Exits non-zero if \
                --timeout passes first (the queue stays paused). Example: conveyorctl queue drain reports --timeout 600
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The queue's name.") var queue: String
        @Option(help: "Seconds to wait at most.") var timeout: Double = 600

        func validate() throws {
            try checkSeconds(timeout, flag: "timeout")
        }

        func run() async throws {
            let client = try global.client()
            _ = try await client.call(.POST, "/v1/queues/\(path(queue))/pause")
            let deadline = ContinuousClock.now + .seconds(timeout)
            var left = (backlog: 0, running: 0)
            while true {
                let queues = try await client.call(.GET, "/v1/queues").json["queues"]?.arrayValue ?? []
                let q = queues.first { $0["name"]?.stringValue == queue }
                left = (Int(q?["backlog"]?.doubleValue ?? 0), Int(q?["running"]?.doubleValue ?? 0))
                if left.backlog == 0 && left.running == 0 { break }
                guard ContinuousClock.now < deadline else {
                    throw CLIError(
                        "queue \(queue) not drained within \(timeout) s: \(left.backlog) published, \(left.running) running",
                        fix: "wait longer (--timeout), or look at the runs: conveyorctl run list --state running",
                        exitCode: CtlExit.stillGoing)
                }
                try await Task.sleep(for: .milliseconds(500))
            }
            let drained: JSONValue = ["queue": .string(queue), "paused": true, "drained": true]
            global.show(drained, names: ["queue/\(queue)"]) { _ in
                "queue \(queue) paused and drained: nothing of it is published or running"
            }
        }
    }

    struct Limit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "At most --rate runs per second start from the queue, across all dispatchers.",
            discussion: "A key for every namespace. Example: conveyorctl queue limit etl --rate 5 --burst 10")
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
            global.show(r, names: ["queue/\(queue)"]) { _ in
                "queue \(queue): at most \(Output.text(r["rate"])) runs/s (burst \(Output.text(r["burst"])))"
            }
        }
    }

    struct Unlimit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Remove the queue's rate limit.", discussion: "Example: conveyorctl queue unlimit etl")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The queue's name.") var queue: String
        func run() async throws {
            let r = try await global.client().call(.DELETE, "/v1/queues/\(path(queue))/limit").json
            global.show(r, names: ["queue/\(queue)"]) { _ in "queue \(queue): no rate limit" }
        }
    }
}
