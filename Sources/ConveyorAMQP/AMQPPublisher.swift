import CRabbitMQ
import CoreMetrics
import Foundation
package import Logging
import Synchronization

/// Publishes persistent messages with publisher confirms, many in flight at once.
///
/// One dedicated thread owns the connection. Callers hand it batches and await the broker's
/// verdict per message: `.success` only after basic.ack; a nack, a return (unroutable), a
/// timeout or a broken connection fail that message. Up to `window` messages are unconfirmed at
/// any time, so confirms cost no round trip per message.
///
/// While the connection is down the publisher is a circuit breaker: calls fail at once with
/// `.notConnected` (nothing hammers the broker); the thread reconnects with backoff and
/// jitter, re-declaring the topology.
package final class AMQPPublisher: Sendable {
    package let configuration: AMQPConfiguration
    /// What is declared on every (re)connect: the initial topology plus everything `ensureTopology` added.
    private let topology: Mutex<AMQPTopology>
    /// Declarations for the owner thread.
    private let declarations = Handoff<(AMQPTopology, CheckedContinuation<Result<Void, AMQPError>, Never>)>()
    /// Most unconfirmed messages. Default 1,024.
    package let window: Int
    private let logger: Logger
    private let owner: ConnectionOwner
    private var wake: WakePipe { owner.wake }
    /// Batches for the owner thread.
    private let inbox = Handoff<PublishBatch>()
    private let connected = Atomic<Bool>(false)
    private let blocked = Atomic<Bool>(false)

    package init(configuration: AMQPConfiguration, topology: AMQPTopology, window: Int = 1024, logger: Logger) {
        self.configuration = configuration
        self.owner = ConnectionOwner(configuration: configuration, role: "publish")
        self.topology = Mutex(topology)
        self.window = window
        self.logger = logger
        Self.blockedGauge.record(0)
    }

    /// 1 while the broker blocks this process's publishing (a memory or disk alarm), else 0.
    static let blockedGauge = CoreMetrics.Gauge(label: "conveyor_amqp_blocked")

    private func setBlocked(_ value: Bool) {
        blocked.store(value, ordering: .relaxed)
        Self.blockedGauge.record(value ? 1 : 0)
    }

    /// Whether a connection is up (readiness).
    package var isConnected: Bool { connected.load(ordering: .relaxed) }
    /// Whether the broker has blocked publishing (memory or disk alarm).
    package var isBlocked: Bool { blocked.load(ordering: .relaxed) }
    /// How many times the connection was re-established.
    package var reconnectCount: Int { owner.reconnectCount }

    /// Starts the owner thread.
    package func start() { owner.start(name: "conveyor.amqp.publish") { [self] in run() } }

    /// Stops the thread; unconfirmed messages fail with `.stopped`.
    package func stop() { owner.stop() }

    /// Stops, and returns once the owner thread has failed what is unconfirmed and closed the
    /// connection (at most `limit`; returns whether it did).
    @discardableResult
    package func close(within limit: Duration = .seconds(5)) async -> Bool { await owner.stopAndWait(within: limit) }

    /// Whether the owner thread has ended (never started, or stopped and its connection closed).
    package var hasEnded: Bool { owner.hasEnded }

    /// Waits for the first connection, up to `configuration.connectRetryFor`; throws a clear error naming the URL.
    package func waitUntilConnected() async throws { try await owner.waitUntil { isConnected } }

    /// Publishes `messages` and returns, in order, whether the broker confirmed each.
    package func publish(_ messages: [AMQPOutgoingMessage]) async -> [Result<Void, AMQPError>] {
        if messages.isEmpty { return [] }
        return await withCheckedContinuation { cont in
            let batch = PublishBatch(messages: messages, continuation: cont)
            if owner.isStopped {
                batch.failAll(AMQPError(code: .stopped, message: "publisher stopped"))
                return
            }
            if !isConnected {
                batch.failAll(AMQPError(code: .notConnected, message: "not connected to the broker (reconnecting)"))
                return
            }
            guard inbox.append(batch) else {
                batch.failAll(AMQPError(code: .stopped, message: "publisher stopped"))
                return
            }
            wake.wake()
        }
    }

    /// Declares more exchanges, queues and bindings now and, once the broker has accepted them,
    /// on every later reconnect.
    package func ensureTopology(_ more: AMQPTopology) async throws(AMQPError) {
        let r: Result<Void, AMQPError> = await withCheckedContinuation { cont in
            if !isConnected {
                cont.resume(
                    returning: .failure(
                        AMQPError(code: .notConnected, message: "not connected to the broker (reconnecting)")))
                return
            }
            guard declarations.append((more, cont)) else {
                cont.resume(returning: .failure(AMQPError(code: .stopped, message: "publisher stopped")))
                return
            }
            wake.wake()
        }
        try r.get()
    }

    private func failDeclarations(_ error: AMQPError, closing: Bool = false) {
        let pending = declarations.take(closing: closing)
        for (_, c) in pending { c.resume(returning: .failure(error)) }
    }

    /// Publishes one message; throws unless the broker confirmed it.
    package func publish(_ message: AMQPOutgoingMessage) async throws(AMQPError) {
        try await publish([message])[0].get()
    }

    // MARK: owner thread

    private struct InFlight {
        var tag: UInt64
        var batch: PublishBatch
        var index: Int
        var sentAt: ContinuousClock.Instant
        var returned = false
    }

    private func run() {
        var generation: UInt64 = 0
        var attempt = 0
        while !owner.isStopped {
            generation += 1
            let session: AMQPSession
            do throws(AMQPError) {
                session = try owner.connect(topology: topology.withLock { $0 }, generation: generation)
                amqp_confirm_select(session.conn, session.channel)
                do throws(AMQPError) {
                    try AMQPSession.check(amqp_get_rpc_reply(session.conn), "confirm.select")
                } catch {
                    session.abandon()
                    throw error
                }
            } catch {
                attempt += 1
                owner.failed(error)
                let endpoint = owner.moveOn()
                failInbox(AMQPError(code: .notConnected, message: "not connected to the broker: \(error.message)"))
                failDeclarations(
                    AMQPError(code: .notConnected, message: "not connected to the broker: \(error.message)"))
                logger.warning(
                    "amqp publisher connect failed, retrying",
                    metadata: [
                        "amqp.url": "\(endpoint)", "attempt": "\(attempt)", "error": "\(error)",
                    ])
                owner.sleepBackoff(attempt)
                continue
            }
            if attempt > 0 || generation > 1 { owner.reconnected() }
            attempt = 0
            // A new connection starts unblocked; the broker says so again if its alarm still holds.
            setBlocked(false)
            connected.store(true, ordering: .relaxed)
            logger.info(
                "amqp publisher connected",
                metadata: ["amqp.url": "\(session.endpoint.redacted)", "amqp.generation": "\(generation)"])
            let error = serve(session)
            connected.store(false, ordering: .relaxed)
            if let error {
                owner.failed(error)
                owner.moveOn()
                logger.warning(
                    "amqp publisher connection lost",
                    metadata: ["amqp.url": "\(session.endpoint.redacted)", "error": "\(error)"])
                session.abandon()
                attempt = 1
                owner.sleepBackoff(attempt)
            } else {
                session.close()
            }
        }
        failInbox(AMQPError(code: .stopped, message: "publisher stopped"), closing: true)
        failDeclarations(AMQPError(code: .stopped, message: "publisher stopped"), closing: true)
    }

    private func failInbox(_ error: AMQPError, closing: Bool = false) {
        let batches = inbox.take(closing: closing)
        for b in batches { b.failRemaining(error) }
    }

    /// Serves one connection until it breaks (returns the error) or the publisher stops (returns nil).
    private func serve(_ session: AMQPSession) -> AMQPError? {
        var nextTag: UInt64 = 1
        var inflight: [InFlight] = []
        var queued: [PublishBatch] = []
        let clock = ContinuousClock()

        func failAll(_ error: AMQPError) {
            for f in inflight { f.batch.complete(f.index, .failure(error)) }
            inflight = []
            for b in queued { b.failRemaining(error) }
            queued = []
        }

        func settle(tag: UInt64, multiple: Bool, ok: Bool) {
            var i = 0
            while i < inflight.count {
                let f = inflight[i]
                if f.tag == tag || (multiple && f.tag < tag) {
                    let result: Result<Void, AMQPError> =
                        !ok
                        ? .failure(AMQPError(code: .nacked, message: "broker refused the message (basic.nack)"))
                        : f.returned
                            ? .failure(
                                AMQPError(
                                    code: .unroutable,
                                    message:
                                        """
                                        no queue bound for routing key '\(f.batch.messages[f.index].routingKey)' on \
                                        exchange '\(f.batch.messages[f.index].exchange)'
                                        """
                                ))
                            : .success(())
                    f.batch.complete(f.index, result)
                    inflight.remove(at: i)
                    if !multiple { return }
                } else if f.tag > tag {
                    return
                } else {
                    i += 1
                }
            }
        }

        while true {
            if owner.isStopped {
                failAll(AMQPError(code: .stopped, message: "publisher stopped"))
                return nil
            }
            queued.append(contentsOf: inbox.take())
            let pending = declarations.take()
            for (i, (t, cont)) in pending.enumerated() {
                do throws(AMQPError) {
                    try session.declare(t)
                    // Declared again on every reconnect from now on; never one the broker refused,
                    // which would fail every reconnect after it.
                    topology.withLock { $0 = $0.merging(t) }
                    cont.resume(returning: .success(()))
                } catch {
                    // A failed declare closes the channel: every declaration still waiting gets
                    // the error (none is left unanswered), and the connection starts again.
                    for (_, c) in pending[i...] { c.resume(returning: .failure(error)) }
                    failAll(error)
                    return error
                }
            }

            // Publish while the window has room.
            while inflight.count < window, let batch = queued.first {
                let index = batch.cursor
                let status = session.publish(batch.messages[index], mandatory: batch.messages[index].mandatory)
                if status != AMQP_STATUS_OK.rawValue {
                    let e = AMQPError(
                        code: .connection, message: "publish failed: \(String(cString: amqp_error_string2(status)))")
                    failAll(e)
                    return e
                }
                if configuration.publishWithoutConfirms {
                    batch.complete(index, .success(()))
                } else {
                    inflight.append(InFlight(tag: nextTag, batch: batch, index: index, sentAt: clock.now))
                }
                nextTag += 1
                batch.cursor += 1
                if batch.cursor == batch.messages.count { queued.removeFirst() }
            }

            // Wait for frames (confirms), new work, or a heartbeat tick.
            if !session.hasBufferedInput {
                let haveRoom = inflight.count < window && !queued.isEmpty
                wake.wait(on: session.socketFD, timeoutMS: haveRoom ? 0 : (inflight.isEmpty ? 500 : 50))
            }

            // Read every frame that is available now.
            while true {
                var frame = amqp_frame_t()
                var tv = timeval(tv_sec: 0, tv_usec: 0)
                let rc = amqp_simple_wait_frame_noblock(session.conn, &frame, &tv)
                if rc == AMQP_STATUS_TIMEOUT.rawValue { break }
                if rc != AMQP_STATUS_OK.rawValue {
                    let e = AMQPError(code: .connection, message: String(cString: amqp_error_string2(rc)))
                    failAll(e)
                    return e
                }
                guard frame.frame_type == UInt8(AMQP_FRAME_METHOD) else { continue }
                let id = frame.payload.method.id
                let decoded = frame.payload.method.decoded
                switch id {
                case CRabbitMQ_BASIC_ACK_METHOD:
                    let ack = decoded!.assumingMemoryBound(to: amqp_basic_ack_t.self).pointee
                    settle(tag: ack.delivery_tag, multiple: ack.multiple != 0, ok: true)
                case CRabbitMQ_BASIC_NACK_METHOD:
                    let nack = decoded!.assumingMemoryBound(to: amqp_basic_nack_t.self).pointee
                    settle(tag: nack.delivery_tag, multiple: nack.multiple != 0, ok: false)
                case CRabbitMQ_BASIC_RETURN_METHOD:
                    var message = amqp_message_t()
                    let reply = amqp_read_message(session.conn, session.channel, &message, 0)
                    if reply.reply_type == AMQP_RESPONSE_NORMAL {
                        let mid = AMQPSession.properties(message.properties).messageID
                        if let i = inflight.firstIndex(where: {
                            !$0.returned && $0.batch.messages[$0.index].properties.messageID == mid
                        }) {
                            inflight[i].returned = true
                        }
                        amqp_destroy_message(&message)
                    }
                case CRabbitMQ_CONNECTION_BLOCKED_METHOD:
                    let reason =
                        decoded.map { $0.assumingMemoryBound(to: amqp_connection_blocked_t.self).pointee.reason.string }
                        ?? ""
                    setBlocked(true)
                    logger.warning("broker blocked publishing (resource alarm)", metadata: ["amqp.reason": "\(reason)"])
                case CRabbitMQ_CONNECTION_UNBLOCKED_METHOD:
                    setBlocked(false)
                    // The confirm timeout counts from now: time spent blocked is the alarm's, not a sign of a dead
                    // connection.
                    for i in inflight.indices { inflight[i].sentAt = clock.now }
                    logger.info("broker unblocked publishing")
                case CRabbitMQ_CHANNEL_CLOSE_METHOD, CRabbitMQ_CONNECTION_CLOSE_METHOD:
                    let e = AMQPSession.closeError(id: id, decoded: decoded, what: "publisher")
                    failAll(e)
                    return e
                default:
                    break
                }
            }
            amqp_maybe_release_buffers(session.conn)

            // A confirm that never comes means the connection is not healthy.
            if let oldest = inflight.first, clock.now - oldest.sentAt > configuration.confirmTimeout, !isBlocked {
                let e = AMQPError(
                    code: .timeout, message: "no publisher confirm within \(configuration.confirmTimeout)")
                failAll(e)
                return e
            }
        }
    }
}

