public import ConveyorAMQP
import ConveyorCore
import ConveyorFaults
import ConveyorPostgres
public import ConveyorStore
import ConveyorTelemetry
import Foundation
public import Logging
public import ServiceLifecycle
import Synchronization
import Tracing

/// Scans PostgreSQL for due work and publishes it; consumes status events and records them.
///
/// Runs as one `Service`: on graceful shutdown it stops claiming, finishes the batch in hand,
/// records the statuses already received, and closes its connections.
public final class Dispatcher: Service, Sendable {
    public let configuration: DispatcherConfiguration
    public let store: Store
    public let publisher: AMQPPublisher
    public let statusConsumer: AMQPConsumer
    /// Consumes `conveyor.dead`: dead-lettered messages end their runs `dead`.
    public let deadConsumer: AMQPConsumer
    let listener: PostgresListener?
    let topology: ConveyorTopology
    let logger: Logger
    let wakeup = Wakeup()
    let statusWakeup = Wakeup()
    let maintenanceWakeup = Wakeup()
    let callbackWakeup = Wakeup()
    let statusBuffer = Mutex<[AMQPDelivery]>([])
    let declaredQueues: Mutex<Set<String>>
    let counters = Mutex(Counters())
    let stopping = Atomic<Bool>(false)
    /// An alarm probe is in flight (see `brokerTakesPublishes`).
    let probing = Atomic<Bool>(false)
    /// Runs this dispatcher created since its last `ANALYZE` (see `refreshStatisticsAfterBursts`).
    let createdSinceAnalyze = Atomic<Int>(0)
    /// The status-proof signer, once its secret is read from PostgreSQL (`statusProof()`).
    let proofs = Mutex<StatusProof?>(nil)
    let refusals = RefusalLog()

    /// Totals since start, for logs, `bench` and tests.
    public struct Counters: Sendable {
        public var published = 0
        public var publishFailed = 0
        public var statusApplied = 0
        /// Final outcomes recorded.
        public var outcomesRecorded = 0
        public var statusIgnored = 0
        /// Statuses refused: malformed (dead-lettered), or without this attempt's proof (acked away).
        public var statusRejected = 0
        public var statusForged = 0
        /// Retries scheduled, runs ended dead, runs declared lost, dead letters recorded.
        public var retried = 0
        public var dead = 0
        public var lost = 0
        public var deadLetters = 0
        public var cancelsSent = 0
        public var analyzes = 0
        public var heartbeats = 0
        public var workersLost = 0
        /// Callback attempts: delivered, to be retried, given up.
        public var callbacksDelivered = 0
        public var callbacksRetried = 0
        public var callbacksFailed = 0
    }

