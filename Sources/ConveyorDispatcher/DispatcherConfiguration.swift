/// Settings of the dispatcher. Keys under `dispatcher.` in `config/dispatcher.yaml`, each
/// overridable by `CONVEYOR_DISPATCHER_<KEY>`.
public struct DispatcherConfiguration: Sendable {
    /// Task groups claimed concurrently per tick, each on its own connection. Key `groups`, default 4.
    public var groups = 4
    /// Rows claimed per transaction. Key `batch_size`, default 500.
    public var batchSize = 500
    /// Longest sleep between scans when nothing wakes the dispatcher. Key `scan_interval_ms`, default 1000.
    public var scanInterval: Duration = .seconds(1)
    /// How long a `queued` run may wait for its broker confirm before any dispatcher republishes
    /// it (the outbox lease). Key `publish_lease_seconds`, default 30.
    public var publishLease: Duration = .seconds(30)
    /// Status events recorded per transaction. Key `status_batch_size`, default 1000.
    public var statusBatchSize = 1000
    /// Work queues declared at start-up (others are declared when first used). Key `queues`, default [default].
    public var queues = ["default"]
    /// Prefix of broker object names. Key `amqp.prefix`, default `conveyor`.
    public var prefix = "conveyor"
    /// Deliveries before the broker dead-letters a message. Key `amqp.delivery_limit`, default 5.
    public var deliveryLimit = 5

    public init() {}
}
