import ConveyorCore
import Foundation
import Synchronization

/// Runs the broker confirmed that are still to be marked `dispatched`.
///
/// The mark waits `delay` after the confirm. Most runs are reported on by then (the broker
/// backlog is bounded, and a short run takes milliseconds): the status moves the run from
/// `queued` straight to `running` or its outcome, and the mark finds nothing to change. That
/// spares PostgreSQL a row version per run, about a tenth of a burst's CPU (docs/benchmarks.md,
/// "The deferred dispatch mark"). A run still `queued` after `delay` waits in the broker; it is
/// marked then, with the time of its confirm, well before its lease ends and a dispatcher would
/// publish it again. Shutdown marks what is pending at once.
final class DispatchMarks: Sendable {
    struct Pending: Sendable {
        var id: UUID
        var startWithin: Double
        var confirmed: ContinuousClock.Instant
    }

    /// How long after its confirm a run is marked.
    let delay: Duration
    private let pending = Mutex<[Pending]>([])
    /// Signalled when the first run is added to an empty list, and on shutdown.
    let wakeup = Wakeup()

    /// A quarter of the publish lease, at most one second: a run is marked long before its lease
    /// ends, even with the shortest lease allowed (1 s).
    init(lease: Duration) {
        delay = min(.seconds(1), lease / 4)
    }

    /// Adds runs confirmed now, with their schedule-to-start timeouts.
    func add(_ runs: [(id: UUID, startWithin: Double)]) {
        guard !runs.isEmpty else { return }
        let wasEmpty = pending.withLock { p in
            let wasEmpty = p.isEmpty
            let now = ContinuousClock.now  // read under the lock, so the list stays in confirm order
            p.append(contentsOf: runs.map { Pending(id: $0.id, startWithin: $0.startWithin, confirmed: now) })
            return wasEmpty
        }
        if wasEmpty { wakeup.signal() }
    }

    /// Takes the runs confirmed at least `age` ago, oldest first, and says how long until the
    /// next one is that old (nil when none is left).
    func take(confirmedBefore age: Duration) -> (due: [Pending], nextIn: Duration?) {
        pending.withLock { p in
            let now = ContinuousClock.now
            let n = p.firstIndex { now - $0.confirmed < age } ?? p.count
            let due = Array(p[..<n])
            p.removeFirst(n)
            return (due, p.first.map { age - (now - $0.confirmed) })
        }
    }
}
