package import ConveyorAMQP

/// The names and shapes of Conveyor's broker objects (docs/architecture.md, "Topology").
package struct ConveyorTopology: Sendable, Hashable {
    /// Prefix of every name. Default `conveyor`.
    package var prefix: String
    /// Deliveries of one message before the broker dead-letters it. Default 5.
    package var deliveryLimit: Int

    package init(prefix: String = "conveyor", deliveryLimit: Int = 5) {
        self.prefix = prefix
        self.deliveryLimit = deliveryLimit
    }

    package var tasksExchange: String { "\(prefix).tasks" }
    package var statusExchange: String { "\(prefix).status" }
    package var statusQueue: String { "\(prefix).status" }
    package var deadLetterExchange: String { "\(prefix).dlx" }
    package var deadQueue: String { "\(prefix).dead" }
    /// Direct exchange through which workers move redelivered task messages to isolation lanes
    /// (routing key: the lane's name). A worker may write here and to the status exchange only,
    /// never to the default exchange, which reaches every queue (deploy/broker-permissions.tsv).
    package var isolateExchange: String { "\(prefix).isolate" }
    /// Fanout of control messages (cancel a run) to every worker.
    package var controlExchange: String { "\(prefix).control" }
    /// One worker's control queue: `conveyor.control.<worker id>`, removed a minute after its worker goes.
    package func controlQueue(worker: String) -> String { "\(prefix).control.\(worker)" }
    /// The broker queue of a work queue: `conveyor.q.<queue>`.
    package func workQueue(_ queue: String) -> String { "\(prefix).q.\(queue)" }
    /// A work queue's isolation lane: `conveyor.isolated.<queue>`. Workers move every redelivered
    /// task message here and take these one at a time, so a message that kills its worker is
    /// redelivered alone and reaches the delivery limit alone. Bound to `isolateExchange` by its own
    /// name. (Not `conveyor.q.<queue>.isolated`,
    /// which a work queue named `<queue>.isolated` would own.)
    package func isolationQueue(_ queue: String) -> String { "\(prefix).isolated.\(queue)" }
    /// Header a worker puts on the copy it moves to an isolation lane: the queue it came from.
    package static let isolatedFromHeader = "x-conveyor-isolated-from"

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
    package var base: AMQPTopology {
        AMQPTopology(
            exchanges: [.init(name: deadLetterExchange, type: "fanout")],
            queues: [.init(name: deadQueue, arguments: ["x-queue-type": .string("quorum")])],
            bindings: [.init(queue: deadQueue, exchange: deadLetterExchange, routingKey: "")])
    }

    /// Tasks exchange plus, per work queue, a quorum queue routed by the queue name and its
    /// isolation lane (same delivery limit and dead-letter exchange), bound to the isolation
    /// exchange. What dispatchers declare.
    package func work(queues: [String]) -> AMQPTopology {
        base.merging(
            AMQPTopology(
                exchanges: [.init(name: tasksExchange, type: "direct"), .init(name: isolateExchange, type: "direct")],
                queues: queues.flatMap {
                    [
                        .init(name: workQueue($0), arguments: quorumArguments),
                        .init(name: isolationQueue($0), arguments: quorumArguments),
                    ]
                },
                bindings: queues.map { .init(queue: workQueue($0), exchange: tasksExchange, routingKey: $0) }
                    + queues.map {
                        .init(queue: isolationQueue($0), exchange: isolateExchange, routingKey: isolationQueue($0))
                    }))
    }

    /// What a worker's task consumer declares: its work queues, passively (workers may not
    /// create or delete them, deploy/broker-permissions.tsv; dispatchers do, for every queue in
    /// their configuration, in a task, or in a worker's heartbeat).
    package func workerWork(queues: [String]) -> AMQPTopology {
        AMQPTopology(queues: queues.map { .existing(workQueue($0)) })
    }

    /// What a worker's lane consumer declares: the isolation lanes, passively, and the isolation
    /// exchange with the lanes bound, which a worker may do itself, so that lanes work whatever
    /// the dispatchers' version.
    package func workerLanes(queues: [String]) -> AMQPTopology {
        AMQPTopology(
            exchanges: [.init(name: isolateExchange, type: "direct")],
            queues: queues.map { .existing(isolationQueue($0)) },
            bindings: queues.map {
                .init(queue: isolationQueue($0), exchange: isolateExchange, routingKey: isolationQueue($0))
            })
    }

    /// What a worker's publisher declares: the status exchange (passively) and the isolation
    /// exchange. Nothing that depends on its queues: its heartbeats, which get them declared,
    /// must flow before they exist.
    package var workerPublish: AMQPTopology {
        AMQPTopology(exchanges: [
            .init(name: statusExchange, type: "direct", passive: true), .init(name: isolateExchange, type: "direct"),
        ])
    }

    /// Status exchange and queue.
    package var status: AMQPTopology {
        base.merging(
            AMQPTopology(
                exchanges: [.init(name: statusExchange, type: "direct")],
                queues: [.init(name: statusQueue, arguments: quorumArguments)],
                bindings: [.init(queue: statusQueue, exchange: statusExchange, routingKey: "status")]))
    }

    /// The control exchange alone (what the dispatcher publishes to).
    package var controlPublish: AMQPTopology {
        AMQPTopology(exchanges: [.init(name: controlExchange, type: "fanout")])
    }

    /// The control exchange (passively: dispatchers declare it) and one worker's own queue on it.
    /// The queue is transient: when its node dies, the broker deletes it and the worker declares
    /// it again on the node it reconnects to. A durable one stayed unavailable (404, "home node
    /// … is down") until that node came back: no cancel reached the worker meanwhile (issue 25,
    /// seen in the cluster scenario C1).
    package func control(worker: String) -> AMQPTopology {
        AMQPTopology(
            exchanges: [.init(name: controlExchange, type: "fanout", passive: true)],
            queues: [
                .init(
                    name: controlQueue(worker: worker),
                    arguments: ["x-queue-type": .string("classic"), "x-expires": .int(60_000)], durable: false)
            ],
            bindings: [.init(queue: controlQueue(worker: worker), exchange: controlExchange, routingKey: "")])
    }
}
