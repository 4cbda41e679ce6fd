import ConveyorAMQP
import ConveyorConfig
import ConveyorCore
import ConveyorFaults
import ConveyorTelemetry
import Foundation
import Logging
import Synchronization
import Tracing

extension Worker {
    func handle(_ delivery: AMQPDelivery) async {
        let message: TaskMessage
        do throws(ValidationError) {
            guard delivery.properties.type == nil || delivery.properties.type == taskMessageType else {
                throw ValidationError(
                    field: "type", value: delivery.properties.type ?? "",
                    hint: "task messages have type \(taskMessageType)")
            }
            message = try MessageCodec.decodeTask(delivery.body)
        } catch {
            let claims = MessageCodec.claims(inMalformed: delivery.body)
            await refuse(
                delivery, runID: claims?.runID, attempt: claims?.attempt ?? 1, proof: claims?.proof,
                errorClass: "malformed_message",
                reason: "\(error)")
            return
        }
        let set = current.withLock { $0 }
        guard let executor = set.executors[message.executor] else {
            await refuse(
                delivery, runID: message.runID, attempt: message.attempt, proof: message.proof,
                errorClass: "unknown_executor",
                reason: "this worker offers executors \(set.executors.keys.sorted()), not '\(message.executor)'")
            return
        }
        if let poison = configuration.faults.workerCrashOnTask, poison == message.taskName { FaultInjection.crash() }
        var log = logger
        log[metadataKey: "run.id"] = "\(message.runID)"
        log[metadataKey: "task.name"] = "\(message.taskName)"

        // The execute span: a child of the publish span carried in the headers. Status messages
        // carry its context, so the dispatcher's record spans are its children.
        let span = Traces.startSpan(
            "execute \(message.executor)",
            context: Traces.context(delivery.properties.headers, using: AMQPHeadersExtractor()),
            kind: .consumer, attributes: executeAttributes(message))
        defer { span.end() }
        let trace = Traces.headers(span.context)
        if let tp = trace["traceparent"].flatMap(Traceparent.init) {
            log[metadataKey: "trace.id"] = "\(tp.traceID)"
            log[metadataKey: "span.id"] = "\(tp.spanID)"
        }
        var statusHeaders: AMQPHeaders = [:]
        for (k, v) in trace { statusHeaders[k] = .string(v) }

        let timeout = Duration.milliseconds(Int64(message.timeoutSeconds * 1000))
        var made = ExecutionContext(
            runID: message.runID, taskName: message.taskName, attempt: message.attempt,
            parameters: message.parameters, timeout: timeout,
            traceparent: trace["traceparent"], tracestate: trace["tracestate"],
            idempotencyKey: message.idempotencyKey,
            occurrenceKey: message.occurrenceKey, logger: log, trace: span.context)
        made.inputs = message.inputs
        let context = made
        // A run past its executor's limit waits here, before its timeout starts.
        let slot = set.slots[message.executor]
        if let slot, !(await slot.acquire()) { return }  // shutdown while waiting: left for redelivery
        defer { slot?.release() }
        // Past its start limit the dispatcher ends the run `expired` and retries it by policy:
        // starting it now would run the occurrence twice. Acked, so the broker forgets it.
        if let startBy = message.startBy, Date() > startBy {
            log.warning(
                "task message past its start_by; not started (the dispatcher expires the run and retries it by policy)",
                metadata: ["run.start_by": "\(Timestamp.format(startBy))", "run.attempt": "\(message.attempt)"])
            span.setStatus(SpanStatus(code: .error, message: "expired: past start_by, not started"))
            source(of: delivery).ack(delivery)
            counts.count(.expired)
            return
        }
        let events = RunEvents()
        cancels.register(message.runID, events)
        defer { cancels.unregister(message.runID) }
        let startedAt = Date()
        let started = StatusMessage(
            runID: message.runID, attempt: message.attempt, event: .started, workerID: configuration.id, at: startedAt,
            proof: message.proof)
        if message.attempt == 1 {
            ConveyorMetrics.fireLateness(seconds: startedAt.timeIntervalSince(message.occurrence))
        }
        let detached = Flag()
        var result: ExecutionResult
        if cancels.wasCancelled(message.runID) {
            result = ExecutionResult(
                outcome: .cancelled, errorClass: "cancelled", errorMessage: "cancelled before it started")
        } else {
            let headers = statusHeaders
            let log = log
            let began = ContinuousClock.now
            result = await Self.runBoxed(
                executor, context, events: events, timers: timers,
                report: (
                    after: configuration.startedAfter,
                    {
                        await self.reportWhileRunning(
                            started, delivery: delivery, detached: detached, headers: headers, log: log)
                    }
                )
            ).value
            ConveyorMetrics.executorDuration(executor: message.executor, ContinuousClock.now - began)
        }
        if Task.isCancelled {
            // The drain deadline passed. A run still held by the broker is left unacked, and the
            // broker redelivers it; a detached one is reported lost, so the dispatcher retries it.
            if detached.isSet {
                let lost = StatusMessage(
                    runID: message.runID, attempt: message.attempt, event: .finished, outcome: .lost,
                    errorClass: "worker_shutdown", errorMessage: "the worker shut down before the run finished",
                    workerID: configuration.id, startedAt: startedAt, proof: message.proof)
                await publishStatus(lost, headers: statusHeaders, log: log)
                log.warning("run stopped by shutdown; reported lost for retry")
            } else {
                log.warning("run stopped by shutdown; left for redelivery")
            }
            return
        }

        span.attributes["conveyor.outcome"] = result.outcome.rawValue
        if result.outcome != .succeeded {
            span.setStatus(
                SpanStatus(
                    code: .error,
                    message: [result.errorClass, result.errorMessage].compactMap { $0 }.joined(separator: ": ")))
        }
        // An executor's exit code outside 32 bits (a custom executor may report any Int) travels as
        // null, with the code in the error message: a status carrying it would be refused as malformed.
        var exitCode = result.exitCode
        var errorMessage = result.errorMessage
        if let code = exitCode, !StatusMessage.exitCodes.contains(code) {
            exitCode = nil
            errorMessage =
                (errorMessage.map { $0 + " " } ?? "")
                + "(exit code \(code) is outside 32 bits; reported as null)"
            log.warning(
                "executor reported an exit code outside 32 bits; reported as null",
                metadata: ["executor.exit_code": "\(code)", "executor": "\(message.executor)"])
        }
        let finished = StatusMessage(
            runID: message.runID, attempt: message.attempt, event: .finished, outcome: result.outcome,
            exitCode: exitCode, output: result.output.map { String($0.suffix(65_536)) },
            errorClass: result.errorClass, errorMessage: errorMessage, workerID: configuration.id,
            startedAt: startedAt, proof: message.proof, result: StatusMessage.bounded(result.result))
        // Ack only after the finished status is confirmed; otherwise the broker redelivers the task.
        guard await publishStatus(finished, headers: statusHeaders, log: log) else { return }
        if !detached.isSet { source(of: delivery).ack(delivery) }
        counts.count(result.outcome == .succeeded ? .succeeded : .failed)
    }

