import ConveyorAMQP
import ConveyorAPI
import ConveyorBroker
import ConveyorCore
import ConveyorDispatcher
import ConveyorHTTP
import ConveyorPostgres
import ConveyorStore
import ConveyorWorker
import Foundation
import Testing

/// Heartbeats, lost workers, and long runs against the broker's consumer timeout.
@Suite("Worker fleet (real PostgreSQL and RabbitMQ)", .serialized)
struct FleetTests {
    @Test func heartbeatsRecordEachWorkerAndTheRunsItHolds() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            let worker = sys.worker(["sleep": SleepExecutor()], concurrency: 3, id: "beating") {
                $0.heartbeatInterval = .milliseconds(200)
            }
            try await withServices([dispatcher, worker]) {
                try await sys.store.createTasks(sys.tasks(1, executor: "sleep", parameters: ["seconds": 3]))
                let holding = try await sys.eventually(timeout: .seconds(20), "the worker's heartbeat lists its run") {
                    try await sys.count(
                        """
                        SELECT count(*) FROM workers w JOIN runs r ON r.id = ANY(w.in_flight)
                        WHERE w.id = 'beating' AND w.state = 'active' AND w.concurrency = 3 AND w.executors = '{sleep}'
                        """) == 1
                }
                try #require(holding)
                _ = try await sys.eventually(timeout: .seconds(20), "the run ends and the heartbeat lists nothing") {
                    try await sys.count(
                        """
                        SELECT count(*) FROM workers w, runs r WHERE w.id = 'beating' AND cardinality(w.in_flight) = 0
                            AND r.state = 'succeeded'
                        """) == 1
                }
                let workers = try await sys.store.workers()
                #expect(workers.map(\.id) == ["beating"])
                #expect(workers.first?.secondsSinceHeartbeat ?? 99 < 2)
            }
            #expect(dispatcher.stats.heartbeats > 5)
            #expect(dispatcher.stats.statusRejected == 0)
        }
    }

    /// Silence is judged only over the span the dispatcher could hear heartbeats (`heardFor`):
    /// a worker silent for 10 s is not declared lost by a dispatcher that has listened for 1 s
    /// (its broker link just came back, or a broker alarm just cleared), and is once the
    /// dispatcher has listened for its three intervals.
    @Test func workersAreJudgedOnlyOnSilenceTheDispatcherCouldHear() async throws {
        try await System.with { sys in
            try await sys.store.recordHeartbeats([
                HeartbeatMessage(
                    workerID: "quiet", host: "h", queues: [sys.queue], executors: ["noop"],
                    concurrency: 1, inFlight: [], intervalSeconds: 1)
            ])
            #expect(
                try await sys.rows(
                    "UPDATE workers SET last_heartbeat = now() - interval '10 seconds' WHERE id = 'quiet' RETURNING id"
                ).count == 1)
            let early = try await sys.store.declareLostWorkers(missed: 3, heardFor: 1)
            #expect(early.workers.isEmpty, "declared lost after listening 1 s, though 3 intervals are 3 s")
            #expect(try await sys.count("SELECT count(*) FROM workers WHERE id = 'quiet' AND state = 'active'") == 1)
            let judged = try await sys.store.declareLostWorkers(missed: 3, heardFor: 3.5)
            #expect(judged.workers == ["quiet"])
        }
    }

    /// Issue 23 item 5: a worker stopped with SIGTERM drains, says goodbye and is shown
    /// `stopped`; one killed with SIGKILL beside it is declared `lost` (which also shows the
    /// dispatcher judged both: the same silence). Without the goodbye both end `lost`.
    @Test func aDrainedWorkerSaysGoodbyeAndIsShownStoppedNotLost() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher { $0.workerLostAfterMissed = 3 }
            var processes: [String: Process] = [:]
            for id in ["leaving", "killed"] {
                var env = sys.workerEnvironment(id: id)
                env["CONVEYOR_WORKER_HEARTBEAT_INTERVAL_MS"] = "200"
                processes[id] = try spawnConveyor(["worker"], env: env)
            }
            defer { for p in processes.values where p.isRunning { kill(p.processIdentifier, SIGKILL) } }
            try await withServices([dispatcher]) {
                let waited1 = try await sys.eventually(timeout: .seconds(30), "both workers beat") {
                    try await sys.count("SELECT count(*) FROM workers WHERE state = 'active'") == 2
                }
                try #require(waited1)
                let leaving = try #require(processes["leaving"])
                let killed = try #require(processes["killed"])
                kill(leaving.processIdentifier, SIGTERM)
                kill(killed.processIdentifier, SIGKILL)
                leaving.waitUntilExit()
                killed.waitUntilExit()
                #expect(leaving.terminationStatus == 0)
                let waited2 = try await sys.eventually(timeout: .seconds(20), "the killed worker is declared lost") {
                    try await sys.count("SELECT count(*) FROM workers WHERE id = 'killed' AND state = 'lost'") == 1
                }
                try #require(waited2)
                // The goodbye may come after the killed worker's last beat (the drain takes a moment):
                // judge the leaving worker once it, too, has been silent past the lost threshold
                // (3 × 200 ms) and two maintenance passes (200 ms each).
                let waited3 = try await sys.eventually(timeout: .seconds(20), "the leaving worker is silent for 1 s") {
                    try await sys.count(
                        "SELECT count(*) FROM workers WHERE id = 'leaving' AND now() - last_heartbeat > interval '1 s'"
                    ) == 1
                }
                try #require(waited3)
                let rows = try await sys.rows(
                    "SELECT state, (stopped_at IS NOT NULL)::text FROM workers WHERE id = 'leaving'")
                #expect(rows.first == ["stopped", "true"], "\(rows)")
            }
            #expect(dispatcher.stats.workersLost == 1)
            #expect(dispatcher.stats.workersLeft == 1)
        }
    }

    /// Heartbeats carry no proof, and two dispatchers may record them out of order: a heartbeat
    /// sent before a goodbye but recorded after it leaves the worker `stopped`; a later one (a
    /// restart under the same id) makes it active. A goodbye forged under a live worker's id does
    /// not hide its death: a `stopped` worker still holding a detached running run is judged on
    /// its silence, declared lost, and the run is retried. Without that, the run would wait forever.
    @Test func heartbeatsAfterAGoodbyeAndForgedGoodbyes() async throws {
        try await System.with { sys in
            let t0 = Date()
            func beat(_ id: String, at: Date, leaving: Bool? = nil) -> HeartbeatMessage {
                HeartbeatMessage(
                    workerID: id, host: "h", queues: [sys.queue], executors: ["noop"], concurrency: 1, inFlight: [],
                    intervalSeconds: 1, at: at, leaving: leaving)
            }
            #expect(
                try await sys.store.recordHeartbeats([beat("w", at: t0.addingTimeInterval(1), leaving: true)]) == ["w"])
            try await sys.store.recordHeartbeats([beat("w", at: t0)])
            #expect(try await sys.count("SELECT count(*) FROM workers WHERE id = 'w' AND state = 'stopped'") == 1)
            try await sys.store.recordHeartbeats([beat("w", at: t0.addingTimeInterval(2))])
            #expect(try await sys.count("SELECT count(*) FROM workers WHERE id = 'w' AND state = 'active'") == 1)

            var task = NewTask(name: "held", executor: "noop", schedule: .once)
            task.queue = sys.queue
            task.retry.maxAttempts = 2
            try await sys.store.createTasks([task])
            try await sys.store.recordHeartbeats([beat("victim", at: t0)])
            _ = try await sys.rows(
                """
                INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at, worker_id, detached,
                                  started_at, deadline_at)
                SELECT gen_random_uuid(), id, now(), 1, 'running', queue, 0, now(), 'victim', true, now(),
                       now() + interval '1 hour' FROM tasks WHERE name = 'held' RETURNING id
                """)
            try await sys.store.recordHeartbeats([beat("victim", at: t0.addingTimeInterval(1), leaving: true)])
            _ = try await sys.rows(
                "UPDATE workers SET last_heartbeat = now() - interval '10 seconds' WHERE id = 'victim' RETURNING id")
            let judged = try await sys.store.declareLostWorkers(missed: 3, heardFor: 60)
            #expect(judged.workers == ["victim"])
            #expect(judged.runs == 1 && judged.settled.retried == 1)
            // A stopped worker holding nothing is never judged.
            _ = try await sys.rows(
                "UPDATE workers SET state = 'stopped', last_heartbeat = now() - interval '10 seconds' RETURNING id")
            #expect(try await sys.store.declareLostWorkers(missed: 3, heardFor: 60).workers.isEmpty)
        }
    }

    /// Stopped and lost workers are forgotten after `retention.workers_hours`; active ones are
    /// not. `GET /v1/workers` pages by id and filters by state.
    @Test func workersArePrunedAndPaged() async throws {
        try await System.with { sys in
            for i in 1...5 {
                try await sys.store.recordHeartbeats([
                    HeartbeatMessage(
                        workerID: "w\(i)", host: "h", queues: [sys.queue], executors: ["noop"], concurrency: 1,
                        inFlight: [], intervalSeconds: 1, leaving: i == 2 ? true : nil)
                ])
            }
            _ = try await sys.rows("UPDATE workers SET state = 'lost' WHERE id = 'w3' RETURNING id")
            try await APITests.withAPI(sys) { api, _ in
                let fleet = try await APITests.key(sys, role: .viewer, namespace: "*")
                var ids: [String] = []
                var cursor: String?
                var pages = 0
                repeat {
                    let r = try await api.call(
                        "GET", "/v1/workers?limit=2" + (cursor.map { "&cursor=\($0)" } ?? ""), key: fleet)
                    #expect(r.status == 200)
                    ids += r.json["workers"]?.arrayValue?.compactMap { $0["id"]?.stringValue } ?? []
                    cursor = r.json["next_cursor"]?.stringValue
                    pages += 1
                } while cursor != nil && pages < 10
                #expect(ids == ["w1", "w2", "w3", "w4", "w5"] && pages == 3, "\(ids) in \(pages) pages")
                let stopped = try await api.call("GET", "/v1/workers?state=stopped", key: fleet)
                #expect(stopped.json["workers"]?.arrayValue?.map { $0["id"] } == ["w2"])
                let bad = try await api.call("GET", "/v1/workers?state=gone", key: fleet)
                #expect(bad.status == 400 && bad.json["field"] == "state", "\(bad.json)")
            }
            _ = try await sys.rows("UPDATE workers SET last_heartbeat = now() - interval '2 days' RETURNING id")
            let deleted = try await sys.store.purgeBatch(
                runsAge: .seconds(30 * 86_400), tasksAge: .seconds(7 * 86_400), workersAge: .seconds(86_400))
            #expect(deleted == 2)
            #expect(try await sys.store.workers().map(\.id) == ["w1", "w4", "w5"], "stopped and lost ones forgotten")
        }
    }
    /// A worker killed while it runs a detached (already acknowledged) run: the broker cannot
    /// redeliver it, so the dispatcher declares the silent worker lost and retries the run.
    @Test func aSilentWorkersDetachedRunIsRetriedOnce() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            var env = sys.workerEnvironment(id: "doomed")
            env["CONVEYOR_WORKER_HEARTBEAT_INTERVAL_MS"] = "300"
            env["CONVEYOR_WORKER_STARTED_AFTER_MS"] = "100"
            env["CONVEYOR_WORKER_DETACH_AFTER_MS"] = "500"
            let doomed = try spawnConveyor(["worker"], env: env)
            defer { if doomed.isRunning { kill(doomed.processIdentifier, SIGKILL) } }
            try await withServices([dispatcher]) {
                var task = sys.tasks(1, executor: "sleep", parameters: ["seconds": 3])[0]
                task.retry.maxAttempts = 2
                try await sys.store.createTasks([task])
                let detached = try await sys.eventually(
                    timeout: .seconds(30), "the run is detached on the doomed worker"
                ) {
                    try await sys.count(
                        "SELECT count(*) FROM runs WHERE state = 'running' AND detached AND worker_id = 'doomed'") == 1
                }
                try #require(detached)
                kill(doomed.processIdentifier, SIGKILL)
                doomed.waitUntilExit()
                let lost = try await sys.eventually(
                    timeout: .seconds(10), "the silent worker and its run are declared lost"
                ) {
                    try await sys.count(
                        """
                        SELECT count(*) FROM workers w, runs r WHERE w.id = 'doomed' AND w.state = 'lost' AND r.attempt
                            = 1 AND r.state = 'lost'
                        """) == 1
                }
                try #require(lost)
                let survivor = sys.worker(["sleep": SleepExecutor()], id: "survivor")
                try await withServices([survivor]) {
                    _ = try await sys.eventually(timeout: .seconds(30), "attempt 2 succeeds elsewhere") {
                        try await sys.count(
                            """
                            SELECT count(*) FROM runs WHERE attempt = 2 AND state = 'succeeded' AND worker_id = \
                            'survivor'
                            """
                        ) == 1
                    }
                    // The acknowledged message is not redelivered: attempt 1 never runs again. The
                    // broker holds nothing for it, ready or in the survivor's hands.
                    try await expectNothingLeft(sys, worker: survivor)
                }
                #expect(survivor.stats.succeeded == 1)
            }
            #expect(try await sys.count("SELECT count(*) FROM runs") == 2)
            #expect(
                try await sys.count(
                    "SELECT count(*) FROM runs WHERE attempt = 1 AND reason LIKE '%doomed stopped sending heartbeats%'")
                    == 1)
            #expect(dispatcher.stats.workersLost == 1)
        }
    }

    /// A worker paused past its heartbeats (SIGSTOP): the broker drops its connection and
    /// redelivers its runs to another worker; when it resumes (SIGCONT) its late results change
    /// nothing, and it rejoins without crashing.
    @Test func aStoppedWorkersRunsAreRecoveredAndItsLateResultsAreNoOps() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            var env = sys.workerEnvironment(id: "frozen", concurrency: 4)
            env["CONVEYOR_AMQP_HEARTBEAT_SECONDS"] = "1"
            env["CONVEYOR_WORKER_HEARTBEAT_INTERVAL_MS"] = "300"
            env["CONVEYOR_WORKER_STARTED_AFTER_MS"] = "100"
            let frozen = try spawnConveyor(["worker"], env: env)
            defer {
                kill(frozen.processIdentifier, SIGCONT)
                if frozen.isRunning { kill(frozen.processIdentifier, SIGKILL) }
            }
            try await withServices([dispatcher]) {
                try await sys.store.createTasks(sys.tasks(4, executor: "sleep", parameters: ["seconds": 3]))
                let running = try await sys.eventually(timeout: .seconds(30), "four runs on the frozen worker") {
                    try await sys.count(
                        "SELECT count(*) FROM runs WHERE state = 'running' AND worker_id = 'frozen'") == 4
                }
                try #require(running)
                kill(frozen.processIdentifier, SIGSTOP)
                let survivor = sys.worker(["sleep": SleepExecutor()], id: "survivor")
                try await withServices([survivor]) {
                    _ = try await sys.eventually(
                        timeout: .seconds(40), "the broker redelivers the four runs and they succeed elsewhere"
                    ) {
                        try await sys.count(
                            "SELECT count(*) FROM runs WHERE state = 'succeeded' AND worker_id = 'survivor'") == 4
                    }
                    #expect(
                        try await sys.count("SELECT count(*) FROM workers WHERE id = 'frozen' AND state = 'lost'") == 1)
                    let ignoredBefore = dispatcher.stats.statusIgnored
                    kill(frozen.processIdentifier, SIGCONT)
                    _ = try await sys.eventually(
                        timeout: .seconds(30), "the resumed worker reports its late results and rejoins"
                    ) {
                        let active =
                            try await sys.count("SELECT count(*) FROM workers WHERE id = 'frozen' AND state = 'active'")
                            == 1
                        return active && dispatcher.stats.statusIgnored >= ignoredBefore + 4
                    }
                }
                #expect(frozen.isRunning, "the resumed worker is still running")
            }
            #expect(try await sys.count("SELECT count(*) FROM runs") == 4)
            #expect(
                try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded' AND worker_id = 'survivor'")
                    == 4,
                "the late results did not change the recorded outcomes")
            kill(frozen.processIdentifier, SIGTERM)
            frozen.waitUntilExit()
            #expect(frozen.terminationStatus == 0)
        }
    }

    /// kill -9 a worker process every few seconds while 2,000 runs of 200 ms go through three
    /// workers (a killed one is replaced): nothing is lost and every run is recorded once.
    @Test func killingWorkersEveryFewSecondsLosesNothing() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher { $0.maxBacklogPerQueue = 200 }
            var generation = 0
            func spawn() throws -> Process {
                generation += 1
                var env = sys.workerEnvironment(id: "w\(generation)", concurrency: 16)
                env["CONVEYOR_WORKER_STARTED_AFTER_MS"] = "100"
                return try spawnConveyor(["worker"], env: env)
            }
            var workers = try (0..<3).map { _ in try spawn() }
            defer { for w in workers where w.isRunning { kill(w.processIdentifier, SIGKILL) } }
            var killed = 0
            try await withServices([dispatcher]) {
                try await sys.store.createTasks(sys.tasks(2000, executor: "sleep", parameters: ["seconds": 0.2]))
                let deadline = ContinuousClock.now + .seconds(180)
                while try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") < 2000,
                    ContinuousClock.now < deadline
                {
                    try await Task.sleep(for: .seconds(2))
                    let victim = killed % workers.count
                    kill(workers[victim].processIdentifier, SIGKILL)
                    workers[victim].waitUntilExit()
                    killed += 1
                    workers[victim] = try spawn()
                }
                #expect(killed >= 3, "workers were killed while runs went through")
            }
            let states = try await sys.store.runCounts()
            #expect(
                try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 2000,
                "runs by state: \(states)")
            #expect(
                try await sys.count("SELECT count(*) FROM runs") == 2000,
                "no retry was needed: redelivery kept each run's attempt")
            #expect(
                try await sys.count("SELECT count(*) FROM (SELECT task_id FROM runs GROUP BY 1 HAVING count(*) > 1) d")
                    == 0)
            #expect(dispatcher.stats.outcomesRecorded == 2000, "each outcome was recorded once")
        }
    }

    /// RabbitMQ closes the channel of a consumer that holds a delivery unacknowledged past
    /// `consumer_timeout`, and redelivers it. Set short here (2 s, checked every 250 ms): without
    /// detaching, a 5 s run executes twice; detached, it executes once and nothing reconnects.
    @Test func aRunLongerThanTheConsumerTimeoutIsNeitherKilledNorDuplicated() async throws {
        try Servers.rabbitmqctl([
            "eval",
            """
            application:set_env(rabbit, channel_tick_interval, 250), application:set_env(rabbit, consumer_timeout, \
            2000).
            """,
        ])
        defer {
            _ = try? Servers.rabbitmqctl([
                "eval",
                """
                application:set_env(rabbit, consumer_timeout, 3600000), application:set_env(rabbit, \
                channel_tick_interval, 60000).
                """,
            ])
        }
        for detach in [false, true] {
            try await System.with { sys in
                let recorder = Recorder()
                let dispatcher = sys.dispatcher()
                let worker = sys.worker(["long": ScriptedExecutor(recorder: recorder)], id: "long-\(detach)") {
                    $0.startedAfter = .milliseconds(100)
                    $0.detachAfter = detach ? .milliseconds(500) : nil
                }
                var reconnectsBefore = 0
                try await withServices([dispatcher, worker]) {
                    // A connect retry at start-up is not what this test is about: count from here.
                    let consuming = try await sys.eventually(timeout: .seconds(20), "the worker consumes") {
                        worker.isReady
                    }
                    try #require(consuming)
                    reconnectsBefore = worker.consumerReconnects
                    var task = sys.tasks(1, executor: "long", parameters: ["sleep_ms": 5000])[0]
                    task.timeoutSeconds = 60
                    try await sys.store.createTasks([task])
                    _ = try await sys.eventually(timeout: .seconds(40), "the long run ends (detach \(detach))") {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 1
                    }
                    if detach {
                        try await expectNothingLeft(sys, worker: worker)
                    } else {
                        try await sys.eventually("the broker redelivered the long run") { recorder.total >= 2 }
                    }
                }
                if detach {
                    #expect(recorder.total == 1, "executions of the long run with detaching")
                    #expect(
                        worker.consumerReconnects == reconnectsBefore, "the broker never closed the worker's channel")
                    #expect(worker.stats.detached == 1)
                } else {
                    // The control: the broker's consumer timeout really is short here.
                    #expect(recorder.total >= 2, "without detaching, the broker redelivered the long run")
                }
                #expect(try await sys.count("SELECT count(*) FROM runs") == 1)
            }
        }
    }
}

