import ConveyorCore
package import ConveyorHTTP
import ConveyorStore
import ConveyorTelemetry
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import Tracing

/// Settings of callback delivery. Keys under `callbacks.` in `config/dispatcher.yaml`.
package struct CallbackConfiguration: Sendable {
    /// Deliveries in flight at once per dispatcher. Key `concurrency`, default 16.
    package var concurrency = 16
    /// One delivery attempt, connect to last byte. Key `timeout_ms`, default 10000.
    package var timeout: Duration = .seconds(10)
    /// Attempts before a callback is given up. Key `max_attempts`, default 8.
    package var maxAttempts = 8
    /// Backoff between attempts: full jitter up to base × 2^(n−1), capped. Keys `backoff_base_ms`
    /// (default 1000) and `backoff_cap_ms` (default 300000).
    package var backoffBase: Duration = .seconds(1)
    package var backoffCap: Duration = .seconds(300)
    /// Where callbacks may go: keys `allowed_hosts` and `allowed_networks`. Redirects are not
    /// followed (a 3xx is a failed attempt).
    package var policy: OutboundPolicy = {
        var p = OutboundPolicy()
        p.maxRedirects = 0
        return p
    }()

    package init() {}
}

/// Delivers callbacks: keeps up to `callbacks.concurrency` POSTs in flight, claims more as they
/// finish or when a recorded outcome queued some (`wakeup`), and records each attempt. It runs
/// beside status recording and never holds it up: outcomes only insert rows.
///
/// Shutdown: it claims nothing more, waits for the POSTs in flight and records them. A callback
/// claimed and not finished is leased, so another dispatcher retries it when the lease ends.
final class CallbackDeliverer: Service, Sendable {
    /// Totals since start (the dispatcher's `stats` adds them up).
    struct Counters: Sendable { var delivered = 0, retried = 0, failed = 0 }

    let settings: CallbackConfiguration
    let store: Store
    /// The longest wait between claims when nothing signals.
    let interval: Duration
    let logger: Logger
    let wakeup = Wakeup()
    let stopping = Atomic<Bool>(false)
    let counters = Mutex(Counters())

    init(settings: CallbackConfiguration, store: Store, interval: Duration, logger: Logger) {
        self.settings = settings
        self.store = store
        self.interval = interval
        self.logger = logger
    }

    var stats: Counters { counters.withLock { $0 } }

    func run() async throws {
        await withGracefulShutdownHandler {
            await deliverUntilStopped()
        } onGracefulShutdown: {
            self.stopping.store(true, ordering: .relaxed)
            self.wakeup.signal()
        }
    }

    func deliverUntilStopped() async {
        enum Event: Sendable {
            case done(Int, CallbackOutcome)
            case tick
        }
        let settings = self.settings
        let http = OutboundHTTP(policy: settings.policy, logger: logger)
        // A claimed callback is leased for two attempt timeouts: a dispatcher that dies mid-POST
        // leaves it to be retried by any dispatcher when the lease ends.
        let lease = settings.timeout * 2 + .seconds(5)
        await withTaskGroup(of: Event.self) { group in
            var inFlight = 0
            group.addTask {
                await self.wakeup.wait(timeout: self.interval)
                return .tick
            }
            while let event = await group.next() {
                let stop = stopping.load(ordering: .relaxed)
                switch event {
                case .done(let id, let outcome):
                    inFlight -= 1
                    await untilCommitted("recording a callback attempt") {
                        try await store.finishCallbacks([(id, outcome)])
                    }
                    counters.withLock { c in
                        switch outcome {
                        case .delivered: c.delivered += 1
                        case .retry: c.retried += 1
                        case .failed: c.failed += 1
                        }
                    }
                case .tick:
                    if !stop {
                        group.addTask {
                            await self.wakeup.wait(timeout: self.interval)
                            return .tick
                        }
                    }
                }
                guard !stop, inFlight < settings.concurrency else { continue }
                do {
                    for d in try await store.claimCallbacks(limit: settings.concurrency - inFlight, lease: lease) {
                        inFlight += 1
                        group.addTask { .done(d.id, await self.deliver(d, http: http, settings: settings)) }
                    }
                } catch {
                    logger.warning("claiming callbacks failed; will retry", metadata: ["error": "\(error)"])
                }
            }
        }
    }

    /// One POST of a run's outcome. 2xx delivers it; anything else is tried again with backoff
    /// until `max_attempts`, except a URL the outbound policy refuses, which is given up at once.
    func deliver(_ d: CallbackDelivery, http: OutboundHTTP, settings: CallbackConfiguration) async -> CallbackOutcome {
        var request = OutboundRequest(
            method: "POST", url: d.url,
            headers: [
                ("Content-Type", "application/json"), ("User-Agent", "conveyor-callbacks"),
                ("Idempotency-Key", d.runID.lowercasedString), ("X-Conveyor-Attempt", "\(d.attempt)"),
            ], body: Array(d.payload.utf8))
        // A client span in the run's trace (a child of its dispatch span); its context is the
        // request's one traceparent, with the run's baggage.
        var attributes = request.spanAttributes
        attributes["conveyor.run.id"] = d.runID.lowercasedString
        attributes["conveyor.callback.attempt"] = d.attempt
        var parent = Traces.context(traceparent: d.traceparent)
        parent.baggageHeader = d.baggage
        let span = Traces.startSpan("POST", context: parent, kind: .client, attributes: attributes)
        defer { span.end() }
        for (name, value) in Traces.headers(span.context).sorted(by: { $0.key < $1.key }) {
            request.headers.append((name, value))
        }
        let status: Int?
        let error: String
        do {
            let response = try await http.send(request, timeout: settings.timeout, span: span)
            if (200..<300).contains(response.status) { return .delivered(status: response.status) }
            status = response.status
            error = "HTTP \(response.status)"
        } catch let e {
            guard e.retryable else {
                logger.warning("callback given up: refused", metadata: ["run.id": "\(d.runID)", "error": "\(e)"])
                return .failed(status: nil, error: e.description)
            }
            status = nil
            error = e.description
        }
        guard d.attempt < settings.maxAttempts else {
            logger.warning(
                "callback given up: attempts used up",
                metadata: ["run.id": "\(d.runID)", "attempts": "\(d.attempt)", "error": "\(error)"])
            return .failed(status: status, error: "\(error) (gave up after \(d.attempt) attempts)")
        }
        logger.debug(
            "callback attempt failed; will retry",
            metadata: ["run.id": "\(d.runID)", "attempt": "\(d.attempt)", "error": "\(error)"])
        return .retry(
            after: Backoff.delay(attempt: d.attempt, base: settings.backoffBase, cap: settings.backoffCap),
            status: status, error: error)
    }

    @discardableResult
    func untilCommitted(_ what: String, _ body: () async throws -> Void) async -> Bool {
        await retryUntilCommitted(what, logger: logger, stopping: { stopping.load(ordering: .relaxed) }, body)
    }
}
