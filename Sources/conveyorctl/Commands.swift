import ArgumentParser
import ConveyorCore
import Foundation
import NIOHTTP1
import Yams

@main
struct ConveyorCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "conveyorctl",
        abstract: "Drive Conveyor through its REST API: tasks, runs, workers, groups, queues, keys, templates, audit.",
        discussion: """
            The API's URL comes from --url, CONVEYOR_URL or the config file (default http://127.0.0.1:8080);
            the key from --key-file, CONVEYOR_API_KEY or the config file's key_file. Every command prints \
            -o table (the default), wide, json, yaml or name; commands that delete, revoke or cancel ask \
            first, or need --yes when standard input is not a terminal. Completion scripts: \
            conveyorctl --generate-completion-script bash|zsh|fish (docs/api.md).
            Example: conveyorctl task list --group nightly -o wide
            """,
        version: ConveyorVersion.current,
        subcommands: [
            TaskGroup.self, RunGroup.self, WorkerGroup.self, GroupGroup.self, QueueGroup.self, KeyGroup.self,
            TemplateGroup.self, AuditGroup.self,
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
        discussion: "Example: conveyorctl run list --task nightly-report --state failed",
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
            try checkSeconds(timeout, flag: "timeout")
        }
        func run() async throws {
            let r = try await RunGroup.waitForRun(try global.client(), id, timeout: timeout)
            let state = r["state"]?.stringValue ?? "unknown"
            global.show(r, names: ["run/\(id)"]) { _ in "run \(id) \(state)" }
            if !RunGroup.isFinal(state) { throw ExitCode(CtlExit.stillGoing) }
            if state != "succeeded" { throw ExitCode(CtlExit.endedBadly) }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Runs, newest first.",
            discussion: """
                -o wide adds the task's id, the start and end times and the error. \
                Example: conveyorctl run list --task nightly-report --state dead --all -o wide
                """)
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
            global.show(
                r, names: runs.map { "run/" + Output.text($0["id"]) },
                more: next.map { "(more: --all, or --cursor \($0))" }
            ) { wide in
                TextTable.render(
                    ["RUN", "OCCURRENCE", "ATTEMPT", "STATE", "WORKER", "TRACE"]
                        + (wide ? ["TASK ID", "STARTED", "FINISHED", "ERROR"] : []),
                    runs.map { x in
                        [
                            Output.text(x["id"]), Output.text(x["occurrence"]), Output.text(x["attempt"]),
                            Output.text(x["state"]), Output.text(x["worker_id"]), Output.text(x["trace_id"]),
                        ]
                            + (wide
                                ? [
                                    Output.text(x["task_id"]), Output.text(x["started_at"]),
                                    Output.text(x["finished_at"]), Output.error(x),
                                ] : [])
                    })
            }
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "One run: state, times, error, trace id.",
            discussion: "Example: conveyorctl run get 0b5c1e8e-8f0e-4b7a-9a57-3f1c2d4e5f60 -o yaml")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The run's id.") var id: String
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/runs/" + path(id)).json
            global.show(r, names: ["run/" + Output.text(r["id"])]) { _ in
                let fields = Output.fields(
                    r,
                    [
                        "id", "task_id", "state", "attempt", "occurrence", "started_at", "finished_at", "worker_id",
                        "exit_code", "error_class", "error_message", "reason", "trace_id", "result",
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
        @Argument(help: "The run's id.") var id: String
        @Flag(help: "Wait until the run ends, then print its output.") var follow = false
        @Option(help: "With --follow: seconds to wait at most.") var timeout: Double = 3600
        func run() async throws {
            let client = try global.client()
            let r =
                follow
                ? try await RunGroup.waitForRun(client, id, timeout: timeout)
                : try await client.call(.GET, "/v1/runs/" + path(id)).json
            global.show(.object(["id": r["id"] ?? .null, "output": r["output"] ?? .null]), names: ["run/\(id)"]) { _ in
                r["output"]?.stringValue ?? "(no output captured)"
            }
        }
    }
}

// MARK: workers, groups, keys

struct WorkerGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker", abstract: "Workers known from heartbeats (a key for every namespace).",
        discussion: "Example: conveyorctl worker list --state active -o wide",
        subcommands: [List.self, Get.self])

    static func rows(_ workers: [JSONValue], wide: Bool) -> String {
        TextTable.render(
            ["WORKER", "HOST", "STATE", "IN FLIGHT", "CONCURRENCY", "QUEUES", "LAST HEARTBEAT"]
                + (wide ? ["EXECUTORS"] : []),
            workers.map { w in
                [
                    Output.text(w["id"]), Output.text(w["host"]), Output.text(w["state"]), Output.text(w["in_flight"]),
                    Output.text(w["concurrency"]), Output.list(w["queues"]),
                    "\(Int(w["seconds_since_heartbeat"]?.doubleValue ?? 0)) s ago",
                ] + (wide ? [Output.list(w["executors"])] : [])
            })
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List workers by id.",
            discussion: """
                -o wide adds the executors each offers. Example: conveyorctl worker list --state active --all
                """)
        @OptionGroup var global: GlobalOptions
        @Option(help: "active, stopped (left cleanly) or lost.") var state: String?
        @Option(help: "Workers per page (1 to 100).") var limit = 50
        @Option(help: "The next_cursor a previous page gave: the page after it.") var cursor: String?
        @Flag(help: "Follow every page.") var all = false
        func run() async throws {
            let (workers, next) = try await global.client().pages(
                "/v1/workers", key: "workers", query: [("state", state), ("limit", String(limit))], all: all,
                from: cursor)
            global.show(
                Output.page("workers", workers, next: next), names: workers.map { "worker/" + Output.text($0["id"]) },
                more: next.map { "(more: --all, or --cursor \($0))" }
            ) { wide in WorkerGroup.rows(workers, wide: wide) }
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "One worker and the runs it holds.",
            discussion: "Example: conveyorctl worker get web-1-4711 -o wide")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The worker's id (worker list shows them).") var id: String
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/workers/" + path(id)).json
            global.show(r, names: ["worker/" + Output.text(r["id"])]) { wide in
                WorkerGroup.rows([r], wide: wide) + "\n\nruns held:\n"
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
        discussion: "Example: conveyorctl group get nightly",
        subcommands: [
            List.self, Get.self, Post<PauseGroup>.self, Post<ResumeGroup>.self, ConfirmedPost<CancelGroup>.self,
        ])

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
        static let configuration = CommandConfiguration(
            abstract: "Every group of the namespace: tasks, paused tasks, retries, runs by state.",
            discussion: "Example: conveyorctl group list -o name")
        @OptionGroup var global: GlobalOptions
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/groups").json
            let groups = r["groups"]?.arrayValue ?? []
            global.show(r, names: groups.map { "group/" + Output.text($0["name"]) }) { _ in GroupGroup.rows(groups) }
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "One group: tasks, paused tasks, retries, runs by state.",
            discussion: "Example: conveyorctl group get nightly")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The group's name.") var name: String
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/groups/" + path(name)).json
            global.show(r, names: ["group/\(name)"]) { _ in GroupGroup.rows([r]) }
        }
    }
}

