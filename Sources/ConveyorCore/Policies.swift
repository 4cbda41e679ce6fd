import Foundation

/// Five priorities; under saturation higher ones start first (docs/architecture.md, "Priorities").
package enum Priority: Int, Sendable, CaseIterable, Codable {
    case critical = 0
    case high, normal, low, background

    package var name: String { String(describing: self) }

    package init(parsing text: String) throws(ValidationError) {
        guard
            let p = Self.allCases.first(where: { $0.name == text.lowercased() })
                ?? Int(text).flatMap(Self.init(rawValue:))
        else {
            throw ValidationError(
                field: "priority", value: text, hint: "one of critical, high, normal, low, background")
        }
        self = p
    }
}

/// A setting chosen by name (`misfire: skip`): parsed case-insensitively, with an error that
/// lists the choices.
package protocol NamedChoice: RawRepresentable<String>, CaseIterable {
    /// The field name in errors.
    static var field: String { get }
}

extension NamedChoice {
    package init(parsing text: String) throws(ValidationError) {
        guard let v = Self(rawValue: text.lowercased()) else {
            throw ValidationError(
                field: Self.field, value: text, hint: "one of \(Self.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        self = v
    }
}

/// What happens to occurrences missed while dispatchers were down or the task was paused.
package enum MisfirePolicy: String, Sendable, CaseIterable, NamedChoice {
    /// Run none of them; only the next future occurrence.
    case skip
    /// One catch-up run now (the default).
    case once
    /// Every missed occurrence, at most `max_catchup`.
    case all

    package static let field = "misfire"
}

/// What happens when an occurrence comes due while an earlier run of the task is still active.
package enum OverlapPolicy: String, Sendable, CaseIterable, NamedChoice {
    /// Run both.
    case allow
    /// Skip the new occurrence.
    case forbid
    /// Cancel the active run and start the new one.
    case replace
    /// Keep at most one waiting; it starts when the active run ends.
    case queue

    package static let field = "overlap"
}

/// When a dependent task runs, given its upstreams' final states in one workflow run.
package enum TriggerRule: String, Sendable, CaseIterable, NamedChoice {
    case allSuccess = "all_success"
    case allDone = "all_done"
    case oneFailed = "one_failed"

    package static let field = "trigger_rule"

    /// The decision once enough upstream states are known: `true` run, `false` skip, `nil` wait.
    /// `states` holds the final state of each upstream that has finished; `total` upstreams in all.
    package func decide(final states: [RunState], total: Int) -> Bool? {
        let failed = states.contains { $0 != .succeeded }
        switch self {
        case .allSuccess:
            if failed { return false }
            return states.count == total ? true : nil
        case .allDone:
            return states.count == total ? true : nil
        case .oneFailed:
            if failed { return true }
            return states.count == total ? false : nil
        }
    }
}

/// Retries of one occurrence: how many attempts, how long between them, and for which outcomes.
///
/// Stored as the task's `max_attempts` plus a JSON object
/// `{"base_seconds", "factor", "cap_seconds", "jitter", "retry_on", "no_retry_on"}`.
package struct RetryPolicy: Sendable, Hashable {
    /// Attempts in all, including the first. 1 means no retries.
    package var maxAttempts = 1
    package var baseSeconds = 1.0
    package var factor = 2.0
    package var capSeconds = 300.0
    /// Full jitter: the delay is uniform in `0 ... min(cap, base × factor^(n−1))`.
    package var jitter = true
    /// Outcome classes that are retried; empty means `timeout`, `lost`, `expired` and `error`.
    package var retryOn: [String] = []
    /// Outcome classes never retried; wins over `retryOn`.
    package var noRetryOn: [String] = []

    package init() {}

    /// The classes a run's end belongs to: `timeout`, `lost`, `expired`, `error` (any failure), `exit:<code>`,
    /// `http:<code>` and `http:<d>xx` (from an error class `http_<code>`), `class:<error class>`.
    package static func classes(state: RunState, exitCode: Int?, errorClass: String?) -> Set<String> {
        var out: Set<String> = []
        switch state {
        case .timedOut: out.insert("timeout")
        case .lost: out.insert("lost")
        case .expired: out.insert("expired")
        case .failed: out.insert("error")
        default: break
        }
        if let e = exitCode { out.insert("exit:\(e)") }
        if let c = errorClass {
            out.insert("class:\(c)")
            if c.hasPrefix("http_"), let code = Int(c.dropFirst(5)) {
                out.insert("http:\(code)")
                out.insert("http:\(code / 100)xx")
            }
        }
        return out
    }

    /// Error classes that mean the message itself is bad: retrying cannot help.
    package static let poisonClasses: Set<String> = ["malformed_message", "unknown_executor"]

    /// Error classes of failures that retrying cannot fix, not retried unless `retry_on` names them.
    package static let notRetriedByDefault: Set<String> = [
        "http_refused", "http_invalid_url", "bad_parameters", "command_not_allowed", "argument_blocked",
        "cwd_not_allowed", "invalid_result",
    ]

    /// Whether an attempt that ended in `state` is retried.
    package func shouldRetry(attempt: Int, state: RunState, exitCode: Int?, errorClass: String?) -> Bool {
        attempt < maxAttempts && isRetryable(state: state, exitCode: exitCode, errorClass: errorClass)
    }

    /// Whether the policy retries this kind of ending at all (attempts aside). A retryable ending
    /// whose attempts are used up makes the run `dead`; any other failure stays as it ended.
    package func isRetryable(state: RunState, exitCode: Int?, errorClass: String?) -> Bool {
        guard maxAttempts > 1, RunState.retryableEndings.contains(state) else { return false }
        if let c = errorClass, Self.poisonClasses.contains(c) { return false }
        let classes = Self.classes(state: state, exitCode: exitCode, errorClass: errorClass)
        if !classes.isDisjoint(with: noRetryOn) { return false }
        guard retryOn.isEmpty else { return !classes.isDisjoint(with: retryOn) }
        // The default: timeouts, lost runs and errors, except what retrying cannot fix: an HTTP
        // 4xx other than 408 and 429, and a URL the outbound guard refuses or cannot parse.
        if classes.contains("http:4xx") && !classes.contains("http:408") && !classes.contains("http:429") {
            return false
        }
        if let c = errorClass, Self.notRetriedByDefault.contains(c) { return false }
        return !classes.isDisjoint(with: ["timeout", "lost", "expired", "error"])
    }

    /// The ceiling of the delay before attempt `attempt + 1`.
    package func ceiling(afterAttempt attempt: Int) -> Double {
        min(capSeconds, baseSeconds * pow(factor, Double(max(attempt - 1, 0))))
    }

    /// The delay before attempt `attempt + 1`, in seconds: at most `maxDelaySeconds`, whatever
    /// was stored (a policy from before the bound may hold 1e300, which the database's interval
    /// arithmetic refuses, and the outcome that asked for the retry would not be recorded).
    package func delay(afterAttempt attempt: Int) -> Double {
        var c = ceiling(afterAttempt: attempt)
        if !(c >= 0) { c = 0 }
        c = min(c, Self.maxDelaySeconds)
        return jitter ? Double.random(in: 0...c) : c
    }

    /// The longest delay between attempts, and the largest `base_seconds` and `cap_seconds` a
    /// task may set: 365 days.
    package static let maxDelaySeconds: Double = 31_536_000
    /// What `base_seconds` and `cap_seconds` take.
    package static let secondsHint = "a number of seconds from 0 to 31536000 (365 days)"

    /// Parses the stored JSON object and attempts; every key is optional.
    package init(maxAttempts: Int, json: JSONValue) throws(ValidationError) {
        self.maxAttempts = maxAttempts
        guard maxAttempts >= 1, maxAttempts <= 1000 else {
            throw ValidationError(
                field: "retry.max_attempts", value: String(maxAttempts),
                hint: "a whole number from 1 (no retries) to 1000")
        }
        guard let o = json.objectValue else {
            throw ValidationError(
                field: "retry", value: "\(json)", hint: "a JSON object such as {\"base_seconds\": 1, \"factor\": 2}")
        }
        let known: Set<String> = [
            "base_seconds", "factor", "cap_seconds", "jitter", "retry_on", "no_retry_on", "max_attempts",
        ]
        if let unknown = o.keys.first(where: { !known.contains($0) }) {
            throw ValidationError(
                field: "retry.\(unknown)", value: "\(o[unknown]!)",
                hint: "unknown key; use \(known.sorted().joined(separator: ", "))")
        }
        func number(_ k: String, _ d: Double, _ ok: (Double) -> Bool, _ hint: String) throws(ValidationError) -> Double
        {
            guard let v = o[k] else { return d }
            guard let n = v.doubleValue, n.isFinite, ok(n) else {
                throw ValidationError(field: "retry.\(k)", value: "\(v)", hint: hint)
            }
            return n
        }
        baseSeconds = try number("base_seconds", 1, { $0 >= 0 }, Self.secondsHint)
        factor = try number("factor", 2, { $0 >= 1 }, "a number of at least 1 (1 = constant delay)")
        capSeconds = try number("cap_seconds", 300, { $0 >= 0 }, Self.secondsHint)
        if let j = o["jitter"] {
            guard case .bool(let b) = j else {
                throw ValidationError(field: "retry.jitter", value: "\(j)", hint: "true or false")
            }
            jitter = b
        }
        func classes(_ k: String) throws(ValidationError) -> [String] {
            guard let v = o[k] else { return [] }
            guard let a = v.arrayValue else {
                throw ValidationError(
                    field: "retry.\(k)", value: "\(v)", hint: "a list such as [\"timeout\", \"exit:75\", \"http:5xx\"]")
            }
            var out: [String] = []
            for item in a {
                guard let s = item.stringValue, Self.isClass(s) else {
                    throw ValidationError(
                        field: "retry.\(k)", value: "\(item)",
                        hint:
                            """
                            outcome classes are timeout, lost, expired, error, exit:<code>, http:<code>, http:<d>xx, \
                            class:<error class>
                            """
                    )
                }
                out.append(s)
            }
            return out
        }
        retryOn = try classes("retry_on")
        noRetryOn = try classes("no_retry_on")
    }

    static func isClass(_ s: String) -> Bool {
        if ["timeout", "lost", "expired", "error"].contains(s) { return true }
        if s.hasPrefix("exit:") { return Int(s.dropFirst(5)) != nil }
        if s.hasPrefix("class:") { return s.count > 6 }
        if s.hasPrefix("http:") {
            let rest = s.dropFirst(5)
            return Int(rest).map { (100...599).contains($0) }
                ?? (rest.count == 3 && rest.hasSuffix("xx") && "12345".contains(rest.first!))
        }
        return false
    }

    /// The stored JSON object (without `max_attempts`, which has its own column).
    package var json: JSONValue {
        .object([
            "base_seconds": .number(baseSeconds), "factor": .number(factor), "cap_seconds": .number(capSeconds),
            "jitter": .bool(jitter), "retry_on": .array(retryOn.map(JSONValue.string)),
            "no_retry_on": .array(noRetryOn.map(JSONValue.string)),
        ])
    }
}

/// The rule for work queue names, wherever one comes from (a task, a worker's configuration, a
/// worker's heartbeat): letters, digits, '-', '_' and '.'.
package enum QueueName {
    package static let hint = "letters, digits, '-', '_' and '.' only"

    package static func isValid(_ name: String) -> Bool {
        !name.isEmpty && name.allSatisfy { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." }
    }
}
