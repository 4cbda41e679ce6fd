import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import ConveyorTelemetry
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import Tracing

/// Records what workers report on the status queue: statuses and heartbeats, in batches of up
/// to `dispatcher.status_batch_size`: a batch's statuses in one transaction (its heartbeats in a
/// statement of their own), acked (one multiple ack) only once both committed. A status without
/// its attempt's proof changes nothing; a malformed message is dead-lettered; a batch the
/// database refuses for good is recorded in parts, and the one status it refuses set aside
/// (`isolatingRefusals`).
///
/// Shutdown: it stops consuming, records every status already received, and returns; the
/// dispatcher closes the connection after it. A batch it cannot commit while stopping stays
/// unacked, and the broker redelivers it to another dispatcher.
final class StatusRecorder: Service, Sendable {
    /// Totals since start (the dispatcher's `stats` adds them up).
    struct Counters: Sendable {
        var applied = 0, ignored = 0, outcomes = 0, rejected = 0, forged = 0
        var retried = 0, dead = 0, heartbeats = 0, workersLeft = 0
    }

    /// What the rest of the dispatcher does with what the recorder saw.
    struct Hooks: Sendable {
        /// Heartbeats named these work queues (the dispatcher declares the ones it does not know).
        var heartbeatQueues: @Sendable ([String]) async -> Void
        /// A batch committed (started runs free broker backlog; retries, dependents and
        /// callbacks may be due now).
        var committed: @Sendable (RecordResult) -> Void
    }

    let consumer: AMQPConsumer
    let store: Store
    let proofs: StatusProofs
    let queue: String
    let batchSize: Int
    let lostGrace: Duration
    let logger: Logger
    let hooks: Hooks
    let buffer = Mutex<[AMQPDelivery]>([])
    let wakeup = Wakeup()
    let stopping = Atomic<Bool>(false)
    /// The consumer's stream ended: nothing more is buffered.
    let pumped = Atomic<Bool>(false)
    let counters = Mutex(Counters())
    let refusals = RefusalLog()

    init(
        consumer: AMQPConsumer, store: Store, proofs: StatusProofs, queue: String, batchSize: Int,
        lostGrace: Duration, logger: Logger, hooks: Hooks
    ) {
        self.consumer = consumer
        self.store = store
        self.proofs = proofs
        self.queue = queue
        self.batchSize = batchSize
        self.lostGrace = lostGrace
        self.logger = logger
        self.hooks = hooks
    }

    var stats: Counters { counters.withLock { $0 } }

