import ConveyorAPI
import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import Foundation
import Testing

/// `conveyor_enqueue(...)`: work enqueued inside the application's own transaction exists if and
/// only if that transaction commits; the role that calls it can do nothing else; it refuses what
/// the API refuses, naming the same field.
@Suite("Enqueue in the application's transaction (real PostgreSQL and RabbitMQ)", .serialized)
struct EnqueueFunctionTests {
    /// Enqueues per run of the measure; half are rolled back. `CONVEYOR_ENQUEUE_COUNT=10000` is the
    /// figure in docs/benchmarks.md.
    static var count: Int { Int(ProcessInfo.processInfo.environment["CONVEYOR_ENQUEUE_COUNT"] ?? "") ?? 200 }

    /// A login role for an application, dropped afterwards, and a pool connected as it.
    static func withApplicationRole<T>(
        _ sys: System, _ body: (_ role: String, _ pool: PostgresPool, _ url: String) async throws -> T
    ) async throws -> T {
        let role = "app_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "").prefix(12)
        let admin = try await PostgresConnection.connect(url: try Servers.requireAdminURL(), logger: Servers.logger)
        try await admin.simple("CREATE ROLE \(role) LOGIN")
        let url = sys.databaseURL.replacingOccurrences(of: "://postgres@", with: "://\(role)@")
        var c = PostgresPool.Configuration(url: url)
        c.maxConnections = 4
        let pool = PostgresPool(configuration: c, logger: Servers.logger)
        do {
            let result = try await body(String(role), pool, url)
            pool.close()
            try await sys.pool.withConnection { c in
                _ = try await c.query("SELECT conveyor_revoke_enqueue($1, 'default')", [String(role)])
            }
            _ = try? await admin.simple("DROP OWNED BY \(role); DROP ROLE \(role)")
            return result
        } catch {
            pool.close()
            _ = try? await admin.simple("DROP ROLE \(role)")
            throw error
        }
    }

    /// Runs `p` to completion on a thread of its own (the cooperative pool has two threads).
    static func run(_ p: Process) async throws -> (status: Int32, out: String, err: String) {
        try await withCheckedThrowingContinuation { c in
            Thread.detachNewThread { c.resume(with: Result { try runCapturing(p) }) }
        }
    }

    static func sqlState(_ body: () async throws -> Void) async -> (state: String?, message: String) {
        do {
            try await body()
            return (nil, "")
        } catch let e as PostgresError {
            return (e.sqlState, e.message)
        } catch {
            return ("?", "\(error)")
        }
    }

