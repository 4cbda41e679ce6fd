package import Foundation

/// ISO-8601 instants, formatted and parsed without Foundation's formatters.
///
/// Pure arithmetic: safe from any thread and cheap on the hot path (Foundation's
/// `Date.ISO8601FormatStyle` crashed when used from many threads at once on Linux).
/// Precision is the microsecond, as PostgreSQL stores it.
package enum Timestamp {
    /// `2026-11-23T12:00:00.123456Z`
    package static func format(_ date: Date) -> String {
        // An instant past ±9 × 10^12 s (±285,000 years: no clock's, only arithmetic on a hostile
        // number) is written as that bound; converting it to microseconds would trap.
        let seconds = date.timeIntervalSince1970
        let bounded = seconds.isNaN ? 0 : min(max(seconds, -9e12), 9e12)
        let totalMicros = Int64((bounded * 1_000_000).rounded())
        var secs = totalMicros >= 0 ? totalMicros / 1_000_000 : (totalMicros - 999_999) / 1_000_000
        let micros = totalMicros - secs * 1_000_000
        let days = secs >= 0 ? secs / 86_400 : (secs - 86_399) / 86_400
        secs -= days * 86_400
        let (y, m, d) = Civil.date(fromDays: days)
        // Years 0 to 9999 (every instant stored or sent) are written as 27 bytes in place: this runs
        // several times per run on the hot path (messages, SQL arrays).
        if (0...9999).contains(y) {
            return String(unsafeUninitializedCapacity: 27) { out in
                func put(_ v: Int64, width: Int, at: Int) {
                    var v = v
                    for k in stride(from: at + width - 1, through: at, by: -1) {
                        out[k] = UInt8(truncatingIfNeeded: 48 + v % 10)
                        v /= 10
                    }
                }
                put(y, width: 4, at: 0)
                put(m, width: 2, at: 5)
                put(d, width: 2, at: 8)
                put(secs / 3600, width: 2, at: 11)
                put(secs % 3600 / 60, width: 2, at: 14)
                put(secs % 60, width: 2, at: 17)
                put(micros, width: 6, at: 20)
                out[4] = UInt8(ascii: "-")
                out[7] = UInt8(ascii: "-")
                out[10] = UInt8(ascii: "T")
                out[13] = UInt8(ascii: ":")
                out[16] = UInt8(ascii: ":")
                out[19] = UInt8(ascii: ".")
                out[26] = UInt8(ascii: "Z")
                return 27
            }
        }
        func pad(_ v: Int64, _ w: Int) -> String {
            let s = String(v)
            return s.count >= w ? s : String(repeating: "0", count: w - s.count) + s
        }
        let date = "\(pad(y, 4))-\(pad(m, 2))-\(pad(d, 2))"
        return "\(date)T\(pad(secs / 3600, 2)):\(pad(secs % 3600 / 60, 2)):\(pad(secs % 60, 2)).\(pad(micros, 6))Z"
    }

    /// Parses `YYYY-MM-DD[T ]HH:MM:SS[.fraction](Z|±HH[:MM])`, from 0001-01-01T00:00:00Z up to 9999-12-31T23:59:59Z (nil outside).
    package static func parse(_ s: String) -> Date? {
        let b = Array(s.utf8)
        guard b.count >= 19 else { return nil }
        func num(_ from: Int, _ len: Int) -> Int? {
            guard from + len <= b.count else { return nil }
            var v = 0
            for i in from..<(from + len) {
                guard b[i] >= 48, b[i] <= 57 else { return nil }
                v = v * 10 + Int(b[i] - 48)
            }
            return v
        }
        guard b[4] == UInt8(ascii: "-"), b[7] == UInt8(ascii: "-"),
            b[10] == UInt8(ascii: "T") || b[10] == UInt8(ascii: " "),
            b[13] == UInt8(ascii: ":"), b[16] == UInt8(ascii: ":"),
            let y = num(0, 4), let mo = num(5, 2), let d = num(8, 2), let h = num(11, 2), let mi = num(14, 2),
            let sec = num(17, 2),
            (1...12).contains(mo), (1...31).contains(d), h < 24, mi < 60, sec < 61
        else { return nil }
        var i = 19
        var frac = 0.0
        if i < b.count, b[i] == UInt8(ascii: ".") {
            i += 1
            var scale = 0.1
            let start = i
            while i < b.count, b[i] >= 48, b[i] <= 57 {
                frac += Double(b[i] - 48) * scale
                scale /= 10
                i += 1
            }
            guard i > start else { return nil }
        }
        var offset = 0
        if i < b.count, b[i] == UInt8(ascii: "Z") {
            i += 1
        } else if i < b.count, b[i] == UInt8(ascii: "+") || b[i] == UInt8(ascii: "-") {
            let sign = b[i] == UInt8(ascii: "-") ? -1 : 1
            guard let oh = num(i + 1, 2) else { return nil }
            i += 3
            var om = 0
            if i < b.count, b[i] == UInt8(ascii: ":") {
                guard let m = num(i + 1, 2) else { return nil }
                om = m
                i += 3
            } else if let m = num(i, 2) {
                om = m
                i += 2
            }
            offset = sign * (oh * 3600 + om * 60)
        } else {
            return nil
        }
        guard i == b.count else { return nil }
        let days = Civil.days(year: Int64(y), month: Int64(mo), day: Int64(d))
        let seconds = days * 86_400 + Int64(h * 3600 + mi * 60 + sec - offset)
        // PostgreSQL has no year 0 (nor a sign in this format): an instant before year 1, stored,
        // made it refuse the whole statement, a status batch with it, which was retried forever.
        guard seconds >= earliestSeconds, seconds < endSeconds else { return nil }
        return Date(timeIntervalSince1970: Double(seconds) + frac)
    }

    /// 0001-01-01T00:00:00Z, the earliest instant `parse` reads: every one it reads can be stored.
    package static let earliestSeconds: Int64 = -62_135_596_800
    /// 10000-01-01T00:00:00Z, which `parse` does not reach (an offset or a rounded fraction could
    /// carry 9999-12-31 over): PostgreSQL prints that year with five digits, which `parse` would
    /// not read back.
    package static let endSeconds: Int64 = 253_402_300_800
}

/// Proleptic Gregorian calendar arithmetic on day numbers (days since 1970-01-01), after
/// Howard Hinnant's `days_from_civil` and `civil_from_days`.
package enum Civil {
    /// Days since 1970-01-01 of a calendar date.
    package static func days(year y: Int64, month m: Int64, day d: Int64) -> Int64 {
        let yy = m <= 2 ? y - 1 : y
        let era = (yy >= 0 ? yy : yy - 399) / 400
        let yoe = yy - era * 400
        let mp = (m + 9) % 12
        let doy = (153 * mp + 2) / 5 + d - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }

    /// The calendar date of a day number.
    package static func date(fromDays z: Int64) -> (year: Int64, month: Int64, day: Int64) {
        let days = z + 719_468
        let era = (days >= 0 ? days : days - 146_096) / 146_097
        let doe = days - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (m <= 2 ? 1 : 0), m, d)
    }

    /// Day of the week of a day number: 0 is Sunday (1970-01-01 was a Thursday).
    package static func weekday(days: Int64) -> Int64 {
        let w = (days + 4) % 7
        return w < 0 ? w + 7 : w
    }
}
