import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorDispatcher
import ConveyorPostgres
import ConveyorStore
import ConveyorWorker
import Foundation
import Logging
import Synchronization
import Testing

@Suite(
    "End to end: Postgres → dispatcher → RabbitMQ → worker → status → Postgres",
    .enabled(if: Servers.available, Comment(rawValue: Servers.skipMessage)), .serialized)
struct EndToEndTests {
    @Test func thousandDueTasksAreEachRecordedOnceWithTheirTraceContext() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            let workers = [
                sys.worker(["record": RecordingExecutor(recorder: recorder)]),
                sys.worker(["record": RecordingExecutor(recorder: recorder)]),
            ]
            try await withServices([dispatcher] + workers) {
                try await sys.store.createTasks(sys.tasks(1000))
                let done = try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 1000
                }
                let states = try await sys.store.runCounts()
                #expect(done, "runs by state: \(states), executions \(recorder.total)")
            }
            #expect(try await sys.count("SELECT count(*) FROM runs") == 1000)
            #expect(try await sys.count("SELECT count(DISTINCT task_id) FROM runs") == 1000)
            #expect(
                try await sys.count(
                    "SELECT count(*) FROM runs WHERE finished_at IS NULL OR started_at IS NULL OR worker_id IS NULL")
                    == 0)
            #expect(try await sys.count("SELECT count(*) FROM runs WHERE started_at > finished_at") == 0)
            // Each run's outcome was applied once. These runs are shorter than the worker's
            // `started_after_ms`, so `finished` alone moved each one (it carries the start time).
            #expect(dispatcher.stats.outcomesRecorded == 1000)
            #expect(dispatcher.stats.statusApplied == 1000)
            // Every task message carried a traceparent: the worker's execute span continues the
            // trace the dispatcher stored on the run.
            let runs = try await sys.store.runs(limit: 2000)
            let traceparents = recorder.traceparents.withLock { $0 }
            #expect(traceparents.count == 1000)
            for r in runs {
                let seen = try #require(traceparents[r.id])
                #expect(seen.split(separator: "-")[1] == Substring(r.traceID ?? "?"))
                #expect(seen != r.traceparent, "the worker's span must be a child, not the dispatch span itself")
            }
        }
    }

    @Test func twoDispatchersNeverDispatchAnOccurrenceTwice() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let d1 = sys.dispatcher()
            let d2 = sys.dispatcher()
            let worker = sys.worker(["record": RecordingExecutor(recorder: recorder)], concurrency: 64)
            try await withServices([d1, d2, worker]) {
                // Interval tasks keep both dispatchers contending for the same rows, tick after tick,
                // and a burst of one-offs lands at once.
                try await sys.store.createTasks(sys.tasks(200, schedule: .interval(seconds: 0.2), name: "every"))
                try await sys.store.createTasks(sys.tasks(1000, name: "once"))
                _ = try await sys.eventually("both dispatchers published and 2,000 runs exist") {
                    let runs = try await sys.count("SELECT count(*) FROM runs")
                    return d1.stats.published > 0 && d2.stats.published > 0 && runs > 1000 + 200 * 5
                }
                _ = try await sys.pool.withConnection { c in try await c.simple("UPDATE tasks SET paused = true") }
                let quiet = try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state NOT IN ('succeeded')") == 0
                }
                let states = try await sys.store.runCounts()
                let stuck = try await sys.pool.withConnection { c in
                    try await c.query(
                        """
                        SELECT id, state, publish_count, dispatched_at IS NOT NULL, worker_id FROM runs WHERE state \
                        <> 'succeeded' LIMIT 5
                        """
                    ).rows.map { $0.values }
                }
                #expect(
                    quiet,
                    """
                    runs by state: \(states); stuck: \(stuck); executions \(recorder.total); d1 \(d1.stats) d2 \
                    \(d2.stats) worker \(worker.stats)
                    """
                )
            }
            let runs = try await sys.count("SELECT count(*) FROM runs")
            #expect(runs > 1000 + 200 * 5, "both dispatchers did real work")
            #expect(d1.stats.published > 0 && d2.stats.published > 0, "both dispatchers claimed work")
            #expect(
                try await sys.count(
                    "SELECT count(*) FROM (SELECT task_id, occurrence FROM runs GROUP BY 1, 2 HAVING count(*) > 1) d")
                    == 0)
            // No run was published twice: every run executed exactly once.
            let executions = recorder.executions.withLock { $0 }
            #expect(executions.count == runs)
            #expect(executions.values.allSatisfy { $0 == 1 })
            #expect(d1.stats.published + d2.stats.published == runs)
        }
    }

    @Test func aWorkerKilledMidTaskLosesNothing() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            let env = [
                "CONVEYOR_AMQP_URL": sys.workerAMQPURL, "CONVEYOR_AMQP_PREFIX": sys.prefix,
                "CONVEYOR_WORKER_QUEUES": sys.queue,
                "CONVEYOR_WORKER_EXECUTORS": "sleep", "CONVEYOR_WORKER_CONCURRENCY": "4",
                "CONVEYOR_WORKER_ID": "doomed",
            ]
            let doomed = try spawnConveyor(["worker"], env: env)
            defer { if doomed.isRunning { kill(doomed.processIdentifier, SIGKILL) } }
            try await withServices([dispatcher]) {
                try await sys.store.createTasks(
                    sys.tasks(3, executor: "sleep", parameters: .object(["seconds": .number(2)])))
                let running = try await sys.eventually(timeout: .seconds(30)) {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'running' AND worker_id = 'doomed'")
                        == 3
                }
                try #require(running)
                kill(doomed.processIdentifier, SIGKILL)
                doomed.waitUntilExit()
                // Another worker picks up the redelivered messages.
                let survivor = sys.worker(["sleep": SleepExecutor()], id: "survivor")
                try await withServices([survivor]) {
                    let done = try await sys.eventually(timeout: .seconds(60)) {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 3
                    }
                    #expect(done)
                }
            }
            #expect(try await sys.count("SELECT count(*) FROM runs") == 3)
            #expect(
                try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded' AND worker_id = 'survivor'")
                    == 3)
        }
    }

    @Test func duplicateAndReorderedStatusesAreNoOps() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            let topo = ConveyorTopology(prefix: sys.prefix)
            let pub = AMQPPublisher(configuration: sys.amqp, topology: topo.status, logger: Servers.logger)
            pub.start()
            defer { pub.stop() }
            try await pub.waitUntilConnected()
            // Nobody consumes the work queue: the runs stay dispatched until we report on them.
            try await withServices([dispatcher]) {
                try await sys.store.createTasks(sys.tasks(20))
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 20
                }
                let runs = try await sys.store.runs(limit: 100)
                let t0 = Date(timeIntervalSince1970: 1_800_000_000)
                var statuses: [StatusMessage] = []
                for (i, r) in runs.enumerated() {
                    let outcome: Outcome = i % 2 == 0 ? .succeeded : .failed
                    let finished = StatusMessage(
                        runID: r.id, attempt: 1, event: .finished, outcome: outcome, exitCode: i % 2,
                        workerID: "w-real", at: t0)
                    let late = StatusMessage(
                        runID: r.id, attempt: 1, event: .finished,
                        outcome: outcome == .succeeded ? .failed : .succeeded,
                        workerID: "w-late", at: t0.addingTimeInterval(60))
                    let started = StatusMessage(
                        runID: r.id, attempt: 1, event: .started, workerID: "w-started", at: t0.addingTimeInterval(-1))
                    // finished first, then its duplicate, then a contradicting late result, then a reordered started.
                    statuses += [finished, finished, late, started]
                }
                statuses = try await sys.signed(statuses)
                for s in statuses {
                    try await pub.publish(sealedStatus(s, exchange: topo.statusExchange))
                }
                try await sys.eventually {
                    dispatcher.stats.statusApplied + dispatcher.stats.statusIgnored == statuses.count
                }
            }
            #expect(
                dispatcher.stats.outcomesRecorded == 20, "one outcome per run, whatever the duplicates and the order")
            #expect(
                try await sys.count(
                    "SELECT count(*) FROM runs WHERE worker_id = 'w-real' AND finished_at = $1::timestamptz",
                    [Date(timeIntervalSince1970: 1_800_000_000)]) == 20)
            #expect(try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 10)
            #expect(try await sys.count("SELECT count(*) FROM runs WHERE state = 'failed'") == 10)
        }
    }

    /// A program may print NUL bytes, which PostgreSQL text cannot hold: such an output is
    /// recorded (NUL as U+FFFD), and the statuses behind it are not held up.
    /// A retry is a new run, so a new `CONVEYOR_RUN_ID` (`Idempotency-Key` over http); every
    /// attempt of one occurrence carries the same `CONVEYOR_OCCURRENCE_KEY`
    /// (`Conveyor-Occurrence-Key`): the key that deduplicates a side effect which an attempt
    /// declared lost may already have made.
    @Test func everyAttemptOfAnOccurrenceCarriesOneOccurrenceKey() async throws {
        try await System.with { sys in
            var env = sys.workerEnvironment(id: "occurrence-worker", executors: "shell")
            env["CONVEYOR_EXECUTORS_SHELL_ALLOWED_COMMANDS"] = "/usr/bin/printenv"
            let worker = try spawnConveyor(["worker"], env: env)
            defer { if worker.isRunning { worker.terminate() } }
            var task = NewTask(name: "twice", executor: "shell", schedule: .once)
            task.queue = sys.queue
            // printenv prints the two keys, then exits 1 for the missing third name: each attempt fails.
            task.parameters = [
                "argv": ["/usr/bin/printenv", "CONVEYOR_OCCURRENCE_KEY", "CONVEYOR_RUN_ID", "CONVEYOR_NOT_SET"]
            ]
            task.retry = try RetryPolicy(maxAttempts: 2, json: ["base_seconds": 0.1, "jitter": false])
            try await sys.store.createTasks([task])
            try await withServices([sys.dispatcher()]) {
                _ = try await sys.eventually(timeout: .seconds(60), "both attempts end") {
                    try await sys.count("SELECT count(*) FROM runs WHERE finished_at IS NOT NULL") == 2
                }
            }
            let rows = try await sys.rows(
                """
                SELECT r.id::text, r.output, t.id::text, \
                to_char(r.occurrence AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') \
                FROM runs r JOIN tasks t ON t.id = r.task_id ORDER BY r.attempt
                """)
            try #require(rows.count == 2)
            let expected = "\(rows[0][2] ?? "")@\(rows[0][3] ?? "")"
            for row in rows {
                let lines = (row[1] ?? "").split(separator: "\n").map(String.init)
                #expect(lines.first == expected, "occurrence key of attempt \(row[0] ?? ""): \(lines)")
                #expect(lines.dropFirst().first == row[0]?.lowercased(), "run id of attempt: \(lines)")
            }
            #expect(rows[0][0] != rows[1][0])
        }
    }

    /// Issue 23 item 1: a run published but never started ends `expired` after its task's
    /// schedule-to-start timeout (plus the lost grace) and is retried. Its message, still in the
    /// broker when a worker finally comes, is refused (past `start_by`), so the occurrence runs
    /// once: without the worker's check attempt 1 runs too, without the dispatcher's expiry the
    /// run stays `dispatched`.
    @Test func aRunNobodyStartsExpiresIsRetriedAndItsOldMessageNeverRuns() async throws {
        try await System.with { sys in
            var task = NewTask(name: "unstarted", executor: "record", schedule: .once)
            task.queue = sys.queue
            task.scheduleToStartSeconds = 3
            task.retry = try RetryPolicy(maxAttempts: 2, json: ["base_seconds": 0.1, "jitter": false])
            try await sys.store.createTasks([task])
            let dispatcher = sys.dispatcher { $0.lostGrace = .milliseconds(500) }
            let recorder = Recorder()
            try await withServices([dispatcher]) {
                // No worker yet: attempt 1 waits in the broker past its start deadline.
                try await sys.eventually(timeout: .seconds(30), "attempt 1 expired, attempt 2 published") {
                    try await sys.count(
                        """
                        SELECT count(*) FROM runs WHERE (attempt = 1 AND state = 'expired')
                            OR (attempt = 2 AND state = 'dispatched')
                        """) == 2
                }
                let worker = sys.worker(["record": RecordingExecutor(recorder: recorder)])
                try await withServices([worker]) {
                    try await sys.eventually(timeout: .seconds(30), "attempt 2 succeeds") {
                        try await sys.count("SELECT count(*) FROM runs WHERE attempt = 2 AND state = 'succeeded'") == 1
                    }
                    try await sys.eventually(timeout: .seconds(10), "the worker refused attempt 1's message") {
                        worker.stats.expired == 1
                    }
                }
                #expect(dispatcher.stats.expired == 1)
            }
            let rows = try await sys.rows("SELECT attempt::text, id::text, state, reason FROM runs ORDER BY attempt")
            try #require(rows.count == 2)
            #expect(rows[0][2] == "expired")
            #expect(rows[0][3]?.contains("schedule-to-start timeout") == true, "reason: \(rows[0][3] ?? "")")
            let second = try #require(rows[1][1].flatMap(UUID.init(uuidString:)))
            #expect(recorder.executions.withLock { $0 } == [second: 1], "only attempt 2 executes")
        }
    }
    @Test func anOutputHoldingANulIsRecordedAndHoldsNothingUp() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            try await withServices([dispatcher]) {
                try await sys.store.createTasks(sys.tasks(2))
                try await sys.eventually {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 2
                }
                let runs = try await sys.store.runs(limit: 10)
                try await sys.withPublisher(ConveyorTopology(prefix: sys.prefix).status) { pub, topo in
                    for (i, r) in runs.enumerated() {
                        let s = StatusMessage(
                            runID: r.id, attempt: 1, event: .finished, outcome: .succeeded, exitCode: 0,
                            output: i == 0 ? "before\0after" : "plain", errorMessage: i == 0 ? "a\0b" : nil,
                            workerID: "w\0nul", at: Date(), proof: try await sys.proof(r.id))
                        try await pub.publish(sealedStatus(s, exchange: topo.statusExchange))
                    }
                }
                try await sys.eventually(timeout: .seconds(20), "both outcomes recorded") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 2
                }
            }
            #expect(
                try await sys.count(
                    "SELECT count(*) FROM runs WHERE output = $1 AND error_message = $2 AND worker_id = $3",
                    ["before\u{FFFD}after", "a\u{FFFD}b", "w\u{FFFD}nul"]) == 1)
            #expect(dispatcher.stats.outcomesRecorded == 2)
        }
    }

    /// A publisher of the test's own onto the work queue, connected, for messages no dispatcher
    /// would send; the caller stops it.
    static func rawPublisher(_ sys: System) async throws -> (AMQPPublisher, ConveyorTopology) {
        let topo = ConveyorTopology(prefix: sys.prefix)
        let pub = AMQPPublisher(
            configuration: sys.amqp, topology: topo.work(queues: [sys.queue]), logger: Servers.logger)
        pub.start()
        do {
            try await pub.waitUntilConnected()
        } catch {
            pub.stop()
            throw error
        }
        return (pub, topo)
    }

    @Test func malformedMessagesAndUnknownExecutorsAreDeadLetteredWithAReason() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            let worker = sys.worker(["record": RecordingExecutor(recorder: recorder)])
            let (pub, topo) = try await Self.rawPublisher(sys)
            defer { pub.stop() }
            try await withServices([dispatcher, worker]) {
                try await sys.store.createTasks(sys.tasks(5, executor: "no-such-executor", name: "unknown"))
                try await sys.store.createTasks(sys.tasks(5, name: "good"))
                for body in ["{not json", "{\"version\": 1}", "\u{FF}\u{FE}"] {
                    try await pub.publish(
                        AMQPOutgoingMessage(
                            exchange: topo.tasksExchange, routingKey: sys.queue, body: Array(body.utf8),
                            properties: AMQPProperties(type: taskMessageType)))
                }
                // The dispatcher consumes conveyor.dead and keeps every dead letter.
                try await sys.eventually {
                    let ended = try await sys.count("SELECT count(*) FROM runs WHERE state IN ('succeeded', 'dead')")
                    let letters = try await sys.count("SELECT count(*) FROM dead_letters")
                    return ended == 10 && letters == 8
                }
            }
            // A poison message is never retried: the run ends dead with the worker's error, whichever
            // arrived first (the worker's status: "refused"; the dead letter: "rejected by a worker").
            #expect(
                try await sys.count(
                    """
                    SELECT count(*) FROM runs WHERE state = 'dead' AND error_class = 'unknown_executor' AND
                        error_message LIKE '%no-such-executor%'
                    AND (reason LIKE '%refused%' OR reason LIKE '%rejected by a worker%')
                    """) == 5)
            #expect(try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 5)
            #expect(
                try await sys.count("SELECT count(*) FROM dead_letters WHERE reason LIKE 'rejected by a worker%'") == 8)
            #expect(try await sys.count("SELECT count(*) FROM dead_letters WHERE run_id IS NOT NULL") == 5)
            #expect(try await sys.count("SELECT count(*) FROM runs WHERE attempt > 1") == 0)
            #expect(worker.stats.rejected == 8)
        }
    }

    /// A status whose value the database refuses for good (here a trigger the test installs
    /// refuses one task's outcome with SQLSTATE 22023, as PostgreSQL refused an exit code past
    /// `integer` or an instant in year 0) is set aside alone: the statuses behind it are recorded,
    /// it is counted (`refused_by_database`), and its run is left as it was. Before, the recorder
    /// retried that batch forever, and no outcome behind it was recorded.
    @Test func aStatusTheDatabaseRefusesIsSetAsideAndTheOthersRecorded() async throws {
        try await System.with { sys in
            _ = try await sys.rows(
                """
                CREATE FUNCTION test_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.state = 'succeeded' AND EXISTS (SELECT 1 FROM tasks WHERE id = NEW.task_id AND name = 'poison')
                    THEN
                        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'refused by the test';
                    END IF;
                    RETURN NEW;
                END $$
                """)
            _ = try await sys.rows(
                """
                CREATE TRIGGER test_refuse_poison BEFORE UPDATE ON runs FOR EACH ROW
                    EXECUTE FUNCTION test_refuse_poison()
                """)
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            try await withServices([dispatcher, sys.worker(["script": ScriptedExecutor(recorder: recorder)])]) {
                try await sys.store.createTasks([try sys.task(["name": "poison"])])
                try await sys.eventually("the poison's outcome reached the recorder") {
                    dispatcher.stats.statusRejected == 1
                        || dispatcher.stats.statusApplied == 0
                            && recorder.starts.withLock { $0.count } == 1
                }
                try await sys.store.createTasks(try (0..<5).map { try sys.task(["name": .string("behind-\($0)")]) })
                try await sys.eventually(timeout: .seconds(20), "the five behind it are recorded") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 5
                }
                // Counted after the commit of its batch (which may be the five's): waited for.
                try await sys.eventually("the refused one is counted") { dispatcher.stats.statusRejected == 1 }
                #expect(
                    try await sys.count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id
                        WHERE t.name = 'poison' AND r.finished_at IS NULL
                        """) == 1, "left as it was")
            }
        }
    }

    /// A custom executor reports an exit code PostgreSQL's `integer` cannot hold (`ExecutionResult`
    /// takes any Int): the worker reports it as null, naming the code in the error message, and
    /// the run ends failed; the runs beside it are recorded. Before, the status carried the code,
    /// the database refused the batch it came in, and the recorder retried that batch forever.
    @Test func anExitCodeOutside32BitsIsRecordedAsNullNotABlockedRecorder() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            try await withServices([sys.dispatcher(), sys.worker(["script": ScriptedExecutor(recorder: recorder)])]) {
                try await sys.store.createTasks(
                    [
                        try sys.task([
                            "name": "huge-exit", "parameters": .object(["fail": true, "exit_code": 1_099_511_627_776]),
                        ])
                    ] + (0..<5).map { try sys.task(["name": .string("beside-\($0)")]) })
                try await sys.eventually(timeout: .seconds(20), "all six are recorded") {
                    try await sys.count("SELECT count(*) FROM runs WHERE finished_at IS NOT NULL") == 6
                }
                #expect(try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 5)
                #expect(
                    try await sys.count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'huge-exit'
                          AND r.state = 'failed' AND r.exit_code IS NULL
                          AND r.error_message LIKE '%exit code 1099511627776 is outside 32 bits%'
                        """) == 1)
            }
        }
    }

    /// A timeout no clock can hold, from the places one can come from: the API's and spec
    /// files' validation refuses it, naming the field (the SQL enqueue function too, since 0018);
    /// a task stored with one before the bound is published and its worker refuses it, so the
    /// run ends dead with the reason; a message published straight to the work queue with one is
    /// refused. Before the bound, the dispatcher trapped formatting the
    /// run's deadline and the worker trapped making its timer, each on every redelivery.
    @Test func aTimeoutNoClockCanHoldIsRefusedNotACrash() async throws {
        try await System.with { sys in
            var huge = sys.tasks(1, name: "forever")[0]
            huge.timeoutSeconds = 1e13
            let refused = await #expect(throws: ValidationError.self) { try await sys.store.createTasks([huge]) }
            #expect(
                refused?.field == "timeout" && refused?.hint.contains("31536000") == true,
                "\(String(describing: refused))")
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            let worker = sys.worker(["record": RecordingExecutor(recorder: recorder)])
            let topo = ConveyorTopology(prefix: sys.prefix)
            try await withServices([dispatcher, worker]) {
                // A task stored with one before the bound (by an earlier version, or by
                // conveyor_enqueue before migration 0018, which refuses it now: EnqueueFunctionTests).
                var stored = NewTask(name: "forever", executor: "record", schedule: .once)
                stored.queue = sys.queue
                stored.startAt = Date().addingTimeInterval(3600)
                try await sys.store.createTasks([stored])
                _ = try await sys.rows(
                    "UPDATE tasks SET timeout_seconds = 1e300, next_run_at = now() WHERE name = 'forever' RETURNING id")
                var message = TaskMessage(
                    runID: UUID(), taskID: UUID(), taskName: "hostile", occurrence: Date(), attempt: 1,
                    queue: sys.queue,
                    executor: "record", parameters: [:], timeoutSeconds: 1e300)
                message.proof = "not-a-proof"
                // Published by pika, another client than Conveyor's, byte for byte.
                try await AdversarialTests.forge(
                    sys, [.init(body: MessageCodec.encode(message), seal: nil)],
                    to: (topo.tasksExchange, sys.queue, taskMessageType))
                try await sys.store.createTasks(sys.tasks(3, name: "good"))
                try await sys.eventually("the enqueued run ended dead, the good ones succeeded, two dead letters") {
                    let dead = try await sys.count(
                        """
                        SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'forever' AND
                            r.state = 'dead' AND r.error_message LIKE '%timeout_seconds%31536000%'
                        """)
                    let good = try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'")
                    let letters = try await sys.count("SELECT count(*) FROM dead_letters")
                    return dead == 1 && good == 3 && letters == 2
                }
                #expect(recorder.total == 3, "only the good runs executed")
                #expect(worker.stats.rejected == 2)
            }
        }
    }

    /// A retry policy stored before its bound (base and cap 1e300, as the API took them): the
    /// retry's delay is clamped to 365 days, so the failed outcome is recorded and the retry
    /// waits. Before, the database refused the interval, and the recorder retried that batch
    /// forever: no outcome on the status queue was recorded after it.
    @Test func aRetryDelayNoIntervalCanHoldIsClampedNotAJam() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            var task = sys.tasks(1, executor: "scripted", parameters: ["fail": true], name: "old-policy")[0]
            task.retry.maxAttempts = 2
            try await sys.store.createTasks([task])
            let updated = try await sys.rows(
                """
                UPDATE tasks SET retry_policy = retry_policy || '{"base_seconds": 1e300, "cap_seconds": 1e300}'::jsonb
                WHERE name = 'old-policy-0' RETURNING id
                """)
            try #require(updated.count == 1)
            try await withServices([sys.dispatcher(), sys.worker(["scripted": ScriptedExecutor(recorder: recorder)])]) {
                try await sys.store.createTasks(sys.tasks(2, executor: "scripted", name: "after"))
                try await sys.eventually("the failure recorded, its retry waiting, the later runs recorded") {
                    let failed = try await sys.count("SELECT count(*) FROM runs WHERE attempt = 1 AND state = 'failed'")
                    let waiting = try await sys.count(
                        """
                        SELECT count(*) FROM runs WHERE attempt = 2 AND state = 'scheduled'
                            AND available_at <= now() + interval '366 days'
                        """)
                    let after = try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'")
                    return failed == 1 && waiting == 1 && after == 2
                }
            }
        }
    }

    /// SIGTERM to a worker process with runs in hand.
    enum Drain: String, CaseIterable, Sendable, CustomTestStringConvertible {
        /// The grace outlasts the runs: they finish where they are, acked, never redelivered.
        case withinGrace
        /// The grace is shorter than the runs: the worker exits, the broker redelivers them.
        case pastGrace
        var testDescription: String { rawValue }
        var graceMS: String { self == .withinGrace ? "20000" : "300" }
    }

    @Test(arguments: Drain.allCases)
    func sigtermDrainsAWorker(_ drain: Drain) async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            let env = [
                "CONVEYOR_AMQP_URL": sys.workerAMQPURL, "CONVEYOR_AMQP_PREFIX": sys.prefix,
                "CONVEYOR_WORKER_QUEUES": sys.queue,
                "CONVEYOR_WORKER_EXECUTORS": "sleep", "CONVEYOR_WORKER_CONCURRENCY": "4",
                "CONVEYOR_WORKER_ID": "draining",
                "CONVEYOR_WORKER_SHUTDOWN_GRACE_MS": drain.graceMS,
            ]
            let draining = try spawnConveyor(["worker"], env: env)
            defer { if draining.isRunning { kill(draining.processIdentifier, SIGKILL) } }
            try await withServices([dispatcher]) {
                try await sys.store.createTasks(
                    sys.tasks(3, executor: "sleep", parameters: .object(["seconds": .number(2)])))
                let running = try await sys.eventually(timeout: .seconds(30), "3 runs on the worker") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'running' AND worker_id = 'draining'")
                        == 3
                }
                try #require(running)
                let signalled = ContinuousClock.now
                kill(draining.processIdentifier, SIGTERM)
                try await sys.eventually(timeout: .seconds(30), "the worker exits") { !draining.isRunning }
                #expect(draining.terminationStatus == 0, "a drained worker exits 0")
                if drain == .pastGrace {
                    #expect(ContinuousClock.now - signalled < .seconds(2), "it did not wait for the 2 s runs")
                }
                if drain == .withinGrace { try await sys.expectNothingToRedeliver() }
                // A second worker now shows what the broker still holds.
                let recorder = Recorder()
                let survivor = sys.worker(["sleep": RecordingExecutor(recorder: recorder)], id: "survivor")
                _ = try await withServices([survivor]) {
                    try await sys.eventually(timeout: .seconds(30), "all 3 succeeded") {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 3
                    }
                }
                switch drain {
                case .withinGrace:
                    #expect(recorder.total == 0, "nothing was redelivered: the drained runs were acked")
                    #expect(
                        try await sys.count(
                            "SELECT count(*) FROM runs WHERE worker_id = 'draining' AND state = 'succeeded'") == 3)
                case .pastGrace:
                    #expect(recorder.total == 3, "the runs cut off by the deadline were redelivered")
                    #expect(
                        try await sys.count(
                            "SELECT count(*) FROM runs WHERE worker_id = 'survivor' AND state = 'succeeded'") == 3)
                }
            }
            #expect(try await sys.count("SELECT count(*) FROM runs") == 3)
        }
    }

    /// How the broker goes away in the middle of a run.
    enum BrokerFault: String, CaseIterable, Sendable, CustomTestStringConvertible {
        /// `rabbitmqctl close_all_connections`: every connection is closed, the port stays open.
        case connectionsClosed
        /// `rabbitmqctl stop_app`, 3 s down with the port closed, then `start_app`.
        case restart

        var testDescription: String { rawValue }

        func inject(whileDown: () async throws -> Void) async throws {
            switch self {
            case .connectionsClosed:
                try Servers.rabbitmqctl(["close_all_connections", "test: broker drops connections"])
            case .restart:
                try Servers.rabbitmqctl(["stop_app"])
                defer { _ = try? Servers.startBrokerApp() }
                try await Task.sleep(for: .seconds(3))
                try await whileDown()
                try Servers.startBrokerApp()
            }
        }
    }

    @Test(arguments: BrokerFault.allCases)
    func aBrokerFaultMidRunLosesNothing(_ fault: BrokerFault) async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let dispatcher = sys.dispatcher(lease: .seconds(3))
            let worker = sys.worker(
                ["record": RecordingExecutor(recorder: recorder, delay: .milliseconds(20))], concurrency: 16)
            try await withServices([dispatcher, worker]) {
                try await sys.store.createTasks(sys.tasks(1500))
                try await sys.eventually("work under way") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") > 100
                }
                try await fault.inject {
                    #expect(!dispatcher.isReady && !worker.isReady, "readiness follows the broker")
                }
                let recovered = try await sys.eventually(timeout: .seconds(120), "all 1500 succeeded") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 1500
                }
                if !recovered {
                    let states = try await sys.store.runCounts()
                    Issue.record("runs by state: \(states)")
                }
                // Everyone that was connected came back.
                try await sys.eventually(timeout: .seconds(15), "all connections back") {
                    dispatcher.statusConsumer.reconnectCount >= 1 && worker.consumerReconnects >= 1
                        && dispatcher.publisher.reconnectCount >= 1
                        && dispatcher.isReady && worker.isReady
                }
            }
            #expect(try await sys.count("SELECT count(*) FROM runs") == 1500)
            #expect(recorder.executions.withLock { $0.count } == 1500, "every run executed")
        }
    }
}

