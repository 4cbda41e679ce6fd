import ArgumentParser
import ConveyorConfig
import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import Foundation
import Logging

/// Admin tool writing through the database until the API exists.
struct TaskCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "task", abstract: "Add, list, show and trigger tasks (needs database access).",
        subcommands: [Add.self, List.self, Show.self, Trigger.self])

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a task.")
        @OptionGroup var common: CommonOptions
        @Option(help: "Unique task name.") var name: String
        @Option(help: "Executor name, as offered by workers (for example noop, sleep, shell).") var executor: String
        @Option(help: "'every 30s' (ms, s, m, h) or 'once'.") var schedule: String = "once"
        @Option(help: "Executor parameters as a JSON object, e.g. '{\"argv\": [\"/bin/echo\", \"hi\"]}'.") var params: String = "{}"
        @Option(help: "Work queue.") var queue: String = "default"
        @Option(help: "Timeout in seconds.") var timeout: Double = 300
        @Option(help: "First due time, ISO-8601 (default: now).") var start: String?

        func run() async throws {
            var t = NewTask(name: name, executor: executor, schedule: try Schedule(parsing: schedule))
            guard let data = params.data(using: .utf8), let p = try? JSONDecoder().decode(JSONValue.self, from: data), p.objectValue != nil else {
                throw ValidationError(field: "--params", value: params, hint: "must be a JSON object, e.g. '{\"seconds\": 2}'")
            }
            t.parameters = p
            t.queue = queue
            t.timeoutSeconds = timeout
            if let start {
                guard let d = Timestamp.parse(start) else {
                    throw ValidationError(field: "--start", value: start, hint: "an ISO-8601 instant such as 2026-11-23T12:00:00Z")
                }
                t.startAt = d
            }
            do {
                try await common.withStore { try await $0.createTasks([t]) }
            } catch let e as PostgresError where e.isUniqueViolation {
                throw ValidationError(field: "--name", value: name, hint: "a task with this name exists; pick another name")
            }
            print(t.id.uuidString.lowercased())
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List tasks.")
        @OptionGroup var common: CommonOptions
        @Option var limit = 100

        func run() async throws {
            let tasks = try await common.withStore { try await $0.tasks(limit: limit) }
            print("NAME".padding(toLength: 28, withPad: " ", startingAt: 0), "EXECUTOR".padding(toLength: 10, withPad: " ", startingAt: 0),
                  "SCHEDULE".padding(toLength: 14, withPad: " ", startingAt: 0), "QUEUE".padding(toLength: 10, withPad: " ", startingAt: 0), "NEXT RUN")
            for t in tasks {
                print(t.name.padding(toLength: 28, withPad: " ", startingAt: 0), t.executor.padding(toLength: 10, withPad: " ", startingAt: 0),
                      t.schedule.padding(toLength: 14, withPad: " ", startingAt: 0), t.queue.padding(toLength: 10, withPad: " ", startingAt: 0),
                      t.paused ? "paused" : (t.nextRunAt.map { Timestamp.format($0) } ?? "-"))
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a task and its recent runs.")
        @OptionGroup var common: CommonOptions
        @Argument var name: String
        @Option var runs = 10

        func run() async throws {
            try await common.withStore { store in
                guard let t = try await store.task(named: name) else {
                    throw ValidationError(field: "name", value: name, hint: "no such task; see 'conveyor task list'")
                }
                print("task \(t.name) (\(t.id.uuidString.lowercased()))")
                print("  executor \(t.executor)  schedule \(t.schedule)  queue \(t.queue)  timeout \(t.timeoutSeconds)s")
                print("  parameters \(t.parameters)")
                print("  next run \(t.nextRunAt.map { Timestamp.format($0) } ?? "-")\(t.paused ? " (paused)" : "")")
                for r in try await store.runs(taskID: t.id, limit: runs) {
                    var line = "  run \(r.id.uuidString.lowercased()) #\(r.attempt) \(r.state.rawValue) due \(Timestamp.format(r.occurrence))"
                    if let w = r.workerID { line += " on \(w)" }
                    if let e = r.exitCode { line += " exit \(e)" }
                    if let m = r.errorMessage { line += " — \(m)" }
                    if let tid = r.traceID { line += " trace \(tid)" }
                    print(line)
                    if let o = r.output, !o.isEmpty { print("    output: \(o.prefix(200).replacingOccurrences(of: "\n", with: "⏎"))") }
                }
            }
        }
    }

    struct Trigger: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Make a task due now.")
        @OptionGroup var common: CommonOptions
        @Argument var name: String

        func run() async throws {
            try await common.withStore { store in
                guard let t = try await store.task(named: name) else {
                    throw ValidationError(field: "name", value: name, hint: "no such task; see 'conveyor task list'")
                }
                try await store.trigger(taskID: t.id)
                print("triggered \(t.name)")
            }
        }
    }
}

extension CommonOptions {
    /// Runs `body` with a one-connection store (admin commands), closing it afterwards.
    func withStore<T: Sendable>(_ body: (Store) async throws -> T) async throws -> T {
        let logger = try logger("conveyor.task")
        let c = try Connections(settings: try await settings("dispatcher.yaml"), poolSize: 1)
        let pool = c.pool(logger: logger, connectRetryFor: .seconds(5))
        defer { pool.close() }
        return try await body(Store(pool: pool))
    }
}
