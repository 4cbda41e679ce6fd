public import ConveyorAMQP
import ConveyorBroker
public import ConveyorConfig
public import ConveyorCore
import ConveyorFaults
import ConveyorTelemetry
import Foundation
public import Logging
public import ServiceLifecycle
import Synchronization
import Tracing

/// Consumes task messages, runs each with its executor under the task's timeout, and reports
/// `started` and `finished` on the status queue. A task message is acknowledged only after its
/// `finished` status is confirmed by the broker, so a worker that dies mid-task loses nothing:
/// the broker redelivers the message.
///
/// Workers never touch PostgreSQL; RabbitMQ is their only dependency.
public final class Worker: Service, Sendable {
    public let configuration: WorkerConfiguration
    /// The executors and their limits, replaced as a whole by `reload`; each run takes the set
    /// current when it starts and keeps it to the end.
    let current: Mutex<ExecutorSet>
    /// Consumes the work queues (prefetch `concurrency`).
    let consumer: AMQPConsumer
    /// Consumes their isolation lanes (prefetch 1) on a connection of its own: a lane whose
    /// quorum queue does not answer (seen after a broker crash) leaves the work queues consumed.
    /// Each ack goes back to the consumer its delivery came from (`source(of:)`).
    let lanes: AMQPConsumer
    /// Each work queue's broker name → its isolation lane.
    let isolationLanes: [String: String]
    /// The lanes themselves (`isolationLanes`' values).
    let laneQueues: Set<String>
    /// Message ids this worker is moving to a lane now (copy published, original not yet acked).
    let isolating = Mutex<[String: Int]>([:])
    /// This worker's control queue: cancel requests fanned out by dispatchers.
    let control: AMQPConsumer
    let publisher: AMQPPublisher
    /// Sends statuses through `publisher`, several to a message when several wait.
    package let statuses: StatusBatcher
    /// Cancel signals of the runs in flight, and runs cancelled recently (a task message that
    /// arrives after its cancel is skipped).
    let cancels = CancelRegistry()
    /// The deadlines of the runs in flight (timeouts, `started` reports). Its loop runs as long
    /// as `run` does, drain included, so a run's timeout fires while the worker drains.
    let timers = RunTimers()
    let topology: ConveyorTopology
    let logger: Logger
    let counts: WorkerCounts

    public struct Counters: Sendable {
        public var succeeded = 0
        public var failed = 0
        public var rejected = 0
        /// Task messages past their `start_by`, acknowledged and not run (the dispatcher expires the run).
        public var expired = 0
        public var inFlight = 0
        /// Runs acknowledged early because they ran past `detach_after_ms`.
        public var detached = 0
        public var heartbeats = 0
        /// Redelivered task messages moved to their isolation lane.
        public var isolated = 0
    }

    /// Builds executors on reload.
    let factory: ExecutorFactory

    public init(
        configuration: WorkerConfiguration, executors: [String: any Executor], amqp: AMQPConfiguration, logger: Logger,
        factory: ExecutorFactory = ExecutorFactory()
    ) {
        self.configuration = configuration
        self.factory = factory
        current = Mutex(ExecutorSet(executors: executors, limits: configuration.executorLimits))
        var logger = logger
        logger[metadataKey: "worker.id"] = "\(configuration.id)"
        self.logger = logger
        counts = WorkerCounts(worker: configuration.id)
        let topology = ConveyorTopology(prefix: configuration.prefix, deliveryLimit: configuration.deliveryLimit)
        self.topology = topology
        let work = topology.workerWork(queues: configuration.queues)
        let prefetch = UInt16(min(configuration.concurrency, 65_535))
        let named = "worker \(configuration.id)"
        consumer = AMQPConsumer(
            configuration: amqp.named("\(named) work"), topology: work,
            subscriptions: configuration.queues.map { .init(queue: topology.workQueue($0), prefetch: prefetch) },
            logger: logger)
        lanes = AMQPConsumer(
            configuration: amqp.named("\(named) lanes"), topology: topology.workerLanes(queues: configuration.queues),
            subscriptions: configuration.queues.map { .init(queue: topology.isolationQueue($0), prefetch: 1) },
            logger: logger)
        isolationLanes = Dictionary(
            uniqueKeysWithValues: configuration.queues.map { (topology.workQueue($0), topology.isolationQueue($0)) })
        laneQueues = Set(isolationLanes.values)
        publisher = AMQPPublisher(
            configuration: amqp.named("\(named) status"), topology: topology.workerPublish,
            window: 1024, logger: logger)
        statuses = StatusBatcher(publisher: publisher, exchange: topology.statusExchange)
        control = AMQPConsumer(
            configuration: amqp.named("\(named) control"), topology: topology.control(worker: configuration.id),
            queues: [topology.controlQueue(worker: configuration.id)], prefetch: 100, logger: logger)
    }

