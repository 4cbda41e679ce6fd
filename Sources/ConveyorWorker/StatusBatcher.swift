package import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import Foundation
package import Synchronization

/// Sends a worker's statuses, several to a broker message when several wait.
///
/// One batch is in flight at a time. A status that arrives while it is goes into the next
/// batch, which leaves when the broker has confirmed the previous one: nothing waits for a timer,
/// a worker reporting one run at a time sends each status alone, as a plain
/// `conveyor.status.v1` message, and a busy one sends up to `MessageCodec.maxStatusesPerBatch`
/// in one `conveyor.status-batch.v1` message. Each caller learns whether its status was
/// confirmed (the worker acks its task only then).
package final class StatusBatcher: Sendable {
    private struct Waiting {
        var message: AMQPOutgoingMessage
        var done: CheckedContinuation<Result<Void, AMQPError>, Never>
    }
    private struct State {
        var waiting: [Waiting] = []
        var sending = false
    }

    let publisher: AMQPPublisher
    let exchange: String
    private let state = Mutex(State())
    /// Broker messages and statuses sent (a test and the worker's stats read them).
    package let sent = Mutex((messages: 0, statuses: 0))

    package init(publisher: AMQPPublisher, exchange: String) {
        self.publisher = publisher
        self.exchange = exchange
    }

    /// Sends one status (`message`, as it would travel alone); returns when the broker confirmed
    /// the message that carried it, or throws why it did not.
    package func send(_ message: AMQPOutgoingMessage) async throws(AMQPError) {
        let result = await withCheckedContinuation { (done: CheckedContinuation<Result<Void, AMQPError>, Never>) in
            let start = state.withLock { s in
                s.waiting.append(Waiting(message: message, done: done))
                defer { s.sending = true }
                return !s.sending
            }
            // The sender lives while statuses wait and ends when none is left: a task of its own, as
            // no caller should carry the others' batches after its own was confirmed.
            if start { Task { await self.sendWhileWaiting() } }
        }
        try result.get()
    }

    private func sendWhileWaiting() async {
        while true {
            let batch = state.withLock { s -> [Waiting] in
                let n = min(s.waiting.count, MessageCodec.maxStatusesPerBatch)
                if n == 0 { s.sending = false }
                defer { s.waiting.removeFirst(n) }
                return Array(s.waiting.prefix(n))
            }
            if batch.isEmpty { return }
            let message = batch.count == 1 ? batch[0].message : batchMessage(batch.map { StatusBatchItem($0.message) })
            let result: Result<Void, AMQPError>
            do throws(AMQPError) {
                try await publisher.publish(message)
                result = .success(())
                sent.withLock {
                    $0.messages += 1
                    $0.statuses += batch.count
                }
            } catch {
                result = .failure(error)
            }
            for w in batch { w.done.resume(returning: result) }
        }
    }

    private func batchMessage(_ items: [StatusBatchItem]) -> AMQPOutgoingMessage {
        AMQPOutgoingMessage(
            exchange: exchange, routingKey: "status", body: MessageCodec.encode(batch: items),
            properties: AMQPProperties(
                contentType: "application/json", messageID: UUID().uuidString.lowercased(),
                type: statusBatchMessageType, timestamp: UInt64(Date().timeIntervalSince1970), persistent: true,
                headers: [MessageCodec.batchCountHeader: .int(Int64(items.count))]))
    }
}