    @Test func committedWorkRunsOnceRolledBackWorkNeverExistsAndTheRoleCanDoNothingElse() async throws {
        try await System.with { sys in
            try await Self.withApplicationRole(sys) { role, app, url in
                let before = await Self.sqlState {
                    _ = try await app.withConnection { c in
                        try await c.query("SELECT * FROM conveyor_enqueue(name => 'x', executor => 'record')")
                    }
                }
                #expect(before.state == "42501", "no grant yet: \(before)")

                let granted = try runConveyor(
                    ["enqueue-grant", role, "--namespace", "default"], env: ["CONVEYOR_DATABASE_URL": sys.databaseURL])
                #expect(granted.status == 0, "\(granted.err)")
                #expect(try await sys.count("SELECT count(*) FROM audit_log WHERE action = 'enqueue.grant'") == 1)

                // The role can call the function, and nothing else.
                for sql in [
                    "SELECT count(*) FROM tasks", "DELETE FROM runs",
                    "SELECT conveyor_grant_enqueue('\(role)', 'other')",
                    "INSERT INTO tasks (id, name, executor, schedule, shard) VALUES (gen_random_uuid(), 'x', 'x', 'once', 0)",
                ] {
                    let r = await Self.sqlState { _ = try await app.withConnection { c in try await c.query(sql) } }
                    #expect(r.state == "42501", "\(sql): \(r)")
                }
                let elsewhere = await Self.sqlState {
                    _ = try await app.withConnection { c in
                        try await c.query(
                            "SELECT * FROM conveyor_enqueue(name => 'x', executor => 'record', namespace => 'other')")
                    }
                }
                #expect(elsewhere.state == "42501" && elsewhere.message.hasPrefix("namespace:"), "\(elsewhere)")

                // N enqueues in application transactions, every other one rolled back; the cost of
                // the enqueue statement inside them.
                var costs: [Double] = []
                var committed: [UUID] = []
                for i in 0..<Self.count {
                    try await app.withConnection { c in
                        _ = try await c.query("BEGIN")
                        let started = ContinuousClock.now
                        let row = try await c.query(
                            """
                            SELECT task_id, run_id FROM conveyor_enqueue(name => $1, executor => 'record', queue => $2,
                                parameters => $3::jsonb)
                            """, ["order-\(i)", sys.queue, #"{"order": \#(i)}"#]
                        ).rows[0]
                        costs.append((ContinuousClock.now - started).inSeconds * 1000)
                        if i % 2 == 0 {
                            _ = try await c.query("COMMIT")
                            committed.append(try row.uuid(1))
                        } else {
                            _ = try await c.query("ROLLBACK")
                        }
                    }
                }
                costs.sort()
                print(
                    "enqueue: \(Self.count) in application transactions, half rolled back; the enqueue statement: "
                        + "median \(costs[costs.count / 2]) ms, p99 \(costs[min(costs.count - 1, costs.count * 99 / 100)]) ms"
                )
                #expect(try await sys.count("SELECT count(*) FROM tasks") == committed.count, "rolled back: nothing")

                // An enqueued task is a task like any other: the API reads it, PATCH decodes its spec.
                let stored = try #require(try await sys.store.task(named: "order-0"))
                let spec = try JSONDecoder().decode(JSONValue.self, from: Data(stored.spec.utf8))
                let decoded = try TaskSpec.decode(spec, now: Date())
                #expect(decoded.name == "order-0" && decoded.executor == "record" && decoded.queue == sys.queue)

                let recorder = Recorder()
                try await withServices([
                    sys.dispatcher(), sys.worker(["record": RecordingExecutor(recorder: recorder)]),
                ]) {
                    _ = try await sys.eventually(timeout: .seconds(120), "every committed enqueue runs") {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == committed.count
                    }
                }
                #expect(recorder.total == committed.count, "each committed enqueue ran once")
                let handles = try await sys.count(
                    "SELECT count(*) FROM runs WHERE id = ANY($1::uuid[]) AND state = 'succeeded'", [committed])
                #expect(handles == committed.count, "each run has the id enqueue returned")

                // The examples: Python (psycopg) and Swift (libpq), as the application role.
                for rollback in [true, false] {
                    let py = try await runRequired(
                        "python3",
                        [
                            FileManager.default.currentDirectoryPath + "/Examples/Enqueue/enqueue.py", "--dsn", url,
                            "--order", "py-\(rollback)", "--executor", "record", "--queue", sys.queue,
                        ] + (rollback ? ["--rollback"] : []))
                    #expect(py.status == 0, "\(py.err)")
                }
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE name = 'ship-order-py-true'") == 0)
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE name = 'ship-order-py-false'") == 1)
                let example = Process()
                example.executableURL = URL(fileURLWithPath: try conveyorBinary()).deletingLastPathComponent()
                    .appendingPathComponent("conveyor-example-enqueue")
                example.arguments = [url, "swift-example"]
                let swift = try await Self.run(example)
                #expect(swift.status == 0 && swift.out.hasPrefix("task "), "\(swift.out)\(swift.err)")
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE name = 'swift-example'") == 1)
                let bad = try await runRequired(
                    "python3",
                    [
                        FileManager.default.currentDirectoryPath + "/Examples/Enqueue/enqueue.py", "--dsn", url,
                        "--order", "x", "--executor", "rm -rf",
                    ])
                #expect(bad.status == 2 && bad.err.contains("field executor"), "\(bad.err)")

                let revoked = try runConveyor(
                    ["enqueue-grant", role, "--revoke"], env: ["CONVEYOR_DATABASE_URL": sys.databaseURL])
                #expect(revoked.status == 0, "\(revoked.err)")
                let after = await Self.sqlState {
                    _ = try await app.withConnection { c in
                        try await c.query("SELECT * FROM conveyor_enqueue(name => 'late', executor => 'record')")
                    }
                }
                #expect(after.state == "42501", "revoked: \(after)")
            }
        }
    }

    /// One set of bad inputs, fed to the function and to the API: both refuse, naming the same
    /// field. This is what keeps the two validations from drifting apart.
    @Test func theFunctionAndTheAPIRefuseTheSameInputsNamingTheSameField() async throws {
        try await System.with { sys in
            try await Self.withApplicationRole(sys) { role, app, _ in
                try await sys.store.grantEnqueue(role: role, namespace: "default")
                try await APITests.withAPI(sys) { api, _ in
                    let k = try await APITests.key(sys, role: .submitter, namespace: "default")
                    let big = String(repeating: "x", count: 70_000)
                    // (field, SQL arguments after name and executor, the same as API fields)
                    let cases: [(String, String, String, String)] = [
                        ("name", "'a b'", "'noop'", #""name": "a b", "executor": "noop""#),
                        ("name", "''", "'noop'", #""name": "", "executor": "noop""#),
                        ("executor", "'ok'", "'rm -rf'", #""name": "ok", "executor": "rm -rf""#),
                        (
                            "parameters", "'ok'", "'noop', parameters => '[1]'",
                            #""name": "ok", "executor": "noop", "parameters": [1]"#
                        ),
                        (
                            "parameters", "'ok'", "'noop', parameters => '{\"blob\": \"\(big)\"}'",
                            #""name": "ok", "executor": "noop", "parameters": {"blob": "\#(big)"}"#
                        ),
                        (
                            "queue", "'ok'", "'noop', queue => 'a/b'",
                            #""name": "ok", "executor": "noop", "queue": "a/b""#
                        ),
                        (
                            "priority", "'ok'", "'noop', priority => 'urgent'",
                            #""name": "ok", "executor": "noop", "priority": "urgent""#
                        ),
                        (
                            "timeout", "'ok'", "'noop', timeout => -1",
                            #""name": "ok", "executor": "noop", "timeout": -1"#
                        ),
                        ("timeout", "'ok'", "'noop', timeout => 0", #""name": "ok", "executor": "noop", "timeout": 0"#),
                        // Instants PostgreSQL takes and the API does not: BC, infinity (0018).
                        (
                            "start", "'ok'", "'noop', start => '0001-01-01 BC'",
                            #""name": "ok", "executor": "noop", "start": "0000-06-01T00:00:00Z""#
                        ),
                        (
                            "start", "'ok'", "'noop', start => 'infinity'",
                            #""name": "ok", "executor": "noop", "start": "10000-01-01T00:00:00Z""#
                        ),
                        // Past 365 days: the function accepted these until migration 0018.
                        (
                            "timeout", "'ok'", "'noop', timeout => 31536001",
                            #""name": "ok", "executor": "noop", "timeout": 31536001"#
                        ),
                        (
                            "timeout", "'ok'", "'noop', timeout => 1e13",
                            #""name": "ok", "executor": "noop", "timeout": 1e13"#
                        ),
                        (
                            "schedule_to_start_timeout", "'ok'", "'noop', schedule_to_start_timeout => 604801",
                            #""name": "ok", "executor": "noop", "schedule_to_start_timeout": 604801"#
                        ),
                        (
                            "schedule_to_start_timeout", "'ok'", "'noop', schedule_to_start_timeout => 0",
                            #""name": "ok", "executor": "noop", "schedule_to_start_timeout": 0"#
                        ),
                        (
                            "retry.max_attempts", "'ok'", "'noop', max_attempts => 0",
                            #""name": "ok", "executor": "noop", "retry": {"max_attempts": 0}"#
                        ),
                        (
                            "retry.max_attempts", "'ok'", "'noop', max_attempts => 1001",
                            #""name": "ok", "executor": "noop", "retry": {"max_attempts": 1001}"#
                        ),
                    ]
                    for (field, name, rest, body) in cases {
                        let sql = await Self.sqlState {
                            _ = try await app.withConnection { c in
                                try await c.query(
                                    "SELECT * FROM conveyor_enqueue(name => \(name), executor => \(rest))")
                            }
                        }
                        #expect(sql.state == "22023" && sql.message.hasPrefix("\(field):"), "\(field): \(sql)")
                        let r = try await api.call(
                            "POST", "/v1/tasks", key: k, body: "{" + body + #", "schedule": "once"}"#)
                        #expect(
                            r.status == 400 && r.json["field"]?.stringValue == field, "\(field): \(r.status) \(r.json)")
                    }
                    // NaN, which JSON cannot carry to the API, passed the function's `timeout > 0` (PostgreSQL
                    // orders NaN above every number).
                    let nan = await Self.sqlState {
                        _ = try await app.withConnection { c in
                            try await c.query(
                                "SELECT * FROM conveyor_enqueue(name => 'ok', executor => 'noop', timeout => 'NaN')")
                        }
                    }
                    #expect(nan.state == "22023" && nan.message.hasPrefix("timeout:"), "\(nan)")
                    #expect(try await sys.count("SELECT count(*) FROM tasks") == 0, "nothing was created by either")
                    // The bound itself is accepted by both.
                    let edge = try await app.withConnection { c in
                        try await c.query(
                            "SELECT * FROM conveyor_enqueue(name => 'year', executor => 'noop', timeout => 31536000)")
                    }
                    #expect(edge.rows.count == 1)
                    let apiEdge = try await api.call(
                        "POST", "/v1/tasks", key: k,
                        body: #"{"name": "api-year", "executor": "noop", "timeout": 31536000}"#)
                    #expect(apiEdge.status == 201, "\(apiEdge.status) \(apiEdge.json)")
                    // A name that exists: 23505 from the function, 409 from the API, both naming it.
                    _ = try await api.call("POST", "/v1/tasks", key: k, body: #"{"name": "taken", "executor": "noop"}"#)
                    let dup = await Self.sqlState {
                        _ = try await app.withConnection { c in
                            try await c.query("SELECT * FROM conveyor_enqueue(name => 'taken', executor => 'noop')")
                        }
                    }
                    #expect(dup.state == "23505" && dup.message.hasPrefix("name:"), "\(dup)")
                    let apiDup = try await api.call(
                        "POST", "/v1/tasks", key: k, body: #"{"name": "taken", "executor": "noop"}"#)
                    #expect(apiDup.status == 409 && apiDup.json["field"] == "name")
                }
            }
        }
    }
}
