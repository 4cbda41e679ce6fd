import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorFaults
import ConveyorPostgres
import ConveyorStore
import Foundation
import Testing

/// The fault suite (issue 8, docs/reliability.md): each scenario runs real dispatcher and worker
/// processes against the suite's own PostgreSQL and RabbitMQ, injects one kind of fault, waits
/// until the system is quiet and asks the oracle (`FaultBed.oracle`). Run it with
/// `scripts/faults.sh` (fast profile; `--full` for the full one).
@Suite("FaultSuite", .enabled(if: FaultProfile.enabled, "run by scripts/faults.sh (its own servers)"), .serialized)
struct FaultSuite {
    /// Two dispatchers and `workers` workers (8 runs at once each).
    static func fleet(_ bed: FaultBed, workers: Int = 3, concurrency: Int = 8, workerEnv: [String: String] = [:]) throws
    {
        try bed.startDispatcher("d1")
        try bed.startDispatcher("d2")
        for i in 1...workers { try bed.startWorker("w\(i)", concurrency: concurrency, env: workerEnv) }
    }

    // MARK: 0. negative control

    /// Publisher confirms off (test-only switch), and the broker frozen (SIGSTOP) mid-burst, then
    /// killed: what the dispatcher wrote to its socket meanwhile never reached the broker's disk.
    /// The oracle must report that loss, or it could not see loss at all. (Scenario 4 does the
    /// same kill with confirms on, and loses nothing.)
    @Test func negativeControlOracleSeesLossWithoutConfirms() async throws {
        let n = FaultProfile.n(fast: 20_000, full: 50_000)
        try await FaultBed.scenario("negative-control", "0 negative control", n: n) { bed, report in
            let port = try FaultBed.freePort()
            try bed.startDispatcher(
                "d1",
                env: ["CONVEYOR_TEST_FAULTS": "no-confirms", "CONVEYOR_DISPATCHER_MAX_BACKLOG_PER_QUEUE": "1000000"],
                httpPort: port)
            try await bed.until("dispatcher ready", timeout: .seconds(30), &report) {
                await FaultBed.allReady([port])
            }
            try await FaultBed.persistQueueRegistrations()
            try await bed.create(bed.sys.tasks(n, executor: "noop"))
            try await bed.until("some dispatched", timeout: .seconds(60), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") >= n / 10
            }
            try await FaultBed.freezeThenKillBroker()
            try await FaultBed.services(["start"])
            try bed.startWorker("w1", concurrency: 64)
            try bed.startWorker("w2", concurrency: 64)
            // Give the system every chance to finish what it can.
            try await bed.waitQuiet(timeout: .seconds(40))
            report.counts = try await bed.oracle()
            let states = report.counts.states.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }
            report.notes.append("states \(states.joined(separator: ", "))")
            report.require(report.counts.lost > 0, "the oracle saw no loss with confirms off")
            // And it sees a recording moved backwards, then recorded again, in later transactions.
            try await bed.sys.pool.withConnection { c in
                try await c.simple(
                    """
                    UPDATE runs SET state = 'running' WHERE id = (SELECT id FROM runs WHERE state = 'succeeded' LIMIT \
                    1)
                    """
                )
                try await c.simple("UPDATE runs SET state = 'failed', exit_code = 1 WHERE state = 'running'")
            }
            let tampered = try await bed.oracle().doubleRecorded
            report.require(
                tampered == 1, "the oracle counted \(tampered) for one run moved back and recorded again, not 1")
            report.notes.append("tampering seen: double-recorded \(tampered)")
        }
    }

    // MARK: 1. kill -9 workers

    @Test func s01KillWorkersEveryFewSeconds() async throws {
        let n = FaultProfile.n(fast: 1500, full: 10_000)
        try await FaultBed.scenario("kill-workers", "1 kill -9 workers", n: n) { bed, report in
            try Self.fleet(bed)
            try await bed.create(bed.sinkTasks(n, ms: 200))
            var killed = 0
            let began = ContinuousClock.now
            while try await bed.unfinished() > 0, ContinuousClock.now - began < .seconds(300) {
                try await Task.sleep(for: .seconds(2))
                let victim = "w\(killed % 3 + 1)"
                await bed.kill9(victim)
                killed += 1
                try bed.startWorker(victim)
            }
            report.counts = try await bed.oracle()
            report.standard()
            report.notes.append("\(killed) kills")
            // A killed worker holds at most its prefetch of unacknowledged runs: 8 from the work
            // queue and 1 from the isolation lane.
            report.require(
                report.counts.duplicateExecutions <= killed * 9,
                """
                repeated executions \(report.counts.duplicateExecutions) > killed workers' in-flight bound \
                \(killed * 9)
                """
            )
            report.require(killed >= 3, "only \(killed) kills")
        }
    }

    // MARK: 2. SIGSTOP past the heartbeat timeout

    @Test func s02StoppedWorkerPastHeartbeat() async throws {
        let n = FaultProfile.n(fast: 40, full: 400)
        try await FaultBed.scenario("sigstop", "2 SIGSTOP worker", n: n) { bed, report in
            try Self.fleet(bed, workers: 2)
            try await bed.create(bed.sinkTasks(n, ms: 2000))
            try await bed.until("w1 runs some", timeout: .seconds(30), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'running' AND worker_id = 'w1'") >= 4
            }
            let held = try await bed.count("SELECT count(*) FROM runs WHERE state = 'running' AND worker_id = 'w1'")
            bed.signal("w1", SIGSTOP)
            let stopped = ContinuousClock.now
            // Broker heartbeat 2 s: the connection is dropped after about 4-6 s; stay stopped 10 s.
            try await Task.sleep(for: .seconds(10))
            bed.signal("w1", SIGCONT)
            let quiet = try await bed.waitQuiet(timeout: .seconds(90))
            report.recovery = quiet.map { $0 - stopped }
            try await Task.sleep(for: .seconds(2))  // the late results arrive and must change nothing
            report.counts = try await bed.oracle()
            report.standard()
            report.require(bed.isRunning("w1"), "the resumed worker exited")
            try await bed.until("w1 active again (rejoined)", timeout: .seconds(20), &report) {
                try await bed.count("SELECT count(*) FROM workers WHERE id = 'w1' AND state = 'active'") == 1
            }
            report.require(report.counts.duplicateExecutions <= held + 8, "repeated executions beyond what w1 held")
            report.notes.append("w1 held \(held)")
        }
    }

    // MARK: 3. a worker cut off the broker

    /// A worker in its own network namespace, whose traffic is dropped for a minute (its sockets
    /// stay open: nothing tells it), then let through again.
    @Test func s03WorkerPartitionedFromTheBroker() async throws {
        let n = FaultProfile.n(fast: 300, full: 3000)
        let ns = "cvf\(Int.random(in: 100...999))"
        try await Netns.create(ns)
        do {
            try await partition(ns: ns, n: n)
        } catch {
            await Netns.delete(ns)
            throw error
        }
        await Netns.delete(ns)
    }

    func partition(ns: String, n: Int) async throws {
        try await FaultBed.scenario("partition", "3 worker partitioned", n: n, sinkHost: Netns.hostAddress) {
            bed, report in
            try bed.startDispatcher("d1")
            try bed.startDispatcher("d2")
            try bed.startWorker("w1")
            try bed.startWorker("w2")
            // The worker's own login (not loopback-only, unlike `guest`), to the host's address
            // as the namespace sees it.
            let workerURL = bed.sys.workerAMQPURL.replacingOccurrences(
                of: "@127.0.0.1:", with: "@\(Netns.hostAddress):")
            try bed.startWorker(
                "cut", env: ["CONVEYOR_AMQP_URL": workerURL],
                wrapper: [try Requirements.program("ip"), "netns", "exec", ns])
            try await bed.until("the namespaced worker joins", timeout: .seconds(30), &report) {
                try await bed.count("SELECT count(*) FROM workers WHERE id = 'cut' AND state = 'active'") == 1
            }
            try await bed.create(bed.sinkTasks(n, ms: 1000))
            try await bed.until("the namespaced worker runs some", timeout: .seconds(30), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'running' AND worker_id = 'cut'") >= 4
            }
            let held = try await bed.count("SELECT count(*) FROM runs WHERE state = 'running' AND worker_id = 'cut'")
            try await Netns.drop(ns, true)
            let cut = ContinuousClock.now
            try await Task.sleep(for: FaultProfile.full ? .seconds(60) : .seconds(30))
            let declaredLost = try await bed.count("SELECT count(*) FROM workers WHERE id = 'cut' AND state = 'lost'")
            try await Netns.drop(ns, false)
            let healed = ContinuousClock.now
            let rejoined = try await bed.until("the worker rejoins after the heal", timeout: .seconds(30), &report) {
                try await bed.count(
                    """
                    SELECT count(*) FROM workers WHERE id = 'cut' AND state = 'active' AND last_heartbeat > now() - \
                    interval '2 seconds'
                    """
                ) == 1
            }
            report.recovery = ContinuousClock.now - healed
            try await bed.waitQuiet(timeout: .seconds(120))
            report.counts = try await bed.oracle()
            report.standard()
            report.require(declaredLost == 1, "the cut worker was not declared lost during the cut")
            report.require(rejoined, "the cut worker did not rejoin")
            report.require(bed.isRunning("cut"), "the cut worker exited")
            report.require(
                report.counts.duplicateExecutions <= held + 8, "repeated executions beyond what the cut worker held")
            report.notes.append("cut held \(held); partition \(Int((healed - cut).inSeconds)) s")
        }
    }

    // MARK: 4. broker restart mid-burst

    enum BrokerRestart: String, CaseIterable, Sendable {
        case stopApp = "stop_app"
        case killVM = "kill-vm"
        /// The negative control's fault with confirms on: frozen (SIGSTOP) 2 s, then killed.
        case freezeAndKill = "freeze-kill"
    }

    @Test(arguments: BrokerRestart.allCases)
    func s04BrokerRestartMidBurst(_ how: BrokerRestart) async throws {
        let n = FaultProfile.n(fast: 3000, full: 10_000)
        try await FaultBed.scenario("broker-\(how.rawValue)", "4 broker \(how.rawValue)", n: n) { bed, report in
            let ports = try (0..<5).map { _ in try FaultBed.freePort() }
            try bed.startDispatcher("d1", httpPort: ports[0])
            try bed.startDispatcher("d2", httpPort: ports[1])
            for i in 1...3 { try bed.startWorker("w\(i)", concurrency: 16, httpPort: ports[1 + i]) }
            try await bed.until("every process ready", timeout: .seconds(30), &report) {
                await FaultBed.allReady(ports)
            }
            try await FaultBed.persistQueueRegistrations()
            try await bed.create(bed.sinkTasks(n, ms: 20))
            try await bed.until("30 % dispatched", timeout: .seconds(60), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state IN ('dispatched', 'running', 'succeeded')")
                    >= n * 3 / 10
            }
            switch how {
            case .stopApp: try await FaultBed.rabbitmqctl(["stop_app"])
            case .killVM: try await FaultBed.killBroker()
            case .freezeAndKill: try await FaultBed.freezeThenKillBroker()
            }
            try await Task.sleep(for: .seconds(3))
            switch how {
            case .stopApp:
                try await FaultBed.rabbitmqctl(["start_app"])
                try await FaultBed.rabbitmqctl(["await_startup", "--timeout", "30"])
            case .killVM, .freezeAndKill: try await FaultBed.services(["start"])
            }
            let reopened = ContinuousClock.now
            let allReady = try await bed.until("every process ready again", timeout: .seconds(30), &report) {
                await FaultBed.allReady(ports)
            }
            report.recovery = allReady ? ContinuousClock.now - reopened : nil
            try await bed.waitQuiet(timeout: .seconds(120))
            report.counts = try await bed.oracle()
            report.standard()
            report.require((report.recovery ?? .seconds(99)) <= .seconds(5), "reconnect took longer than 5 s")
        }
    }

    // MARK: 5. PostgreSQL immediate restart

    @Test func s05PostgresImmediateRestart() async throws {
        let n = FaultProfile.n(fast: 2000, full: 10_000)
        try await FaultBed.scenario("pg-restart", "5 postgres restart", n: n) { bed, report in
            try Self.fleet(bed, concurrency: 16)
            let apiPort = try await bed.startAPI(&report)
            try await bed.create(bed.sinkTasks(n, ms: 20))
            try await bed.until("30 % done", timeout: .seconds(60), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") >= n * 3 / 10
            }
            // Watch the API's readiness while the database is down.
            async let answers: Set<Int> = {
                var seen = Set<Int>()
                let end = ContinuousClock.now + .seconds(6)
                while ContinuousClock.now < end {
                    seen.insert(await FaultBed.httpStatus(port: apiPort) ?? 0)
                    try? await Task.sleep(for: .milliseconds(20))
                }
                return seen
            }()
            try await Task.sleep(for: .milliseconds(200))
            let (status, out) = try await FaultBed.services(["pg-crash"])
            report.require(status == 0, "pg_ctl restart failed: \(out)")
            let restarted = ContinuousClock.now
            let before = try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'")
            try await bed.until("progress after the restart", timeout: .seconds(30), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") > before + 50
            }
            report.recovery = ContinuousClock.now - restarted
            let seen = await answers
            try await bed.waitQuiet(timeout: .seconds(120))
            report.counts = try await bed.oracle()
            report.standard()
            report.require((report.recovery ?? .seconds(99)) < .seconds(10), "recovery took 10 s or more")
            report.notes.append("api readiness answers seen: \(seen.sorted())")
            report.require(seen.contains(503), "the API never answered 503 while the database was down")
        }
    }

    // MARK: 6. dispatcher crash points

    @Test(arguments: FaultInjection.CrashPoint.allCases)
    func s06DispatcherCrashPoint(_ point: FaultInjection.CrashPoint) async throws {
        let n = FaultProfile.n(fast: 600, full: 10_000)
        try await FaultBed.scenario("dispatcher-\(point.rawValue)", "6 dispatcher \(point.rawValue)", n: n) {
            bed, report in
            for i in 1...3 { try bed.startWorker("w\(i)", concurrency: 16) }
            try bed.startDispatcher("doomed", env: ["CONVEYOR_TEST_FAULTS": "dispatcher-crash=\(point.rawValue)"])
            try bed.startDispatcher("survivor")
            try await Task.sleep(for: .seconds(2))
            // The survivor is paused while the tasks arrive, so the doomed one claims them (it
            // would otherwise be a race); it resumes the moment the doomed one dies.
            bed.signal("survivor", SIGSTOP)
            try await bed.create(bed.sinkTasks(n, ms: 10))
            let crashed = try await bed.until(
                "the doomed dispatcher reaches its crash point", timeout: .seconds(20), &report
            ) {
                !bed.isRunning("doomed")
            }
            let died = ContinuousClock.now
            // What the dead dispatcher held: the runs it claimed (`queued`, under its lease; the
            // survivor was paused, so every queued run is its). Runs still waiting as `scheduled`
            // for broker room are not a takeover, just the backlog.
            let heldIDs = try await bed.rows("SELECT id::text FROM runs WHERE state = 'queued'").compactMap { $0[0] }
            let held = heldIDs.count
            bed.signal("survivor", SIGCONT)
            report.require(crashed && bed.exitStatus("doomed") == 128 + SIGKILL, "the crash point was not reached")
            report.require(held > 0, "the dead dispatcher held no claimed run")
            // Taken over: every run the dead dispatcher held has been published again (or, after
            // its confirm, started by a worker).
            try await bed.until("every run the dead dispatcher held is published", timeout: .seconds(30), &report) {
                try await bed.count(
                    "SELECT count(*) FROM runs WHERE id = ANY($1::uuid[]) AND state = 'queued'", [heldIDs]) == 0
            }
            report.notes.append("the dead dispatcher held \(held) claimed runs")
            report.recovery = ContinuousClock.now - died
            try await bed.waitQuiet(timeout: .seconds(120))
            report.counts = try await bed.oracle()
            report.standard()
            // Lease 3 s + scan 0.2 s, plus a second for the publish itself.
            report.require(
                (report.recovery ?? .seconds(99)) <= .milliseconds(4200),
                "takeover slower than lease + one scan interval")
            // Only a run published by both dispatchers may run twice: at most what the dead one held.
            report.require(
                report.counts.duplicateExecutions <= held,
                "repeated executions \(report.counts.duplicateExecutions) > the \(held) runs the dead dispatcher held")
        }
    }

    // MARK: 7. poison messages

    @Test func s07PoisonMessages() async throws {
        let good = FaultProfile.n(fast: 1000, full: 10_000)
        let perKind = max(2, good / 600)
        try await FaultBed.scenario("poison", "7 poison", n: good + 6 * perKind) { bed, report in
            try Self.fleet(bed)
            let pids = (1...3).map { bed.pid("w\($0)") }
            // Runs whose real messages go to a queue nobody consumes ("parked"): the test sends
            // its own, broken, messages for them to the work queue.
            var parked = bed.sinkTasks(3 * perKind, name: "parked")
            for i in parked.indices { parked[i].queue = "parked" }
            try await bed.create(parked)
            try await bed.until("parked runs dispatched", timeout: .seconds(30), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'dispatched' AND queue = 'parked'")
                    == parked.count
            }
            let rows = try await bed.rows(
                """
                SELECT r.id::text, t.id::text, t.name, r.occurrence::text, t.parameters::text FROM runs r JOIN tasks t
                    ON t.id = r.task_id
                WHERE r.queue = 'parked' ORDER BY t.name
                """)
            // The test plays the dispatcher for these runs, so it signs their messages as one would.
            let signer = StatusProof(secret: try await bed.sys.store.statusKey())
            func message(_ row: [String?]) throws -> TaskMessage {
                let params = try JSONDecoder().decode(JSONValue.self, from: Data((row[4] ?? "{}").utf8))
                var m = TaskMessage(
                    runID: UUID(uuidString: row[0]!)!, taskID: UUID(uuidString: row[1]!)!, taskName: row[2]!,
                    occurrence: Date(), attempt: 1, queue: bed.sys.queue, executor: "http", parameters: params,
                    timeoutSeconds: 30)
                m.proof = signer.sign(runID: m.runID, attempt: 1)
                return m
            }
            try await bed.create(bed.sinkTasks(good, ms: 5, name: "good"))
            try await bed.create(bed.sys.tasks(perKind, executor: "no-such-executor", name: "unknown"))
            var poison = perKind
            var identifiable = perKind  // the unknown-executor runs
            try await bed.sys.withPublisher(ConveyorTopology(prefix: bed.sys.prefix).work(queues: [bed.sys.queue])) {
                pub, topo in
                func send(_ body: [UInt8], headers: AMQPHeaders = [:]) async throws {
                    try await pub.publish(
                        AMQPOutgoingMessage(
                            exchange: topo.tasksExchange, routingKey: bed.sys.queue, body: body,
                            properties: AMQPProperties(type: taskMessageType, persistent: true, headers: headers)))
                }
                for i in 0..<perKind {
                    try await send(Array("{not json \(i)".utf8))
                    poison += 1
                    try await send([0xFF, 0xFE, 0x7B, 0x22, UInt8(i % 200)])
                    poison += 1
                    try await send(
                        Array("{\"pad\": \"".utf8)
                            + Array(repeating: UInt8(ascii: "x"), count: MessageCodec.maxBodyBytes) + Array("\"}".utf8))
                    poison += 1
                    var v99 = try message(rows[i])
                    v99.version = 99
                    try await send(MessageCodec.encode(v99))
                    poison += 1
                    identifiable += 1
                    // A broken traceparent is not poison: W3C Trace Context says to ignore it, so the
                    // run executes under a new trace.
                    try await send(
                        MessageCodec.encode(try message(rows[perKind + i])),
                        headers: ["traceparent": .string("00-zz-not-a-trace-01")])
                }
                // The rest of the parked runs get their proper message.
                for i in (2 * perKind)..<(3 * perKind) { try await send(MessageCodec.encode(try message(rows[i]))) }
            }
            try await bed.waitQuiet(timeout: .seconds(120))
            try await bed.until("every poison message dead-lettered", timeout: .seconds(20), &report) {
                try await bed.count("SELECT count(*) FROM dead_letters") >= poison
            }
            report.counts = try await bed.oracle()
            report.standard(deadLettered: poison)
            report.require(
                report.counts.dead == identifiable, "dead runs \(report.counts.dead), expected \(identifiable)")
            let reasons = try await bed.count("SELECT count(*) FROM dead_letters WHERE reason <> ''")
            report.require(reasons == poison, "dead letters with a reason: \(reasons)")
            let succeeded = try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'")
            report.require(succeeded == good + 2 * perKind, "succeeded \(succeeded), expected \(good + 2 * perKind)")
            report.require(
                zip(1...3, pids).allSatisfy { bed.isRunning("w\($0)") && bed.pid("w\($0)") == $1 },
                "a worker restarted or exited")
        }
    }

    // MARK: 8. a task that crashes its worker

    /// One task's executor kills the worker process (test switch `worker-crash-on-task`); a
    /// supervisor restarts each worker at once, as Kubernetes would.
    @Test func s08TaskThatCrashesTheWorker() async throws {
        let n = FaultProfile.n(fast: 600, full: 5000)
        try await FaultBed.scenario("crasher", "8 worker-crashing task", n: n + 1) { bed, report in
            let crash = ["CONVEYOR_TEST_FAULTS": "worker-crash-on-task=crasher-0"]
            try Self.fleet(bed, workerEnv: crash)
            try await bed.create(bed.sinkTasks(n / 2, ms: 200, name: "before"))
            try await bed.create(bed.sinkTasks(1, ms: 200, name: "crasher"))
            try await bed.create(bed.sinkTasks(n - n / 2, ms: 200, name: "after"))
            var restarts = 0
            let began = ContinuousClock.now
            while try await bed.unfinished() > 0, ContinuousClock.now - began < .seconds(180) {
                for i in 1...3 where !bed.isRunning("w\(i)") {
                    restarts += 1
                    try bed.startWorker("w\(i)", env: crash)
                }
                try await Task.sleep(for: .milliseconds(300))
            }
            report.counts = try await bed.oracle()
            // The crasher alone is dead-lettered: redelivered messages go through the isolation
            // lane one at a time, so its neighbours never reach the delivery limit with it.
            report.standard(deadLettered: 1)
            let crasher = try await bed.rows(
                """
                SELECT r.state, coalesce(r.reason, '') FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = \
                'crasher-0'
                """
            )
            report.require(
                crasher.first?[0] == "dead", "the crashing task's run is \(crasher.first?[0] ?? "missing"), not dead")
            let innocentsNotSucceeded = try await bed.count(
                """
                SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name <> 'crasher-0' AND r.state \
                <> 'succeeded'
                """
            )
            report.require(innocentsNotSucceeded == 0, "\(innocentsNotSucceeded) innocent runs did not succeed")
            let isolated = try await bed.count("SELECT count(*) FROM dead_letters WHERE source LIKE '%.isolated.%'")
            report.require(
                isolated == 1, "\(isolated) dead letters came from the isolation lane, expected the crasher alone")
            report.notes.append("\(restarts) worker restarts; crasher: \(crasher.first?[1] ?? "")")
        }
    }

    // MARK: 9. duplicate and reordered statuses

    @Test func s09DuplicateAndReorderedStatuses() async throws {
        let n = FaultProfile.n(fast: 1000, full: 10_000)
        try await FaultBed.scenario("statuses", "9 duplicate statuses", n: n) { bed, report in
            // No worker: the test is the worker, and says everything twice in a shuffled order.
            // So every run must reach the broker: no backlog bound holds them in PostgreSQL.
            let unbounded = ["CONVEYOR_DISPATCHER_MAX_BACKLOG_PER_QUEUE": "\(n)"]
            try bed.startDispatcher("d1", env: unbounded)
            try bed.startDispatcher("d2", env: unbounded)
            try await bed.create(bed.sys.tasks(n, executor: "noop"))
            try await bed.until("all dispatched", timeout: .seconds(60), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == n
            }
            let ids = try await bed.rows("SELECT id::text FROM runs").compactMap {
                $0[0].flatMap(UUID.init(uuidString:))
            }
            let t0 = Date()
            var statuses: [StatusMessage] = []
            for (i, id) in ids.enumerated() {
                let outcome: Outcome = i % 3 == 0 ? .failed : .succeeded
                let started = StatusMessage(runID: id, attempt: 1, event: .started, workerID: "w-real", at: t0)
                let finished = StatusMessage(
                    runID: id, attempt: 1, event: .finished, outcome: outcome, exitCode: outcome == .failed ? 1 : 0,
                    workerID: "w-real", at: t0.addingTimeInterval(1))
                statuses += [started, started, finished, finished]
            }
            statuses = try await bed.sys.signed(statuses)
            statuses.shuffle()
            let results = try await bed.sys.withPublisher(ConveyorTopology(prefix: bed.sys.prefix).status) {
                pub, topo in
                await pub.publish(statuses.map { sealedStatus($0, exchange: topo.statusExchange, persistent: true) })
            }
            report.require(
                results.allSatisfy { if case .success = $0 { true } else { false } }, "a status publish failed")
            try await bed.waitQuiet(timeout: .seconds(60))
            try await Task.sleep(for: .seconds(1))
            report.counts = try await bed.oracle()
            report.standard()
            let attempts = try await bed.count("SELECT count(*) FROM runs WHERE attempt <> 1")
            report.require(attempts == 0, "\(attempts) runs with another attempt")
            let failed = try await bed.count("SELECT count(*) FROM runs WHERE state = 'failed'")
            report.require(failed == (n + 2) / 3, "failed \(failed), expected \((n + 2) / 3)")
        }
    }

    // MARK: 10. retries

    @Test func s10RetriesWithBackoff() async throws {
        let n = FaultProfile.n(fast: 60, full: 1000)
        let k = 2
        try await FaultBed.scenario("retries", "10 retries", n: n) { bed, report in
            try Self.fleet(bed, workers: 2)
            // Half succeed on attempt k + 1; half are allowed only k attempts and end dead.
            var tasks =
                bed.sinkTasks(n / 2, name: "recovers", query: "fail=\(k)", maxAttempts: k + 1)
                + bed.sinkTasks(n / 2, name: "gives-up", query: "fail=\(k)", maxAttempts: k)
            for i in tasks.indices {
                tasks[i].retry.baseSeconds = 0.5
                tasks[i].retry.factor = 2
                tasks[i].retry.capSeconds = 10
            }
            try await bed.create(tasks)
            try await bed.waitQuiet(timeout: .seconds(120))
            try await Task.sleep(for: .seconds(2))  // anything republished after the end would show now
            report.counts = try await bed.oracle()
            report.standard()
            let recovered = try await bed.count(
                """
                SELECT count(*) FROM tasks t WHERE t.name LIKE 'recovers-%'
                AND (SELECT count(*) FROM runs r WHERE r.task_id = t.id) = \(k + 1)
                AND EXISTS (SELECT 1 FROM runs r WHERE r.task_id = t.id AND r.attempt = \(k + 1) AND r.state =
                    'succeeded')
                """)
            report.require(
                recovered == n / 2, "tasks with exactly k + 1 attempts ending succeeded: \(recovered) of \(n / 2)")
            let gaveUp = try await bed.count(
                """
                SELECT count(*) FROM tasks t WHERE t.name LIKE 'gives-up-%'
                AND (SELECT count(*) FROM runs r WHERE r.task_id = t.id) = \(k)
                AND EXISTS (SELECT 1 FROM runs r WHERE r.task_id = t.id AND r.attempt = \(k) AND r.state = 'dead')
                """)
            report.require(gaveUp == n / 2, "tasks ending dead after \(k) attempts: \(gaveUp) of \(n / 2)")
            // Each retry waits between 0 and base * factor^(attempt - 1) (full jitter), on the
            // database clock: from the failed attempt's end to the retry's dispatch.
            let early = try await bed.count(
                """
                SELECT count(*) FROM runs a JOIN runs b ON b.task_id = a.task_id AND b.attempt = a.attempt + 1
                WHERE b.dispatched_at - a.finished_at > make_interval(secs => 0.5 * 2 ^ (a.attempt - 1) + 1.0)
                   OR b.dispatched_at < a.finished_at
                """)
            report.require(early == 0, "\(early) retries outside the policy's bounds")
            let republished = try await bed.count(
                "SELECT count(*) FROM runs WHERE state = 'dead' AND publish_count > 1")
            report.require(republished == 0, "dead runs published again")
            report.require(
                report.counts.executions == n / 2 * (k + 1) + n / 2 * k, "executions \(report.counts.executions)")
        }
    }

    // MARK: 11. longer than the consumer timeout

    @Test func s11LongerThanConsumerTimeout() async throws {
        let n = FaultProfile.n(fast: 3, full: 10)
        try await FaultBed.scenario("long", "11 consumer timeout", n: n) { bed, report in
            try Self.fleet(bed, workers: 2)
            // The fault broker's consumer_timeout is 20 s; the runs last 25 s.
            try await bed.create(bed.sinkTasks(n, ms: 25_000, timeoutSeconds: 60))
            try await bed.waitQuiet(timeout: .seconds(90))
            try await Task.sleep(for: .seconds(1))
            report.counts = try await bed.oracle()
            report.standard()
            report.require(report.counts.executions == n, "executions \(report.counts.executions), expected \(n)")
            report.require(
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == n, "not all succeeded")
        }
    }

    // MARK: 12. clock skew

    /// Ahead is the direction that could dispatch early or take a lease early; behind, the one
    /// that could hold due work back.
    enum Skew: String, CaseIterable, Sendable {
        case ahead = "+10m"
        case behind = "-10m"
    }

    /// One dispatcher's clock 10 minutes off (libfaketime): due times and leases are decided on
    /// the database's clock, so it dispatches nothing early or late and takes no lease early.
    @Test(arguments: Skew.allCases)
    func s12DispatcherClockSkew(_ skew: Skew) async throws {
        let n = FaultProfile.n(fast: 400, full: 5000)
        try await FaultBed.scenario("skew\(skew.rawValue)", "12 dispatcher clock \(skew.rawValue)", n: n) {
            bed, report in
            // Only the wall clock is skewed, as NTP trouble would: libfaketime also shifts the
            // monotonic clock by default, which no real skew does, and its timerfd deadlines
            // even when told not to; scripts/faketime_timerfd.c, preloaded first, undoes that.
            let shim = Servers.env["CONVEYOR_FAULT_FAKETIME_SHIM"] ?? ""
            report.require(
                FileManager.default.fileExists(atPath: shim),
                "no timerfd shim at '\(shim)' (scripts/faults.sh builds it)")
            guard report.pass else { return }
            let skewedPort = try FaultBed.freePort()
            try bed.startDispatcher(
                "skewed",
                env: ["FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_FORCE_MONOTONIC_FIX": "1", "LD_PRELOAD": shim],
                httpPort: skewedPort, wrapper: [try Requirements.program("faketime"), "-f", skew.rawValue])
            try bed.startDispatcher("d2")
            for i in 1...2 { try bed.startWorker("w\(i)", concurrency: 16) }
            let dbNow =
                try await bed.rows("SELECT extract(epoch FROM now())::text")[0][0].flatMap(Double.init)
                ?? Date().timeIntervalSince1970
            var tasks = bed.sinkTasks(n, ms: 10)
            // Due in 10 to 20 s, spread over the seconds.
            for i in tasks.indices { tasks[i].startAt = Date(timeIntervalSince1970: dbNow + 10 + Double(i % 10)) }
            try await bed.create(tasks)
            try await bed.waitQuiet(timeout: .seconds(90))
            report.counts = try await bed.oracle()
            report.standard()
            let early = try await bed.count(
                """
                SELECT count(*) FROM runs WHERE dispatched_at < occurrence OR created_at < occurrence - interval '1 \
                second'
                """
            )
            report.require(early == 0, "\(early) runs created or dispatched before they were due")
            let republished = try await bed.count("SELECT count(*) FROM runs WHERE publish_count > 1")
            report.require(
                republished == 0, "\(republished) runs claimed twice: a lease was taken early, or ran out on a run")
            // Each claim counts in publish_count, so a run the skewed dispatcher claimed and then
            // sat on (waiting for its own clock) would be claimed again when its lease ran out,
            // and show above. Lateness is noted only: it measures the fleet's throughput.
            let lateness = try await bed.rows(
                "SELECT round(extract(epoch FROM max(dispatched_at - occurrence))::numeric, 2)::text FROM runs")
            report.notes.append("dispatch lateness max \(lateness.first?[0] ?? "?") s")
            // It took its share: a dispatcher that ran but dispatched nothing would prove nothing.
            let skewedDispatched = Int(
                await FaultBed.metricSum(port: skewedPort, "conveyor_dispatched_runs_total") ?? 0)
            report.require(skewedDispatched > 0, "the skewed dispatcher dispatched nothing")
            report.notes.append("the skewed dispatcher dispatched \(skewedDispatched)")
            report.require(bed.isRunning("skewed"), "the skewed dispatcher exited")
            let skewedLog = (try? String(contentsOfFile: bed.logPath("skewed"), encoding: .utf8)) ?? ""
            report.require(skewedLog.contains("dispatcher running"), "the skewed dispatcher never ran")
            report.notes.append("skewed log starts \(skewedLog.prefix(24))")
        }
    }

    // MARK: 13. broker memory alarm

    @Test func s13MemoryAlarm() async throws {
        let n = FaultProfile.n(fast: 3000, full: 10_000)
        let alarm: Duration = FaultProfile.full ? .seconds(30) : .seconds(15)
        try await FaultBed.scenario("memory-alarm", "13 memory alarm", n: n) { bed, report in
            try Self.fleet(bed, concurrency: 16)
            // 100 ms tasks: the burst lasts about n × 0.1 s / 48 slots (6 s fast), well past the
            // second or two `rabbitmqctl` takes to raise the alarm. With 10 ms tasks it lasted
            // about 2 s, and a CI run finished all 3,000 before the alarm took hold.
            try await bed.create(bed.sinkTasks(n, ms: 100))
            try await bed.until("under way", timeout: .seconds(60), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") >= n / 10
            }
            let pid = bed.pid("d1")
            let startMB = FaultBed.residentMB(pid) ?? 0
            var peak = 0.0
            var duringAlarm = 0
            try await FaultBed.rabbitmqctl(["set_vm_memory_high_watermark", "0.000001"])
            do {
                let end = ContinuousClock.now + alarm
                while ContinuousClock.now < end {
                    peak = max(peak, FaultBed.residentMB(pid) ?? 0)
                    try await Task.sleep(for: .milliseconds(250))
                }
                duringAlarm = try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'")
            } catch {
                // Never leave the broker starved for the scenarios that follow.
                _ = try? await FaultBed.rabbitmqctl(["set_vm_memory_high_watermark", "0.4"])
                throw error
            }
            try await FaultBed.rabbitmqctl(["set_vm_memory_high_watermark", "0.4"])
            let cleared = ContinuousClock.now
            try await bed.waitQuiet(timeout: .seconds(120))
            report.recovery = ContinuousClock.now - cleared
            report.counts = try await bed.oracle()
            report.standard()
            report.notes.append(
                String(
                    format: "dispatcher RSS %.0f → peak %.0f MB during the alarm; %d succeeded before it cleared",
                    startMB, peak, duringAlarm))
            report.require(peak < startMB + 100, "dispatcher memory grew by more than 100 MB during the alarm")
            report.require(duringAlarm < n, "the burst had ended before the alarm: the scenario tested nothing")
            // The dispatchers were told (connection.blocked) and paused, and did not take the
            // workers' silence (their heartbeats were blocked too) for their death.
            let logs = ["d1", "d2"].map { (try? String(contentsOfFile: bed.logPath($0), encoding: .utf8)) ?? "" }
            let told = logs.filter {
                $0.contains("broker blocked publishing") && $0.contains("broker unblocked publishing")
            }.count
            let lostLines = logs.map { $0.components(separatedBy: "workers declared lost").count - 1 }.reduce(0, +)
            report.notes.append("dispatchers told of the alarm: \(told) of 2; workers declared lost: \(lostLines)")
            report.require(told == 2, "\(told) of 2 dispatchers logged connection.blocked and connection.unblocked")
            report.require(lostLines == 0, "workers were declared lost while the alarm blocked their heartbeats")
        }
    }

    // MARK: 14. a burst due at the same second

    @Test func s14BurstDueAtOnce() async throws {
        let n = FaultProfile.n(fast: 10_000, full: 100_000)
        try await FaultBed.scenario("burst", "14 burst at one second", n: n) { bed, report in
            let due = Date().addingTimeInterval(Double(max(8, n / 4000)))
            var tasks = bed.sys.tasks(n, executor: "noop")
            for i in tasks.indices { tasks[i].startAt = due }
            try await bed.create(tasks)
            try Self.fleet(bed, workers: 3, concurrency: 64)
            try await bed.waitQuiet(timeout: .seconds(FaultProfile.full ? 600 : 180))
            report.counts = try await bed.oracle()
            report.standard()
            let stats = try await bed.rows(
                """
                SELECT count(*)::text, extract(epoch FROM max(finished_at) - min(occurrence))::text,
                       extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY started_at - occurrence))::text,
                       extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY started_at - occurrence))::text,
                       extract(epoch FROM max(started_at - occurrence))::text
                FROM runs WHERE state = 'succeeded'
                """)[0].map { Double($0 ?? "") ?? 0 }
            report.require(Int(stats[0]) == n, "succeeded \(Int(stats[0])) of \(n)")
            report.notes.append(
                String(
                    format: "%.0f runs/s; lateness p50 %.2fs p99 %.2fs max %.2fs", stats[0] / max(stats[1], 0.001),
                    stats[2], stats[3], stats[4]))
        }
    }

    // MARK: 16. a work queue purged mid-burst

    /// An operator purges the work queue mid-burst (`rabbitmqctl purge_queue`): confirmed task
    /// messages are gone and their runs wait `dispatched` with nothing left to start them. Each
    /// ends `expired` after its task's schedule-to-start timeout plus the lost grace, and is
    /// retried: every occurrence ends once, executed once, within that bound plus a maintenance
    /// interval of its publish.
    @Test func s16WorkQueuePurgedMidBurst() async throws {
        let n = FaultProfile.n(fast: 2000, full: 10_000)
        let startWithin = 8.0
        try await FaultBed.scenario("queue-purge", "16 work queue purged", n: n) { bed, report in
            try Self.fleet(bed, workers: 2)
            var tasks = bed.sinkTasks(n, ms: 20, maxAttempts: 2)
            for i in tasks.indices { tasks[i].scheduleToStartSeconds = startWithin }
            try await bed.create(tasks)
            try await bed.until("10 % done", timeout: .seconds(60), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") >= n / 10
            }
            let queue = ConveyorTopology(prefix: bed.sys.prefix).workQueue(bed.sys.queue)
            _ = try await FaultBed.rabbitmqctl(["purge_queue", queue])
            let purged = ContinuousClock.now
            try await bed.until("an expired retry succeeds", timeout: .seconds(60), &report) {
                try await bed.count(
                    """
                    SELECT count(*) FROM runs r JOIN runs p ON p.task_id = r.task_id AND p.attempt = 1
                    WHERE r.attempt = 2 AND r.state = 'succeeded' AND p.state = 'expired'
                    """) > 0
            }
            report.recovery = ContinuousClock.now - purged
            try await bed.waitQuiet(timeout: .seconds(120))
            report.counts = try await bed.oracle()
            report.standard()
            let expired = report.counts.states["expired"] ?? 0
            report.notes.append("expired \(expired)")
            report.require(expired > 0, "nothing expired: the purge removed no message")
            report.require(report.counts.duplicateExecutions == 0, "an occurrence executed twice")
            // The lost grace is 2 s and the maintenance interval 200 ms (`startDispatcher`).
            let late = try await bed.count(
                """
                SELECT count(*) FROM runs WHERE state = 'expired'
                AND finished_at > dispatched_at + make_interval(secs => \(startWithin) + 2 + 1)
                """)
            report.require(late == 0, "\(late) runs expired later than the timeout, grace and a maintenance interval")
            let unretried = try await bed.count(
                """
                SELECT count(*) FROM runs p WHERE p.state = 'expired' AND NOT EXISTS
                    (SELECT 1 FROM runs r WHERE r.task_id = p.task_id AND r.attempt = 2 AND r.state = 'succeeded')
                """)
            report.require(unretried == 0, "\(unretried) expired runs without a successful retry")
        }
    }
    // MARK: 15. rolling restart

    @Test func s15RollingRestartWithSIGTERM() async throws {
        let n = FaultProfile.n(fast: 1200, full: 10_000)
        try await FaultBed.scenario("rolling", "15 rolling SIGTERM", n: n) { bed, report in
            try Self.fleet(bed)
            try await bed.create(bed.sinkTasks(n, ms: 500))
            var restarts = 0
            var exitCodes: [Int32] = []
            let began = ContinuousClock.now
            while try await bed.unfinished() > 0, ContinuousClock.now - began < .seconds(300) {
                try await Task.sleep(for: .seconds(2))
                let victim = "w\(restarts % 3 + 1)"
                bed.signal(victim, SIGTERM)
                exitCodes.append(await bed.waitExit(victim))
                restarts += 1
                try bed.startWorker(victim)
            }
            try await Task.sleep(for: .seconds(1))
            report.counts = try await bed.oracle()
            report.standard()
            report.notes.append("\(restarts) restarts")
            report.require(restarts >= 3, "only \(restarts) restarts")
            report.require(exitCodes.allSatisfy { $0 == 0 }, "a drained worker exited with \(exitCodes)")
            report.require(report.counts.duplicateExecutions == 0, "runs shorter than the drain executed twice")
        }
    }
}
