import ArgumentParser
import ConveyorCore
import Foundation
import NIOHTTP1
import Yams

@main
struct ConveyorCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "conveyorctl",
        abstract: "Drive Conveyor through its REST API: tasks, runs, workers, groups and keys.",
        discussion: """
            The API's URL comes from --url, CONVEYOR_URL or the config file (default http://127.0.0.1:8080);
            the key from --key-file, CONVEYOR_API_KEY or the config file's key_file.
            """,
        subcommands: [TaskGroup.self, RunGroup.self, WorkerGroup.self, GroupGroup.self, KeyGroup.self])
}

func path(_ s: String) -> String { s.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(CharacterSet(charactersIn: "/"))) ?? s }

// MARK: tasks

struct TaskGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "task", abstract: "Define, list, trigger, pause and delete tasks.",
                                                    subcommands: [Submit.self, List.self, Get.self, Post<TriggerTask>.self, Post<PauseTask>.self, Post<ResumeTask>.self, Delete.self])

    struct Submit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create tasks from a YAML or JSON file (one task, a list, or {tasks: [...]}), in batches.")
        @OptionGroup var global: GlobalOptions
        @Option(name: [.short, .long], help: "The task file; '-' reads standard input.") var file: String
        @Option(name: .customLong("batch-size"), help: "Tasks per request (each batch is all or nothing).") var batchSize = 500

        func validate() throws {
            guard (1...1000).contains(batchSize) else { throw ValidationError("--batch-size must be from 1 to 1000 (the API's largest batch); got \(batchSize)") }
        }

        func run() async throws {
            let client = try global.client()
            let text: String
            if file == "-" {
                text = String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self)
            } else {
                guard let t = try? String(contentsOfFile: file, encoding: .utf8) else {
                    throw CLIError("cannot read \(file)", fix: "check the path; use '-' to read standard input")
                }
                text = t
            }
            let loaded: Any?
            do { loaded = try Yams.load(yaml: text) } catch {
                throw CLIError("\(file) is not YAML or JSON: \(error)", fix: "a task file is a mapping (one task), a list, or {tasks: [...]}")
            }
            let value = JSONValue(loaded: loaded)
            let tasks = value.arrayValue ?? value["tasks"]?.arrayValue ?? [value]
            guard !tasks.isEmpty, tasks.allSatisfy({ $0.objectValue != nil }) else {
                throw CLIError("\(file) holds no tasks", fix: "each task is a mapping with at least name and executor")
            }
            let progress = Progress(total: tasks.count, label: "tasks")
            var done = 0
            var batches: [String] = []
            progress.update(0)
            for start in stride(from: 0, to: tasks.count, by: batchSize) {
                let chunk = Array(tasks[start..<min(start + batchSize, tasks.count)])
                do {
                    let reply = try await client.call(.POST, "/v1/tasks", body: .array(chunk), accept: [201])
                    batches.append(reply.json["batch_id"]?.stringValue ?? "?")
                } catch var e as CLIError {
                    // Field paths name the item in the batch; say which task of the file it is.
                    if let r = e.message.range(of: #"tasks\[(\d+)\]"#, options: .regularExpression),
                       let i = Int(e.message[r].dropFirst(6).dropLast()) {
                        e.message = e.message.replacingCharacters(in: r, with: "tasks[\(start + i)]")
                    }
                    if done > 0 { e.message += "\n  \(done) tasks before it were created (batches \(batches.joined(separator: ", "))); fix the file and submit the rest" }
                    throw e
                }
                done += chunk.count
                progress.update(done)
            }
            Output.print(.object(["submitted": .number(Double(done)), "batches": .array(batches.map(JSONValue.string))]), json: global.json) {
                "submitted \(done) tasks in \(batches.count) batch\(batches.count == 1 ? "" : "es"): " + batches.joined(separator: ", ")
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List tasks with their latest run.")
        @OptionGroup var global: GlobalOptions
        @Option(help: "State of the latest run (succeeded, failed, dead, ...).") var state: String?
        @Option var queue: String?
        @Option var group: String?
        @Option(help: "key or key=value.") var label: String?
        @Option(help: "The batch id a submit printed.") var batch: String?
        @Option(help: "Names starting with this.") var prefix: String?
        @Option(help: "true or false.") var paused: Bool?
        @Option(help: "Tasks per page (1 to 100).") var limit = 50
        @Flag(help: "Follow every page.") var all = false

        func run() async throws {
            let client = try global.client()
            var cursor: String?
            var tasks: [JSONValue] = []
            repeat {
                let reply = try await client.call(.GET, "/v1/tasks", query: [
                    ("state", state), ("queue", queue), ("group", group), ("label", label), ("batch_id", batch), ("prefix", prefix),
                    ("paused", paused.map { String($0) }), ("limit", String(limit)), ("cursor", cursor),
                ])
                tasks += reply.json["tasks"]?.arrayValue ?? []
                cursor = reply.json["next_cursor"]?.stringValue
            } while all && cursor != nil
            Output.print(.object(["tasks": .array(tasks)] .merging(cursor.map { ["next_cursor": .string($0)] } ?? [:]) { a, _ in a }), json: global.json) {
                TextTable.render(["NAME", "EXECUTOR", "SCHEDULE", "QUEUE", "PAUSED", "LAST RUN", "NEXT RUN"], tasks.map { t in
                    [Output.text(t["name"]), Output.text(t["executor"]), Output.text(t["schedule"]), Output.text(t["queue"]), Output.text(t["paused"]),
                     Output.text(t["last_run"]?["state"]), Output.text(t["next_run_at"])]
                }) + (cursor.map { "\n(more: --all, or the next page after \($0))" } ?? "")
            }
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One task and its recent runs.")
        @OptionGroup var global: GlobalOptions
        @Argument var name: String

        func run() async throws {
            let t = try await global.client().call(.GET, "/v1/tasks/" + path(name)).json
            Output.print(t, json: global.json) {
                var lines = ["name", "executor", "schedule", "timezone", "queue", "priority", "timeout", "max_attempts", "paused", "next_run_at", "group", "parameters"]
                    .map { "\($0.padding(toLength: 13, withPad: " ", startingAt: 0)) \(Output.text(t[$0]))" }
                lines.append("\nrecent runs:")
                lines.append(TextTable.render(["RUN", "OCCURRENCE", "ATTEMPT", "STATE", "TRACE"], (t["recent_runs"]?.arrayValue ?? []).map { r in
                    [Output.text(r["id"]), Output.text(r["occurrence"]), Output.text(r["attempt"]), Output.text(r["state"]), Output.text(r["trace_id"])]
                }))
                return lines.joined(separator: "\n")
            }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a task (soft: its runs stay); --purge removes it and its runs (admin).")
        @OptionGroup var global: GlobalOptions
        @Argument var name: String
        @Flag(help: "Delete the task and all its runs for good.") var purge = false
        func run() async throws {
            let r = try await global.client().call(.DELETE, "/v1/tasks/" + path(name), query: [("purge", purge ? "true" : nil)]).json
            Output.print(r, json: global.json) { purge ? "purged \(name) and \(Output.text(r["purged_runs"])) runs" : "deleted \(name)" }
        }
    }
}

// MARK: runs

struct RunGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "List and inspect runs; cancel and re-drive them.",
                                                    subcommands: [List.self, Get.self, Logs.self, Post<CancelRun>.self, Post<RedriveRun>.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Runs, newest first.")
        @OptionGroup var global: GlobalOptions
        @Option var task: String?
        @Option var state: String?
        @Option(help: "Occurrences at or after (ISO-8601).") var since: String?
        @Option(help: "Occurrences before (ISO-8601).") var until: String?
        @Option var limit = 50
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/runs", query: [("task", task), ("state", state), ("since", since), ("until", until), ("limit", String(limit))]).json
            Output.print(r, json: global.json) {
                TextTable.render(["RUN", "OCCURRENCE", "ATTEMPT", "STATE", "WORKER", "TRACE"], (r["runs"]?.arrayValue ?? []).map { x in
                    [Output.text(x["id"]), Output.text(x["occurrence"]), Output.text(x["attempt"]), Output.text(x["state"]), Output.text(x["worker_id"]), Output.text(x["trace_id"])]
                })
            }
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One run: state, times, error, trace id.")
        @OptionGroup var global: GlobalOptions
        @Argument var id: String
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/runs/" + path(id)).json
            Output.print(r, json: global.json) {
                ["id", "task_id", "state", "attempt", "occurrence", "started_at", "finished_at", "worker_id", "exit_code", "error_class", "error_message", "reason", "trace_id"]
                    .map { "\($0.padding(toLength: 13, withPad: " ", startingAt: 0)) \(Output.text(r[$0]))" }.joined(separator: "\n")
            }
        }
    }

    struct Logs: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The captured output of a run (its tail, as capped by the worker).")
        @OptionGroup var global: GlobalOptions
        @Argument var id: String
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/runs/" + path(id)).json
            Output.print(.object(["id": r["id"] ?? .null, "output": r["output"] ?? .null]), json: global.json) { r["output"]?.stringValue ?? "(no output captured)" }
        }
    }
}

