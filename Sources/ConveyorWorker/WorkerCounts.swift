import ConveyorCore
import ConveyorTelemetry
import Synchronization

/// What a worker counts, each event in one step: the numbers `Worker.stats` returns and the series on
/// the process's `/metrics` (swift-metrics, label `worker`).
final class WorkerCounts: Sendable {
    private struct State {
        var counters = Worker.Counters()
        /// The task consumer's reconnections already recorded in the metrics.
        var reconnectsRecorded = 0
    }
    private let state = Mutex(State())
    private let metrics: WorkerMetrics
    /// Signalled each time the runs in hand fall to none: the drain waits on it.
    let idle = Wakeup()

    init(worker id: String) { metrics = WorkerMetrics(worker: id) }

    var snapshot: Worker.Counters { state.withLock { $0.counters } }

    func count(_ event: WorkerMetrics.Event) {
        state.withLock { s in
            switch event {
            case .succeeded: s.counters.succeeded += 1
            case .failed: s.counters.failed += 1
            case .rejected: s.counters.rejected += 1
            case .expired: s.counters.expired += 1
            case .detached: s.counters.detached += 1
            case .isolated: s.counters.isolated += 1
            case .heartbeat: s.counters.heartbeats += 1
            }
        }
        metrics.record(event)
    }

    /// A delivery taken (+1) or done with (−1).
    func inFlight(_ delta: Int) {
        let now = state.withLock { s in
            s.counters.inFlight += delta
            return s.counters.inFlight
        }
        metrics.inFlight(now)
        if now == 0 { idle.signal() }
    }

    /// Readiness and the consumer's reconnect count, read from the connections when `/metrics` is read.
    func connections(ready: Bool, reconnects: Int) {
        let new = state.withLock { s in
            defer { s.reconnectsRecorded = max(s.reconnectsRecorded, reconnects) }
            return reconnects - s.reconnectsRecorded
        }
        metrics.connections(ready: ready, newReconnects: new)
    }
}
