import ArgumentParser
import ConveyorConfig
import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import Foundation
import Logging
import Yams

/// Admin tool writing through the database (for operators with database access; `conveyorctl`
/// talks to the API).
struct TaskCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "task", abstract: "Define, list, trigger, pause and cancel tasks (needs database access).",
        subcommands: [Add.self, List.self, Show.self, Trigger.self, Pause.self, Resume.self, Cancel.self, Delete.self])

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create tasks from flags or from a YAML task file (see docs/scheduling.md).",
            discussion:
                "Example: conveyor task add --name nightly --executor shell --params '{\"argv\": [\"/bin/date\"]}' --schedule '0 2 * * *' --timezone Europe/London --retry '{\"max_attempts\": 3}'"
        )
        @OptionGroup var common: CommonOptions
        @Option(help: "A YAML file with one task or a list under 'tasks:' (all created in one transaction).") var file: String?
        @Option(help: "Unique task name.") var name: String?
        @Option(help: "Executor name, as offered by workers (for example noop, sleep, shell).") var executor: String?
        @Option(help: "Cron ('*/5 * * * *', '0 30 9 * * MON-FRI', '@daily'), 'every 30s', 'once' (default) or 'manual'.") var schedule: String?
        @Option(help: "IANA time zone of a cron schedule (default UTC).") var timezone: String?
        @Option(help: "Executor parameters as a JSON object, e.g. '{\"argv\": [\"/bin/echo\", \"hi\"]}'.") var params: String?
        @Option(help: "Work queue (default 'default').") var queue: String?
        @Option(help: "critical, high, normal (default), low or background.") var priority: String?
        @Option(help: "Timeout in seconds (default 300).") var timeout: Double?
        @Option(help: "First due time, ISO-8601.") var start: String?
        @Option(help: "First due after a delay, e.g. 10m.") var after: String?
        @Option(help: "Missed occurrences: skip, once (default) or all.") var misfire: String?
        @Option(name: .customLong("max-catchup"), help: "Most missed occurrences run by misfire 'all' (default 10).") var maxCatchup: Int?
        @Option(help: "Retry policy as JSON: {\"max_attempts\": 3, \"base_seconds\": 1, \"factor\": 2, \"cap_seconds\": 300, \"retry_on\": [\"timeout\"]}.")
        var retry: String?
        @Option(help: "When an earlier run is active: allow (default), forbid, replace or queue.") var overlap: String?
        @Option(name: .customLong("concurrency-key"), help: "At most --concurrency-limit runs in flight per key, e.g. customer:42.") var concurrencyKey: String?
        @Option(name: .customLong("concurrency-limit")) var concurrencyLimit: Int?
        @Option(help: "Group name (pause, resume, cancel and count a group at once).") var group: String?
        @Option(name: .customLong("label"), help: "A label key=value (repeatable).") var labels: [String] = []
        @Option(name: .customLong("depends-on"), help: "An upstream task name (repeatable); the task then needs --schedule manual.") var dependsOn: [String] =
            []
        @Option(name: .customLong("trigger-rule"), help: "all_success (default), all_done or one_failed.") var triggerRule: String?
        @Option(name: .customLong("callback-url"), help: "POSTed the outcome (succeeded, failed, dead).") var callbackURL: String?
        @Flag(help: "Create it paused.") var paused = false

        func run() async throws {
            let tasks: [NewTask]
            if let file {
                guard name == nil && executor == nil else {
                    throw ValidationError(field: "--file", value: file, hint: "give either --file or --name/--executor flags, not both")
                }
                tasks = try TaskSpec.decodeFile(try YAMLFile.load(file))
            } else {
                tasks = [try TaskSpec.decode(try flagsSpec())]
            }
            do {
                try await common.withStore { try await $0.createTasks(tasks) }
            } catch let e as StoreError where e.kind == .taskExists {
                throw ValidationError(
                    field: "name", value: tasks.map(\.name).joined(separator: ", "),
                    hint: "a task with this name exists; pick another name or delete it first")
            }
            for t in tasks { print("\(t.id.lowercasedString)  \(t.name)") }
        }

        /// The flags as the same mapping a task file holds, so one decoder checks both.
        func flagsSpec() throws -> JSONValue {
            var o: [String: JSONValue] = [:]
            func put(_ k: String, _ v: String?) { if let v { o[k] = .string(v) } }
            put("name", name)
            put("executor", executor)
            put("schedule", schedule)
            put("timezone", timezone)
            put("queue", queue)
            put("priority", priority)
            put("start", start)
            put("after", after)
            put("misfire", misfire)
            put("overlap", overlap)
            put("group", group)
            put("trigger_rule", triggerRule)
            put("callback_url", callbackURL)
            if let timeout { o["timeout"] = .number(timeout) }
            if let maxCatchup { o["max_catchup"] = .number(Double(maxCatchup)) }
            if let params { o["parameters"] = try JSONFlag.object(params, flag: "--params", example: "{\"seconds\": 2}") }
            if let retry { o["retry"] = try JSONFlag.object(retry, flag: "--retry", example: "{\"max_attempts\": 3}") }
            if concurrencyKey != nil || concurrencyLimit != nil {
                guard let concurrencyKey, let concurrencyLimit else {
                    throw ValidationError(
                        field: "--concurrency-key/--concurrency-limit", value: concurrencyKey ?? "\(concurrencyLimit!)",
                        hint: "give both, e.g. --concurrency-key customer:42 --concurrency-limit 2")
                }
                o["concurrency"] = .object(["key": .string(concurrencyKey), "limit": .number(Double(concurrencyLimit))])
            }
            if !labels.isEmpty {
                var l: [String: JSONValue] = [:]
                for kv in labels {
                    guard let eq = kv.firstIndex(of: "="), eq != kv.startIndex else {
                        throw ValidationError(field: "--label", value: kv, hint: "key=value, e.g. --label team=data")
                    }
                    l[String(kv[..<eq])] = .string(String(kv[kv.index(after: eq)...]))
                }
                o["labels"] = .object(l)
            }
            if !dependsOn.isEmpty { o["depends_on"] = .array(dependsOn.map(JSONValue.string)) }
            if paused { o["paused"] = .bool(true) }
            return .object(o)
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List tasks.")
        @OptionGroup var common: CommonOptions
        @Option var limit = 100
        @Option(help: "Only this group.") var group: String?

        func run() async throws {
            let tasks = try await common.withStore { try await $0.tasks(limit: limit, group: group) }
            Table.print(
                ["NAME", "EXECUTOR", "SCHEDULE", "QUEUE", "PRIORITY", "GROUP", "NEXT RUN"],
                tasks.map { t in
                    [
                        t.name, t.executor, t.schedule + (t.timeZone == "UTC" ? "" : " (\(t.timeZone))"), t.queue, t.priority.name, t.group ?? "-",
                        t.paused ? "paused" : (t.nextRunAt.map { Timestamp.format($0) } ?? (t.dependsOn.isEmpty ? "-" : "after upstream")),
                    ]
                })
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a task and its recent runs.")
        @OptionGroup var common: CommonOptions
        @Argument var name: String
        @Option var runs = 10

        func run() async throws {
            try await common.withStore { store in
                let t = try await store.requireTask(name)
                print("task \(t.name) (\(t.id.lowercasedString))\(t.paused ? " PAUSED" : "")")
                print("  executor \(t.executor)  queue \(t.queue)  priority \(t.priority.name)  timeout \(t.timeoutSeconds)s")
                print("  schedule \(t.schedule) in \(t.timeZone)  misfire \(t.misfire)  overlap \(t.overlap)  skipped occurrences \(t.skippedOccurrences)")
                print("  retry max_attempts \(t.maxAttempts) \(t.retryPolicy)")
                if let k = t.concurrencyKey { print("  concurrency key \(k) limit \(t.concurrencyLimit ?? 0)") }
                if let g = t.group { print("  group \(g)") }
                if !t.dependsOn.isEmpty { print("  depends on \(t.dependsOn.joined(separator: ", ")) (\(t.triggerRule))") }
                if let u = t.callbackURL { print("  callback \(u)") }
                print("  parameters \(t.parameters)")
                print("  next run \(t.nextRunAt.map { Timestamp.format($0) } ?? "-")")
                for r in try await store.runs(taskID: t.id, limit: runs) { RunCommand.printRun(r, indent: "  ") }
            }
        }
    }

    struct Trigger: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Make a task due now.")
        @OptionGroup var common: CommonOptions
        @Argument var name: String

        func run() async throws {
            try await common.withStore { store in
                try await store.trigger(taskID: try await store.requireTask(name).id)
                print("triggered \(name)")
            }
        }
    }

    struct Pause: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Pause tasks: no new occurrences start (missed ones go by the misfire policy on resume).")
        @OptionGroup var common: CommonOptions
        @Argument var names: [String]

        func run() async throws {
            let n = try await common.withStore { try await $0.setPaused(true, names: names) }
            print("paused \(n) task(s)")
        }
    }

    struct Resume: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Resume paused tasks.")
        @OptionGroup var common: CommonOptions
        @Argument var names: [String]

        func run() async throws {
            let n = try await common.withStore { try await $0.setPaused(false, names: names) }
            print("resumed \(n) task(s)")
        }
    }

    struct Cancel: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Cancel every run of a task that has not ended (workers kill the executor).")
        @OptionGroup var common: CommonOptions
        @Argument var name: String

        func run() async throws {
            let ids = try await common.withStore { store in try await store.cancel(task: try await store.requireTask(name).id) }
            print("cancelled \(ids.count) run(s)")
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Soft-delete a task (purged after retention.deleted_tasks_days).")
        @OptionGroup var common: CommonOptions
        @Argument var name: String

        func run() async throws {
            guard try await common.withStore({ try await $0.deleteTask(named: name) }) else {
                throw ValidationError(field: "name", value: name, hint: "no such task; see 'conveyor task list'")
            }
            print("deleted \(name)")
        }
    }
}

