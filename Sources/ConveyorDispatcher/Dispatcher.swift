package import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorFaults
import ConveyorPostgres
package import ConveyorStore
import ConveyorTelemetry
import Foundation
package import Logging
import ServiceLifecycle
import Synchronization
import Tracing

/// Scans PostgreSQL for due work and publishes it; consumes status events and records them.
///
/// Runs as one `Service`: on graceful shutdown it stops claiming, finishes the batch in hand,
/// records the statuses already received, and closes its connections.
package final class Dispatcher: Service, Sendable {
    package let configuration: DispatcherConfiguration
    package let store: Store
    package let publisher: AMQPPublisher
    package let statusConsumer: AMQPConsumer
    /// Consumes `conveyor.dead`: dead-lettered messages end their runs `dead`.
    package let deadConsumer: AMQPConsumer
    let listener: PostgresListener?
    let topology: ConveyorTopology
    /// Asks the broker for its work queues' depths (maintenance), on one kept connection.
    let inspector: AMQPInspector
    let logger: Logger
    let wakeup: Wakeup
    let maintenanceWakeup = Wakeup()
    /// Records the status queue (its own service, run and stopped by `run()`).
    let recorder: StatusRecorder
    /// Confirmed runs waiting for their `dispatched` mark.
    let marks: DispatchMarks
    /// Delivers callbacks (its own service, run and stopped by `run()`).
    let callbacks: CallbackDeliverer
    /// The work queues this dispatcher has declared.
    let workQueues: WorkQueues
    let counters = Mutex(Counters())
    let stopping = Atomic<Bool>(false)
    /// The parts of `run()` (scan, maintenance, dead letters, status recorder, callbacks) that
    /// have not returned yet. A test reads it to know that shutdown has reached a given point.
    let parts = Atomic<Int>(0)
    /// An alarm probe is in flight (see `brokerTakesPublishes`).
    let probing = Atomic<Bool>(false)
    /// Runs this dispatcher created since its last `ANALYZE` (see `refreshStatisticsAfterBursts`).
    let createdSinceAnalyze = Atomic<Int>(0)
    /// What the scan knows of the due tasks waiting for room (`DueWalks`).
    let dueWalks = Mutex(DueWalks())
    /// The status-proof signer, read from PostgreSQL once.
    let proofs: StatusProofs

    /// Totals since start, for logs, `bench` and tests.
    package struct Counters: Sendable {
        /// Scan ticks ended (whether or not anything was due).
        package var scans = 0
        package var published = 0
        package var publishFailed = 0
        package var statusApplied = 0
        /// Final outcomes recorded.
        package var outcomesRecorded = 0
        package var statusIgnored = 0
        /// Statuses refused: malformed (dead-lettered), or without this attempt's proof (acked away).
        package var statusRejected = 0
        package var statusForged = 0
        /// Retries scheduled, runs ended dead, runs declared lost, runs expired (never started),
        /// dead letters recorded.
        package var retried = 0
        package var dead = 0
        package var lost = 0
        package var expired = 0
        package var deadLetters = 0
        package var cancelsSent = 0
        package var analyzes = 0
        /// Scan ticks that claimed nothing because due tasks only waited for room (`scanTick`).
        package var idleWaits = 0
        package var heartbeats = 0
        package var workersLost = 0
        /// Workers that said goodbye (drained; shown `stopped`).
        package var workersLeft = 0
        /// Times the start-up found the database schema older than this build (`waitForSchema`).
        package var schemaWaits = 0
        /// Callback attempts: delivered, to be retried, given up.
        package var callbacksDelivered = 0
        package var callbacksRetried = 0
        package var callbacksFailed = 0
    }

    package init(
        configuration: DispatcherConfiguration, store: Store, amqp: AMQPConfiguration, databaseURL: String?,
        logger: Logger
    ) {
        self.configuration = configuration
        self.store = store
        self.logger = logger
        let topology = ConveyorTopology(prefix: configuration.prefix, deliveryLimit: configuration.deliveryLimit)
        self.topology = topology
        let named = "dispatcher \(ProcessInfo.processInfo.hostName)-\(getpid())"
        var pubConfig = amqp.named("\(named) publish")
        pubConfig.publishWithoutConfirms = configuration.faults.publishWithoutConfirms
        publisher = AMQPPublisher(
            configuration: pubConfig,
            topology: topology.work(queues: configuration.queues).merging(topology.status).merging(
                topology.controlPublish),
            window: 1024, logger: logger)
        statusConsumer = AMQPConsumer(
            configuration: amqp.named("\(named) status"), topology: topology.status, queues: [topology.statusQueue],
            prefetch: UInt16(min(configuration.statusBatchSize * 2, 60_000)), logger: logger)
        inspector = AMQPInspector(configuration: amqp.named(named))
        deadConsumer = AMQPConsumer(
            configuration: amqp.named("\(named) dead"), topology: topology.base, queues: [topology.deadQueue],
            prefetch: 200, logger: logger)
        listener = databaseURL.map { PostgresListener(url: $0, channels: ["conveyor_due"], logger: logger) }
        let workQueues = WorkQueues(
            publisher: publisher, topology: topology, declared: configuration.queues, logger: logger)
        self.workQueues = workQueues
        let wakeup = Wakeup()
        self.wakeup = wakeup
        marks = DispatchMarks(lease: configuration.publishLease)
        let proofs = StatusProofs(store: store)
        self.proofs = proofs
        let callbacks = CallbackDeliverer(
            settings: configuration.callbacks, store: store, interval: configuration.maintenanceInterval,
            logger: logger)
        self.callbacks = callbacks
        recorder = StatusRecorder(
            consumer: statusConsumer, store: store, proofs: proofs, queue: topology.statusQueue,
            batchSize: configuration.statusBatchSize, lostGrace: configuration.lostGrace, logger: logger,
            hooks: .init(
                heartbeatQueues: { queues in await workQueues.declare(queues, fromHeartbeat: true) },
                committed: { r in
                    if r.applied > 0 { wakeup.signal() }
                    if r.settled.callbacks > 0 { callbacks.wakeup.signal() }
                }))
    }

    /// Totals of the dispatcher and its recorder and callback deliverer.
    package var stats: Counters {
        var c = counters.withLock { $0 }
        let r = recorder.stats
        c.statusApplied = r.applied
        c.statusIgnored = r.ignored
        c.outcomesRecorded = r.outcomes
        c.statusRejected = r.rejected
        c.statusForged = r.forged
        c.retried += r.retried
        c.dead += r.dead
        c.heartbeats = r.heartbeats
        c.workersLeft = r.workersLeft
        let b = callbacks.stats
        c.callbacksDelivered = b.delivered
        c.callbacksRetried = b.retried
        c.callbacksFailed = b.failed
        return c
    }

    /// The status-proof signer; its secret is read from PostgreSQL once, then kept.
    func statusProof() async throws -> StatusProof { try await proofs.current() }

    /// Ready when the status publisher is connected and the status queue is consumed.
    package var isReady: Bool { publisher.isConnected && statusConsumer.isConsuming }

    package func run() async throws {
        guard try await waitForSchema() else { return }
        publisher.start()
        statusConsumer.start()
        deadConsumer.start()
        listener?.start()
        do {
            try await runParts()
        } catch {
            await closeConnections()
            throw error
        }
        await closeConnections()
        logger.info(
            "dispatcher stopped",
            metadata: ["dispatcher.published": "\(stats.published)", "dispatcher.recorded": "\(stats.statusApplied)"])
    }

    /// Waits until the database has every migration this build knows: in a rolling upgrade the
    /// new version's pods may start before the migrate Job has run. Nothing is connected (so not
    /// ready) meanwhile. False if shutdown came first.
    func waitForSchema() async throws -> Bool {
        let migrator = try Migrator(logger: logger)
        var logged: ContinuousClock.Instant?
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            do {
                let missing = try await migrator.pending(store.pool)
                if missing.isEmpty { return true }
                counters.withLock { $0.schemaWaits += 1 }
                if logged.map({ ContinuousClock.now - $0 > .seconds(30) }) ?? true {
                    logger.warning("waiting: \(Migrator.waitingMessage(missing))")
                    logged = ContinuousClock.now
                }
            } catch {
                logger.warning("cannot read the schema's version; retrying", metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: .seconds(1))
        }
        return false
    }

    /// The last step of the shutdown: each broker connection's thread writes what is queued for it
    /// (the acks of the statuses just recorded) and closes it before `run` returns.
    func closeConnections() async {
        listener?.stop()
        inspector.close()
        // Closed together: a stuck one costs its 5 s once, not once per connection.
        async let dead = deadConsumer.close()
        async let status = statusConsumer.close()
        async let publish = publisher.close()
        _ = await (dead, status, publish)
    }

    /// Whether the publisher's and both consumers' connections are closed (`run` returned; the
    /// inspector's closes in the background).
    package var connectionsClosed: Bool { statusConsumer.hasEnded && deadConsumer.hasEnded && publisher.hasEnded }

    func runParts() async throws {
        try await store.waitUntilReachable()
        try await publisher.waitUntilConnected()
        try await statusConsumer.waitUntilConsuming()
        logger.info(
            "dispatcher running",
            metadata: [
                "dispatcher.groups": "\(configuration.groups)", "dispatcher.batch_size": "\(configuration.batchSize)",
            ])

        // Shutdown, in order: intake stops (no scan, no new status or dead letter, no new callback
        // claim); every part finishes the work in hand (the recorder records what it received,
        // callbacks in flight end) and returns; only then do the connections close (`closeConnections`),
        // so no ack or recording is cut short. The NOTIFY listener is only a wake-up source.
        try await withGracefulShutdownHandler {
            try await withThrowingTaskGroup(of: Void.self) { wakeups in
                if let listener {
                    wakeups.addTask {
                        for await _ in listener.notifications {
                            // A task made due now may sort before where the walks got to.
                            self.dueWalks.withLock { $0.forgetPositions() }
                            self.wakeup.signal()
                        }
                    }
                }
                try await withThrowingDiscardingTaskGroup { group in
                    let all: [@Sendable () async throws -> Void] = [
                        { await self.scanLoop() }, { await self.markLoop() }, { await self.maintenanceLoop() },
                        { await self.deadLetterLoop() },
                        { try await self.recorder.run() }, { try await self.callbacks.run() },
                    ]
                    for part in all {
                        self.parts.add(1, ordering: .relaxed)
                        group.addTask {
                            defer { self.parts.subtract(1, ordering: .relaxed) }
                            try await part()
                        }
                    }
                }
                listener?.stop()
                wakeups.cancelAll()
            }
        } onGracefulShutdown: {
            self.stopping.store(true, ordering: .relaxed)
            self.wakeup.signal()
            self.marks.wakeup.signal()
            self.maintenanceWakeup.signal()
            self.deadConsumer.stopConsuming()
        }
    }

    /// The parts of `run()` still running (0 before it starts and after it returns).
    package var partsRunning: Int { parts.load(ordering: .relaxed) }

    @discardableResult
    func untilCommitted(_ what: String, _ body: () async throws -> Void) async -> Bool {
        await retryUntilCommitted(what, logger: logger, stopping: { stopping.load(ordering: .relaxed) }, body)
    }
}

/// Runs `body` (a transaction, then the ack of what it recorded) until it succeeds, with
/// backoff. The transactions are idempotent, so a commit of unknown outcome is safe to redo.
/// Past three failures while `stopping()` it gives up: nothing was acked, so the broker
/// redelivers the messages to another dispatcher. Returns whether `body` succeeded.
func retryUntilCommitted(
    _ what: String, logger: Logger, stopping: () -> Bool, _ body: () async throws -> Void
) async -> Bool {
    var attempt = 0
    while true {
        do {
            try await body()
            return true
        } catch {
            attempt += 1
            logger.warning("\(what) failed; retrying", metadata: ["attempt": "\(attempt)", "error": "\(error)"])
            if stopping() && attempt > 3 { return false }
            try? await Task.sleep(for: Backoff.delay(attempt: attempt, base: .milliseconds(100), cap: .seconds(5)))
        }
    }
}
