import CRabbitMQ
import Dispatch
import Synchronization

/// A queue's depth and consumers as the broker reports them (a passive `queue.declare`).
package struct QueueStats: Sendable, Equatable {
    package var name: String
    /// Messages ready for delivery (not those delivered and unacknowledged).
    package var messages: Int
    package var consumers: Int
}

/// Questions to the broker: does it answer, and how deep are these queues. They are asked one at a
/// time on one connection, kept open between questions, by a serial dispatch queue of its own
/// (rabbitmq-c blocks, so never on the cooperative pool). However often a dashboard or a probe asks,
/// the broker sees one connection per inspector.
///
/// The connection sends no heartbeats (the broker does not close it for idling); a question on a
/// connection that has died fails within `operationTimeout`, and is then asked once more on a new
/// connection: to each endpoint of the broker list in turn, until one answers. `close()` ends the
/// connection; a question after it opens a new one.
package final class AMQPInspector: @unchecked Sendable {
    // @unchecked: `session` and `next` are read and written only on `queue`, which runs one
    // block at a time.
    private var session: AMQPSession?
    /// The endpoint a new connection tries first (random at start, as publishers and consumers do).
    private var next: Int
    private let queue = DispatchQueue(label: "conveyor.amqp.inspector")
    private let opened = Atomic<Int>(0)
    private let configuration: AMQPConfiguration

    package init(configuration: AMQPConfiguration) {
        var c = configuration
        c.heartbeat = .zero
        c.name += " inspector"
        self.configuration = c
        next = c.startAtFirstEndpoint ? 0 : Int.random(in: 0..<1024)
    }

    deinit { session?.close() }

    /// Connections opened so far (one, while the broker stays up).
    package var connectionsOpened: Int { opened.load(ordering: .relaxed) }

    /// Whether the broker answers: a round trip (`basic.qos`, which needs no permission).
    package func ping() async throws(AMQPError) {
        try await ask { session throws(AMQPError) in
            _ = amqp_basic_qos(session.conn, session.channel, 0, 0, 0)
            try AMQPSession.check(amqp_get_rpc_reply(session.conn), "basic.qos")
        }
    }

    /// Stats of each named queue that exists; a missing queue is left out (not created).
    package func queues(_ names: [String]) async throws(AMQPError) -> [QueueStats] {
        try await ask { session throws(AMQPError) in try Self.inspect(names, session) }
    }

    /// Closes the connection (at shutdown), after the question being asked; returns at once, so a
    /// caller on the cooperative pool never waits for the broker.
    package func close() {
        queue.async { [self] in
            session?.close()
            session = nil
        }
    }

    private func ask<T: Sendable>(_ question: @escaping @Sendable (AMQPSession) throws(AMQPError) -> T)
        async throws(AMQPError) -> T
    {
        let result: Result<T, AMQPError> = await withCheckedContinuation { continuation in
            queue.async {
                continuation.resume(returning: Result { () throws(AMQPError) in try self.answer(question) })
            }
        }
        return try result.get()
    }

    /// On `queue`: the question on the kept connection, or once more on a new one when that fails.
    private func answer<T>(_ question: (AMQPSession) throws(AMQPError) -> T) throws(AMQPError) -> T {
        if let kept = session {
            do { return try question(kept) } catch {
                kept.abandon()
                session = nil
            }
        }
        let endpoints = try configuration.endpoints()
        var last = AMQPError(code: .connection, message: "no broker endpoint")
        for _ in endpoints.indices {
            let endpoint = endpoints[next % endpoints.count]
            do throws(AMQPError) {
                let fresh = try AMQPSession(configuration: configuration, endpoint: endpoint, generation: 0)
                opened.add(1, ordering: .relaxed)
                session = fresh
                do { return try question(fresh) } catch {
                    fresh.abandon()
                    session = nil
                    throw error
                }
            } catch {
                next += 1
                last = error
            }
        }
        throw last
    }

    private static func inspect(_ names: [String], _ session: AMQPSession) throws(AMQPError) -> [QueueStats] {
        var out: [QueueStats] = []
        let channel = session.channel
        let arena = CArena()
        try withExtendedLifetime(arena) { () throws(AMQPError) in
            for name in names {
                guard
                    let ok = amqp_queue_declare(
                        session.conn, channel, arena.bytes(name), 1, 0, 0, 0, amqp_table_t(num_entries: 0, entries: nil)
                    )
                else {
                    let reply = amqp_get_rpc_reply(session.conn)
                    guard reply.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION,
                        reply.reply.id == CRabbitMQ_CHANNEL_CLOSE_METHOD
                    else {
                        try AMQPSession.check(reply, "queue.declare (passive) \(name)")
                        continue
                    }
                    // A passive declare of a missing queue closes the channel: acknowledge the close
                    // and open the channel again, under the same number, for the next name.
                    var closeOK = amqp_channel_close_ok_t(dummy: 0)
                    _ = amqp_send_method(session.conn, channel, CRabbitMQ_CHANNEL_CLOSE_OK_METHOD, &closeOK)
                    amqp_channel_open(session.conn, channel)
                    try AMQPSession.check(amqp_get_rpc_reply(session.conn), "channel.open")
                    continue
                }
                out.append(
                    QueueStats(
                        name: name, messages: Int(ok.pointee.message_count), consumers: Int(ok.pointee.consumer_count)))
            }
        }
        return out
    }
}
