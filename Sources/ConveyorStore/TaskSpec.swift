package import ConveyorCore
package import Foundation

/// A task definition as people write it (a YAML task file, CLI flags, later API bodies),
/// decoded into a `NewTask` with errors that name the field path, the value and the fix.
///
/// ```yaml
/// name: nightly-report            # required
/// executor: shell                 # required
/// parameters: {argv: [/usr/bin/env, echo, hi]}
/// schedule: "30 2 * * *"          # cron, 'every 30s', 'once', 'manual'
/// timezone: Europe/London         # cron's zone, default UTC
/// start: 2026-12-01T00:00:00Z     # or after: 10m  (first due time)
/// misfire: once                   # skip | once | all
/// max_catchup: 10
/// queue: reports
/// priority: high                  # critical | high | normal | low | background
/// timeout: 600                    # seconds
/// schedule_to_start_timeout: 3600  # seconds a published run may wait for a worker
/// retry: {max_attempts: 3, base_seconds: 5, factor: 2, cap_seconds: 300, jitter: true, retry_on: [timeout, "exit:75"]}
/// overlap: forbid                 # allow | forbid | replace | queue
/// concurrency: {key: "customer:42", limit: 2}
/// group: reports
/// labels: {team: data}
/// depends_on: [extract]           # then schedule must be 'manual'
/// trigger_rule: all_success       # all_success | all_done | one_failed
/// callback_url: https://example.com/hooks/conveyor
/// unique: {key: "invoice:42", scope: active}   # or {key: …, scope: window, window: 1h}
/// paused: false
/// ```
package enum TaskSpec {
    package static let keys: Set<String> = [
        "name", "namespace", "executor", "parameters", "schedule", "timezone", "start", "after", "misfire",
        "max_catchup", "queue",
        "priority", "timeout", "schedule_to_start_timeout", "retry", "overlap", "concurrency", "group", "labels",
        "depends_on", "trigger_rule",
        "callback_url", "paused", "unique",
    ]

    /// Decodes one task. `path` prefixes field names in errors (for example `tasks[3]`).
    package static func decode(_ value: JSONValue, path: String = "", now: Date = Date()) throws(ValidationError)
        -> NewTask
    {
        func field(_ k: String) -> String { path.isEmpty ? k : "\(path).\(k)" }
        guard let o = value.objectValue else {
            throw ValidationError(
                field: path.isEmpty ? "task" : path, value: "\(value)",
                hint: "a task is a mapping with at least name and executor")
        }
        if let unknown = o.keys.sorted().first(where: { !keys.contains($0) }) {
            throw ValidationError(
                field: field(unknown), value: "\(o[unknown]!)",
                hint: "unknown field; known fields are \(keys.sorted().joined(separator: ", "))")
        }
        func string(_ k: String) throws(ValidationError) -> String? {
            guard let v = o[k], v != .null else { return nil }
            switch v {
            case .string(let s): return s
            // Whole numbers as integers (`5`, not `5.0`); beyond Int's range (1e300) as written.
            case .number(let n): return n.rounded() == n && abs(n) < 1e15 ? String(Int(n)) : String(n)
            case .bool(let b): return String(b)
            default: throw ValidationError(field: field(k), value: "\(v)", hint: "a single value (text)")
            }
        }
        func number(_ k: String) throws(ValidationError) -> Double? {
            guard let v = o[k], v != .null else { return nil }
            if let n = v.doubleValue { return n }
            if let s = v.stringValue, let n = Double(s) { return n }
            throw ValidationError(field: field(k), value: "\(v)", hint: "a number")
        }
        func wholeNumber(_ k: String) throws(ValidationError) -> Int? {
            guard let n = try number(k) else { return nil }
            guard n.rounded() == n, abs(n) < 1e9 else {
                throw ValidationError(field: field(k), value: "\(n)", hint: "a whole number")
            }
            return Int(n)
        }
        func parsed<T>(_ k: String, _ parse: (String) throws(ValidationError) -> T) throws(ValidationError) -> T? {
            guard let s = try string(k) else { return nil }
            do { return try parse(s) } catch {
                throw ValidationError(field: field(k), value: error.value, hint: error.hint)
            }
        }
        guard let name = try string("name") else {
            throw ValidationError(field: field("name"), value: "(missing)", hint: "every task needs a unique name")
        }
        guard let executor = try string("executor") else {
            throw ValidationError(
                field: field("executor"), value: "(missing)",
                hint: "name an executor your workers offer, e.g. noop, sleep, shell")
        }
        let dependsOn: [String]
        switch o["depends_on"] {
        case nil, .null?: dependsOn = []
        case .string(let s)?: dependsOn = [s]
        case .array(let a)?:
            var names: [String] = []
            for item in a {
                guard let s = item.stringValue else {
                    throw ValidationError(field: field("depends_on"), value: "\(item)", hint: "a list of task names")
                }
                names.append(s)
            }
            dependsOn = names
        case let v?: throw ValidationError(field: field("depends_on"), value: "\(v)", hint: "a list of task names")
        }
        let schedule =
            try parsed("schedule") { s throws(ValidationError) in try Schedule(parsing: s) }
            ?? (dependsOn.isEmpty ? .once : .manual)
        var t = NewTask(name: name, executor: executor, schedule: schedule)
        t.dependsOn = dependsOn
        if let ns = try string("namespace") { t.namespace = ns }
        if let p = o["parameters"], p != .null {
            guard p.objectValue != nil else {
                throw ValidationError(
                    field: field("parameters"), value: "\(p)", hint: "a mapping, e.g. {argv: [/bin/echo, hi]}")
            }
            t.parameters = p
        }
        if let tz = try string("timezone") { t.timeZone = tz }
        if let m = try parsed("misfire", { s throws(ValidationError) in try MisfirePolicy(parsing: s) }) {
            t.misfire = m
        }
        if let n = try wholeNumber("max_catchup") { t.maxCatchup = n }
        if let q = try string("queue") { t.queue = q }
        if let p = try parsed("priority", { s throws(ValidationError) in try Priority(parsing: s) }) { t.priority = p }
        if let n = try number("timeout") { t.timeoutSeconds = n }
        if let n = try number("schedule_to_start_timeout") { t.scheduleToStartSeconds = n }
        if let r = o["retry"], r != .null {
            guard var ro = r.objectValue else {
                throw ValidationError(field: field("retry"), value: "\(r)", hint: "a mapping such as {max_attempts: 3}")
            }
            var attempts = 3
            if let a = ro.removeValue(forKey: "max_attempts") {
                guard let n = a.doubleValue, n.rounded() == n, abs(n) < 1e9 else {
                    throw ValidationError(
                        field: field("retry.max_attempts"), value: "\(a)",
                        hint: "a whole number from 1 (no retries) to 1000")
                }
                attempts = Int(n)
            }
            do { t.retry = try RetryPolicy(maxAttempts: attempts, json: .object(ro)) } catch {
                throw ValidationError(field: field(error.field), value: error.value, hint: error.hint)
            }
        }
        if let p = try parsed("overlap", { s throws(ValidationError) in try OverlapPolicy(parsing: s) }) {
            t.overlap = p
        }
        if let c = o["concurrency"], c != .null {
            guard let co = c.objectValue, let key = co["key"]?.stringValue, let limit = co["limit"]?.doubleValue,
                limit.rounded() == limit, abs(limit) < 1e9,
                co.count == 2
            else {
                throw ValidationError(
                    field: field("concurrency"), value: "\(c)", hint: "a mapping {key: \"customer:42\", limit: 2}")
            }
            t.concurrencyKey = key
            t.concurrencyLimit = Int(limit)
        }
        t.group = try string("group")
        if let l = o["labels"], l != .null {
            guard let lo = l.objectValue else {
                throw ValidationError(field: field("labels"), value: "\(l)", hint: "a mapping of text to text")
            }
            for (k, v) in lo {
                guard let s = v.stringValue ?? v.doubleValue.map({ String($0) }) else {
                    throw ValidationError(field: field("labels.\(k)"), value: "\(v)", hint: "label values are text")
                }
                t.labels[k] = s
            }
        }
        if let r = try parsed("trigger_rule", { s throws(ValidationError) in try TriggerRule(parsing: s) }) {
            t.triggerRule = r
        }
        t.callbackURL = try string("callback_url")
        if let u = o["unique"], u != .null {
            let hint =
                #"a mapping {key: "invoice:42"} (scope active, the default) or {key: …, scope: window, window: 1h}"#
            guard let uo = u.objectValue, let key = uo["key"]?.stringValue,
                Set(uo.keys).isSubset(of: ["key", "scope", "window"])
            else {
                throw ValidationError(field: field("unique"), value: "\(u)", hint: hint)
            }
            t.uniqueKey = key
            let window: Double?
            switch uo["window"] {
            case nil, .null?: window = nil
            case .number(let n)?: window = n
            case .string(let s)?: window = try Schedule.duration(s, field: field("unique.window"))
            case let v?: throw ValidationError(field: field("unique.window"), value: "\(v)", hint: hint)
            }
            switch uo["scope"]?.stringValue ?? (window == nil ? "active" : "window") {
            case "active":
                guard window == nil else {
                    throw ValidationError(
                        field: field("unique.window"), value: "\(uo["window"]!)",
                        hint: "a window goes with scope window; scope active holds the key while the task is active")
                }
            case "window":
                guard let window else {
                    throw ValidationError(
                        field: field("unique.window"), value: "(missing)",
                        hint: "scope window needs a window: how long after creation the key is held, e.g. 1h")
                }
                t.uniqueWindowSeconds = window
            default:
                throw ValidationError(
                    field: field("unique.scope"), value: "\(uo["scope"]!)",
                    hint: "active (while the task is active) or window (for a time after creation)")
            }
        }
        if let p = o["paused"], p != .null {
            guard case .bool(let b) = p else {
                throw ValidationError(field: field("paused"), value: "\(p)", hint: "true or false")
            }
            t.paused = b
        }
        if let s = try string("start") {
            guard let d = Timestamp.parse(s) else {
                throw ValidationError(
                    field: field("start"), value: s, hint: "an ISO-8601 instant such as 2026-11-23T12:00:00Z")
            }
            t.startAt = d
        }
        if let a = try string("after") {
            guard t.startAt == nil else {
                throw ValidationError(field: field("after"), value: a, hint: "give start or after, not both")
            }
            t.startAt = now.addingTimeInterval(try Schedule.duration(a, field: field("after")))
        }
        do { try t.validate() } catch {
            throw ValidationError(field: field(error.field), value: error.value, hint: error.hint)
        }
        return t
    }

    /// The definition as stored in `tasks.spec`: every field `decode` reads, less `start` and
    /// `after` (they only place the first occurrence) and `paused` (a state kept in its own
    /// column). Decoding it gives the same task back, which is what PATCH builds on: merge the
    /// patch into this, decode, store.
    package static func encode(_ t: NewTask) -> JSONValue {
        var o: [String: JSONValue] = [
            "name": .string(t.name), "executor": .string(t.executor), "parameters": t.parameters,
            "schedule": .string(t.schedule.text),
            "timezone": .string(t.timeZone), "misfire": .string(t.misfire.rawValue),
            "max_catchup": .number(Double(t.maxCatchup)),
            "queue": .string(t.queue), "priority": .string(t.priority.name), "timeout": .number(t.timeoutSeconds),
            "schedule_to_start_timeout": .number(t.scheduleToStartSeconds),
            "overlap": .string(t.overlap.rawValue), "trigger_rule": .string(t.triggerRule.rawValue),
            "labels": .object(t.labels.mapValues(JSONValue.string)),
        ]
        var retry = t.retry.json.objectValue ?? [:]
        retry["max_attempts"] = .number(Double(t.retry.maxAttempts))
        o["retry"] = .object(retry)
        if let k = t.concurrencyKey, let n = t.concurrencyLimit {
            o["concurrency"] = .object(["key": .string(k), "limit": .number(Double(n))])
        }
        if let g = t.group { o["group"] = .string(g) }
        if !t.dependsOn.isEmpty { o["depends_on"] = .array(t.dependsOn.map(JSONValue.string)) }
        if let u = t.callbackURL { o["callback_url"] = .string(u) }
        if let k = t.uniqueKey {
            o["unique"] =
                t.uniqueWindowSeconds.map { .object(["key": .string(k), "scope": "window", "window": .number($0)]) }
                ?? .object(["key": .string(k), "scope": "active"])
        }
        return .object(o)
    }

    /// RFC 7396 JSON merge patch: an absent field is unchanged, `null` removes (so the default
    /// applies), an object merges into an object, anything else replaces.
    package static func merge(_ patch: JSONValue, into target: JSONValue) -> JSONValue {
        guard let p = patch.objectValue else { return patch }
        var out = target.objectValue ?? [:]
        for (k, v) in p {
            if v == .null { out.removeValue(forKey: k) } else { out[k] = merge(v, into: out[k] ?? .null) }
        }
        return .object(out)
    }

    /// Decodes a task file: a list of tasks, or a mapping with a `tasks` list, or one task.
    package static func decodeFile(_ value: JSONValue, now: Date = Date()) throws(ValidationError) -> [NewTask] {
        if let list = value.taskBatch {
            var out: [NewTask] = []
            for (i, v) in list.enumerated() { out.append(try decode(v, path: "tasks[\(i)]", now: now)) }
            var seen: Set<String> = []
            for t in out where !seen.insert(t.name).inserted {
                throw ValidationError(field: "tasks", value: t.name, hint: "two tasks in the list have this name")
            }
            return out
        }
        return [try decode(value, now: now)]
    }
}