/// The worker's status endpoint in a real process.
@Suite("Worker status endpoint (real process)")
struct WorkerEndpointTests {
    @Test func healthReadinessAndMetricsAreServed() async throws {
        try await System.with { sys in
            let port = Int.random(in: 20_000...40_000)
            try await sys.declareTopology()  // no dispatcher here: the worker looks its queues up
            var env = sys.workerEnvironment(id: "probed")
            env["CONVEYOR_WORKER_HTTP_PORT"] = "\(port)"
            env["CONVEYOR_WORKER_HTTP_HOST"] = "127.0.0.1"
            let worker = try spawnConveyor(["worker"], env: env)
            defer { if worker.isRunning { kill(worker.processIdentifier, SIGKILL) } }
            var policy = OutboundPolicy()
            policy.allowedNetworks = [try Network(parsing: "127.0.0.1")]
            let http = OutboundHTTP(policy: policy, logger: Servers.logger)
            func get(_ path: String) async -> (Int, String) {
                guard
                    let r = try? await http.send(
                        OutboundRequest(url: "http://127.0.0.1:\(port)\(path)"), timeout: .seconds(2))
                else { return (0, "") }
                return (r.status, String(decoding: r.body, as: UTF8.self))
            }
            var ready = (0, "")
            _ = try await sys.eventually(timeout: .seconds(20), "the worker reports ready") {
                ready = await get("/readyz")
                return ready.0 == 200
            }
            #expect(await get("/healthz").0 == 200)
            let metrics = await get("/metrics")
            #expect(metrics.0 == 200)
            for name in [
                "conveyor_worker_runs_total", "conveyor_worker_in_flight", "conveyor_worker_ready",
                "conveyor_worker_heartbeats_total", "conveyor_worker_isolated_total",
            ] {
                #expect(metrics.1.contains("# TYPE \(name) "), "\(name) missing from /metrics")
            }
            #expect(metrics.1.contains("conveyor_worker_ready{worker=\"probed\"} 1"))
            #expect(await get("/nope").0 == 404)
            kill(worker.processIdentifier, SIGTERM)
            worker.waitUntilExit()
            #expect(worker.terminationStatus == 0)
        }
    }
}

