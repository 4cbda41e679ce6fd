import Synchronization

/// At most `limit` holders at once; waiters are served in arrival order. A waiter whose task is
/// cancelled leaves the line and gets no slot.
package final class Slots: Sendable {
    private struct State {
        var free: Int
        var waiters: [(id: Int, continuation: CheckedContinuation<Bool, Never>)] = []
        var nextID = 0
    }
    private let state: Mutex<State>

    package init(_ limit: Int) { state = Mutex(State(free: limit)) }

    /// Takes a slot; returns `false` (holding none) if the task was cancelled while waiting.
    package func acquire() async -> Bool {
        let id: Int? = state.withLock { s in
            if s.free > 0 && s.waiters.isEmpty {
                s.free -= 1
                return nil
            }
            s.nextID += 1
            return s.nextID
        }
        guard let id else { return true }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Bool, Never>) in
                let now: Bool? = state.withLock { s in
                    if Task.isCancelled { return false }
                    if s.free > 0 && s.waiters.isEmpty {
                        s.free -= 1
                        return true
                    }
                    s.waiters.append((id, c))
                    return nil
                }
                if let now { c.resume(returning: now) }
            }
        } onCancel: {
            let c: CheckedContinuation<Bool, Never>? = state.withLock { s in
                guard let i = s.waiters.firstIndex(where: { $0.id == id }) else { return nil }
                return s.waiters.remove(at: i).continuation
            }
            c?.resume(returning: false)
        }
    }

    /// Gives a slot back (to the first waiter, if any).
    package func release() {
        let next: CheckedContinuation<Bool, Never>? = state.withLock { s in
            if s.waiters.isEmpty {
                s.free += 1
                return nil
            }
            return s.waiters.removeFirst().continuation
        }
        next?.resume(returning: true)
    }
}
