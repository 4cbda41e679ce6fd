package import ConveyorCore
import ConveyorPostgres
package import Foundation

/// A task as stored.
package struct TaskRecord: Sendable {
    package var id: UUID
    package var name: String
    package var executor: String
    package var parameters: String
    package var schedule: String
    package var queue: String
    package var timeoutSeconds: Double
    package var scheduleToStartSeconds: Double = 3600
    package var paused: Bool
    package var nextRunAt: Date?
    /// The id the task's next run will have (its run handle).
    package var nextRunID: UUID?
    package var timeZone: String
    package var misfire: String
    package var priority: Priority
    package var overlap: String
    package var maxAttempts: Int
    package var retryPolicy: String
    package var group: String?
    package var concurrencyKey: String?
    package var concurrencyLimit: Int?
    package var skippedOccurrences: Int
    package var dependsOn: [String]
    package var triggerRule: String
    package var callbackURL: String?
    package var namespace = "default"
    package var labels: [String: String] = [:]
    package var batchID: UUID?
    /// The definition as submitted (`TaskSpec.encode`), which PATCH merges into.
    package var spec = "{}"
    package var createdAt: Date?
    package var updatedAt: Date?
}

/// A run as stored.
package struct RunRecord: Sendable {
    package var id: UUID
    package var taskID: UUID
    package var occurrence: Date
    package var attempt: Int
    package var state: RunState
    package var workerID: String?
    package var exitCode: Int?
    package var output: String?
    package var errorClass: String?
    package var errorMessage: String?
    package var traceID: String?
    package var traceparent: String?
    package var publishCount: Int
    package var dispatchedAt: Date?
    package var startedAt: Date?
    package var finishedAt: Date?
    package var reason: String?
    package var priority: Priority
    package var workflowRunID: UUID?
    package var availableAt: Date?
    /// The structured result its executor returned (JSON text), if any.
    package var result: String?
}

extension Store {
    /// The columns `task(_:)` reads, in select-list order (the tasks table as `t`).
    enum TaskColumn: Int, RowColumn {
        case id, name, executor, parameters, schedule, queue, timeoutSeconds, paused, nextRunAt, timezone, misfire
        case priority, overlap, maxAttempts, retryPolicy, group, concurrencyKey, concurrencyLimit, skippedOccurrences
        case triggerRule, callbackURL, dependsOn, namespace, labels, batchID, spec, createdAt, updatedAt
        case scheduleToStart, nextRunID

        func sql(alias t: String) -> String {
            switch self {
            case .id: "\(t)id"
            case .name: "\(t)name"
            case .executor: "\(t)executor"
            case .parameters: "\(t)parameters::text"
            case .schedule: "\(t)schedule"
            case .queue: "\(t)queue"
            case .timeoutSeconds: "\(t)timeout_seconds"
            case .paused: "\(t)paused"
            case .nextRunAt: "\(t)next_run_at"
            case .timezone: "\(t)timezone"
            case .misfire: "\(t)misfire_policy"
            case .priority: "\(t)priority"
            case .overlap: "\(t)overlap_policy"
            case .maxAttempts: "\(t)max_attempts"
            case .retryPolicy: "\(t)retry_policy::text"
            case .group: "\(t)group_name"
            case .concurrencyKey: "\(t)concurrency_key"
            case .concurrencyLimit: "\(t)concurrency_limit"
            case .skippedOccurrences: "\(t)skipped_occurrences"
            case .triggerRule: "\(t)trigger_rule"
            case .callbackURL: "\(t)callback_url"
            // The names of the tasks it depends on, as a text array.
            case .dependsOn:
                """
                coalesce((SELECT array_agg(u.name ORDER BY u.name) FROM task_dependencies d JOIN tasks u ON \
                u.id = d.upstream_id WHERE d.task_id = \(t)id), '{}')::text
                """
            case .namespace: "\(t)namespace"
            case .labels: "\(t)labels::text"
            case .batchID: "\(t)batch_id"
            case .spec: "coalesce(\(t)spec, '{}'::jsonb)::text"
            case .createdAt: "\(t)created_at"
            case .updatedAt: "\(t)updated_at"
            case .scheduleToStart: "\(t)schedule_to_start_seconds"
            case .nextRunID: "\(t)next_run_id"
            }
        }
    }

    static let taskColumns = TaskColumn.selectList(alias: "t.")

