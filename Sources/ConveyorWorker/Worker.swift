public import ConveyorAMQP
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
    /// Consumes the work queues (prefetch `concurrency`) and their isolation lanes (prefetch 1)
    /// on one connection, so every ack goes back where its delivery came from.
    let consumer: AMQPConsumer
    /// Each work queue's broker name → its isolation lane.
    let isolationLanes: [String: String]
    /// The lanes themselves (`isolationLanes`' values).
    let laneQueues: Set<String>
    /// Message ids this worker is moving to a lane now (copy published, original not yet acked).
    let isolating = Mutex<[String: Int]>([:])
    /// This worker's control queue: cancel requests fanned out by dispatchers.
    let control: AMQPConsumer
    let publisher: AMQPPublisher
    /// Cancel signals of the runs in flight, and runs cancelled recently (a task message that
    /// arrives after its cancel is skipped).
    let cancels = CancelRegistry()
    let topology: ConveyorTopology
    let logger: Logger
    let counters = Mutex(Counters())

    public struct Counters: Sendable {
        public var succeeded = 0
        public var failed = 0
        public var rejected = 0
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
        let topology = ConveyorTopology(prefix: configuration.prefix, deliveryLimit: configuration.deliveryLimit)
        self.topology = topology
        let work = topology.workerWork(queues: configuration.queues)
        let prefetch = UInt16(min(configuration.concurrency, 65_535))
        let named = "worker \(configuration.id)"
        consumer = AMQPConsumer(
            configuration: amqp.named("\(named) work"), topology: work,
            subscriptions: configuration.queues.map { .init(queue: topology.workQueue($0), prefetch: prefetch) }
                + configuration.queues.map { .init(queue: topology.isolationQueue($0), prefetch: 1) },
            logger: logger)
        isolationLanes = Dictionary(uniqueKeysWithValues: configuration.queues.map { (topology.workQueue($0), topology.isolationQueue($0)) })
        laneQueues = Set(isolationLanes.values)
        publisher = AMQPPublisher(
            configuration: amqp.named("\(named) status"), topology: topology.workerPublish,
            window: 1024, logger: logger)
        control = AMQPConsumer(
            configuration: amqp.named("\(named) control"), topology: topology.control(worker: configuration.id),
            queues: [topology.controlQueue(worker: configuration.id)], prefetch: 100, logger: logger)
    }

    public var stats: Counters { counters.withLock { $0 } }
    /// A worker from its settings (`config/worker.yaml` and the environment), with executors
    /// built by `factory`: register your own types on it first. The factory is kept for reloads.
    public static func make(
        settings s: Settings, factory: ExecutorFactory = ExecutorFactory(), logger: Logger,
        idSuffix: String = ""
    ) throws -> Worker {
        var c = try WorkerConfiguration(settings: s)
        c.id += idSuffix
        let executors = try factory.make(names: c.executorNames, settings: s)
        return Worker(configuration: c, executors: executors, amqp: try AMQPConfiguration(settings: s), logger: logger, factory: factory)
    }

    /// The worker's counters in Prometheus text format (label `worker`).
    public var metricsText: String {
        let c = stats
        let w = "worker=\"\(configuration.id.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\""))\""
        func family(_ name: String, _ type: String, _ help: String, _ samples: [(String, Int)]) -> String {
            "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n" + samples.map { "\(name){\(w)\($0.0)} \($0.1)\n" }.joined()
        }
        return family(
            "conveyor_worker_runs_total", "counter", "Runs this worker finished and reported, by outcome.",
            [(",outcome=\"succeeded\"", c.succeeded), (",outcome=\"failed\"", c.failed)])
            + family(
                "conveyor_worker_messages_rejected_total", "counter", "Task messages refused and dead-lettered (malformed, unknown executor).",
                [("", c.rejected)])
            + family("conveyor_worker_in_flight", "gauge", "Runs executing now.", [("", c.inFlight)])
            + family("conveyor_worker_detached_total", "counter", "Long runs acknowledged early (past worker.detach_after_ms).", [("", c.detached)])
            + family(
                "conveyor_worker_isolated_total", "counter", "Redelivered task messages moved to their queue's isolation lane (run one at a time).",
                [("", c.isolated)])
            + family("conveyor_worker_heartbeats_total", "counter", "Heartbeats published.", [("", c.heartbeats)])
            + family("conveyor_worker_amqp_reconnects_total", "counter", "Reconnections of the task consumer.", [("", consumerReconnects)])
            + family("conveyor_worker_ready", "gauge", "1 when connected and consuming.", [("", isReady ? 1 : 0)])
    }

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
        if next.queues != configuration.queues { notes.append("worker.queues changed to \(next.queues): takes effect at restart") }
        if next.concurrency != configuration.concurrency { notes.append("worker.concurrency changed to \(next.concurrency): takes effect at restart") }
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
        control.start()
        defer {
            control.stop()
            consumer.stop()
            publisher.stop()
        }
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
        }
        logger.info("worker stopped", metadata: ["worker.succeeded": "\(stats.succeeded)", "worker.failed": "\(stats.failed)"])
    }

    /// Publishes a heartbeat every `heartbeat_interval_ms` until cancelled: who this worker is,
    /// what it offers, and the runs it holds.
    func heartbeatLoop() async {
        let host = ProcessInfo.processInfo.hostName
        let interval = configuration.heartbeatInterval
        while !Task.isCancelled {
            let beat = HeartbeatMessage(
                workerID: configuration.id, host: host, queues: configuration.queues,
                executors: executorNames, concurrency: configuration.concurrency,
                inFlight: cancels.inFlightIDs, intervalSeconds: interval.inSeconds)
            let message = AMQPOutgoingMessage(
                exchange: topology.statusExchange, routingKey: "status", body: MessageCodec.encode(beat),
                properties: AMQPProperties(
                    contentType: "application/json", messageID: "heartbeat:\(configuration.id)",
                    type: heartbeatMessageType, timestamp: UInt64(Date().timeIntervalSince1970), persistent: false))
            if publisher.isConnected {
                do {
                    try await publisher.publish(message)
                    counters.withLock { $0.heartbeats += 1 }
                } catch {
                    logger.debug("heartbeat not published", metadata: ["error": "\(error)"])
                }
            }
            try? await Task.sleep(for: interval)
        }
    }

    /// Consumes until graceful shutdown, then drains: in-flight runs get `shutdown_grace_ms`.
    func consumeUntilDrained() async {
        do {
            try await withGracefulShutdownHandler {
                try await withThrowingDiscardingTaskGroup { group in
                    group.addTask { await self.controlLoop() }
                    // Ends when graceful shutdown stops consuming.
                    for await delivery in consumer.deliveries {
                        counters.withLock { $0.inFlight += 1 }
                        group.addTask {
                            await self.waitForOwnIsolation(of: delivery)
                            if await !self.isolate(delivery) { await self.handle(delivery) }
                            self.counters.withLock { $0.inFlight -= 1 }
                        }
                    }
                    // Drain: in-flight runs get `shutdownGrace` to finish; past it, the group is
                    // cancelled and the runs left are not acked, so the broker redelivers them.
                    let deadline = ContinuousClock.now + configuration.shutdownGrace
                    group.addTask {
                        while self.stats.inFlight > 0 {
                            if ContinuousClock.now >= deadline { throw DrainDeadlinePassed(left: self.stats.inFlight) }
                            try await Task.sleep(for: .milliseconds(50))
                        }
                    }
                }
            } onGracefulShutdown: {
                self.consumer.stopConsuming()
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

    /// Moves a task message redelivered from a work queue to that queue's isolation lane:
    /// publishes a copy there, and acks the original once the broker has confirmed the copy.
    /// Returns whether it took the message (moved, or left for redelivery at shutdown); a
    /// message it did not take is the caller's to run.
    ///
    /// Why: when a worker dies, the quorum queue returns every message it held, each with its
    /// delivery count + 1, to the head of the queue. Redelivered together, a message that kills
    /// its worker would take its neighbours to the delivery limit with it. In the lane, taken one
    /// at a time (prefetch 1), it dies alone; an innocent neighbour pays one redelivery, and its
    /// count starts again in the lane. Not taken: a first delivery, one from a lane, and a copy
    /// the broker did not confirm (it is unreachable, the lane is missing), which then runs here
    /// as before the lane existed.
    func isolate(_ delivery: AMQPDelivery) async -> Bool {
        guard delivery.redelivered, let lane = isolationLanes[delivery.queue] else { return false }
        var properties = delivery.properties
        properties.headers["x-delivery-count"] = nil  // the old queue's count; the lane keeps its own
        properties.headers[ConveyorTopology.isolatedFromHeader] = .string(delivery.queue)
        let id = delivery.properties.messageID ?? ""
        isolating.withLock { $0[id, default: 0] += 1 }
        defer { isolating.withLock { $0[id] = $0[id].flatMap { $0 > 1 ? $0 - 1 : nil } } }
        do {
            let target = configuration.faults.isolationUnroutable ? "\(lane).missing" : lane
            try await publisher.publish(
                AMQPOutgoingMessage(exchange: topology.isolateExchange, routingKey: target, body: delivery.body, properties: properties))
        } catch {
            if error.code == .stopped || Task.isCancelled { return true }
            logger.warning(
                "redelivered task message not moved to the isolation lane; running it here",
                metadata: [
                    "amqp.message_id": "\(delivery.properties.messageID ?? "")", "amqp.queue": "\(lane)", "error": "\(error)",
                ])
            return false
        }
        consumer.ack(delivery)
        await consumer.flush()
        counters.withLock { $0.isolated += 1 }
        logger.debug(
            "redelivered task message moved to the isolation lane",
            metadata: [
                "amqp.message_id": "\(delivery.properties.messageID ?? "")", "amqp.queue": "\(lane)",
            ])
        return true
    }

    /// A lane delivery of a message this worker is still moving (its copy confirmed, the
    /// original's ack not yet written) waits until that ack is on the wire. The broker can hand
    /// the copy to this very worker before the confirm arrives; run at once, a copy that kills
    /// its worker would take the unacked original back to the work queue, to be copied again:
    /// one more copy in the lane per crash (a CI run saw four crasher copies dead-lettered from
    /// the lane and the original from the work queue). Bounded at 5 s.
    func waitForOwnIsolation(of delivery: AMQPDelivery) async {
        guard laneQueues.contains(delivery.queue), let id = delivery.properties.messageID else { return }
        let deadline = ContinuousClock.now + .seconds(5)
        while isolating.withLock({ $0[id] != nil }), ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(5))
        }
    }

    func handle(_ delivery: AMQPDelivery) async {
        let message: TaskMessage
        do throws(ValidationError) {
            guard delivery.properties.type == nil || delivery.properties.type == taskMessageType else {
                throw ValidationError(field: "type", value: delivery.properties.type ?? "", hint: "task messages have type \(taskMessageType)")
            }
            message = try MessageCodec.decodeTask(delivery.body)
        } catch {
            let claims = MessageCodec.claims(inMalformed: delivery.body)
            await refuse(
                delivery, runID: claims?.runID, attempt: claims?.attempt ?? 1, proof: claims?.proof, errorClass: "malformed_message",
                reason: "\(error)")
            return
        }
        let set = current.withLock { $0 }
        guard let executor = set.executors[message.executor] else {
            await refuse(
                delivery, runID: message.runID, attempt: message.attempt, proof: message.proof, errorClass: "unknown_executor",
                reason: "this worker offers executors \(set.executors.keys.sorted()), not '\(message.executor)'")
            return
        }
        if let poison = configuration.faults.workerCrashOnTask, poison == message.taskName { FaultInjection.crash() }
        var log = logger
        log[metadataKey: "run.id"] = "\(message.runID)"
        log[metadataKey: "task.name"] = "\(message.taskName)"

        // The execute span: a child of the publish span carried in the headers. Status messages
        // carry its context, so the dispatcher's record spans are its children.
        let span = Traces.startSpan(
            "execute \(message.executor)", context: Traces.context(delivery.properties.headers, using: AMQPHeadersExtractor()),
            kind: .consumer, attributes: executeAttributes(message))
        defer { span.end() }
        let trace = Traces.headers(span.context)
        if let tp = trace["traceparent"]?.split(separator: "-"), tp.count == 4 {
            log[metadataKey: "trace.id"] = "\(tp[1])"
            log[metadataKey: "span.id"] = "\(tp[2])"
        }
        var statusHeaders: AMQPHeaders = [:]
        for (k, v) in trace { statusHeaders[k] = .string(v) }

        let timeout = Duration.milliseconds(Int64(message.timeoutSeconds * 1000))
        let context = ExecutionContext(
            runID: message.runID, taskName: message.taskName, attempt: message.attempt,
            parameters: message.parameters, timeout: timeout,
            traceparent: trace["traceparent"], tracestate: trace["tracestate"],
            idempotencyKey: message.idempotencyKey, logger: log, trace: span.context)
        // A run past its executor's limit waits here, before its timeout starts.
        let slot = set.slots[message.executor]
        if let slot, !(await slot.acquire()) { return }  // shutdown while waiting: left for redelivery
        defer { slot?.release() }
        let cancelSignal = cancels.register(message.runID)
        defer { cancels.unregister(message.runID) }
        let startedAt = Date()
        let started = StatusMessage(
            runID: message.runID, attempt: message.attempt, event: .started, workerID: configuration.id, at: startedAt,
            proof: message.proof)
        if message.attempt == 1 { ConveyorMetrics.fireLateness(seconds: startedAt.timeIntervalSince(message.occurrence)) }
        let detached = Flag()
        var result: ExecutionResult
        if cancels.wasCancelled(message.runID) {
            result = ExecutionResult(outcome: .cancelled, errorClass: "cancelled", errorMessage: "cancelled before it started")
        } else {
            let headers = statusHeaders
            let log = log
            result = await withTaskGroup(of: ExecutionResult?.self) { group in
                group.addTask {
                    await self.reportWhileRunning(started, delivery: delivery, detached: detached, headers: headers, log: log)
                    return nil
                }
                let executorName = message.executor
                group.addTask {
                    let began = ContinuousClock.now
                    let r = await Self.run(executor, context, cancel: cancelSignal)
                    ConveyorMetrics.executorDuration(executor: executorName, ContinuousClock.now - began)
                    return r
                }
                var result: ExecutionResult?
                while let r = await group.next() {
                    if let r {
                        result = r
                        group.cancelAll()
                    }
                }
                return result ?? ExecutionResult(outcome: .failed, errorClass: "executor", errorMessage: "executor returned nothing")
            }
        }
        if Task.isCancelled {
            // The drain deadline passed. A run still held by the broker is left unacked, and the
            // broker redelivers it; a detached one is reported lost, so the dispatcher retries it.
            if detached.isSet {
                let lost = StatusMessage(
                    runID: message.runID, attempt: message.attempt, event: .finished, outcome: .lost,
                    errorClass: "worker_shutdown", errorMessage: "the worker shut down before the run finished",
                    workerID: configuration.id, startedAt: startedAt, proof: message.proof)
                await publishStatus(lost, headers: statusHeaders, log: log)
                log.warning("run stopped by shutdown; reported lost for retry")
            } else {
                log.warning("run stopped by shutdown; left for redelivery")
            }
            return
        }

        span.attributes["conveyor.outcome"] = result.outcome.rawValue
        if result.outcome != .succeeded {
            span.setStatus(SpanStatus(code: .error, message: [result.errorClass, result.errorMessage].compactMap { $0 }.joined(separator: ": ")))
        }
        let finished = StatusMessage(
            runID: message.runID, attempt: message.attempt, event: .finished, outcome: result.outcome,
            exitCode: result.exitCode, output: result.output.map { String($0.suffix(65_536)) },
            errorClass: result.errorClass, errorMessage: result.errorMessage, workerID: configuration.id,
            startedAt: startedAt, proof: message.proof)
        // Ack only after the finished status is confirmed; otherwise the broker redelivers the task.
        guard await publishStatus(finished, headers: statusHeaders, log: log) else { return }
        if !detached.isSet { consumer.ack(delivery) }
        counters.withLock { if result.outcome == .succeeded { $0.succeeded += 1 } else { $0.failed += 1 } }
    }

    /// The execute span's attributes: the run, and OpenTelemetry messaging attributes.
    func executeAttributes(_ m: TaskMessage) -> SpanAttributes {
        var a = SpanAttributes()
        // Not the message's idempotency_key: a received message's is not checked to be the run id.
        let runID = m.runID.lowercasedString
        a["conveyor.run.id"] = runID
        a["conveyor.task.name"] = m.taskName
        a["conveyor.attempt"] = m.attempt
        a["conveyor.executor"] = m.executor
        a["conveyor.queue"] = m.queue
        a["conveyor.worker.id"] = configuration.id
        a["messaging.system"] = "rabbitmq"
        a["messaging.operation.type"] = "process"
        a["messaging.destination.name"] = m.queue
        a["messaging.message.id"] = runID
        return a
    }

    struct DrainDeadlinePassed: Error { var left: Int }

    /// Reports a run while it goes: `started` once it has run `started_after_ms` (shorter runs
    /// report only `finished`), and once it has run `detach_after_ms`, `started` again marked
    /// detached and then the ack of its task message. A detached run no longer depends on the
    /// broker's consumer timeout; this worker's heartbeats protect it instead. Ends early when
    /// the run ends (the task is cancelled).
    func reportWhileRunning(_ started: StatusMessage, delivery: AMQPDelivery, detached: Flag, headers: AMQPHeaders, log: Logger) async {
        let after = configuration.startedAfter
        let detachAfter = configuration.detachAfter
        let detachNow = detachAfter != nil && detachAfter! <= after
        do { try await Task.sleep(for: after) } catch { return }
        var first = started
        if detachNow { first.detached = true }
        guard await publishStatus(first, headers: headers, log: log), !Task.isCancelled else { return }
        if detachNow { return detach(delivery, flag: detached, log: log) }
        guard let detachAfter else { return }
        do { try await Task.sleep(for: detachAfter - after) } catch { return }
        var second = started
        second.detached = true
        guard await publishStatus(second, headers: headers, log: log), !Task.isCancelled else { return }
        detach(delivery, flag: detached, log: log)
    }

    func detach(_ delivery: AMQPDelivery, flag: Flag, log: Logger) {
        flag.set()
        consumer.ack(delivery)
        counters.withLock { $0.detached += 1 }
        log.info("long run detached: task message acknowledged, heartbeats protect the run from here")
    }

    /// `run(_:_:)` for tests: the timeout mechanism alone.
    package static func runForTesting(_ executor: any Executor, _ context: ExecutionContext) async -> ExecutionResult {
        await run(executor, context)
    }

    /// Runs the executor; past `timeout`, or when `cancel` is signalled, its task is cancelled
    /// (the shell executor kills its process group) and the outcome is `timed_out` or `cancelled`.
    static func run(_ executor: any Executor, _ context: ExecutionContext, cancel: Wakeup? = nil) async -> ExecutionResult {
        enum Step: Sendable {
            case done(ExecutionResult)
            case timeout, cancelRequested, stopped
        }
        let result = await withTaskGroup(of: Step.self) { group in
            group.addTask { .done(await executor.execute(context)) }
            group.addTask {
                do { try await Task.sleep(for: context.timeout) } catch { return .stopped }
                return .timeout
            }
            if let cancel {
                // No timer of its own: the group's cancellation (result or timeout) ends the wait.
                group.addTask { await cancel.waitUntilSignalled() ? .cancelRequested : .stopped }
            }
            var result: ExecutionResult?
            var ended: Step?
            while let step = await group.next() {
                switch step {
                case .done(let r):
                    result = r
                    group.cancelAll()
                case .timeout, .cancelRequested:
                    if ended == nil && result == nil { ended = step }
                    group.cancelAll()  // the executor's task is cancelled and stops
                case .stopped: break
                }
            }
            var final = result ?? ExecutionResult(outcome: .failed, errorClass: "executor", errorMessage: "executor returned nothing")
            switch ended {
            case .timeout?:
                final.outcome = .timedOut
                final.errorClass = "timeout"
                final.errorMessage = "exceeded the task timeout of \(context.timeout)"
            case .cancelRequested?:
                final.outcome = .cancelled
                final.errorClass = "cancelled"
                final.errorMessage = "cancelled by request; the executor was stopped"
            default: break
            }
            return final
        }
        // The cleanup hook runs whatever the end: success, failure, timeout, cancel or shutdown.
        await executor.cleanup(context, result: result)
        return result
    }

    /// Applies control messages: a cancel for a run in flight stops its executor; one for a run
    /// not here yet is remembered, so its task message is skipped if it comes.
    func controlLoop() async {
        for await d in control.deliveries {
            if let m = try? MessageCodec.decodeControl(d.body) {
                if cancels.cancel(m.cancel) { logger.info("run cancelled by request", metadata: ["run.id": "\(m.cancel)"]) }
            } else {
                logger.warning("malformed control message ignored", metadata: ["amqp.message_id": "\(d.properties.messageID ?? "")"])
            }
            control.ack(d)
        }
    }

    /// Publishes a status until the broker confirms it (retrying with backoff across reconnects).
    /// Returns `false` only when shutdown ended the retries before a confirm.
    @discardableResult
    func publishStatus(_ status: StatusMessage, headers: AMQPHeaders, log: Logger) async -> Bool {
        let body = MessageCodec.encode(status)
        var headers = headers
        // The seal over this body, keyed by the attempt's proof (which itself is not sent).
        if let proof = status.proof { headers[StatusProof.sealHeader] = .string(StatusProof.seal(body, proof: proof)) }
        let message = AMQPOutgoingMessage(
            exchange: topology.statusExchange, routingKey: "status", body: body,
            properties: AMQPProperties(
                contentType: "application/json", messageID: "\(status.runID.lowercasedString):\(status.event.rawValue)",
                type: statusMessageType, timestamp: UInt64(Date().timeIntervalSince1970), persistent: true, headers: headers))
        var attempt = 0
        while true {
            do {
                try await publisher.publish(message)
                return true
            } catch {
                attempt += 1
                if attempt == 1 || attempt % 20 == 0 {
                    log.warning("status publish failed; retrying", metadata: ["status.event": "\(status.event.rawValue)", "error": "\(error)"])
                }
                // Shutting down or past the drain deadline: not acked, so the broker redelivers the task.
                if error.code == .stopped || Task.isCancelled { return false }
                try? await Task.sleep(for: Backoff.delay(attempt: attempt, base: .milliseconds(50), cap: .seconds(2)))
            }
        }
    }

    /// Reports a `failed` status when the run id is readable, then rejects without requeue (dead-letter).
    func refuse(_ delivery: AMQPDelivery, runID: UUID?, attempt: Int, proof: String?, errorClass: String, reason: String) async {
        logger.warning(
            "task message refused and dead-lettered",
            metadata: [
                "amqp.message_id": "\(delivery.properties.messageID ?? "")", "error.class": "\(errorClass)", "error": "\(reason)",
            ])
        if let runID {
            let status = StatusMessage(
                runID: runID, attempt: attempt, event: .finished, outcome: .failed,
                errorClass: errorClass, errorMessage: reason, workerID: configuration.id, proof: proof)
            // Unconfirmed (shutting down): leave it for redelivery rather than dead-letter it unreported.
            guard await publishStatus(status, headers: [:], log: logger) else { return }
        }
        consumer.reject(delivery, requeue: false)
        counters.withLock { $0.rejected += 1 }
    }
}

