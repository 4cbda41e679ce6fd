package import Foundation

/// The AMQP `type` of a task message.
package let taskMessageType = "conveyor.run.v1"
/// The AMQP `type` of a status message.
package let statusMessageType = "conveyor.status.v1"

/// Body of a task message (`conveyor.run.v1`): everything a worker needs to run one attempt.
package struct TaskMessage: Sendable, Hashable, Codable {
    /// The longest run timeout: 365 days. Tasks are refused above it, and so are task messages:
    /// a run's deadline is arithmetic on this number (microseconds, milliseconds, intervals),
    /// which a larger one overflows.
    package static let maxTimeoutSeconds: Double = 31_536_000
    package var version: Int = 1
    package var runID: UUID
    package var taskID: UUID
    package var taskName: String
    package var occurrence: Date
    package var attempt: Int
    package var queue: String
    package var executor: String
    package var parameters: JSONValue
    package var timeoutSeconds: Double
    /// Equal to the run id: executors pass it on (`Idempotency-Key`, `CONVEYOR_RUN_ID`).
    package var idempotencyKey: String
    /// The same for every attempt of the occurrence: `<task id>@<occurrence>` (executors pass it on
    /// as `Conveyor-Occurrence-Key`, `CONVEYOR_OCCURRENCE_KEY`). Derived, not sent.
    package var occurrenceKey: String { "\(taskID.lowercasedString)@\(Timestamp.format(occurrence))" }
    /// The latest time a worker may start this attempt: the claim's time plus the task's
    /// schedule-to-start timeout, on the database's clock. A worker refuses the message after
    /// it (the dispatcher ends the run `expired` and retries it by policy). Absent from messages
    /// of dispatchers before 0.10: such a message has no start limit.
    package var startBy: Date?
    /// The attempt's status proof, signed by the dispatcher: the worker returns it on every
    /// status of this attempt, and a status without it changes nothing. Never given to executors.
    package var proof: String?
    /// For a dependent in a workflow run: its upstreams' results, by upstream task name (only
    /// those that returned one), at most `maxInputsBytes` encoded. Absent otherwise.
    package var inputs: JSONValue?

    /// The most inputs a task message carries, encoded: 96 KiB (three upstream results of the
    /// largest size), so a shell command can take them in one environment variable.
    package static let maxInputsBytes = 96 * 1024

    /// `inputs` as it may travel: unchanged when it fits, else each upstream's result larger than
    /// an even share is replaced by the truncation marker (`StatusMessage.bounded`'s shape).
    package static func bounded(inputs: JSONValue?) -> JSONValue? {
        guard let inputs, case .object(let o) = inputs, inputs.jsonBytes.count > maxInputsBytes else { return inputs }
        let share = maxInputsBytes / max(o.count, 1) - 256
        return .object(
            o.mapValues { v in
                let bytes = v.jsonBytes
                guard bytes.count > share else { return v }
                return .truncationMarker(of: bytes, bytes: bytes.count, limit: max(share, 0))
            })
    }

    package init(
        runID: UUID, taskID: UUID, taskName: String, occurrence: Date, attempt: Int, queue: String,
        executor: String, parameters: JSONValue, timeoutSeconds: Double
    ) {
        self.runID = runID
        self.taskID = taskID
        self.taskName = taskName
        self.occurrence = occurrence
        self.attempt = attempt
        self.queue = queue
        self.executor = executor
        self.parameters = parameters
        self.timeoutSeconds = timeoutSeconds
        self.idempotencyKey = runID.lowercasedString
    }

    enum CodingKeys: String, CodingKey {
        case version
        case runID = "run_id"
        case taskID = "task_id"
        case taskName = "task_name"
        case occurrence, attempt, queue,
            executor, parameters
        case timeoutSeconds = "timeout_seconds"
        case idempotencyKey = "idempotency_key"
        case startBy = "start_by"
        case proof
        case inputs
    }
}

/// The AMQP `type` of a control message.
package let controlMessageType = "conveyor.control.v1"

/// Body of a control message (`conveyor.control.v1`), fanned out to every worker.
package struct ControlMessage: Sendable, Hashable, Codable {
    package var version: Int = 1
    /// The run to cancel.
    package var cancel: UUID

    package init(cancel: UUID) { self.cancel = cancel }
}

/// The AMQP `type` of a heartbeat, sent by each worker on the status exchange.
package let heartbeatMessageType = "conveyor.heartbeat.v1"

/// Body of a heartbeat (`conveyor.heartbeat.v1`): who the worker is and what it holds.
/// A worker's id, as heartbeats and statuses carry it and `runs.worker_id` stores it (indexed).
package enum WorkerID {
    /// At most this many characters: a longer id (about 2.7 KB) overflowed an index entry of
    /// `runs`, and PostgreSQL refused the whole status batch it came in (54000).
    package static let maxLength = 200
    package static let hint = "a worker id of 1 to \(maxLength) characters"
    package static func isValid(_ id: String) -> Bool { !id.isEmpty && id.count <= maxLength }
}