/// A caller's batch, handed to the publisher thread.
final class PublishBatch: @unchecked Sendable {
    // @unchecked Sendable: created by the caller, then touched only by the publisher's owner
    // thread (or, before hand-off, by the caller alone); the continuation is resumed exactly once.
    let messages: [AMQPOutgoingMessage]
    var results: [Result<Void, AMQPError>?]
    var remaining: Int
    var cursor = 0
    let continuation: CheckedContinuation<[Result<Void, AMQPError>], Never>

    init(messages: [AMQPOutgoingMessage], continuation: CheckedContinuation<[Result<Void, AMQPError>], Never>) {
        self.messages = messages
        self.results = Array(repeating: nil, count: messages.count)
        self.remaining = messages.count
        self.continuation = continuation
    }

    func complete(_ index: Int, _ result: Result<Void, AMQPError>) {
        guard results[index] == nil else { return }
        results[index] = result
        remaining -= 1
        if remaining == 0 { continuation.resume(returning: results.map { $0! }) }
    }

    func failAll(_ error: AMQPError) { for i in messages.indices { complete(i, .failure(error)) } }

    /// Fails the messages not yet published (in-flight ones are failed by their own entries).
    func failRemaining(_ error: AMQPError) { for i in cursor..<messages.count { complete(i, .failure(error)) } }
}

/// Items handed from callers to the owner thread. Once closed (the publisher stopped), `append`
/// refuses, checked under the same lock as the append, so nothing joins after the owner
/// thread's last `take` and waits forever.
final class Handoff<Item: Sendable>: Sendable {
    private let state = Mutex<(items: [Item], closed: Bool)>(([], false))

    /// Queues `item`; false when closed (the caller answers it itself).
    func append(_ item: Item) -> Bool {
        state.withLock { s in
            if !s.closed { s.items.append(item) }
            return !s.closed
        }
    }

    /// Everything queued, emptying the queue; `closing` refuses every later `append`.
    func take(closing: Bool = false) -> [Item] {
        state.withLock { s in
            defer { s.items = [] }
            if closing { s.closed = true }
            return s.items
        }
    }
}