    public var stats: Counters { counts.snapshot }
    /// A worker from its settings (`config/worker.yaml` and the environment), with executors
    /// built by `factory`: register your own types on it first. The factory is kept for reloads.
    public static func make(
        settings s: Settings, factory: ExecutorFactory = ExecutorFactory(), logger: Logger,
        idSuffix: String = ""
    ) throws -> Worker {
        var c = try WorkerConfiguration(settings: s)
        c.id += idSuffix
        let executors = try factory.make(names: c.executorNames, settings: s)
        return Worker(
            configuration: c, executors: executors, amqp: try AMQPConfiguration(settings: s), logger: logger,
            factory: factory)
    }

    /// Brings the series the worker reads from its connections (readiness, reconnections) up to date;
    /// the process calls it when `/metrics` is read, before writing the registry out.
    package func refreshMetrics() { counts.connections(ready: isReady, reconnects: consumerReconnects) }

    /// The names of the executors offered now.
    public var executorNames: [String] { current.withLock { $0.executors.keys.sorted() } }

    /// Replaces the executors from `settings` (the worker's YAML and environment), as on SIGHUP:
    /// runs that start from now on use the new ones; runs in flight finish on the old. When the
    /// new settings are invalid, throws the error and keeps the old executors. Settings that
    /// need a restart (queues, concurrency, id) are reported in the returned notes and left as
    /// they are.
    @discardableResult
    public func reload(from settings: Settings) throws(ValidationError) -> [String] {
        let next = try WorkerConfiguration(settings: settings)
        let executors = try factory.make(names: next.executorNames, settings: settings)
        var notes: [String] = []
        if next.queues != configuration.queues {
            notes.append("worker.queues changed to \(next.queues): takes effect at restart")
        }
        if next.concurrency != configuration.concurrency {
            notes.append("worker.concurrency changed to \(next.concurrency): takes effect at restart")
        }
        current.withLock { $0 = ExecutorSet(executors: executors, limits: next.executorLimits) }
        logger.info("executors reloaded", metadata: ["worker.executors": "\(executors.keys.sorted())"])
        for n in notes { logger.warning("\(n)") }
        return notes
    }
    /// How often the task consumer reconnected.
    public var consumerReconnects: Int { consumer.reconnectCount }
    /// Ready when connected and consuming.
    public var isReady: Bool { consumer.isConsuming && publisher.isConnected }

    public func run() async throws {
        publisher.start()
        consumer.start()
        lanes.start()
        control.start()
        do {
            try await timers.serving { () async throws in try await consumeAndDrain() }
        } catch {
            await closeConnections()
            throw error
        }
        await closeConnections()
        logger.info(
            "worker stopped", metadata: ["worker.succeeded": "\(stats.succeeded)", "worker.failed": "\(stats.failed)"])
    }

    /// The last step of the shutdown: each connection's thread writes what is queued for it (the
    /// acks of the runs that just ended) and closes it before `run` returns and the process exits.
    /// Closed together: none waits on another (statuses were confirmed before their acks were
    /// queued), so a stuck one costs its 5 s once, not once per connection.
    func closeConnections() async {
        async let control = control.close()
        async let work = consumer.close()
        async let lanes = lanes.close()
        async let status = publisher.close()
        _ = await (control, work, lanes, status)
    }

    /// The consumer a delivery came from: its ack, reject or nack must go back there.
    func source(of delivery: AMQPDelivery) -> AMQPConsumer {
        laneQueues.contains(delivery.queue) ? lanes : consumer
    }

    /// Whether every broker connection has been closed (`run` returned).
    package var connectionsClosed: Bool {
        control.hasEnded && consumer.hasEnded && lanes.hasEnded && publisher.hasEnded
    }

    func consumeAndDrain() async throws {
        try await publisher.waitUntilConnected()
        // Heartbeats start before the consumer: they name this worker's queues, and a dispatcher
        // declares the ones it does not know yet, which the consumer (declaring passively) waits
        // for. They go on through the drain, so a draining worker is not declared lost.
        try await withThrowingTaskGroup(of: Void.self) { beats in
            beats.addTask { await self.heartbeatLoop() }
            defer { beats.cancelAll() }
            try await consumer.waitUntilConsuming()
            logger.info(
                "worker consuming",
                metadata: [
                    "worker.queues": "\(configuration.queues)", "worker.concurrency": "\(configuration.concurrency)",
                    "worker.executors": "\(executorNames)",
                ])
            await consumeUntilDrained()
            // The goodbye goes last, once the beats have stopped: no heartbeat follows it.
            beats.cancelAll()
            try? await beats.waitForAll()
            await sayGoodbye()
        }
    }

