public import Foundation

/// When a task is due. Cron arrives with the scheduling issue; intervals and one-offs are here.
public enum Schedule: Sendable, Hashable {
    /// Every `seconds`, anchored to the task's first due time.
    case interval(seconds: Double)
    /// Once, at the task's `next_run_at`.
    case once

    /// Parses the stored form: `every 30s`, `every 5m`, `every 2h`, `every 1500ms`, or `once`.
    public init(parsing text: String) throws(ValidationError) {
        let t = text.trimmingCharacters(in: .whitespaces).lowercased()
        if t == "once" { self = .once; return }
        guard t.hasPrefix("every ") else {
            throw ValidationError(field: "schedule", value: text,
                                  hint: "use 'every <n><ms|s|m|h>' (for example 'every 30s') or 'once'")
        }
        let spec = t.dropFirst(6).trimmingCharacters(in: .whitespaces)
        let units: [(String, Double)] = [("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)]
        for (suffix, factor) in units where spec.hasSuffix(suffix) {
            let digits = spec.dropLast(suffix.count)
            if let n = Double(digits), n > 0, n.isFinite {
                let seconds = n * factor
                guard seconds >= 0.01 else { break }
                self = .interval(seconds: seconds)
                return
            }
        }
        throw ValidationError(field: "schedule", value: text,
                              hint: "the interval must be a positive number with a unit ms, s, m or h, at least 10ms, for example 'every 30s'")
    }

    /// The stored form, the inverse of `init(parsing:)`.
    public var text: String {
        switch self {
        case .once: return "once"
        case .interval(let s):
            if s < 1 { return "every \(Int((s * 1000).rounded()))ms" }
            if s.rounded() == s { return "every \(Int(s))s" }
            return "every \(Int((s * 1000).rounded()))ms"
        }
    }

    /// The next due time after dispatching the occurrence due at `occurrence`, judged at `now`
    /// (the database clock). An interval that fell behind (dispatchers were down) skips to the
    /// first occurrence after `now`: the occurrence being dispatched is the one catch-up run.
    /// `nil` means the task is not due again.
    public func next(after occurrence: Date, now: Date) -> Date? {
        switch self {
        case .once:
            return nil
        case .interval(let seconds):
            var next = occurrence.addingTimeInterval(seconds)
            if next <= now {
                let behind = now.timeIntervalSince(occurrence)
                let steps = (behind / seconds).rounded(.down) + 1
                next = occurrence.addingTimeInterval(steps * seconds)
                if next <= now { next = next.addingTimeInterval(seconds) }
            }
            return next
        }
    }
}