/// Examples/CustomExecutor: a program that registers its own executor type.
@Suite("Embedding a worker with a custom executor (real process)")
struct ExampleWorkerTests {
    @Test func theExampleProgramRunsItsOwnExecutorType() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("example-\(UUID())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "worker: {executors: [upper]}\nexecutors:\n  upper: {type: uppercase, max_length: 100}\n"
            .write(toFile: dir + "/worker.yaml", atomically: true, encoding: .utf8)
        let binary = URL(fileURLWithPath: try conveyorBinary()).deletingLastPathComponent().appendingPathComponent(
            "conveyor-example-worker"
        ).path
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            let p = Process()
            p.executableURL = URL(fileURLWithPath: binary)
            var env = ProcessInfo.processInfo.environment
            for (k, v) in sys.workerEnvironment(id: "example", executors: "upper") { env[k] = v }
            env["CONVEYOR_CONFIG_DIR"] = dir
            env["CONVEYOR_WORKER_HTTP_PORT"] = "0"
            p.environment = env
            p.standardError = FileHandle.nullDevice
            try p.run()
            defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
            try await withServices([dispatcher]) {
                var t = NewTask(name: "shout", executor: "upper", schedule: .once)
                t.queue = sys.queue
                t.parameters = ["text": "hello"]
                try await sys.store.createTasks([t])
                _ = try await sys.eventually(timeout: .seconds(30), "the custom executor's run succeeds") {
                    try await sys.count(
                        """
                        SELECT count(*) FROM runs WHERE state = 'succeeded' AND output = 'HELLO' AND worker_id = \
                        'example'
                        """
                    ) == 1
                }
            }
            kill(p.processIdentifier, SIGTERM)
            p.waitUntilExit()
            #expect(p.terminationStatus == 0)
        }
    }

    /// The example is a target of this package, so its build sees `package` declarations too.
    /// Type-checked here under a package name of its own, it sees what any program that depends on
    /// the ConveyorWorker product sees: the `public` declarations only. A program that reaches for a
    /// `package` one (here a test hook) is refused, which shows the check can fail.
    @Test func theExampleNeedsOnlyTheProductsPublicDeclarations() throws {
        let example = "Examples/CustomExecutor/Sources/CustomWorker/main.swift"
        #expect(try Self.typecheckOutsideThePackage(example) == "")
        let reaching = FileManager.default.temporaryDirectory.appendingPathComponent("reaching-\(UUID()).swift").path
        try "import ConveyorWorker\n_ = Worker.runForTesting\n".write(
            toFile: reaching, atomically: true, encoding: .utf8)
        let refused = try Self.typecheckOutsideThePackage(reaching)
        #expect(refused.contains("runForTesting"), "\(refused)")
    }

    /// `swiftc -typecheck` of `file` against this build's modules, as package `outside`; its
    /// diagnostics ("" when it type-checks).
    static func typecheckOutsideThePackage(_ file: String) throws -> String {
        let build = URL(fileURLWithPath: try conveyorBinary()).deletingLastPathComponent()
        let root = FileManager.default.currentDirectoryPath
        // The C modules the product's modules import (libpq, rabbitmq-c, the packages' shims).
        var maps = try FileManager.default.contentsOfDirectory(atPath: build.path).map {
            build.appendingPathComponent($0).appendingPathComponent("module.modulemap").path
        }
        maps += ["Sources/CLibPQ/module.modulemap", "Sources/CRabbitMQ/module.modulemap"].map { root + "/" + $0 }
        if let found = FileManager.default.enumerator(atPath: root + "/.build/checkouts") {
            for case let path as String in found where path.hasSuffix("/module.modulemap") && path.contains("/Sources/")
            {
                maps.append(root + "/.build/checkouts/" + path)
            }
        }
        var arguments = [
            "swiftc", "-typecheck", "-package-name", "outside", "-I", build.appendingPathComponent("Modules").path,
        ]
        for map in maps where FileManager.default.fileExists(atPath: map) {
            let dir = URL(fileURLWithPath: map).deletingLastPathComponent().path
            arguments += ["-Xcc", "-fmodule-map-file=\(map)", "-Xcc", "-I\(dir)"]
        }
        arguments.append(file)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = arguments
        p.currentDirectoryURL = URL(fileURLWithPath: root)
        let err = Pipe()
        p.standardError = err
        p.standardOutput = err
        try p.run()
        let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return p.terminationStatus == 0 ? "" : text
    }
}

