import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorDispatcher
import ConveyorStore
import Foundation
import Testing

/// One broker identity per role (issue 19, item 2; docs/security.md S14–S16). The users and their
/// permissions are scripts/services.sh's, from deploy/broker-permissions.tsv; the operations are
/// tried with pika (scripts/broker_probe.py), not Conveyor's own client. The other suites run
/// every worker, dispatcher and API process they start under its own user, which shows the
/// permissions suffice; these show they do not give more.
@Suite("Broker identities: least privilege per role (real RabbitMQ, pika)", .serialized)
struct BrokerIdentityTests {
    /// What `url` may do, per operation: "ok" or the broker's refusal ("403 ACCESS_REFUSED - …").
    static func probe(_ url: String, _ ops: [String]) async throws -> [String: String] {
        let r = try await runRequired(
            "python3", [FileManager.default.currentDirectoryPath + "/scripts/broker_probe.py", "--url", url] + ops)
        try #require(r.status == 0, "broker_probe.py failed: \(r.err)")
        return try JSONDecoder().decode([String: String].self, from: Data(r.out.utf8))
    }

    /// S14. A worker pod holds the worker login. With it, pika cannot publish a task (the tasks
    /// exchange, the dead-letter exchange, or the default exchange into a work queue), consume the
    /// status or dead queue, delete or create a queue, or bind one to the status exchange; it can
    /// do what a worker does. The dispatcher's login can do each refused thing, so the refusals
    /// are the permissions', not a broken probe.
    @Test func s14_aWorkersLoginCannotDispatchReadStatusesOrDeleteQueues() async throws {
        try await System.with { sys in
            let t = try await sys.declareTopology()
            let forbidden = [
                "publish:\(t.tasksExchange):\(sys.queue)", "publish:\(t.deadLetterExchange):",
                "publish::\(t.workQueue(sys.queue))",
                "publish:\(t.controlExchange):", "consume:\(t.statusQueue)", "consume:\(t.deadQueue)",
                "delete:\(t.workQueue(sys.queue))", "delete:\(t.statusQueue)", "declare:\(t.workQueue("other"))",
                "bind:\(t.controlQueue(worker: "w1")):\(t.statusExchange)",
            ]
            let allowed = [
                "publish:\(t.statusExchange):status", "publish:\(t.isolateExchange):\(t.isolationQueue(sys.queue))",
                "consume:\(t.workQueue(sys.queue))", "consume:\(t.isolationQueue(sys.queue))",
                "passive:\(t.statusQueue)",
            ]
            let worker = try await Self.probe(sys.workerAMQPURL, forbidden + allowed)
            for op in forbidden {
                #expect(
                    worker[op]?.hasPrefix("403 ACCESS_REFUSED") == true,
                    "the worker login may \(op): \(worker[op] ?? "no answer")")
            }
            for op in allowed {
                #expect(worker[op] == "ok", "the worker login may not \(op): \(worker[op] ?? "no answer")")
            }

            // The same operations under the dispatcher's login (the delete last: it removes the work queue).
            let control = [
                "publish:\(t.tasksExchange):\(sys.queue)", "publish:\(t.controlExchange):", "consume:\(t.statusQueue)",
                "consume:\(t.deadQueue)", "declare:\(t.workQueue("other"))", "delete:\(t.workQueue("other"))",
            ]
            let dispatcher = try await Self.probe(sys.dispatcherAMQPURL, control)
            for op in control {
                #expect(dispatcher[op] == "ok", "the dispatcher login may not \(op): \(dispatcher[op] ?? "no answer")")
            }
        }
    }

    /// S15. The API only looks queues up (depths, readiness): its login can do nothing else.
    @Test func s15_theAPIsLoginOnlyLooksQueuesUp() async throws {
        try await System.with { sys in
            let t = try await sys.declareTopology()
            let forbidden = [
                "publish:\(t.statusExchange):status", "publish:\(t.tasksExchange):\(sys.queue)",
                "consume:\(t.workQueue(sys.queue))",
                "consume:\(t.statusQueue)", "declare:\(t.workQueue("other"))", "delete:\(t.workQueue(sys.queue))",
            ]
            let api = try await Self.probe(sys.apiAMQPURL, forbidden + ["passive:\(t.workQueue(sys.queue))"])
            for op in forbidden {
                #expect(
                    api[op]?.hasPrefix("403 ACCESS_REFUSED") == true,
                    "the API login may \(op): \(api[op] ?? "no answer")")
            }
            #expect(api["passive:\(t.workQueue(sys.queue))"] == "ok")
        }
    }

    /// S16. A worker started with another role's login (here the API's) stops at start-up, at
    /// once, with an error that names the permission the broker refused and where the fix is;
    /// it does not retry for `amqp.connect_retry_seconds` and then blame the network.
    @Test func s16_aWorkerWithTheWrongLoginStopsAtStartUpNamingThePermission() async throws {
        try await System.with { sys in
            _ = try await sys.declareTopology()
            var env = sys.workerEnvironment(id: "wrong-login")
            env["CONVEYOR_AMQP_URL"] = sys.apiAMQPURL
            env["CONVEYOR_AMQP_CONNECT_RETRY_SECONDS"] = "20"
            let spawnEnv = env
            let began = ContinuousClock.now
            let r = try await withCheckedThrowingContinuation {
                (c: CheckedContinuation<(status: Int32, out: String, err: String), any Error>) in
                Thread.detachNewThread {
                    c.resume(with: Result { try runCapturing(try conveyorProcess(["worker"], env: spawnEnv)) })
                }
            }
            let took = ContinuousClock.now - began
            let output = r.out + r.err
            #expect(r.status != 0)
            #expect(
                output.contains("ACCESS_REFUSED") && output.contains("refused for user 'conveyor-api'"),
                "\(output.suffix(800))")
            #expect(
                output.contains("access to exchange '\(ConveyorTopology(prefix: sys.prefix).isolateExchange)'"),
                "\(output.suffix(800))")
            // Whichever of the worker's connections is refused first names its permission: the
            // publisher's ('configure' on the isolation exchange), the control consumer's
            // ('configure' on its queue) or the task consumer's ('read' on the work queue). Seen
            // failing 1 run in 10 when only the first was accepted.
            #expect(
                output.contains("The operation needs the 'configure' permission on the ")
                    || output.contains("The operation needs the 'read' permission on the queue"),
                "the permission is not named: \(output.suffix(800))")
            #expect(output.contains("deploy/broker-permissions.tsv"), "no fix named: \(output.suffix(800))")
            #expect(took < .seconds(15), "took \(took): the refusal was retried")
            let password = try #require(URLComponents(string: sys.apiAMQPURL)?.password)
            #expect(!output.contains(password), "the password is in the output")
        }
    }

    /// A worker whose queue no dispatcher has declared yet (no task named it, no dispatcher
    /// lists it) gets it declared from its heartbeat, and then consumes: workers only look
    /// queues up, so without that it would wait for a first task that it could never receive.
    @Test func aWorkerOnANewQueueGetsItDeclaredFromItsHeartbeat() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher { $0.queues = [] }
            var env = sys.workerEnvironment(id: "fresh-queue", executors: "noop")
            env["CONVEYOR_WORKER_QUEUES"] = "fresh"
            env["CONVEYOR_WORKER_HEARTBEAT_INTERVAL_MS"] = "200"
            env["CONVEYOR_WORKER_HTTP_PORT"] = "0"
            let worker = try spawnConveyor(["worker"], env: env)
            defer { if worker.isRunning { worker.terminate() } }
            try await withServices([dispatcher]) {
                var task = NewTask(name: "on-fresh", executor: "noop", schedule: .once)
                task.queue = "fresh"
                // Before any task names it: declared because the worker's heartbeat did.
                let fresh = ConveyorTopology(prefix: sys.prefix).workQueue("fresh")
                // One connection for every look: a miss closes the channel, which is opened again.
                let inspector = AMQPInspector(configuration: sys.amqp)
                defer { inspector.close() }
                let declared = try await sys.eventually(timeout: .seconds(30), "\(fresh) declared from the heartbeat") {
                    (try? await inspector.queues([fresh]))?.contains { $0.name == fresh } == true
                }
                #expect(inspector.connectionsOpened == 1, "misses reuse the connection")
                try #require(declared)
                try await sys.store.createTasks([task])
                let done = try await sys.eventually(timeout: .seconds(30), "the task ran on the fresh queue") {
                    try await sys.count(
                        "SELECT count(*) FROM runs WHERE state = 'succeeded' AND worker_id = 'fresh-queue'") == 1
                }
                #expect(done)
            }
        }
    }
}
