/// Exchanges, queues and bindings, declared idempotently on every (re)connect.
public struct AMQPTopology: Sendable, Hashable {
    public struct Exchange: Sendable, Hashable {
        public var name: String
        public var type: String
        public init(name: String, type: String) { self.name = name; self.type = type }
    }
    public struct Queue: Sendable, Hashable {
        public var name: String
        public var arguments: AMQPHeaders
        public init(name: String, arguments: AMQPHeaders) { self.name = name; self.arguments = arguments }
    }
    public struct Binding: Sendable, Hashable {
        public var queue: String
        public var exchange: String
        public var routingKey: String
        public init(queue: String, exchange: String, routingKey: String) {
            self.queue = queue; self.exchange = exchange; self.routingKey = routingKey
        }
    }

    public var exchanges: [Exchange] = []
    public var queues: [Queue] = []
    public var bindings: [Binding] = []

    public init(exchanges: [Exchange] = [], queues: [Queue] = [], bindings: [Binding] = []) {
        self.exchanges = exchanges
        self.queues = queues
        self.bindings = bindings
    }

    public func merging(_ other: AMQPTopology) -> AMQPTopology {
        func uniq<T: Hashable>(_ a: [T]) -> [T] { var seen = Set<T>(); return a.filter { seen.insert($0).inserted } }
        return AMQPTopology(exchanges: uniq(exchanges + other.exchanges), queues: uniq(queues + other.queues),
                            bindings: uniq(bindings + other.bindings))
    }
}

/// The names and shapes of Conveyor's broker objects (docs/architecture.md, "Topology").
public struct ConveyorTopology: Sendable, Hashable {
    /// Prefix of every name. Default `conveyor`.
    public var prefix: String
    /// Deliveries of one message before the broker dead-letters it. Default 5.
    public var deliveryLimit: Int

    public init(prefix: String = "conveyor", deliveryLimit: Int = 5) {
        self.prefix = prefix
        self.deliveryLimit = deliveryLimit
    }

    public var tasksExchange: String { "\(prefix).tasks" }
    public var statusExchange: String { "\(prefix).status" }
    public var statusQueue: String { "\(prefix).status" }
    public var deadLetterExchange: String { "\(prefix).dlx" }
    public var deadQueue: String { "\(prefix).dead" }
    /// Fanout of control messages (cancel a run) to every worker.
    public var controlExchange: String { "\(prefix).control" }
    /// One worker's control queue: `conveyor.control.<worker id>`, removed a minute after its worker goes.
    public func controlQueue(worker: String) -> String { "\(prefix).control.\(worker)" }
    /// The broker queue of a work queue: `conveyor.q.<queue>`.
    public func workQueue(_ queue: String) -> String { "\(prefix).q.\(queue)" }
    /// A work queue's isolation lane: `conveyor.isolated.<queue>`. Workers move every redelivered
    /// task message here and take these one at a time, so a message that kills its worker is
    /// redelivered alone and reaches the delivery limit alone. Bound to no exchange: workers
    /// publish to it by name through the default exchange. (Not `conveyor.q.<queue>.isolated`,
    /// which a work queue named `<queue>.isolated` would own.)
    public func isolationQueue(_ queue: String) -> String { "\(prefix).isolated.\(queue)" }
    /// Header a worker puts on the copy it moves to an isolation lane: the queue it came from.
    public static let isolatedFromHeader = "x-conveyor-isolated-from"

    var quorumArguments: AMQPHeaders {
        [
            "x-queue-type": .string("quorum"),
            "x-delivery-limit": .int(Int64(deliveryLimit)),
            "x-dead-letter-exchange": .string(deadLetterExchange),
            "x-dead-letter-strategy": .string("at-least-once"),
            "x-overflow": .string("reject-publish"),
        ]
    }

    /// Dead-letter exchange and queue: everything else points at them.
    public var base: AMQPTopology {
        AMQPTopology(
            exchanges: [.init(name: deadLetterExchange, type: "fanout")],
            queues: [.init(name: deadQueue, arguments: ["x-queue-type": .string("quorum")])],
            bindings: [.init(queue: deadQueue, exchange: deadLetterExchange, routingKey: "")])
    }

    /// Tasks exchange plus, per work queue, a quorum queue routed by the queue name and its
    /// isolation lane (same delivery limit and dead-letter exchange).
    public func work(queues: [String]) -> AMQPTopology {
        base.merging(AMQPTopology(
            exchanges: [.init(name: tasksExchange, type: "direct")],
            queues: queues.flatMap { [.init(name: workQueue($0), arguments: quorumArguments),
                                      .init(name: isolationQueue($0), arguments: quorumArguments)] },
            bindings: queues.map { .init(queue: workQueue($0), exchange: tasksExchange, routingKey: $0) }))
    }

    /// Status exchange and queue.
    public var status: AMQPTopology {
        base.merging(AMQPTopology(
            exchanges: [.init(name: statusExchange, type: "direct")],
            queues: [.init(name: statusQueue, arguments: quorumArguments)],
            bindings: [.init(queue: statusQueue, exchange: statusExchange, routingKey: "status")]))
    }

    /// The control exchange alone (what the dispatcher publishes to).
    public var controlPublish: AMQPTopology {
        AMQPTopology(exchanges: [.init(name: controlExchange, type: "fanout")])
    }

    /// The control exchange and one worker's own queue on it.
    public func control(worker: String) -> AMQPTopology {
        AMQPTopology(
            exchanges: [.init(name: controlExchange, type: "fanout")],
            queues: [.init(name: controlQueue(worker: worker), arguments: ["x-queue-type": .string("classic"), "x-expires": .int(60_000)])],
            bindings: [.init(queue: controlQueue(worker: worker), exchange: controlExchange, routingKey: "")])
    }
}
