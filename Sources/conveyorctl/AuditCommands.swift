import ArgumentParser
import ConveyorCore
import Foundation
import NIOHTTP1

/// The audit log: who changed what, newest first (admin).
struct AuditGroup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit", abstract: "The audit log: who changed what, newest first (admin).",
        discussion: "Example: conveyorctl audit list --action key.revoke",
        subcommands: [List.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Audit entries, newest first.",
            discussion: """
                -o wide adds the namespace, the request id, the client's address and the details. \
                Example: conveyorctl audit list --action task.delete --limit 20 -o wide
                """)
        @OptionGroup var global: GlobalOptions
        @Option(help: "Only this action: task.create, task.delete, run.cancel, key.revoke, template.put, ...")
        var action: String?
        @Option(help: "Entries per page (1 to 100).") var limit = 50
        @Option(help: "The next_cursor a previous page gave: the page after it.") var cursor: String?
        @Flag(help: "Follow every page.") var all = false

        func run() async throws {
            let (entries, next) = try await global.client().pages(
                "/v1/audit", key: "entries", query: [("action", action), ("limit", String(limit))], all: all,
                from: cursor)
            global.show(
                Output.page("entries", entries, next: next), names: entries.map { "audit/" + Output.text($0["id"]) },
                more: next.map { "(more: --all, or --cursor \($0))" }
            ) { wide in
                TextTable.render(
                    ["ID", "AT", "ACTOR", "ROLE", "ACTION", "TARGET"]
                        + (wide ? ["NAMESPACE", "REQUEST ID", "CLIENT", "DETAIL"] : []),
                    entries.map { e in
                        ["id", "at", "actor", "role", "action", "target"].map { Output.text(e[$0]) }
                            + (wide
                                ? [
                                    Output.text(e["namespace"]), Output.text(e["request_id"]),
                                    Output.text(e["client"]),
                                    e["detail"]?.objectValue?.isEmpty == false ? Output.text(e["detail"]) : "-",
                                ] : [])
                    })
            }
        }
    }
}
