import ConveyorAMQP
import ConveyorAPI
import ConveyorBroker
import ConveyorCore
import ConveyorDispatcher
import ConveyorHTTP
import ConveyorStore
import Foundation
import Logging
import Synchronization
import Testing

/// The adversarial suite (docs/security.md): each test is one attack from outside against real
/// processes and servers, and the refusal it must meet. The S-numbers are the rows of that page.
@Suite("Adversarial: hostile requests and messages (real PostgreSQL and RabbitMQ)", .serialized)
struct AdversarialTests {
    typealias Client = APITests.Client

    /// S1. `{"x": "", "tasks": []}` once crashed the API process (an empty batch indexed at 0).
    /// It is one task with an unknown field; the process keeps serving.
    @Test func s01_aBodyWithTasksBesideOtherKeysIsRefusedNotACrash() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .submitter, namespace: "default")
                for body in [#"{"x": "", "tasks": []}"#, #"{"tasks": [], "name": "a"}"#, #"{"tasks": "none"}"#] {
                    let r = try await api.call("POST", "/v1/tasks", key: k, body: body)
                    #expect(r.status == 400, "\(body) → \(r.status) \(r.json)")
                    #expect(r.json["field"] != nil, "the refusal names the field: \(r.json)")
                }
                let empty = try await api.call("POST", "/v1/tasks", key: k, body: #"{"tasks": []}"#)
                #expect(empty.status == 400 && empty.json["field"] == "tasks", "\(empty.json)")
                #expect(try await api.call("GET", "/healthz").status == 200)
                #expect(try await sys.count("SELECT count(*) FROM tasks") == 0)
            }
        }
    }

    /// S2. A NUL byte anywhere a request carries text (query parameter, path, body string or
    /// key) is a 400 naming the field, not a 500 from the database driver.
    @Test func s02_aNulByteInAnyTextIsA400NamingTheField() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let admin = try await APITests.key(sys, role: .admin, namespace: "*")
                let cases: [(method: String, path: String, body: String?, field: String)] = [
                    ("GET", "/v1/runs?task=%00abc", nil, "task"),
                    ("GET", "/v1/tasks?prefix=a%00", nil, "prefix"),
                    ("GET", "/v1/tasks/na%00me", nil, "path"),
                    ("POST", "/v1/keys", #"{"name": "a\u0000b", "role": "viewer", "namespace": "default"}"#, "name"),
                    (
                        "POST", "/v1/tasks", #"{"name": "t", "executor": "noop", "parameters": {"argv": ["x\u0000"]}}"#,
                        "parameters.argv[0]"
                    ),
                    (
                        "POST", "/v1/tasks", #"[{"name": "t", "executor": "noop", "labels": {"k\u0000": "v"}}]"#,
                        "[0].labels.k\u{FFFD}"
                    ),
                ]
                for c in cases {
                    let r = try await api.call(c.method, c.path, key: admin, body: c.body)
                    #expect(r.status == 400, "\(c.method) \(c.path) → \(r.status) \(r.json)")
                    #expect(r.json["field"] == .string(c.field), "\(c.method) \(c.path): \(r.json)")
                }
                #expect(try await sys.count("SELECT count(*) FROM tasks") == 0)
                #expect(try await sys.count("SELECT count(*) FROM api_keys WHERE name LIKE 'a%'") == 0)
            }
        }
    }

    /// S3. `/readyz` needs no key: it names the dependency that is down, never its error text
    /// (which carries the broker's address and user name).
    @Test func s03_readinessNamesTheDependencyNotItsErrorText() async throws {
        try await System.with { sys in
            let broker = AMQPConfiguration(url: "amqp://intruder-visible-user:secret@127.0.0.1:1/%2F")
            let port = Mutex(0)
            let api = APIService(host: "127.0.0.1", port: 0, store: sys.store, logger: Servers.logger, broker: broker) {
                p in port.withLock { $0 = p }
            }
            try await withServices([api]) {
                _ = try await sys.eventually(timeout: .seconds(10), "the API listens") { port.withLock { $0 } > 0 }
                var policy = OutboundPolicy()
                policy.allowedNetworks = [try Network(parsing: "127.0.0.1")]
                let client = Client(
                    base: "http://127.0.0.1:\(port.withLock { $0 })",
                    http: OutboundHTTP(policy: policy, logger: Servers.logger))
                let r = try await client.call("GET", "/readyz")
                #expect(r.status == 503)
                #expect(r.json["detail"] == "the broker is unreachable", "\(r.json)")
            }
        }
    }

    /// A forged status as an outsider sends it: the body (the issue's example: `finished`,
    /// `succeeded`, "FORGED" output, worker `evil-worker`; `proof` in the body as the old format
    /// had it) and the seal header, if any.
    struct Forgery {
        var body: [UInt8]
        var seal: String?
        var json: JSONValue {
            .object([
                "raw": .string(String(decoding: body, as: UTF8.self)), "seal": seal.map(JSONValue.string) ?? .null,
            ])
        }
    }

    static func forgedBody(_ runID: UUID, attempt: Int = 1, event: String = "finished", proofInBody: String? = nil)
        -> [UInt8]
    {
        var o: [String: JSONValue] = [
            "version": 1, "run_id": .string(runID.lowercasedString), "attempt": .number(Double(attempt)),
            "event": .string(event),
            "worker_id": "evil-worker", "at": .string(Timestamp.format(Date())),
        ]
        if event == "finished" {
            o["outcome"] = "succeeded"
            o["exit_code"] = 0
            o["output"] = "FORGED by an outsider"
        }
        if let proofInBody { o["proof"] = .string(proofInBody) }
        return JSONValue.object(o).jsonBytes
    }

    /// Every way S4 and S6 forge a status of run `id`, given the dispatchers' signer (which a
    /// forger does not have; the test uses it only to make what a forger could see or replay).
    static func forgeries(_ id: UUID, other: UUID, _ signer: StatusProof) -> [Forgery] {
        let finished = forgedBody(id)
        // What a listener on the status exchange sees of the real worker: a sealed `started`.
        let seen = forgedBody(id, event: "started")
        let seenSeal = StatusProof.seal(seen, proof: signer.sign(runID: id, attempt: 1))
        return [
            // the proof itself, no seal
            Forgery(body: forgedBody(id, proofInBody: signer.sign(runID: id, attempt: 1)), seal: nil),
            Forgery(body: finished, seal: "AAAAAAAAAAAAAAAAAAAAAA"),  // a random seal
            // another run's
            Forgery(body: finished, seal: StatusProof.seal(finished, proof: signer.sign(runID: other, attempt: 1))),
            // another attempt's
            Forgery(
                body: forgedBody(id, attempt: 2),
                seal: StatusProof.seal(forgedBody(id, attempt: 2), proof: signer.sign(runID: id, attempt: 1))),
            Forgery(body: finished, seal: seenSeal),  // a seal replayed from another body
        ]
    }

    /// Publishes `forgeries` to the status exchange with pika (another client than Conveyor's),
    /// each alone or, `batched`, 64 to a `conveyor.status-batch.v1` message; with `to`, each alone
    /// to that exchange and routing key as that message type (a task message, say).
    static func forge(
        _ sys: System, _ forgeries: [Forgery], batched: Bool = false,
        to: (exchange: String, routingKey: String, type: String)? = nil
    ) async throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("forged-\(UUID()).json")
        try Data(JSONValue.array(forgeries.map(\.json)).jsonBytes).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        let args =
            [
                FileManager.default.currentDirectoryPath + "/scripts/forge_status.py", "--url", sys.amqp.url,
                "--exchange", to?.exchange ?? ConveyorTopology(prefix: sys.prefix).statusExchange,
                "--statuses", file.path,
            ] + (batched ? ["--batch"] : [])
            + (to.map { ["--routing-key", $0.routingKey, "--type", $0.type] } ?? [])
        let r = try await runRequired("python3", args)
        try #require(r.status == 0, "pika could not publish: \(r.err)")
        #expect(r.out.trimmingCharacters(in: .whitespacesAndNewlines) == "\(forgeries.count)")
    }

    /// A status of attempt 1 of run `id`, sealed with that attempt's proof (what a worker holding
    /// the run's message can send): `finished`, `failed`, from `sealed-worker`, now, with `fields`
    /// over those.
    static func sealedStatus(_ id: UUID, _ signer: StatusProof, _ fields: [String: JSONValue] = [:]) -> Forgery {
        var o: [String: JSONValue] = [
            "version": 1, "run_id": .string(id.lowercasedString), "attempt": 1, "event": "finished",
            "outcome": "failed", "worker_id": "sealed-worker", "at": .string(Timestamp.format(Date())),
        ]
        o.merge(fields) { _, new in new }
        let body = JSONValue.object(o).jsonBytes
        return Forgery(body: body, seal: StatusProof.seal(body, proof: signer.sign(runID: id, attempt: 1)))
    }

    /// Creates `tasks` and waits until the running dispatcher has published each one's run (no
    /// worker consumes them); returns the runs' ids and the dispatchers' signer.
    static func dispatched(_ sys: System, _ tasks: [NewTask]) async throws -> (ids: [UUID], signer: StatusProof) {
        try await sys.store.createTasks(tasks)
        try await sys.eventually {
            try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == tasks.count
        }
        return (try await sys.store.runs(limit: 100).map(\.id), StatusProof(secret: try await sys.store.statusKey()))
    }

    /// S4. With the broker login, an outsider publishes `finished/succeeded` statuses for runs it
    /// does not hold: the proof in the body but no seal, a random seal, a seal made with another
    /// run's or another attempt's proof, and the seal of a `started` it saw, put on its own body.
    /// None changes a run; each is counted; then the real worker's statuses record every run
    /// once. Before status proofs, the first forgery alone ended every run. Batched, the same
    /// forgeries travel in status batches (Python's JSON, not Conveyor's): each is refused alone.
    @Test(arguments: [false, true])
    func s04_forgedStatusesChangeNothingAndTheRealOnesRecordOnce(batched: Bool) async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            try await withServices([dispatcher]) {
                try await sys.store.createTasks(sys.tasks(20))
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 20
                }
                let runs = try await sys.store.runs(limit: 100)
                let signer = StatusProof(secret: try await sys.store.statusKey())
                var bodies: [Forgery] = []
                for (i, r) in runs.enumerated() {
                    bodies += Self.forgeries(r.id, other: runs[(i + 1) % runs.count].id, signer)
                }
                try await Self.forge(sys, bodies, batched: batched)
                _ = try await sys.eventually(timeout: .seconds(20), "every forgery refused") {
                    dispatcher.stats.statusForged == bodies.count
                }
                #expect(dispatcher.stats.statusApplied == 0)
                #expect(
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 20,
                    "a forgery changed a run")
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM runs WHERE output LIKE 'FORGED%' OR worker_id = 'evil-worker'") == 0)

                let recorder = Recorder()
                _ = try await withServices([sys.worker(["record": RecordingExecutor(recorder: recorder)])]) {
                    try await sys.eventually {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 20
                    }
                }
                #expect(recorder.executions.withLock { $0.values.allSatisfy { $0 == 1 } && $0.count == 20 })
                #expect(dispatcher.stats.outcomesRecorded == 20)
            }
        }
    }

    /// A worker that holds the attempt's proof but reports an exit code PostgreSQL's `integer`
    /// cannot hold (broken or hostile: Conveyor's own worker sends such a code as null): the status
    /// is refused as malformed, naming `exit_code`, and the statuses beside it are recorded. Before
    /// the bound the database refused the whole batch, and the recorder retried it forever:
    /// nothing after it was recorded.
    @Test(arguments: [false, true])
    func aSealedStatusWithAnExitCodeNoColumnHoldsIsRefusedAndTheOthersRecorded(batched: Bool) async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            try await withServices([dispatcher]) {
                let (ids, signer) = try await Self.dispatched(sys, sys.tasks(3))
                try await Self.forge(
                    sys,
                    [
                        Self.sealedStatus(ids[0], signer, ["exit_code": 1_099_511_627_776]),
                        Self.sealedStatus(ids[1], signer, ["exit_code": 3]),
                        Self.sealedStatus(ids[2], signer, ["exit_code": 4]),
                    ],
                    batched: batched)
                try await sys.eventually(timeout: .seconds(20), "the two good statuses are recorded") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'failed'") == 2
                }
                #expect(
                    try await sys.count("SELECT count(*) FROM runs WHERE exit_code IN (3, 4)") == 2)
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM runs WHERE id = $1 AND state = 'dispatched'", [ids[0]]) == 1)
                #expect(dispatcher.stats.statusRejected == 1)
                #expect(dispatcher.stats.statusForged == 0)
            }
        }
    }

    /// Values PostgreSQL cannot store: a heartbeat, which needs no proof, dated `0000-01-01` (it
    /// has no year 0) or with a concurrency past `integer`, and sealed statuses (alone and
    /// batched) dated in year 0, published with pika, are refused as malformed naming the field,
    /// and the real work after them is recorded. Before, each was read, PostgreSQL refused the
    /// batch it came in (22008, 22003), and the recorder retried that batch forever: any holder of
    /// the broker login stopped every outcome with one heartbeat.
    @Test(arguments: [false, true])
    func valuesNoColumnHoldsAreRefusedNotABlockedRecorder(batched: Bool) async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            try await withServices([dispatcher]) {
                let (ids, signer) = try await Self.dispatched(sys, sys.tasks(2))
                let yearZero = "0000-01-01T00:00:00Z"
                try await Self.forge(
                    sys,
                    [
                        Self.sealedStatus(ids[0], signer, ["outcome": "succeeded", "at": .string(yearZero)]),
                        // One offset away from year 1 is year 0 too.
                        Self.sealedStatus(
                            ids[1], signer, ["event": "started", "outcome": .null, "at": "0001-01-01T00:30:00+01:00"]),
                    ],
                    batched: batched)
                func heartbeat(concurrency: Double, at: String) -> Forgery {
                    let body = JSONValue.object([
                        "version": 1, "worker_id": "anyone", "host": "h", "queues": .array([.string(sys.queue)]),
                        "executors": .array(["noop"]), "concurrency": .number(concurrency), "in_flight": .array([]),
                        "interval_seconds": 5, "at": .string(at),
                    ]).jsonBytes
                    return Forgery(body: body, seal: nil)
                }
                try await Self.forge(
                    sys,
                    [
                        heartbeat(concurrency: 1, at: yearZero),
                        heartbeat(concurrency: 1_099_511_627_776, at: Timestamp.format(Date())),
                    ],
                    to: (ConveyorTopology(prefix: sys.prefix).statusExchange, "status", heartbeatMessageType))
                _ = try await sys.eventually(timeout: .seconds(20), "all four refused") {
                    dispatcher.stats.statusRejected == 4
                }
                #expect(try await sys.count("SELECT count(*) FROM workers WHERE id = 'anyone'") == 0)
                let recorder = Recorder()
                _ = try await withServices([sys.worker(["record": RecordingExecutor(recorder: recorder)])]) {
                    try await sys.eventually(timeout: .seconds(20), "the real work is recorded") {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 2
                    }
                }
                #expect(try await sys.count("SELECT count(*) FROM runs WHERE worker_id = 'sealed-worker'") == 0)
            }
        }
    }

    /// Sealed statuses of six runs in one batch message, of which the database (a trigger the
    /// test installs) refuses one: the batch is recorded in parts, the refused status set aside
    /// and kept in `dead_letters`, the five others recorded. Then a refusal every status meets
    /// (the trigger refusing all): nothing is set aside, the batch waits unacknowledged, and once
    /// the cause is gone every status is recorded.
    @Test func aBatchTheDatabaseRefusesIsRecordedInPartsUnlessEveryStatusIsRefused() async throws {
        try await System.with { sys in
            // The switch is a table (pooled sessions would not see a new setting); the sequence
            // counts refusals (it advances even when the refusing transaction rolls back).
            _ = try await sys.rows("CREATE TABLE test_switch (refuse_all boolean NOT NULL)")
            _ = try await sys.rows("INSERT INTO test_switch VALUES (false)")
            _ = try await sys.rows("CREATE SEQUENCE test_refusals")
            _ = try await sys.rows(
                """
                CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.state = 'failed' AND ((SELECT refuse_all FROM test_switch) OR EXISTS (
                        SELECT 1 FROM tasks WHERE id = NEW.task_id AND name = 'poison'))
                    THEN
                        PERFORM nextval('test_refusals');
                        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'refused by the test';
                    END IF;
                    RETURN NEW;
                END $$
                """)
            _ = try await sys.rows(
                "CREATE TRIGGER test_refuse BEFORE UPDATE ON runs FOR EACH ROW EXECUTE FUNCTION test_refuse()")
            let dispatcher = sys.dispatcher()
            try await withServices([dispatcher]) {
                let (ids, signer) = try await Self.dispatched(
                    sys,
                    [try sys.task(["name": "poison"])] + (0..<5).map { try sys.task(["name": .string("good-\($0)")]) })
                func failed(_ id: UUID) -> Forgery { Self.sealedStatus(id, signer, ["exit_code": 7]) }
                try await Self.forge(sys, ids.map(failed), batched: true)
                try await sys.eventually(timeout: .seconds(20), "the five good ones are recorded") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'failed'") == 5
                }
                // Counted and kept after the commit that made the five visible: waited for.
                try await sys.eventually("the refused one is counted and kept") {
                    try await sys.count(
                        """
                        SELECT count(*) FROM dead_letters WHERE run_id IS NULL AND type = 'conveyor.status.v1'
                          AND reason LIKE 'refused_by_database: run %' AND body LIKE '%sealed-worker%'
                        """) == 1 && dispatcher.stats.statusRejected == 1
                }
                #expect(
                    try await sys.count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id
                        WHERE t.name = 'poison' AND r.state = 'dispatched'
                        """) == 1)

                // Every status refused: the database, not a status, is the cause.
                _ = try await sys.rows("UPDATE test_switch SET refuse_all = true")
                let refusals = try await sys.count("SELECT last_value FROM test_refusals")
                try await sys.store.createTasks(try (0..<4).map { try sys.task(["name": .string("later-\($0)")]) })
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 5
                }
                let later = try await sys.rows(
                    """
                    SELECT r.id FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name LIKE 'later-%'
                    """
                ).compactMap { $0[0].flatMap(UUID.init(uuidString:)) }
                try await Self.forge(sys, later.map(failed), batched: true)
                // Two rounds of the batch and its parts (11 refusals each), the second after a retry.
                try await sys.eventually(timeout: .seconds(20), "the recorder retried the whole batch") {
                    try await sys.count("SELECT last_value FROM test_refusals") >= refusals + 22
                }
                #expect(try await sys.count("SELECT count(*) FROM runs WHERE state = 'failed'") == 5)
                #expect(dispatcher.stats.statusRejected == 1, "nothing more set aside")
                _ = try await sys.rows("UPDATE test_switch SET refuse_all = false")
                try await sys.eventually(timeout: .seconds(30), "recorded once the cause is gone") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'failed'") == 9
                }
            }
        }
    }

    /// S5. A task message dead-lettered by an outsider (a body naming another run, without that
    /// attempt's proof) is kept, but ends no run.
    @Test func s05_aForgedDeadLetterEndsNoRun() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            try await withServices([dispatcher]) {
                try await sys.store.createTasks(sys.tasks(1))
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 1
                }
                let run = try #require(try await sys.store.runs(limit: 1).first)
                let topo = ConveyorTopology(prefix: sys.prefix)
                try await sys.withPublisher(topo.base) { pub, topo in
                    for proof in [nil, try await sys.proof(UUID())] as [String?] {
                        var body: [String: JSONValue] = [
                            "run_id": .string(run.id.lowercasedString), "attempt": 1, "version": 1,
                        ]
                        if let proof { body["proof"] = .string(proof) }
                        try await pub.publish(
                            AMQPOutgoingMessage(
                                exchange: topo.deadLetterExchange, routingKey: "",
                                body: JSONValue.object(body).jsonBytes,
                                properties: AMQPProperties(messageID: run.id.lowercasedString, type: taskMessageType)))
                    }
                }
                _ = try await sys.eventually(timeout: .seconds(20), "both dead letters kept") {
                    dispatcher.stats.deadLetters == 2
                }
                #expect(try await sys.count("SELECT count(*) FROM dead_letters WHERE run_id IS NULL") == 2)
                #expect(
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 1,
                    "a forged dead letter ended the run")
            }
        }
    }

    /// The proof and the seal are the HMACs docs/architecture.md ("Status proof") defines, as
    /// Python's `hmac` and `base64` compute them: a worker written in another language from the
    /// documentation seals statuses the dispatcher accepts, and Conveyor's own encoding cannot
    /// drift from RFC 4648 base64url unnoticed.
    @Test func proofsAndSealsAreTheDocumentedHMACs() async throws {
        let secret = (0..<32).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        let proof = StatusProof(secret: secret)
        let runID = UUID()
        for (attempt, body) in [(1, #"{"version":1,"event":"started"}"#), (7, #"{"output":"é ~~~ ???"}"#)] {
            let script = """
                import base64, hashlib, hmac, sys
                secret, run, attempt, body = bytes.fromhex(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].encode()
                text = lambda mac: base64.urlsafe_b64encode(mac[:16]).rstrip(b"=").decode()
                message = f"conveyor.status.v1\\n{run}\\n{attempt}".encode()
                proof = text(hmac.new(secret, message, hashlib.sha256).digest())
                print(proof, text(hmac.new(proof.encode(), body, hashlib.sha256).digest()))
                """
            let hex = secret.map { String(format: "%02x", $0) }.joined()
            let r = try await runRequired(
                "python3", ["-c", script, hex, runID.lowercasedString, String(attempt), body])
            #expect(r.status == 0, "\(r.err)")
            let words = r.out.split(separator: " ").map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
            let signed = proof.sign(runID: runID, attempt: attempt)
            #expect(words == [signed, StatusProof.seal(Array(body.utf8), proof: signed)], "python: \(r.out)")
            #expect(proof.check(seal: words.last, body: Array(body.utf8), runID: runID, attempt: attempt) == nil)
        }
    }

    /// S8. A heartbeat forged under an active worker's id with a tiny interval cannot get that
    /// worker declared lost faster than its own interval allows (its detached runs would be
    /// retried while they still run).
    @Test func s08_aForgedHeartbeatCannotShortenAWorkersLostBound() async throws {
        try await System.with { sys in
            func beat(_ seconds: Double) -> HeartbeatMessage {
                HeartbeatMessage(
                    workerID: "honest", host: "h", queues: [sys.queue], executors: ["noop"], concurrency: 1,
                    inFlight: [],
                    intervalSeconds: seconds)
            }
            try await sys.store.recordHeartbeats([beat(5)])
            try await sys.store.recordHeartbeats([beat(0.01)])  // the forgery
            #expect(
                try await sys.count("SELECT count(*) FROM workers WHERE id = 'honest' AND heartbeat_interval_ms = 5000")
                    == 1)
            #expect(
                try await sys.rows(
                    "UPDATE workers SET last_heartbeat = now() - interval '2 seconds' WHERE id = 'honest' RETURNING id"
                ).count == 1)
            #expect(
                try await sys.store.declareLostWorkers(missed: 3, heardFor: 3600).workers.isEmpty,
                "lost after 2 s though 3 intervals are 15 s")
            #expect(
                try await sys.rows(
                    "UPDATE workers SET last_heartbeat = now() - interval '16 seconds' WHERE id = 'honest' RETURNING id"
                ).count == 1)
            #expect(try await sys.store.declareLostWorkers(missed: 3, heardFor: 3600).workers == ["honest"])
            // The other way: one forged hour-long interval doubles the bound, no more.
            try await sys.store.recordHeartbeats([beat(5)])
            try await sys.store.recordHeartbeats([beat(5)])
            try await sys.store.recordHeartbeats([beat(3600)])
            #expect(
                try await sys.count(
                    "SELECT count(*) FROM workers WHERE id = 'honest' AND heartbeat_interval_ms = 10000") == 1)
        }
    }

    /// S4 at scale (the issue's measure): forgeries published with pika while a burst of N tasks
    /// runs on two workers: S4's five kinds, and validly sealed statuses of attempts that already
    /// finished (accepted, and they change nothing: a final state is never left). None is applied;
    /// every real run is recorded once. N is 1,000 in the test command;
    /// `CONVEYOR_ADVERSARIAL_N=10000` gives the measure in docs/security.md.
    @Test func s06_forgeriesDuringABurstApplyNothing() async throws {
        let n = Int(ProcessInfo.processInfo.environment["CONVEYOR_ADVERSARIAL_N"] ?? "") ?? 1000
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            let recorder = Recorder()
            let workers = (0..<2).map { _ in
                sys.worker(["record": RecordingExecutor(recorder: recorder, delay: .milliseconds(5))])
            }
            try await withServices([dispatcher] + workers) {
                try await sys.store.createTasks(sys.tasks(n))
                _ = try await sys.eventually(timeout: .seconds(120), "half the runs exist") {
                    try await sys.count("SELECT count(*) FROM runs") >= n / 2
                }
                let ids = try await sys.rows("SELECT id::text, state FROM runs ORDER BY id").compactMap { r in
                    r[0].flatMap(UUID.init(uuidString:)).map { ($0, r[1] ?? "") }
                }
                // (body, refused): random proofs and replayed ones are refused; a valid proof of an
                // attempt that already finished is accepted and changes nothing (a final state).
                let signer = StatusProof(secret: try await sys.store.statusKey())
                var forgeries: [(Forgery, Bool)] = []
                for (i, (id, state)) in ids.enumerated() {
                    forgeries += Self.forgeries(id, other: ids[(i + 1) % ids.count].0, signer).map { ($0, true) }
                    if state == "succeeded" {
                        let body = Self.forgedBody(id)
                        forgeries.append(
                            (
                                Forgery(
                                    body: body,
                                    seal: StatusProof.seal(body, proof: signer.sign(runID: id, attempt: 1))),
                                false
                            ))
                    }
                }
                forgeries = Array(forgeries.shuffled().prefix(n))
                let bodies = forgeries.map(\.0)
                let refused = forgeries.filter(\.1).count
                try await Self.forge(sys, bodies)
                _ = try await sys.eventually(timeout: .seconds(300), "every run succeeded") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == n
                }
                _ = try await sys.eventually(timeout: .seconds(60), "every forgery refused") {
                    dispatcher.stats.statusForged == refused
                }
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM runs WHERE output LIKE 'FORGED%' OR worker_id = 'evil-worker'") == 0)
                #expect(try await sys.count("SELECT count(*) FROM runs") == n, "a forgery made a retry")
                #expect(dispatcher.stats.outcomesRecorded == n)
                #expect(recorder.executions.withLock { $0.count == n && $0.values.allSatisfy { $0 == 1 } })
                Servers.logger.info(
                    """
                    S6: \(bodies.count) forged statuses during a burst of \(n); refused \
                    \(dispatcher.stats.statusForged), applied 0
                    """
                )
            }
        }
    }
}
