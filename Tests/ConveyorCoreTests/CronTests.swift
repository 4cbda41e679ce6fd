import ConveyorCore
import Foundation
import Testing

/// `2026-03-08T07:00:00Z` style instants for readable expectations.
private func at(_ s: String) -> Date { Timestamp.parse(s)! }
private func fires(_ expr: String, tz: String, from: String, count: Int) throws -> [String] {
    let cron = try CronExpression(parsing: expr)
    let zone = TimeZone(identifier: tz)!
    var out: [String] = []
    var t = at(from)
    for _ in 0..<count {
        guard let n = cron.next(after: t, in: zone) else { break }
        out.append(String(Timestamp.format(n).prefix(19)) + "Z")
        t = n
    }
    return out
}

@Suite struct CronTests {
    @Test func fieldsListsRangesStepsAndNames() throws {
        #expect(
            try fires("*/15 9-10 * * MON-FRI", tz: "UTC", from: "2026-11-20T10:40:00Z", count: 3)
                == ["2026-11-20T10:45:00Z", "2026-11-23T09:00:00Z", "2026-11-23T09:15:00Z"])  // Fri, then Mon
        #expect(
            try fires("0 0 1 JAN,jul *", tz: "UTC", from: "2026-02-01T00:00:00Z", count: 2)
                == ["2026-07-01T00:00:00Z", "2027-01-01T00:00:00Z"])
        // six fields: seconds first
        #expect(
            try fires("30 */20 * * * *", tz: "UTC", from: "2026-01-01T00:00:00Z", count: 4)
                == ["2026-01-01T00:00:30Z", "2026-01-01T00:20:30Z", "2026-01-01T00:40:30Z", "2026-01-01T01:00:30Z"])
        // 7 = Sunday
        #expect(try fires("0 12 * * 7", tz: "UTC", from: "2026-11-23T00:00:00Z", count: 1) == ["2026-11-29T12:00:00Z"])
        #expect(
            try fires("5/20 * * * *", tz: "UTC", from: "2026-01-01T00:00:00Z", count: 3)
                == ["2026-01-01T00:05:00Z", "2026-01-01T00:25:00Z", "2026-01-01T00:45:00Z"])
    }

    @Test func macros() throws {
        #expect(try fires("@daily", tz: "UTC", from: "2026-11-23T10:00:00Z", count: 1) == ["2026-11-24T00:00:00Z"])
        #expect(try fires("@hourly", tz: "UTC", from: "2026-11-23T10:00:00Z", count: 1) == ["2026-11-23T11:00:00Z"])
        #expect(try fires("@weekly", tz: "UTC", from: "2026-11-23T10:00:00Z", count: 1) == ["2026-11-29T00:00:00Z"])
        #expect(try fires("@monthly", tz: "UTC", from: "2026-11-23T10:00:00Z", count: 1) == ["2026-12-01T00:00:00Z"])
        #expect(try fires("@yearly", tz: "UTC", from: "2026-11-23T10:00:00Z", count: 1) == ["2027-01-01T00:00:00Z"])
        #expect(try fires("@annually", tz: "UTC", from: "2026-11-23T10:00:00Z", count: 1) == ["2027-01-01T00:00:00Z"])
    }

    /// Vixie cron: both day fields restricted → either matches; one starred → both must.
    @Test func dayOfMonthOrDayOfWeek() throws {
        // The 13th or any Friday, Jan 2026: Fri 2, 9, Tue 13, Fri 16.
        #expect(
            try fires("0 0 13 * FRI", tz: "UTC", from: "2026-01-01T00:00:00Z", count: 4)
                == ["2026-01-02T00:00:00Z", "2026-01-09T00:00:00Z", "2026-01-13T00:00:00Z", "2026-01-16T00:00:00Z"])
        // `*/1` in day-of-month starts with '*': it counts as unrestricted, so Fridays only.
        #expect(
            try fires("0 0 */1 * FRI", tz: "UTC", from: "2026-01-01T00:00:00Z", count: 2)
                == ["2026-01-02T00:00:00Z", "2026-01-09T00:00:00Z"])
        #expect(try fires("0 0 29 2 *", tz: "UTC", from: "2026-01-01T00:00:00Z", count: 1) == ["2028-02-29T00:00:00Z"])
    }

    @Test(arguments: [
        ("* * * *", "5 fields"), ("60 * * * *", "field 1 (minute) '60'"), ("* 24 * * *", "field 2 (hour)"),
        ("* * 0 * *", "field 3 (day of month) '0'"), ("* * * 13 *", "field 4 (month)"),
        ("* * * * 8", "field 5 (day of week)"),
        ("* * * FOO *", "'FOO'"), ("*/0 * * * *", "step"), ("5-1 * * * *", "backwards"),
        ("61 * * * * *", "field 1 (second)"),
        ("@reboot", "macro"), ("0 0 30 2 *", "never fire"), ("1,,2 * * * *", "empty"),
    ])
    func errorsPointAtTheField(_ expr: String, _ mention: String) {
        #expect { try CronExpression(parsing: expr) } throws: { e in
            let v = try #require(e as? ValidationError)
            return v.field == "schedule" && v.hint.contains(mention)
        }
    }

    // MARK: daylight saving

    /// New York, 2026-03-08: 02:00 EST → 03:00 EDT. 02:30 does not exist: it fires once at 03:00 EDT (07:00Z).
    @Test func springForwardFiresOnceAtTheFirstInstantAfterTheGap() throws {
        #expect(
            try fires("30 2 * * *", tz: "America/New_York", from: "2026-03-07T12:00:00Z", count: 3)
                == ["2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z", "2026-03-10T06:30:00Z"])
        // Every minute of the 2 o'clock hour: all 60 collapse into one run at 03:00 EDT, then 03:00 is not repeated.
        #expect(
            try fires("* 2 * * *", tz: "America/New_York", from: "2026-03-08T06:58:00Z", count: 2)
                == ["2026-03-08T07:00:00Z", "2026-03-09T06:00:00Z"])
        // London, 2026-03-29: 01:00 GMT → 02:00 BST.
        #expect(
            try fires("15 1 * * *", tz: "Europe/London", from: "2026-03-28T12:00:00Z", count: 2)
                == ["2026-03-29T01:00:00Z", "2026-03-30T00:15:00Z"])
        // Lord Howe, 2026-10-04: 02:00 +10:30 → 02:30 +11 (a 30-minute gap).
        #expect(
            try fires("15 2 * * *", tz: "Australia/Lord_Howe", from: "2026-10-03T00:00:00Z", count: 2)
                == ["2026-10-03T15:30:00Z", "2026-10-04T15:15:00Z"])
    }

    /// New York, 2026-11-01: 02:00 EDT → 01:00 EST. 01:30 happens twice: it fires once, at the first (05:30Z).
    @Test func fallBackFiresOnceAtTheFirstOccurrence() throws {
        #expect(
            try fires("30 1 * * *", tz: "America/New_York", from: "2026-10-31T12:00:00Z", count: 2)
                == ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"])
        // Hourly through the fold: 01:00 EDT once, then 02:00 EST (the repeated 01:00 EST is skipped).
        #expect(
            try fires("0 * * * *", tz: "America/New_York", from: "2026-11-01T04:30:00Z", count: 3)
                == ["2026-11-01T05:00:00Z", "2026-11-01T07:00:00Z", "2026-11-01T08:00:00Z"])
        // Starting inside the second 01:xx: no run for the repeated wall times.
        #expect(
            try fires("45 1 * * *", tz: "America/New_York", from: "2026-11-01T06:10:00Z", count: 1) == [
                "2026-11-02T06:45:00Z"
            ])
        // London, 2026-10-25: 02:00 BST → 01:00 GMT.
        #expect(
            try fires("30 1 * * *", tz: "Europe/London", from: "2026-10-24T12:00:00Z", count: 2)
                == ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"])
        // Lord Howe, 2026-04-05: 02:00 +11 → 01:30 +10:30; 01:45 happens twice.
        #expect(
            try fires("45 1 * * *", tz: "Australia/Lord_Howe", from: "2026-04-04T00:00:00Z", count: 2)
                == ["2026-04-04T14:45:00Z", "2026-04-05T15:15:00Z"])
    }

    /// Property: against a brute-force reference that walks every minute, `next` is strictly
    /// increasing and never skips a matching instant, across both transitions in three zones.
    @Test(arguments: ["America/New_York", "Europe/London", "Australia/Lord_Howe"])
    func neverSkipsAMatchingInstant(_ tz: String) throws {
        let zone = LocalTime(TimeZone(identifier: tz)!)
        let exprs = [
            "*/7 * * * *", "30 1,2 * * *", "0,15,30,45 0-3 * * *", "* 2 * * *", "59 1 * * SUN", "0 0 1,15 * MON",
        ]
        let windows = [
            ("2026-03-06T00:00:00Z", "2026-04-08T00:00:00Z"), ("2026-09-30T00:00:00Z", "2026-11-04T00:00:00Z"),
        ]
        for expr in exprs {
            let cron = try CronExpression(parsing: expr)
            for (from, to) in windows {
                let start = Int64(at(from).timeIntervalSince1970)
                let end = Int64(at(to).timeIntervalSince1970)
                // Reference: the set of instants that fire, by the documented rules.
                var expected: [Int64] = []
                var u = start + 60
                while u <= end {
                    let off = zone.offset(u)
                    let wall = u + off
                    let prevOff = zone.offset(u - 60)
                    if prevOff < off {
                        // A gap ends at u: it fires if any skipped wall time, or u's own, matches.
                        if (wall - (off - prevOff)...wall).contains(where: { $0 % 60 == 0 && matches(cron, $0) }) {
                            expected.append(u)
                        }
                    } else if matches(cron, wall) {
                        // In a fold, only the first occurrence of a wall time fires.
                        let other = [zone.offset(u - 86_400), zone.offset(u + 86_400)].first { $0 > off }
                        let earlier = other.map { zone.offset(wall - $0) == $0 } ?? false
                        if !earlier { expected.append(u) }
                    }
                    u += 60
                }
                var got: [Int64] = []
                var t = Date(timeIntervalSince1970: Double(start))
                while let n = cron.next(after: t, in: zone.zone), n.timeIntervalSince1970 <= Double(end) {
                    #expect(n > t, "strictly increasing")
                    got.append(Int64(n.timeIntervalSince1970))
                    t = n
                }
                #expect(got == expected, "\(expr) in \(tz) from \(from)")
            }
        }
    }

    /// A wall time (local seconds) matches the expression's fields.
    private func matches(_ cron: CronExpression, _ wall: Int64) -> Bool {
        cron.nextMatch(fromLocal: wall) == wall
    }
}

