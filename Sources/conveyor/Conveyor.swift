import ArgumentParser
import ConveyorAMQP
import ConveyorAPI
import ConveyorBroker
import ConveyorConfig
import ConveyorCore
import ConveyorDispatcher
import ConveyorFaults
import ConveyorHTTP
import ConveyorPostgres
import ConveyorStore
import ConveyorTelemetry
import ConveyorWorker
import Foundation
import Logging
import ServiceLifecycle
import UnixSignals

@main
struct Conveyor: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "conveyor",
        abstract: "Conveyor: a distributed task dispatcher on PostgreSQL and RabbitMQ.",
        discussion: """
            This runs the processes and sets them up. Tasks, runs, groups and queues are operated with \
            conveyorctl, through the API (authenticated and audited).
            """,
        version: ConveyorVersion.current,
        subcommands: [
            Migrate.self, DispatcherCommand.self, WorkerCommand.self, Dev.self, APICommand.self, APIKeyCommand.self,
            EnqueueGrantCommand.self, CronCommand.self, Bench.self, BenchAPI.self,
        ])

    /// ArgumentParser's main, except that a failure's message goes out through the log sink: in
    /// one write, after the lines already queued. Printed directly, it can be cut in two by a log
    /// line from a connection's thread that is still retrying.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            let text = fullMessage(for: error)
            guard exitCode(for: error) != .success, !text.isEmpty else { exit(withError: error) }
            LogSink.standardError.writeNow(text.hasSuffix("\n") ? text : text + "\n")
            Foundation.exit(exitCode(for: error).rawValue)
        }
    }
}

/// Options every server subcommand shares.
struct CommonOptions: ParsableArguments {
    @Option(
        name: .customLong("config-dir"), help: "Folder with dispatcher.yaml and worker.yaml (env CONVEYOR_CONFIG_DIR).")
    var configDir: String?

    @Option(
        name: .customLong("log-level"),
        help: "trace, debug, info, notice, warning, error or critical (env CONVEYOR_LOG_LEVEL).")
    var logLevel: String?

    var directory: String {
        configDir ?? ProcessInfo.processInfo.environment["CONVEYOR_CONFIG_DIR"] ?? "config"
    }

    func settings(_ file: String) async throws -> Settings {
        try await Settings.load(file: "\(directory)/\(file)", required: configDir != nil)
    }

    func logger(_ label: String) throws -> Logger {
        let raw = logLevel ?? ProcessInfo.processInfo.environment["CONVEYOR_LOG_LEVEL"] ?? "info"
        guard let level = Logger.Level(rawValue: raw.lowercased()) else {
            throw ValidationError(
                field: "--log-level (env CONVEYOR_LOG_LEVEL)", value: raw,
                hint: "use one of trace, debug, info, notice, warning, error, critical")
        }
        let formatText = ProcessInfo.processInfo.environment["CONVEYOR_LOG_FORMAT"] ?? "text"
        guard let format = StructuredLogHandler.Format(rawValue: formatText.lowercased()) else {
            throw ValidationError(
                field: "CONVEYOR_LOG_FORMAT", value: formatText, hint: "use json (for log collectors), logfmt or text")
        }
        Bootstrap.logging(level: level, format: format)
        ConveyorMetrics.bootstrap()
        let logger = Logger(label: label)
        // conveyor.dispatcher → service name conveyor-dispatcher (OTEL_SERVICE_NAME overrides).
        try Bootstrap.tracing(serviceName: label.replacingOccurrences(of: ".", with: "-"), logger: logger)
        return logger
    }
}

