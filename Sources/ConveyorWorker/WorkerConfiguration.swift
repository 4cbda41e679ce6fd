public import ConveyorAMQP
public import ConveyorConfig
public import ConveyorCore
package import ConveyorFaults
import Foundation

/// Settings of a worker, from `config/worker.yaml` (env overrides `CONVEYOR_WORKER_*`).
///
/// Keys:
/// - `worker.id`: default `<host>-<pid>`.
/// - `worker.queues`: work queues to consume, default `[default]`.
/// - `worker.concurrency`: runs at once (also the prefetch), default 16.
/// - `worker.executors`: names of the `executors.<name>` entries this worker offers, default `[noop]`.
/// - `worker.shutdown_grace_ms`: drain time on SIGTERM, default 25000.
/// - `worker.started_after_ms`: a run still going after this long reports `started`; shorter runs
///   carry their start time in `finished` instead. 0 reports every start. Default 1000.
/// - `worker.detach_after_ms`: a run still going after this long is *detached*: the worker
///   acknowledges its task message (reporting it first), so the broker's `consumer_timeout`
///   cannot cancel it, and its heartbeats protect it instead. Keep it well below the broker's
///   consumer_timeout. 0 never detaches. Default 300000 (5 minutes).
/// - `worker.heartbeat_interval_ms`: how often the worker reports itself and its runs, default 5000.
/// - `worker.http_port` (default 9091; 0 disables) and `worker.http_host` (default 0.0.0.0): the
///   worker's `/healthz`, `/readyz` and `/metrics`.
/// - `executors.<name>.max_concurrency`: runs of that executor at once on this worker (default:
///   no limit below `worker.concurrency`). Runs past it wait for a slot before their timeout starts.
/// - `amqp.prefix`, `amqp.delivery_limit`: broker names and dead-letter threshold (as the dispatcher's).
public struct WorkerConfiguration: Sendable {
    public var id: String
    public var queues: [String]
    public var concurrency: Int
    public var executorNames: [String]
    public var shutdownGrace: Duration
    public var startedAfter: Duration
    /// nil: never detach.
    public var detachAfter: Duration? = .seconds(300)
    public var heartbeatInterval: Duration = .seconds(5)
    public var httpHost = "0.0.0.0"
    /// 0: no status endpoint.
    public var httpPort = 0
    /// Per-executor limits below `concurrency`, by executor name.
    public var executorLimits: [String: Int] = [:]
    public var prefix: String
    public var deliveryLimit: Int
    /// Test-only faults (`CONVEYOR_TEST_FAULTS`, see `FaultInjection`); empty in production.
    package var faults = FaultInjection()
    /// The clock of the drain deadline and the heartbeat interval; a test's moves only when told.
    package var clock: any Clock<Duration> = ContinuousClock()

    public init(
        id: String? = nil, queues: [String] = ["default"], concurrency: Int = 16, executorNames: [String] = ["noop"],
        shutdownGrace: Duration = .seconds(25), startedAfter: Duration = .seconds(1),
        prefix: String = "conveyor", deliveryLimit: Int = 5
    ) {
        // A host name may be 253 characters; a worker id is at most `WorkerID.maxLength`.
        self.id =
            id
            ?? "\(ProcessInfo.processInfo.hostName.prefix(WorkerID.maxLength - 20))-\(ProcessInfo.processInfo.processIdentifier)"
        self.queues = queues
        self.concurrency = concurrency
        self.executorNames = executorNames
        self.shutdownGrace = shutdownGrace
        self.startedAfter = startedAfter
        self.prefix = prefix
        self.deliveryLimit = deliveryLimit
    }

    public init(settings s: Settings) throws(ValidationError) {
        let id = try s.optionalString("worker.id")
        // Heartbeats and statuses carry it, and the dispatcher refuses one longer than 200
        // characters (runs.worker_id is indexed): such a worker's runs would never be recorded.
        if let id, !WorkerID.isValid(id) {
            throw s.bad("worker.id", "\(WorkerID.hint), e.g. the pod name (default: host-pid)")
        }
        self.init(id: id)
        queues = try s.strings("worker.queues", default: ["default"])
        guard !queues.isEmpty else { throw s.bad("worker.queues", "list at least one queue, e.g. [default]") }
        for q in queues where !QueueName.isValid(q) {
            throw ValidationError(
                field: "\(s.source): worker.queues", value: q,
                hint: "queue names use letters, digits, '-', '_' and '.' only")
        }
        concurrency = try s.int("worker.concurrency", default: 16, range: 1...10_000)
        executorNames = try s.strings("worker.executors", default: ["noop"])
        guard !executorNames.isEmpty else {
            throw s.bad("worker.executors", "list the executors this worker offers, e.g. [noop, shell]")
        }
        shutdownGrace = try s.milliseconds("worker.shutdown_grace_ms", default: 25_000, range: 0...3_600_000)
        startedAfter = try s.milliseconds("worker.started_after_ms", default: 1_000, range: 0...600_000)
        let detach = try s.milliseconds("worker.detach_after_ms", default: 300_000, range: 0...86_400_000)
        detachAfter = detach == .zero ? nil : detach
        heartbeatInterval = try s.milliseconds("worker.heartbeat_interval_ms", default: 5_000, range: 100...600_000)
        httpHost = try s.string("worker.http_host", default: "0.0.0.0")
        httpPort = try s.int("worker.http_port", default: 9091, range: 0...65_535)
        for name in executorNames {
            let limit = try s.int("executors.\(name).max_concurrency", default: 0, range: 0...10_000)
            if limit > 0 && limit < concurrency { executorLimits[name] = limit }
        }
        prefix = try s.string("amqp.prefix", default: "conveyor")
        deliveryLimit = try s.int("amqp.delivery_limit", default: 5, range: 1...1000)
        faults = try FaultInjection.fromEnvironment()
    }
}

extension AMQPConfiguration {
    /// `amqp.url` (default `amqp://127.0.0.1:55672/%2F`; several URLs separated by commas for a
    /// cluster) or `amqp.endpoints` (the same as a list), `amqp.heartbeat_seconds` (10),
    /// `amqp.connect_retry_seconds` (60) and `amqp.reconnect_max_ms` (2000), from a settings file
    /// and the environment.
    public init(settings s: Settings) throws {
        let url = try s.optionalString("amqp.url")
        let list = try s.strings("amqp.endpoints", default: [])
        if url != nil && !list.isEmpty {
            throw s.bad(
                "amqp.endpoints",
                """
                amqp.url (env CONVEYOR_AMQP_URL) is set too: give the brokers in one of them, either as \
                amqp.endpoints or as a comma-separated amqp.url
                """)
        }
        self.init(url: list.isEmpty ? url ?? "amqp://127.0.0.1:55672/%2F" : list.joined(separator: ","))
        heartbeat = .seconds(try s.int("amqp.heartbeat_seconds", default: 10, range: 0...600))
        connectRetryFor = .seconds(try s.int("amqp.connect_retry_seconds", default: 60, range: 0...3600))
        reconnectCap = try s.milliseconds("amqp.reconnect_max_ms", default: 2_000, range: 100...60_000)
        try validate()
    }
}