    /// The last heartbeat, `leaving`: the dispatcher shows this worker `stopped` rather than
    /// declaring it lost when its heartbeats stop (a scale-down is not an incident). Waits for
    /// the broker's confirm at most 2 s: a worker that cannot say goodbye is declared lost, as before.
    func sayGoodbye() async {
        guard publisher.isConnected else { return }
        let sent = Wakeup()
        let message = heartbeatMessage(host: ProcessInfo.processInfo.hostName, leaving: true)
        Task {
            do {
                try await publisher.publish(message)
                sent.signal()
            } catch {
                logger.debug("goodbye not published", metadata: ["error": "\(error)"])
            }
        }
        if await sent.wait(timeout: .seconds(2)) {
            logger.info("said goodbye: the dispatchers show this worker stopped")
        } else {
            logger.warning("goodbye not confirmed within 2 s; the dispatchers will declare this worker lost")
        }
    }

    /// A heartbeat as published: who this worker is, what it offers, the runs it holds.
    func heartbeatMessage(host: String, leaving: Bool? = nil) -> AMQPOutgoingMessage {
        let beat = HeartbeatMessage(
            workerID: configuration.id, host: host, queues: configuration.queues,
            executors: executorNames, concurrency: configuration.concurrency,
            inFlight: cancels.inFlightIDs, intervalSeconds: configuration.heartbeatInterval.inSeconds,
            leaving: leaving)
        return AMQPOutgoingMessage(
            exchange: topology.statusExchange, routingKey: "status", body: MessageCodec.encode(beat),
            properties: AMQPProperties(
                contentType: "application/json", messageID: "heartbeat:\(configuration.id)",
                type: heartbeatMessageType, timestamp: UInt64(Date().timeIntervalSince1970), persistent: false))
    }

    /// Publishes a heartbeat every `heartbeat_interval_ms` until cancelled: who this worker is,
    /// what it offers, and the runs it holds.
    func heartbeatLoop() async {
        let host = ProcessInfo.processInfo.hostName
        let interval = configuration.heartbeatInterval
        while !Task.isCancelled {
            let message = heartbeatMessage(host: host)
            if publisher.isConnected {
                do {
                    try await publisher.publish(message)
                    counts.count(.heartbeat)
                } catch {
                    logger.debug("heartbeat not published", metadata: ["error": "\(error)"])
                }
            }
            try? await configuration.clock.sleep(for: interval)
        }
    }

    /// Waits until no run is in hand (true) or `grace` passes on the configured clock (false).
    func drain(within grace: Duration) async -> Bool {
        await withTaskGroup(of: Bool.self) { race in
            race.addTask {
                while self.stats.inFlight > 0 {
                    guard await self.counts.idle.waitUntilSignalled() else { return false }
                }
                return true
            }
            race.addTask {
                // The deadline, or this drain cancelled from outside: either way not drained (the
                // count below still decides when the runs did end).
                try? await self.configuration.clock.sleep(for: grace)
                return false
            }
            let drained = await race.next() ?? false
            race.cancelAll()
            return drained || stats.inFlight == 0
        }
    }

    /// Consumes until graceful shutdown, then drains: in-flight runs get `shutdown_grace_ms`.
    func consumeUntilDrained() async {
        do {
            try await withGracefulShutdownHandler {
                try await withThrowingDiscardingTaskGroup { group in
                    group.addTask { await self.controlLoop() }
                    // The work queues' and the lanes' deliveries, as one stream. Ends when graceful
                    // shutdown stops both consumers.
                    let (deliveries, merged) = AsyncStream.makeStream(of: AMQPDelivery.self)
                    group.addTask {
                        await withDiscardingTaskGroup { pumps in
                            for source in [self.consumer, self.lanes] {
                                pumps.addTask { for await d in source.deliveries { merged.yield(d) } }
                            }
                        }
                        merged.finish()
                    }
                    for await delivery in deliveries {
                        counts.inFlight(+1)
                        group.addTask {
                            await self.waitForOwnIsolation(of: delivery)
                            if await !self.isolate(delivery) { await self.handle(delivery) }
                            self.counts.inFlight(-1)
                        }
                    }
                    // Drain: in-flight runs get `shutdownGrace` to finish; past it, the group is
                    // cancelled and the runs left are not acked, so the broker redelivers them.
                    group.addTask {
                        if await !self.drain(within: self.configuration.shutdownGrace) {
                            throw DrainDeadlinePassed(left: self.stats.inFlight)
                        }
                    }
                }
            } onGracefulShutdown: {
                self.consumer.stopConsuming()
                self.lanes.stopConsuming()
                self.control.stopConsuming()
            }
        } catch let e as DrainDeadlinePassed {
            logger.warning(
                "drain deadline passed; runs stopped (redelivered by the broker, or reported lost when detached)",
                metadata: [
                    "worker.shutdown_grace": "\(configuration.shutdownGrace)", "worker.in_flight": "\(e.left)",
                ])
        } catch {
            logger.error("worker consumption ended with an error", metadata: ["error": "\(error)"])
        }
    }
}
