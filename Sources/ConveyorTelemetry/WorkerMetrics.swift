import CoreMetrics

/// One worker's series (label `worker`), made with the worker so each is on `/metrics` from the
/// start, at 0: runs by outcome, messages rejected or expired, runs detached and isolated, heartbeats,
/// reconnections of the task consumer, runs in flight, readiness.
package struct WorkerMetrics: Sendable {
    package enum Event: Sendable { case succeeded, failed, rejected, expired, detached, isolated, heartbeat }

    let succeeded, failed, rejected, expired, detached, isolated, heartbeats, reconnects: Counter
    let inFlight, ready: Gauge

    package init(worker id: String) {
        let w = ("worker", id)
        func counter(_ label: String, _ more: [(String, String)] = []) -> Counter {
            let c = Counter(label: label, dimensions: [w] + more)
            c.increment(by: 0)
            return c
        }
        succeeded = counter("conveyor_worker_runs_total", [("outcome", "succeeded")])
        failed = counter("conveyor_worker_runs_total", [("outcome", "failed")])
        rejected = counter("conveyor_worker_messages_rejected_total")
        expired = counter("conveyor_worker_messages_expired_total")
        detached = counter("conveyor_worker_detached_total")
        isolated = counter("conveyor_worker_isolated_total")
        heartbeats = counter("conveyor_worker_heartbeats_total")
        reconnects = counter("conveyor_worker_amqp_reconnects_total")
        inFlight = Gauge(label: "conveyor_worker_in_flight", dimensions: [w])
        ready = Gauge(label: "conveyor_worker_ready", dimensions: [w])
        inFlight.record(0)
        ready.record(0)
    }

    package func record(_ event: Event) {
        switch event {
        case .succeeded: succeeded.increment()
        case .failed: failed.increment()
        case .rejected: rejected.increment()
        case .expired: expired.increment()
        case .detached: detached.increment()
        case .isolated: isolated.increment()
        case .heartbeat: heartbeats.increment()
        }
    }
    package func inFlight(_ n: Int) { inFlight.record(n) }
    /// The values the worker reads from its connections, brought up to date when `/metrics` is read:
    /// readiness, and the reconnections since the last reading.
    package func connections(ready: Bool, newReconnects: Int) {
        self.ready.record(ready ? 1 : 0)
        if newReconnects > 0 { reconnects.increment(by: newReconnects) }
    }
}
