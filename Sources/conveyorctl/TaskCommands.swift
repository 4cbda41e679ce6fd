import ArgumentParser
import ConveyorCore
import Foundation
import NIOHTTP1
import Yams

// MARK: tasks

struct TaskGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "task", abstract: "Define, list, trigger, pause and delete tasks.",
        discussion: "Example: conveyorctl task list --state failed --group etl -o wide",
        subcommands: [
            Add.self, Submit.self, Update.self, List.self, Get.self, Post<TriggerTask>.self, Post<PauseTask>.self,
            Post<ResumeTask>.self, ConfirmedPost<CancelTask>.self, Delete.self, Backfill.self,
        ])

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create one task from flags (a file of many: 'task submit'; fields: docs/scheduling.md).",
            discussion: """
                Example: conveyorctl task add hello --executor shell --params '{"argv": ["/bin/echo", "hi"]}' \
                --schedule 'every 1m'
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The task's name.") var name: String
        @Option(help: "The executor that runs it (the workers' worker.executors).") var executor: String
        @Option(help: "Its parameters, as a JSON object.") var params: String?
        @Option(help: "cron ('0 2 * * *'), 'every 30s', 'once' or 'manual' (the default).") var schedule: String?
        @Option(help: "The cron expression's time zone (default UTC).") var timezone: String?
        @Option(help: "The work queue (default 'default').") var queue: String?
        @Option(help: "The task's group.") var group: String?
        @Option(help: "Seconds a run may take.") var timeout: Double?
        @Option(help: "Seconds a published run may wait for a worker before it ends expired (default 3600).")
        var scheduleToStartTimeout: Double?
        @Option(help: "A uniqueness key: while a task of the namespace holds it, this one is not created.")
        var unique: String?
        @Option(help: "With --unique: hold the key this long after creation (30s, 10m, 1h) instead of while active.")
        var uniqueWindow: String?

        func validate() throws {
            if let timeout { try checkSeconds(timeout, flag: "timeout") }
            if let s = scheduleToStartTimeout {
                try checkSeconds(s, flag: "schedule-to-start-timeout", max: 604_800, named: "a week")
            }
        }

        func run() async throws {
            var task: [String: JSONValue] = ["name": .string(name), "executor": .string(executor)]
            if let params {
                guard let value = try? JSONDecoder().decode(JSONValue.self, from: Data(params.utf8)),
                    value.objectValue != nil
                else {
                    throw CLIError(
                        "--params is not a JSON object: \(params)", fix: #"write it as '{"argv": ["/bin/date"]}'"#)
                }
                task["parameters"] = value
            }
            for (key, value) in [
                ("schedule", schedule), ("timezone", timezone), ("queue", queue), ("group", group),
            ] {
                if let value { task[key] = .string(value) }
            }
            if let timeout { task["timeout"] = .number(timeout) }
            if let s = scheduleToStartTimeout { task["schedule_to_start_timeout"] = .number(s) }
            if let unique {
                task["unique"] = .object(
                    ["key": .string(unique)].merging(uniqueWindow.map { ["window": .string($0)] } ?? [:]) { a, _ in a })
            } else if uniqueWindow != nil {
                throw CLIError(
                    "--unique-window needs --unique", fix: "give the key: --unique invoice:42 --unique-window 1h")
            }
            let r = try await global.client().call(.POST, "/v1/tasks", body: .object(task), accept: [200, 201])
            // 200: another task holds the key, and nothing was created.
            let held = r.status == 200
            let holder = Output.text(r.json["name"])
            global.show(
                .object(held ? ["deduplicated": .string(holder)] : ["created": .string(name)]),
                names: ["task/\(held ? holder : name)"]
            ) { _ in held ? "not created: task \(holder) holds unique key \(unique ?? "")" : "created \(name)" }
        }
    }

    struct Submit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create tasks from a YAML or JSON file (one task, a list, or {tasks: [...]}), in batches.",
            discussion: """
                Each batch is all or nothing; a progress bar shows on a terminal. -o name prints task/NAME for \
                every task submitted. Example: conveyorctl task submit -f tasks.yaml --batch-size 500
                """)
        @OptionGroup var global: GlobalOptions
        @Option(name: [.short, .long], help: "The task file; '-' reads standard input.") var file: String
        @Option(name: .customLong("batch-size"), help: "Tasks per request (each batch is all or nothing).")
        var batchSize = 500

        func validate() throws {
            guard (1...1000).contains(batchSize) else {
                throw ValidationError("--batch-size must be from 1 to 1000 (the API's largest batch); got \(batchSize)")
            }
        }

        func run() async throws {
            let client = try global.client()
            let text = try readInput(file)
            let loaded: Any?
            do { loaded = try Yams.load(yaml: text) } catch {
                throw CLIError(
                    "\(file) is not YAML or JSON: \(error)",
                    fix: "a task file is a mapping (one task), a list, or {tasks: [...]}")
            }
            let value = JSONValue(loaded: loaded)
            let tasks = value.taskBatch ?? [value]
            guard !tasks.isEmpty, tasks.allSatisfy({ $0.objectValue != nil }) else {
                throw CLIError("\(file) holds no tasks", fix: "each task is a mapping with at least name and executor")
            }
            let progress = Progress(total: tasks.count, label: "tasks")
            var done = 0
            var batches: [String] = []
            var deduplicated = 0
            progress.update(0)
            for start in stride(from: 0, to: tasks.count, by: batchSize) {
                let chunk = Array(tasks[start..<min(start + batchSize, tasks.count)])
                do {
                    let reply = try await client.call(.POST, "/v1/tasks", body: .array(chunk), accept: [201])
                    batches.append(reply.json["batch_id"]?.stringValue ?? "?")
                    deduplicated += Int(reply.json["deduplicated"]?.doubleValue ?? 0)
                } catch var e as CLIError {
                    // Field paths name the item in the batch; say which task of the file it is.
                    if let r = e.message.range(of: #"tasks\[(\d+)\]"#, options: .regularExpression),
                        let i = Int(e.message[r].dropFirst(6).dropLast())
                    {
                        e.message = e.message.replacingCharacters(in: r, with: "tasks[\(start + i)]")
                    }
                    if done > 0 {
                        e.message +=
                            """
                            \n  \(done) tasks before it were created (batches \(batches.joined(separator: ", "))); \
                            fix the file and submit the rest
                            """
                    }
                    throw e
                }
                done += chunk.count
                progress.update(done)
            }
            global.show(
                .object([
                    "submitted": .number(Double(done)), "deduplicated": .number(Double(deduplicated)),
                    "batches": .array(batches.map(JSONValue.string)),
                ]),
                names: tasks.map { "task/" + Output.text($0["name"]) }
            ) { _ in
                "submitted \(done) tasks in \(batches.count) batch\(batches.count == 1 ? "" : "es"): "
                    + batches.joined(separator: ", ")
                    + (deduplicated > 0 ? " (\(deduplicated) not created: their unique key was held)" : "")
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List tasks with their latest run.",
            discussion: """
                -o wide adds the time zone, priority, group, labels and the latest run's id. \
                Example: conveyorctl task list --label team=data --paused false -o wide
                """)
        @OptionGroup var global: GlobalOptions
        @Option(help: "State of the latest run (succeeded, failed, dead, ...).") var state: String?
        @Option var queue: String?
        @Option var group: String?
        @Option(help: "key or key=value.") var label: String?
        @Option(help: "The batch id a submit printed.") var batch: String?
        @Option(help: "Names starting with this.") var prefix: String?
        @Option(help: "true or false.") var paused: Bool?
        @Option(help: "Tasks per page (1 to 100).") var limit = 50
        @Option(help: "The next_cursor a previous page gave: the page after it.") var cursor: String?
        @Flag(help: "Follow every page.") var all = false

        func run() async throws {
            let (tasks, next) = try await global.client().pages(
                "/v1/tasks", key: "tasks",
                query: [
                    ("state", state), ("queue", queue), ("group", group), ("label", label), ("batch_id", batch),
                    ("prefix", prefix), ("paused", paused.map { String($0) }), ("limit", String(limit)),
                ], all: all, from: cursor)
            global.show(
                Output.page("tasks", tasks, next: next), names: tasks.map { "task/" + Output.text($0["name"]) },
                more: next.map { "(more: --all, or --cursor \($0))" }
            ) { wide in
                guard wide else {
                    return TextTable.render(
                        ["NAME", "EXECUTOR", "SCHEDULE", "QUEUE", "PAUSED", "LAST RUN", "NEXT RUN"],
                        tasks.map { t in
                            [
                                Output.text(t["name"]), Output.text(t["executor"]), Output.text(t["schedule"]),
                                Output.text(t["queue"]), Output.text(t["paused"]),
                                Output.text(t["last_run"]?["state"]), Output.text(t["next_run_at"]),
                            ]
                        })
                }
                return TextTable.render(
                    [
                        "NAME", "EXECUTOR", "SCHEDULE", "TIMEZONE", "QUEUE", "PRIORITY", "GROUP", "LABELS", "PAUSED",
                        "LAST RUN", "LAST RUN ID", "NEXT RUN",
                    ],
                    tasks.map { t in
                        [
                            Output.text(t["name"]), Output.text(t["executor"]), Output.text(t["schedule"]),
                            Output.text(t["timezone"]), Output.text(t["queue"]), Output.text(t["priority"]),
                            Output.text(t["group"]), Output.pairs(t["labels"]), Output.text(t["paused"]),
                            Output.text(t["last_run"]?["state"]), Output.text(t["last_run"]?["id"]),
                            Output.text(t["next_run_at"]),
                        ]
                    })
            }
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "One task and its recent runs.",
            discussion: "-o yaml gives every field. Example: conveyorctl task get nightly-report -o yaml")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The task's name.") var name: String

        func run() async throws {
            let t = try await global.client().call(.GET, "/v1/tasks/" + path(name)).json
            global.show(t, names: ["task/\(name)"]) { _ in
                var lines = Output.fields(
                    t,
                    [
                        "name", "executor", "schedule", "timezone", "queue", "priority", "timeout",
                        "schedule_to_start_timeout", "max_attempts", "paused", "next_run_at", "skipped_occurrences",
                        "group", "parameters",
                    ], width: 26)
                lines.append("\nrecent runs:")
                lines.append(
                    TextTable.render(
                        ["RUN", "OCCURRENCE", "ATTEMPT", "STATE", "TRACE"],
                        (t["recent_runs"]?.arrayValue ?? []).map { r in
                            [
                                Output.text(r["id"]), Output.text(r["occurrence"]), Output.text(r["attempt"]),
                                Output.text(r["state"]), Output.text(r["trace_id"]),
                            ]
                        }))
                return lines.joined(separator: "\n")
            }
        }
    }

    struct Update: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change a task: a JSON merge patch of its fields (PATCH /v1/tasks/NAME).",
            discussion: """
                Fields as in a task file (docs/scheduling.md); an absent field stays, null clears it (its default \
                applies). Example: conveyorctl task update nightly --set timeout=900 --set 'retry={"max_attempts": 4}'
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The task's name.") var name: String
        @Option(
            name: .customLong("set"),
            help: "FIELD=VALUE; VALUE is read as JSON when it parses (900, null, {\"a\": 1}), else as text.")
        var sets: [String] = []
        @Option(name: [.short, .long], help: "A patch file (YAML or JSON mapping); '-' reads standard input.")
        var file: String?

        func run() async throws {
            var patch: [String: JSONValue] = [:]
            if let file {
                let text = try readInput(file)
                guard let loaded = try? Yams.load(yaml: text), let o = JSONValue(loaded: loaded).objectValue else {
                    throw CLIError(
                        "\(file) is not a mapping of fields", fix: "write it as {timeout: 900, queue: reports}")
                }
                patch = o
            }
            try patch.merge(settings(sets, example: "timeout=900")) { _, new in new }
            guard !patch.isEmpty else {
                throw CLIError("nothing to change", fix: "give --set FIELD=VALUE (repeatable) or -f FILE")
            }
            let r = try await global.client().call(.PATCH, "/v1/tasks/" + path(name), body: .object(patch)).json
            global.show(r, names: ["task/\(name)"]) { _ in
                "updated \(name): \(patch.keys.sorted().joined(separator: ", "))"
            }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete a task (soft: its runs stay); --purge removes it and its runs (admin).",
            discussion: """
                Asks first on a terminal; --yes (-y) does not ask, and is needed when standard input is not a \
                terminal. Example: conveyorctl task delete nightly-report --purge --yes
                """)
        @OptionGroup var global: GlobalOptions
        @OptionGroup var confirmation: Confirmation
        @Argument(help: "The task's name.") var name: String
        @Flag(help: "Delete the task and all its runs for good.") var purge = false
        func run() async throws {
            let client = try global.client()
            try confirmation.confirm(purge ? "delete task \(name) and all its runs for good" : "delete task \(name)")
            let r = try await client.call(
                .DELETE, "/v1/tasks/" + path(name), query: [("purge", purge ? "true" : nil)]
            ).json
            global.show(r, names: ["task/\(name)"]) { _ in
                purge ? "purged \(name) and \(Output.text(r["purged_runs"])) runs" : "deleted \(name)"
            }
        }
    }
}

/// A file's text; `-` reads standard input.
func readInput(_ file: String) throws -> String {
    if file == "-" { return String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self) }
    guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
        throw CLIError("cannot read \(file)", fix: "check the path; use '-' to read standard input")
    }
    return text
}

/// `--set NAME=VALUE` flags as a mapping: VALUE is JSON when it parses (`900`, `null`,
/// `{"a": 1}`), else text.
func settings(_ items: [String], example: String) throws -> [String: JSONValue] {
    var out: [String: JSONValue] = [:]
    for item in items {
        guard let eq = item.firstIndex(of: "="), eq != item.startIndex else {
            throw CLIError("--set \(item) is not NAME=VALUE", fix: "for example --set \(example)")
        }
        let value = String(item[item.index(after: eq)...])
        out[String(item[..<eq])] = (try? JSONDecoder().decode(JSONValue.self, from: Data(value.utf8))) ?? .string(value)
    }
    return out
}