// MARK: workers, groups, keys

struct WorkerGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "worker", abstract: "Workers known from heartbeats.", subcommands: [List.self, Get.self])

    static func rows(_ workers: [JSONValue]) -> String {
        TextTable.render(["WORKER", "HOST", "STATE", "IN FLIGHT", "CONCURRENCY", "QUEUES", "LAST HEARTBEAT"], workers.map { w in
            [Output.text(w["id"]), Output.text(w["host"]), Output.text(w["state"]), Output.text(w["in_flight"]), Output.text(w["concurrency"]),
             (w["queues"]?.arrayValue ?? []).map(Output.text).joined(separator: ","), "\(Int(w["seconds_since_heartbeat"]?.doubleValue ?? 0)) s ago"]
        })
    }

    struct List: AsyncParsableCommand {
        @OptionGroup var global: GlobalOptions
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/workers").json
            Output.print(r, json: global.json) { WorkerGroup.rows(r["workers"]?.arrayValue ?? []) }
        }
    }

    struct Get: AsyncParsableCommand {
        @OptionGroup var global: GlobalOptions
        @Argument var id: String
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/workers/" + path(id)).json
            Output.print(r, json: global.json) {
                WorkerGroup.rows([r]) + "\n\nruns held:\n" + TextTable.render(["RUN", "TASK", "STARTED"], (r["runs"]?.arrayValue ?? []).map { x in
                    [Output.text(x["id"]), Output.text(x["task_id"]), Output.text(x["started_at"])]
                })
            }
        }
    }
}

