import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import Logging
import Synchronization

/// The work queues (and their isolation lanes) this dispatcher has declared on the broker.
final class WorkQueues: Sendable {
    let publisher: AMQPPublisher
    let topology: ConveyorTopology
    let declared: Mutex<Set<String>>
    let logger: Logger

    init(publisher: AMQPPublisher, topology: ConveyorTopology, declared: [String], logger: Logger) {
        self.publisher = publisher
        self.topology = topology
        self.declared = Mutex(Set(declared))
        self.logger = logger
    }

    /// The queues declared so far, sorted.
    var names: [String] { declared.withLock { $0 }.sorted() }

    /// Declares the work queues (and lanes) not declared yet by this dispatcher: those its runs
    /// name, and those workers' heartbeats name, since workers only declare passively and wait
    /// for them. A heartbeat is untrusted input: its queue names must follow the task rule
    /// (`QueueName`; at most 200 characters), and heartbeats add none once this dispatcher has
    /// declared `maxHeartbeatQueues` in all.
    func declare(_ names: [String], fromHeartbeat: Bool = false) async {
        let newQueues = declared.withLock { known -> [String] in
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
            declared.withLock { $0.formUnion(newQueues) }
            if fromHeartbeat {
                logger.info("declared work queues a worker consumes", metadata: ["amqp.queues": "\(newQueues)"])
            }
        } catch {
            logger.warning(
                "declaring work queues failed", metadata: ["amqp.queues": "\(newQueues)", "error": "\(error)"])
        }
    }

    /// Most work queues one dispatcher declares in all (heartbeats cannot add past it).
    static let maxHeartbeatQueues = 1_000
}
