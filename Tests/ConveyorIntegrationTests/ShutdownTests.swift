import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorDispatcher
import ConveyorPostgres
import ConveyorStore
import ConveyorWorker
import Foundation
import ServiceLifecycle
import Synchronization
import Testing

/// Opens once for every waiter, now and later; a waiter whose task is cancelled gets `false`.
final class Gate: Sendable {
    private struct State {
        var open = false
        var waiters: [Int: CheckedContinuation<Bool, Never>] = [:]
        var cancelled: Set<Int> = []
        var nextID = 0
    }
    private let state = Mutex(State())

    func open() {
        let waiters = state.withLock { s in
            s.open = true
            defer { s.waiters = [:] }
            return Array(s.waiters.values)
        }
        for w in waiters { w.resume(returning: true) }
    }

    /// Whether the gate opens within `limit`.
    func opens(within limit: Duration) async -> Bool {
        await withTaskGroup(of: Bool.self) { race in
            race.addTask { await self.wait() }
            race.addTask { (try? await Task.sleep(for: limit)) == nil }
            defer { race.cancelAll() }
            return await race.next() ?? false
        }
    }

    func wait() async -> Bool {
        let id = state.withLock { s in
            defer { s.nextID += 1 }
            return s.nextID
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (w: CheckedContinuation<Bool, Never>) in
                let now: Bool? = state.withLock { s in
                    if s.cancelled.remove(id) != nil { return false }
                    if s.open { return true }
                    s.waiters[id] = w
                    return nil
                }
                if let now { w.resume(returning: now) }
            }
        } onCancel: {
            let w = state.withLock { s in
                guard let w = s.waiters.removeValue(forKey: id) else {
                    s.cancelled.insert(id)
                    return nil as CheckedContinuation<Bool, Never>?
                }
                return w
            }
            w?.resume(returning: false)
        }
    }
}

/// Holds each run until its gate opens (succeeded) or the worker cancels it (cancelled).
struct HeldExecutor: Executor {
    let gate: Gate
    let recorder: Recorder

    func execute(_ context: ExecutionContext) async -> ExecutionResult {
        recorder.executions.withLock { $0[context.runID, default: 0] += 1 }
        if await gate.wait() { return .succeeded }
        _ = recorder.cancelled.withLock { $0.insert(context.runID) }
        return ExecutionResult(outcome: .cancelled, errorClass: "cancelled", errorMessage: "stopped by the drain")
    }
}

/// The order in which processes stop (docs/architecture.md, "Shutdown"), step by step, with the
/// test deciding when each thing the shutdown waits for happens: runs held by a gate, the drain
/// deadline on a clock that moves only when told, a recording blocked by a row lock.
@Suite("Shutdown order (real PostgreSQL and RabbitMQ)", .serialized)
struct ShutdownTests {
    enum Drain: String, CaseIterable, Sendable, CustomTestStringConvertible {
        /// The runs end before the deadline: they are reported and acked where they are.
        case withinGrace
        /// The deadline passes first: the runs are cancelled, not acked, and the broker redelivers them.
        case pastGrace
        var testDescription: String { rawValue }
    }

    /// Runs `worker` in a service group of its own: the group (to shut it down), a gate that
    /// opens when it has returned, and its task.
    static func start(_ worker: Worker) -> (group: ServiceGroup, stopped: Gate, running: Task<Void, any Error>) {
        let group = ServiceGroup(configuration: .init(services: [worker], logger: Servers.logger))
        let stopped = Gate()
        let running = Task {
            defer { stopped.open() }
            try await group.run()
        }
        return (group, stopped, running)
    }