    public init(configuration: DispatcherConfiguration, store: Store, amqp: AMQPConfiguration, databaseURL: String?, logger: Logger) {
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
            topology: topology.work(queues: configuration.queues).merging(topology.status).merging(topology.controlPublish),
            window: 1024, logger: logger)
        statusConsumer = AMQPConsumer(
            configuration: amqp.named("\(named) status"), topology: topology.status, queues: [topology.statusQueue],
            prefetch: UInt16(min(configuration.statusBatchSize * 2, 60_000)), logger: logger)
        deadConsumer = AMQPConsumer(
            configuration: amqp.named("\(named) dead"), topology: topology.base, queues: [topology.deadQueue], prefetch: 200, logger: logger)
        listener = databaseURL.map { PostgresListener(url: $0, channels: ["conveyor_due"], logger: logger) }
        declaredQueues = Mutex(Set(configuration.queues))
    }

    public var stats: Counters { counters.withLock { $0 } }

    /// The status-proof signer; its secret is read from PostgreSQL once, then kept.
    func statusProof() async throws -> StatusProof {
        if let p = proofs.withLock({ $0 }) { return p }
        let p = StatusProof(secret: try await store.statusKey())
        proofs.withLock { $0 = p }
        return p
    }

    /// Ready when the database answers and both broker connections are up.
    public var isReady: Bool { publisher.isConnected && statusConsumer.isConsuming }

    public func run() async throws {
        publisher.start()
        statusConsumer.start()
        deadConsumer.start()
        listener?.start()
        defer {
            listener?.stop()
            deadConsumer.stop()
            statusConsumer.stop()
            publisher.stop()
        }
        try await store.pool.waitUntilReachable()
        try await publisher.waitUntilConnected()
        try await statusConsumer.waitUntilConsuming()
        logger.info("dispatcher running", metadata: ["dispatcher.groups": "\(configuration.groups)", "dispatcher.batch_size": "\(configuration.batchSize)"])

        try await withGracefulShutdownHandler {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { await self.scanLoop() }
                group.addTask { await self.statusPump() }
                group.addTask { await self.statusLoop() }
                group.addTask { await self.maintenanceLoop() }
                group.addTask { await self.deadLetterLoop() }
                group.addTask { await self.callbackLoop() }
                if let listener {
                    group.addTask {
                        for await _ in listener.notifications { self.wakeup.signal() }
                    }
                }
                // The scan, status, maintenance and callback loops end on shutdown (callbacks once
                // their POSTs in flight end); then stop the pumps.
                for _ in 0..<4 { _ = try await group.next() }
                listener?.stop()
                statusConsumer.stop()
                deadConsumer.stop()
                group.cancelAll()
            }
        } onGracefulShutdown: {
            self.stopping.store(true, ordering: .relaxed)
            self.wakeup.signal()
            self.statusWakeup.signal()
            self.maintenanceWakeup.signal()
            self.callbackWakeup.signal()
            self.statusConsumer.stopConsuming()
            self.deadConsumer.stopConsuming()
        }
        logger.info("dispatcher stopped", metadata: ["dispatcher.published": "\(stats.published)", "dispatcher.recorded": "\(stats.statusApplied)"])
    }

    // MARK: scan and publish

    func scanLoop() async {
        while !stopping.load(ordering: .relaxed) {
            var tick = (work: 0, nextDueIn: Double?.none)
            if publisher.isConnected && !publisher.isBlocked {
                tick = await scanTick()
            }
            if stopping.load(ordering: .relaxed) { break }
            if tick.work > 0 { continue }  // more may be due: scan again at once
            // Nothing moved. Sleep until the next due time, but never spin on work that is due and
            // held back (a full broker backlog, a rate limit): a recorded status batch, a NOTIFY or
            // the scan interval wakes the loop.
            var sleep = configuration.scanInterval
            if let next = tick.nextDueIn, next > 0, next < sleep.inSeconds {
                sleep = .milliseconds(Int64(next * 1000) + 1)
            }
            await wakeup.wait(timeout: sleep)
        }
    }

    /// One scan tick; returns how much it did (runs created plus runs published: 0 means nothing
    /// was due, or nothing due could move).
    public func scanOnce() async -> Int { await scanTick().work }

    /// One scan tick: the probe, then every task group's claim and publish, concurrently. Returns
    /// the work done and the seconds until something is next due (from the probe).
    func scanTick() async -> (work: Int, nextDueIn: Double?) {
        let began = ContinuousClock.now
        defer { ConveyorMetrics.scanDuration(ContinuousClock.now - began) }
        let probe: ScanProbe
        do { probe = try await store.scanProbe() } catch {
            logger.warning("scan probe failed", metadata: ["error": "\(error)"])
            return (0, nil)
        }
        guard probe.due else { return (0, probe.nextDueIn) }
        // Each queue's broker backlog is bounded: what is over it waits in PostgreSQL, where
        // priority orders it. The room is shared out among the groups.
        let groups = configuration.groups
        func share(_ room: Int) -> Int { room <= 0 ? 0 : (room + groups - 1) / groups }
        let room = probe.backlog.mapValues { share(configuration.maxBacklogPerQueue - $0) }
        let defaultRoom = share(configuration.maxBacklogPerQueue)
        let work = await withTaskGroup(of: Int.self) { group in
            for g in 0..<groups {
                group.addTask {
                    let spans = DispatchSpans()
                    var request = ClaimRequest(
                        group: g, groups: groups, limit: self.configuration.batchSize,
                        lease: self.configuration.publishLease, misfireGrace: self.configuration.misfireGrace,
                        newTraceParent: { spans.start(parent: $0) })
                    request.room = room
                    request.defaultRoom = defaultRoom
                    request.rateLimited = probe.rateLimited
                    request.straightToQueue = !probe.runsReady
                    return await self.dispatchGroup(request, spans: spans)
                }
            }
            var total = 0
            for await n in group { total += n }
            return total
        }
        return (work, probe.nextDueIn)
    }

    /// Claims one task group and publishes what it claimed; returns runs created plus runs published.
    func dispatchGroup(_ request: ClaimRequest, spans: DispatchSpans = DispatchSpans()) async -> Int {
        let result: ClaimResult
        do {
            result = try await store.claimDue(request)
        } catch {
            spans.end(failed: error)
            logger.warning("claim failed", metadata: ["dispatcher.group": "\(request.group)", "error": "\(error)"])
            return 0
        }
        let live = spans.claimed(result.runs, exchange: topology.tasksExchange)
        if !result.cancelled.isEmpty { maintenanceWakeup.signal() }
        if result.created > 0 {
            let total = createdSinceAnalyze.add(result.created, ordering: .relaxed).newValue
            if total >= Self.analyzeAfterRuns && total - result.created < Self.analyzeAfterRuns { maintenanceWakeup.signal() }
        }
        if result.runs.isEmpty { return result.created }
        if configuration.faults.dispatcherCrash == .afterClaim { FaultInjection.crash() }
        ConveyorMetrics.claimBatch(result.runs.count)
        let (ok, failed) = await publish(result.runs, spans: live)
        if configuration.faults.dispatcherCrash == .afterPublish { FaultInjection.crash() }
        let okSet = Set(ok)
        for (key, runs) in Dictionary(
            grouping: result.runs.filter { okSet.contains($0.message.runID) }, by: { QueuePriority(queue: $0.message.queue, priority: $0.priority) })
        {
            ConveyorMetrics.dispatched(queue: key.queue, priority: key.priority.name, count: runs.count)
        }
        if !failed.isEmpty { ConveyorMetrics.publishFailed(failed.count) }
        do {
            try await store.markDispatched(ok)
            if !failed.isEmpty { try await store.retryPublishSoon(failed, delay: .seconds(1)) }
        } catch {
            // The rows stay `queued`: any dispatcher republishes them when the lease ends.
            logger.warning("marking dispatched failed; runs will be republished after the lease", metadata: ["error": "\(error)"])
        }
        counters.withLock {
            $0.published += ok.count
            $0.publishFailed += failed.count
        }
        return result.created + ok.count
    }

    /// Declares the work queues (and lanes) not declared yet by this dispatcher: those its runs
    /// name, and those workers' heartbeats name, since workers only declare passively and wait
    /// for them. A heartbeat is untrusted input: its queue names must follow the task rule
    /// (`QueueName`; at most 200 characters), and heartbeats may add at most
    /// `maxHeartbeatQueues` queues to what this dispatcher declares.
    func declareWorkQueues(_ names: [String], fromHeartbeat: Bool = false) async {
        let newQueues = declaredQueues.withLock { known -> [String] in
            var fresh = Set(names).subtracting(known)
            if fromHeartbeat {
                fresh = fresh.filter { $0.count <= 200 && QueueName.isValid($0) }
                let room = max(0, Self.maxHeartbeatQueues - known.count)
                if fresh.count > room { fresh = Set(fresh.sorted().prefix(room)) }
            }
            return fresh.sorted()
        }
        guard !newQueues.isEmpty else { return }
        do {
            try await publisher.ensureTopology(topology.work(queues: newQueues))
            declaredQueues.withLock { $0.formUnion(newQueues) }
            if fromHeartbeat { logger.info("declared work queues a worker consumes", metadata: ["amqp.queues": "\(newQueues)"]) }
        } catch {
            logger.warning("declaring work queues failed", metadata: ["amqp.queues": "\(newQueues)", "error": "\(error)"])
        }
    }

    /// Most work queues one dispatcher declares in all (heartbeats cannot add past it).
    static let maxHeartbeatQueues = 1_000

    /// Publishes runs with confirms; returns the confirmed and the failed run ids. A run's
    /// producer span is its dispatch span when this claim created the run (`spans`), else a new
    /// `publish` span, a child of the run's stored dispatch span (a retry, a run that waited).
    func publish(_ runs: [ClaimedRun], spans live: [UUID: any Span] = [:]) async -> (ok: [UUID], failed: [UUID]) {
        await declareWorkQueues(runs.map(\.message.queue))
        let proof: StatusProof
        do { proof = try await statusProof() } catch {
            logger.warning("cannot read the status key; publishing later", metadata: ["error": "\(error)"])
            for span in live.values { span.end() }
            return ([], runs.map(\.message.runID))
        }
        let now = Date()
        var spans: [any Span] = []
        spans.reserveCapacity(runs.count)
        let messages = runs.map { run in
            if let span = live[run.message.runID] {
                spans.append(span)
            } else {
                var parent = Traces.context(traceparent: run.traceparent)
                parent.baggageHeader = run.baggage
                spans.append(
                    Traces.startSpan(
                        "publish \(run.message.queue)", context: parent, kind: .producer,
                        attributes: Self.publishAttributes(run, exchange: topology.tasksExchange)))
            }
            var headers: AMQPHeaders = [
                "conveyor-task": .string(run.message.taskName),
                "conveyor-attempt": .int(Int64(run.message.attempt)),
                "conveyor-deadline": .string(Timestamp.format(now.addingTimeInterval(run.message.timeoutSeconds))),
            ]
            // The publish span, a child of the run's stored dispatch span; its context travels in the headers.
            var context = spans[spans.count - 1].context
            context.baggageHeader = run.baggage
            Traces.inject(context, into: &headers, using: AMQPHeadersInjector())
            var message = run.message
            message.proof = proof.sign(runID: message.runID, attempt: message.attempt)
            return AMQPOutgoingMessage(
                exchange: topology.tasksExchange, routingKey: run.message.queue, body: MessageCodec.encode(message),
                properties: AMQPProperties(
                    contentType: "application/json", messageID: run.message.idempotencyKey,
                    type: taskMessageType, timestamp: UInt64(now.timeIntervalSince1970), persistent: true,
                    headers: headers))
        }
        let sent = ContinuousClock.now
        if configuration.faults.dispatcherCrash == .midBatch, messages.count >= 2 {
            _ = await publisher.publish(Array(messages.prefix(messages.count / 2)))
            FaultInjection.crash()
        }
        let results = await publisher.publish(messages)
        ConveyorMetrics.publishConfirm(ContinuousClock.now - sent)
        var ok: [UUID] = []
        var failed: [UUID] = []
        for ((run, r), span) in zip(zip(runs, results), spans) {
            defer { span.end() }
            switch r {
            case .success: ok.append(run.message.runID)
            case .failure(let e):
                span.recordError(e)
                span.setStatus(SpanStatus(code: .error, message: "publish not confirmed; republished later"))
                failed.append(run.message.runID)
                logger.debug(
                    "publish failed",
                    metadata: [
                        "run.id": "\(run.message.runID)", "task.name": "\(run.message.taskName)",
                        "trace.id": "\(Traces.traceID(traceparent: run.traceparent) ?? "")", "error": "\(e)",
                    ])
            }
        }
        if !failed.isEmpty { logger.warning("publishes failed; will retry", metadata: ["count": "\(failed.count)"]) }
        return (ok, failed)
    }

    // MARK: status recording

    /// Moves deliveries from the consumer's stream into a buffer the recorder drains in batches.
    func statusPump() async {
        for await d in statusConsumer.deliveries {
            statusBuffer.withLock { $0.append(d) }
            statusWakeup.signal()
        }
    }

    func statusLoop() async {
        while true {
            let batch = statusBuffer.withLock { b -> [AMQPDelivery] in
                let n = min(b.count, configuration.statusBatchSize)
                defer { b.removeFirst(n) }
                return Array(b.prefix(n))
            }
            if batch.isEmpty {
                if stopping.load(ordering: .relaxed) { return }
                await statusWakeup.wait(timeout: .milliseconds(500))
                continue
            }
            await recordBatch(batch)
        }
    }

    /// Records one batch; retries the transaction (it is idempotent) until it commits, then acks.
    func recordBatch(_ batch: [AMQPDelivery]) async {
        var proof: StatusProof?
        await untilCommitted("reading the status key") { proof = try await statusProof() }
        guard let proof else { return }  // shutting down: nothing acked, the broker redelivers
        var events: [StatusMessage] = []
        var beats: [HeartbeatMessage] = []
        var last: AMQPDelivery?
        // One span for the batch (OpenTelemetry's batch-consumer pattern), linked to each status
        // message's context (the worker's execute span); ended at the commit. Per-run spans here
        // cost more than the rest of a run's tracing together (docs/benchmarks.md). A span holds
        // at most `maxRecordLinks` links (OpenTelemetry's default link limit): a larger batch
        // has one span per 128 statuses. A batch of heartbeats only has none.
        var spans: [(span: any Span, links: Int)] = []
        defer { for s in spans { s.span.end() } }
        for d in batch {
            do throws(ValidationError) {
                switch d.properties.type {
                case heartbeatMessageType?: beats.append(try MessageCodec.decodeHeartbeat(d.body))
                case nil, statusMessageType?:
                    let e = try MessageCodec.decodeStatus(d.body)
                    let seal = d.properties.headers[StatusProof.sealHeader]?.stringValue
                    if let refusal = proof.check(seal: seal, body: d.body, runID: e.runID, attempt: e.attempt) {
                        // Changes nothing; acked with the batch (the multiple ack below covers it).
                        refuse(e, refusal)
                        last = d
                        continue
                    }
                    events.append(e)
                    if spans.last.map({ $0.links >= Self.maxRecordLinks }) ?? true {
                        spans.append((Traces.startSpan("record \(topology.statusQueue)", context: .topLevel, kind: .consumer), 0))
                    }
                    spans[spans.count - 1].links += 1
                    if let recording = spans.last?.span, recording.isRecording {
                        recording.addLink(
                            SpanLink(context: Traces.context(d.properties.headers, using: AMQPHeadersExtractor()), attributes: Self.linkAttributes(e)))
                    }
                case let other?:
                    throw ValidationError(field: "type", value: other, hint: "the status queue takes \(statusMessageType) and \(heartbeatMessageType)")
                }
                last = d
            } catch {
                logger.warning("malformed status message dead-lettered", metadata: ["amqp.message_id": "\(d.properties.messageID ?? "")", "error": "\(error)"])
                statusConsumer.reject(d, requeue: false)
                counters.withLock { $0.statusRejected += 1 }
                ConveyorMetrics.statusRejected(reason: StatusRefusal.malformed.rawValue)
            }
        }
        guard let last else { return }
        for s in spans where s.span.isRecording {
            s.span.attributes = Self.recordAttributes(queue: topology.statusQueue, statuses: s.links, batch: batch.count)
        }
        if !beats.isEmpty { await declareWorkQueues(beats.flatMap(\.queues), fromHeartbeat: true) }
        let committed = await untilCommitted("recording statuses") {
            try await store.recordHeartbeats(beats)
            counters.withLock { $0.heartbeats += beats.count }
            let r = try await store.record(events, lostGrace: configuration.lostGrace)
            let now = Date()
            var finished: [String: Int] = [:]
            for e in events {
                ConveyorMetrics.statusLag(seconds: now.timeIntervalSince(e.at))
                if e.event == .finished, let o = e.outcome { finished[o.rawValue, default: 0] += 1 }
            }
            ConveyorMetrics.finished(finished)
            if r.settled.retried > 0 { ConveyorMetrics.retried(r.settled.retried) }
            if r.settled.dead > 0 { ConveyorMetrics.dead(r.settled.dead) }
            counters.withLock {
                $0.statusApplied += r.applied
                $0.statusIgnored += r.ignored
                $0.outcomesRecorded += r.outcomes
                $0.retried += r.settled.retried
                $0.dead += r.settled.dead
            }
            statusConsumer.ack(last, multiple: true)
            // Started runs free broker backlog; retries and dependents may be due now.
            if r.applied > 0 { wakeup.signal() }
            if r.settled.callbacks > 0 { callbackWakeup.signal() }
        }
        if !committed {
            // Shutting down before the commit: nothing acked, the broker redelivers the batch.
            for s in spans { s.span.setStatus(SpanStatus(code: .error, message: "not committed: the dispatcher stopped; the statuses are redelivered")) }
        }
    }

    /// Counts and (rate-limited) logs a status without its attempt's proof.
    func refuse(_ e: StatusMessage, _ refusal: StatusRefusal) {
        counters.withLock {
            $0.statusRejected += 1
            $0.statusForged += 1
        }
        ConveyorMetrics.statusRejected(reason: refusal.rawValue)
        let source = String(e.workerID.prefix(200))
        if refusals.shouldLog(source) {
            logger.warning(
                "status refused: it is not sealed with its attempt's proof (forged, replayed or from an outdated worker); nothing changed",
                metadata: [
                    "status.reason": "\(refusal.rawValue)", "worker.id": "\(source)", "run.id": "\(e.runID)",
                    "status.event": "\(e.event.rawValue)", "note": "logged once a minute per worker id",
                ])
        }
    }

    /// Runs `body` (a transaction, then the ack of what it recorded) until it succeeds, with
    /// backoff. The transactions are idempotent, so a commit of unknown outcome is safe to redo.
    /// Past three failures during shutdown it gives up: nothing was acked, so the broker
    /// redelivers the messages to another dispatcher.
    /// Returns whether `body` succeeded (false: it gave up while shutting down).
    @discardableResult
    func untilCommitted(_ what: String, _ body: () async throws -> Void) async -> Bool {
        var attempt = 0
        while true {
            do {
                try await body()
                return true
            } catch {
                attempt += 1
                logger.warning("\(what) failed; retrying", metadata: ["attempt": "\(attempt)", "error": "\(error)"])
                if stopping.load(ordering: .relaxed) && attempt > 3 { return false }
                try? await Task.sleep(for: Backoff.delay(attempt: attempt, base: .milliseconds(100), cap: .seconds(5)))
            }
        }
    }
}