    static func task(_ r: PostgresRow) throws -> TaskRecord {
        typealias C = TaskColumn
        return TaskRecord(
            id: try r.uuid(C.id), name: try r.string(C.name), executor: try r.string(C.executor),
            parameters: try r.string(C.parameters), schedule: try r.string(C.schedule), queue: try r.string(C.queue),
            timeoutSeconds: try r.double(C.timeoutSeconds), scheduleToStartSeconds: try r.double(C.scheduleToStart),
            paused: try r.bool(C.paused),
            nextRunAt: try r.optionalDate(C.nextRunAt), nextRunID: r[C.nextRunID].flatMap(UUID.init(uuidString:)),
            timeZone: try r.string(C.timezone),
            misfire: try r.string(C.misfire), priority: Priority(rawValue: try r.int(C.priority)) ?? .normal,
            overlap: try r.string(C.overlap), maxAttempts: try r.int(C.maxAttempts),
            retryPolicy: try r.string(C.retryPolicy), group: r[C.group], concurrencyKey: r[C.concurrencyKey],
            concurrencyLimit: try r.optionalInt(C.concurrencyLimit),
            skippedOccurrences: try r.int(C.skippedOccurrences), dependsOn: Self.textArray(r[C.dependsOn] ?? "{}"),
            triggerRule: try r.string(C.triggerRule), callbackURL: r[C.callbackURL],
            namespace: try r.string(C.namespace),
            labels: (try? json(r[C.labels] ?? "{}"))?.objectValue?.compactMapValues(\.stringValue) ?? [:],
            batchID: r[C.batchID].flatMap(UUID.init(uuidString:)), spec: r[C.spec] ?? "{}",
            createdAt: try r.optionalDate(C.createdAt), updatedAt: try r.optionalDate(C.updatedAt))
    }

    /// Parses a PostgreSQL text array of simple names (`{a,b}`, quoted elements allowed).
    static func textArray(_ s: String) -> [String] {
        let inner = s.dropFirst().dropLast()
        guard !inner.isEmpty else { return [] }
        return inner.split(separator: ",").map { $0.hasPrefix("\"") ? String($0.dropFirst().dropLast()) : String($0) }
    }

    /// The columns `run(_:)` reads, in select-list order.
    enum RunColumn: Int, RowColumn {
        case id, taskID, occurrence, attempt, state, workerID, exitCode, output, errorClass, errorMessage, traceID
        case traceparent, publishCount, dispatchedAt, startedAt, finishedAt, reason, priority, workflowRunID
        case availableAt, result

        func sql(alias a: String) -> String {
            switch self {
            case .id: "\(a)id"
            case .taskID: "\(a)task_id"
            case .occurrence: "\(a)occurrence"
            case .attempt: "\(a)attempt"
            case .state: "\(a)state"
            case .workerID: "\(a)worker_id"
            case .exitCode: "\(a)exit_code"
            case .output: "\(a)output"
            case .errorClass: "\(a)error_class"
            case .errorMessage: "\(a)error_message"
            case .traceID: "\(a)trace_id"
            case .traceparent: "\(a)traceparent"
            case .publishCount: "\(a)publish_count"
            case .dispatchedAt: "\(a)dispatched_at"
            case .startedAt: "\(a)started_at"
            case .finishedAt: "\(a)finished_at"
            case .reason: "\(a)reason"
            case .priority: "\(a)priority"
            case .workflowRunID: "\(a)workflow_run_id"
            // A run held back (overlap queue, dependency wait) is available at 'infinity': none.
            case .availableAt: "CASE WHEN \(a)available_at < 'infinity' THEN \(a)available_at END"
            case .result: "\(a)result::text"
            }
        }
    }

    static let runColumns = RunColumn.selectList()

    /// The columns `run(_:)` reads, of the runs table under `alias` (`"l."`, or `""` for none).
    static func runColumns(of alias: String) -> String { RunColumn.selectList(alias: alias) }

    static func run(_ r: PostgresRow) throws -> RunRecord {
        typealias C = RunColumn
        return RunRecord(
            id: try r.uuid(C.id), taskID: try r.uuid(C.taskID), occurrence: try r.date(C.occurrence),
            attempt: try r.int(C.attempt), state: RunState(rawValue: try r.string(C.state)) ?? .lost,
            workerID: r[C.workerID], exitCode: try r.optionalInt(C.exitCode), output: r[C.output],
            errorClass: r[C.errorClass], errorMessage: r[C.errorMessage], traceID: r[C.traceID],
            traceparent: r[C.traceparent], publishCount: try r.int(C.publishCount),
            dispatchedAt: try r.optionalDate(C.dispatchedAt), startedAt: try r.optionalDate(C.startedAt),
            finishedAt: try r.optionalDate(C.finishedAt), reason: r[C.reason],
            priority: Priority(rawValue: try r.int(C.priority)) ?? .normal,
            workflowRunID: r[C.workflowRunID].flatMap(UUID.init(uuidString:)),
            availableAt: try r.optionalDate(C.availableAt), result: r[C.result])
    }

    /// A `jsonb` column's text as a value (one pass: parameters are read for every claimed run).
    static func json(_ text: String) throws -> JSONValue {
        try JSONValue(json: Array(text.utf8))
    }
}
