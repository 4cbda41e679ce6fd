import ArgumentParser
import ConveyorCore
import Foundation
import NIOHTTP1
import Yams

/// Task templates: a task body with `{{placeholders}}`, filled in per task (docs/api.md).
struct TemplateGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "template", abstract: "Task templates: task bodies with {{placeholders}}, filled in per task.",
        discussion: "Example: conveyorctl template create-task report --name report-eu --set region=eu",
        subcommands: [List.self, Get.self, Put.self, CreateTask.self])

    static func rows(_ templates: [JSONValue], wide: Bool) -> String {
        TextTable.render(
            ["NAME", "PARAMETERS", "EXECUTOR"] + (wide ? ["NAMESPACE", "SCHEDULE", "QUEUE"] : []),
            templates.map { t in
                [Output.text(t["name"]), Output.list(t["parameters"]), Output.text(t["task"]?["executor"])]
                    + (wide
                        ? [
                            Output.text(t["namespace"]), Output.text(t["task"]?["schedule"]),
                            Output.text(t["task"]?["queue"]),
                        ] : [])
            })
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The namespace's templates.",
            discussion: "-o wide adds the namespace, schedule and queue. Example: conveyorctl template list -o wide")
        @OptionGroup var global: GlobalOptions
        func run() async throws {
            let r = try await global.client().call(.GET, "/v1/templates").json
            let templates = r["templates"]?.arrayValue ?? []
            global.show(r, names: templates.map { "template/" + Output.text($0["name"]) }) { wide in
                TemplateGroup.rows(templates, wide: wide)
            }
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "One template: its parameters and task body.",
            discussion: "Example: conveyorctl template get report -o yaml > report.yaml")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The template's name.") var name: String
        func run() async throws {
            // No route reads one template: the list holds them all.
            let r = try await global.client().call(.GET, "/v1/templates").json
            guard let t = r["templates"]?.arrayValue?.first(where: { $0["name"]?.stringValue == name }) else {
                throw CLIError(
                    "not found: no template named '\(name)'",
                    fix: "check the name ('conveyorctl template list'), and the namespace",
                    exitCode: CtlExit.notFound)
            }
            global.show(t, names: ["template/\(name)"]) { _ in
                (Output.fields(t, ["name", "namespace"], width: 10)
                    + [Output.field("parameters", Output.list(t["parameters"]), width: 10), "task:"]
                    + Output.yaml(t["task"] ?? .null).split(separator: "\n").map { "  " + $0 })
                    .joined(separator: "\n")
            }
        }
    }

    struct Put: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create or replace a template from a YAML or JSON file (operator).",
            discussion: """
                The file is {task: {...a task body with {{placeholders}}...}, parameters: [names]}; every \
                placeholder must be a parameter. A string that is exactly one placeholder takes the value as \
                given (a number stays a number). Example: conveyorctl template put report -f report.yaml
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The template's name.") var name: String
        @Option(name: [.short, .long], help: "The template file; '-' reads standard input.") var file: String

        func run() async throws {
            let client = try global.client()
            let text = try readInput(file)
            guard let loaded = try? Yams.load(yaml: text), let body = JSONValue(loaded: loaded).objectValue else {
                throw CLIError(
                    "\(file) is not a YAML or JSON mapping",
                    fix: """
                        write it as:
                          parameters: [region]
                          task: {executor: shell, parameters: {argv: [/bin/echo, "{{region}}"]}}
                        """)
            }
            let r = try await client.call(.PUT, "/v1/templates/" + path(name), body: .object(body)).json
            global.show(r, names: ["template/\(name)"]) { _ in
                "stored template \(name) (parameters: \(Output.list(r["parameters"])))"
            }
        }
    }

    struct CreateTask: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create-task",
            abstract: "Create a task from a template, with a value for each of its parameters (submitter).",
            discussion: """
                Example: conveyorctl template create-task report --name report-eu --set region=eu --set hour=2
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The template's name.") var template: String
        @Option(help: "The new task's name.") var name: String
        @Option(
            name: .customLong("set"),
            help: "PARAMETER=VALUE; VALUE is read as JSON when it parses (2, true, [\"a\"]), else as text.")
        var sets: [String] = []

        func run() async throws {
            let client = try global.client()
            let values = try settings(sets, example: "region=eu")
            let r = try await client.call(
                .POST, "/v1/templates/\(path(template))/tasks",
                body: .object(["name": .string(name), "values": .object(values)]), accept: [200, 201]
            ).json
            let holder = Output.text(r["name"])
            let held = r["deduplicated"] == true
            global.show(r, names: ["task/\(held ? holder : name)"]) { _ in
                held
                    ? "not created: task \(holder) holds the template's unique key"
                    : "created \(name) from template \(template)"
            }
        }
    }
}