extension Dispatcher {
    /// Links one record span holds at most (OpenTelemetry's default `LinkCountLimit`).
    static let maxRecordLinks = 128

    /// OpenTelemetry messaging attributes of a status batch's record span: the messages of the
    /// batch delivered (heartbeats, refused and malformed ones included) and the statuses this
    /// span links.
    static func recordAttributes(queue: String, statuses: Int, batch: Int) -> SpanAttributes {
        var a = SpanAttributes()
        a["messaging.system"] = "rabbitmq"
        a["messaging.operation.type"] = "process"
        a["messaging.operation.name"] = "record"
        a["messaging.destination.name"] = queue
        a["messaging.batch.message_count"] = batch
        a["conveyor.statuses"] = statuses
        return a
    }

    /// What a record span's link to one status message says: the run, and its outcome when the
    /// status is `finished`. The linked execute span has the rest (attempt, task, worker); every
    /// attribute here is exported once per run, so there are no more than these.
    static func linkAttributes(_ e: StatusMessage) -> SpanAttributes {
        var a = SpanAttributes()
        a["conveyor.run.id"] = e.runID.lowercasedString
        if let o = e.outcome { a["conveyor.outcome"] = o.rawValue }
        return a
    }

    /// OpenTelemetry messaging attributes of a task message's publish span.
    static func publishAttributes(_ run: ClaimedRun, exchange: String) -> SpanAttributes {
        var a = SpanAttributes()
        a["conveyor.task.id"] = run.message.taskID.lowercasedString
        a["conveyor.queue"] = run.message.queue
        a["messaging.system"] = "rabbitmq"
        a["messaging.operation.type"] = "send"
        a["messaging.operation.name"] = "publish"
        a["messaging.destination.name"] = exchange
        a["messaging.rabbitmq.destination.routing_key"] = run.message.queue
        // The message was made here: its idempotency key is the run id's text, already made.
        a["messaging.message.id"] = run.message.idempotencyKey
        a["conveyor.run.id"] = run.message.idempotencyKey
        a["conveyor.task.name"] = run.message.taskName
        a["conveyor.attempt"] = run.message.attempt
        return a
    }
}