struct KeyGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "key", abstract: "API keys (admin).",
        discussion: "Example: conveyorctl key create --name ci --role submitter > ci.key",
        subcommands: [Create.self, List.self, Revoke.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a key; it is printed once, on standard output.",
            discussion: """
                The default output is the key alone; -o json and -o yaml hold it as "key". -o name is refused: \
                it would print key/PREFIX and lose the key. Example: conveyorctl key create --name ci --role \
                submitter --expires-days 90 > ci.key
                """)
        @OptionGroup var global: GlobalOptions
        @Option var name: String
        @Option(help: "admin, operator, submitter or viewer.") var role: String
        @Option(name: .customLong("key-namespace"), help: "The namespace the new key acts in (default: yours).")
        var keyNamespace: String?
        @Option(name: .customLong("expires-days"), help: "Days until it expires (default: never).")
        var expiresDays: Int?

        func validate() throws {
            if global.format == .name {
                throw ValidationError(
                    "-o name would print only key/PREFIX, and the key is shown once; use the default output or -o json")
            }
        }

        func run() async throws {
            var body: [String: JSONValue] = ["name": .string(name), "role": .string(role)]
            if let keyNamespace { body["namespace"] = .string(keyNamespace) }
            if let expiresDays { body["expires_days"] = .number(Double(expiresDays)) }
            let r = try await global.client().call(.POST, "/v1/keys", body: .object(body), accept: [201]).json
            global.show(r, names: ["key/" + Output.text(r["prefix"])]) { _ in Output.text(r["key"]) }
            if global.format == .table || global.format == .wide {
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
        static let configuration = CommandConfiguration(
            abstract: "Every key: prefix, role, namespace, expiry, revocation, last use.",
            discussion: "Example: conveyorctl key list -o wide")
        @OptionGroup var global: GlobalOptions
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/keys").json
            let keys = r["keys"]?.arrayValue ?? []
            global.show(r, names: keys.map { "key/" + Output.text($0["prefix"]) }) { _ in
                TextTable.render(
                    ["PREFIX", "NAME", "ROLE", "NAMESPACE", "EXPIRES", "REVOKED", "LAST USED", "USES"],
                    keys.map { k in
                        [
                            "prefix", "name", "role", "namespace", "expires_at", "revoked_at", "last_used_at",
                            "use_count",
                        ].map { Output.text(k[$0]) }
                    })
            }
        }
    }

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Revoke a key: every API process refuses it within 30 s.",
            discussion: """
                Asks first on a terminal; --yes (-y) does not ask, and is needed when standard input is not a \
                terminal. Example: conveyorctl key revoke 3f9a1c0b7d2e --yes
                """)
        @OptionGroup var global: GlobalOptions
        @OptionGroup var confirmation: Confirmation
        @Argument(help: "The key's prefix (12 hex digits).") var prefix: String
        func run() async throws {
            let client = try global.client()
            try confirmation.confirm("revoke key \(prefix)")
            let r = try await client.call(.DELETE, "/v1/keys/" + path(prefix)).json
            global.show(r, names: ["key/\(prefix)"]) { _ in
                "revoked \(prefix); every API process refuses it within 30 s"
            }
        }
    }
}

