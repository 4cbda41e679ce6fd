import ConveyorCore
package import ConveyorFaults

/// Settings of the dispatcher. Keys under `dispatcher.` in `config/dispatcher.yaml`, each
/// overridable by `CONVEYOR_DISPATCHER_<KEY>`.
package struct DispatcherConfiguration: Sendable {
    /// Task groups claimed concurrently per tick, each on its own connection, when the previous
    /// tick moved at least `batch_size` runs, created plus published (a burst); a tick after a
    /// lighter one claims as one group. Key `groups`,
    /// default 4.
    package var groups = 4
    /// Rows claimed per transaction. Key `batch_size`, default 500.
    package var batchSize = 500
    /// Longest sleep between scans when nothing wakes the dispatcher. Key `scan_interval_ms`, default 1000.
    package var scanInterval: Duration = .seconds(1)
    /// How long a `queued` run may wait for its broker confirm before any dispatcher republishes
    /// it (the outbox lease). Key `publish_lease_seconds`, default 30.
    package var publishLease: Duration = .seconds(30)
    /// Status events recorded per transaction. Key `status_batch_size`, default 1000.
    package var statusBatchSize = 1000
    /// Work queues declared at start-up (others are declared when first used). Key `queues`, default [default].
    package var queues = ["default"]
    /// Prefix of broker object names. Key `amqp.prefix`, default `conveyor`.
    package var prefix = "conveyor"
    /// Deliveries before the broker dead-letters a message. Key `amqp.delivery_limit`, default 5.
    package var deliveryLimit = 5

    /// Occurrences older than this when claimed are *missed* and go by the task's misfire
    /// policy. Key `misfire_grace_ms`, default 60000.
    package var misfireGrace: Duration = .seconds(60)
    /// Most runs per work queue that may wait in the broker (`queued` or `dispatched`); the rest
    /// wait in PostgreSQL, where priority orders them. Key `max_backlog_per_queue`, default 1000.
    package var maxBacklogPerQueue = 1000
    /// A running run with no outcome by its timeout plus this is declared `lost`.
    /// Key `lost_grace_ms`, default 30000.
    package var lostGrace: Duration = .seconds(30)
    /// A worker whose heartbeats stopped for this many of its intervals is declared `lost`, and
    /// the runs it had detached from the broker are retried. Key `worker_lost_after_missed`, default 3.
    package var workerLostAfterMissed = 3
    /// How often lost runs, cancels, callbacks and retention are looked after. Key `maintenance_interval_ms`, default
    /// 1000.
    package var maintenanceInterval: Duration = .seconds(1)
    /// Ended runs (and dead letters) older than this are deleted. Key `retention.runs_days`, default 30.
    package var runRetention: Duration = .seconds(30 * 86_400)
    /// Soft-deleted tasks older than this are purged. Key `retention.deleted_tasks_days`, default 7.
    package var deletedTaskRetention: Duration = .seconds(7 * 86_400)
    /// Workers `stopped` or `lost` with no heartbeat for this long are deleted. Key
    /// `retention.workers_hours`, default 24.
    package var workerRetention: Duration = .seconds(24 * 3600)
    /// Callback delivery: keys under `callbacks.`.
    package var callbacks = CallbackConfiguration()
    /// Test-only faults (`CONVEYOR_TEST_FAULTS`, see `FaultInjection`); empty in production.
    package var faults = FaultInjection()
    /// The clock of the maintenance cadence (lost runs and workers, retention, queue depths); a
    /// test's moves only when told. Due times are the database's: the scan does not read this.
    package var clock: any Clock<Duration> = ContinuousClock()

    package init() {}
}
