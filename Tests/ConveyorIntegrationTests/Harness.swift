import ConveyorAMQP
import ConveyorAPI
import ConveyorBroker
import ConveyorCore
import ConveyorDispatcher
import ConveyorPostgres
import ConveyorStore
import ConveyorTelemetry
import ConveyorWorker
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import Testing

/// Remembers what executors saw: executions per run and the traceparent each got.
final class Recorder: Sendable {
    let executions = Mutex<[UUID: Int]>([:])
    let traceparents = Mutex<[UUID: String]>([:])
    /// Task names in the order executions started.
    let starts = Mutex<[(String, ContinuousClock.Instant)]>([])
    let cancelled = Mutex<Set<UUID>>([])

    var total: Int { executions.withLock { $0.values.reduce(0, +) } }
}

/// Behaves as its parameters say: `sleep_ms` (stops early when cancelled), `fail_times` (fails
/// attempts 1…k with exit code 1), `fail` (always fails, with `exit_code` or 1). Records starts in order.
struct ScriptedExecutor: Executor {
    let recorder: Recorder

    func execute(_ context: ExecutionContext) async -> ExecutionResult {
        recorder.executions.withLock { $0[context.runID, default: 0] += 1 }
        recorder.starts.withLock { $0.append((context.taskName, ContinuousClock.now)) }
        if let ms = context.parameters["sleep_ms"]?.doubleValue {
            do { try await Task.sleep(for: .milliseconds(Int64(ms))) } catch {
                _ = recorder.cancelled.withLock { $0.insert(context.runID) }
                return ExecutionResult(outcome: .cancelled, errorClass: "cancelled", errorMessage: "stopped")
            }
        }
        if let k = context.parameters["fail_times"]?.doubleValue, context.attempt <= Int(k) {
            return .failed("exit_code", "scripted failure of attempt \(context.attempt)", exitCode: 1)
        }
        if context.parameters["fail"] == .bool(true) {
            return .failed(
                "exit_code", "scripted failure",
                exitCode: context.parameters["exit_code"]?.doubleValue.map { Int($0) } ?? 1)
        }
        return .succeeded
    }
}

struct RecordingExecutor: Executor {
    let recorder: Recorder
    var delay: Duration = .zero

    func execute(_ context: ExecutionContext) async -> ExecutionResult {
        recorder.executions.withLock { $0[context.runID, default: 0] += 1 }
        if let tp = context.traceparent { recorder.traceparents.withLock { $0[context.runID] = tp } }
        if delay > .zero { try? await Task.sleep(for: delay) }
        return .succeeded
    }
}

/// One isolated system: its own database and broker names.
struct System {
    let databaseURL: String
    let pool: PostgresPool
    let store: Store
    let prefix: String
    /// In-process components' broker login: `conveyor-admin` (Servers.amqpURL).
    let amqp: AMQPConfiguration
    let queue: String
    /// The per-role logins of the processes a test starts (deploy/broker-permissions.tsv).
    let dispatcherAMQPURL: String
    let workerAMQPURL: String
    let apiAMQPURL: String

    static func with<T>(_ body: (System) async throws -> T) async throws -> T {
        // The metrics backend each command's main bootstraps (once per process): components run
        // in-process record into the same Prometheus registry their `/metrics` routes write out.
        ConveyorMetrics.bootstrap()
        return try await Servers.withDatabase { url in
            var cfg = PostgresPool.Configuration(url: url)
            cfg.maxConnections = 12
            let pool = PostgresPool(configuration: cfg, logger: Servers.logger)
            defer { pool.close() }
            try await Migrator(logger: Servers.logger).migrate(pool)
            var amqp = AMQPConfiguration(url: try Servers.requireAMQP())
            amqp.reconnectCap = .milliseconds(500)
            let system = System(
                databaseURL: url, pool: pool, store: Store(pool: pool), prefix: Servers.uniquePrefix(), amqp: amqp,
                queue: "work",
                dispatcherAMQPURL: try Servers.roleURL(.dispatcher), workerAMQPURL: try Servers.roleURL(.worker),
                apiAMQPURL: try Servers.roleURL(.api))
            return try await body(system)
        }
    }