// MARK: one-word actions

/// An action that is one POST on one object: `conveyorctl task trigger NAME`, `run cancel ID`, …
protocol PostAction {
    static var name: String { get }
    static var abstract: String { get }
    static var argument: String { get }
    /// A command line for its help: `conveyorctl task trigger nightly`.
    static var example: String { get }
    static func path(_ subject: String) -> String
    static func said(_ subject: String, _ reply: JSONValue) -> String
    /// The subject's kind, for `-o name`: `task`, `run`, `group`.
    static var kind: String { get }
    /// What `-o name` prints: the object acted on (`task/nightly`, the default), or the one made (`run/ID`).
    static func named(_ subject: String, _ reply: JSONValue) -> String
}

extension PostAction {
    static func named(_ subject: String, _ reply: JSONValue) -> String { "\(kind)/\(subject)" }
}

/// A `PostAction` that stops or destroys something: asked first, or `--yes`.
protocol ConfirmedPostAction: PostAction {
    /// The question on a terminal, without "?": `cancel every open run of group nightly`.
    static func question(_ subject: String) -> String
}

struct Post<Action: PostAction>: AsyncParsableCommand {
    static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: Action.name, abstract: Action.abstract, discussion: "Example: \(Action.example)")
    }
    @OptionGroup var global: GlobalOptions
    @Argument(help: ArgumentHelp(Action.argument)) var subject: String

    func run() async throws {
        try await Self.perform(global.client(), global, subject)
    }

    static func perform(_ client: APIClient, _ global: GlobalOptions, _ subject: String) async throws {
        let reply = try await client.call(.POST, Action.path(path(subject))).json
        global.show(reply, names: [Action.named(subject, reply)]) { _ in Action.said(subject, reply) }
    }
}

struct ConfirmedPost<Action: ConfirmedPostAction>: AsyncParsableCommand {
    static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: Action.name, abstract: Action.abstract,
            discussion: """
                Asks first on a terminal; --yes (-y) does not ask, and is needed when standard input is not a \
                terminal. Example: \(Action.example)
                """)
    }
    @OptionGroup var global: GlobalOptions
    @OptionGroup var confirmation: Confirmation
    @Argument(help: ArgumentHelp(Action.argument)) var subject: String

    func run() async throws {
        let client = try global.client()
        try confirmation.confirm(Action.question(subject))
        try await Post<Action>.perform(client, global, subject)
    }
}

