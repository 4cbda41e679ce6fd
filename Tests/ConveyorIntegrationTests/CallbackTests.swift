import ConveyorAPI
import ConveyorCore
import ConveyorDispatcher
import ConveyorHTTP
import ConveyorPostgres
import ConveyorStore
import ConveyorWorker
import Foundation
import Testing

/// Callbacks delivered by the dispatcher to a real HTTP server (docs/scheduling.md, "Callbacks").
@Suite(
    "Callbacks (real PostgreSQL, RabbitMQ and HTTP)",
    .enabled(if: Servers.available, Comment(rawValue: Servers.skipMessage)), .serialized)
struct CallbackTests {
    /// The dispatcher's callback settings for a receiver on loopback: quick backoff, loopback allowed.
    static func fast(_ c: inout DispatcherConfiguration, attempts: Int = 4, timeout: Duration = .seconds(5)) {
        c.callbacks.backoffBase = .milliseconds(100)
        c.callbacks.backoffCap = .milliseconds(200)
        c.callbacks.maxAttempts = attempts
        c.callbacks.timeout = timeout
        c.callbacks.policy.allowedNetworks = [try! Network(parsing: "127.0.0.0/8")]
    }

    @Test func outcomesArePostedAndRetriedUntilTheReceiverAccepts() async throws {
        // /flaky fails twice (503, then 500) before it accepts; /ok accepts at once.
        let receiver = try await HTTPReceiver { request, before in
            request.path == "/flaky" && before < 2 ? .init(status: before == 0 ? 503 : 500) : .init(status: 204)
        }
        defer { Task { await receiver.close() } }
        try await System.with { sys in
            let dispatcher = sys.dispatcher { Self.fast(&$0) }
            let worker = sys.worker(["script": ScriptedExecutor(recorder: Recorder())])
            try await withServices([dispatcher, worker]) {
                try await sys.store.createTasks([
                    try sys.task(["name": "ok", "callback_url": .string(receiver.url + "/ok")]),
                    try sys.task(["name": "flaky-receiver", "callback_url": .string(receiver.url + "/flaky")]),
                    try sys.task([
                        "name": "failing", "group": "cb", "callback_url": .string(receiver.url + "/ok"),
                        "parameters": .object(["fail": .bool(true)]),
                        "retry": .object([
                            "max_attempts": .number(2), "base_seconds": .number(0.1), "jitter": .bool(false),
                        ]),
                    ]),
                ])
                try await sys.eventually("all callbacks delivered") {
                    try await sys.count("SELECT count(*) FROM callbacks WHERE delivered_at IS NOT NULL") == 3
                }
                // One POST per final outcome: the failing task's first attempt was retried, so only its dead end is
                // posted.
                let ok = receiver.received(path: "/ok")
                #expect(ok.count == 2)
                #expect(receiver.received(path: "/flaky").count == 3)
                let bodies = try ok.map { try JSONDecoder().decode(JSONValue.self, from: Data($0.body.utf8)) }
                let states = Set(
                    bodies.compactMap { body -> String? in
                        if case .object(let o) = body, case .string(let s)? = o["state"] { return s }
                        return nil
                    })
                #expect(states == ["succeeded", "dead"])
                // Each POST carries one traceparent: a client span in its run's trace.
                let traces = Dictionary(
                    try await sys.rows("SELECT id::text, trace_id FROM runs").map { ($0[0] ?? "", $0[1] ?? "") },
                    uniquingKeysWith: { a, _ in a })
                for r in receiver.received() {
                    #expect(r.repeatedHeaders.isEmpty, "\(r.fields)")
                    let tp = r.headers["traceparent"]?.split(separator: "-").map(String.init) ?? []
                    #expect(
                        tp.count == 4 && tp[1] == traces[r.headers["idempotency-key"] ?? ""],
                        "the callback is in its run's trace: \(r.fields)")
                }
                for r in ok {
                    #expect(r.method == "POST")
                    #expect(r.headers["content-type"] == "application/json")
                    #expect(
                        r.body.contains("\"run_id\":\"\(r.headers["idempotency-key"] ?? "-")\""),
                        "Idempotency-Key is the run id")
                    #expect(r.body.contains("\"trace_id\":\""))
                }
                let flaky = try await sys.rows(
                    """
                    SELECT attempts, last_status FROM callbacks c JOIN runs r ON r.id = c.run_id JOIN tasks t ON t.id \
                    = r.task_id WHERE t.name = 'flaky-receiver'
                    """
                )
                #expect(flaky.first == ["3", "204"])
                #expect(receiver.received(path: "/flaky").map { $0.headers["x-conveyor-attempt"] } == ["1", "2", "3"])
                #expect(dispatcher.stats.callbacksDelivered == 3 && dispatcher.stats.callbacksRetried == 2)

                // conveyorctl shows a run's callbacks (through the API).
                let dead = try #require(
                    try await sys.rows(
                        """
                        SELECT r.id FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'failing' AND r.state \
                        = 'dead'
                        """
                    ).first?[0])
                try await APITests.withAPI(sys) { api, _ in
                    let key = try await APITests.key(sys, role: .viewer, namespace: "default")
                    let show = try CtlTests.ctl(
                        ["run", "get", dead], env: ["CONVEYOR_URL": api.base, "CONVEYOR_API_KEY": key])
                    #expect(
                        show.out.contains("callback      \(receiver.url)/ok delivered after 1 attempt(s) HTTP 204"),
                        "\(show.out)\(show.err)")
                    // The group's retries: the failing task's second attempt.
                    let group = try CtlTests.ctl(
                        ["group", "get", "cb"], env: ["CONVEYOR_URL": api.base, "CONVEYOR_API_KEY": key])
                    #expect(
                        group.out.range(of: #"cb\s+\d+\s+\d+\s+1\s"#, options: .regularExpression) != nil,
                        "\(group.out)\(group.err)")
                }
            }
        }
    }

    /// A dispatcher that dies mid-POST never records the attempt: the lease runs out and any
    /// dispatcher claims the callback again, as its next attempt.
    @Test func aLeasedCallbackIsClaimedAgainOnlyAfterItsLease() async throws {
        try await System.with { sys in
            let run = UUID()
            _ = try await sys.pool.withConnection { c in
                try await c.query(
                    "INSERT INTO callbacks (run_id, url, payload) VALUES ($1, 'https://example.com/hook', '{}')", [run])
            }
            let first = try await sys.store.claimCallbacks(limit: 10, lease: .milliseconds(800))
            #expect(first.map(\.runID) == [run] && first.first?.attempt == 1)
            #expect(
                try await sys.store.claimCallbacks(limit: 10, lease: .milliseconds(800)).isEmpty,
                "leased: nobody else takes it")
            // The lease is the database's time: claim until it has run out.
            var again: [CallbackDelivery] = []
            _ = try await sys.eventually(timeout: .seconds(10), "the callback is claimed again after its lease") {
                again = try await sys.store.claimCallbacks(limit: 10, lease: .seconds(30))
                return !again.isEmpty
            }
            #expect(again.map(\.id) == first.map(\.id) && again.first?.attempt == 2)
            try await sys.store.finishCallbacks([(again[0].id, .delivered(status: 200))])
            #expect(
                try await sys.store.claimCallbacks(limit: 10, lease: .zero).isEmpty,
                "a delivered callback is never claimed")
        }
    }

    @Test func aReceiverThatNeverAnswersNeitherBlocksRecordingNorIsRetriedForever() async throws {
        // Every request hangs for longer than the attempt timeout.
        let receiver = try await HTTPReceiver { _, _ in .init(status: 200, delay: .seconds(30)) }
        defer { Task { await receiver.close() } }
        try await System.with { sys in
            let dispatcher = sys.dispatcher { Self.fast(&$0, attempts: 2, timeout: .milliseconds(500)) }
            let worker = sys.worker(["script": ScriptedExecutor(recorder: Recorder())])
            try await withServices([dispatcher, worker]) {
                try await sys.store.createTasks(
                    try (0..<20).map { i in
                        try sys.task(["name": .string("hung-\(i)"), "callback_url": .string(receiver.url + "/hang")])
                    })
                // Status recording goes on while the POSTs hang: all 20 runs end succeeded.
                try await sys.eventually(timeout: .seconds(20), "all runs recorded") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 20
                }
                try await sys.eventually(timeout: .seconds(30), "callbacks given up after two timed-out attempts") {
                    try await sys.count("SELECT count(*) FROM callbacks WHERE failed_at IS NOT NULL") == 20
                }
                let rows = try await sys.rows(
                    "SELECT DISTINCT attempts, last_error LIKE '%timed out%gave up after 2 attempts%' FROM callbacks")
                #expect(rows == [["2", "t"]])
                #expect(receiver.received(path: "/hang").count == 40)
            }
        }
    }

    @Test func aRefusedAddressIsGivenUpAtOnceWithTheReason() async throws {
        let receiver = try await HTTPReceiver()
        defer { Task { await receiver.close() } }
        try await System.with { sys in
            // Loopback is not allowed here: the default policy refuses it.
            let dispatcher = sys.dispatcher { c in
                Self.fast(&c)
                c.callbacks.policy.allowedNetworks = []
            }
            let worker = sys.worker(["script": ScriptedExecutor(recorder: Recorder())])
            try await withServices([dispatcher, worker]) {
                try await sys.store.createTasks([
                    try sys.task(["name": "to-loopback", "callback_url": .string(receiver.url + "/x")]),
                    try sys.task([
                        "name": "to-metadata", "callback_url": .string("http://169.254.169.254/latest/meta-data"),
                    ]),
                ])
                try await sys.eventually("both refused") {
                    try await sys.count("SELECT count(*) FROM callbacks WHERE failed_at IS NOT NULL") == 2
                }
                let errors = try await sys.rows(
                    """
                    SELECT t.name, c.attempts, c.last_error FROM callbacks c JOIN runs r ON r.id = c.run_id JOIN \
                    tasks t ON t.id = r.task_id ORDER BY t.name
                    """
                )
                #expect(errors.map { $0[1] } == ["1", "1"], "a refusal is not retried")
                #expect(errors[0][2]?.contains("127.0.0.1 is a loopback address") == true)
                #expect(errors[1][2]?.contains("169.254.169.254 is a metadata address") == true)
                #expect(receiver.received().isEmpty)
                let run = try #require(
                    try await sys.rows("SELECT c.run_id FROM callbacks c LIMIT 1").first?[0].flatMap(
                        UUID.init(uuidString:)))
                #expect(try await sys.store.callbacks(run: run).first?.state == "failed")
            }
        }
    }
}
