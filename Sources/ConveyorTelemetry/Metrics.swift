import ConveyorCore
import CoreMetrics
import Metrics
package import Prometheus
import Synchronization

/// Metrics through swift-metrics, exported in the Prometheus text format by each process's
/// status endpoint (`/metrics`). `bootstrap()` once in `main`; until then (and in tests that run
/// components in-process) every metric is a no-op.
///
/// Names follow Prometheus conventions (`_total` counters, `_seconds` histograms); labels are
/// bounded sets (queue, executor, outcome), never run or task ids.
package enum ConveyorMetrics {
    package static let registry = PrometheusCollectorRegistry()
    static let done = Atomic<Bool>(false)

    package static func bootstrap() {
        guard !done.exchange(true, ordering: .relaxed) else { return }
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.valueHistogramBuckets["conveyor_dispatcher_claim_batch_size"] = [
            1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000,
        ]
        factory.durationHistogramBuckets["conveyor_run_fire_lateness_seconds"] = [
            .milliseconds(10), .milliseconds(50), .milliseconds(100), .milliseconds(250),
            .milliseconds(500), .seconds(1), .seconds(2), .seconds(5), .seconds(10), .seconds(30),
            .seconds(60), .seconds(300),
        ]
        factory.durationHistogramBuckets["conveyor_status_lag_seconds"] = [
            .milliseconds(10), .milliseconds(50), .milliseconds(100), .milliseconds(250),
            .milliseconds(500), .seconds(1), .seconds(2), .seconds(5), .seconds(10), .seconds(30), .seconds(60),
        ]
        factory.durationHistogramBuckets["conveyor_api_request_duration_seconds"] = [
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
            .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5),
        ]
        MetricsSystem.bootstrap(factory)
    }

    /// The registry in the Prometheus text format.
    package static func text() -> String { registry.emitToString() }

    // The metrics the components record. Those without labels are made once, on first use
    // (after `bootstrap()`, which every command runs before anything else), so the per-status
    // and per-scan paths do not look a handler up each time. Labelled ones are made per call:
    // swift-metrics caches them by label and dimensions in the factory's registry.
    static let fireLatenessTimer = Timer(label: "conveyor_run_fire_lateness_seconds")
    static let scanTimer = Timer(label: "conveyor_dispatcher_scan_duration_seconds")
    static let claimBatchRecorder = Recorder(label: "conveyor_dispatcher_claim_batch_size")
    static let publishConfirmTimer = Timer(label: "conveyor_publish_confirm_seconds")
    static let publishFailures = Counter(label: "conveyor_publish_failures_total")
    static let statusLagTimer = Timer(label: "conveyor_status_lag_seconds")
    static let retries = Counter(label: "conveyor_retries_total")
    static let deadRuns = Counter(label: "conveyor_runs_dead_total")
    static let deadLetters = Counter(label: "conveyor_dead_letters_total")

    package static func dispatched(queue: String, priority: String, count: Int) {
        Counter(label: "conveyor_dispatched_runs_total", dimensions: [("queue", queue), ("priority", priority)])
            .increment(by: count)
    }
    /// Due time → started, for first attempts (retries wait on purpose), on the worker's clock.
    package static func fireLateness(seconds: Double) {
        fireLatenessTimer.recordNanoseconds(Int64(max(0, seconds) * 1e9))
    }
    package static func scanDuration(_ d: Duration) { scanTimer.recordNanoseconds(d.inNanoseconds) }
    package static func claimBatch(_ n: Int) { claimBatchRecorder.record(n) }
    package static func publishConfirm(_ d: Duration) { publishConfirmTimer.recordNanoseconds(d.inNanoseconds) }
    package static func publishFailed(_ n: Int) { publishFailures.increment(by: n) }
    package static func statusLag(seconds: Double) { statusLagTimer.recordNanoseconds(Int64(max(0, seconds) * 1e9)) }
    /// Finished statuses of one recorded batch, by outcome.
    package static func finished(_ byOutcome: [String: Int]) {
        for (outcome, n) in byOutcome {
            Counter(label: "conveyor_runs_finished_total", dimensions: [("outcome", outcome)]).increment(by: n)
        }
    }
    package static func retried(_ n: Int) { retries.increment(by: n) }
    /// Runs ended `expired`: published, never started within the schedule-to-start timeout.
    package static func expired(queue: String, count: Int) {
        Counter(label: "conveyor_runs_expired_total", dimensions: [("queue", queue)]).increment(by: count)
    }
    package static func dead(_ n: Int) { deadRuns.increment(by: n) }
    package static func deadLetter() { deadLetters.increment() }
    /// A status or heartbeat refused: `malformed`, `no_proof`, `bad_proof` or `refused_by_database`.
    package static func statusRejected(reason: String, by n: Int = 1) {
        Counter(label: "conveyor_status_rejected_total", dimensions: [("reason", reason)]).increment(by: n)
    }
    package static func queueDepth(queue: String, _ ready: Int, consumers: Int) {
        Gauge(label: "conveyor_queue_depth", dimensions: [("queue", queue)]).record(ready)
        Gauge(label: "conveyor_queue_consumers", dimensions: [("queue", queue)]).record(consumers)
    }
    /// Spans swift-otel did not export: `queue_full` (its batch queue was full) or
    /// `export_failed` (the collector refused or did not answer in time).
    package static func spansDropped(reason: String, _ n: Int) {
        Counter(label: "conveyor_trace_spans_dropped_total", dimensions: [("reason", reason)]).increment(by: n)
    }
    /// An incoming trace header Conveyor did not continue (the request or message starts a fresh
    /// trace): `traceparent` (malformed), `tracestate` or `baggage` (too large or malformed).
    package static func traceContextRefused(header: String) {
        Counter(label: "conveyor_trace_context_refused_total", dimensions: [("header", header)]).increment()
    }
    /// One API request, by route pattern (never a raw path, so the label set stays bounded), method
    /// and status.
    package static func apiRequest(route: String, method: String, status: Int, duration: Duration) {
        Counter(
            label: "conveyor_api_requests_total",
            dimensions: [("route", route), ("method", method), ("status", String(status))]
        ).increment()
        Timer(label: "conveyor_api_request_duration_seconds", dimensions: [("route", route), ("method", method)])
            .recordNanoseconds(duration.inNanoseconds)
    }
    package static func executorDuration(executor: String, _ d: Duration) {
        Timer(label: "conveyor_executor_duration_seconds", dimensions: [("executor", executor)]).recordNanoseconds(
            d.inNanoseconds)
    }
}