struct GroupGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "group", abstract: "Task groups: counts, pause, resume, cancel.",
                                                    subcommands: [List.self, Get.self, Post<PauseGroup>.self, Post<ResumeGroup>.self, Post<CancelGroup>.self])

    static func rows(_ groups: [JSONValue]) -> String {
        TextTable.render(["GROUP", "TASKS", "PAUSED", "RUNS BY STATE"], groups.map { g in
            [Output.text(g["name"]), Output.text(g["tasks"]), Output.text(g["paused_tasks"]),
             (g["runs_by_state"]?.objectValue ?? [:]).sorted { $0.key < $1.key }.map { "\($0.key)=\(Output.text($0.value))" }.joined(separator: " ")]
        })
    }

    struct List: AsyncParsableCommand {
        @OptionGroup var global: GlobalOptions
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/groups").json
            Output.print(r, json: global.json) { GroupGroup.rows(r["groups"]?.arrayValue ?? []) }
        }
    }

    struct Get: AsyncParsableCommand {
        @OptionGroup var global: GlobalOptions
        @Argument var name: String
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/groups/" + path(name)).json
            Output.print(r, json: global.json) { GroupGroup.rows([r]) }
        }
    }
}

struct KeyGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "key", abstract: "API keys (admin).", subcommands: [Create.self, List.self, Revoke.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a key; it is printed once, on standard output.")
        @OptionGroup var global: GlobalOptions
        @Option var name: String
        @Option(help: "admin, operator, submitter or viewer.") var role: String
        @Option(name: .customLong("key-namespace"), help: "The namespace the new key acts in (default: yours).") var keyNamespace: String?
        @Option(name: .customLong("expires-days")) var expiresDays: Int?
        func run() async throws {
            var body: [String: JSONValue] = ["name": .string(name), "role": .string(role)]
            if let keyNamespace { body["namespace"] = .string(keyNamespace) }
            if let expiresDays { body["expires_days"] = .number(Double(expiresDays)) }
            let r = try await global.client().call(.POST, "/v1/keys", body: .object(body), accept: [201]).json
            Output.print(r, json: global.json) { Output.text(r["key"]) }
            if !global.json {
                FileHandle.standardError.write(Data("key \(Output.text(r["prefix"])) created (\(role), namespace \(Output.text(r["namespace"]))); it is shown only now\n".utf8))
            }
        }
    }

    struct List: AsyncParsableCommand {
        @OptionGroup var global: GlobalOptions
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/keys").json
            Output.print(r, json: global.json) {
                TextTable.render(["PREFIX", "NAME", "ROLE", "NAMESPACE", "EXPIRES", "REVOKED", "LAST USED", "USES"], (r["keys"]?.arrayValue ?? []).map { k in
                    ["prefix", "name", "role", "namespace", "expires_at", "revoked_at", "last_used_at", "use_count"].map { Output.text(k[$0]) }
                })
            }
        }
    }

    struct Revoke: AsyncParsableCommand {
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The key's prefix (12 hex digits).") var prefix: String
        func run() async throws {
            let r = try await global.client().call(.DELETE, "/v1/keys/" + path(prefix)).json
            Output.print(r, json: global.json) { "revoked \(prefix); every API process refuses it within 30 s" }
        }
    }
}

