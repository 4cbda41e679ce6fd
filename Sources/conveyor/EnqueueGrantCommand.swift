import ArgumentParser
import ConveyorCore
import ConveyorStore
import Foundation

/// `conveyor enqueue-grant ROLE`: an application's database role may call
/// `conveyor_enqueue(...)` inside its own transactions (docs/enqueue.md), and nothing else.
struct EnqueueGrantCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "enqueue-grant",
        abstract:
            "Let a PostgreSQL role enqueue tasks with conveyor_enqueue(...) in one namespace (needs database access).",
        discussion: """
            The role must exist (a database administrator creates it: CREATE ROLE app LOGIN PASSWORD '...'). It \
            gets EXECUTE on the function and no privilege on any table. --revoke \
            takes a namespace's grant back; with the role's last one, the privileges too. --list shows the grants. \
            Example: conveyor enqueue-grant orders_app --namespace shop
            """)
    @OptionGroup var common: CommonOptions
    @Argument(help: "The role (your application's database user).") var role: String?
    @Option(help: "The namespace its tasks go to.") var namespace = "default"
    @Flag(help: "Take the grant back.") var revoke = false
    @Flag(help: "List the roles that may enqueue, and where.") var list = false

    func validate() throws {
        guard list || role != nil else {
            throw ValidationError("name the role, e.g. 'conveyor enqueue-grant orders_app', or pass --list")
        }
    }

    func run() async throws {
        guard let role, !list else {
            let grants = try await common.withStore { try await $0.enqueueGrants() }
            Table.print(["ROLE", "NAMESPACE"], grants.map { [$0.role, $0.namespace] })
            return
        }
        try await common.withStore { store in
            if revoke {
                try await store.revokeEnqueue(role: role, namespace: namespace)
            } else {
                try await store.grantEnqueue(role: role, namespace: namespace)
            }
            try await store.audit(
                APIKeyCommand.cliAudit(revoke ? "enqueue.revoke" : "enqueue.grant", target: role, namespace: namespace))
        }
        print(
            revoke
                ? "role \(role) may no longer enqueue into namespace \(namespace)"
                : "role \(role) may enqueue into namespace \(namespace): SELECT * FROM conveyor_enqueue(name => ..., executor => ...)"
        )
    }
}