    func dispatcher(lease: Duration = .seconds(30), _ configure: (inout DispatcherConfiguration) -> Void = { _ in })
        -> Dispatcher
    {
        var c = DispatcherConfiguration()
        c.prefix = prefix
        c.queues = [queue]
        c.scanInterval = .milliseconds(200)
        c.maintenanceInterval = .milliseconds(200)
        c.publishLease = lease
        configure(&c)
        return Dispatcher(
            configuration: c, store: Store(pool: pool), amqp: amqp, databaseURL: databaseURL, logger: Servers.logger)
    }

    func worker(
        _ executors: [String: any Executor], concurrency: Int = 32, id: String = UUID().uuidString,
        _ configure: (inout WorkerConfiguration) -> Void = { _ in }
    ) -> Worker {
        var c = WorkerConfiguration(
            id: id, queues: [queue], concurrency: concurrency, executorNames: Array(executors.keys), prefix: prefix)
        configure(&c)
        return Worker(configuration: c, executors: executors, amqp: amqp, logger: Servers.logger)
    }

    /// The environment of a `conveyor worker` process on this system.
    func workerEnvironment(id: String, executors: String = "sleep", concurrency: Int = 4) -> [String: String] {
        [
            "CONVEYOR_AMQP_URL": workerAMQPURL, "CONVEYOR_AMQP_PREFIX": prefix, "CONVEYOR_WORKER_QUEUES": queue,
            "CONVEYOR_WORKER_EXECUTORS": executors, "CONVEYOR_WORKER_CONCURRENCY": "\(concurrency)",
            "CONVEYOR_WORKER_ID": id,
        ]
    }

    func tasks(
        _ n: Int, executor: String = "record", schedule: Schedule = .once, parameters: JSONValue = .object([:]),
        name: String = "t"
    ) -> [NewTask] {
        (0..<n).map { i in
            var t = NewTask(name: "\(name)-\(i)", executor: executor, schedule: schedule)
            t.queue = queue
            t.parameters = parameters
            t.timeoutSeconds = 30
            return t
        }
    }

    /// One task from a spec mapping (the same decoder as task files), on the test queue.
    func task(_ spec: [String: JSONValue]) throws -> NewTask {
        var o = spec
        o["queue"] = o["queue"] ?? .string(queue)
        o["executor"] = o["executor"] ?? .string("script")
        return try TaskSpec.decode(.object(o))
    }

    /// A connected publisher on this system's broker, declaring `topology`, for `body` only.
    /// Declares the topology as dispatchers do, with the admin login, for a test that starts a
    /// worker without a dispatcher: workers only look up what dispatchers declare.
    @discardableResult
    func declareTopology() async throws -> ConveyorTopology {
        let t = ConveyorTopology(prefix: prefix)
        try await withPublisher(t.work(queues: [queue]).merging(t.status).merging(t.controlPublish)) { _, _ in }
        return t
    }

    func withPublisher<T>(_ topology: AMQPTopology, _ body: (AMQPPublisher, ConveyorTopology) async throws -> T)
        async throws -> T
    {
        let pub = AMQPPublisher(configuration: amqp, topology: topology, logger: Servers.logger)
        pub.start()
        defer { pub.stop() }
        try await pub.waitUntilConnected()
        return try await body(pub, ConveyorTopology(prefix: prefix))
    }