/// SIGHUP re-reads worker.yaml in a real `conveyor worker` process.
@Suite("Worker configuration reload (real processes)", .serialized)
struct ReloadTests {
    @Test func sighupAppliesNewExecutorSettingsAndRefusesAnInvalidFile() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("reload-\(UUID())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        func write(_ commands: String) throws {
            try "executors:\n  sh:\n    type: shell\n    allowed_commands: \(commands)\n    log_output: false\n"
                .write(toFile: dir + "/worker.yaml", atomically: true, encoding: .utf8)
        }
        try write("[/bin/echo]")
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            var env = sys.workerEnvironment(id: "reloading", executors: "sh")
            env["CONVEYOR_CONFIG_DIR"] = dir
            let log = dir + "/worker.log"
            let worker = try spawnConveyor(["worker"], env: env, log: log)
            defer { if worker.isRunning { kill(worker.processIdentifier, SIGKILL) } }
            /// Sends SIGHUP and waits (bounded) for the worker to log the reload's outcome.
            func hangUp() async throws {
                func outcomes() -> Int {
                    let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                    return text.components(separatedBy: "executors reloaded").count
                        + text.components(separatedBy: "configuration reload refused").count - 2
                }
                let before = outcomes()
                kill(worker.processIdentifier, SIGHUP)
                _ = try await sys.eventually(timeout: .seconds(20), "the worker logs the reload's outcome") {
                    outcomes() == before + 1
                }
            }
            try await withServices([dispatcher]) {
                func run(_ name: String) async throws -> String {
                    var t = NewTask(name: name, executor: "sh", schedule: .once)
                    t.queue = sys.queue
                    t.parameters = ["argv": ["/bin/true"]]
                    try await sys.store.createTasks([t])
                    var state = ""
                    _ = try await sys.eventually(timeout: .seconds(30), "\(name) ends") {
                        state = try await sys.pool.withConnection { c in
                            try await c.query(
                                """
                                SELECT r.state || ':' || coalesce(r.error_class, '') FROM runs r JOIN tasks t ON t.id \
                                = r.task_id WHERE t.name = $1
                                """,
                                [name]
                            ).rows.first?[0] ?? ""
                        }
                        return state.hasPrefix("succeeded") || state.hasPrefix("failed")
                    }
                    return state
                }
                #expect(try await run("before") == "failed:command_not_allowed")
                try write("[/bin/echo, /bin/true]")
                try await hangUp()
                #expect(try await run("after-reload") == "succeeded:")
                // A file that does not parse, then one that parses but is invalid: both refused.
                try "executors: [[[".write(toFile: dir + "/worker.yaml", atomically: true, encoding: .utf8)
                try await hangUp()
                try write("[bin/true]")
                try await hangUp()
                #expect(worker.isRunning, "the worker survived the invalid files")
                #expect(try await run("after-invalid") == "succeeded:", "the previous executors stayed")
            }
            kill(worker.processIdentifier, SIGTERM)
            worker.waitUntilExit()
            #expect(worker.terminationStatus == 0)
        }
    }
}

/// The work queue holds no message, and `worker` (its only consumer) has none in hand: nothing
/// is left to run again.
func expectNothingLeft(
    _ sys: System, worker: Worker, sourceLocation: SourceLocation = #_sourceLocation
) async throws {
    let inspector = AMQPInspector(configuration: sys.amqp)
    defer { inspector.close() }
    let queue = ConveyorTopology(prefix: sys.prefix).workQueue(sys.queue)
    #expect(try await inspector.queues([queue]).first?.messages == 0, sourceLocation: sourceLocation)
    #expect(worker.stats.inFlight == 0, sourceLocation: sourceLocation)
}
