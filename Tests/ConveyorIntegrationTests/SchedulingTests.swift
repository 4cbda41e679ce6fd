import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorDispatcher
import ConveyorFaults
import ConveyorPostgres
import ConveyorStore
import ConveyorWorker
import Foundation
import Synchronization
import Testing

/// Scheduling semantics on the real servers (docs/scheduling.md).
@Suite(
    "Scheduling semantics (real PostgreSQL and RabbitMQ)",
    .enabled(if: Servers.available, Comment(rawValue: Servers.skipMessage)), .serialized)
struct SchedulingTests {
    // MARK: retries, timeouts, lost, dead letters

    /// Issue 23 item 4: a paused queue publishes nothing new: its due work waits in PostgreSQL (as
    /// due tasks, until half the misfire grace) through several scans, and once resumed it goes in
    /// priority, then due-time, order. Without the pause the dispatcher publishes it at once.
    @Test func aPausedQueueHoldsItsRunsInPostgresUntilResumedThenInOrder() async throws {
        try await System.with { sys in
            #expect(try await sys.store.pauseQueue(sys.queue, by: "test"))
            #expect(try await !sys.store.pauseQueue(sys.queue, by: "test"), "already paused")
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            let worker = sys.worker(["scripted": ScriptedExecutor(recorder: recorder)], concurrency: 1)
            let now = Date()
            let tasks = (0..<6).map { i in
                var t = NewTask(name: "p\(i)", executor: "scripted", schedule: .once)
                t.queue = sys.queue
                t.priority = i % 2 == 0 ? .low : .high
                t.startAt = now.addingTimeInterval(Double(i) - 10)
                return t
            }
            try await withServices([dispatcher, worker]) {
                try await sys.store.createTasks(tasks)
                let scans = dispatcher.stats.scans
                let waited2 = try await sys.eventually(timeout: .seconds(20), "three more scans") {
                    dispatcher.stats.scans >= scans + 3
                }
                try #require(waited2)
                #expect(try await sys.count("SELECT count(*) FROM runs") == 0, "due tasks wait as tasks")
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE next_run_at <= now()") == 6)
                #expect(dispatcher.stats.published == 0)
                let stats = try await sys.store.queueStats(namespace: nil)
                #expect(stats.first?.paused == true && stats.first?.waiting == 6, "\(stats)")
                #expect(try await sys.store.resumeQueue(sys.queue))
                // Within 10 s: at once, not when half the misfire grace (30 s) makes them runs. The
                // resumed queue has no backlog; the claim that reads it must still see its room.
                let waited3 = try await sys.eventually(timeout: .seconds(10), "all six succeed once resumed") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 6
                }
                try #require(waited3)
            }
            let order = recorder.starts.withLock { $0.map(\.0) }
            #expect(order == ["p1", "p3", "p5", "p0", "p2", "p4"], "\(order)")
        }
    }
    @Test func retriesWithBackoffOnTheDatabaseClockThenDeadThenRedrive() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            let worker = sys.worker(["script": ScriptedExecutor(recorder: recorder)])
            try await withServices([dispatcher, worker]) {
                let retry: JSONValue = .object([
                    "max_attempts": .number(3), "base_seconds": .number(0.4), "factor": .number(2),
                    "cap_seconds": .number(0.6), "jitter": .bool(false),
                ])
                try await sys.store.createTasks([
                    try sys.task(["name": "flaky", "parameters": .object(["fail_times": .number(2)]), "retry": retry]),
                    try sys.task(["name": "broken", "parameters": .object(["fail": .bool(true)]), "retry": retry]),
                    try sys.task([
                        "name": "no-retry-on-1", "parameters": .object(["fail": .bool(true)]),
                        "retry": .object(["max_attempts": .number(3), "no_retry_on": .array([.string("exit:1")])]),
                    ]),
                ])
                try await sys.eventually("flaky succeeded, broken dead, no-retry-on-1 failed") {
                    let s = try await sys.count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'flaky' AND \
                        r.state = 'succeeded'
                        """
                    )
                    let d = try await sys.count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'broken' AND \
                        r.state = 'dead'
                        """
                    )
                    let f = try await sys.count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'no-retry-on-1' \
                        AND r.state = 'failed'
                        """
                    )
                    return s == 1 && d == 1 && f == 1
                }
                // Exactly k + 1 attempts for k failures, one occurrence, one trace.
                let flaky = try await sys.rows(
                    """
                    SELECT r.attempt, r.state, extract(epoch FROM r.dispatched_at - r.created_at), r.trace_id
                    FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'flaky' ORDER BY attempt
                    """)
                #expect(flaky.map { $0[0]! } == ["1", "2", "3"])
                #expect(flaky.map { $0[1]! } == ["failed", "failed", "succeeded"])
                #expect(Set(flaky.map { $0[3]! }).count == 1, "retries stay in the same trace")
                // The retry waited its backoff (0.4 s, then 0.6 s capped) on the database clock, and not much more.
                for (row, delay) in zip(flaky.dropFirst(), [0.4, 0.6]) {
                    let waited = Double(row[2]!)!
                    #expect(
                        waited >= delay && waited < delay + 1.5,
                        "attempt \(row[0]!) waited \(waited)s for a \(delay)s backoff")
                }
                let broken = try await sys.rows(
                    """
                    SELECT attempt, state, reason FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = \
                    'broken' ORDER BY attempt
                    """
                )
                #expect(broken.map { $0[1]! } == ["failed", "failed", "dead"])
                #expect(broken.last?[2]?.contains("retries exhausted: attempt 3 of 3") == true)
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'no-retry-on-1'")
                        == 1)
                #expect(try await sys.store.retryCount() == 4)
                // Dead is never republished; re-drive makes a new attempt that runs (and fails again: attempt 4 >
                // fail).
                let deadRow = try await sys.rows(
                    """
                    SELECT r.id FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'broken' AND state = \
                    'dead'
                    """
                )
                let deadID = try #require(deadRow.first?[0].flatMap(UUID.init(uuidString:)))
                let again = try await sys.store.redrive(run: deadID)
                try await sys.eventually("re-driven attempt ran") {
                    try await sys.store.run(id: again)?.state.isFinal == true
                }
                #expect(try await sys.store.run(id: again)?.attempt == 4)
                await #expect(throws: ValidationError.self) { _ = try await sys.store.redrive(run: deadID) }
            }
        }
    }

    @Test func aRunWhoseWorkerVanishedIsDeclaredLostAndRetried() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher { $0.lostGrace = .milliseconds(500) }
            try await withServices([dispatcher]) {
                try await sys.store.createTasks([
                    try sys.task([
                        "name": "orphan", "timeout": .number(1),
                        "retry": .object(["max_attempts": .number(2), "retry_on": .array([.string("lost")])]),
                    ])
                ])
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 1
                }
                // A worker starts it (its `started` status goes through the broker) and is never heard of again.
                let run = try #require(try await sys.store.runs().first)
                let topo = ConveyorTopology(prefix: sys.prefix)
                let pub = AMQPPublisher(configuration: sys.amqp, topology: topo.status, logger: Servers.logger)
                pub.start()
                defer { pub.stop() }
                try await pub.waitUntilConnected()
                let started = StatusMessage(
                    runID: run.id, attempt: 1, event: .started, workerID: "vanished", proof: try await sys.proof(run.id)
                )
                try await pub.publish(sealedStatus(started, exchange: topo.statusExchange))
                try await sys.eventually("lost after timeout + grace, then retried") {
                    let lost = try await sys.count(
                        "SELECT count(*) FROM runs WHERE attempt = 1 AND state = 'lost' AND reason LIKE '%vanished%'")
                    let retried = try await sys.count(
                        "SELECT count(*) FROM runs WHERE attempt = 2 AND state IN ('scheduled', 'queued', 'dispatched')"
                    )
                    return lost == 1 && retried == 1
                }
                // Its late result is a no-op.
                let late = try await sys.store.record(
                    [
                        StatusMessage(
                            runID: run.id, attempt: 1, event: .finished, outcome: .succeeded, workerID: "vanished")
                    ],
                    lostGrace: .milliseconds(500))
                #expect(late.outcomes == 0)
                let lostFor = try await sys.rows(
                    "SELECT extract(epoch FROM finished_at - started_at) FROM runs WHERE attempt = 1")
                #expect(Double(lostFor[0][0]!)! >= 1.5, "not declared lost before timeout (1 s) + grace (0.5 s)")
            }
        }
    }

    @Test func theWorkerTimesOutAndTheRetryPolicyDecides() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            try await withServices([sys.dispatcher(), sys.worker(["script": ScriptedExecutor(recorder: recorder)])]) {
                try await sys.store.createTasks([
                    try sys.task([
                        "name": "slow", "timeout": .number(0.3), "parameters": .object(["sleep_ms": .number(5000)]),
                        "retry": .object(["max_attempts": .number(2), "base_seconds": .number(0.1)]),
                    ])
                ])
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state IN ('timed_out', 'dead')") == 2
                }
                #expect(
                    try await sys.rows("SELECT state, error_class FROM runs ORDER BY attempt").map {
                        $0.compactMap { $0 }
                    }
                        == [["timed_out", "timeout"], ["dead", "timeout"]])
                #expect(recorder.cancelled.withLock { $0.count } == 2, "the executor was stopped each time")
            }
        }
    }

    @Test func messagesPastTheDeliveryLimitEndTheirRunDead() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher { $0.deliveryLimit = 2 }
            let topo = ConveyorTopology(prefix: sys.prefix, deliveryLimit: 2)
            // A "worker" that dies on every delivery: it takes the message and hands it back.
            let crashing = Self.holdingConsumer(sys, topo)
            try await withServices([dispatcher]) {
                crashing.start()
                defer { crashing.stop() }
                try await crashing.waitUntilConsuming()
                let pump = Task {
                    for await d in crashing.deliveries { crashing.nack(d, multiple: false, requeue: true) }
                }
                defer { pump.cancel() }
                try await sys.store.createTasks([try sys.task(["name": "poison"])])
                try await sys.eventually {
                    try await sys.count(
                        "SELECT count(*) FROM runs WHERE state = 'dead' AND reason LIKE '%delivery limit%'") == 1
                }
                #expect(
                    try await sys.count(
                        """
                        SELECT count(*) FROM dead_letters WHERE run_id IS NOT NULL AND reason LIKE 'delivery limit \
                        exceeded%'
                        """
                    ) == 1)
            }
        }
    }

    /// A bare consumer of the system's work queue that holds one message at a time and acks
    /// nothing: a worker that dies (`stop`) or fails (`nack`) with whatever it took.
    static func holdingConsumer(_ sys: System, _ topo: ConveyorTopology) -> AMQPConsumer {
        AMQPConsumer(
            configuration: sys.amqp, topology: topo.work(queues: [sys.queue]), queues: [topo.workQueue(sys.queue)],
            prefetch: 1, logger: Servers.logger)
    }

    /// Starts `dying` (a `holdingConsumer`), creates `tasks`, and returns the first message it
    /// took, held unacked until `dying` stops.
    static func holdOne(_ dying: AMQPConsumer, _ sys: System, creating tasks: [NewTask]) async throws -> AMQPDelivery? {
        dying.start()
        try await dying.waitUntilConsuming()
        try await sys.store.createTasks(tasks)
        for await d in dying.deliveries { return d }
        return nil
    }

    /// A message handed back by a dying consumer comes back redelivered; the worker moves it to
    /// the queue's isolation lane (confirm, then ack), takes it from there and runs it once; the
    /// message that was never returned runs straight from the work queue.
    @Test func aRedeliveredMessageIsRunFromTheIsolationLane() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            let topo = ConveyorTopology(prefix: sys.prefix)
            // A "worker" that dies holding the message: takes it and closes without an ack.
            let dying = Self.holdingConsumer(sys, topo)
            try await withServices([dispatcher]) {
                let taken = try await Self.holdOne(
                    dying, sys, creating: [try sys.task(["name": "returned"]), try sys.task(["name": "fresh"])])
                #expect(taken?.redelivered == false)
                dying.stop()
                let worker = sys.worker(["script": ScriptedExecutor(recorder: recorder)])
                _ = try await withServices([worker]) {
                    try await sys.eventually {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 2
                    }
                }
                #expect(worker.stats.isolated == 1, "only the returned message went through the lane")
                #expect(recorder.executions.withLock { $0.values.sorted() } == [1, 1], "each run executed once")
                #expect(try await sys.count("SELECT count(*) FROM dead_letters") == 0)
                let inspector = AMQPInspector(configuration: sys.amqp)
                defer { inspector.close() }
                let depth = try await topo.workQueueDepths([sys.queue], asking: inspector)[sys.queue]
                #expect(
                    depth.map { [$0.ready, $0.isolated] } == [0, 0],
                    "nothing left behind in either queue: \(String(describing: depth))")
            }
        }
    }

    /// When the broker will not take the copy into the lane, the worker runs the redelivered
    /// message itself: never dropped, never acked unrun. Here the broker returns the copy as
    /// unroutable (the test-only switch `isolation-unroutable` addresses it to a queue that does
    /// not exist). A lane deleted by hand no longer does this: the worker's consumer is told
    /// (`basic.cancel`) and declares the lane again (`AMQPTests`).
    @Test func aRedeliveredMessageRunsInPlaceWhenTheBrokerRefusesTheCopy() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            let topo = ConveyorTopology(prefix: sys.prefix)
            let dying = Self.holdingConsumer(sys, topo)
            let worker = sys.worker(["script": ScriptedExecutor(recorder: recorder)]) {
                $0.faults.isolationUnroutable = true
            }
            try await withServices([dispatcher]) {
                _ = try await Self.holdOne(dying, sys, creating: [try sys.task(["name": "returned"])])
                try await withServices([worker]) {
                    try await sys.eventually(timeout: .seconds(10), "worker ready") { worker.isReady }
                    dying.stop()  // the message comes back, redelivered, to the worker
                    try await sys.eventually {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 1
                    }
                }
                #expect(worker.stats.isolated == 0, "the copy was not confirmed, so nothing counts as moved")
                #expect(recorder.executions.withLock { $0.values.sorted() } == [1], "run once, here")
            }
        }
    }

    /// A lane whose quorum queue does not answer (after a broker crash its Ra server was once
    /// seen not to come back for minutes) leaves the work queue consumed: the worker takes its
    /// lanes on a connection of their own. Here the lane's Ra server is stopped by hand, so the
    /// broker times out every `basic.consume` on it; with the lanes on the work queue's
    /// connection the worker consumed nothing at all.
    @Test func aLaneThatDoesNotAnswerLeavesTheWorkQueueConsumed() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            let lane = ConveyorTopology(prefix: sys.prefix).isolationQueue(sys.queue)
            let server = "{'%2F_\(lane)', node()}"
            try await withServices([dispatcher]) {
                try await sys.eventually(timeout: .seconds(10), "the dispatcher declared the lane") {
                    try Servers.rabbitmqctl(["list_queues", "name"]).contains(lane)
                }
                let stopped = try Servers.rabbitmqctl(["eval", "ra:stop_server(quorum_queues, \(server))."])
                try #require(stopped.contains("ok"), "stopping the lane's Ra server: \(stopped)")
                defer { _ = try? Servers.rabbitmqctl(["eval", "ra:restart_server(quorum_queues, \(server))."]) }
                let worker = sys.worker(["script": ScriptedExecutor(recorder: recorder)])
                try await withServices([worker]) {
                    try await sys.store.createTasks([try sys.task(["name": "a"]), try sys.task(["name": "b"])])
                    try await sys.eventually(timeout: .seconds(30), "both runs succeeded with the lane down") {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 2
                    }
                    #expect(worker.isReady, "ready: consuming its work queue and able to report")
                }
            }
        }
    }

    // MARK: priorities

    /// Workers saturated by background work; critical work added later starts within the broker
    /// backlog plus the in-flight work, not behind the whole backlog.
    @Test func criticalWorkOvertakesABackgroundBacklog() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let backlog = 4
            let concurrency = 2
            let dispatcher = sys.dispatcher {
                $0.maxBacklogPerQueue = backlog
                $0.groups = 1
            }
            let worker = sys.worker(["script": ScriptedExecutor(recorder: recorder)], concurrency: concurrency)
            try await withServices([dispatcher, worker]) {
                try await sys.store.createTasks(
                    try (0..<60).map {
                        try sys.task([
                            "name": .string("bg-\($0)"), "priority": "background",
                            "parameters": .object(["sleep_ms": .number(100)]),
                        ])
                    })
                try await sys.eventually { recorder.starts.withLock { $0.count } >= 6 }
                let added = ContinuousClock.now
                try await sys.store.createTasks(
                    try (0..<5).map {
                        try sys.task([
                            "name": .string("crit-\($0)"), "priority": "critical",
                            "parameters": .object(["sleep_ms": .number(100)]),
                        ])
                    })
                try await sys.eventually(timeout: .seconds(30)) {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 65
                }
                let starts = recorder.starts.withLock { $0 }
                let lastCritical = try #require(starts.lastIndex { $0.0.hasPrefix("crit-") })
                let backgroundInBetween = starts[..<lastCritical].filter { $0.0.hasPrefix("bg-") && $0.1 > added }.count
                #expect(
                    backgroundInBetween <= backlog + concurrency,
                    "\(backgroundInBetween) background runs started between adding the critical work and its last start"
                )
                #expect(starts.filter { $0.0.hasPrefix("bg-") }.count == 60)
            }
        }
    }

    // MARK: schedules and misfires

    @Test func cronTasksFireOnTheirSecondsAndIntervalsStayOnTheGrid() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            try await withServices([sys.dispatcher(), sys.worker(["script": ScriptedExecutor(recorder: recorder)])]) {
                try await sys.store.createTasks([
                    try sys.task(["name": "every-second", "schedule": "* * * * * *", "timezone": "Europe/London"]),
                    try sys.task(["name": "interval", "schedule": "every 700ms"]),
                ])
                func runs(_ task: String) async throws -> Int {
                    try await sys.count(
                        "SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = $1", [task])
                }
                _ = try await sys.eventually("three cron and four interval occurrences") {
                    let (cron, interval) = (try await runs("every-second"), try await runs("interval"))
                    return cron >= 3 && interval >= 4
                }
                try await sys.store.setPaused(true, names: ["every-second", "interval"])
                let cron = try await sys.rows(
                    """
                    SELECT extract(epoch FROM occurrence) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = \
                    'every-second' ORDER BY 1
                    """
                )
                .map { Double($0[0]!)! }
                #expect(cron.count >= 3, "\(cron)")
                #expect(cron.allSatisfy { $0 == $0.rounded() }, "cron occurrences are whole seconds")
                #expect(zip(cron, cron.dropFirst()).allSatisfy { $1 - $0 == 1 })
                let grid = try await sys.rows(
                    """
                    SELECT extract(epoch FROM occurrence) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = \
                    'interval' ORDER BY 1
                    """
                )
                .map { Double($0[0]!)! }
                #expect(grid.count >= 4)
                #expect(zip(grid, grid.dropFirst()).allSatisfy { abs($1 - $0 - 0.7) < 0.0011 }, "\(grid)")
            }
        }
    }

    /// Ten occurrences missed (the task's first due time is 95 s ago), decided by each policy,
    /// exactly once although two dispatchers race for them.
    @Test func misfirePoliciesDecideMissedOccurrencesOnce() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let config: (inout DispatcherConfiguration) -> Void = { $0.misfireGrace = .seconds(2) }
            let dispatchers = [sys.dispatcher(config), sys.dispatcher(config)]
            try await withServices(dispatchers + [sys.worker(["script": ScriptedExecutor(recorder: recorder)])]) {
                let start = Timestamp.format(Date().addingTimeInterval(-95))
                try await sys.store.createTasks(
                    try ["skip", "once", "all"].map { p in
                        try sys.task([
                            "name": .string(p), "schedule": "every 10s", "start": .string(start), "misfire": .string(p),
                            "max_catchup": 3,
                        ])
                    })
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 4
                }
                // Both dispatchers scan twice more: any occurrence decided twice would be a run by now.
                let scanned = dispatchers.map(\.stats.scans)
                try await sys.eventually("two more scans by each dispatcher") {
                    zip(dispatchers, scanned).allSatisfy { $0.stats.scans >= $1 + 2 }
                }
                let byTask = Dictionary(
                    uniqueKeysWithValues: try await sys.rows(
                        """
                        SELECT t.name, count(r.id), t.skipped_occurrences, extract(epoch FROM t.next_run_at - now())
                            FROM tasks t
                        LEFT JOIN runs r ON r.task_id = t.id GROUP BY t.id
                        """
                    ).map { ($0[0]!, ($0[1]!, $0[2]!, Double($0[3]!)!)) })
                #expect(byTask["skip"]?.0 == "0" && byTask["skip"]?.1 == "10")
                #expect(byTask["once"]?.0 == "1" && byTask["once"]?.1 == "9")
                #expect(byTask["all"]?.0 == "3" && byTask["all"]?.1 == "7")
                for (_, v) in byTask { #expect(v.2 > 0 && v.2 <= 10, "next occurrence is the next one on the grid") }
            }
        }
    }

    // MARK: overlap, concurrency keys, rate limits

    @Test func overlapPolicies() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            try await withServices([
                sys.dispatcher(), sys.worker(["script": ScriptedExecutor(recorder: recorder)], concurrency: 8),
            ]) {
                let slow: JSONValue = .object(["sleep_ms": .number(900)])
                try await sys.store.createTasks(
                    try ["forbid", "queue", "replace"].map { p in
                        try sys.task([
                            "name": .string(p), "schedule": "every 300ms", "overlap": .string(p), "parameters": slow,
                        ])
                    })
                func count(_ sql: String) async throws -> Int { try await sys.count(sql) }
                _ = try await sys.eventually("each policy has had its say") {
                    let started = try await count(
                        """
                        SELECT min(n) FROM (SELECT count(r.started_at) AS n FROM tasks t LEFT JOIN runs r ON \
                        r.task_id = t.id WHERE t.name IN ('forbid', 'queue') GROUP BY t.id) s
                        """)
                    let replaced = try await count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'replace' AND \
                        r.state = 'cancelled' AND r.reason LIKE 'replaced%'
                        """)
                    return started >= 2 && replaced >= 2 && recorder.cancelled.withLock { $0.count } >= 1
                }
                try await sys.store.setPaused(true, names: ["forbid", "queue", "replace"])
                _ = try await sys.eventually("the runs in flight ended") {
                    try await count("SELECT count(*) FROM runs WHERE state IN ('queued', 'dispatched', 'running')") == 0
                }
                for name in ["forbid", "queue"] {
                    let spans = try await sys.rows(
                        """
                        SELECT extract(epoch FROM started_at), extract(epoch FROM finished_at) FROM runs r JOIN tasks t
                            ON t.id = r.task_id
                        WHERE t.name = $1 AND started_at IS NOT NULL ORDER BY started_at
                        """, [name]
                    ).map { (Double($0[0]!)!, Double($0[1] ?? "1e12")!) }
                    #expect(spans.count >= 2, "\(name) ran")
                    #expect(
                        zip(spans, spans.dropFirst()).allSatisfy { $1.0 >= $0.1 - 0.01 },
                        "\(name): runs never overlap: \(spans)")
                    #expect(try await sys.count("SELECT skipped_occurrences FROM tasks WHERE name = $1", [name]) > 0)
                }
                // queue: at most one waiting, which ran when the active one ended.
                #expect(
                    try await sys.count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'queue' AND \
                        r.state = 'scheduled'
                        """
                    ) <= 1)
                // replace: each new occurrence cancelled the running one.
                #expect(
                    try await sys.count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'replace' AND \
                        r.state = 'cancelled' AND r.reason LIKE 'replaced%'
                        """
                    ) >= 2)
                #expect(
                    recorder.cancelled.withLock { $0.count } >= 1, "a replaced run's executor was stopped on the worker"
                )
            }
        }
    }

    @Test func concurrencyKeysHoldAcrossDispatchersAndQueueRatesAreLimited() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            try await withServices([
                sys.dispatcher(), sys.dispatcher(),
                sys.worker(["script": ScriptedExecutor(recorder: recorder)], concurrency: 12),
            ]) {
                try await sys.store.createTasks(
                    try (0..<12).map {
                        try sys.task([
                            "name": .string("keyed-\($0)"), "concurrency": .object(["key": "customer:42", "limit": 2]),
                            "parameters": .object(["sleep_ms": .number(300)]),
                        ])
                    })
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 12
                }
                let spans = try await sys.rows(
                    "SELECT extract(epoch FROM started_at), extract(epoch FROM finished_at) FROM runs"
                )
                .map { (Double($0[0]!)!, Double($0[1]!)!) }
                let most = spans.map { s in spans.filter { $0.0 <= s.0 && $0.1 > s.0 }.count }.max() ?? 0
                #expect(most <= 2, "at most 2 in flight for the key, saw \(most)")

                try await sys.store.setRateLimit(queue: sys.queue, rate: 5, burst: 1)
                try await sys.store.createTasks(try (0..<11).map { try sys.task(["name": .string("rated-\($0)")]) })
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 23
                }
                let spread = try await sys.rows(
                    """
                    SELECT extract(epoch FROM max(dispatched_at) - min(dispatched_at)) FROM runs r JOIN tasks t ON t.id
                        = r.task_id WHERE t.name LIKE 'rated-%'
                    """)
                #expect(Double(spread[0][0]!)! >= 1.8, "11 runs at 5/s with a burst of 1 take at least 2 s")
            }
        }
    }

    @Test func concurrencyKeysArePerNamespace() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            try await withServices([
                sys.dispatcher(), sys.worker(["script": ScriptedExecutor(recorder: recorder)], concurrency: 8),
            ]) {
                // The same key name with limit 1 in namespaces a and b: two keys, so b's run goes
                // out while a's holds its slot; a second task in a waits for a's slot.
                for (namespace, name) in [("a", "a-1"), ("a", "a-2"), ("b", "b-1")] {
                    try await sys.store.createTasks([
                        try sys.task([
                            "name": .string(name), "namespace": .string(namespace),
                            "concurrency": .object(["key": "k", "limit": 1]),
                            "parameters": .object(["sleep_ms": .number(1500)]),
                        ])
                    ])
                }
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 3
                }
                let spans = try await sys.rows(
                    """
                    SELECT t.namespace, extract(epoch FROM r.started_at), extract(epoch FROM r.finished_at)
                    FROM runs r JOIN tasks t ON t.id = r.task_id ORDER BY r.started_at
                    """
                ).map { (namespace: $0[0]!, start: Double($0[1]!)!, end: Double($0[2]!)!) }
                let a = spans.filter { $0.namespace == "a" }
                let b = spans.filter { $0.namespace == "b" }
                #expect(a.count == 2 && b.count == 1)
                #expect(
                    zip(a, a.dropFirst()).allSatisfy { $1.start >= $0.end - 0.01 },
                    "within namespace a the limit of 1 holds: \(a)")
                #expect(
                    b.contains { r in a.contains { $0.start < r.end && r.start < $0.end } },
                    "namespace b's run was in flight while one of a's was (the key is per namespace): \(spans)")
            }
        }
    }

    // MARK: DAGs, groups, cancel

    @Test func dependenciesRunAsOneWorkflowAndFailuresSkipDependents() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            try await withServices([sys.dispatcher(), sys.worker(["script": ScriptedExecutor(recorder: recorder)])]) {
                let fail: JSONValue = .object(["fail": .bool(true)])
                try await sys.store.createTasks([
                    try sys.task(["name": "extract"]),
                    try sys.task(["name": "clean", "depends_on": ["extract"]]),
                    try sys.task(["name": "enrich", "depends_on": ["extract"], "parameters": fail]),
                    try sys.task(["name": "load", "depends_on": ["clean", "enrich"]]),
                    try sys.task(["name": "report", "depends_on": ["load"]]),
                    try sys.task(["name": "alert", "depends_on": ["enrich"], "trigger_rule": "one_failed"]),
                    try sys.task(["name": "cleanup", "depends_on": ["clean", "enrich"], "trigger_rule": "all_done"]),
                ])
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state IN ('succeeded', 'failed', 'skipped')")
                        == 7
                }
                let states = Dictionary(
                    uniqueKeysWithValues: try await sys.rows(
                        "SELECT t.name, r.state FROM runs r JOIN tasks t ON t.id = r.task_id"
                    ).map { ($0[0]!, $0[1]!) })
                #expect(
                    states == [
                        "extract": "succeeded", "clean": "succeeded", "enrich": "failed", "load": "skipped",
                        "report": "skipped",
                        "alert": "succeeded", "cleanup": "succeeded",
                    ])
                #expect(try await sys.count("SELECT count(DISTINCT workflow_run_id) FROM runs") == 1)
                #expect(try await sys.count("SELECT count(*) FROM runs WHERE workflow_run_id IS NULL") == 0)
                #expect(
                    try await sys.count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'load' AND \
                        r.reason LIKE '%enrich ended failed%'
                        """
                    ) == 1)
                // Dependents never start before their upstreams end.
                let clean = try await sys.rows(
                    """
                    SELECT extract(epoch FROM r.started_at) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name \
                    = 'cleanup'
                    """
                )
                let ups = try await sys.rows(
                    """
                    SELECT max(extract(epoch FROM r.finished_at)) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE \
                    t.name IN ('clean', 'enrich')
                    """
                )
                #expect(Double(clean[0][0]!)! >= Double(ups[0][0]!)!)
                // A second trigger of the root is a second workflow run.
                let extract = try await sys.store.task(named: "extract")
                _ = try await sys.store.trigger(taskID: try #require(extract).id)
                try await sys.eventually {
                    let workflows = try await sys.count(
                        """
                        SELECT count(DISTINCT workflow_run_id) FROM runs WHERE state IN ('succeeded', 'failed', \
                        'skipped')
                        """
                    )
                    let ended = try await sys.count(
                        "SELECT count(*) FROM runs WHERE state IN ('succeeded', 'failed', 'skipped')")
                    return workflows == 2 && ended == 14
                }
            }
        }
    }

    @Test func cyclesSelfDependenciesDuplicatesAndTwoRootsAreRefused() async throws {
        try await System.with { sys in
            func refused(_ specs: [[String: JSONValue]], _ mention: String) async throws {
                let tasks = try specs.map { try sys.task($0) }
                await #expect { try await sys.store.createTasks(tasks) } throws: { e in
                    guard let v = e as? ValidationError else { return false }
                    return v.field == "depends_on" && (v.hint.contains(mention) || v.value.contains(mention))
                }
            }
            try await refused(
                [
                    ["name": "a", "schedule": "manual", "depends_on": ["b"]],
                    ["name": "b", "schedule": "manual", "depends_on": ["c"]],
                    ["name": "c", "schedule": "manual", "depends_on": ["a"]],
                ], "cycle")
            try await refused(
                [["name": "x"], ["name": "y"], ["name": "z", "depends_on": ["x", "y"]]], "different root")
            try await refused([["name": "p"], ["name": "q", "depends_on": ["nope"]]], "nope")
            #expect(throws: ValidationError.self) { try sys.task(["name": "s", "depends_on": ["s"]]) }
            #expect(throws: ValidationError.self) { try sys.task(["name": "d", "depends_on": ["p", "p"]]) }
            #expect(throws: ValidationError.self) {
                try sys.task(["name": "d", "schedule": "every 5s", "depends_on": ["p"]])
            }
            #expect(try await sys.count("SELECT count(*) FROM tasks") == 0, "a refused batch creates nothing")
        }
    }

    @Test func cancellingARunningRunStopsItsExecutorAndGroupsPauseAndCount() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            try await withServices([dispatcher, sys.worker(["script": ScriptedExecutor(recorder: recorder)])]) {
                try await sys.store.createTasks([
                    try sys.task([
                        "name": "long", "group": "nightly", "parameters": .object(["sleep_ms": .number(30_000)]),
                    ]),
                    try sys.task(["name": "ticker", "group": "nightly", "schedule": "every 200ms"]),
                ])
                try await sys.eventually {
                    try await sys.count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'long' AND \
                        r.state = 'running'
                        """
                    ) == 1
                }
                let longRow = try await sys.rows(
                    "SELECT r.id FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'long'")
                let run = try #require(longRow.first?[0].flatMap(UUID.init(uuidString:)))
                let asked = ContinuousClock.now
                #expect(try await sys.store.cancel(runs: [run]) == [run])
                try await sys.eventually("the worker stopped the executor") {
                    recorder.cancelled.withLock { $0.contains(run) }
                }
                #expect(ContinuousClock.now - asked < .seconds(5))
                #expect(try await sys.store.run(id: run)?.state == .cancelled)

                #expect(try await sys.store.setPaused(true, group: "nightly") == 2)
                let before = try await sys.count("SELECT count(*) FROM runs")
                // Once the ticker is due again, a scan that claims nothing shows the pause holds.
                _ = try await sys.eventually("the ticker is due") {
                    try await sys.count("SELECT count(*) FROM tasks WHERE name = 'ticker' AND next_run_at <= now()")
                        == 1
                }
                #expect(await dispatcher.scanOnce() == 0, "a paused group starts nothing")
                #expect(try await sys.count("SELECT count(*) FROM runs") == before)
                let counts = try await sys.store.runCounts(group: "nightly")
                #expect(counts[.cancelled] == 1 && (counts[.succeeded] ?? 0) >= 2)
            }
        }
    }

    @Test func retentionDeletesOldRunsAndPurgesDeletedTasksInBatches() async throws {
        try await System.with { sys in
            try await sys.store.createTasks([try sys.task(["name": "old"]), try sys.task(["name": "gone"])])
            _ = try await sys.pool.withConnection { c in
                try await c.simple(
                    """
                    INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at, finished_at)
                    SELECT gen_random_uuid(), t.id, now() - make_interval(mins => g), 1, 'succeeded', 'work', 0, now(),
                        now() - interval '40 days'
                    FROM tasks t, generate_series(1, 1500) g;
                    INSERT INTO callbacks (run_id, url, payload, created_at)
                    VALUES (gen_random_uuid(), 'https://example.com/a', '{}', now() - interval '40 days'),
                           (gen_random_uuid(), 'https://example.com/b', '{}', now() - interval '40 days'),
                           (gen_random_uuid(), 'https://example.com/c', '{}', now());
                    """)
            }
            #expect(try await sys.store.deleteTask(named: "gone"))
            var deleted = 0
            while true {
                let n = try await sys.store.purgeBatch(runsAge: .seconds(30 * 86_400), tasksAge: .zero, batch: 1000)
                if n == 0 { break }
                deleted += n
            }
            #expect(deleted == 3003)
            #expect(try await sys.count("SELECT count(*) FROM runs") == 0)
            #expect(
                try await sys.rows("SELECT url FROM callbacks") == [["https://example.com/c"]],
                "only old callbacks are deleted")
            #expect(try await sys.count("SELECT count(*) FROM tasks") == 1)
        }
    }
}