@Suite struct SchedulePlanTests {
    let t0 = Date(timeIntervalSince1970: 1_800_000_000)

    @Test func parsesEveryForm() throws {
        #expect(try Schedule(parsing: "manual") == .manual)
        #expect(try Schedule(parsing: "every 1d") == .interval(seconds: 86_400))
        #expect(try Schedule(parsing: "@daily").text == "@daily")
        #expect(try Schedule(parsing: " 0  9 * * MON-FRI ").text == "0 9 * * MON-FRI")
        if case .cron = try Schedule(parsing: "0 0 9 * * *") {} else { Issue.record("six fields are cron") }
    }

    @Test func intervalsStayOnTheirGrid() {
        let s = Schedule.interval(seconds: 10)
        #expect(s.next(after: t0.addingTimeInterval(1), anchor: t0, timeZone: .gmt) == t0.addingTimeInterval(10))
        #expect(s.next(after: t0.addingTimeInterval(95), anchor: t0, timeZone: .gmt) == t0.addingTimeInterval(100))
        #expect(s.next(after: t0.addingTimeInterval(100), anchor: t0, timeZone: .gmt) == t0.addingTimeInterval(110))
    }

    /// 95 s down with an every-10s task: occurrences t0 … t0+90 are due (10 of them).
    @Test func misfirePolicies() {
        let s = Schedule.interval(seconds: 10)
        let now = t0.addingTimeInterval(95)
        let skip = s.plan(due: t0, anchor: t0, now: now, timeZone: .gmt, misfire: .skip, maxCatchup: 100, grace: 30)
        // within grace
        #expect(skip.fire == [t0.addingTimeInterval(70), t0.addingTimeInterval(80), t0.addingTimeInterval(90)])
        #expect(skip.skipped == 7)
        #expect(skip.next == t0.addingTimeInterval(100))
        let strict = s.plan(due: t0, anchor: t0, now: now, timeZone: .gmt, misfire: .skip, maxCatchup: 100, grace: 1)
        #expect(strict.fire.isEmpty && strict.skipped == 10 && strict.next == t0.addingTimeInterval(100))
        let once = s.plan(due: t0, anchor: t0, now: now, timeZone: .gmt, misfire: .once, maxCatchup: 100, grace: 1)
        #expect(once.fire == [t0.addingTimeInterval(90)] && once.skipped == 9)
        let all = s.plan(due: t0, anchor: t0, now: now, timeZone: .gmt, misfire: .all, maxCatchup: 4, grace: 1)
        #expect(all.fire == (6...9).map { t0.addingTimeInterval(Double($0) * 10) } && all.skipped == 6)
        // On time: one occurrence, whatever the policy.
        for p in MisfirePolicy.allCases {
            let plan = s.plan(
                due: t0, anchor: t0, now: t0.addingTimeInterval(0.3), timeZone: .gmt, misfire: p, maxCatchup: 10,
                grace: 1)
            #expect(plan == OccurrencePlan(fire: [t0], skipped: 0, next: t0.addingTimeInterval(10)))
        }
        // One-offs always run.
        #expect(
            Schedule.once.plan(due: t0, anchor: t0, now: now, timeZone: .gmt, misfire: .skip, maxCatchup: 1, grace: 1)
                .fire == [t0])
    }
}

