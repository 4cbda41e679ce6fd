import ConveyorAMQP
import ConveyorBroker
import ConveyorConfig
import ConveyorCore
import ConveyorFaults
import ConveyorTelemetry
import Foundation
import Logging
import Synchronization
import Tracing

extension Worker {
    /// Moves a task message redelivered from a work queue to that queue's isolation lane:
    /// publishes a copy there, and acks the original once the broker has confirmed the copy.
    /// Returns whether it took the message (moved, or left for redelivery at shutdown); a
    /// message it did not take is the caller's to run.
    ///
    /// Why: when a worker dies, the quorum queue returns every message it held, each with its
    /// delivery count + 1, to the head of the queue. Redelivered together, a message that kills
    /// its worker would take its neighbours to the delivery limit with it. In the lane, taken one
    /// at a time (prefetch 1), it dies alone; an innocent neighbour pays one redelivery, and its
    /// count starts again in the lane. Not taken: a first delivery, one from a lane, and a copy
    /// the broker did not confirm (it is unreachable, the lane is missing), which then runs here.
    func isolate(_ delivery: AMQPDelivery) async -> Bool {
        guard delivery.redelivered, let lane = isolationLanes[delivery.queue] else { return false }
        var properties = delivery.properties
        properties.headers["x-delivery-count"] = nil  // the old queue's count; the lane keeps its own
        properties.headers[ConveyorTopology.isolatedFromHeader] = .string(delivery.queue)
        let id = delivery.properties.messageID ?? ""
        isolating.withLock { $0[id, default: 0] += 1 }
        defer { isolating.withLock { $0[id] = $0[id].flatMap { $0 > 1 ? $0 - 1 : nil } } }
        do {
            let target = configuration.faults.isolationUnroutable ? "\(lane).missing" : lane
            try await publisher.publish(
                AMQPOutgoingMessage(
                    exchange: topology.isolateExchange, routingKey: target, body: delivery.body, properties: properties)
            )
        } catch {
            if error.code == .stopped || Task.isCancelled { return true }
            logger.warning(
                "redelivered task message not moved to the isolation lane; running it here",
                metadata: [
                    "amqp.message_id": "\(delivery.properties.messageID ?? "")", "amqp.queue": "\(lane)",
                    "error": "\(error)",
                ])
            return false
        }
        consumer.ack(delivery)
        await consumer.flush()
        counts.count(.isolated)
        logger.debug(
            "redelivered task message moved to the isolation lane",
            metadata: [
                "amqp.message_id": "\(delivery.properties.messageID ?? "")", "amqp.queue": "\(lane)",
            ])
        return true
    }

    /// A lane delivery of a message this worker is still moving (its copy confirmed, the
    /// original's ack not yet written) waits until that ack is on the wire. The broker can hand
    /// the copy to this very worker before the confirm arrives; run at once, a copy that kills
    /// its worker would take the unacked original back to the work queue, to be copied again:
    /// one more copy in the lane per crash. Bounded at 5 s.
    func waitForOwnIsolation(of delivery: AMQPDelivery) async {
        guard laneQueues.contains(delivery.queue), let id = delivery.properties.messageID else { return }
        let deadline = ContinuousClock.now + .seconds(5)
        while isolating.withLock({ $0[id] != nil }), ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(5))
        }
    }
}
