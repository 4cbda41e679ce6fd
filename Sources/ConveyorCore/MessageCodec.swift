package import Foundation

/// JSON encoding and decoding of the wire messages, with errors that name the field.
package enum MessageCodec {
    /// Largest body accepted, in bytes.
    package static let maxBodyBytes = 1 << 20

    /// The JSON body of a task message (keys in sorted order).
    package static func encode(_ m: TaskMessage) -> [UInt8] {
        var w = JSONWriter()
        w.beginObject()
        w.field("attempt", m.attempt)
        w.field("executor", m.executor)
        w.field("idempotency_key", m.idempotencyKey)
        if let inputs = m.inputs { w.field("inputs", inputs) }
        w.field("occurrence", Timestamp.format(m.occurrence))
        w.field("parameters", m.parameters)
        w.field("proof", m.proof)
        w.field("queue", m.queue)
        w.field("run_id", m.runID.lowercasedString)
        w.field("start_by", m.startBy.map(Timestamp.format))
        w.field("task_id", m.taskID.lowercasedString)
        w.field("task_name", m.taskName)
        w.field("timeout_seconds", m.timeoutSeconds)
        w.field("version", m.version)
        w.endObject()
        return w.bytes
    }

    /// The JSON body of a status message (keys in sorted order; absent ones left out).
    package static func encode(_ m: StatusMessage) -> [UInt8] {
        var w = JSONWriter()
        w.beginObject()
        w.field("at", Timestamp.format(m.at))
        w.field("attempt", m.attempt)
        w.field("detached", m.detached)
        w.field("error_class", m.errorClass)
        w.field("error_message", m.errorMessage)
        w.field("event", m.event.rawValue)
        w.field("exit_code", m.exitCode)
        w.field("outcome", m.outcome?.rawValue)
        w.field("output", m.output)
        if let result = m.result { w.field("result", result) }
        w.field("run_id", m.runID.lowercasedString)
        w.field("started_at", m.startedAt.map(Timestamp.format))
        w.field("version", m.version)
        w.field("worker_id", m.workerID)
        w.endObject()
        return w.bytes
    }

    /// The JSON body of a heartbeat.
    package static func encode(_ m: HeartbeatMessage) -> [UInt8] {
        var fields: [String: JSONValue] = [
            "version": .number(Double(m.version)), "worker_id": .string(m.workerID), "host": .string(m.host),
            "queues": .array(m.queues.map(JSONValue.string)), "executors": .array(m.executors.map(JSONValue.string)),
            "concurrency": .number(Double(m.concurrency)),
            "in_flight": .array(m.inFlight.map { .string($0.lowercasedString) }),
            "interval_seconds": .number(m.intervalSeconds), "at": .string(Timestamp.format(m.at)),
        ]
        if let leaving = m.leaving { fields["leaving"] = .bool(leaving) }
        return JSONValue.object(fields).jsonBytes
    }

    package static func decodeHeartbeat(_ body: [UInt8]) throws(ValidationError) -> HeartbeatMessage {
        var m: HeartbeatMessage = try decode(body, kind: "heartbeat")
        m.workerID = m.workerID.storable
        m.host = m.host.storable
        m.queues = m.queues.map(\.storable)
        m.executors = m.executors.map(\.storable)
        guard m.version == 1 else {
            throw ValidationError(
                field: "version", value: String(m.version),
                hint: "this dispatcher understands conveyor.heartbeat.v1 (version 1) only")
        }
        guard WorkerID.isValid(m.workerID) else {
            throw ValidationError(field: "worker_id", value: m.workerID, hint: WorkerID.hint)
        }
        guard m.intervalSeconds > 0, m.intervalSeconds <= 3600 else {
            throw ValidationError(
                field: "interval_seconds", value: "\(m.intervalSeconds)", hint: "between 0 and 3600 seconds")
        }
        // Stored in an `integer` column: a larger number made PostgreSQL refuse the batch the
        // heartbeat came in, which the recorder retried forever.
        guard (0...Int(Int32.max)).contains(m.concurrency) else {
            throw ValidationError(
                field: "concurrency", value: String(m.concurrency), hint: "a whole number from 0 to \(Int32.max)")
        }
        return m
    }

    /// The JSON body of a control message.
    package static func encode(_ m: ControlMessage) -> [UInt8] {
        var w = JSONWriter()
        w.beginObject()
        w.key("cancel")
        w.string(m.cancel.lowercasedString)
        w.key("version")
        w.int(m.version)
        w.endObject()
        return w.bytes
    }

    package static func decodeControl(_ body: [UInt8]) throws(ValidationError) -> ControlMessage {
        try decode(body, kind: "control message")
    }

    /// A JSON value as text (parameters stored in the database).
    package static func encode(_ v: JSONValue) -> [UInt8] {
        var w = JSONWriter()
        w.value(v)
        return w.bytes
    }

    package static func decodeTask(_ body: [UInt8]) throws(ValidationError) -> TaskMessage {
        let m = try read(body, kind: "task message") { (r: inout JSONReader) throws(JSONReader.Failure) in
            try TaskMessage(reading: &r)
        }
        guard m.version == 1 else {
            throw ValidationError(
                field: "version", value: String(m.version),
                hint: "this worker understands conveyor.run.v1 (version 1) only")
        }
        guard m.attempt >= 1 else {
            throw ValidationError(field: "attempt", value: String(m.attempt), hint: "attempts count from 1")
        }
        guard m.timeoutSeconds > 0, m.timeoutSeconds <= TaskMessage.maxTimeoutSeconds else {
            throw ValidationError(
                field: "timeout_seconds", value: String(m.timeoutSeconds),
                hint: "must be a positive number of seconds, at most \(Int(TaskMessage.maxTimeoutSeconds)) (365 days)")
        }
        guard !m.executor.isEmpty else {
            throw ValidationError(field: "executor", value: "", hint: "name one of the worker's executors")
        }
        return m
    }

    package static func decodeStatus(_ body: [UInt8]) throws(ValidationError) -> StatusMessage {
        var m = try read(body, kind: "status message") { (r: inout JSONReader) throws(JSONReader.Failure) in
            try StatusMessage(reading: &r)
        }
        // Its text is stored as it came (an executor's output may hold any byte), but as text
        // PostgreSQL can hold: see `String.storable`.
        m.output = m.output?.storable
        m.errorClass = m.errorClass?.storable
        m.errorMessage = m.errorMessage?.storable
        m.workerID = m.workerID.storable
        // A worker bounds its results; one that does not (or is not ours) is bounded here, so an
        // oversized result is marked, never the reason a status is lost.
        m.result = StatusMessage.bounded(m.result?.storable)
        guard WorkerID.isValid(m.workerID) else {
            throw ValidationError(field: "worker_id", value: m.workerID, hint: WorkerID.hint)
        }
        guard m.version == 1 else {
            throw ValidationError(
                field: "version", value: String(m.version),
                hint: "this dispatcher understands conveyor.status.v1 (version 1) only")
        }
        if m.event == .finished && m.outcome == nil {
            throw ValidationError(
                field: "outcome", value: "null",
                hint: "a finished event must carry an outcome: succeeded, failed, timed_out or cancelled")
        }
        return m
    }

    /// Best effort: the run id of a message that failed to decode, so its run can be marked.
    package static func runID(inMalformed body: [UInt8]) -> UUID? { claims(inMalformed: body)?.runID }

    /// Best effort: the run, attempt (1 when unreadable) and proof a task message that failed to
    /// decode claims. Its run is marked only when the proof is that attempt's.
    package static func claims(inMalformed body: [UInt8]) -> (runID: UUID, attempt: Int, proof: String?)? {
        guard body.count <= maxBodyBytes,
            let obj = try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any],
            let s = obj["run_id"] as? String, let id = UUID(uuidString: s)
        else { return nil }
        return (id, (obj["attempt"] as? Int) ?? 1, obj["proof"] as? String)
    }

    static func decode<T: Decodable>(_ body: [UInt8], kind: String) throws(ValidationError) -> T {
        guard body.count <= maxBodyBytes else {
            throw ValidationError(
                field: "body", value: "\(body.count) bytes", hint: "a \(kind) may be at most \(maxBodyBytes) bytes")
        }
        do {
            return try decoder.decode(T.self, from: Data(body))
        } catch let error as DecodingError {
            throw validation(from: error, kind: kind)
        } catch {
            throw ValidationError(field: "body", value: "", hint: "not valid JSON for a \(kind)")
        }
    }

    /// Reads a hot-path message with `JSONReader`, its refusals as `ValidationError`s naming the field.
    static func read<T>(
        _ body: [UInt8], kind: String, _ reader: (inout JSONReader) throws(JSONReader.Failure) -> T
    ) throws(ValidationError) -> T {
        guard body.count <= maxBodyBytes else {
            throw ValidationError(
                field: "body", value: "\(body.count) bytes", hint: "a \(kind) may be at most \(maxBodyBytes) bytes")
        }
        do {
            return try JSONReader.read(body, reader)
        } catch {
            let field = error.field
            switch error.kind {
            case .syntax:
                throw ValidationError(field: "body", value: "", hint: "not valid JSON for a \(kind): \(error.detail)")
            case .missing:
                throw ValidationError(field: field, value: "(missing)", hint: "a \(kind) must carry '\(field)'")
            case .type:
                throw ValidationError(
                    field: field, value: "", hint: "wrong type: \(error.detail), found \(error.found)")
            case .value:
                throw ValidationError(field: field, value: error.found, hint: "expected \(error.detail)")
            case .duplicate:
                throw ValidationError(field: field, value: "", hint: error.detail)
            }
        }
    }

    static func validation(from error: DecodingError, kind: String) -> ValidationError {
        func path(_ p: [any CodingKey]) -> String { p.map(\.stringValue).joined(separator: ".") }
        switch error {
        case .keyNotFound(let key, let ctx):
            let full = path(ctx.codingPath + [key])
            return ValidationError(field: full, value: "(missing)", hint: "a \(kind) must carry '\(full)'")
        case .typeMismatch(_, let ctx), .valueNotFound(_, let ctx):
            return ValidationError(field: path(ctx.codingPath), value: "", hint: "wrong type: \(ctx.debugDescription)")
        case .dataCorrupted(let ctx):
            let field = ctx.codingPath.isEmpty ? "body" : path(ctx.codingPath)
            return ValidationError(
                field: field, value: "",
                hint: ctx.codingPath.isEmpty ? "not valid JSON (or not UTF-8) for a \(kind)" : ctx.debugDescription)
        @unknown default:
            return ValidationError(field: "body", value: "", hint: "cannot decode a \(kind)")
        }
    }

    static var decoder: JSONDecoder {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .custom { dec in
            let c = try dec.singleValueContainer()
            let s = try c.decode(String.self)
            if let d = Timestamp.parse(s) { return d }
            throw DecodingError.dataCorruptedError(
                in: c, debugDescription: "'\(s)' is not an ISO-8601 instant such as 2026-11-23T12:00:00.000Z")
        }
        return d
    }
}

extension String {
    /// This text as PostgreSQL's `text` type can hold it: NUL, which it cannot, becomes U+FFFD,
    /// as invalid UTF-8 already does when bytes become a `String`. Applied where text from the
    /// wire is about to be stored (status and heartbeat messages, dead letters); unchanged, and
    /// not copied, when it holds no NUL.
    package var storable: String { utf8.contains(0) ? replacingOccurrences(of: "\0", with: "\u{FFFD}") : self }
}

extension JSONValue {
    /// This value with every string and key as PostgreSQL can hold it (`String.storable`): jsonb
    /// refuses `\u0000` as text does NUL.
    package var storable: JSONValue {
        switch self {
        case .string(let s): .string(s.storable)
        case .array(let a): .array(a.map(\.storable))
        case .object(let o):
            .object(Dictionary(o.map { ($0.key.storable, $0.value.storable) }, uniquingKeysWith: { a, _ in a }))
        default: self
        }
    }
}