package struct HeartbeatMessage: Sendable, Hashable, Codable {
    package var version: Int = 1
    package var workerID: String
    package var host: String
    package var queues: [String]
    package var executors: [String]
    package var concurrency: Int
    /// Runs this worker is executing now.
    package var inFlight: [UUID]
    /// How often this worker sends heartbeats; the dispatcher declares it lost after a few missed.
    package var intervalSeconds: Double
    package var at: Date
    /// The worker's last heartbeat: it has drained and is leaving (shown `stopped`, never
    /// declared lost). Absent from heartbeats of workers before 0.10.
    package var leaving: Bool?

    package init(
        workerID: String, host: String, queues: [String], executors: [String], concurrency: Int,
        inFlight: [UUID], intervalSeconds: Double, at: Date = Date(), leaving: Bool? = nil
    ) {
        self.leaving = leaving
        self.workerID = workerID
        self.host = host
        self.queues = queues
        self.executors = executors
        self.concurrency = concurrency
        self.inFlight = inFlight
        self.intervalSeconds = intervalSeconds
        self.at = at
    }

    enum CodingKeys: String, CodingKey {
        case version
        case workerID = "worker_id"
        case host, queues, executors, concurrency
        case inFlight = "in_flight"
        case
            intervalSeconds = "interval_seconds"
        case at, leaving
    }
}

/// What a status message reports.
package enum StatusEvent: String, Sendable, Codable, CaseIterable {
    case started
    case heartbeat
    case finished
}

/// Body of a status message (`conveyor.status.v1`).
package struct StatusMessage: Sendable, Hashable, Codable {
    package var version: Int = 1
    package var runID: UUID
    package var attempt: Int
    package var event: StatusEvent
    /// Set when `event == .finished`.
    package var outcome: Outcome?
    /// A 32-bit signed integer (runs.exit_code is PostgreSQL's `integer`); a status with another is
    /// malformed.
    package var exitCode: Int?
    /// The exit codes a status may carry.
    package static let exitCodes = Int(Int32.min)...Int(Int32.max)
    package var output: String?
    package var errorClass: String?
    package var errorMessage: String?
    package var workerID: String
    package var at: Date
    /// On `finished`: when the executor started. A run shorter than the worker's
    /// `started_after_ms` sends no `started` event, so its start time travels here.
    package var startedAt: Date?
    /// On `started`: the worker has acknowledged the task message (a long run, past
    /// `worker.detach_after_ms`), so the broker will not redeliver it; the worker's heartbeats
    /// protect it instead.
    package var detached: Bool?
    /// The proof the attempt's task message carried (`TaskMessage.proof`): the key of the seal
    /// the worker puts on this status (`StatusProof.seal`). Never encoded: it does not travel back.
    package var proof: String?
    /// On `finished`: the structured result the executor returned (any JSON value), at most
    /// `StatusMessage.maxResultBytes` encoded; a larger one travels as `StatusMessage.truncated`.
    package var result: JSONValue?

    /// The largest result a status carries, encoded: 32 KiB.
    package static let maxResultBytes = 32 * 1024

    /// `result` as it may travel and be stored: unchanged when it fits in `maxResultBytes`,
    /// else a marker object `{"conveyor_truncated": true, "bytes": N, "limit": L, "head": "…"}`
    /// whose `head` is the start of the encoded JSON, so the status is never lost for its size.
    package static func bounded(_ result: JSONValue?) -> JSONValue? {
        guard let result else { return nil }
        let bytes = result.jsonBytes
        guard bytes.count > maxResultBytes else { return result }
        return .truncationMarker(of: bytes, bytes: bytes.count, limit: maxResultBytes)
    }

    package init(
        runID: UUID, attempt: Int, event: StatusEvent, outcome: Outcome? = nil, exitCode: Int? = nil,
        output: String? = nil, errorClass: String? = nil, errorMessage: String? = nil,
        workerID: String, at: Date = Date(), startedAt: Date? = nil, detached: Bool? = nil, proof: String? = nil,
        result: JSONValue? = nil
    ) {
        self.runID = runID
        self.attempt = attempt
        self.event = event
        self.outcome = outcome
        self.exitCode = exitCode
        self.output = output
        self.errorClass = errorClass
        self.errorMessage = errorMessage
        self.workerID = workerID
        self.at = at
        self.startedAt = startedAt
        self.detached = detached
        self.proof = proof
        self.result = result
    }

    enum CodingKeys: String, CodingKey {
        case version
        case result
        case runID = "run_id"
        case attempt, event, outcome
        case exitCode = "exit_code"
        case output
        case
            errorClass = "error_class"
        case errorMessage = "error_message"
        case workerID = "worker_id"
        case at
        case startedAt = "started_at"
        case detached
    }
}

extension JSONValue {
    /// What stands for a JSON value too large to carry or store (a result, an upstream's input):
    /// `{"conveyor_truncated": true, "bytes": N, "limit": L, "head": "<its first 4 KiB>"}`, the
    /// head cut from `encoded` and storable; `bytes` absent when the whole size is not known.
    package static func truncationMarker(of encoded: [UInt8], bytes: Int?, limit: Int) -> JSONValue {
        var o: [String: JSONValue] = [
            "conveyor_truncated": true, "limit": .number(Double(limit)),
            "head": .string(String(decoding: encoded.prefix(min(limit, 4096)), as: UTF8.self).storable),
        ]
        if let bytes { o["bytes"] = .number(Double(bytes)) }
        return .object(o)
    }
}