/// Cancel signals for runs in flight, and cancels that arrived before their run.
final class CancelRegistry: Sendable {
    struct State {
        var inFlight: [UUID: Wakeup] = [:]
        /// Cancelled run ids in arrival order, at most `limit`.
        var recent: [UUID] = []
        var recentSet: Set<UUID> = []
    }
    let state = Mutex(State())
    let limit = 10_000

    func register(_ id: UUID) -> Wakeup {
        let w = Wakeup()
        state.withLock { $0.inFlight[id] = w }
        return w
    }

    func unregister(_ id: UUID) { _ = state.withLock { $0.inFlight.removeValue(forKey: id) } }

    /// The runs in flight now.
    var inFlightIDs: [UUID] { state.withLock { Array($0.inFlight.keys) } }

    func wasCancelled(_ id: UUID) -> Bool { state.withLock { $0.recentSet.contains(id) } }

    /// Marks the run cancelled and signals it if in flight; returns whether it was in flight.
    @discardableResult
    func cancel(_ id: UUID) -> Bool {
        let w: Wakeup? = state.withLock { s in
            if s.recentSet.insert(id).inserted {
                s.recent.append(id)
                if s.recent.count > limit { s.recentSet.remove(s.recent.removeFirst()) }
            }
            return s.inFlight[id]
        }
        w?.signal()
        return w != nil
    }
}

/// A flag set once, read after the tasks that may set it have ended.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }
}

/// The executors a run may use, with their concurrency limits.
struct ExecutorSet: Sendable {
    var executors: [String: any Executor]
    var slots: [String: Slots]

    init(executors: [String: any Executor], limits: [String: Int]) {
        self.executors = executors
        slots = limits.filter { executors[$0.key] != nil }.mapValues { Slots($0) }
    }
}