    func run() async throws {
        // The refusal that alerts exists from the start at 0, so its first increase shows.
        ConveyorMetrics.statusRejected(reason: StatusRefusal.refusedByDatabase.rawValue, by: 0)
        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                group.addTask { await self.pump() }
                await self.recordUntilDrained()
            }
        } onGracefulShutdown: {
            self.stopping.store(true, ordering: .relaxed)
            self.consumer.stopConsuming()
            self.wakeup.signal()
        }
    }

    /// Moves deliveries from the consumer's stream into the buffer the recorder drains.
    func pump() async {
        for await d in consumer.deliveries {
            buffer.withLock { $0.append(d) }
            wakeup.signal()
        }
        pumped.store(true, ordering: .releasing)
        wakeup.signal()
    }

    /// Records batches until the stream has ended and the buffer is empty, or until a batch
    /// cannot be committed while stopping (it and the rest stay unacked, for redelivery).
    func recordUntilDrained() async {
        while true {
            let ended = pumped.load(ordering: .acquiring)
            // Up to `batchSize` statuses per transaction, a batch message counting as the statuses
            // it says it carries (at most `maxStatusesPerBatch`; its body decides what is recorded).
            let batch = buffer.withLock { b -> [AMQPDelivery] in
                var n = 0
                var statuses = 0
                while n < b.count {
                    statuses += Self.statuses(in: b[n])
                    if n > 0 && statuses > batchSize { break }  // the first delivery is always taken
                    n += 1
                }
                defer { b.removeFirst(n) }
                return Array(b.prefix(n))
            }
            if batch.isEmpty {
                if ended { return }
                await wakeup.wait(timeout: .milliseconds(500))
                continue
            }
            if await !record(batch), stopping.load(ordering: .relaxed) { return }
        }
    }

    /// Records one batch; retries the transaction (it is idempotent) until it commits, then acks.
    func record(_ batch: [AMQPDelivery]) async -> Bool {
        var proof: StatusProof?
        await untilCommitted("reading the status key") { proof = try await proofs.current() }
        guard let proof else { return false }  // shutting down: nothing acked, the broker redelivers
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
        /// One status, alone or from a batch: checked against its attempt's proof, then linked.
        func accept(_ body: [UInt8], seal: String?, headers: AMQPHeaders) throws(ValidationError) {
            let e = try MessageCodec.decodeStatus(body)
            if let refusal = proof.check(seal: seal, body: body, runID: e.runID, attempt: e.attempt) {
                refuse(e, refusal)  // changes nothing; acked with the batch (the multiple ack covers it)
                return
            }
            events.append(e)
            if spans.last.map({ $0.links >= Self.maxRecordLinks }) ?? true {
                spans.append((Traces.startSpan("record \(queue)", context: .topLevel, kind: .consumer), 0))
            }
            spans[spans.count - 1].links += 1
            if let recording = spans.last?.span, recording.isRecording {
                recording.addLink(
                    SpanLink(
                        context: Traces.context(headers, using: AMQPHeadersExtractor()),
                        attributes: Self.linkAttributes(e)))
            }
        }
        for d in batch {
            do throws(ValidationError) {
                switch d.properties.type {
                case heartbeatMessageType?: beats.append(try MessageCodec.decodeHeartbeat(d.body))
                case nil, statusMessageType?:
                    try accept(
                        d.body, seal: d.properties.headers[StatusProof.sealHeader]?.stringValue,
                        headers: d.properties.headers)
                case statusBatchMessageType?:
                    // A batch that is not one is dead-lettered whole (below); a status in it that is
                    // malformed is counted and dropped alone, as the others are good.
                    for item in try MessageCodec.decode(batch: d.body) {
                        do throws(ValidationError) {
                            try accept(item.body, seal: item.seal, headers: item.traceHeaders)
                        } catch {
                            logger.warning(
                                "malformed status in a batch dropped; the batch's other statuses are recorded",
                                metadata: ["amqp.message_id": "\(d.properties.messageID ?? "")", "error": "\(error)"])
                            counters.withLock { $0.rejected += 1 }
                            ConveyorMetrics.statusRejected(reason: StatusRefusal.malformed.rawValue)
                        }
                    }
                case let other?:
                    throw ValidationError(
                        field: "type", value: other,
                        hint:
                            "the status queue takes \(statusMessageType), \(statusBatchMessageType) and \(heartbeatMessageType)"
                    )
                }
                last = d
            } catch {
                logger.warning(
                    "malformed status message dead-lettered",
                    metadata: ["amqp.message_id": "\(d.properties.messageID ?? "")", "error": "\(error)"])
                consumer.reject(d, requeue: false)
                counters.withLock { $0.rejected += 1 }
                ConveyorMetrics.statusRejected(reason: StatusRefusal.malformed.rawValue)
            }
        }
        guard let last else { return true }
        for s in spans where s.span.isRecording {
            s.span.attributes = Self.recordAttributes(
                queue: queue, statuses: s.links, batch: batch.count)
        }
        if !beats.isEmpty { await hooks.heartbeatQueues(beats.flatMap(\.queues)) }
        // What committed, over every attempt: a transient error after part of a batch committed
        // retries the whole batch, and the parts already recorded are then no-ops (`ignored`).
        var recorded = RecordResult.none
        var left: Set<String> = []
        // The attempt that committed: what it recorded and what it set aside (each attempt
        // decides afresh).
        var recordedEvents: [StatusMessage] = []
        var asideStatuses: [(StatusMessage, any Error)] = []
        var asideBeats: [(HeartbeatMessage, any Error)] = []
        let committed = await untilCommitted("recording statuses") {
            recordedEvents = []
            asideStatuses = []
            asideBeats = []
            try await isolatingRefusals(beats[...], setAside: { asideBeats.append(($0, $1)) }) { part in
                left.formUnion(try await store.recordHeartbeats(part))
            }
            try await isolatingRefusals(events[...], setAside: { asideStatuses.append(($0, $1)) }) { part in
                recorded = recorded.adding(try await store.record(part, lostGrace: lostGrace))
                recordedEvents += part
            }
            consumer.ack(last, multiple: true)
        }
        if committed {
            for id in left.sorted() {
                logger.info("worker left: drained and said goodbye; shown stopped", metadata: ["worker.id": "\(id)"])
            }
            let now = Date()
            var finished: [String: Int] = [:]
            for e in recordedEvents {
                ConveyorMetrics.statusLag(seconds: now.timeIntervalSince(e.at))
                if e.event == .finished, let o = e.outcome { finished[o.rawValue, default: 0] += 1 }
            }
            ConveyorMetrics.finished(finished)
            let r = recorded
            if r.settled.retried > 0 { ConveyorMetrics.retried(r.settled.retried) }
            if r.settled.dead > 0 { ConveyorMetrics.dead(r.settled.dead) }
            counters.withLock {
                $0.workersLeft += left.count
                $0.heartbeats += beats.count - asideBeats.count
                $0.applied += r.applied
                $0.ignored += r.ignored
                $0.outcomes += r.outcomes
                $0.retried += r.settled.retried
                $0.dead += r.settled.dead
            }
            for (e, error) in asideStatuses { setAside(e, error) }
            for (b, error) in asideBeats { setAside(b, error) }
            await keep(asideStatuses)
            hooks.committed(r)
        }
        if !committed {
            // Shutting down before the commit: nothing acked, the broker redelivers the batch.
            for s in spans {
                s.span.setStatus(
                    SpanStatus(
                        code: .error, message: "not committed: the dispatcher stopped; the statuses are redelivered"))
            }
        }
        return committed
    }

    /// Records `items` with `body`, and when the database refuses them for good (`refusedForGood`),
    /// records each half alone, down to the one item whose value it refuses, which is set aside
    /// (after one more try alone: a refusal caused by a race, such as a dependent's task deleted
    /// while its upstream finished, passes the second time). Every other error is thrown, so the
    /// caller retries the whole batch (recording is idempotent: what a part already committed is
    /// recorded again as a no-op). When every item of two or more is refused, the cause is not
    /// one item's value but the database (a constraint or trigger every status meets): that is
    /// thrown too, and the batch waits, unacknowledged, as any batch did before this mechanism.
    ///
    /// Why: a batch is recorded in one statement per kind, so a single value PostgreSQL cannot
    /// store (an exit code past `integer`, an instant in year 0) failed the whole batch, and the
    /// recorder retried it forever: no outcome behind it was recorded, fleet-wide. The messages
    /// are bounded where they are read; this is the mechanism for whatever a bound misses.
    func isolatingRefusals<Item>(
        _ items: ArraySlice<Item>, setAside: (Item, any Error) -> Void, _ body: ([Item]) async throws -> Void
    ) async throws {
        var aside = 0
        var first: (any Error)?
        func split(_ part: ArraySlice<Item>) async throws {
            do {
                try await body(Array(part))
            } catch  where Self.refusedForGood(error) && !part.isEmpty {
                first = first ?? error
                guard part.count > 1 else {
                    // Alone, once more: a race passes now; a value the database cannot take does not.
                    do {
                        try await body(Array(part))
                    } catch  where Self.refusedForGood(error) {
                        aside += 1
                        setAside(part[part.startIndex], error)
                    }
                    return
                }
                let middle = part.startIndex + part.count / 2
                try await split(part[..<middle])
                try await split(part[middle...])
            }
        }
        try await split(items)
        if items.count > 1 && aside == items.count, let first { throw first }
    }

    /// A refusal that recording the same values again cannot change: a data exception (SQLSTATE
    /// class 22: a number out of range, an instant the database cannot hold), an integrity
    /// violation (class 23) or a limit exceeded (class 54: a text too long for an index entry).
    /// Anything else (a lost connection, a deadlock, a timeout) is retried.
    static func refusedForGood(_ error: any Error) -> Bool {
        guard let e = error as? PostgresError, let state = e.sqlState else { return false }
        return state.hasPrefix("22") || state.hasPrefix("23") || state.hasPrefix("54")
    }

    /// Keeps the statuses set aside in `dead_letters` (no run id: they end no run; the run id is
    /// in the reason), so that an operator can read what the worker sent. Best effort: a status
    /// that cannot be kept is in the log.
    func keep(_ aside: [(StatusMessage, any Error)]) async {
        guard !aside.isEmpty else { return }
        let letters = aside.map { e, error in
            DeadLetter(
                runID: nil,
                reason:
                    "refused_by_database: run \(e.runID.lowercasedString) attempt \(e.attempt) \(e.event.rawValue): \(error)",
                source: queue, type: statusMessageType,
                body: String(decoding: MessageCodec.encode(e), as: UTF8.self))
        }
        do { _ = try await store.recordDeadLetters(letters) } catch {
            logger.error(
                "statuses set aside could not be kept in dead_letters", metadata: ["error": "\(error)"])
        }
    }

    /// A status the database refused for good: counted and logged (with the run, so an operator
    /// can find it; once a minute per worker id). Its run is left as it was and ends by the usual
    /// liveness rules (lost past its deadline, expired past its start deadline), then by its
    /// retry policy.
    func setAside(_ e: StatusMessage, _ error: any Error) {
        reportSetAside(
            "status refused by the database and set aside; the statuses beside it are recorded",
            worker: e.workerID, error: error,
            metadata: [
                "run.id": "\(e.runID)", "status.attempt": "\(e.attempt)", "status.event": "\(e.event.rawValue)",
            ])
    }

    /// A heartbeat the database refused for good: counted and logged, the others recorded.
    func setAside(_ beat: HeartbeatMessage, _ error: any Error) {
        reportSetAside(
            "heartbeat refused by the database and dropped; the statuses beside it are recorded",
            worker: beat.workerID, error: error)
    }

    func reportSetAside(_ message: Logger.Message, worker: String, error: any Error, metadata: Logger.Metadata = [:]) {
        counters.withLock { $0.rejected += 1 }
        ConveyorMetrics.statusRejected(reason: StatusRefusal.refusedByDatabase.rawValue)
        let source = String(worker.prefix(200))
        guard refusals.shouldLog(source) else { return }
        logger.error(
            message,
            metadata: metadata.merging([
                "worker.id": "\(source)", "error": "\(error)", "note": "logged once a minute per worker id",
            ]) { a, _ in a })
    }

    /// Counts and (rate-limited) logs a status without its attempt's proof.
    func refuse(_ e: StatusMessage, _ refusal: StatusRefusal) {
        counters.withLock {
            $0.rejected += 1
            $0.forged += 1
        }
        ConveyorMetrics.statusRejected(reason: refusal.rawValue)
        let source = String(e.workerID.prefix(200))
        if refusals.shouldLog(source) {
            logger.warning(
                """
                status refused: it is not sealed with its attempt's proof (forged, replayed or from an outdated \
                worker); nothing changed
                """,
                metadata: [
                    "status.reason": "\(refusal.rawValue)", "worker.id": "\(source)", "run.id": "\(e.runID)",
                    "status.event": "\(e.event.rawValue)", "note": "logged once a minute per worker id",
                ])
        }
    }

    @discardableResult
    func untilCommitted(_ what: String, _ body: () async throws -> Void) async -> Bool {
        await retryUntilCommitted(what, logger: logger, stopping: { stopping.load(ordering: .relaxed) }, body)
    }

    /// How many statuses a delivery says it carries: 1, or a batch's count header (bounded).
    static func statuses(in d: AMQPDelivery) -> Int {
        guard d.properties.type == statusBatchMessageType else { return 1 }
        let n: Int? =
            switch d.properties.headers[MessageCodec.batchCountHeader] {
            case .int(let v)?: Int(exactly: v)
            case .string(let s)?: Int(s)
            default: nil
            }
        return min(max(n ?? MessageCodec.maxStatusesPerBatch, 1), MessageCodec.maxStatusesPerBatch)
    }

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
}

/// The dispatchers' status-proof signer: its secret is read from PostgreSQL once, then kept.
final class StatusProofs: Sendable {
    let store: Store
    let cached = Mutex<StatusProof?>(nil)

    init(store: Store) { self.store = store }

    func current() async throws -> StatusProof {
        if let p = cached.withLock({ $0 }) { return p }
        let p = StatusProof(secret: try await store.statusKey())
        cached.withLock { $0 = p }
        return p
    }
}