/// The dispatch spans of one claim: one per run created, started when the claim makes the
/// run's trace context (a child of the context stored on the task, or a new root). The run
/// stores the span's `traceparent`. A run the same claim hands out for publishing keeps its
/// dispatch span open as its producer span (messaging attributes), ended when the broker
/// confirms; the others' end with the claim. Later publishes of the run (retries, runs that
/// waited, republishes) are `publish` spans, children of the stored one, so one occurrence is
/// one trace.
final class DispatchSpans: Sendable {
    let started = Mutex<[String: any Span]>([:])

    /// Starts a dispatch span; returns its `traceparent`.
    func start(parent: String?) -> String {
        let span = Traces.startSpan("dispatch", context: Traces.context(traceparent: parent), kind: .producer)
        guard let tp = Traces.traceparent(span.context) else {
            // A tracer that makes no context (sampler always_off): the run still gets ids.
            return Traces.traceparent(PropagatingTracer().startSpan("dispatch", context: .topLevel).context)!
        }
        started.withLock { $0[tp] = span }
        return tp
    }

    /// The claim committed. Returns the open spans of the runs about to be published, by run id,
    /// with their attributes set; ends the spans of runs created to wait (`scheduled`).
    func claimed(_ runs: [ClaimedRun], exchange: String) -> [UUID: any Span] {
        var spans = started.withLock { s in
            defer { s = [:] }
            return s
        }
        var live: [UUID: any Span] = [:]
        for run in runs {
            guard let span = spans.removeValue(forKey: run.traceparent) else { continue }
            span.attributes = Dispatcher.publishAttributes(run, exchange: exchange)
            live[run.message.runID] = span
        }
        for span in spans.values { span.end() }
        return live
    }

    /// The claim rolled back: its runs do not exist.
    func end(failed error: any Error) {
        let spans = started.withLock { s in
            defer { s = [:] }
            return s
        }
        for span in spans.values {
            span.recordError(error)
            span.setStatus(SpanStatus(code: .error, message: "claim rolled back"))
            span.end()
        }
    }
}

/// A metrics key: runs dispatched are counted by queue and priority.
struct QueuePriority: Hashable {
    var queue: String
    var priority: Priority
}
