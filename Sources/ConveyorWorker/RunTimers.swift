import ConveyorCore
import Synchronization

/// One clock for the deadlines of all of a worker's runs: each run's timeout and the moment it
/// reports `started`. A run used to arm two timers of its own, each a child task sleeping on the
/// runtime's timer queue, and most runs end long before either; here a deadline is an entry in a
/// heap, added and removed under a lock, and one loop sleeps until the earliest.
///
/// The loop is woken early only when a deadline earlier than the one it sleeps toward arrives;
/// a deadline cancelled meanwhile is simply gone when the loop wakes. Runs starting while others
/// go add later deadlines than the ones already waiting, so a busy worker's loop wakes about
/// once per `started_after_ms`, not once per run.
///
/// `fire` runs on the loop's task, so it must only hand the news on (post an event, resume a
/// continuation). An entry may fire after its run ended, when the cancel comes just too late.
package final class RunTimers: Sendable {
    /// A scheduled deadline; `cancel(_:)` removes it.
    package final class Entry: @unchecked Sendable {
        // @unchecked: `index` is read and written only under the owning RunTimers' lock; the
        // other members are immutable.
        let deadline: ContinuousClock.Instant
        let fire: @Sendable () -> Void
        /// Its place in the heap; -1 once fired or cancelled.
        var index = -1

        init(_ deadline: ContinuousClock.Instant, _ fire: @escaping @Sendable () -> Void) {
            self.deadline = deadline
            self.fire = fire
        }
    }

    fileprivate struct State {
        /// A binary min-heap on `deadline`; each entry knows its index.
        var heap: [Entry] = []
        /// The deadline the loop sleeps toward (set by the loop alone); nil when it waits for any
        /// deadline at all.
        var armed: ContinuousClock.Instant?
        /// Times the loop has looked at the heap (the cost the design keeps low).
        var passes = 0
    }
    private let state = Mutex(State())
    /// Wakes the loop for a deadline earlier than `armed`.
    private let earlier = Wakeup()

    package init() {}

    /// Calls `fire` once `deadline` has passed, unless cancelled first.
    @discardableResult
    package func schedule(at deadline: ContinuousClock.Instant, _ fire: @escaping @Sendable () -> Void) -> Entry {
        let entry = Entry(deadline, fire)
        let wake = state.withLock { s in
            s.push(entry)
            return s.armed.map { deadline < $0 } ?? true
        }
        if wake { earlier.signal() }
        return entry
    }

    /// Removes the entry if it has not fired yet.
    package func cancel(_ entry: Entry) {
        state.withLock { s in
            if entry.index >= 0 { s.remove(at: entry.index) }
        }
    }

    /// Deadlines waiting now.
    package var count: Int { state.withLock { $0.heap.count } }
    /// The deadline the loop sleeps toward now, if any.
    package var armed: ContinuousClock.Instant? { state.withLock { $0.armed } }
    /// Times the loop has looked at the heap since it started.
    package var passes: Int { state.withLock { $0.passes } }

    /// Fires deadlines as they pass, until the task is cancelled.
    package func run() async {
        var due: [Entry] = []
        while !Task.isCancelled {
            let now = ContinuousClock.now
            let next: ContinuousClock.Instant? = state.withLock { s in
                s.passes += 1
                while let first = s.heap.first, first.deadline <= now { due.append(s.remove(at: 0)) }
                s.armed = s.heap.first?.deadline
                return s.armed
            }
            for entry in due { entry.fire() }
            due.removeAll(keepingCapacity: true)
            if let next {
                await earlier.wait(timeout: ContinuousClock.now.duration(to: next))
            } else if await !earlier.waitUntilSignalled() {
                return
            }
        }
    }

    /// Runs `body` with this loop running beside it; the loop stops when `body` returns.
    package func serving<R, E: Error>(_ body: () async throws(E) -> R) async throws(E) -> R {
        let outcome: Result<R, E> = await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.run() }
            defer { group.cancelAll() }
            do throws(E) {
                return .success(try await body())
            } catch {
                return .failure(error)
            }
        }
        return try outcome.get()
    }
}

extension RunTimers.State {
    mutating func push(_ entry: RunTimers.Entry) {
        entry.index = heap.count
        heap.append(entry)
        up(from: entry.index)
    }

    /// Removes and returns the entry at `i`, keeping the heap in order.
    @discardableResult
    mutating func remove(at i: Int) -> RunTimers.Entry {
        let entry = heap[i]
        let last = heap.removeLast()
        if i < heap.count {
            heap[i] = last
            last.index = i
            if i > 0 && last.deadline < heap[(i - 1) / 2].deadline { up(from: i) } else { down(from: i) }
        }
        entry.index = -1
        return entry
    }

    private mutating func up(from start: Int) {
        var i = start
        while i > 0 {
            let parent = (i - 1) / 2
            guard heap[i].deadline < heap[parent].deadline else { return }
            swapAt(i, parent)
            i = parent
        }
    }

    private mutating func down(from start: Int) {
        var i = start
        while true {
            var least = i
            let left = 2 * i + 1
            if left < heap.count && heap[left].deadline < heap[least].deadline { least = left }
            if left + 1 < heap.count && heap[left + 1].deadline < heap[least].deadline { least = left + 1 }
            guard least != i else { return }
            swapAt(i, least)
            i = least
        }
    }

    private mutating func swapAt(_ i: Int, _ j: Int) {
        heap.swapAt(i, j)
        heap[i].index = i
        heap[j].index = j
    }
}
