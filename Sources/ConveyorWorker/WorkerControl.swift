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
    /// Applies control messages: a cancel for a run in flight stops its executor; one for a run
    /// not here yet is remembered, so its task message is skipped if it comes.
    func controlLoop() async {
        for await d in control.deliveries {
            if let m = try? MessageCodec.decodeControl(d.body) {
                if cancels.cancel(m.cancel) {
                    logger.info("run cancelled by request", metadata: ["run.id": "\(m.cancel)"])
                }
            } else {
                logger.warning(
                    "malformed control message ignored",
                    metadata: ["amqp.message_id": "\(d.properties.messageID ?? "")"])
            }
            control.ack(d)
        }
    }

    /// Publishes a status until the broker confirms it (retrying with backoff across reconnects).
    /// Returns `false` only when shutdown ended the retries before a confirm.
    @discardableResult
    func publishStatus(_ status: StatusMessage, headers: AMQPHeaders, log: Logger) async -> Bool {
        let body = MessageCodec.encode(status)
        var headers = headers
        // The seal over this body, keyed by the attempt's proof (which itself is not sent).
        if let proof = status.proof { headers[StatusProof.sealHeader] = .string(StatusProof.seal(body, proof: proof)) }
        let message = AMQPOutgoingMessage(
            exchange: topology.statusExchange, routingKey: "status", body: body,
            properties: AMQPProperties(
                contentType: "application/json", messageID: "\(status.runID.lowercasedString):\(status.event.rawValue)",
                type: statusMessageType, timestamp: UInt64(Date().timeIntervalSince1970), persistent: true,
                headers: headers))
        var attempt = 0
        while true {
            do {
                try await statuses.send(message)
                return true
            } catch {
                attempt += 1
                if attempt == 1 || attempt % 20 == 0 {
                    log.warning(
                        "status publish failed; retrying",
                        metadata: ["status.event": "\(status.event.rawValue)", "error": "\(error)"])
                }
                // Shutting down or past the drain deadline: not acked, so the broker redelivers the task.
                if error.code == .stopped || Task.isCancelled { return false }
                try? await Task.sleep(for: Backoff.delay(attempt: attempt, base: .milliseconds(50), cap: .seconds(2)))
            }
        }
    }

    /// Reports a `failed` status when the run id is readable, then rejects without requeue (dead-letter).
    func refuse(
        _ delivery: AMQPDelivery, runID: UUID?, attempt: Int, proof: String?, errorClass: String, reason: String
    ) async {
        logger.warning(
            "task message refused and dead-lettered",
            metadata: [
                "amqp.message_id": "\(delivery.properties.messageID ?? "")", "error.class": "\(errorClass)",
                "error": "\(reason)",
            ])
        if let runID {
            let status = StatusMessage(
                runID: runID, attempt: attempt, event: .finished, outcome: .failed,
                errorClass: errorClass, errorMessage: reason, workerID: configuration.id, proof: proof)
            // Unconfirmed (shutting down): leave it for redelivery rather than dead-letter it unreported.
            guard await publishStatus(status, headers: [:], log: logger) else { return }
        }
        source(of: delivery).reject(delivery, requeue: false)
        counts.count(.rejected)
    }
}

/// The runs in flight, to which a cancel request is posted, and cancels that arrived before their run.
final class CancelRegistry: Sendable {
    struct State {
        var inFlight: [UUID: RunEvents] = [:]
        /// Cancelled run ids in arrival order, at most `limit`.
        var recent: [UUID] = []
        var recentSet: Set<UUID> = []
    }
    let state = Mutex(State())
    let limit = 10_000

    func register(_ id: UUID, _ events: RunEvents) { state.withLock { $0.inFlight[id] = events } }

    func unregister(_ id: UUID) { _ = state.withLock { $0.inFlight.removeValue(forKey: id) } }

    /// The runs in flight now.
    var inFlightIDs: [UUID] { state.withLock { Array($0.inFlight.keys) } }

    func wasCancelled(_ id: UUID) -> Bool { state.withLock { $0.recentSet.contains(id) } }

    /// Marks the run cancelled and tells it if in flight; returns whether it was in flight.
    @discardableResult
    func cancel(_ id: UUID) -> Bool {
        let w: RunEvents? = state.withLock { s in
            if s.recentSet.insert(id).inserted {
                s.recent.append(id)
                if s.recent.count > limit { s.recentSet.remove(s.recent.removeFirst()) }
            }
            return s.inFlight[id]
        }
        w?.post(.cancelRequested)
        return w != nil
    }
}

/// A flag set once, read after the tasks that may set it have ended.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }
}

/// The executors a run may use, with their concurrency limits.
struct ExecutorSet: Sendable {
    var executors: [String: any Executor]
    var slots: [String: Slots]

    init(executors: [String: any Executor], limits: [String: Int]) {
        self.executors = executors
        slots = limits.filter { executors[$0.key] != nil }.mapValues { Slots($0) }
    }
}
