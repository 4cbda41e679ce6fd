import ConveyorAPI
import Synchronization

/// A clock that moves only when the test says. Sleepers wake when `advance` passes their
/// deadline (or when cancelled); `sleepers` lets a test wait, boundedly, until the code under test
/// has started the sleep it is about to cut short.
final class ManualClock: Clock, Sendable {
    struct Instant: InstantProtocol {
        var offset: Duration
        func advanced(by d: Duration) -> Instant { Instant(offset: offset + d) }
        func duration(to other: Instant) -> Duration { other.offset - offset }
        static func < (a: Instant, b: Instant) -> Bool { a.offset < b.offset }
    }

    private struct State {
        var now = Instant(offset: .zero)
        var sleepers: [Int: (deadline: Instant, wake: CheckedContinuation<Void, any Error>)] = [:]
        /// Sleeps cancelled before they registered.
        var cancelled: Set<Int> = []
        var nextID = 0
    }
    private let state = Mutex(State())
    /// The continuous time this clock started at: `apiClock` maps onto it.
    private let origin = ContinuousClock.now

    var now: Instant { state.withLock { $0.now } }
    var minimumResolution: Duration { .zero }

    /// Sleeps waiting for `advance`.
    var sleepers: Int { state.withLock { $0.sleepers.count } }

    /// The same time as the API's clock.
    var apiClock: APIClock { APIClock { [self] in origin + now.offset } }

    func sleep(until deadline: Instant, tolerance: Duration? = nil) async throws {
        let id = state.withLock { s in
            defer { s.nextID += 1 }
            return s.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (wake: CheckedContinuation<Void, any Error>) in
                let now: Result<Void, any Error>? = state.withLock { s in
                    if s.cancelled.remove(id) != nil { return .failure(CancellationError()) }
                    if deadline <= s.now { return .success(()) }
                    s.sleepers[id] = (deadline, wake)
                    return nil
                }
                if let now { wake.resume(with: now) }
            }
        } onCancel: {
            let wake = state.withLock { s in
                guard let sleeper = s.sleepers.removeValue(forKey: id) else {
                    s.cancelled.insert(id)
                    return nil as CheckedContinuation<Void, any Error>?
                }
                return sleeper.wake
            }
            wake?.resume(throwing: CancellationError())
        }
    }

    /// Moves time forward and wakes every sleeper whose deadline it passed.
    func advance(by d: Duration) {
        let due = state.withLock { s in
            s.now = s.now.advanced(by: d)
            let due = s.sleepers.filter { $0.value.deadline <= s.now }
            for id in due.keys { s.sleepers[id] = nil }
            return due.values.map(\.wake)
        }
        for wake in due { wake.resume() }
    }
}