enum TriggerTask: PostAction {
    static let name = "trigger", abstract = "Run a task now.", argument = "The task's name.", kind = "task",
        example = "conveyorctl task trigger nightly-report -o name   # run/ID, for 'run wait'"
    static func path(_ s: String) -> String { "/v1/tasks/\(s)/trigger" }
    static func said(_ s: String, _ r: JSONValue) -> String {
        "triggered \(s): run \(Output.text(r["run_id"])) (conveyorctl run wait \(Output.text(r["run_id"])))"
    }
    static func named(_ s: String, _ r: JSONValue) -> String { "run/" + Output.text(r["run_id"]) }
}
enum PauseTask: PostAction {
    static let name = "pause", abstract = "Pause a task: no new runs until resumed.", argument = "The task's name.",
        kind = "task", example = "conveyorctl task pause nightly-report"
    static func path(_ s: String) -> String { "/v1/tasks/\(s)/pause" }
    static func said(_ s: String, _ r: JSONValue) -> String { "paused \(s)" }
}
enum ResumeTask: PostAction {
    static let name = "resume", abstract = "Resume a paused task.", argument = "The task's name.", kind = "task",
        example = "conveyorctl task resume nightly-report"
    static func path(_ s: String) -> String { "/v1/tasks/\(s)/resume" }
    static func said(_ s: String, _ r: JSONValue) -> String { "resumed \(s)" }
}
enum CancelTask: ConfirmedPostAction {
    static let name = "cancel", abstract = "Cancel every open run of a task; workers kill the executor.",
        argument = "The task's name.", kind = "task", example = "conveyorctl task cancel nightly-report --yes"
    static func path(_ s: String) -> String { "/v1/tasks/\(s)/cancel" }
    static func said(_ s: String, _ r: JSONValue) -> String {
        "cancelled \(Output.text(r["runs_cancelled"])) runs of \(s)"
    }
    static func question(_ s: String) -> String { "cancel every open run of task \(s)" }
}
enum CancelRun: PostAction {
    static let name = "cancel", abstract = "Cancel a run that has not ended.", argument = "The run's id.",
        kind = "run", example = "conveyorctl run cancel 0b5c1e8e-8f0e-4b7a-9a57-3f1c2d4e5f60"
    static func path(_ s: String) -> String { "/v1/runs/\(s)/cancel" }
    static func said(_ s: String, _ r: JSONValue) -> String { "cancelled \(s)" }
}
enum RedriveRun: PostAction {
    static let name = "redrive", abstract = "Run an ended run's occurrence again as a new attempt.",
        argument = "The run's id.", kind = "run",
        example = "conveyorctl run redrive 0b5c1e8e-8f0e-4b7a-9a57-3f1c2d4e5f60   # -o name: the new run"
    static func path(_ s: String) -> String { "/v1/runs/\(s)/redrive" }
    static func said(_ s: String, _ r: JSONValue) -> String {
        "re-driven as run \(Output.text(r["run_id"])) (attempt \(Output.text(r["attempt"])))"
    }
    static func named(_ s: String, _ r: JSONValue) -> String { "run/" + Output.text(r["run_id"]) }
}
enum PauseGroup: PostAction {
    static let name = "pause", abstract = "Pause every task of a group.", argument = "The group's name.",
        kind = "group", example = "conveyorctl group pause nightly"
    static func path(_ s: String) -> String { "/v1/groups/\(s)/pause" }
    static func said(_ s: String, _ r: JSONValue) -> String {
        "paused \(Output.text(r["tasks_changed"])) tasks of \(s)"
    }
}
enum ResumeGroup: PostAction {
    static let name = "resume", abstract = "Resume every task of a group.", argument = "The group's name.",
        kind = "group", example = "conveyorctl group resume nightly"
    static func path(_ s: String) -> String { "/v1/groups/\(s)/resume" }
    static func said(_ s: String, _ r: JSONValue) -> String {
        "resumed \(Output.text(r["tasks_changed"])) tasks of \(s)"
    }
}
enum CancelGroup: ConfirmedPostAction {
    static let name = "cancel", abstract = "Cancel every open run of a group's tasks.", argument = "The group's name.",
        kind = "group", example = "conveyorctl group cancel nightly --yes"
    static func path(_ s: String) -> String { "/v1/groups/\(s)/cancel" }
    static func said(_ s: String, _ r: JSONValue) -> String {
        "cancelled \(Output.text(r["runs_cancelled"])) runs of \(s)"
    }
    static func question(_ s: String) -> String { "cancel every open run of group \(s)" }
}
