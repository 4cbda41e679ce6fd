import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorDispatcher
import ConveyorStore
import ConveyorWorker
import Foundation
import Synchronization
import Testing

/// Status batches (`conveyor.status-batch.v1`): a busy worker sends several statuses in one
/// broker message; the recorder checks each one as if it had come alone.
@Suite(
    "Status batches (real PostgreSQL and RabbitMQ)",
    .enabled(if: Servers.available, Comment(rawValue: Servers.skipMessage)), .serialized)
struct StatusBatchTests {
    @Test func aBusyWorkerSendsSeveralStatusesPerMessageAndEachIsRecordedOnce() async throws {
        try await System.with { sys in
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            let worker = sys.worker(["record": RecordingExecutor(recorder: recorder)], concurrency: 64)
            try await withServices([dispatcher, worker]) {
                try await sys.store.createTasks(sys.tasks(1000))
                try await sys.eventually("1000 runs succeeded") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 1000
                }
            }
            let sent = worker.statuses.sent.withLock { $0 }
            #expect(sent.statuses == 1000)
            // 1,000 runs at once: statuses waited for the batch in flight and left together.
            #expect(sent.messages < 500, "statuses per message: \(sent)")
            #expect(dispatcher.stats.outcomesRecorded == 1000)
            #expect(dispatcher.stats.statusRejected == 0)
        }
    }

    @Test func eachStatusOfABatchIsCheckedAloneAndABrokenBatchIsDeadLettered() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            try await withServices([dispatcher]) {
                try await sys.store.createTasks(sys.tasks(3))
                try await sys.eventually("3 runs published") { dispatcher.stats.published == 3 }
                let runs = try await sys.store.runs(limit: 3)
                let good = try await sys.signed(
                    runs.prefix(2).map {
                        StatusMessage(runID: $0.id, attempt: 1, event: .finished, outcome: .succeeded, workerID: "w")
                    })
                var forged = StatusMessage(
                    runID: runs[2].id, attempt: 1, event: .finished, outcome: .failed, workerID: "mallory")
                forged.proof = "AAAAAAAAAAAAAAAAAAAAAA"
                let items =
                    (good + [forged]).map { s in
                        let m = sealedStatus(s, exchange: "")
                        return StatusBatchItem(
                            body: m.body, seal: m.properties.headers[StatusProof.sealHeader]?.stringValue,
                            traceparent: nil, tracestate: nil)
                    } + [
                        StatusBatchItem(
                            body: Array("{\"run_id\": 7}".utf8), seal: nil, traceparent: nil, tracestate: nil)
                    ]
                let topology = ConveyorTopology(prefix: sys.prefix)
                func batch(_ body: [UInt8]) -> AMQPOutgoingMessage {
                    AMQPOutgoingMessage(
                        exchange: topology.statusExchange, routingKey: "status", body: body,
                        properties: AMQPProperties(type: statusBatchMessageType, persistent: true))
                }
                try await sys.withPublisher(topology.status) { pub, _ in
                    try await pub.publish(batch(MessageCodec.encode(batch: items)))
                    try await pub.publish(batch(Array("{\"version\": 1, \"statuses\": []}".utf8)))
                }
                try await sys.eventually("the two good statuses recorded") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 2
                }
                try await sys.eventually("the forged, the malformed status and the empty batch refused") {
                    dispatcher.stats.statusRejected == 3
                }
                #expect(dispatcher.stats.statusForged == 1)
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM runs WHERE id = $1 AND state IN ('queued', 'dispatched')", [runs[2].id])
                        == 1, "the forged status changed nothing")
            }
        }
    }
}