/// Runs `services` in one ServiceGroup; SIGTERM and SIGINT start a graceful shutdown. The span
/// exporter comes first, so it stops last and flushes the spans the others ended.
func runUntilSignalled(_ services: [any Service], logger: Logger) async throws {
    let all = (Bootstrap.tracingService.map { [$0] } ?? []) + services
    try await ServiceGroup(
        configuration: .init(services: all, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
    ).run()
}

enum Bootstrap {
    nonisolated(unsafe) private static var done = false  // set once from main before any other task runs

    static func logging(level: Logger.Level, format: StructuredLogHandler.Format) {
        guard !done else { return }
        done = true
        LoggingSystem.bootstrap { label in StructuredLogHandler(label: label, format: format, level: level) }
        LogSink.flushAtExit()
    }

    nonisolated(unsafe) private(set) static var tracingService: (any Service)?  // set once from main, like `done`
    nonisolated(unsafe) private static var tracingDone = false

    static func tracing(serviceName: String, logger: Logger) throws {
        guard !tracingDone else { return }
        tracingDone = true
        tracingService = try Traces.bootstrap(
            serviceName: serviceName, environment: ProcessInfo.processInfo.environment, logger: logger)
    }
}

/// Connection settings shared by the processes. Keys `database.*` and `amqp.*`.
struct Connections {
    var databaseURL: String
    var poolSize: Int
    var amqp: AMQPConfiguration

    static let defaultDatabaseURL = "postgresql://conveyor@127.0.0.1:55432/conveyor"

    init(settings s: Settings, poolSize defaultPool: Int = 10) throws {
        databaseURL = try s.string("database.url", default: Self.defaultDatabaseURL)
        poolSize = try s.int("database.pool_size", default: defaultPool, range: 1...500)
        amqp = try AMQPConfiguration(settings: s)
    }

    func pool(logger: Logger, connectRetryFor: Duration = .seconds(60)) -> PostgresPool {
        var c = PostgresPool.Configuration(url: databaseURL)
        c.maxConnections = poolSize
        c.connectRetryFor = connectRetryFor
        return PostgresPool(configuration: c, logger: logger)
    }
}

extension DispatcherConfiguration {
    init(settings s: Settings) throws {
        self.init()
        groups = try s.int("dispatcher.groups", default: 4, range: 1...64)
        batchSize = try s.int("dispatcher.batch_size", default: 500, range: 1...10_000)
        scanInterval = try s.milliseconds("dispatcher.scan_interval_ms", default: 1000, range: 10...60_000)
        publishLease = .seconds(try s.int("dispatcher.publish_lease_seconds", default: 30, range: 1...3600))
        statusBatchSize = try s.int("dispatcher.status_batch_size", default: 1000, range: 1...20_000)
        queues = try s.strings("dispatcher.queues", default: ["default"])
        prefix = try s.string("amqp.prefix", default: "conveyor")
        deliveryLimit = try s.int("amqp.delivery_limit", default: 5, range: 1...1000)
        misfireGrace = try s.milliseconds("dispatcher.misfire_grace_ms", default: 60_000, range: 0...86_400_000)
        maxBacklogPerQueue = try s.int("dispatcher.max_backlog_per_queue", default: 1000, range: 1...1_000_000)
        lostGrace = try s.milliseconds("dispatcher.lost_grace_ms", default: 30_000, range: 0...86_400_000)
        workerLostAfterMissed = try s.int("dispatcher.worker_lost_after_missed", default: 3, range: 2...100)
        maintenanceInterval = try s.milliseconds(
            "dispatcher.maintenance_interval_ms", default: 1000, range: 10...60_000)
        runRetention = .seconds(86_400 * (try s.int("retention.runs_days", default: 30, range: 1...36_500)))
        deletedTaskRetention = .seconds(
            86_400 * (try s.int("retention.deleted_tasks_days", default: 7, range: 0...36_500)))
        workerRetention = .seconds(3600 * (try s.int("retention.workers_hours", default: 24, range: 1...87_600)))
        callbacks.concurrency = try s.int("callbacks.concurrency", default: 16, range: 1...1000)
        callbacks.timeout = try s.milliseconds("callbacks.timeout_ms", default: 10_000, range: 100...300_000)
        callbacks.maxAttempts = try s.int("callbacks.max_attempts", default: 8, range: 1...100)
        callbacks.backoffBase = try s.milliseconds("callbacks.backoff_base_ms", default: 1000, range: 1...3_600_000)
        callbacks.backoffCap = try s.milliseconds("callbacks.backoff_cap_ms", default: 300_000, range: 1...86_400_000)
        try callbacks.policy.read(s.scoped("callbacks"))
        callbacks.policy.maxRedirects = 0
        faults = try FaultInjection.fromEnvironment()
    }
}

struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Apply database migrations (safe to run twice or concurrently).")
    @OptionGroup var common: CommonOptions

    func run() async throws {
        let logger = try common.logger("conveyor.migrate")
        let c = try Connections(settings: try await common.settings("dispatcher.yaml"), poolSize: 1)
        let pool = c.pool(logger: logger)
        defer { pool.close() }
        let applied = try await Migrator(logger: logger).migrate(pool)
        print(applied.isEmpty ? "schema up to date" : "applied: \(applied.joined(separator: ", "))")
    }
}

