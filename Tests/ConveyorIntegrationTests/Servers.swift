import ConveyorAMQP
import ConveyorPostgres
import Foundation
import Logging
import Testing

/// Where the real servers are. `scripts/test.sh` starts them and exports these variables.
/// Locally, without them, the suites are skipped with a message; under `CI=true` a missing
/// server is a failure, never a skip.
enum Servers {
    static let env = ProcessInfo.processInfo.environment
    static var databaseURL: String? { env["CONVEYOR_DATABASE_URL"] }
    static var adminURL: String? { env["CONVEYOR_TEST_PG_ADMIN_URL"] }
    /// The broker login of in-process tests: `conveyor-admin` (every permission), so a test can
    /// declare, inspect and delete what it likes. Processes the tests start log in per role
    /// (`roleURL`), as in production.
    static var amqpURL: String? { env["CONVEYOR_TEST_AMQP_ADMIN_URL"] ?? env["CONVEYOR_AMQP_URL"] }

    /// A component's own broker login (scripts/services.sh makes one per role with the
    /// permissions of deploy/broker-permissions.tsv).
    enum BrokerRole: String, CaseIterable, Sendable { case dispatcher, worker, api }

    static func roleURL(_ role: BrokerRole) throws -> String {
        let name =
            switch role {
            case .dispatcher: "CONVEYOR_AMQP_URL"
            case .worker: "CONVEYOR_WORKER_AMQP_URL"
            case .api: "CONVEYOR_API_AMQP_URL"
            }
        return try #require(env[name], "\(name) is not set: run the tests with scripts/test.sh")
    }
    static var isCI: Bool { env["CI"] == "true" }
    /// Integration suites run when the servers are configured, and always under CI (where a
    /// missing server then fails loudly instead of skipping).
    static var available: Bool { isCI || (databaseURL != nil && amqpURL != nil && adminURL != nil) }
    static let skipMessage =
        "integration servers not configured: run scripts/test.sh (or scripts/services.sh start && source .local/env)"

    static func requireAdminURL() throws -> String {
        try #require(adminURL, "CONVEYOR_TEST_PG_ADMIN_URL is not set: run the tests with scripts/test.sh")
    }

    static func requireAMQP() throws -> String {
        try #require(amqpURL, "CONVEYOR_AMQP_URL is not set: run the tests with scripts/test.sh")
    }

    static let logger: Logger = {
        var l = Logger(label: "test")
        l.logLevel = env["CONVEYOR_TEST_LOG"] == "1" ? .debug : .critical
        return l
    }()

    /// A fresh database for one test, dropped afterwards. `CONVEYOR_TEST_KEEP_DATABASES=1` keeps
    /// them for a post-mortem (each one's name is printed); drop them by hand afterwards.
    static func withDatabase<T>(_ body: (String) async throws -> T) async throws -> T {
        let admin = try requireAdminURL()
        let name = "conveyor_t_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "").prefix(16)
        let adminConn = try await PostgresConnection.connect(url: admin, logger: logger)
        try await adminConn.simple("CREATE DATABASE \(name)")
        let url = replaceDatabase(in: admin, with: String(name))
        let drop = { () async in
            if env["CONVEYOR_TEST_KEEP_DATABASES"] == "1" {
                print("kept database \(name)")
            } else {
                _ = try? await adminConn.simple("DROP DATABASE IF EXISTS \(name) WITH (FORCE)")
            }
        }
        do {
            let result = try await body(url)
            await drop()
            return result
        } catch {
            await drop()
            throw error
        }
    }

    /// The URL with another database name; its query (`?target_session_attrs=…`) kept.
    static func replaceDatabase(in url: String, with db: String) -> String {
        let query = url.firstIndex(of: "?").map { String(url[$0...]) } ?? ""
        let path = url.dropLast(query.count)
        guard let slash = path.lastIndex(of: "/") else { return url }
        return String(path[...slash]) + db + query
    }

    /// A unique topology prefix, so tests never share broker queues.
    static func uniquePrefix() -> String { "t" + UUID().uuidString.lowercased().prefix(8) }

    /// `rabbitmqctl start_app`, tried again while it fails: a client's socket may hold the
    /// broker's port for a moment (a reconnect that connected to itself while nothing listened).
    /// A failed start leaves mnesia running, and a second `start_app` then fails on RabbitMQ's
    /// own assertion (`keymember(mnesia, …)`, seen in a full run): `stop_app` first, each retry.
    static func startBrokerApp() throws {
        for attempt in 1...10 {
            let out = try rabbitmqctl(["start_app"])
            if try rabbitmqctl(["await_startup", "--timeout", "10"]).contains("Error") == false { return }
            if attempt == 10 {
                Issue.record("the broker did not start again: \(out)")
                return
            }
            try rabbitmqctl(["stop_app"])
            Thread.sleep(forTimeInterval: 0.5 * Double(attempt))
        }
    }

    /// Runs `rabbitmqctl` against the test node.
    @discardableResult
    static func rabbitmqctl(_ args: [String]) throws -> String {
        let ctl = try #require(
            env["CONVEYOR_RABBITMQCTL"], "CONVEYOR_RABBITMQCTL is not set: run the tests with scripts/test.sh")
        let parts = ctl.split(separator: " ").map(String.init)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: parts[0])
        p.arguments = Array(parts.dropFirst()) + args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return String(decoding: data, as: UTF8.self)
    }
}