@Suite struct PolicyTests {
    @Test func retryClassesAndBackoffBounds() throws {
        var p = try RetryPolicy(
            maxAttempts: 4,
            json: .object([
                "base_seconds": .number(2), "factor": .number(3), "cap_seconds": .number(10),
                "no_retry_on": .array([.string("exit:2")]),
            ]))
        #expect(p.shouldRetry(attempt: 1, state: .failed, exitCode: 1, errorClass: "exit_code"))
        #expect(!p.shouldRetry(attempt: 1, state: .failed, exitCode: 2, errorClass: "exit_code"))
        #expect(p.shouldRetry(attempt: 3, state: .timedOut, exitCode: nil, errorClass: "timeout"))
        #expect(!p.shouldRetry(attempt: 4, state: .timedOut, exitCode: nil, errorClass: "timeout"), "attempts used up")
        #expect(
            !p.shouldRetry(attempt: 1, state: .failed, exitCode: nil, errorClass: "unknown_executor"),
            "poison is never retried")
        #expect(!p.shouldRetry(attempt: 1, state: .cancelled, exitCode: nil, errorClass: nil))
        #expect([p.ceiling(afterAttempt: 1), p.ceiling(afterAttempt: 2), p.ceiling(afterAttempt: 3)] == [2, 6, 10])
        for _ in 0..<200 { #expect((0...6).contains(p.delay(afterAttempt: 2))) }
        p.jitter = false
        #expect(p.delay(afterAttempt: 2) == 6)
        let http = try RetryPolicy(
            maxAttempts: 3, json: .object(["retry_on": .array([.string("http:5xx"), .string("lost")])]))
        #expect(http.shouldRetry(attempt: 1, state: .failed, exitCode: nil, errorClass: "http_503"))
        #expect(!http.shouldRetry(attempt: 1, state: .failed, exitCode: nil, errorClass: "http_404"))
        #expect(!http.shouldRetry(attempt: 1, state: .timedOut, exitCode: nil, errorClass: "timeout"))
        #expect(http.shouldRetry(attempt: 1, state: .lost, exitCode: nil, errorClass: nil))
        // An expired run never started: retried by default, and its own class for retry_on.
        #expect(p.shouldRetry(attempt: 1, state: .expired, exitCode: nil, errorClass: nil))
        #expect(!http.shouldRetry(attempt: 1, state: .expired, exitCode: nil, errorClass: nil))
        let onlyExpired = try RetryPolicy(maxAttempts: 2, json: .object(["retry_on": .array([.string("expired")])]))
        #expect(onlyExpired.shouldRetry(attempt: 1, state: .expired, exitCode: nil, errorClass: nil))
        #expect(!onlyExpired.shouldRetry(attempt: 1, state: .lost, exitCode: nil, errorClass: nil))
    }

