package import ConveyorCore
package import Foundation

/// A task to create.
package struct NewTask: Sendable {
    package var id = UUID()
    package var namespace = "default"
    package var name: String
    package var executor: String
    package var parameters: JSONValue = .object([:])
    package var schedule: Schedule
    /// IANA time zone of a cron schedule.
    package var timeZone = "UTC"
    package var misfire: MisfirePolicy = .once
    /// Most missed occurrences run by misfire policy `all` (and per catch-up otherwise).
    package var maxCatchup = 10
    package var queue = "default"
    package var priority: Priority = .normal
    package var timeoutSeconds: Double = 300
    /// How long a published run may wait for a worker to start it; past it (plus the
    /// dispatcher's lost grace) the run ends `expired` and is retried by policy.
    package var scheduleToStartSeconds: Double = NewTask.defaultScheduleToStartSeconds
    package var retry = RetryPolicy()
    package var overlap: OverlapPolicy = .allow
    /// At most `concurrencyLimit` runs in flight per key, across dispatchers.
    package var concurrencyKey: String?
    package var concurrencyLimit: Int?
    package var group: String?
    package var labels: [String: String] = [:]
    /// Names of upstream tasks (same namespace); a dependent runs per `triggerRule`.
    package var dependsOn: [String] = []
    package var triggerRule: TriggerRule = .allSuccess
    /// Notified with a POST of the outcome (succeeded, failed, dead).
    package var callbackURL: String?
    package var paused = false
    /// First due time; `nil` means now (the database clock), or for cron the first fire after now.
    package var startAt: Date?
    /// The context of the request that created the task: the parent of its first dispatch span.
    package var traceParent: String?
    /// That request's W3C `baggage`, carried by the first occurrence's messages.
    package var traceBaggage: String?
    /// Shared by the tasks of one API batch (`X-Batch-ID`).
    package var batchID: UUID?
    /// A uniqueness key: while another task of the namespace holds it, this one is not created
    /// (`Store.createTasks` answers the holder). Held while the holder is active, or for
    /// `uniqueWindowSeconds` after it was created when that is set.
    package var uniqueKey: String?
    package var uniqueWindowSeconds: Double?

    package init(name: String, executor: String, schedule: Schedule) {
        self.name = name
        self.executor = executor
        self.schedule = schedule
    }

    /// The default schedule-to-start timeout: an hour, far above any healthy broker backlog of
    /// short tasks (docs/reliability.md, "Runs that never start", says how to choose one).
    package static let defaultScheduleToStartSeconds: Double = 3600
    /// The longest schedule-to-start timeout: a week (the database refuses more).
    package static let maxScheduleToStartSeconds: Double = 604_800

    /// The longest uniqueness window: 30 days.
    package static let maxUniqueWindowSeconds: Double = 30 * 86_400

    /// Largest `parameters` (encoded JSON): they are copied into every run's message.
    package static let maxParameterBytes = 64 * 1024

    /// Checks the fields a database constraint would otherwise reject with a less helpful message.
    package func validate() throws(ValidationError) {
        guard !name.isEmpty, name.count <= 200, name.allSatisfy({ !$0.isWhitespace && !$0.isNewline }) else {
            throw ValidationError(field: "name", value: name, hint: "1 to 200 characters, no spaces")
        }
        guard !executor.isEmpty, executor.count <= 100,
            executor.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) })
        else {
            throw ValidationError(
                field: "executor", value: executor,
                hint:
                    """
                    name an executor that your workers offer, e.g. 'noop' (letters, digits, '-', '_', '.'; at most \
                    100)
                    """
            )
        }
        let parameterBytes = MessageCodec.encode(parameters).count
        guard parameterBytes <= Self.maxParameterBytes else {
            throw ValidationError(
                field: "parameters", value: "\(parameterBytes) bytes",
                hint:
                    """
                    at most \(Self.maxParameterBytes) bytes of JSON travel in each task message; store large inputs \
                    elsewhere and pass a reference
                    """
            )
        }
        guard QueueName.isValid(queue) else {
            throw ValidationError(field: "queue", value: queue, hint: QueueName.hint)
        }
        for (key, seconds) in [("base_seconds", retry.baseSeconds), ("cap_seconds", retry.capSeconds)]
        where !(seconds <= RetryPolicy.maxDelaySeconds) {
            throw ValidationError(field: "retry.\(key)", value: String(seconds), hint: RetryPolicy.secondsHint)
        }
        guard timeoutSeconds > 0, timeoutSeconds <= TaskMessage.maxTimeoutSeconds else {
            throw ValidationError(
                field: "timeout", value: String(timeoutSeconds),
                hint: "a positive number of seconds, at most \(Int(TaskMessage.maxTimeoutSeconds)) (365 days)")
        }
        guard scheduleToStartSeconds > 0, scheduleToStartSeconds <= Self.maxScheduleToStartSeconds else {
            throw ValidationError(
                field: "schedule_to_start_timeout", value: String(scheduleToStartSeconds),
                hint:
                    """
                    seconds a published run may wait for a worker to start it: above 0, at most \
                    \(Int(Self.maxScheduleToStartSeconds)) (a week); default \(Int(Self.defaultScheduleToStartSeconds))
                    """)
        }
        guard TimeZone(identifier: timeZone) != nil else {
            throw ValidationError(
                field: "timezone", value: timeZone,
                hint: "an IANA time zone such as UTC, Europe/London or America/New_York")
        }
        guard (1...10_000).contains(maxCatchup) else {
            throw ValidationError(
                field: "max_catchup", value: String(maxCatchup), hint: "a whole number from 1 to 10000")
        }
        if concurrencyKey != nil || concurrencyLimit != nil {
            guard let k = concurrencyKey, !k.isEmpty, k.count <= 200 else {
                throw ValidationError(
                    field: "concurrency_key", value: concurrencyKey ?? "",
                    hint: "1 to 200 characters, given together with concurrency_limit")
            }
            guard let n = concurrencyLimit, n >= 1 else {
                throw ValidationError(
                    field: "concurrency_limit", value: concurrencyLimit.map(String.init) ?? "(missing)",
                    hint: "a whole number of at least 1, given together with concurrency_key '\(k)'")
            }
        }
        if let k = uniqueKey, k.isEmpty || k.count > 200 {
            throw ValidationError(field: "unique.key", value: k, hint: "1 to 200 characters")
        }
        if let w = uniqueWindowSeconds, !(1...Self.maxUniqueWindowSeconds).contains(w) {
            throw ValidationError(
                field: "unique.window", value: String(w),
                hint: "seconds (or 30s, 10m, 1h, 7d) from 1 s to 30 days")
        }
        if let g = group, g.isEmpty || g.count > 200 {
            throw ValidationError(field: "group", value: g, hint: "1 to 200 characters")
        }
        if let u = callbackURL {
            guard let url = URL(string: u), ["http", "https"].contains(url.scheme?.lowercased() ?? ""), url.host != nil
            else {
                throw ValidationError(field: "callback_url", value: u, hint: "an absolute http or https URL")
            }
        }
        if !dependsOn.isEmpty {
            if dependsOn.contains(name) {
                throw ValidationError(field: "depends_on", value: name, hint: "a task cannot depend on itself")
            }
            if Set(dependsOn).count != dependsOn.count {
                let dup = dependsOn.first { d in dependsOn.filter { $0 == d }.count > 1 }!
                throw ValidationError(field: "depends_on", value: dup, hint: "listed twice; name each upstream once")
            }
            if case .manual = schedule {
            } else {
                throw ValidationError(
                    field: "schedule", value: schedule.text,
                    hint: "a task with depends_on runs when its upstreams end; give it schedule 'manual'")
            }
        }
    }
}
