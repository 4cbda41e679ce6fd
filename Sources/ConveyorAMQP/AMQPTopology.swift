/// Exchanges, queues and bindings, declared idempotently on every (re)connect.
///
/// A passive declaration only checks that the object exists (the broker answers 404 when it
/// does not) and needs no permission; an active one creates it and needs `configure` on it.
package struct AMQPTopology: Sendable, Hashable {
    package struct Exchange: Sendable, Hashable {
        package var name: String
        package var type: String
        package var passive: Bool
        package init(name: String, type: String, passive: Bool = false) {
            self.name = name
            self.type = type
            self.passive = passive
        }
    }
    package struct Queue: Sendable, Hashable {
        package var name: String
        package var arguments: AMQPHeaders
        package var passive: Bool
        /// Whether the queue outlives a broker restart. A transient classic queue is deleted when
        /// its node goes down, so in a cluster its client can declare it again on another node at
        /// once; a durable classic queue is unavailable (404) until its node returns.
        package var durable: Bool
        package init(name: String, arguments: AMQPHeaders, passive: Bool = false, durable: Bool = true) {
            self.name = name
            self.arguments = arguments
            self.passive = passive
            self.durable = durable
        }
        /// Checks that a queue exists, without creating it.
        package static func existing(_ name: String) -> Queue { Queue(name: name, arguments: [:], passive: true) }
    }
    package struct Binding: Sendable, Hashable {
        package var queue: String
        package var exchange: String
        package var routingKey: String
        package init(queue: String, exchange: String, routingKey: String) {
            self.queue = queue
            self.exchange = exchange
            self.routingKey = routingKey
        }
    }

    package var exchanges: [Exchange] = []
    package var queues: [Queue] = []
    package var bindings: [Binding] = []

    package init(exchanges: [Exchange] = [], queues: [Queue] = [], bindings: [Binding] = []) {
        self.exchanges = exchanges
        self.queues = queues
        self.bindings = bindings
    }

    package func merging(_ other: AMQPTopology) -> AMQPTopology {
        func uniq<T: Hashable>(_ a: [T]) -> [T] {
            var seen = Set<T>()
            return a.filter { seen.insert($0).inserted }
        }
        return AMQPTopology(
            exchanges: uniq(exchanges + other.exchanges), queues: uniq(queues + other.queues),
            bindings: uniq(bindings + other.bindings))
    }
}