    @Test(arguments: [
        ("{\"factor\": 0.5}", "retry.factor"), ("{\"retry_on\": [\"sometimes\"]}", "retry.retry_on"),
        ("{\"backoff\": 1}", "retry.backoff"), ("{\"jitter\": \"yes\"}", "retry.jitter"), ("[]", "retry"),
    ])
    func retryPolicyErrorsNameTheKey(_ json: String, _ field: String) throws {
        let v = try JSONDecoder().decode(JSONValue.self, from: Data(json.utf8))
        #expect { try RetryPolicy(maxAttempts: 3, json: v) } throws: { e in (e as? ValidationError)?.field == field }
    }

    @Test func triggerRules() {
        #expect(TriggerRule.allSuccess.decide(final: [.succeeded], total: 2) == nil)
        #expect(TriggerRule.allSuccess.decide(final: [.succeeded, .succeeded], total: 2) == true)
        #expect(TriggerRule.allSuccess.decide(final: [.dead], total: 2) == false)
        #expect(TriggerRule.allDone.decide(final: [.dead, .succeeded], total: 2) == true)
        #expect(TriggerRule.oneFailed.decide(final: [.failed], total: 3) == true)
        #expect(TriggerRule.oneFailed.decide(final: [.succeeded, .succeeded], total: 2) == false)
    }
}
