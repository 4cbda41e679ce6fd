import ConveyorAMQP
import ConveyorCore
import ConveyorFaults
import ConveyorStore
import ConveyorTelemetry
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import Tracing

extension Dispatcher {
    /// OpenTelemetry messaging attributes of a task message's publish span.
    static func publishAttributes(_ run: ClaimedRun, exchange: String) -> SpanAttributes {
        var a = SpanAttributes()
        a["conveyor.task.id"] = run.message.taskID.lowercasedString
        a["conveyor.queue"] = run.message.queue
        a["messaging.system"] = "rabbitmq"
        a["messaging.operation.type"] = "send"
        a["messaging.operation.name"] = "publish"
        a["messaging.destination.name"] = exchange
        a["messaging.rabbitmq.destination.routing_key"] = run.message.queue
        // The message was made here: its idempotency key is the run id's text, already made.
        a["messaging.message.id"] = run.message.idempotencyKey
        a["conveyor.run.id"] = run.message.idempotencyKey
        a["conveyor.task.name"] = run.message.taskName
        a["conveyor.attempt"] = run.message.attempt
        return a
    }
}

/// The dispatch spans of one claim: one per run created, started when the claim makes the
/// run's trace context (a child of the context stored on the task, or a new root). The run
/// stores the span's `traceparent`. A run the same claim hands out for publishing keeps its
/// dispatch span open as its producer span (messaging attributes), ended when the broker
/// confirms; the others' end with the claim. Later publishes of the run (retries, runs that
/// waited, republishes) are `publish` spans, children of the stored one, so one occurrence is
/// one trace.
final class DispatchSpans: Sendable {
    let started = Mutex<[String: any Span]>([:])

    /// Starts a dispatch span; returns its `traceparent`.
    func start(parent: String?) -> String {
        let span = Traces.startSpan("dispatch", context: Traces.context(traceparent: parent), kind: .producer)
        guard let tp = Traces.traceparent(span.context) else {
            // A tracer that makes no context (sampler always_off): the run still gets ids.
            return Traces.traceparent(PropagatingTracer().startSpan("dispatch", context: .topLevel).context)!
        }
        started.withLock { $0[tp] = span }
        return tp
    }

    /// The claim committed. Returns the open spans of the runs about to be published, by run id,
    /// with their attributes set; ends the spans of runs created to wait (`scheduled`).
    func claimed(_ runs: [ClaimedRun], exchange: String) -> [UUID: any Span] {
        var spans = started.withLock { s in
            defer { s = [:] }
            return s
        }
        var live: [UUID: any Span] = [:]
        for run in runs {
            guard let span = spans.removeValue(forKey: run.traceparent) else { continue }
            span.attributes = Dispatcher.publishAttributes(run, exchange: exchange)
            live[run.message.runID] = span
        }
        for span in spans.values { span.end() }
        return live
    }

    /// The claim rolled back: its runs do not exist.
    func end(failed error: any Error) {
        let spans = started.withLock { s in
            defer { s = [:] }
            return s
        }
        for span in spans.values {
            span.recordError(error)
            span.setStatus(SpanStatus(code: .error, message: "claim rolled back"))
            span.end()
        }
    }
}

/// A metrics key: runs dispatched are counted by queue and priority.
struct QueuePriority: Hashable {
    var queue: String
    var priority: Priority
}
