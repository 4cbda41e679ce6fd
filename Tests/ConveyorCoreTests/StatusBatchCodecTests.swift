import ConveyorCore
import Foundation
import Testing

/// `conveyor.status-batch.v1`: each status travels byte for byte (its seal covers those bytes),
/// and a batch out of bounds is refused naming the field.
@Suite struct StatusBatchCodecTests {
    @Test func aBatchCarriesEachStatusByteForByte() throws {
        let statuses = (0..<3).map { i in
            var s = StatusMessage(
                runID: UUID(), attempt: 1, event: .finished, outcome: .succeeded, workerID: "w\(i)")
            s.output = "line \"\(i)\"\n\u{1F600} \\ done"
            return MessageCodec.encode(s)
        }
        let items = statuses.enumerated().map { i, body in
            StatusBatchItem(
                body: body, seal: "seal\(i)",
                traceparent: i == 0
                    ? nil : "00-\(String(repeating: "a", count: 32))-\(String(repeating: "b", count: 16))-01",
                tracestate: i == 2 ? "k=v" : nil)
        }
        #expect(try MessageCodec.decode(batch: MessageCodec.encode(batch: items)) == items)
    }

    @Test func aBatchOutOfBoundsIsRefusedNamingTheField() {
        func refusal(_ json: String) -> ValidationError? {
            do {
                _ = try MessageCodec.decode(batch: Array(json.utf8))
                return nil
            } catch { return error }
        }
        #expect(refusal(#"{"version": 1, "statuses": []}"#)?.field == "statuses")
        let many = Array(repeating: #"{"body": "{}"}"#, count: MessageCodec.maxStatusesPerBatch + 1)
        #expect(refusal(#"{"version": 1, "statuses": [\#(many.joined(separator: ","))]}"#)?.field == "statuses")
        #expect(refusal(#"{"version": 2, "statuses": [{"body": "{}"}]}"#)?.field == "version")
        #expect(refusal(#"{"version": 1}"#) != nil)
        #expect(refusal("not json") != nil)
    }
}