    /// The execute span's attributes: the run, and OpenTelemetry messaging attributes.
    func executeAttributes(_ m: TaskMessage) -> SpanAttributes {
        var a = SpanAttributes()
        // Not the message's idempotency_key: a received message's is not checked to be the run id.
        let runID = m.runID.lowercasedString
        a["conveyor.run.id"] = runID
        a["conveyor.task.name"] = m.taskName
        a["conveyor.attempt"] = m.attempt
        a["conveyor.executor"] = m.executor
        a["conveyor.queue"] = m.queue
        a["conveyor.worker.id"] = configuration.id
        a["messaging.system"] = "rabbitmq"
        a["messaging.operation.type"] = "process"
        a["messaging.destination.name"] = m.queue
        a["messaging.message.id"] = runID
        return a
    }

    struct DrainDeadlinePassed: Error { var left: Int }

    /// Reports a run while it goes, from the moment it has run `started_after_ms` (shorter runs
    /// report only `finished`): `started` now, and once it has run `detach_after_ms`, `started`
    /// again marked detached and then the ack of its task message. A detached run no longer
    /// depends on the broker's consumer timeout; this worker's heartbeats protect it instead.
    /// Ends early when the run ends (the task is cancelled).
    func reportWhileRunning(
        _ started: StatusMessage, delivery: AMQPDelivery, detached: Flag, headers: AMQPHeaders, log: Logger
    ) async {
        let after = configuration.startedAfter
        let detachAfter = configuration.detachAfter
        let detachNow = detachAfter != nil && detachAfter! <= after
        guard !Task.isCancelled else { return }
        var first = started
        if detachNow { first.detached = true }
        guard await publishStatus(first, headers: headers, log: log), !Task.isCancelled else { return }
        if detachNow { return detach(delivery, flag: detached, log: log) }
        guard let detachAfter else { return }
        // Only runs past `started_after_ms` come here, so a timer of their own costs little.
        do { try await Task.sleep(for: detachAfter - after) } catch { return }
        var second = started
        second.detached = true
        guard await publishStatus(second, headers: headers, log: log), !Task.isCancelled else { return }
        detach(delivery, flag: detached, log: log)
    }

    func detach(_ delivery: AMQPDelivery, flag: Flag, log: Logger) {
        flag.set()
        source(of: delivery).ack(delivery)
        counts.count(.detached)
        log.info("long run detached: task message acknowledged, heartbeats protect the run from here")
    }

