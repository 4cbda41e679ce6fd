package import Foundation

/// A cron expression with Vixie cron / cronie semantics, evaluated in an IANA time zone.
///
/// - 5 fields (`minute hour day-of-month month day-of-week`) or 6 with leading seconds.
/// - Lists (`1,15`), ranges (`1-5`), steps (`*/10`, `0-30/5`, `10/15` = 10 to the end by 15),
///   month names (`JAN`–`DEC`) and weekday names (`SUN`–`SAT`; 0 and 7 are both Sunday).
/// - `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly`.
/// - When both day-of-month and day-of-week are restricted (neither field starts with `*`),
///   a day matches if **either** matches; otherwise both must.
/// - Daylight saving: a local time that does not exist (spring forward) fires once, at the first
///   instant after the gap; a local time that happens twice (fall back) fires once, at its first
///   occurrence.
package struct CronExpression: Sendable, Hashable {
    /// The expression as written (whitespace normalized).
    package let text: String
    let seconds: UInt64, minutes: UInt64, hours: UInt64, daysOfMonth: UInt64, months: UInt64, daysOfWeek: UInt64
    let dayOfMonthStar: Bool, dayOfWeekStar: Bool

    static let macros: [String: String] = [
        "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
        "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
    ]
    static let monthNames = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    static let dayNames = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]

    struct Field {
        var name: String
        var min: Int
        var max: Int
        var names: [String] = []
        var nameBase = 0
    }

    package init(parsing raw: String) throws(ValidationError) {
        let parts = raw.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        text = parts.joined(separator: " ")
        func fail(_ hint: String) -> ValidationError { ValidationError(field: "schedule", value: raw, hint: hint) }
        var fields = parts
        if parts.count == 1, parts[0].hasPrefix("@") {
            guard let expanded = Self.macros[parts[0].lowercased()] else {
                throw fail(
                    "unknown macro \(parts[0]); use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly"
                )
            }
            fields = expanded.split(separator: " ").map(String.init)
        }
        guard fields.count == 5 || fields.count == 6 else {
            throw fail(
                """
                a cron expression has 5 fields (minute hour day-of-month month day-of-week) or 6 with leading \
                seconds; this has \(fields.count)
                """
            )
        }
        if fields.count == 5 { fields.insert("0", at: 0) }
        let specs = [
            Field(name: "second", min: 0, max: 59), Field(name: "minute", min: 0, max: 59),
            Field(name: "hour", min: 0, max: 23),
            Field(name: "day of month", min: 1, max: 31),
            Field(name: "month", min: 1, max: 12, names: Self.monthNames, nameBase: 1),
            Field(name: "day of week", min: 0, max: 7, names: Self.dayNames, nameBase: 0),
        ]
        let offset = parts.count == 6 ? 0 : 1  // field numbers as the user wrote them
        var sets: [UInt64] = []
        for (i, spec) in specs.enumerated() {
            do {
                sets.append(try Self.parseField(fields[i], spec))
            } catch let hint {
                let number = i + 1 - offset
                let position = number >= 1 ? "field \(number) (\(spec.name))" : "the \(spec.name)s field"
                throw fail("\(position) '\(fields[i])': \(hint.text)")
            }
        }
        seconds = sets[0]
        minutes = sets[1]
        hours = sets[2]
        daysOfMonth = sets[3]
        months = sets[4]
        // 7 is Sunday too.
        daysOfWeek = (sets[5] & 0x7F) | ((sets[5] >> 7) & 1)
        dayOfMonthStar = fields[3].hasPrefix("*")
        dayOfWeekStar = fields[5].hasPrefix("*")
        if dayOfMonthStar || dayOfWeekStar {
            // Days of month no month named can hold (e.g. 30 with February only) never fire.
            let longest: [Int64] = [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
            let reachable = (1...12).contains { m in
                months & (1 << UInt64(m)) != 0 && (1...longest[m]).contains { daysOfMonth & (1 << UInt64($0)) != 0 }
            }
            if !reachable { throw fail("no month named has the day of month given, so it would never fire") }
        }
    }

    struct Hint: Error { var text: String }

    static func parseField(_ s: String, _ f: Field) throws(Hint) -> UInt64 {
        var set: UInt64 = 0
        for item in s.split(separator: ",", omittingEmptySubsequences: false) {
            guard !item.isEmpty else { throw Hint(text: "empty list item") }
            var rangePart = Substring(item)
            var step = 1
            if let slash = item.firstIndex(of: "/") {
                rangePart = item[..<slash]
                let stepText = item[item.index(after: slash)...]
                guard let n = Int(stepText), n >= 1 else {
                    throw Hint(text: "step '\(stepText)' must be a whole number of at least 1")
                }
                step = n
            }
            var lo: Int
            var hi: Int
            if rangePart == "*" {
                lo = f.min
                hi = f.max
                if f.name == "day of week" { hi = 6 }
            } else if let dash = rangePart.firstIndex(of: "-") {
                lo = try value(rangePart[..<dash], f)
                hi = try value(rangePart[rangePart.index(after: dash)...], f)
                guard lo <= hi else {
                    throw Hint(text: "range \(rangePart) runs backwards; write the smaller value first")
                }
            } else {
                lo = try value(rangePart, f)
                hi = item.contains("/") ? (f.name == "day of week" ? 6 : f.max) : lo
            }
            var v = lo
            while v <= hi {
                set |= 1 << UInt64(v)
                v += step
            }
        }
        return set
    }

    static func value(_ s: Substring, _ f: Field) throws(Hint) -> Int {
        if let n = Int(s) {
            guard (f.min...f.max).contains(n) else { throw Hint(text: "\(n) is out of range \(f.min)–\(f.max)") }
            return n
        }
        if let i = f.names.firstIndex(of: s.uppercased()) { return i + f.nameBase }
        let names = f.names.isEmpty ? "" : " or a name (\(f.names.first!)–\(f.names.last!))"
        throw Hint(text: "'\(s)' is not a number \(f.min)–\(f.max)\(names)")
    }

    // MARK: evaluation

    func dayMatches(days: Int64, day: Int64) -> Bool {
        let dom = daysOfMonth & (1 << UInt64(day)) != 0
        let dow = daysOfWeek & (1 << UInt64(Civil.weekday(days: days))) != 0
        return (dayOfMonthStar || dayOfWeekStar) ? (dom && dow) : (dom || dow)
    }

    /// The first bit set in `set` at or above `from` (up to `max`), if any.
    static func nextBit(_ set: UInt64, from: Int64, max: Int64) -> Int64? {
        guard from <= max else { return nil }
        let masked = set & ~((UInt64(1) << UInt64(from)) &- 1)
        guard masked != 0 else { return nil }
        let b = Int64(masked.trailingZeroBitCount)
        return b <= max ? b : nil
    }

    /// The first local wall-clock time (seconds since 1970-01-01 on the local calendar, as if it
    /// were UTC) at or after `from` that matches, within eight years; `nil` if none does.
    package func nextMatch(fromLocal from: Int64) -> Int64? {
        var t = from
        let limitYear = Civil.date(fromDays: Self.floorDiv(from, 86_400)).year + 8
        while true {
            let days = Self.floorDiv(t, 86_400)
            let sod = t - days * 86_400
            let (y, m, d) = Civil.date(fromDays: days)
            if y > limitYear { return nil }
            if months & (1 << UInt64(m)) == 0 {
                t =
                    (m == 12 ? Civil.days(year: y + 1, month: 1, day: 1) : Civil.days(year: y, month: m + 1, day: 1))
                    * 86_400
                continue
            }
            if !dayMatches(days: days, day: d) {
                t = (days + 1) * 86_400
                continue
            }
            let h = sod / 3600
            let mi = sod % 3600 / 60
            let s = sod % 60
            guard let nh = Self.nextBit(hours, from: h, max: 23) else {
                t = (days + 1) * 86_400
                continue
            }
            if nh != h {
                t = days * 86_400 + nh * 3600
                continue
            }
            guard let nm = Self.nextBit(minutes, from: mi, max: 59) else {
                t = days * 86_400 + (h + 1) * 3600
                continue
            }
            if nm != mi {
                t = days * 86_400 + h * 3600 + nm * 60
                continue
            }
            guard let ns = Self.nextBit(seconds, from: s, max: 59) else {
                t = days * 86_400 + h * 3600 + (mi + 1) * 60
                continue
            }
            return days * 86_400 + h * 3600 + mi * 60 + ns
        }
    }

    static func floorDiv(_ a: Int64, _ b: Int64) -> Int64 { a >= 0 ? a / b : (a - b + 1) / b }

    /// The next fire time strictly after `instant`, in `timeZone`; `nil` if it never fires again.
    package func next(after instant: Date, in timeZone: TimeZone) -> Date? {
        let zone = LocalTime(timeZone)
        let t = Int64((instant.timeIntervalSince1970).rounded(.down))
        let offset = zone.offset(t)
        // Near a transition, a wall time before t's own can still resolve after t (the second
        // half of a repeated hour), so start the search a little earlier there.
        let nearTransition = zone.offset(t - 4 * 3600) != offset || zone.offset(t + 4 * 3600) != offset
        var wall = t + offset + (nearTransition ? -4 * 3600 : 1)
        while let w = nextMatch(fromLocal: wall) {
            let u = zone.instant(ofLocal: w)
            if Double(u) > instant.timeIntervalSince1970 { return Date(timeIntervalSince1970: Double(u)) }
            wall = w + 1
        }
        return nil
    }
}

/// Local wall-clock time ↔ instants in one time zone, with cron's rules for gaps and folds.
package struct LocalTime: Sendable {
    package let zone: TimeZone
    package init(_ zone: TimeZone) { self.zone = zone }

    /// UTC offset in seconds at an instant (seconds since 1970).
    package func offset(_ instant: Int64) -> Int64 {
        Int64(zone.secondsFromGMT(for: Date(timeIntervalSince1970: Double(instant))))
    }

    /// The instant of a local wall time: the first of two in a fold; the first instant after the
    /// gap for a time that a spring-forward skips.
    package func instant(ofLocal wall: Int64) -> Int64 {
        let candidates = Set([offset(wall - 86_400), offset(wall), offset(wall + 86_400)])
        let valid = candidates.map { wall - $0 }.filter { offset($0) == wall - $0 }
        if let first = valid.min() { return first }
        // In a gap: the transition lies between the two readings; find its first second.
        let before = candidates.min()!
        let after = candidates.max()!
        var lo = wall - after
        var hi = wall - before  // offset(lo) is `before`, offset(hi) is `after`
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2
            if offset(mid) == after { hi = mid } else { lo = mid }
        }
        return hi
    }
}
