package import ConveyorCore
import Foundation

/// Faults a process injects into itself, for the fault suite (`scripts/faults.sh`) only. Kept
/// out of ConveyorCore (which stays pure) and out of the public API (`package` access): an
/// embedding program never sees these switches.
///
/// Read from `CONVEYOR_TEST_FAULTS`, a comma-separated list; unset or empty in production:
/// - `dispatcher-crash=after-claim|after-publish|mid-batch`: the dispatcher kills itself
///   (SIGKILL) at that point of its first non-empty claim: after the claim commits; after the
///   broker confirmed the batch but before the runs are marked dispatched; after publishing half
///   of the batch.
/// - `no-confirms`: the dispatcher's publisher treats a message as confirmed as soon as it is
///   written to the socket. This is the negative control that shows the fault suite's oracle can
///   see loss; it breaks the delivery guarantee on purpose.
/// - `worker-crash-on-task=NAME`: a worker kills itself (SIGKILL) when it is about to execute a
///   run of the task named NAME (a poison task that takes the process down).
/// - `isolation-unroutable`: a worker addresses its copies for the isolation lane to a queue that
///   does not exist, so the broker returns them (unroutable) and the worker must run the
///   redelivered message in place.
package struct FaultInjection: Sendable, Equatable {
    package enum CrashPoint: String, Sendable, CaseIterable {
        case afterClaim = "after-claim"
        case afterPublish = "after-publish"
        case midBatch = "mid-batch"
    }

    package var dispatcherCrash: CrashPoint?
    package var publishWithoutConfirms = false
    package var workerCrashOnTask: String?
    package var isolationUnroutable = false

    package init() {}

    package static let variable = "CONVEYOR_TEST_FAULTS"

    package var isEmpty: Bool { self == FaultInjection() }

    /// This process's switches, from `CONVEYOR_TEST_FAULTS`.
    package static func fromEnvironment() throws(ValidationError) -> FaultInjection {
        try parse(ProcessInfo.processInfo.environment[variable])
    }

    package static func parse(_ text: String?) throws(ValidationError) -> FaultInjection {
        var f = FaultInjection()
        guard let text, !text.isEmpty else { return f }
        for item in text.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !item.isEmpty {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            switch (parts[0], parts.count == 2 ? parts[1] : nil) {
            case ("dispatcher-crash", let point?):
                guard let p = CrashPoint(rawValue: point) else {
                    throw ValidationError(
                        field: variable, value: item,
                        hint:
                            "dispatcher-crash is one of \(CrashPoint.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                f.dispatcherCrash = p
            case ("no-confirms", nil):
                f.publishWithoutConfirms = true
            case ("worker-crash-on-task", let name?) where !name.isEmpty:
                f.workerCrashOnTask = name
            case ("isolation-unroutable", nil):
                f.isolationUnroutable = true
            default:
                throw ValidationError(
                    field: variable, value: item,
                    hint:
                        """
                        a test-only list of dispatcher-crash=after-claim|after-publish|mid-batch, no-confirms, \
                        worker-crash-on-task=NAME, isolation-unroutable; leave it unset in production
                        """
                )
            }
        }
        return f
    }

    /// Ends this process as `kill -9` would: no clean-up, no flush, sockets dropped by the kernel.
    package static func crash() -> Never {
        kill(getpid(), SIGKILL)
        while true { pause() }
    }
}