    /// `runBoxed` for tests: the timeout mechanism alone, on `timers` (running), or on timers
    /// of its own.
    package static func runForTesting(
        _ executor: any Executor, _ context: ExecutionContext, timers: RunTimers? = nil
    ) async -> ExecutionResult {
        if let timers { return await runBoxed(executor, context, events: RunEvents(), timers: timers).value }
        let timers = RunTimers()
        return await timers.serving { await runBoxed(executor, context, events: RunEvents(), timers: timers) }.value
    }

    /// Runs the executor as a child task of the run. Its timeout is a deadline on
    /// `timers`; past it, or on a cancel request posted to `events`, the child is cancelled (the
    /// shell executor kills its process group) and the outcome is `timed_out` or `cancelled`.
    /// `report` starts beside the executor once the run has gone `after`, and is cancelled when
    /// the run ends.
    /// The result comes back boxed: Swift 6.3's -O loses part of a large result computed before a
    /// suspension (here `cleanup`) and returned after it (docs/architecture.md).
    static func runBoxed(
        _ executor: any Executor, _ context: ExecutionContext, events: RunEvents, timers: RunTimers,
        report: (after: Duration, body: @Sendable () async -> Void)? = nil
    ) async -> ResultBox {
        let start = ContinuousClock.now
        let timeout = timers.schedule(at: start + context.timeout) { events.post(.timeout) }
        // `started_after_ms: 0` reports as the executor starts, with no deadline to wait for.
        let reportDue = report.flatMap { r in
            r.after > .zero ? timers.schedule(at: start + r.after) { events.post(.reportDue) } : nil
        }
        let result = await withTaskGroup(of: Void.self) { group in
            group.addTask { events.post(.finished(ResultBox(await executor.execute(context)))) }
            if let report, report.after <= .zero { group.addTask { await report.body() } }
            var ended: RunEvents.Event?
            while true {
                let event = await events.next()
                switch event {
                case .finished(let r):
                    timers.cancel(timeout)
                    if let reportDue { timers.cancel(reportDue) }
                    group.cancelAll()  // a report under way stops
                    var final = r.value
                    switch ended {
                    case .timeout?:
                        final.outcome = .timedOut
                        final.errorClass = "timeout"
                        final.errorMessage = "exceeded the task timeout of \(context.timeout)"
                    case .cancelRequested?:
                        final.outcome = .cancelled
                        final.errorClass = "cancelled"
                        final.errorMessage = "cancelled by request; the executor was stopped"
                    default: break
                    }
                    return ResultBox(final)
                case .timeout, .cancelRequested:
                    if ended == nil { ended = event }
                    group.cancelAll()  // the executor's task is cancelled and stops
                case .reportDue:
                    // Not once the run is ending (timeout, cancel, the drain deadline): a run cut
                    // by the drain publishes nothing, and is redelivered.
                    if ended == nil, let report { _ = group.addTaskUnlessCancelled { await report.body() } }
                }
            }
        }
        // The cleanup hook runs whatever the end: success, failure, timeout, cancel or shutdown.
        await executor.cleanup(context, result: result.value)
        return result
    }
}

/// What happens to one run while it goes, in the order it happens: its executor's result, its
/// timeout, a cancel request, the moment to report `started`. The run's task waits here for the
/// next, instead of in child tasks of its own, until `finished`, which the executor's task always
/// posts (a late timeout or cancel after it is left unread).
final class RunEvents: Sendable {
    enum Event: Sendable {
        case finished(ResultBox)
        case timeout, cancelRequested, reportDue
    }
    private struct State {
        var waiting: [Event] = []
        var waiter: CheckedContinuation<Event, Never>?
    }
    private let state = Mutex(State())

    func post(_ event: Event) {
        let waiter: CheckedContinuation<Event, Never>? = state.withLock { s in
            guard let w = s.waiter else {
                s.waiting.append(event)
                return nil
            }
            s.waiter = nil
            return w
        }
        waiter?.resume(returning: event)
    }

    /// The next event. Not ended by cancellation: a cancelled run's executor still posts `finished`.
    func next() async -> Event {
        await withCheckedContinuation { (c: CheckedContinuation<Event, Never>) in
            let ready: Event? = state.withLock { s in
                guard s.waiting.isEmpty else { return s.waiting.removeFirst() }
                s.waiter = c
                return nil
            }
            if let ready { c.resume(returning: ready) }
        }
    }
}

/// An execution result on the heap. Results cross suspension points and task-group boundaries
/// only as this reference: see `runBoxed`.
final class ResultBox: Sendable {
    let value: ExecutionResult
    init(_ value: ExecutionResult) { self.value = value }
}
