package import Foundation

/// When a task is due.
package enum Schedule: Sendable, Hashable {
    /// Every `seconds`, anchored to the task's first due time (`every 30s`).
    case interval(seconds: Double)
    /// Once, at the task's first due time (`once`; the CLI also takes `at <ISO-8601>` and `after <duration>`).
    case once
    /// Never by itself: by a trigger or as a dependent of another task (`manual`).
    case manual
    /// A cron expression, evaluated in the task's time zone.
    case cron(CronExpression)

    /// Parses the stored form: `every 30s` (`ms`, `s`, `m`, `h`, `d`), `once`, `manual`, or a
    /// cron expression (5 or 6 fields, or a macro such as `@daily`).
    package init(parsing text: String) throws(ValidationError) {
        let t = text.trimmingCharacters(in: .whitespaces)
        switch t.lowercased() {
        case "once":
            self = .once
            return
        case "manual":
            self = .manual
            return
        default: break
        }
        if t.lowercased().hasPrefix("every ") {
            self = .interval(seconds: try Self.duration(String(t.dropFirst(6)), field: "schedule", whole: text))
            return
        }
        let fields = t.split(whereSeparator: { $0 == " " || $0 == "\t" })
        if t.hasPrefix("@") || fields.count == 5 || fields.count == 6 {
            self = .cron(try CronExpression(parsing: t))
            return
        }
        throw ValidationError(
            field: "schedule", value: text,
            hint:
                """
                use a cron expression ('*/5 * * * *', '0 30 9 * * MON-FRI', '@daily'), 'every <n><ms|s|m|h|d>' (for \
                example 'every 30s'), 'once' or 'manual'
                """
        )
    }

    /// Parses `30s`, `1500ms`, `5m`, `2h`, `1d` into seconds (at least 10 ms, at most
    /// `maxDurationSeconds`: an interval's text and its next times are arithmetic on the number).
    package static func duration(_ spec: String, field: String, whole: String? = nil) throws(ValidationError) -> Double
    {
        let s = spec.trimmingCharacters(in: .whitespaces).lowercased()
        let units: [(String, Double)] = [("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)]
        for (suffix, factor) in units where s.hasSuffix(suffix) {
            if let n = Double(s.dropLast(suffix.count)), n > 0, n * factor >= 0.01, n * factor <= maxDurationSeconds {
                return n * factor
            }
            break
        }
        throw ValidationError(
            field: field, value: whole ?? spec,
            hint: "a positive number with a unit ms, s, m, h or d, from 10ms to 3650d, for example '30s'")
    }

    /// The longest duration `duration(_:field:whole:)` accepts: 3,650 days (ten years).
    package static let maxDurationSeconds: Double = 315_360_000

    /// The stored form, the inverse of `init(parsing:)`.
    package var text: String {
        switch self {
        case .once: return "once"
        case .manual: return "manual"
        case .cron(let c): return c.text
        case .interval(let s):
            if s < 1 { return "every \(Int((s * 1000).rounded()))ms" }
            if s.rounded() == s { return "every \(Int(s))s" }
            return "every \(Int((s * 1000).rounded()))ms"
        }
    }

    /// Whether the task comes due by itself again after an occurrence.
    package var repeats: Bool {
        switch self {
        case .interval, .cron: true
        case .once, .manual: false
        }
    }

    /// The first occurrence strictly after `instant`. Intervals stay on the grid anchored at
    /// `anchor` (any past occurrence); cron uses `timeZone`. `nil`: not due again.
    package func next(after instant: Date, anchor: Date, timeZone: TimeZone) -> Date? {
        switch self {
        case .once, .manual:
            return nil
        case .cron(let c):
            return c.next(after: instant, in: timeZone)
        case .interval(let seconds):
            if instant < anchor { return anchor }
            let steps = (instant.timeIntervalSince(anchor) / seconds).rounded(.down) + 1
            var next = anchor.addingTimeInterval(steps * seconds)
            if next <= instant { next = next.addingTimeInterval(seconds) }
            return next
        }
    }

    /// What to do with a task whose occurrence `due` has come, judged at `now` (the database
    /// clock): which occurrences to run, how many to skip, and the next due time.
    ///
    /// Intervals keep to the grid of `anchor` (the task's first due time), even after a trigger
    /// made `due` fall off it. Occurrences older than `grace` are *missed* (dispatchers were
    /// down, or the task was paused); the misfire policy decides them. One-off and manual tasks
    /// always run.
    package func plan(
        due: Date, anchor: Date, now: Date, timeZone: TimeZone, misfire: MisfirePolicy, maxCatchup: Int,
        grace: Double
    ) -> OccurrencePlan {
        guard repeats else { return OccurrencePlan(fire: [due], skipped: 0, next: nil) }
        var list = [due]
        var last = due
        // Count at most 10,000 missed occurrences; beyond that they are skipped without counting.
        while list.count < 10_000, let n = next(after: last, anchor: anchor, timeZone: timeZone), n <= now {
            list.append(n)
            last = n
        }
        let nextDue = next(after: max(last, now), anchor: anchor, timeZone: timeZone)
        let onTime = list.filter { now.timeIntervalSince($0) <= grace }
        let missed = list.count - onTime.count
        let fire: [Date]
        switch misfire {
        case .skip: fire = Array(onTime.suffix(max(maxCatchup, 1)))
        case .once: fire = missed == 0 ? Array(onTime.suffix(max(maxCatchup, 1))) : [list[list.count - 1]]
        case .all: fire = Array(list.suffix(max(maxCatchup, 1)))
        }
        return OccurrencePlan(fire: fire, skipped: list.count - fire.count, next: nextDue)
    }
}

/// The result of `Schedule.plan`.
package struct OccurrencePlan: Sendable, Equatable {
    /// Occurrences to run now, oldest first.
    package var fire: [Date]
    /// Missed occurrences decided not to run.
    package var skipped: Int
    /// The task's next due time; `nil` when it has none.
    package var next: Date?

    package init(fire: [Date], skipped: Int, next: Date?) {
        self.fire = fire
        self.skipped = skipped
        self.next = next
    }
}

extension Schedule {
    /// The occurrences in `[from, to)`, at most `limit + 1` of them: one more than `limit` says
    /// "more than the limit" without walking a range that holds millions. Intervals keep to the
    /// grid of `anchor`, extended before it; cron uses `timeZone`. One-off and manual schedules
    /// have none.
    package func occurrences(from: Date, to: Date, anchor: Date, timeZone: TimeZone, limit: Int) -> [Date] {
        var out: [Date] = []
        switch self {
        case .once, .manual:
            break
        case .interval(let seconds):
            var step = (from.timeIntervalSince(anchor) / seconds).rounded(.up)
            while out.count <= limit {
                let t = anchor.addingTimeInterval(step * seconds)
                if t >= to { break }
                if t >= from { out.append(t) }
                step += 1
            }
        case .cron(let c):
            var after = from.addingTimeInterval(-0.001)
            while out.count <= limit, let t = c.next(after: after, in: timeZone), t < to {
                out.append(t)
                after = t
            }
        }
        return out
    }
}
