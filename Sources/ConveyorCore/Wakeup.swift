import Synchronization

/// A level-triggered wake-up for one waiting loop: `signal()` wakes the waiter, or the next
/// `wait` if nobody waits yet; `wait(timeout:)` returns on a signal or when the timeout passes.
package final class Wakeup: Sendable {
    private struct State {
        var pending = false
        var waiter: CheckedContinuation<Void, Never>?
        var cancelled = false
    }
    private let state = Mutex(State())

    package init() {}

    package func signal() {
        let w: CheckedContinuation<Void, Never>? = state.withLock { s in
            if let w = s.waiter {
                s.waiter = nil
                return w
            }
            s.pending = true
            return nil
        }
        w?.resume()
    }

    /// Waits for a signal or the timeout (on `clock`); returns whether it was signalled.
    @discardableResult
    package func wait(timeout: Duration, clock: any Clock<Duration> = ContinuousClock()) async -> Bool {
        if state.withLock({ s in
            defer { s.pending = false }
            return s.pending
        }) {
            return true
        }
        return await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                try? await clock.sleep(for: timeout)
                return false
            }
            group.addTask {
                await self.waitForSignal()
                return true
            }
            let first = await group.next() ?? false
            group.cancelAll()
            return first
        }
    }

    /// Waits for a signal with no timeout; returns `false` if the waiting task was cancelled first.
    package func waitUntilSignalled() async -> Bool {
        if state.withLock({ s in
            defer { s.pending = false }
            return s.pending
        }) {
            return true
        }
        await waitForSignal()
        return !Task.isCancelled
    }

    private func waitForSignal() async {
        state.withLock { $0.cancelled = false }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { s in
                    if s.pending || s.cancelled {
                        s.pending = false
                        return true
                    }
                    s.waiter = c
                    return false
                }
                if resumeNow { c.resume() }
            }
        } onCancel: {
            let w: CheckedContinuation<Void, Never>? = state.withLock { s in
                s.cancelled = true
                defer { s.waiter = nil }
                return s.waiter
            }
            w?.resume()
        }
    }
}