struct DispatcherCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dispatcher", abstract: "Run a dispatcher (any number may run at once).")
    @OptionGroup var common: CommonOptions

    func run() async throws {
        let logger = try common.logger("conveyor.dispatcher")
        let (dispatcher, pool) = try await common.makeDispatcher(logger: logger)
        defer { pool.close() }
        let s = try await common.settings("dispatcher.yaml")
        let port = try s.int("dispatcher.http_port", default: 9090, range: 0...65_535)
        var services: [any Service] = [dispatcher]
        if port > 0 {
            // /healthz, /readyz (publishing and consuming statuses), /metrics.
            services.append(
                StatusServer(
                    host: try s.string("dispatcher.http_host", default: "0.0.0.0"), port: port, logger: logger,
                    ready: { dispatcher.isReady }, metrics: { ConveyorMetrics.text() }))
        }
        try await runUntilSignalled(services, logger: logger)
    }
}

struct WorkerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker", abstract: "Run a worker (needs only RabbitMQ).")
    @OptionGroup var common: CommonOptions

    func run() async throws {
        let logger = try common.logger("conveyor.worker")
        let workers = try await common.makeWorkers(count: 1, logger: logger)
        let hangup = ReloadOnHangup(options: common, workers: workers, logger: logger)
        try await runUntilSignalled(workers + statusServer(for: workers, logger: logger) + [hangup], logger: logger)
    }
}

/// The workers' `/healthz`, `/readyz` (every worker consuming) and `/metrics`, on the first
/// worker's `worker.http_port`; none when it is 0.
func statusServer(for workers: [Worker], logger: Logger) -> [any Service] {
    guard let first = workers.first, first.configuration.httpPort > 0 else { return [] }
    return [
        StatusServer(
            host: first.configuration.httpHost, port: first.configuration.httpPort, logger: logger,
            ready: { workers.allSatisfy(\.isReady) },
            metrics: {
                for w in workers { w.refreshMetrics() }
                return ConveyorMetrics.text()
            })
    ]
}

struct Dev: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Migrate, then run a dispatcher, workers and the API in one process (for a laptop).")
    @OptionGroup var common: CommonOptions
    @Option(help: "Workers to run in this process.") var workers = 2
    @Flag(help: "Create the demo tasks (a few interval tasks and one shell task) if missing.") var demo = false
    @Option(name: .customLong("api-port"), help: "Port of the REST API on 127.0.0.1; 0 runs no API.") var apiPort = 8080

    func run() async throws {
        let logger = try common.logger("conveyor.dev")
        let (dispatcher, pool) = try await common.makeDispatcher(logger: logger)
        defer { pool.close() }
        try await Migrator(logger: logger).migrate(pool)
        if demo { try await Demo.create(dispatcher.store, logger: logger) }
        let workers = try await common.makeWorkers(count: max(workers, 1), logger: logger)
        let hangup = ReloadOnHangup(options: common, workers: workers, logger: logger)
        var api: [any Service] = []
        if apiPort > 0 {
            // On a laptop with no key yet, make one admin key and show it once.
            if try await dispatcher.store.apiKeys().isEmpty {
                let (key, prefix, hash) = APIKeyFormat.generate()
                try await dispatcher.store.createAPIKey(
                    prefix: prefix, secretHash: hash, name: "conveyor dev", role: Role.admin.rawValue, namespace: "*",
                    expiresAt: nil
                )
                FileHandle.standardError.write(
                    Data("[dev] API on http://127.0.0.1:\(apiPort); admin key (shown once): \(key)\n".utf8))
                try Self.writeCtlConfig(url: "http://127.0.0.1:\(apiPort)", key: key)
            }
            let s = try await common.settings("api.yaml")
            api = [
                APIService(
                    host: "127.0.0.1", port: apiPort, store: dispatcher.store, logger: logger,
                    options: try APICommand.options(s),
                    broker: try Connections(settings: s).amqp,
                    topology: ConveyorTopology(prefix: try s.string("amqp.prefix", default: "conveyor")))
            ]
        }
        try await runUntilSignalled(
            [dispatcher] + workers + statusServer(for: workers, logger: logger) + api + [hangup], logger: logger)
    }
}