    /// Waits (bounded) until the work queue has no consumer left (a stopped worker's connections
    /// are gone, and with them anything it held unacked is back in the queue), then expects the
    /// queue to be empty: every run the worker took was acked, and nothing will be redelivered.
    func expectNothingToRedeliver(sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let inspector = AMQPInspector(configuration: amqp)
        defer { inspector.close() }
        let queue = ConveyorTopology(prefix: prefix).workQueue(self.queue)
        try await eventually("the work queue's consumers are gone", sourceLocation: sourceLocation) {
            try await inspector.queues([queue]).first?.consumers == 0
        }
        #expect(try await inspector.queues([queue]).first?.messages == 0, sourceLocation: sourceLocation)
    }

    /// Rows of text.
    func rows(_ sql: String, _ params: [any PostgresEncodable] = []) async throws -> [[String?]] {
        try await pool.withConnection { c in try await c.query(sql, params).rows.map(\.values) }
    }

    func count(_ sql: String, _ params: [any PostgresEncodable] = []) async throws -> Int {
        try await pool.withConnection { c in try await c.query(sql, params).first?.int(0) ?? 0 }
    }

    /// Polls until `condition` holds or `timeout` passes; records a test issue if it never does.
    ///
    /// Call it directly, never inside `#expect(…)` or `#require(…)`: an async closure passed
    /// inside the macro's expansion was seen to be run by a later call in its place (Swift 6.3.1),
    /// so waits passed without waiting, or (with `#require`, 2026-12-05) waited on a later
    /// condition and failed. Keep the result and require that: `let ok = try await
    /// sys.eventually { … }; try #require(ok)`.
    @discardableResult
    func eventually(
        timeout: Duration = .seconds(60), _ what: String = "condition",
        sourceLocation: SourceLocation = #_sourceLocation,
        _ condition: () async throws -> Bool
    ) async throws -> Bool {
        if try await Self.poll(timeout: timeout, condition) { return true }
        Issue.record("\(what) did not hold within \(timeout)", sourceLocation: sourceLocation)
        return false
    }

    /// Polls `condition` every `interval` until it holds (true) or `timeout` passes (false).
    static func poll(
        timeout: Duration, every interval: Duration = .milliseconds(100), _ condition: () async throws -> Bool
    ) async throws -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try await condition() { return true }
            try await Task.sleep(for: interval)
        }
        return try await condition()
    }
}

/// Runs `services` in a ServiceGroup for the duration of `body`, then shuts them down gracefully.
func withServices<T: Sendable>(_ services: [any Service], _ body: () async throws -> T) async throws -> T {
    let group = ServiceGroup(configuration: .init(services: services, logger: Servers.logger))
    return try await withThrowingTaskGroup(of: Void.self) { g in
        g.addTask { try await group.run() }
        do {
            let result = try await body()
            await group.triggerGracefulShutdown()
            try await g.waitForAll()
            return result
        } catch {
            await group.triggerGracefulShutdown()
            try? await g.waitForAll()
            throw error
        }
    }
}

/// The `conveyor` binary (or another of the package's executables) built next to the test bundle.
func conveyorBinary(_ name: String = "conveyor") throws -> String {
    // `CONVEYOR_TEST_BINARIES=DIR`: the processes the suites start come from DIR (a release build,
    // say: `scripts/faults.sh` against optimized workers and dispatchers).
    if let dir = Servers.env["CONVEYOR_TEST_BINARIES"], !dir.isEmpty {
        let path = URL(fileURLWithPath: dir).appendingPathComponent(name).path
        return try #require(
            FileManager.default.isExecutableFile(atPath: path) ? path : nil,
            "CONVEYOR_TEST_BINARIES=\(dir) holds no executable \(name)")
    }
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent(name).path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    let fallback = FileManager.default.currentDirectoryPath + "/.build/debug/" + name
    return try #require(
        FileManager.default.isExecutableFile(atPath: fallback) ? fallback : nil,
        "\(name) binary not built: run swift build first")
}