extension Store {
    func requireTask(_ name: String) async throws -> TaskRecord {
        guard let t = try await task(named: name) else {
            throw ValidationError(field: "name", value: name, hint: "no such task; see 'conveyor task list'")
        }
        return t
    }
}

/// JSON given on the command line.
enum JSONFlag {
    static func object(_ text: String, flag: String, example: String) throws -> JSONValue {
        guard let v = try? JSONDecoder().decode(JSONValue.self, from: Data(text.utf8)), v.objectValue != nil else {
            throw ValidationError(field: flag, value: text, hint: "must be a JSON object, e.g. '\(example)'")
        }
        return v
    }
}

/// YAML files read into `JSONValue`.
enum YAMLFile {
    static func load(_ path: String) throws -> JSONValue {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw ValidationError(field: "--file", value: path, hint: "cannot read this file")
        }
        do {
            return try value(Yams.load(yaml: text) as Any)
        } catch let e as ConveyorCore.ValidationError {
            throw e
        } catch {
            throw ValidationError(field: "--file", value: path, hint: "not valid YAML: \(error)")
        }
    }

    static func value(_ any: Any) throws -> JSONValue { JSONValue(loaded: any) }
}

/// Plain aligned columns for people.
enum Table {
    static func print(_ header: [String], _ rows: [[String]]) { Swift.print(TextTable.render(header, rows)) }
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
