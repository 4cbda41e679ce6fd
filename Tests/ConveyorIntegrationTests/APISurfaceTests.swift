import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorHTTP
import ConveyorPostgres
import ConveyorStore
import Foundation
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import ConveyorAPI

/// PATCH, batches, filters, templates, groups, queues, keys, the audit log, rate limits and
/// the auth matrix, against the real API and database.
@Suite("REST API surface (real PostgreSQL)", .serialized)
struct APISurfaceTests {
    typealias Client = APITests.Client

    @Test func patchLeavesAbsentFieldsAndClearsNullOnes() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .submitter, namespace: "default")
                let created = try await api.call(
                    "POST", "/v1/tasks", key: k,
                    body: """
                        {"name": "p", "executor": "noop", "schedule": "every 1h", "queue": "reports",
                         "group": "nightly", "labels": {"team": "data"}, "timeout": 30, "retry": {"max_attempts": 4},
                         "parameters": {"a": 1, "b": 2}}
                        """)
                #expect(created.status == 201, "\(created.json)")
                let nextBefore = created.json["next_run_at"]

                let timeout = try await api.call("PATCH", "/v1/tasks/p", key: k, body: #"{"timeout": 90}"#)
                #expect(timeout.status == 200, "\(timeout.json)")
                #expect(timeout.json["timeout"] == 90)
                #expect(timeout.json["queue"] == "reports", "absent: unchanged")
                #expect(timeout.json["group"] == "nightly")
                #expect(timeout.json["max_attempts"] == 4)
                #expect(
                    timeout.json["next_run_at"] == nextBefore,
                    "the schedule did not change, so neither does the next run")

                let cleared = try await api.call(
                    "PATCH", "/v1/tasks/p", key: k,
                    body: #"{"group": null, "queue": null, "parameters": {"b": null, "c": 3}}"#)
                #expect(cleared.status == 200, "\(cleared.json)")
                #expect(cleared.json["group"] == nil, "null clears")
                #expect(cleared.json["queue"] == "default", "null restores the default")
                #expect(cleared.json["parameters"] == .object(["a": 1, "c": 3]), "objects merge (RFC 7396)")
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM tasks WHERE name = 'p' AND group_name IS NULL AND queue = 'default'") == 1
                )

                // Pausing needs the operator role by every route: PATCH as POST …/pause.
                let submitterPause = try await api.call("PATCH", "/v1/tasks/p", key: k, body: #"{"paused": true}"#)
                #expect(submitterPause.status == 403, "\(submitterPause.json)")
                #expect(try await api.call("POST", "/v1/tasks/p/pause", key: k).status == 403)
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE name = 'p' AND paused") == 0)
                let op = try await APITests.key(sys, role: .operator, namespace: "default")
                let paused = try await api.call("PATCH", "/v1/tasks/p", key: op, body: #"{"paused": true}"#)
                #expect(paused.json["paused"] == true)
                #expect(
                    try await api.call("PATCH", "/v1/tasks/p", key: k, body: #"{"timeout": 5}"#).json["paused"] == true,
                    "paused survives other patches")

                let startWithin = try await api.call(
                    "PATCH", "/v1/tasks/p", key: k, body: #"{"schedule_to_start_timeout": 120}"#)
                #expect(startWithin.json["schedule_to_start_timeout"] == 120, "\(startWithin.json)")
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM tasks WHERE name = 'p' AND schedule_to_start_seconds = 120")
                        == 1)
                let rescheduled = try await api.call(
                    "PATCH", "/v1/tasks/p", key: k, body: #"{"schedule": "0 3 * * *", "timezone": "Europe/London"}"#)
                #expect(rescheduled.status == 200)
                #expect(rescheduled.json["next_run_at"] != nextBefore, "a new schedule recomputes the next run")

                for (body, field) in [
                    (#"{"state": "succeeded"}"#, "state"), (#"{"attempt": 3}"#, "attempt"),
                    (#"{"owner": "me"}"#, "owner"),
                    (#"{"name": "q"}"#, "name"), (#"{"schedule": "61 * * * *"}"#, "schedule"),
                    (#"{"timeout": -1}"#, "timeout"),
                    (#"{"schedule_to_start_timeout": 0}"#, "schedule_to_start_timeout"),
                    (#"{"schedule_to_start_timeout": 604801}"#, "schedule_to_start_timeout"),
                    (#"{"schedule_to_start_timeout": "soon"}"#, "schedule_to_start_timeout"),
                    (#"{"depends_on": ["x"]}"#, "depends_on"), (#"{"start": "2030-01-01T00:00:00Z"}"#, "start"),
                    (#"{"callback_url": "ftp://x"}"#, "callback_url"),
                ] {
                    let r = try await api.call("PATCH", "/v1/tasks/p", key: k, body: body)
                    #expect(r.status == 400, "\(body) → \(r.status)")
                    #expect(r.json["field"]?.stringValue == field, "\(body) → \(r.json)")
                }
                #expect(try await api.call("PATCH", "/v1/tasks/p", key: k, body: "[1]").status == 400)
                let blob = String(repeating: "x", count: 70_000)
                let tooBig = try await api.call(
                    "PATCH", "/v1/tasks/p", key: k, body: #"{"parameters": {"blob": "\#(blob)"}}"#)
                #expect(
                    tooBig.status == 400 && tooBig.json["field"] == "parameters", "\(tooBig.json["detail"] ?? .null)")
                let badExecutor = try await api.call("PATCH", "/v1/tasks/p", key: k, body: #"{"executor": "rm -rf"}"#)
                #expect(badExecutor.status == 400 && badExecutor.json["field"] == "executor")
                #expect(try await api.call("PATCH", "/v1/tasks/nope", key: k, body: "{}").status == 404)
                let viewer = try await APITests.key(sys, role: .viewer, namespace: "default")
                #expect(try await api.call("PATCH", "/v1/tasks/p", key: viewer, body: "{}").status == 403)
            }
        }
    }

    @Test func batchesAreAllOrNothingAndFilterable() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .submitter, namespace: "default")
                let bad = try await api.call(
                    "POST", "/v1/tasks", key: k, body: #"[{"name": "b1", "executor": "noop"}, {"name": "b2"}]"#)
                #expect(bad.status == 400)
                #expect(bad.json["field"] == "tasks[1].executor", "\(bad.json)")
                #expect(try await sys.count("SELECT count(*) FROM tasks") == 0, "nothing of a refused batch is created")

                let ok = try await api.call(
                    "POST", "/v1/tasks", key: k,
                    body: """
                        {"tasks": [{"name": "b1", "executor": "noop", "schedule": "manual"},
                                   {"name": "b2", "executor": "noop", "schedule": "manual"},
                                   {"name": "b3", "executor": "noop", "schedule": "manual"}]}
                        """)
                #expect(ok.status == 201, "\(ok.json)")
                let batchID = try #require(ok.headers.first { $0.0.lowercased() == "x-batch-id" }?.1)
                #expect(ok.json["batch_id"] == .string(batchID))
                let listed = try await api.call("GET", "/v1/tasks?batch_id=\(batchID)", key: k)
                #expect(listed.json["tasks"]?.arrayValue?.compactMap { $0["name"]?.stringValue } == ["b1", "b2", "b3"])
                #expect(listed.json["tasks"]?.arrayValue?.allSatisfy { $0["batch_id"] == .string(batchID) } == true)

                let dup = try await api.call(
                    "POST", "/v1/tasks", key: k,
                    body: #"[{"name": "b4", "executor": "noop"}, {"name": "b2", "executor": "noop"}]"#)
                #expect(dup.status == 409)
                #expect(dup.json["value"] == "b2", "the conflict names the task that exists: \(dup.json)")
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE name = 'b4'") == 0)
                let twice = try await api.call(
                    "POST", "/v1/tasks", key: k,
                    body: #"[{"name": "c", "executor": "noop"}, {"name": "c", "executor": "noop"}]"#)
                #expect(twice.status == 400 && twice.json["value"] == "c")
                let tooMany =
                    "["
                    + (0...APIServer.maxBatch).map { #"{"name": "m\#($0)", "executor": "noop"}"# }.joined(
                        separator: ",") + "]"
                #expect(try await api.call("POST", "/v1/tasks", key: k, body: tooMany).json["field"] == "tasks")
            }
        }
    }

    @Test func listFiltersAndPagesWithoutInjection() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .operator, namespace: "default")
                var specs: [String] = []
                for i in 0..<7 {
                    specs.append(
                        #"{"name": "alpha-\#(i)", "executor": "noop", "schedule": "manual", "#
                            + #""queue": "\#(i % 2 == 0 ? "even" : "odd")", "#
                            + #""group": "g\#(i % 3)", "labels": {"team": "\#(i < 3 ? "data" : "web")"}}"#)
                }
                specs.append(#"{"name": "a_b", "executor": "noop", "schedule": "manual"}"#)
                specs.append(#"{"name": "a%b", "executor": "noop", "schedule": "manual"}"#)
                specs.append(#"{"name": "abc", "executor": "noop", "schedule": "manual"}"#)
                #expect(
                    try await api.call("POST", "/v1/tasks", key: k, body: "[" + specs.joined(separator: ",") + "]")
                        .status == 201)
                _ = try await api.call("POST", "/v1/tasks/alpha-1/pause", key: k)
                try await sys.pool.withConnection { c in
                    // alpha-2's latest run failed; alpha-3's succeeded.
                    _ = try await c.query(
                        """
                        INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at,
                            finished_at)
                        SELECT gen_random_uuid(), id, now(), 1, CASE name WHEN 'alpha-2' THEN 'failed' ELSE 'succeeded'
                            END, queue, shard, now(), now()
                        FROM tasks WHERE name IN ('alpha-2', 'alpha-3')
                        """)
                }
                func names(_ query: String) async throws -> [String] {
                    let r = try await api.call("GET", "/v1/tasks?" + query, key: k)
                    #expect(r.status == 200, "\(query): \(r.json)")
                    return r.json["tasks"]?.arrayValue?.compactMap { $0["name"]?.stringValue } ?? []
                }
                #expect(try await names("queue=odd") == ["alpha-1", "alpha-3", "alpha-5"])
                #expect(try await names("group=g0") == ["alpha-0", "alpha-3", "alpha-6"])
                #expect(try await names("label=team=data") == ["alpha-0", "alpha-1", "alpha-2"])
                #expect(try await names("label=team").count == 7)
                #expect(try await names("paused=true") == ["alpha-1"])
                #expect(try await names("state=failed") == ["alpha-2"])
                #expect(try await names("state=succeeded") == ["alpha-3"])
                #expect(try await names("prefix=alpha-").count == 7)
                #expect(try await names("prefix=a_") == ["a_b"], "'_' is a literal, not a LIKE wildcard")
                #expect(try await names("prefix=a%25") == ["a%b"], "'%' is a literal")
                let last = try await api.call("GET", "/v1/tasks?state=succeeded", key: k)
                #expect(
                    last.json["tasks"]?.arrayValue?.first?["last_run"]?["state"] == "succeeded",
                    "each task comes with its latest run")

                // Every filter with hostile text: answered (empty or refused), never executed.
                for evil in [
                    "' OR '1'='1", "'; DROP TABLE tasks; --", "\\", "%", "x' UNION SELECT secret_hash FROM api_keys --",
                ] {
                    let q = evil.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
                    for param in [
                        "queue", "group", "label", "prefix", "cursor", "state", "batch_id", "paused", "namespace",
                    ] {
                        let r = try await api.call("GET", "/v1/tasks?\(param)=\(q)", key: k)
                        #expect([200, 400].contains(r.status), "\(param)=\(evil): \(r.status)")
                        if r.status == 200 && param != "cursor" && param != "namespace"
                            && !(param == "prefix" && evil == "%")
                        {
                            #expect(r.json["tasks"] == .array([]), "\(param)=\(evil) matched \(r.json)")
                        }
                    }
                    for param in ["task", "state", "since", "until", "cursor"] {
                        #expect(
                            [200, 400, 404].contains(try await api.call("GET", "/v1/runs?\(param)=\(q)", key: k).status)
                        )
                    }
                    #expect(try await api.call("GET", "/v1/groups/\(q)", key: k).status == 404)
                    #expect(try await api.call("GET", "/v1/tasks/\(q)", key: k).status == 404)
                }
                #expect(try await sys.count("SELECT count(*) FROM tasks") == 10, "the table is intact")

                // Pages: every task exactly once, in order; edges refused with the field named.
                var seen: [String] = []
                var cursor: String?
                repeat {
                    let r = try await api.call(
                        "GET",
                        "/v1/tasks?limit=3"
                            + (cursor.map {
                                "&cursor=" + $0.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
                            } ?? ""), key: k)
                    seen += r.json["tasks"]?.arrayValue?.compactMap { $0["name"]?.stringValue } ?? []
                    cursor = r.json["next_cursor"]?.stringValue
                } while cursor != nil && seen.count < 50
                #expect(seen.count == 10 && Set(seen).count == 10 && seen == seen.sorted(), "\(seen)")
                for bad in [
                    "limit=0", "limit=101", "limit=-1", "limit=x", "paused=maybe", "batch_id=nope", "state=done",
                ] {
                    let r = try await api.call("GET", "/v1/tasks?" + bad, key: k)
                    #expect(r.status == 400, "\(bad)")
                    #expect(r.json["field"]?.stringValue == String(bad.split(separator: "=")[0]), "\(bad): \(r.json)")
                }
                #expect(try await api.call("GET", "/v1/tasks?limit=100", key: k).status == 200)
            }
        }
    }

    @Test func templatesMakeTasksFromParameters() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let op = try await APITests.key(sys, role: .operator, namespace: "default")
                let put = try await api.call(
                    "PUT", "/v1/templates/report", key: op,
                    body: """
                        {"parameters": ["customer", "hour"],
                         "task": {"executor": "noop", "schedule": "0 {{hour}} * * *",
                         "parameters": {"customer": "{{customer}}", "label": "report for {{customer}}"},
                         "labels": {"customer": "{{customer}}"}}}
                        """)
                #expect(put.status == 200, "\(put.json)")
                let made = try await api.call(
                    "POST", "/v1/templates/report/tasks", key: op,
                    body: #"{"name": "report-acme", "values": {"customer": "acme", "hour": 4}}"#)
                #expect(made.status == 201, "\(made.json)")
                #expect(made.json["schedule"] == "0 4 * * *")
                #expect(made.json["parameters"] == .object(["customer": "acme", "label": "report for acme"]))
                #expect(made.json["labels"] == .object(["customer": "acme"]))
                let missing = try await api.call(
                    "POST", "/v1/templates/report/tasks", key: op, body: #"{"name": "r2", "values": {"customer": "x"}}"#
                )
                #expect(missing.status == 400 && missing.json["field"] == "values.hour", "\(missing.json)")
                let extra = try await api.call(
                    "POST", "/v1/templates/report/tasks", key: op,
                    body: #"{"name": "r2", "values": {"customer": "x", "hour": 1, "zzz": 1}}"#)
                #expect(extra.status == 400 && extra.json["field"] == "values.zzz")
                let invalid = try await api.call(
                    "POST", "/v1/templates/report/tasks", key: op,
                    body: #"{"name": "r2", "values": {"customer": "x", "hour": 99}}"#)
                #expect(
                    invalid.status == 400 && invalid.json["field"] == "schedule",
                    "the filled task is validated: \(invalid.json)")
                let undeclared = try await api.call(
                    "PUT", "/v1/templates/t2", key: op, body: #"{"task": {"executor": "noop", "queue": "{{q}}"}}"#)
                #expect(undeclared.status == 400 && undeclared.json["field"] == "parameters")
                let unknownField = try await api.call(
                    "PUT", "/v1/templates/t2", key: op, body: #"{"task": {"executor": "noop", "state": "x"}}"#)
                #expect(unknownField.status == 400 && unknownField.json["field"] == "task.state")
                #expect(try await api.call("GET", "/v1/templates", key: op).json["templates"]?.arrayValue?.count == 1)
                let other = try await APITests.key(sys, role: .admin, namespace: "other")
                #expect(
                    try await api.call(
                        "POST", "/v1/templates/report/tasks", key: other, body: #"{"name": "x", "values": {}}"#
                    ).status == 404)
            }
        }
    }

    @Test func groupsAreCountedPausedAndCancelledPerNamespace() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let op = try await APITests.key(sys, role: .operator, namespace: "default")
                let other = try await APITests.key(sys, role: .operator, namespace: "other")
                #expect(
                    try await api.call(
                        "POST", "/v1/tasks", key: op,
                        body: """
                            [{"name": "g1", "executor": "noop", "group": "etl", "schedule": "manual"},
                             {"name": "g2", "executor": "noop", "group": "etl", "schedule": "manual"}]
                            """
                    ).status == 201)
                #expect(
                    try await api.call(
                        "POST", "/v1/tasks", key: other,
                        body: #"{"name": "g1", "executor": "noop", "group": "etl", "schedule": "manual"}"#
                    ).status == 201)
                try await sys.pool.withConnection { c in
                    _ = try await c.query(
                        """
                        INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at)
                        SELECT gen_random_uuid(), id, now(), 1, 'scheduled', queue, shard, now() + interval '1 hour'
                            FROM tasks WHERE group_name = 'etl'
                        """)
                }
                let group = try await api.call("GET", "/v1/groups/etl", key: op)
                #expect(
                    group.json["tasks"] == 2 && group.json["runs_by_state"]?["scheduled"] == 2
                        && group.json["retries"] == 0, "\(group.json)")
                #expect(try await api.call("POST", "/v1/groups/etl/pause", key: op).json["tasks_changed"] == 2)
                #expect(
                    try await sys.count("SELECT count(*) FROM tasks WHERE group_name = 'etl' AND paused") == 2,
                    "the other namespace's task stays")
                let cancelled = try await api.call("POST", "/v1/groups/etl/cancel", key: op)
                #expect(cancelled.json["runs_cancelled"] == 2)
                #expect(
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'scheduled'") == 1,
                    "the other namespace's run stays")
                #expect(try await api.call("POST", "/v1/groups/etl/resume", key: op).json["tasks_changed"] == 2)
                #expect(try await api.call("GET", "/v1/groups/nope", key: op).status == 404)
                let viewer = try await APITests.key(sys, role: .viewer, namespace: "default")
                #expect(try await api.call("POST", "/v1/groups/etl/cancel", key: viewer).status == 403)
            }
        }
    }

    @Test func queuesShowTheBrokersDepthAndConsumers() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys, broker: true) { api, _ in
                let k = try await APITests.key(sys, role: .viewer, namespace: "default")
                try await sys.store.createTasks(
                    [NewTask(name: "q1", executor: "noop", schedule: .manual)].map {
                        var t = $0
                        t.queue = sys.queue
                        return t
                    })
                // Declare the work queue and put two messages in it, with no consumer.
                let publisher = AMQPPublisher(
                    configuration: sys.amqp, topology: ConveyorTopology(prefix: sys.prefix).base, logger: Servers.logger
                )
                publisher.start()
                defer { publisher.stop() }
                try await publisher.waitUntilConnected()
                let topology = ConveyorTopology(prefix: sys.prefix)
                try await publisher.ensureTopology(topology.work(queues: [sys.queue]))
                for _ in 0..<2 {
                    try await publisher.publish(
                        AMQPOutgoingMessage(
                            exchange: topology.tasksExchange, routingKey: sys.queue, body: Array("{}".utf8),
                            properties: AMQPProperties()))
                }
                try await publisher.publish(
                    AMQPOutgoingMessage(
                        exchange: topology.isolateExchange, routingKey: topology.isolationQueue(sys.queue),
                        body: Array("{}".utf8), properties: AMQPProperties()))
                // A key of one namespace sees its own queues' database figures, never the broker's:
                // a broker queue holds every namespace's messages.
                let tenant = try await api.call("GET", "/v1/queues", key: k)
                #expect(tenant.status == 200, "\(tenant.json)")
                let own = tenant.json["queues"]?.arrayValue?.first { $0["name"] == .string(sys.queue) }
                #expect(own?["tasks"] == 1 && own?["broker"] == nil, "\(tenant.json)")
                let fleet = try await APITests.key(sys, role: .viewer, namespace: "*")
                let r = try await api.call("GET", "/v1/queues?namespace=default", key: fleet)
                #expect(r.status == 200, "\(r.json)")
                let q = r.json["queues"]?.arrayValue?.first { $0["name"] == .string(sys.queue) }
                #expect(q?["broker"]?["ready"] == 2, "\(r.json)")
                #expect(q?["broker"]?["consumers"] == 0)
                #expect(q?["broker"]?["isolated"] == 1, "the isolation lane's one message, counted apart")
                #expect(q?["tasks"] == 1)
                #expect(try await api.call("GET", "/readyz").status == 200, "the broker is reachable")
            }
        }
    }

    /// `conveyor apikey create` and `revoke` (database access, no API) write the audit log as the
    /// API does: actor `cli:<user>`, role `database`. Before, a key made this way left no trace.
    @Test func theDatabaseCLIAuditsTheKeysItCreatesAndRevokes() async throws {
        try await System.with { sys in
            let env = ["CONVEYOR_DATABASE_URL": sys.databaseURL, "USER": "ops-alice"]
            let created = try runConveyor(
                ["apikey", "create", "--name", "scraper", "--role", "viewer", "--namespace", "*"], env: env)
            #expect(created.status == 0, "\(created.err)")
            let key = created.out.trimmingCharacters(in: .whitespacesAndNewlines)
            let prefix = try #require(key.split(separator: "_").dropFirst().first.map(String.init), "\(created.out)")
            let revoked = try runConveyor(["apikey", "revoke", prefix], env: env)
            #expect(revoked.status == 0, "\(revoked.err)")
            let entries = try await sys.store.auditLog(namespace: nil, action: nil, before: nil, limit: 10)
            let made = try #require(entries.first { $0.action == "key.create" }, "no key.create entry")
            #expect(
                made.actor == "cli:ops-alice" && made.role == "database" && made.target == prefix
                    && made.namespace == "*")
            #expect(made.detail["role"] == "viewer" && made.detail["name"] == "scraper")
            #expect(!"\(made.detail)".contains(key), "the key itself is never audited")
            #expect(
                entries.contains { $0.action == "key.revoke" && $0.target == prefix && $0.actor == "cli:ops-alice" })
        }
    }

    @Test func adminsManageKeysAndEveryChangeIsAudited() async throws {
        try await System.with { sys in
            let time = ManualClock()
            try await APITests.withAPI(sys, ttl: .milliseconds(300), clock: time.apiClock) { api, _ in
                let admin = try await APITests.key(sys, role: .admin, namespace: "team-a")
                let created = try await api.call(
                    "POST", "/v1/keys", key: admin, body: #"{"name": "ci", "role": "submitter"}"#,
                    headers: [("X-Request-ID", "audit-1")])
                #expect(created.status == 201, "\(created.json)")
                let newKey = try #require(created.json["key"]?.stringValue)
                #expect(created.json["namespace"] == "team-a")
                #expect(
                    try await api.call(
                        "POST", "/v1/tasks", key: newKey, body: #"{"name": "t", "executor": "noop"}"#,
                        headers: [("X-Request-ID", "audit-2"), ("X-Forwarded-For", "198.51.100.7")]
                    ).status == 201)
                let list = try await api.call("GET", "/v1/keys", key: admin)
                #expect(list.json["keys"]?.arrayValue?.count == 2)
                #expect(
                    !String(decoding: list.json.jsonBytes, as: UTF8.self).contains(
                        String(newKey.split(separator: "_")[2])), "no secret is listed")
                #expect(
                    try await api.call(
                        "POST", "/v1/keys", key: admin, body: #"{"name": "x", "role": "viewer", "namespace": "team-b"}"#
                    ).status == 403)
                #expect(
                    try await api.call("POST", "/v1/keys", key: admin, body: #"{"name": "x", "role": "root"}"#).json[
                        "field"] == "role")
                #expect(
                    try await api.call("POST", "/v1/keys", key: newKey, body: #"{"name": "x", "role": "viewer"}"#)
                        .status == 403)
                let prefix = try #require(created.json["prefix"]?.stringValue)
                #expect(try await api.call("DELETE", "/v1/keys/\(prefix)", key: admin).status == 200)
                time.advance(by: .milliseconds(400))
                #expect(
                    try await api.call("GET", "/v1/tasks", key: newKey).status == 401, "revoked within the cache time")

                let audit = try await api.call("GET", "/v1/audit", key: admin)
                let entries = audit.json["entries"]?.arrayValue ?? []
                #expect(
                    entries.map { $0["action"]?.stringValue ?? "" } == ["key.revoke", "task.create", "key.create"],
                    "\(audit.json)")
                let create = entries.first { $0["action"] == "task.create" }
                #expect(create?["request_id"] == "audit-2")
                #expect(create?["actor"] == .string(prefix))
                #expect(create?["client"] == "127.0.0.1", "no trusted proxies: X-Forwarded-For is ignored")
                #expect(create?["target"] == "t")
                #expect(
                    try await api.call("GET", "/v1/audit?action=key.create", key: admin).json["entries"]?.arrayValue?
                        .count == 1)
                let operatorKey = try await APITests.key(sys, role: .operator, namespace: "team-a")
                #expect(try await api.call("GET", "/v1/audit", key: operatorKey).status == 403)
                let otherAdmin = try await APITests.key(sys, role: .admin, namespace: "team-b")
                #expect(
                    try await api.call("GET", "/v1/audit", key: otherAdmin).json["entries"] == .array([]),
                    "another tenant's admin sees none of it")
            }
        }
    }

    @Test func rateLimitsAnswer429WithRetryAfter() async throws {
        try await System.with { sys in
            var options = APIOptions()
            options.perKey = .init(rate: 0.5, burst: 3)
            options.perAddress = .init(rate: 0.5, burst: 2)
            options.submitByPriority[.background] = .init(rate: 0.1, burst: 1)
            options.trustedProxies = [try Network(parsing: "127.0.0.1/32")]
            try await APITests.withAPI(sys, options: options) { api, _ in
                let k = try await APITests.key(sys, role: .submitter, namespace: "default")
                let other = try await APITests.key(sys, role: .admin, namespace: "default")
                let statuses = try await (0..<4).asyncMap { _ in try await api.call("GET", "/v1/tasks", key: k) }
                #expect(statuses.map(\.status) == [200, 200, 200, 429])
                #expect(
                    statuses[3].headers.contains { $0.0.lowercased() == "retry-after" && Int($0.1) ?? 0 >= 1 },
                    "\(statuses[3].headers)")
                #expect(statuses[3].json["title"] == "too many requests")
                #expect(try await api.call("GET", "/v1/tasks", key: other).status == 200, "buckets are per key")

                // Submissions by priority: background work has its own, smaller bucket (a fresh key: 3 requests).
                let submitter = try await APITests.key(sys, role: .submitter, namespace: "default")
                #expect(
                    try await api.call(
                        "POST", "/v1/tasks", key: submitter,
                        body: #"{"name": "bg1", "executor": "noop", "priority": "background"}"#
                    ).status == 201)
                #expect(
                    try await api.call(
                        "POST", "/v1/tasks", key: submitter,
                        body: #"{"name": "bg2", "executor": "noop", "priority": "background"}"#
                    ).status == 429)
                #expect(
                    try await api.call(
                        "POST", "/v1/tasks", key: submitter,
                        body: #"{"name": "hi", "executor": "noop", "priority": "critical"}"#
                    ).status == 201)

                // A key this process has found already (it stays cached): below, its address's failures do not hold it
                // up.
                let known = try await APITests.key(sys, role: .viewer, namespace: "default")
                #expect(try await api.call("GET", "/v1/tasks", key: known).status == 200)

                // Without valid credentials: per client address, from X-Forwarded-For since the peer is a trusted
                // proxy.
                let fwd = [("X-Forwarded-For", "203.0.113.9")]
                #expect(
                    try await api.call(
                        "GET", "/v1/tasks", key: "cvk_000000000000_guessguessguessguessguess", headers: fwd
                    ).status == 401)
                #expect(try await api.call("GET", "/v1/tasks", headers: fwd).status == 401)
                let blocked = try await api.call(
                    "GET", "/v1/tasks", key: "cvk_000000000001_guessguessguessguessguess", headers: fwd)
                #expect(blocked.status == 429, "an address that keeps failing is slowed down")
                #expect(blocked.headers.contains { $0.0.lowercased() == "retry-after" })
                #expect(
                    try await api.call(
                        "GET", "/v1/tasks", key: "cvk_000000000001_guessguessguessguessguess",
                        headers: [("X-Forwarded-For", "203.0.113.10")]
                    ).status == 401, "another address is not")
                #expect(
                    try await api.call("GET", "/v1/tasks", key: known, headers: fwd).status == 200,
                    "valid credentials from that address still work")
                // A key never presented to this process needs a lookup, which the spent address is not given.
                let unseen = try await APITests.key(sys, role: .viewer, namespace: "default")
                #expect(try await api.call("GET", "/v1/tasks", key: unseen, headers: fwd).status == 429)
                let admin = try await APITests.key(sys, role: .admin, namespace: "default")
                // The peer (127.0.0.1) is a trusted proxy here: the audit log shows the forwarded address.
                #expect(
                    try await api.call(
                        "POST", "/v1/tasks/hi/trigger", key: admin, headers: [("X-Forwarded-For", "198.51.100.7")]
                    ).status == 202)
                let audit = try await api.call("GET", "/v1/audit?action=task.trigger", key: admin)
                #expect(
                    audit.json["entries"]?.arrayValue?.first?["client"] == "198.51.100.7",
                    "127.0.0.1 is a trusted proxy here: \(audit.json)")
            }
        }
    }

    @Test func runsLinkToTheirTraceWhenATemplateIsSet() async throws {
        try await System.with { sys in
            var options = APIOptions()
            options.traceLinkTemplate = "http://jaeger.example:16686/trace/{trace_id}"
            try await APITests.withAPI(sys, options: options) { api, _ in
                let k = try await APITests.key(sys, role: .viewer, namespace: "default")
                try await sys.store.createTasks([NewTask(name: "traced", executor: "noop", schedule: .manual)])
                let id = UUID()
                try await sys.pool.withConnection { c in
                    _ = try await c.query(
                        """
                        INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at, trace_id)
                        SELECT $1, id, now(), 1, 'succeeded', queue, shard, now(), '4bf92f3577b34da6a3ce929d0e0e4736'
                            FROM tasks WHERE name = 'traced'
                        """, [id])
                }
                let run = try await api.call("GET", "/v1/runs/\(id)", key: k)
                #expect(
                    run.json["trace_url"] == "http://jaeger.example:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736",
                    "\(run.json)")
            }
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .viewer, namespace: "default")
                let id = try #require(try await sys.rows("SELECT id::text FROM runs").first?[0])
                #expect(
                    try await api.call("GET", "/v1/runs/\(id)", key: k).json["trace_url"] == nil, "no template, no link"
                )
            }
        }
    }

    /// Counts the connections made to it and closes each at once: a database that does not answer.
    final class ConnectionCounter: Sendable {
        let count = Mutex(0)
        final class Handler: ChannelInboundHandler {
            typealias InboundIn = ByteBuffer
            let counter: ConnectionCounter
            init(_ counter: ConnectionCounter) { self.counter = counter }
            func channelActive(context: ChannelHandlerContext) {
                counter.count.withLock { $0 += 1 }
                context.close(promise: nil)
            }
        }
    }

    @Test func readinessSaysWhatIsDownAndIsCachedBriefly() async throws {
        let counter = ConnectionCounter()
        let listener = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ConnectionCounter.Handler(counter))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        defer { listener.close(promise: nil) }
        var cfg = PostgresPool.Configuration(
            url: "postgresql://conveyor@127.0.0.1:\(listener.localAddress?.port ?? 1)/conveyor")
        cfg.connectRetryFor = .zero
        let pool = PostgresPool(configuration: cfg, logger: Servers.logger)
        defer { pool.close() }
        let store = Store(pool: pool)
        let port = Mutex(0)
        let time = ManualClock()
        let api = APIService(host: "127.0.0.1", port: 0, store: store, logger: Servers.logger, clock: time.apiClock) {
            p in
            port.withLock { $0 = p }
        }
        try await withServices([api]) {
            let listening = try await System.poll(timeout: .seconds(20), every: .milliseconds(20)) {
                port.withLock { $0 } != 0
            }
            try #require(listening, "the API never reported the port it listens on")
            var policy = OutboundPolicy()
            policy.allowedNetworks = [try Network(parsing: "127.0.0.1")]
            let client = Client(
                base: "http://127.0.0.1:\(port.withLock { $0 })",
                http: OutboundHTTP(policy: policy, logger: Servers.logger))
            let r = try await client.call("GET", "/readyz")
            #expect(r.status == 503)
            #expect(r.json["detail"] == "the database is unreachable")
            #expect(r.headers.contains { $0.0.lowercased() == "retry-after" && $0.1 == "5" })
            let tried = counter.count.withLock { $0 }
            #expect(tried >= 1, "the first probe tried the database")
            for _ in 0..<5 { #expect(try await client.call("GET", "/readyz").status == 503) }
            #expect(counter.count.withLock { $0 } == tried, "calls within 2 s reuse the answer")
            time.advance(by: .milliseconds(2100))
            #expect(try await client.call("GET", "/readyz").status == 503)
            let afterOneCheck = counter.count.withLock { $0 }
            #expect(afterOneCheck > tried, "after 2 s the database is asked again")
            // Probes that arrive together while no answer is cached share one check: they do not
            // each take a connection from the pool.
            time.advance(by: .milliseconds(2100))
            try await withThrowingTaskGroup(of: Int.self) { probes in
                for _ in 0..<8 { probes.addTask { try await client.call("GET", "/readyz").status } }
                for try await status in probes { #expect(status == 503) }
            }
            let burst = counter.count.withLock { $0 } - afterOneCheck
            #expect(burst <= afterOneCheck - tried, "8 probes at once asked the database \(burst) times, not once")
            #expect(try await client.call("GET", "/healthz").status == 200, "the process itself is up")
        }
    }

    @Test func everyRoleAgainstEveryRoute() async throws {
        try await System.with { sys in
            let routes = APIServer.build(APIEnvironment(store: sys.store, keys: KeyAuthenticator(store: sys.store)))
                .routes
            // The least role each route needs; nil = open.
            let needs: [String: Role?] = [
                "GET /healthz": nil, "GET /readyz": nil, "GET /": nil, "GET /ui/{file}": nil,
                "GET /openapi.yaml": .viewer, "GET /metrics": .viewer, "GET /v1/overview": .viewer,
                "GET /v1/events": .viewer,
                "POST /v1/tasks": .submitter, "GET /v1/tasks": .viewer, "GET /v1/tasks/{name}": .viewer,
                "PATCH /v1/tasks/{name}": .submitter,
                "DELETE /v1/tasks/{name}": .operator, "POST /v1/tasks/{name}/trigger": .submitter,
                "POST /v1/tasks/{name}/pause": .operator, "POST /v1/tasks/{name}/cancel": .operator,
                "POST /v1/tasks/{name}/resume": .operator, "POST /v1/tasks/{name}/backfill": .operator,
                "GET /v1/runs": .viewer, "GET /v1/runs/{id}": .viewer,
                "POST /v1/runs/{id}/cancel": .operator, "POST /v1/runs/{id}/redrive": .operator,
                "GET /v1/workers": .viewer,
                "GET /v1/workers/{id}": .viewer, "GET /v1/templates": .viewer, "PUT /v1/templates/{name}": .operator,
                "POST /v1/templates/{name}/tasks": .submitter, "GET /v1/groups": .viewer,
                "GET /v1/groups/{name}": .viewer,
                "POST /v1/groups/{name}/pause": .operator, "POST /v1/groups/{name}/resume": .operator,
                "POST /v1/groups/{name}/cancel": .operator,
                "GET /v1/queues": .viewer, "PUT /v1/queues/{name}/limit": .admin,
                "DELETE /v1/queues/{name}/limit": .admin, "POST /v1/queues/{name}/pause": .admin,
                "POST /v1/queues/{name}/resume": .admin, "POST /v1/keys": .admin, "GET /v1/keys": .admin,
                "DELETE /v1/keys/{prefix}": .admin, "GET /v1/audit": .admin,
            ]
            #expect(
                Set(routes) == Set(needs.keys),
                "the matrix covers every route: missing \(Set(routes).subtracting(needs.keys).sorted())")
            // The fleet's routes: a key of one namespace is refused whatever its role; a key for
            // every namespace ('*': admin, or a viewer made for it) from the route's role on.
            let fleet: Set<String> = [
                "GET /metrics", "GET /v1/workers", "GET /v1/workers/{id}", "PUT /v1/queues/{name}/limit",
                "DELETE /v1/queues/{name}/limit", "POST /v1/queues/{name}/pause", "POST /v1/queues/{name}/resume",
            ]
            var generous = APIOptions()
            generous.perAddress = .init(rate: 100, burst: 1000)
            try await APITests.withAPI(sys, options: generous) { api, _ in
                var keys: [Role: String] = [:]
                for role in Role.allCases { keys[role] = try await APITests.key(sys, role: role, namespace: "default") }
                let everyNamespace: [Role: String] = [
                    .viewer: try await APITests.key(sys, role: .viewer, namespace: "*"),
                    .admin: try await APITests.key(sys, role: .admin, namespace: "*"),
                ]
                for route in routes.sorted() {
                    let parts = route.split(separator: " ", maxSplits: 1).map(String.init)
                    let path =
                        parts[1].replacingOccurrences(of: "{name}", with: "missing").replacingOccurrences(
                            of: "{id}", with: UUID().uuidString
                        )
                        .replacingOccurrences(of: "{prefix}", with: "000000000000").replacingOccurrences(
                            of: "{file}", with: "app.js")
                        + (route == "GET /v1/events" ? "?interval_ms=200" : "")
                    let body: String? = ["POST", "PUT", "PATCH"].contains(parts[0]) ? "{}" : nil
                    guard let need = needs[route] else { continue }
                    if route == "GET /v1/events" { continue }  // a stream: checked in liveEventsStream
                    let anonymous = try await api.call(parts[0], path, body: body)
                    guard let need else {
                        #expect(anonymous.status == 200, "\(route) is open")
                        continue
                    }
                    #expect(anonymous.status == 401, "\(route) without a key")
                    for role in Role.allCases {
                        let r = try await api.call(parts[0], path, key: keys[role], body: body)
                        if role < need || fleet.contains(route) {
                            #expect(r.status == 403, "\(route) as \(role) of one namespace: \(r.status)")
                        } else {
                            #expect(![401, 403].contains(r.status), "\(route) as \(role): \(r.status) \(r.json)")
                        }
                    }
                    for (role, key) in everyNamespace {
                        let r = try await api.call(parts[0], path, key: key, body: body)
                        if role < need {
                            #expect(r.status == 403, "\(route) as \(role) of every namespace: \(r.status)")
                        } else {
                            #expect(
                                ![401, 403].contains(r.status),
                                "\(route) as \(role) of every namespace: \(r.status) \(r.json)")
                        }
                    }
                }
            }
        }
    }

    @Test func liveEventsMetricsAndTheDashboardFiles() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .viewer, namespace: "default")
                let fleetViewer = try await APITests.key(sys, role: .viewer, namespace: "*")
                // The process's registry is shared by every test in it: count the events requests by difference.
                let eventsSeries = #"conveyor_api_requests_total{route="/v1/events",method="GET",status="200"} "#
                func eventsServed() async throws -> Int {
                    let body = try await api.text("/metrics", key: fleetViewer)
                    let line = body.split(separator: "\n").first { $0.hasPrefix(eventsSeries) }
                    return line.flatMap { Int($0.dropFirst(eventsSeries.count)) } ?? 0
                }
                let eventsBefore = try await eventsServed()
                // Server-sent events: read two events with curl, then hang up.
                let curl = try Process.required(
                    "curl",
                    [
                        "-sN", "--max-time", "2", "-H", "Authorization: Bearer \(k)",
                        api.base + "/v1/events?interval_ms=300",
                    ])
                let out = Pipe()
                curl.standardOutput = out
                try curl.run()
                let data = out.fileHandleForReading.readDataToEndOfFile()
                curl.waitUntilExit()
                let text = String(decoding: data, as: UTF8.self)
                #expect(
                    text.components(separatedBy: "event: stats\n").count >= 3,
                    "at least two events in 2 s: \(text.prefix(300))")
                let first = try #require(text.split(separator: "\n").first { $0.hasPrefix("data: ") })
                let overview = try JSONDecoder().decode(JSONValue.self, from: Data(first.dropFirst(6).utf8))
                #expect(overview["runs_by_state"] != nil && overview["workers"] != nil)

                #expect(
                    try await api.call("GET", "/metrics", key: k).status == 403,
                    "a key of one namespace reads the fleet's metrics")
                let metrics = try await api.call("GET", "/metrics", key: fleetViewer)
                #expect(metrics.status == 200)
                let page = try await OutboundHTTP(
                    policy: {
                        var p = OutboundPolicy()
                        p.allowedNetworks = [try! Network(parsing: "127.0.0.1")]
                        p.maxResponseBytes = 16 << 20
                        return p
                    }(), logger: Servers.logger
                )
                .send(
                    OutboundRequest(url: api.base + "/metrics", headers: [("Authorization", "Bearer \(fleetViewer)")]),
                    timeout: .seconds(5))
                let body = String(decoding: page.body, as: UTF8.self)
                #expect(body.contains("# TYPE conveyor_api_requests_total counter"))
                // An event stream is counted when its response starts (its body streams after).
                #expect(try await eventsServed() == eventsBefore + 1, "the event stream is counted once")
                #expect(
                    body.contains(
                        #"conveyor_api_request_duration_seconds_bucket{route="/metrics",method="GET",le="+Inf"}"#))
                #expect(!body.contains(k) && !body.contains(fleetViewer), "no credentials in metrics")

                for (path, type) in [
                    ("/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css"),
                ] {
                    let r = try await OutboundHTTP(
                        policy: {
                            var p = OutboundPolicy()
                            p.allowedNetworks = [try! Network(parsing: "127.0.0.1")]
                            return p
                        }(), logger: Servers.logger
                    )
                    .send(OutboundRequest(url: api.base + path), timeout: .seconds(5))
                    #expect(r.status == 200, "\(path)")
                    #expect(
                        r.headers.contains { $0.0.lowercased() == "content-type" && $0.1.hasPrefix(type) },
                        "\(path): \(r.headers)")
                    #expect(r.headers.contains { $0.0.lowercased() == "content-security-policy" })
                }
                #expect(try await api.call("GET", "/ui/secrets.txt").status == 404)
                #expect(try await api.call("GET", "/ui/..%2Fopenapi.yaml").status == 404)
            }
        }
    }

    @Test func eventStreamsPerKeyAreBounded() async throws {
        try await System.with { sys in
            var options = APIOptions()
            options.maxEventStreamsPerKey = 2
            try await APITests.withAPI(sys, options: options) { api, _ in
                let k = try await APITests.key(sys, role: .viewer, namespace: "default")
                let other = try await APITests.key(sys, role: .viewer, namespace: "default")
                let dir = FileManager.default.temporaryDirectory.appendingPathComponent("events-\(UUID())")
                try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
                defer { try? FileManager.default.removeItem(at: dir) }
                // A stream held by curl for up to `seconds`, written to a file as it comes.
                func stream(_ key: String, seconds: Int) throws -> (process: Process, file: String) {
                    let file = dir.appendingPathComponent(UUID().uuidString).path
                    let curl = try Process.required(
                        "curl",
                        [
                            "-sN", "--max-time", "\(seconds)", "-o", file, "-H", "Authorization: Bearer \(key)",
                            api.base + "/v1/events?interval_ms=200",
                        ])
                    try curl.run()
                    return (curl, file)
                }
                func events(_ file: String) -> Int {
                    ((try? String(contentsOfFile: file, encoding: .utf8)) ?? "").components(
                        separatedBy: "event: stats\n"
                    ).count - 1
                }
                let held = try (0..<2).map { _ in try stream(k, seconds: 60) }
                defer { for h in held where h.process.isRunning { h.process.terminate() } }
                for h in held {
                    try await sys.eventually(timeout: .seconds(10), "a stream sends events") { events(h.file) >= 1 }
                }

                let refused = try await api.call("GET", "/v1/events?interval_ms=200", key: k)
                #expect(refused.status == 429)
                let detail = refused.json["detail"]?.stringValue ?? ""
                #expect(
                    detail.contains("api.max_event_streams_per_key") && detail.contains("2 event streams"),
                    "the problem names the limit: \(refused.json)")

                let elsewhere = try stream(other, seconds: 1)
                await exited(elsewhere.process)
                #expect(events(elsewhere.file) >= 1, "another key has streams of its own")

                // Closing one frees its place: the server notices at its next write, within one interval.
                held[0].process.terminate()
                await exited(held[0].process)
                try await sys.eventually(timeout: .seconds(10), "a closed stream's place is free again") {
                    let next = try stream(k, seconds: 1)
                    await exited(next.process)
                    return events(next.file) >= 1
                }
            }
        }
    }

    @Test func streamsOfANamespaceShareOneOverview() async throws {
        try await System.with { sys in
            let cache = OverviewCache()
            let store = sys.store
            let t0 = ContinuousClock.now
            try await withThrowingTaskGroup(of: JSONValue.self) { group in
                for _ in 0..<8 {
                    group.addTask { try await cache.overview(store, namespace: "a", maxAge: .seconds(30), now: t0) }
                }
                for try await overview in group { #expect(overview["runs_by_state"] != nil) }
            }
            #expect(cache.computed.withLock { $0 } == 1, "eight streams of one namespace, one computation")
            _ = try await cache.overview(store, namespace: "b", maxAge: .seconds(30), now: t0)
            _ = try await cache.overview(store, namespace: nil, maxAge: .seconds(30), now: t0)
            _ = try await cache.overview(store, namespace: "a", maxAge: .seconds(30), now: t0)
            #expect(cache.computed.withLock { $0 } == 3, "one per namespace (nil: every namespace)")
            _ = try await cache.overview(store, namespace: "a", maxAge: .seconds(30), now: t0 + .seconds(31))
            #expect(cache.computed.withLock { $0 } == 4, "past its interval it is computed again")
        }
    }

    @Test func hugeAndDeepBodiesAreRefusedBeforeDecoding() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .submitter, namespace: "default")
                let tenMB =
                    #"{"name": "x", "executor": "noop", "parameters": {"blob": ""#
                    + String(repeating: "a", count: 10_000_000) + #""}}"#
                let big = try await api.call("POST", "/v1/tasks", key: k, body: tenMB)
                #expect(big.status == 413)
                #expect(big.json["field"] == "body")
                let deep =
                    #"{"name": "x", "executor": "noop", "parameters": "# + String(repeating: #"{"a":"#, count: 100_000)
                    + "1" + String(repeating: "}", count: 100_000) + "}"
                let nested = try await api.call("POST", "/v1/tasks", key: k, body: deep)
                #expect(nested.status == 400, "deep nesting is refused, the server does not recurse into it")
                #expect(try await api.call("PATCH", "/v1/tasks/x", key: k, body: tenMB).status == 413)
                #expect(try await api.call("GET", "/healthz").status == 200, "and the server is still up")
            }
        }
    }
}

extension Sequence {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var out: [T] = []
        for e in self { out.append(try await transform(e)) }
        return out
    }
}