    @Test(arguments: Drain.allCases)
    func aWorkerStopsIntakeDrainsToItsDeadlineThenCloses(_ drain: Drain) async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            let clock = ManualClock()
            let gate = Gate()
            let held = Recorder()
            let grace = Duration.seconds(30)
            let worker = sys.worker(["hold": HeldExecutor(gate: gate, recorder: held)], id: "draining") {
                $0.clock = clock
                $0.shutdownGrace = grace
            }
            try await withServices([dispatcher]) {
                let (group, stopped, running) = Self.start(worker)
                try await sys.store.createTasks(sys.tasks(3, executor: "hold"))
                try await sys.eventually(timeout: .seconds(30), "3 runs held by the worker") { held.total == 3 }

                await group.triggerGracefulShutdown()
                // Draining: intake stopped, and the drain's deadline is a sleep on the worker's
                // clock beside the heartbeat's.
                try await sys.eventually(timeout: .seconds(10), "the drain waits for its deadline") {
                    clock.sleepers == 2 && !worker.isReady
                }
                #expect(worker.stats.inFlight == 3, "the runs in hand are still running")
                switch drain {
                case .withinGrace: gate.open()
                case .pastGrace: clock.advance(by: grace)
                }
                let returned = await stopped.opens(within: .seconds(20))
                try #require(returned, "the worker did not stop within 20 s of its runs ending or its deadline")
                try await running.value
                // Returned means closed: a process exits right after, and an ack still queued on
                // a connection's thread then would be lost (the broker would run that run again).
                #expect(worker.connectionsClosed, "run returned before its connections' threads closed them")
                switch drain {
                case .withinGrace:
                    #expect(held.cancelled.withLock { $0.isEmpty })
                    try await sys.eventually("3 runs succeeded on the draining worker") {
                        try await sys.count(
                            "SELECT count(*) FROM runs WHERE state = 'succeeded' AND worker_id = 'draining'") == 3
                    }
                    try await sys.expectNothingToRedeliver()
                case .pastGrace:
                    #expect(held.cancelled.withLock { $0.count } == 3, "the deadline cancelled the 3 runs")
                    let again = Recorder()
                    let survivor = sys.worker(["hold": RecordingExecutor(recorder: again)], id: "survivor")
                    _ = try await withServices([survivor]) {
                        try await sys.eventually("the 3 cut runs were redelivered and succeeded") {
                            try await sys.count(
                                "SELECT count(*) FROM runs WHERE state = 'succeeded' AND worker_id = 'survivor'") == 3
                        }
                    }
                    #expect(again.total == 3)
                }
            }
            #expect(try await sys.count("SELECT count(*) FROM runs") == 3, "one run per task: nothing was redone")
        }
    }

    /// A draining worker still keeps its runs' timeouts: runs that pass theirs during the drain
    /// are stopped and reported `timed_out` then, not held until the drain deadline (here a clock
    /// that never moves) or cut by it.
    @Test func aRunsTimeoutFiresWhileItsWorkerDrains() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            let clock = ManualClock()
            let gate = Gate()
            let held = Recorder()
            let worker = sys.worker(["hold": HeldExecutor(gate: gate, recorder: held)], id: "draining") {
                $0.clock = clock
                $0.shutdownGrace = .seconds(30)
            }
            try await withServices([dispatcher]) {
                let (group, stopped, running) = Self.start(worker)
                let tasks = sys.tasks(3, executor: "hold").map { t in
                    var t = t
                    t.timeoutSeconds = 5
                    return t
                }
                try await sys.store.createTasks(tasks)
                try await sys.eventually(timeout: .seconds(30), "3 runs held by the worker") { held.total == 3 }
                await group.triggerGracefulShutdown()
                try await sys.eventually(timeout: .seconds(10), "the drain waits for its deadline") {
                    clock.sleepers == 2 && !worker.isReady
                }
                // Draining with the runs still held: the timeouts to come fire within the drain.
                try #require(worker.stats.inFlight == 3 && held.cancelled.withLock { $0.isEmpty })
                let returned = await stopped.opens(within: .seconds(20))
                try #require(returned, "the worker did not stop within 20 s: its runs' timeouts did not fire")
                try await running.value
                #expect(held.cancelled.withLock { $0.count } == 3, "each executor was stopped by its timeout")
                try await sys.eventually("3 runs timed out on the draining worker") {
                    try await sys.count(
                        "SELECT count(*) FROM runs WHERE state = 'timed_out' AND worker_id = 'draining'") == 3
                }
                try await sys.expectNothingToRedeliver()
            }
        }
    }

    /// The dispatcher stops intake, lets every part finish the work in hand, and only then closes
    /// its connections. Here the status recorder is in the middle of a batch (its transaction
    /// waits on row locks this test holds) when shutdown begins: every other part returns, the
    /// recording waits, and once the locks go it commits and acks the whole batch.
    @Test func aStatusBatchBeingRecordedAtShutdownIsRecordedAndAckedInFull() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher()
            let topology = ConveyorTopology(prefix: sys.prefix)
            let group = ServiceGroup(configuration: .init(services: [dispatcher], logger: Servers.logger))
            let running = Task { try await group.run() }
            try await sys.store.createTasks(sys.tasks(5))
            try await sys.eventually("5 runs dispatched") {
                try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 5
            }
            let runs = try await sys.store.runs(limit: 10)
            let statuses = try await sys.signed(
                runs.map {
                    StatusMessage(runID: $0.id, attempt: 1, event: .finished, outcome: .succeeded, workerID: "w")
                })
            try await sys.pool.withConnection { blocker in
                try await blocker.simple("BEGIN")
                try await blocker.simple("SELECT id FROM runs FOR UPDATE")
                try await sys.withPublisher(topology.status) { pub, _ in
                    for s in statuses { try await pub.publish(sealedStatus(s, exchange: topology.statusExchange)) }
                }
                let waiting = """
                    SELECT count(*) FROM pg_stat_activity
                    WHERE wait_event_type = 'Lock' AND datname = current_database()
                    """
                try await sys.eventually("the recorder's transaction waits on the locks") {
                    try await sys.count(waiting) > 0
                }
                await group.triggerGracefulShutdown()
                try await sys.eventually("every part but the recorder has returned") {
                    dispatcher.partsRunning == 1
                }
                #expect(try await sys.count(waiting) > 0, "the recording was not cut short")
                try await blocker.simple("COMMIT")
            }
            try await running.value
            #expect(dispatcher.partsRunning == 0)
            #expect(dispatcher.connectionsClosed, "run returned before its connections' threads closed them")
            #expect(try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 5)
            // The batch was acked before the connections closed: nothing is left to redeliver.
            let inspector = AMQPInspector(configuration: sys.amqp)
            defer { inspector.close() }
            let queue = topology.statusQueue
            #expect(try await inspector.queues([queue]).first?.messages == 0)
        }
    }
}