/// `conveyor <args>` with the test environment plus `env`, not started.
func conveyorProcess(_ args: [String], env: [String: String]) throws -> Process {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: try conveyorBinary())
    p.arguments = args
    var e = ProcessInfo.processInfo.environment
    for (k, v) in env { e[k] = v }
    e["CONVEYOR_CONFIG_DIR"] = e["CONVEYOR_CONFIG_DIR"] ?? FileManager.default.currentDirectoryPath + "/config"
    // Several workers run at once in tests: no status endpoint unless a test asks for one.
    e["CONVEYOR_WORKER_HTTP_PORT"] = env["CONVEYOR_WORKER_HTTP_PORT"] ?? "0"
    e["CONVEYOR_DISPATCHER_HTTP_PORT"] = env["CONVEYOR_DISPATCHER_HTTP_PORT"] ?? "0"
    p.environment = e
    return p
}

/// Starts `conveyor <args>` as a child process with extra environment; its log goes to `log` when given.
func spawnConveyor(_ args: [String], env: [String: String], log: String? = nil) throws -> Process {
    let p = try conveyorProcess(args, env: env)
    p.standardOutput = FileHandle.nullDevice
    if let log {
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        p.standardError = FileHandle(forWritingAtPath: log)
    } else {
        p.standardError = Servers.env["CONVEYOR_TEST_LOG"] == "1" ? FileHandle.standardError : FileHandle.nullDevice
    }
    try p.run()
    return p
}

/// Runs `conveyor <args>` to completion; returns its exit status, standard output and error.
func runConveyor(_ args: [String], env: [String: String] = [:]) throws -> (status: Int32, out: String, err: String) {
    try runCapturing(try conveyorProcess(args, env: env))
}

/// Waits for `p` to exit on a thread of its own: `waitUntilExit` blocks, and the cooperative pool
/// (two threads here) must not.
func exited(_ p: Process) async {
    await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
        Thread.detachNewThread {
            p.waitUntilExit()
            c.resume()
        }
    }
}

/// Runs `p` to completion; returns its exit status, standard output and error. Standard error
/// is read on another thread, so a program filling one pipe while the other is read never stalls.
func runCapturing(_ p: Process) throws -> (status: Int32, out: String, err: String) {
    let out = Pipe()
    let err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let errorText = Mutex(Data())
    let readErrors = DispatchGroup()
    DispatchQueue.global().async(group: readErrors) {
        let data = err.fileHandleForReading.readDataToEndOfFile()
        errorText.withLock { $0 = data }
    }
    let o = out.fileHandleForReading.readDataToEndOfFile()
    readErrors.wait()
    p.waitUntilExit()
    return (
        p.terminationStatus, String(decoding: o, as: UTF8.self),
        String(decoding: errorText.withLock { $0 }, as: UTF8.self)
    )
}

extension System {
    /// The status proof the dispatchers give attempt `attempt` of run `id` (the test plays the
    /// worker that received its task message).
    func proof(_ id: UUID, attempt: Int = 1) async throws -> String {
        StatusProof(secret: try await store.statusKey()).sign(runID: id, attempt: attempt)
    }

    /// `statuses`, each carrying its attempt's proof.
    func signed(_ statuses: [StatusMessage]) async throws -> [StatusMessage] {
        let signer = StatusProof(secret: try await store.statusKey())
        return statuses.map {
            var s = $0
            s.proof = signer.sign(runID: s.runID, attempt: s.attempt)
            return s
        }
    }
}

/// A status as a worker publishes it: its body, sealed with its proof when it carries one.
func sealedStatus(_ s: StatusMessage, exchange: String, persistent: Bool = false) -> AMQPOutgoingMessage {
    let body = MessageCodec.encode(s)
    var headers: AMQPHeaders = [:]
    if let proof = s.proof { headers[StatusProof.sealHeader] = .string(StatusProof.seal(body, proof: proof)) }
    return AMQPOutgoingMessage(
        exchange: exchange, routingKey: "status", body: body,
        properties: AMQPProperties(type: statusMessageType, persistent: persistent, headers: headers))
}
