/// The lifecycle of one attempt of one occurrence of a task.
///
/// `scheduled → queued → dispatched → running →`
/// `succeeded | failed | timed_out | cancelled | lost | dead | skipped | expired`
///
/// Transitions only move forward. A final state is never left: a late or duplicate event for
/// a final run is a no-op, which is what makes outcome recording exactly-once.
package enum RunState: String, Sendable, Codable, CaseIterable {
    case scheduled
    case queued
    case dispatched
    case running
    case succeeded
    case failed
    case timedOut = "timed_out"
    case cancelled
    case lost
    case dead
    /// A dependent whose upstreams' outcomes ruled it out (its trigger rule); never executed.
    case skipped
    /// Published, but not started within its task's schedule-to-start timeout (the broker lost
    /// the message, or no worker took it); never executed: workers refuse its message.
    case expired

    /// Position in the lifecycle; all final states share the last rank.
    package var rank: Int {
        switch self {
        case .scheduled: 0
        case .queued: 1
        case .dispatched: 2
        case .running: 3
        case .succeeded, .failed, .timedOut, .cancelled, .lost, .dead, .skipped, .expired: 4
        }
    }

    package var isFinal: Bool { rank == 4 }

    /// The endings a retry policy may retry (and that make a run `dead` once attempts run out).
    package static let retryableEndings: Set<RunState> = [.failed, .timedOut, .lost, .expired]

    /// Whether an event may move a run from `self` to `next`.
    ///
    /// `running → running` is allowed so that a redelivered task started by another worker can
    /// take the run over; every other transition must strictly advance.
    package func canTransition(to next: RunState) -> Bool {
        if isFinal { return false }
        if self == .running && next == .running { return true }
        return next.rank > rank
    }

    /// The states a run may be in for a transition into `next` to apply (used to build SQL guards).
    package static func predecessors(of next: RunState) -> [RunState] {
        allCases.filter { $0.canTransition(to: next) }
    }
}

/// How an attempt ended, as reported by a worker.
public enum Outcome: String, Sendable, Codable, CaseIterable {
    case succeeded
    case failed
    case timedOut = "timed_out"
    case cancelled
    /// The worker gave the run up without an outcome (it was shutting down with a run whose
    /// message it had already acknowledged); the run is retried by policy like any lost run.
    case lost

    package var runState: RunState {
        switch self {
        case .succeeded: .succeeded
        case .failed: .failed
        case .timedOut: .timedOut
        case .cancelled: .cancelled
        case .lost: .lost
        }
    }
}
