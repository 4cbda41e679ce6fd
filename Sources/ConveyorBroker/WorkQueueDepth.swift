package import ConveyorAMQP

/// A work queue as the broker sees it, with its isolation lane.
package struct WorkQueueDepth: Sendable, Equatable {
    /// The work queue's broker name (`conveyor.q.<queue>`).
    package var queue: String
    /// Ready messages in the work queue, and in its isolation lane.
    package var ready: Int
    package var isolated: Int
    /// Consumers of the work queue.
    package var consumers: Int
    /// Everything waiting for a worker: both queues' ready messages.
    package var waiting: Int { ready + isolated }
}

extension ConveyorTopology {
    /// Each work queue's depth with its isolation lane's (docs/workers.md), keyed by the work
    /// queue's name (`default`, not `conveyor.q.default`); a work queue not declared yet is left out.
    package func workQueueDepths(_ queues: [String], asking inspector: AMQPInspector) async throws(AMQPError)
        -> [String: WorkQueueDepth]
    {
        let topology = self
        let stats = try await inspector.queues(
            queues.flatMap { [topology.workQueue($0), topology.isolationQueue($0)] })
        let byName = Dictionary(stats.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var out: [String: WorkQueueDepth] = [:]
        for queue in queues {
            guard let work = byName[topology.workQueue(queue)] else { continue }
            out[queue] = WorkQueueDepth(
                queue: work.name, ready: work.messages, isolated: byName[topology.isolationQueue(queue)]?.messages ?? 0,
                consumers: work.consumers)
        }
        return out
    }
}
