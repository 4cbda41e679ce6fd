import CRabbitMQ
import Foundation
package import Logging
import Synchronization

/// Consumes queues with manual acknowledgement on a connection owned by one thread.
///
/// Deliveries arrive on `deliveries`. Back-pressure is the broker's: each queue's `prefetch`
/// bounds its unacknowledged deliveries, so the stream never holds more than the sum of them,
/// and nothing more is delivered until the caller acks.
///
/// `ack`, `reject` and `nack` are queued to the owner thread, which applies them between reads.
/// After a reconnect (with backoff and jitter, topology re-declared, consumers resumed) the
/// delivery tags of the old connection are void: acknowledging an old delivery is a no-op, and
/// the broker redelivers that message.
package final class AMQPConsumer: Sendable {
    package let configuration: AMQPConfiguration
    package let topology: AMQPTopology
    /// The queues consumed, each with its own prefetch (`basic.qos` is per consumer: set before each `basic.consume`).
    package let subscriptions: [Subscription]
    package var queues: [String] { subscriptions.map(\.queue) }
    private let logger: Logger
    private let owner: ConnectionOwner
    private var wake: WakePipe { owner.wake }
    private let commands = Mutex<[Command]>([])
    private let cancelRequested = Atomic<Bool>(false)
    private let connected = Atomic<Bool>(false)
    private let consuming = Atomic<Bool>(false)
    /// Every delivery, in arrival order. Finishes when the consumer stops.
    package let deliveries: AsyncStream<AMQPDelivery>
    private let continuation: AsyncStream<AMQPDelivery>.Continuation

    enum Command: Sendable {
        case ack(tag: UInt64, generation: UInt64, multiple: Bool)
        case reject(tag: UInt64, generation: UInt64, requeue: Bool)
        case nack(tag: UInt64, generation: UInt64, multiple: Bool, requeue: Bool)
        /// Resumed once every command queued before it has been written to the socket (or
        /// dropped with its connection).
        case barrier(CheckedContinuation<Void, Never>)
    }

    /// A queue to consume and how many of its deliveries may be unacknowledged at once.
    package struct Subscription: Sendable, Hashable {
        package var queue: String
        package var prefetch: UInt16
        package init(queue: String, prefetch: UInt16) {
            self.queue = queue
            self.prefetch = prefetch
        }
    }

    /// Consumes `queues`, each with the same `prefetch`.
    package convenience init(
        configuration: AMQPConfiguration, topology: AMQPTopology, queues: [String], prefetch: UInt16, logger: Logger
    ) {
        self.init(
            configuration: configuration, topology: topology,
            subscriptions: queues.map { Subscription(queue: $0, prefetch: prefetch) }, logger: logger)
    }

    package init(
        configuration: AMQPConfiguration, topology: AMQPTopology, subscriptions: [Subscription], logger: Logger
    ) {
        self.configuration = configuration
        self.owner = ConnectionOwner(configuration: configuration, role: "consume")
        self.topology = topology
        self.subscriptions = subscriptions
        self.logger = logger
        (deliveries, continuation) = AsyncStream.makeStream(of: AMQPDelivery.self, bufferingPolicy: .unbounded)
    }

    package var isConnected: Bool { connected.load(ordering: .relaxed) }
    /// Connected and with consumers registered (readiness).
    package var isConsuming: Bool { consuming.load(ordering: .relaxed) }
    package var reconnectCount: Int { owner.reconnectCount }

    package func start() { owner.start(name: "conveyor.amqp.consume") { [self] in run() } }

    /// Cancels the consumers and ends `deliveries` at once, connected or not, but keeps the
    /// connection for the acks of work in hand. A delivery read after this is not yielded: it
    /// stays unacked and returns to its queue when the connection closes.
    package func stopConsuming() {
        cancelRequested.store(true, ordering: .relaxed)
        continuation.finish()
        wake.wake()
    }

    /// Closes the connection and finishes `deliveries`. Unacked deliveries return to their queues.
    package func stop() { owner.stop() }

    /// Stops, and returns once the owner thread has written the acks, rejects and nacks queued
    /// before this call and closed the connection (at most `limit`; returns whether it did).
    /// Every process calls it last: exiting before the thread has written an ack makes the
    /// broker deliver that message again.
    @discardableResult
    package func close(within limit: Duration = .seconds(5)) async -> Bool { await owner.stopAndWait(within: limit) }

    /// Whether the owner thread has ended (never started, or stopped and its connection closed).
    package var hasEnded: Bool { owner.hasEnded }

    package func waitUntilConsuming() async throws { try await owner.waitUntil { isConsuming } }

    package func ack(_ d: AMQPDelivery, multiple: Bool = false) {
        send(.ack(tag: d.deliveryTag, generation: d.generation, multiple: multiple))
    }

    /// Rejects one delivery; with `requeue: false` it dead-letters.
    package func reject(_ d: AMQPDelivery, requeue: Bool) {
        send(.reject(tag: d.deliveryTag, generation: d.generation, requeue: requeue))
    }

    package func nack(_ d: AMQPDelivery, multiple: Bool, requeue: Bool) {
        send(.nack(tag: d.deliveryTag, generation: d.generation, multiple: multiple, requeue: requeue))
    }

    /// Returns once every ack, reject and nack queued before this call has been written to the
    /// broker's socket, or dropped because its connection is gone (then the broker redelivers).
    package func flush() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in send(.barrier(c)) }
    }

    private func send(_ c: Command) {
        commands.withLock { $0.append(c) }
        wake.wake()
    }

    // MARK: owner thread

    private func run() {
        var generation: UInt64 = 0
        var attempt = 0
        while !owner.isStopped {
            generation += 1
            let session: AMQPSession
            do throws(AMQPError) {
                session = try owner.connect(topology: topology, generation: generation)
                do throws(AMQPError) {
                    if !cancelRequested.load(ordering: .relaxed) {
                        let arena = CArena()
                        try withExtendedLifetime(arena) { () throws(AMQPError) in
                            var qos: UInt16?
                            for s in subscriptions {
                                // Per consumer (global = 0): applies to the consumers started after it.
                                if qos != s.prefetch {
                                    amqp_basic_qos(session.conn, session.channel, 0, s.prefetch, 0)
                                    try AMQPSession.check(amqp_get_rpc_reply(session.conn), "basic.qos")
                                    qos = s.prefetch
                                }
                                let q = s.queue
                                amqp_basic_consume(
                                    session.conn, session.channel, arena.bytes(q), arena.bytes(q), 0, 0, 0,
                                    amqp_table_t(num_entries: 0, entries: nil))
                                try AMQPSession.check(amqp_get_rpc_reply(session.conn), "basic.consume \(q)")
                            }
                        }
                    }
                } catch {
                    session.abandon()  // never a polite close on a connection the broker dropped
                    throw error
                }
            } catch {
                attempt += 1
                owner.failed(error)
                let endpoint = owner.moveOn()
                logger.warning(
                    "amqp consumer connect failed, retrying",
                    metadata: [
                        "amqp.url": "\(endpoint)", "attempt": "\(attempt)", "error": "\(error)",
                    ])
                owner.sleepBackoff(attempt)
                continue
            }
            if generation > 1 { owner.reconnected() }
            attempt = 0
            connected.store(true, ordering: .relaxed)
            consuming.store(!cancelRequested.load(ordering: .relaxed), ordering: .relaxed)
            logger.info(
                "amqp consumer connected",
                metadata: [
                    "amqp.url": "\(session.endpoint.redacted)", "amqp.queues": "\(queues)",
                    "amqp.generation": "\(generation)",
                ])
            let error = serve(session)
            connected.store(false, ordering: .relaxed)
            consuming.store(false, ordering: .relaxed)
            dropCommands()  // tags of this connection are void now
            if let error {
                owner.failed(error)
                owner.moveOn()
                logger.warning(
                    "amqp consumer connection lost",
                    metadata: ["amqp.url": "\(session.endpoint.redacted)", "error": "\(error)"])
                session.abandon()
                attempt = 1
                owner.sleepBackoff(attempt)
            } else {
                session.close()
            }
        }
        dropCommands()
        continuation.finish()
    }

    /// Forgets the queued commands, resuming any barrier among them.
    private func dropCommands() {
        for case .barrier(let c) in commands.withLock({ c in
            defer { c = [] }
            return c
        }) { c.resume() }
    }

    private func serve(_ session: AMQPSession) -> AMQPError? {
        var cancelled = false
        while true {
            if owner.isStopped {
                applyCommands(session)
                return nil
            }
            if cancelRequested.load(ordering: .relaxed) && !cancelled {
                cancelled = true
                consuming.store(false, ordering: .relaxed)
                let arena = CArena()
                withExtendedLifetime(arena) {
                    for q in queues { _ = amqp_basic_cancel(session.conn, session.channel, arena.bytes(q)) }
                }
                // No new work: end the stream. Deliveries already on the wire are not yielded; they
                // stay unacked and return to the queue when the connection closes.
                continuation.finish()
            }
            if let e = applyCommands(session) { return e }

            if !session.hasBufferedInput {
                wake.wait(on: session.socketFD, timeoutMS: 500)
            }
            // Always read through amqp_consume_message, even when poll() saw nothing: it also
            // services heartbeats, and a frame read any other way could be a basic.deliver
            // that would then be lost (never yielded, never acked).
            // Read every delivery that is available now.
            while true {
                amqp_maybe_release_buffers(session.conn)
                var envelope = amqp_envelope_t()
                var tv = timeval(tv_sec: 0, tv_usec: 0)
                let reply = amqp_consume_message(session.conn, &envelope, &tv, 0)
                if reply.reply_type == AMQP_RESPONSE_NORMAL {
                    let d = AMQPDelivery(
                        body: envelope.message.body.array,
                        properties: AMQPSession.properties(envelope.message.properties),
                        routingKey: envelope.routing_key.string,
                        exchange: envelope.exchange.string,
                        redelivered: envelope.redelivered != 0,
                        queue: envelope.consumer_tag.string,
                        deliveryTag: envelope.delivery_tag,
                        generation: session.generation)
                    amqp_destroy_envelope(&envelope)
                    continuation.yield(d)
                    continue
                }
                if reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
                    && reply.library_error == AMQP_STATUS_TIMEOUT.rawValue
                {
                    break
                }
                if reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
                    && reply.library_error == AMQP_STATUS_UNEXPECTED_STATE.rawValue
                {
                    // A method frame other than basic.deliver is waiting.
                    var frame = amqp_frame_t()
                    let rc = amqp_simple_wait_frame_noblock(session.conn, &frame, &tv)
                    if rc == AMQP_STATUS_TIMEOUT.rawValue { break }
                    if rc != AMQP_STATUS_OK.rawValue {
                        return AMQPError(code: .connection, message: String(cString: amqp_error_string2(rc)))
                    }
                    if let e = handleStray(frame, cancelling: cancelled) { return e }
                    continue
                }
                if reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION {
                    return AMQPError(
                        code: .connection, message: String(cString: amqp_error_string2(reply.library_error)))
                }
                return AMQPError(code: .protocolError, message: "unexpected reply while consuming")
            }
        }
    }

    /// A method frame other than a delivery. A `basic.cancel` from the broker (we announce
    /// `consumer_cancel_notify`) means a queue was deleted under its consumer: reconnecting
    /// declares the queue again and resumes every consumer. Left alone, the consumer would stay
    /// silent until the connection broke for another reason.
    private func handleStray(_ frame: amqp_frame_t, cancelling: Bool) -> AMQPError? {
        guard frame.frame_type == UInt8(AMQP_FRAME_METHOD) else { return nil }
        let id = frame.payload.method.id
        if id == CRabbitMQ_CHANNEL_CLOSE_METHOD || id == CRabbitMQ_CONNECTION_CLOSE_METHOD {
            return AMQPSession.closeError(id: id, decoded: frame.payload.method.decoded, what: "consumer")
        }
        if id == CRabbitMQ_BASIC_CANCEL_METHOD, !cancelling, let decoded = frame.payload.method.decoded {
            let tag = decoded.assumingMemoryBound(to: amqp_basic_cancel_t.self).pointee.consumer_tag.string
            return AMQPError(
                code: .consumerCancelled,
                message:
                    """
                    the broker cancelled the consumer of queue '\(tag)' (the queue was deleted?); reconnecting \
                    declares it again
                    """
            )
        }
        return nil
    }

    @discardableResult
    private func applyCommands(_ session: AMQPSession) -> AMQPError? {
        let pending = commands.withLock { c in
            defer { c = [] }
            return c
        }
        for (i, c) in pending.enumerated() {
            var rc: Int32 = 0
            switch c {
            case .barrier(let waiter):
                waiter.resume()
                continue
            case .ack(let tag, let gen, let multiple):
                guard gen == session.generation else { continue }
                rc = amqp_basic_ack(session.conn, session.channel, tag, multiple ? 1 : 0)
            case .reject(let tag, let gen, let requeue):
                guard gen == session.generation else { continue }
                rc = amqp_basic_reject(session.conn, session.channel, tag, requeue ? 1 : 0)
            case .nack(let tag, let gen, let multiple, let requeue):
                guard gen == session.generation else { continue }
                rc = amqp_basic_nack(session.conn, session.channel, tag, multiple ? 1 : 0, requeue ? 1 : 0)
            }
            if rc != AMQP_STATUS_OK.rawValue {
                for case .barrier(let waiter) in pending[(i + 1)...] { waiter.resume() }
                return AMQPError(code: .connection, message: "ack failed: \(String(cString: amqp_error_string2(rc)))")
            }
        }
        return nil
    }
}
