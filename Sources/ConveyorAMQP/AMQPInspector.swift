import CRabbitMQ
import Foundation

/// A queue's depth and consumers as the broker reports them (a passive `queue.declare`).
public struct QueueStats: Sendable, Equatable {
    public var name: String
    /// Messages ready for delivery (not those delivered and unacknowledged).
    public var messages: Int
    public var consumers: Int
}

/// A work queue as the broker sees it, with its isolation lane.
public struct WorkQueueDepth: Sendable, Equatable {
    /// The work queue's broker name (`conveyor.q.<queue>`).
    public var queue: String
    /// Ready messages in the work queue, and in its isolation lane.
    public var ready: Int
    public var isolated: Int
    /// Consumers of the work queue.
    public var consumers: Int
    /// Everything waiting for a worker: both queues' ready messages.
    public var waiting: Int { ready + isolated }
}

/// One-shot questions to the broker on a connection of their own, asked on a thread of their
/// own (rabbitmq-c blocks): is it reachable, and how deep are these queues.
public enum AMQPInspector {
    /// Stats of each named queue that exists; a missing queue is left out (not created).
    public static func queues(_ names: [String], configuration: AMQPConfiguration) async throws(AMQPError) -> [QueueStats] {
        let result: Result<[QueueStats], AMQPError> = await withCheckedContinuation { continuation in
            Thread.detachNewThread {
                continuation.resume(returning: Result { () throws(AMQPError) in try inspect(names, configuration) })
            }
        }
        return try result.get()
    }

    /// Each work queue's depth with its isolation lane's (docs/workers.md), keyed by the work
    /// queue's name (`default`, not `conveyor.q.default`); a work queue not declared yet is left out.
    public static func workQueues(_ queues: [String], topology: ConveyorTopology,
                                  configuration: AMQPConfiguration) async throws(AMQPError) -> [String: WorkQueueDepth] {
        let stats = try await self.queues(queues.flatMap { [topology.workQueue($0), topology.isolationQueue($0)] }, configuration: configuration)
        let byName = Dictionary(stats.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var out: [String: WorkQueueDepth] = [:]
        for queue in queues {
            guard let work = byName[topology.workQueue(queue)] else { continue }
            out[queue] = WorkQueueDepth(queue: work.name, ready: work.messages, isolated: byName[topology.isolationQueue(queue)]?.messages ?? 0,
                                        consumers: work.consumers)
        }
        return out
    }

    static func inspect(_ names: [String], _ configuration: AMQPConfiguration) throws(AMQPError) -> [QueueStats] {
        let session = try AMQPSession(configuration: configuration, topology: AMQPTopology(), generation: 0)
        defer { session.close() }
        var out: [QueueStats] = []
        // A passive declare of a missing queue closes its channel: each such miss moves on to a
        // fresh channel (1 is the session's own; 2… are opened here).
        var channel: amqp_channel_t = 1
        let arena = CArena()
        try withExtendedLifetime(arena) { () throws(AMQPError) in
            for name in names {
                guard let ok = amqp_queue_declare(session.conn, channel, arena.bytes(name), 1, 0, 0, 0, amqp_table_t(num_entries: 0, entries: nil)) else {
                    let reply = amqp_get_rpc_reply(session.conn)
                    guard reply.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION, reply.reply.id == CRabbitMQ_CHANNEL_CLOSE_METHOD else {
                        try AMQPSession.check(reply, "queue.declare (passive) \(name)")
                        continue
                    }
                    var closeOK = amqp_channel_close_ok_t(dummy: 0)
                    _ = amqp_send_method(session.conn, channel, CRabbitMQ_CHANNEL_CLOSE_OK_METHOD, &closeOK)
                    channel += 1
                    amqp_channel_open(session.conn, channel)
                    try AMQPSession.check(amqp_get_rpc_reply(session.conn), "channel.open")
                    continue
                }
                out.append(QueueStats(name: name, messages: Int(ok.pointee.message_count), consumers: Int(ok.pointee.consumer_count)))
            }
        }
        return out
    }
}
