import Foundation

// The hot-path messages read in one pass (`JSONReader`). Each takes the members its `Codable`
// form takes, by the same names: required ones must be present (and not null), optional ones may
// be absent or null, unknown ones are skipped (a newer sender's additions), and none may appear
// twice. `MessageReadingTests` checks them against Foundation's decoder.

extension TaskMessage {
    init(reading r: inout JSONReader) throws(JSONReader.Failure) {
        var members = JSONMembers()
        var version: Int?
        var runID: UUID?
        var taskID: UUID?
        var taskName: String?
        var occurrence: Date?
        var attempt: Int?
        var queue: String?
        var executor: String?
        var parameters: JSONValue?
        var timeout: Double?
        var idempotencyKey: String?
        var startBy: Date?
        var proof: String?
        var inputs: JSONValue?
        try r.object { (r: inout JSONReader, key: String) throws(JSONReader.Failure) in
            switch key {
            case "version":
                try members.see(0)
                version = try r.int()
            case "run_id":
                try members.see(1)
                runID = try r.uuid()
            case "task_id":
                try members.see(2)
                taskID = try r.uuid()
            case "task_name":
                try members.see(3)
                taskName = try r.string()
            case "occurrence":
                try members.see(4)
                occurrence = try r.instant()
            case "attempt":
                try members.see(5)
                attempt = try r.int()
            case "queue":
                try members.see(6)
                queue = try r.string()
            case "executor":
                try members.see(7)
                executor = try r.string()
            case "parameters":
                try members.see(8)
                parameters = try r.value()
            case "timeout_seconds":
                try members.see(9)
                timeout = try r.double()
            case "idempotency_key":
                try members.see(10)
                idempotencyKey = try r.string()
            case "start_by":
                try members.see(11)
                startBy = try r.optionalInstant()
            case "proof":
                try members.see(12)
                proof = try r.optionalString()
            case "inputs":
                try members.see(13)
                inputs = try r.optionalValue()
            default: try members.skipUnknown(key, &r)
            }
        }
        self.init(
            runID: try members.required(runID, "run_id"), taskID: try members.required(taskID, "task_id"),
            taskName: try members.required(taskName, "task_name"),
            occurrence: try members.required(occurrence, "occurrence"),
            attempt: try members.required(attempt, "attempt"), queue: try members.required(queue, "queue"),
            executor: try members.required(executor, "executor"),
            parameters: try members.required(parameters, "parameters"),
            timeoutSeconds: try members.required(timeout, "timeout_seconds"))
        self.version = try members.required(version, "version")
        self.idempotencyKey = try members.required(idempotencyKey, "idempotency_key")
        self.startBy = startBy
        self.proof = proof
        self.inputs = inputs
    }
}

extension StatusMessage {
    init(reading r: inout JSONReader) throws(JSONReader.Failure) {
        var members = JSONMembers()
        var version: Int?
        var runID: UUID?
        var attempt: Int?
        var event: StatusEvent?
        var outcome: Outcome?
        var exitCode: Int?
        var output: String?
        var errorClass: String?
        var errorMessage: String?
        var workerID: String?
        var at: Date?
        var startedAt: Date?
        var detached: Bool?
        var result: JSONValue?
        try r.object { (r: inout JSONReader, key: String) throws(JSONReader.Failure) in
            switch key {
            case "version":
                try members.see(0)
                version = try r.int()
            case "run_id":
                try members.see(1)
                runID = try r.uuid()
            case "attempt":
                try members.see(2)
                attempt = try r.int()
            case "event":
                try members.see(3)
                event = try r.name(of: StatusEvent.self)
            case "outcome":
                try members.see(4)
                outcome = r.null() ? nil : try r.name(of: Outcome.self)
            case "exit_code":
                try members.see(5)
                exitCode = try r.optionalInt()
                // Stored in an `integer` column: a larger one made PostgreSQL refuse the whole batch
                // it came in, and the recorder retried that batch forever.
                if let e = exitCode, !StatusMessage.exitCodes.contains(e) {
                    throw JSONReader.Failure(
                        kind: .value, found: String(e),
                        detail: "a whole number from \(Int32.min) to \(Int32.max), or null")
                }
            case "output":
                try members.see(6)
                output = try r.optionalString()
            case "error_class":
                try members.see(7)
                errorClass = try r.optionalString()
            case "error_message":
                try members.see(8)
                errorMessage = try r.optionalString()
            case "worker_id":
                try members.see(9)
                workerID = try r.string()
            case "at":
                try members.see(10)
                at = try r.instant()
            case "started_at":
                try members.see(11)
                startedAt = try r.optionalInstant()
            case "detached":
                try members.see(12)
                detached = try r.optionalBool()
            case "result":
                try members.see(13)
                result = try r.optionalValue()
            default: try members.skipUnknown(key, &r)
            }
        }
        self.init(
            runID: try members.required(runID, "run_id"), attempt: try members.required(attempt, "attempt"),
            event: try members.required(event, "event"), outcome: outcome, exitCode: exitCode, output: output,
            errorClass: errorClass, errorMessage: errorMessage, workerID: try members.required(workerID, "worker_id"),
            at: try members.required(at, "at"), startedAt: startedAt, detached: detached, result: result)
        self.version = try members.required(version, "version")
    }
}

extension StatusBatchItem {
    /// One member of a batch's `statuses`: `{"body": "<status JSON>", "seal", "traceparent", "tracestate"}`.
    init(reading r: inout JSONReader) throws(JSONReader.Failure) {
        var members = JSONMembers()
        var body: String?
        var seal: String?
        var traceparent: String?
        var tracestate: String?
        try r.object { (r: inout JSONReader, key: String) throws(JSONReader.Failure) in
            switch key {
            case "body":
                try members.see(0)
                body = try r.string()
            case "seal":
                try members.see(1)
                seal = try r.optionalString()
            case "traceparent":
                try members.see(2)
                traceparent = try r.optionalString()
            case "tracestate":
                try members.see(3)
                tracestate = try r.optionalString()
            default: try members.skipUnknown(key, &r)
            }
        }
        self.init(
            body: Array(try members.required(body, "body").utf8), seal: seal, traceparent: traceparent,
            tracestate: tracestate)
    }
}