@Suite("Outbox and migrations", .enabled(if: Servers.available, Comment(rawValue: Servers.skipMessage)), .serialized)
struct OutboxAndMigrationTests {
    /// The refresh after a burst (`Store.analyze`): the planner learns the tables' sizes at once,
    /// not a minute later from autovacuum.
    @Test func theRefreshAfterABurstCountsTheRows() async throws {
        try await System.with { sys in
            try await sys.store.createTasks(sys.tasks(4000, name: "burst"))
            try await sys.store.analyze()
            let row = try await sys.rows(
                "SELECT c.reltuples::bigint, (SELECT count(*) FROM tasks) FROM pg_class c WHERE c.oid = 'tasks'::regclass"
            )[0]
            let estimated = Double(row[0] ?? "") ?? -1
            let counted = Double(row[1] ?? "") ?? 0
            #expect(
                counted >= 4000 && abs(estimated - counted) <= counted * 0.2,
                "the planner's row count \(estimated), counted \(counted)")
        }
    }

    @Test func migrateIsSafeToRunConcurrentlyAndTwice() async throws {
        try await Servers.withDatabase { url in
            let pool = PostgresPool(configuration: .init(url: url), logger: Servers.logger)
            defer { pool.close() }
            let migrator = try Migrator(logger: Servers.logger)
            let applied = try await withThrowingTaskGroup(of: [String].self) { g in
                for _ in 0..<3 { g.addTask { try await migrator.migrate(pool) } }
                var all: [[String]] = []
                for try await a in g { all.append(a) }
                return all
            }
            #expect(
                applied.flatMap { $0 }.sorted() == migrator.migrations.map(\.version).sorted(),
                "each migration applied exactly once")
            #expect(try await migrator.migrate(pool).isEmpty)
            let n = try await pool.withConnection { c in
                try await c.query("SELECT count(*) FROM schema_migrations").first!.int(0)
            }
            #expect(n == migrator.migrations.count)
            // Nothing outside the schema the tables are in: a schema named like Conveyor's
            // database role (`conveyor`) becomes that role's first search_path entry, and every
            // later unqualified CREATE went there, schema_migrations included.
            let schemas = try await pool.withConnection { c in
                try await c.query(
                    """
                    SELECT nspname FROM pg_namespace
                    WHERE nspname NOT LIKE 'pg\\_%' AND nspname NOT IN ('public', 'information_schema')
                    """
                ).rows.compactMap { $0[0] }
            }
            #expect(schemas.isEmpty, "migrations created schemas \(schemas)")
        }
    }

    @Test func runsLeftQueuedByADeadDispatcherAreRepublishedAfterTheirLease() async throws {
        try await System.with { sys in
            // A dispatcher "died" after committing its claim and before the broker confirmed:
            // the run is queued, the task already advanced, nothing was published.
            try await sys.store.createTasks(sys.tasks(1, schedule: .once))
            try await sys.pool.withConnection { c in
                try await c.query(
                    """
                    INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at, traceparent,
                        trace_id, publish_count)
                    SELECT $1, id, next_run_at, 1, 'queued', queue, shard, now() + interval '5 seconds',
                           '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01',
                               '0af7651916cd43dd8448eb211c80319c', 1
                    FROM tasks
                    """, [UUID()])
                try await c.query("UPDATE tasks SET next_run_at = NULL")
            }
            let recorder = Recorder()
            let survivor = sys.dispatcher()
            let worker = sys.worker(["record": RecordingExecutor(recorder: recorder)])
            try await withServices([survivor, worker]) {
                // Not before the lease ends: two scans pass it by…
                try await sys.eventually("two scans") { survivor.stats.scans >= 2 }
                #expect(
                    try await sys.count("SELECT count(*) FROM runs WHERE publish_count = 1 AND available_at > now()")
                        == 1,
                    "left alone while its lease holds")
                #expect(recorder.total == 0)
                // …then republished, run once, recorded once, in the stored trace.
                try await sys.eventually(timeout: .seconds(20)) {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded' AND publish_count = 2")
                        == 1
                }
            }
            #expect(recorder.total == 1)
            #expect(
                recorder.traceparents.withLock { $0.values.first?.contains("0af7651916cd43dd8448eb211c80319c") } == true
            )
            #expect(try await sys.count("SELECT count(*) FROM runs") == 1)
        }
    }
}
