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
            #expect(recorder.executions.withLock { $0.count == 1000 && $0.values.allSatisfy { $0 == 1 } })
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
                    (good + [forged]).map { StatusBatchItem(sealedStatus($0, exchange: "")) } + [
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
    /// A consumer written elsewhere reads what a worker's `StatusBatcher` sends: pika takes the
    /// messages off the status queue and Python's json parses them (each batched status's body
    /// too). A status sent alone travels as `conveyor.status.v1`; statuses sent while one is in
    /// flight travel together in `conveyor.status-batch.v1`, each with the seal it had alone.
    @Test func pikaReadsStatusesSentAloneAndInBatches() async throws {
        struct Read: Decodable {
            struct Status: Decodable {
                var runID: String
                enum CodingKeys: String, CodingKey { case runID = "run_id" }
            }
            struct Item: Decodable {
                var body: Status
                var seal: String?
            }
            struct Body: Decodable {
                var runID: String?
                var statuses: [Item]?
                enum CodingKeys: String, CodingKey {
                    case runID = "run_id"
                    case statuses
                }
            }
            var type: String
            var body: Body
        }
        try await System.with { sys in
            let topology = ConveyorTopology(prefix: sys.prefix)
            let ids = (0..<31).map { _ in UUID() }
            let messages = ids.map { id in
                var s = StatusMessage(runID: id, attempt: 1, event: .finished, outcome: .succeeded, workerID: "w")
                s.proof = "AAAAAAAAAAAAAAAAAAAAAA"
                return sealedStatus(s, exchange: topology.statusExchange, persistent: true)
            }
            var seals: [String: String] = [:]
            for (id, m) in zip(ids, messages) {
                seals[id.lowercasedString] = m.properties.headers[StatusProof.sealHeader]?.stringValue
            }
            try await sys.withPublisher(topology.status) { pub, _ in
                let batcher = StatusBatcher(publisher: pub, exchange: topology.statusExchange)
                try await batcher.send(messages[0])  // alone: nothing else waits
                try await withThrowingTaskGroup(of: Void.self) { g in
                    for m in messages.dropFirst() { g.addTask { try await batcher.send(m) } }
                    try await g.waitForAll()
                }
                let sent = batcher.sent.withLock { $0 }
                #expect(sent.statuses == 31 && sent.messages < 31, "\(sent)")
            }
            let op = "read:\(topology.statusQueue)"
            let probe = try await BrokerIdentityTests.probe(sys.amqp.url, [op])
            let read = try JSONDecoder().decode([Read].self, from: Data(try #require(probe[op]).utf8))
            #expect(read.first?.type == statusMessageType)
            #expect(read.first?.body.runID == ids[0].lowercasedString)
            #expect(read.contains { $0.type == statusBatchMessageType })
            var seen: [String] = []
            for m in read {
                if m.type == statusBatchMessageType {
                    for item in m.body.statuses ?? [] {
                        seen.append(item.body.runID)
                        #expect(item.seal == seals[item.body.runID], "a batched status keeps its own seal")
                    }
                } else {
                    #expect(m.type == statusMessageType)
                    seen += m.body.runID.map { [$0] } ?? []
                }
            }
            #expect(seen.sorted() == ids.map(\.lowercasedString).sorted(), "every status once, none lost or doubled")
        }
    }
}