// MARK: one-word actions

/// An action that is one POST on one object: `conveyorctl task trigger NAME`, `run cancel ID`, …
protocol PostAction {
    static var name: String { get }
    static var abstract: String { get }
    static var argument: String { get }
    static func path(_ subject: String) -> String
    static func said(_ subject: String, _ reply: JSONValue) -> String
}

struct Post<Action: PostAction>: AsyncParsableCommand {
    static var configuration: CommandConfiguration { CommandConfiguration(commandName: Action.name, abstract: Action.abstract) }
    @OptionGroup var global: GlobalOptions
    @Argument(help: ArgumentHelp(Action.argument)) var subject: String

    func run() async throws {
        let reply = try await global.client().call(.POST, Action.path(path(subject))).json
        Output.print(reply, json: global.json) { Action.said(subject, reply) }
    }
}

enum TriggerTask: PostAction {
    static let name = "trigger", abstract = "Run a task now.", argument = "The task's name."
    static func path(_ s: String) -> String { "/v1/tasks/\(s)/trigger" }
    static func said(_ s: String, _ r: JSONValue) -> String { "triggered \(s)" }
}
enum PauseTask: PostAction {
    static let name = "pause", abstract = "Pause a task: no new runs until resumed.", argument = "The task's name."
    static func path(_ s: String) -> String { "/v1/tasks/\(s)/pause" }
    static func said(_ s: String, _ r: JSONValue) -> String { "paused \(s)" }
}
enum ResumeTask: PostAction {
    static let name = "resume", abstract = "Resume a paused task.", argument = "The task's name."
    static func path(_ s: String) -> String { "/v1/tasks/\(s)/resume" }
    static func said(_ s: String, _ r: JSONValue) -> String { "resumed \(s)" }
}
enum CancelRun: PostAction {
    static let name = "cancel", abstract = "Cancel a run that has not ended.", argument = "The run's id."
    static func path(_ s: String) -> String { "/v1/runs/\(s)/cancel" }
    static func said(_ s: String, _ r: JSONValue) -> String { "cancelled \(s)" }
}
enum RedriveRun: PostAction {
    static let name = "redrive", abstract = "Run an ended run's occurrence again as a new attempt.", argument = "The run's id."
    static func path(_ s: String) -> String { "/v1/runs/\(s)/redrive" }
    static func said(_ s: String, _ r: JSONValue) -> String { "re-driven as run \(Output.text(r["run_id"])) (attempt \(Output.text(r["attempt"])))" }
}
enum PauseGroup: PostAction {
    static let name = "pause", abstract = "Pause every task of a group.", argument = "The group's name."
    static func path(_ s: String) -> String { "/v1/groups/\(s)/pause" }
    static func said(_ s: String, _ r: JSONValue) -> String { "paused \(Output.text(r["tasks_changed"])) tasks of \(s)" }
}
enum ResumeGroup: PostAction {
    static let name = "resume", abstract = "Resume every task of a group.", argument = "The group's name."
    static func path(_ s: String) -> String { "/v1/groups/\(s)/resume" }
    static func said(_ s: String, _ r: JSONValue) -> String { "resumed \(Output.text(r["tasks_changed"])) tasks of \(s)" }
}
enum CancelGroup: PostAction {
    static let name = "cancel", abstract = "Cancel every open run of a group's tasks.", argument = "The group's name."
    static func path(_ s: String) -> String { "/v1/groups/\(s)/cancel" }
    static func said(_ s: String, _ r: JSONValue) -> String { "cancelled \(Output.text(r["runs_cancelled"])) runs of \(s)" }
}
