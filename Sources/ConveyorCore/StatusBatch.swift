import Foundation

/// The AMQP `type` of a status batch: several `conveyor.status.v1` statuses of one worker in one
/// broker message (a persistent quorum message each costs the broker as much as a run's task
/// message; docs/benchmarks.md, "Status batches").
package let statusBatchMessageType = "conveyor.status-batch.v1"

/// One status of a batch: a `conveyor.status.v1` body exactly as it would travel alone (its seal
/// covers these bytes), with the headers it would carry alone.
package struct StatusBatchItem: Sendable, Hashable {
    package var body: [UInt8]
    package var seal: String?
    package var traceparent: String?
    package var tracestate: String?

    package init(body: [UInt8], seal: String?, traceparent: String?, tracestate: String?) {
        self.body = body
        self.seal = seal
        self.traceparent = traceparent
        self.tracestate = tracestate
    }
}

extension MessageCodec {
    /// Statuses one batch may carry.
    package static let maxStatusesPerBatch = 64
    /// The header that says how many statuses a batch carries (the recorder sizes its
    /// transactions by it; the body decides what is recorded).
    package static let batchCountHeader = "conveyor-statuses"

    /// `{"statuses": [{"body": "<status JSON>", "seal", "traceparent", "tracestate"}…], "version": 1}`.
    package static func encode(batch items: [StatusBatchItem]) -> [UInt8] {
        var w = JSONWriter()
        w.beginObject()
        w.key("statuses")
        w.beginArray()
        for item in items {
            w.beginObject()
            w.field("body", String(decoding: item.body, as: UTF8.self))
            w.field("seal", item.seal)
            w.field("traceparent", item.traceparent)
            w.field("tracestate", item.tracestate)
            w.endObject()
        }
        w.endArray()
        w.field("version", 1)
        w.endObject()
        return w.bytes
    }

    /// The statuses of a batch, each still to be decoded and checked as a status message alone.
    package static func decode(batch body: [UInt8]) throws(ValidationError) -> [StatusBatchItem] {
        let (version, statuses) = try read(body, kind: "status batch") {
            (r: inout JSONReader) throws(JSONReader.Failure) in
            var members = JSONMembers()
            var version: Int?
            var statuses: [StatusBatchItem]?
            try r.object { (r: inout JSONReader, key: String) throws(JSONReader.Failure) in
                switch key {
                case "version":
                    try members.see(0)
                    version = try r.int()
                case "statuses":
                    try members.see(1)
                    var items: [StatusBatchItem] = []
                    try r.array { (r: inout JSONReader, _: Int) throws(JSONReader.Failure) in
                        items.append(try StatusBatchItem(reading: &r))
                    }
                    statuses = items
                default: try members.skipUnknown(key, &r)
                }
            }
            return (try members.required(version, "version"), try members.required(statuses, "statuses"))
        }
        guard version == 1 else {
            throw ValidationError(
                field: "version", value: String(version),
                hint: "this dispatcher understands \(statusBatchMessageType) (version 1) only")
        }
        guard (1...maxStatusesPerBatch).contains(statuses.count) else {
            throw ValidationError(
                field: "statuses", value: "\(statuses.count) statuses",
                hint: "a batch carries 1 to \(maxStatusesPerBatch) statuses; send more as several batches")
        }
        return statuses
    }
}