extension Dev {
    /// Leaves conveyorctl ready in this directory: `.local/conveyorctl.yaml` names the local API
    /// and `.local/dev/api-key` (mode 0600) holds the admin key just printed. conveyorctl reads
    /// the file when no other configuration is given (`--config`, `CONVEYORCTL_CONFIG`,
    /// `~/.config/conveyor/ctl.yaml`); `--url`, `CONVEYOR_URL` and `CONVEYOR_API_KEY` still win.
    static func writeCtlConfig(url: String, key: String) throws {
        let local = FileManager.default.currentDirectoryPath + "/.local"
        try FileManager.default.createDirectory(
            atPath: local + "/dev", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let keyPath = local + "/dev/api-key"
        guard
            FileManager.default.createFile(
                atPath: keyPath, contents: Data((key + "\n").utf8), attributes: [.posixPermissions: 0o600])
        else {
            throw ValidationError(
                field: "dev key file", value: keyPath, hint: "cannot write it; check the permissions of .local")
        }
        try "url: \(url)\nkey_file: \(keyPath)\n".write(
            toFile: local + "/conveyorctl.yaml", atomically: true, encoding: .utf8)
        FileHandle.standardError.write(
            Data("[dev] conveyorctl is configured for it here (\(local)/conveyorctl.yaml)\n".utf8))
    }
}

extension CommonOptions {
    /// The dispatcher configured by dispatcher.yaml (and the environment), with the pool it uses:
    /// close the pool when the dispatcher is done.
    func makeDispatcher(logger: Logger) async throws -> (Dispatcher, PostgresPool) {
        let s = try await settings("dispatcher.yaml")
        let dc = try DispatcherConfiguration(settings: s)
        let c = try Connections(settings: s, poolSize: dc.groups + 4)
        let pool = c.pool(logger: logger)
        return (
            Dispatcher(
                configuration: dc, store: Store(pool: pool), amqp: c.amqp, databaseURL: c.databaseURL, logger: logger),
            pool
        )
    }

    /// `count` workers configured by worker.yaml (and the environment), sharing one set of
    /// executors; with more than one, their ids get `-w0`, `-w1`, ….
    func makeWorkers(count: Int, logger: Logger) async throws -> [Worker] {
        let s = try await settings("worker.yaml")
        return try (0..<count).map { i in
            try Worker.make(settings: s, logger: logger, idSuffix: count > 1 ? "-w\(i)" : "")
        }
    }
}

enum Demo {
    static func create(_ store: Store, logger: Logger) async throws {
        var tasks: [NewTask] = []
        var heartbeat = NewTask(name: "demo-heartbeat", executor: "noop", schedule: .interval(seconds: 5))
        heartbeat.timeoutSeconds = 10
        tasks.append(heartbeat)
        var nap = NewTask(name: "demo-nap", executor: "sleep", schedule: .interval(seconds: 10))
        nap.parameters = .object(["seconds": .number(1.5)])
        tasks.append(nap)
        var flaky = NewTask(name: "demo-fails", executor: "sleep", schedule: .interval(seconds: 15))
        flaky.parameters = .object(["seconds": .number(0.2), "fail": .bool(true)])
        tasks.append(flaky)
        var shell = NewTask(name: "demo-shell", executor: "shell", schedule: .interval(seconds: 10))
        shell.parameters = .object(["argv": .array([.string("/bin/echo"), .string("hello from conveyor")])])
        tasks.append(shell)
        for t in tasks where try await store.task(named: t.name) == nil {
            try await store.createTasks([t])
            logger.info(
                "demo task created", metadata: ["task.name": "\(t.name)", "task.schedule": "\(t.schedule.text)"])
        }
    }
}

/// On SIGHUP, reads worker.yaml (and the environment) again and gives the workers the new
/// executors. An invalid file is refused with its error, and the workers keep what they had. A
/// service of the process, so it ends with the others; SIGHUP is ignored from the moment it is made
/// (its default action would end the process), before the service starts listening.
struct ReloadOnHangup: Service {
    let options: CommonOptions
    let workers: [Worker]
    let logger: Logger

    init(options: CommonOptions, workers: [Worker], logger: Logger) {
        signal(SIGHUP, SIG_IGN)
        self.options = options
        self.workers = workers
        self.logger = logger
    }

    func run() async throws {
        for await _ in await UnixSignalsSequence(trapping: .sighup).cancelOnGracefulShutdown() {
            do {
                let s = try await options.settings("worker.yaml")
                for w in workers { try w.reload(from: s) }
            } catch {
                logger.error(
                    "configuration reload refused; the previous configuration stays", metadata: ["error": "\(error)"])
            }
        }
    }
}
