import ConveyorCore
import Foundation
import Synchronization

/// Runs the broker confirmed that are still to be marked `dispatched`.
///
/// The mark waits `delay` after the confirm. Most runs are reported on by then (the broker
/// backlog is bounded, and a short run takes milliseconds): the status moves the run from
/// `queued` straight to `running` or its outcome, and the mark finds nothing to change. That
/// spares PostgreSQL a row version per run, 11 % of its CPU in a burst (docs/benchmarks.md,
/// "The deferred dispatch mark"). A run still `queued` after `delay` waits in the broker; it is
/// marked then, with the time of its confirm. A run is due for its mark at `delay` after its
/// confirm or half its lease after its claim, whichever comes first, so a slow confirm does not
/// push the mark past the lease (when any dispatcher would publish it again). Shutdown marks what
/// is pending at once.
final class DispatchMarks: Sendable {
    struct Pending: Sendable {
        var id: UUID
        var startWithin: Double
        var confirmed: ContinuousClock.Instant
        var due: ContinuousClock.Instant
    }

    /// How long after its confirm a run is marked (at the latest half its lease after its claim).
    let delay: Duration
    let lease: Duration
    private let pending = Mutex<[Pending]>([])
    /// Signalled when runs are added (their due time may come before the one the loop waits
    /// for: a slow confirm's half-lease bound), and on shutdown.
    let wakeup = Wakeup()

    /// A quarter of the publish lease, at most one second.
    init(lease: Duration) {
        self.lease = lease
        delay = min(.seconds(1), lease / 4)
    }

    /// Adds runs claimed at `claimed` and confirmed now, with their schedule-to-start timeouts.
    func add(_ runs: [(id: UUID, startWithin: Double)], claimed: ContinuousClock.Instant) {
        guard !runs.isEmpty else { return }
        let now = ContinuousClock.now
        let due = min(now + delay, claimed + lease / 2)
        pending.withLock { p in
            p.append(
                contentsOf: runs.map { Pending(id: $0.id, startWithin: $0.startWithin, confirmed: now, due: due) })
        }
        wakeup.signal()
    }

    /// Takes the runs due for their mark (all of them when `all`), and says how long until the
    /// next one is due (nil when none is left).
    func takeDue(all: Bool = false) -> (due: [Pending], nextIn: Duration?) {
        pending.withLock { p in
            let now = ContinuousClock.now
            let due = all ? p : p.filter { $0.due <= now }
            if !due.isEmpty { p.removeAll { all || $0.due <= now } }
            return (due, p.map(\.due).min().map { $0 - now })
        }
    }
}
