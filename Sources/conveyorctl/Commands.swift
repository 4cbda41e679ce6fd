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
        version: ConveyorVersion.current,
        subcommands: [
            TaskGroup.self, RunGroup.self, WorkerGroup.self, GroupGroup.self, QueueGroup.self, KeyGroup.self,
        ])

    /// As ArgumentParser's, but a `CLIError` exits with its own status (`CtlExit`), not 1.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var command = command as? any AsyncParsableCommand {
                try await command.run()
            } else {
                try command.run()
            }
        } catch let error as CLIError {
            FileHandle.standardError.write(Data("Error: \(error)\n".utf8))
            Foundation.exit(error.exitCode)
        } catch {
            exit(withError: error)
        }
    }
}

func path(_ s: String) -> String {
    s.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(CharacterSet(charactersIn: "/"))) ?? s
}

// MARK: runs

struct RunGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "List and inspect runs; wait for them; cancel and re-drive them.",
        subcommands: [List.self, Get.self, Wait.self, Logs.self, Post<CancelRun>.self, Post<RedriveRun>.self])

    /// States a run does not leave (`pending`: a run handle whose run is not made yet).
    static func isFinal(_ state: String?) -> Bool {
        !["pending", "scheduled", "queued", "dispatched", "running", nil].contains(state)
    }

    /// Reads the run until it is final, with the API's `?wait=` (30 s at a time), for at most
    /// `timeout` seconds; the last reading either way.
    static func waitForRun(_ client: APIClient, _ id: String, timeout: Double) async throws -> JSONValue {
        let deadline = ContinuousClock.now + .seconds(timeout)
        while true {
            let left = max(0, min(30, (deadline - ContinuousClock.now).inSeconds))
            let r = try await client.call(.GET, "/v1/runs/" + path(id), query: [("wait", "\(Int(left.rounded(.up)))s")])
                .json
            if isFinal(r["state"]?.stringValue) || ContinuousClock.now >= deadline { return r }
        }
    }

    struct Wait: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Wait until a run ends; print its state.",
            discussion: """
                Exit status: 0 when it succeeded, 2 when it ended otherwise (failed, timed_out, dead, ...), 3 \
                when --timeout passed first. The id may be a run handle that 'task trigger' printed before \
                the run was made. Example: conveyorctl run wait 0b5c1e8e-8f0e-4b7a-9a57-3f1c2d4e5f60
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The run's id.") var id: String
        @Option(help: "Seconds to wait at most.") var timeout: Double = 3600
        func validate() throws {
            guard timeout.isFinite, timeout > 0 else {
                throw ValidationError("--timeout must be above 0; got \(timeout)")
            }
        }
        func run() async throws {
            let r = try await RunGroup.waitForRun(try global.client(), id, timeout: timeout)
            let state = r["state"]?.stringValue ?? "unknown"
            Output.print(r, json: global.json) { "run \(id) \(state)" }
            if !RunGroup.isFinal(state) { throw ExitCode(CtlExit.stillGoing) }
            if state != "succeeded" { throw ExitCode(CtlExit.endedBadly) }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Runs, newest first.")
        @OptionGroup var global: GlobalOptions
        @Option var task: String?
        @Option var state: String?
        @Option(help: "Occurrences at or after (ISO-8601).") var since: String?
        @Option(help: "Occurrences before (ISO-8601).") var until: String?
        @Option(help: "Runs per page (1 to 100).") var limit = 50
        @Option(help: "The next_cursor a previous page gave: the page after it.") var cursor: String?
        @Flag(help: "Follow every page.") var all = false
        func run() async throws {
            let (runs, next) = try await global.client().pages(
                "/v1/runs", key: "runs",
                query: [
                    ("task", task), ("state", state), ("since", since), ("until", until), ("limit", String(limit)),
                ], all: all, from: cursor)
            let r: JSONValue = .object(
                ["runs": .array(runs)].merging(next.map { ["next_cursor": .string($0)] } ?? [:]) { a, _ in a })
            Output.print(r, json: global.json) {
                TextTable.render(
                    ["RUN", "OCCURRENCE", "ATTEMPT", "STATE", "WORKER", "TRACE"],
                    runs.map { x in
                        [
                            Output.text(x["id"]), Output.text(x["occurrence"]), Output.text(x["attempt"]),
                            Output.text(x["state"]), Output.text(x["worker_id"]), Output.text(x["trace_id"]),
                        ]
                    }) + (next.map { "\n(more: --all, or --cursor \($0))" } ?? "")
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
                let fields = Output.fields(
                    r,
                    [
                        "id", "task_id", "state", "attempt", "occurrence", "started_at", "finished_at", "worker_id",
                        "exit_code", "error_class", "error_message", "reason", "trace_id",
                    ], width: 13)
                let callbacks = (r["callbacks"]?.arrayValue ?? []).map { c in
                    Output.field(
                        "callback",
                        "\(Output.text(c["url"])) \(Output.text(c["state"])) after \(Output.text(c["attempts"])) "
                            + "attempt(s)" + (c["last_status"].map { " HTTP \(Output.text($0))" } ?? "")
                            + (c["last_error"].map { " (\(Output.text($0)))" } ?? ""), width: 13)
                }
                return (fields + callbacks).joined(separator: "\n")
            }
        }
    }

    struct Logs: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The captured output of a run (its tail, as capped by the worker).",
            discussion: """
                A worker reports a run's output when the run ends: --follow waits for that (up to \
                --timeout seconds), then prints it. Example: conveyorctl run logs RUN_ID --follow
                """)
        @OptionGroup var global: GlobalOptions
        @Argument var id: String
        @Flag(help: "Wait until the run ends, then print its output.") var follow = false
        @Option(help: "With --follow: seconds to wait at most.") var timeout: Double = 3600
        func run() async throws {
            let client = try global.client()
            let r =
                follow
                ? try await RunGroup.waitForRun(client, id, timeout: timeout)
                : try await client.call(.GET, "/v1/runs/" + path(id)).json
            Output.print(.object(["id": r["id"] ?? .null, "output": r["output"] ?? .null]), json: global.json) {
                r["output"]?.stringValue ?? "(no output captured)"
            }
        }
    }
}

// MARK: workers, groups, keys

struct WorkerGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker", abstract: "Workers known from heartbeats.", subcommands: [List.self, Get.self])

    static func rows(_ workers: [JSONValue]) -> String {
        TextTable.render(
            ["WORKER", "HOST", "STATE", "IN FLIGHT", "CONCURRENCY", "QUEUES", "LAST HEARTBEAT"],
            workers.map { w in
                [
                    Output.text(w["id"]), Output.text(w["host"]), Output.text(w["state"]), Output.text(w["in_flight"]),
                    Output.text(w["concurrency"]),
                    (w["queues"]?.arrayValue ?? []).map(Output.text).joined(separator: ","),
                    "\(Int(w["seconds_since_heartbeat"]?.doubleValue ?? 0)) s ago",
                ]
            })
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List workers by id.",
            discussion: "Example: conveyorctl worker list --state active --all")
        @OptionGroup var global: GlobalOptions
        @Option(help: "active, stopped (left cleanly) or lost.") var state: String?
        @Option(help: "Workers per page (1 to 100).") var limit = 50
        @Flag(help: "Follow every page.") var all = false
        func run() async throws {
            let (workers, cursor) = try await global.client().pages(
                "/v1/workers", key: "workers", query: [("state", state), ("limit", String(limit))], all: all)
            Output.print(
                .object(
                    ["workers": .array(workers)].merging(cursor.map { ["next_cursor": .string($0)] } ?? [:]) { a, _ in
                        a
                    }),
                json: global.json
            ) {
                WorkerGroup.rows(workers) + (cursor.map { "\n(more: --all, or the next page after \($0))" } ?? "")
            }
        }
    }

    struct Get: AsyncParsableCommand {
        @OptionGroup var global: GlobalOptions
        @Argument var id: String
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/workers/" + path(id)).json
            Output.print(r, json: global.json) {
                WorkerGroup.rows([r]) + "\n\nruns held:\n"
                    + TextTable.render(
                        ["RUN", "TASK", "STARTED"],
                        (r["runs"]?.arrayValue ?? []).map { x in
                            [Output.text(x["id"]), Output.text(x["task_id"]), Output.text(x["started_at"])]
                        })
            }
        }
    }
}

struct GroupGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "group", abstract: "Task groups: counts, pause, resume, cancel.",
        subcommands: [List.self, Get.self, Post<PauseGroup>.self, Post<ResumeGroup>.self, Post<CancelGroup>.self])

    static func rows(_ groups: [JSONValue]) -> String {
        TextTable.render(
            ["GROUP", "TASKS", "PAUSED", "RETRIES", "RUNS BY STATE"],
            groups.map { g in
                [
                    Output.text(g["name"]), Output.text(g["tasks"]), Output.text(g["paused_tasks"]),
                    Output.text(g["retries"]),
                    (g["runs_by_state"]?.objectValue ?? [:]).sorted { $0.key < $1.key }.map {
                        "\($0.key)=\(Output.text($0.value))"
                    }.joined(separator: " "),
                ]
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
    static let configuration = CommandConfiguration(
        commandName: "key", abstract: "API keys (admin).", subcommands: [Create.self, List.self, Revoke.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a key; it is printed once, on standard output.")
        @OptionGroup var global: GlobalOptions
        @Option var name: String
        @Option(help: "admin, operator, submitter or viewer.") var role: String
        @Option(name: .customLong("key-namespace"), help: "The namespace the new key acts in (default: yours).")
        var keyNamespace: String?
        @Option(name: .customLong("expires-days")) var expiresDays: Int?
        func run() async throws {
            var body: [String: JSONValue] = ["name": .string(name), "role": .string(role)]
            if let keyNamespace { body["namespace"] = .string(keyNamespace) }
            if let expiresDays { body["expires_days"] = .number(Double(expiresDays)) }
            let r = try await global.client().call(.POST, "/v1/keys", body: .object(body), accept: [201]).json
            Output.print(r, json: global.json) { Output.text(r["key"]) }
            if !global.json {
                FileHandle.standardError.write(
                    Data(
                        """
                        key \(Output.text(r["prefix"])) created (\(role), namespace \(Output.text(r["namespace"]))); \
                        it is shown only now\n
                        """
                        .utf8))
            }
        }
    }

    struct List: AsyncParsableCommand {
        @OptionGroup var global: GlobalOptions
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/keys").json
            Output.print(r, json: global.json) {
                TextTable.render(
                    ["PREFIX", "NAME", "ROLE", "NAMESPACE", "EXPIRES", "REVOKED", "LAST USED", "USES"],
                    (r["keys"]?.arrayValue ?? []).map { k in
                        [
                            "prefix", "name", "role", "namespace", "expires_at", "revoked_at", "last_used_at",
                            "use_count",
                        ].map { Output.text(k[$0]) }
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
    static var configuration: CommandConfiguration {
        CommandConfiguration(commandName: Action.name, abstract: Action.abstract)
    }
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
    static func said(_ s: String, _ r: JSONValue) -> String {
        "triggered \(s): run \(Output.text(r["run_id"])) (conveyorctl run wait \(Output.text(r["run_id"])))"
    }
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
    static let name = "redrive", abstract = "Run an ended run's occurrence again as a new attempt.",
        argument = "The run's id."
    static func path(_ s: String) -> String { "/v1/runs/\(s)/redrive" }
    static func said(_ s: String, _ r: JSONValue) -> String {
        "re-driven as run \(Output.text(r["run_id"])) (attempt \(Output.text(r["attempt"])))"
    }
}
enum PauseGroup: PostAction {
    static let name = "pause", abstract = "Pause every task of a group.", argument = "The group's name."
    static func path(_ s: String) -> String { "/v1/groups/\(s)/pause" }
    static func said(_ s: String, _ r: JSONValue) -> String {
        "paused \(Output.text(r["tasks_changed"])) tasks of \(s)"
    }
}
enum ResumeGroup: PostAction {
    static let name = "resume", abstract = "Resume every task of a group.", argument = "The group's name."
    static func path(_ s: String) -> String { "/v1/groups/\(s)/resume" }
    static func said(_ s: String, _ r: JSONValue) -> String {
        "resumed \(Output.text(r["tasks_changed"])) tasks of \(s)"
    }
}
enum CancelGroup: PostAction {
    static let name = "cancel", abstract = "Cancel every open run of a group's tasks.", argument = "The group's name."
    static func path(_ s: String) -> String { "/v1/groups/\(s)/cancel" }
    static func said(_ s: String, _ r: JSONValue) -> String {
        "cancelled \(Output.text(r["runs_cancelled"])) runs of \(s)"
    }
}
