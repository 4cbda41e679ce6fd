import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorStore
import ConveyorTelemetry
import Foundation
import Logging
import Synchronization

/// The dispatcher's slower duties: lost runs, lost workers, cancels for workers, dead letters and retention.
extension Dispatcher {
    /// Every `maintenance_interval_ms`: declares lost the runs past their deadline, expires the
    /// runs past their start deadline, tells workers about cancelled runs, and deletes what
    /// retention allows (one batch a minute).
    func maintenanceLoop() async {
        // Times are ages on the configured clock: `time.elapsed` is now.
        let time = Stopwatch(configuration.clock)
        var lastPurge = time.elapsed
        var lastAnalyze = time.elapsed - .seconds(3600)
        var lastDepths = time.elapsed - .seconds(3600)
        // Since when this dispatcher can hear worker heartbeats: its status consumer connected,
        // and the broker taking its publishes (an alarm blocks the workers' heartbeats too).
        // Workers are judged only on silence within that span.
        var listeningSince: Duration?
        while !stopping.load(ordering: .relaxed) {
            if statusConsumer.isConnected, await brokerTakesPublishes(within: .seconds(1)) {
                if listeningSince == nil { listeningSince = time.elapsed }
            } else {
                listeningSince = nil
            }
            await refreshStatisticsAfterBursts(last: &lastAnalyze, now: time.elapsed)
            if time.elapsed - lastDepths > .seconds(15) {
                lastDepths = time.elapsed
                await measureQueueDepths()
            }
            do {
                let (lost, settled) = try await store.declareLost()
                if lost > 0 {
                    logger.warning(
                        "runs declared lost: no outcome within timeout plus grace",
                        metadata: ["runs": "\(lost)", "retried": "\(settled.retried)"])
                    Self.countSettled(settled)
                    counters.withLock {
                        $0.lost += lost
                        $0.retried += settled.retried
                        $0.dead += settled.dead
                    }
                    wakeup.signal()
                }
                let (expired, expirySettled) = try await store.expireUnstarted()
                if !expired.isEmpty {
                    let n = expired.values.reduce(0, +)
                    logger.warning(
                        """
                        runs expired: published but not started within their schedule-to-start timeout; \
                        retried by policy (docs/reliability.md, "Runs that never start")
                        """,
                        metadata: [
                            "runs": "\(n)", "queues": "\(expired.keys.sorted())",
                            "retried": "\(expirySettled.retried)",
                        ])
                    for (queue, count) in expired { ConveyorMetrics.expired(queue: queue, count: count) }
                    Self.countSettled(expirySettled)
                    counters.withLock {
                        $0.expired += n
                        $0.retried += expirySettled.retried
                        $0.dead += expirySettled.dead
                    }
                    wakeup.signal()
                }
                let heardFor = listeningSince.map { (time.elapsed - $0).inSeconds } ?? 0
                let gone = try await store.declareLostWorkers(
                    missed: configuration.workerLostAfterMissed, heardFor: heardFor)
                if !gone.workers.isEmpty || gone.runs > 0 {
                    logger.warning(
                        "workers declared lost: no heartbeat for \(configuration.workerLostAfterMissed) intervals",
                        metadata: [
                            "workers": "\(gone.workers)", "runs.lost": "\(gone.runs)",
                            "retried": "\(gone.settled.retried)",
                        ])
                    Self.countSettled(gone.settled)
                    counters.withLock {
                        $0.workersLost += gone.workers.count
                        $0.lost += gone.runs
                        $0.retried += gone.settled.retried
                        $0.dead += gone.settled.dead
                    }
                    if gone.runs > 0 { wakeup.signal() }
                }
                try await sendCancels()
                if time.elapsed - lastPurge > .seconds(60) {
                    lastPurge = time.elapsed
                    let n = try await store.purgeBatch(
                        runsAge: configuration.runRetention, tasksAge: configuration.deletedTaskRetention,
                        workersAge: configuration.workerRetention)
                    if n > 0 { logger.info("retention: deleted old rows", metadata: ["rows": "\(n)"]) }
                }
            } catch {
                logger.warning("maintenance failed; will retry", metadata: ["error": "\(error)"])
            }
            await maintenanceWakeup.wait(timeout: configuration.maintenanceInterval, clock: configuration.clock)
        }
    }

    /// The retries and dead runs that settling runs ended by maintenance made, as metrics (the
    /// status recorder counts those of reported outcomes).
    static func countSettled(_ s: SettleResult) {
        if s.retried > 0 { ConveyorMetrics.retried(s.retried) }
        if s.dead > 0 { ConveyorMetrics.dead(s.dead) }
    }

    /// Whether the broker takes this dispatcher's publishes now: a probe, an empty non-mandatory
    /// message to a queue that does not exist (the broker confirms and drops it), is confirmed
    /// within `timeout`.
    ///
    /// Why a probe: RabbitMQ blocks a connection for a memory or disk alarm only once it
    /// publishes. A dispatcher with nothing to dispatch would not hear of an alarm that blocks
    /// every worker's heartbeats, and would take their silence for death. At most one probe is in
    /// flight; during an alarm it waits, blocked, until the alarm clears, and every tick meanwhile
    /// answers false at once.
    func brokerTakesPublishes(within timeout: Duration) async -> Bool {
        guard publisher.isConnected, !publisher.isBlocked,
            probing.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged
        else { return false }
        let probe = AMQPOutgoingMessage(
            exchange: "", routingKey: "\(configuration.prefix).alarm-probe", body: [],
            properties: AMQPProperties(persistent: false), mandatory: false)
        let confirmed = Wakeup()
        Task {
            let result = await publisher.publish([probe])
            probing.store(false, ordering: .relaxed)
            if case .success = result.first { confirmed.signal() }
        }
        return await confirmed.wait(timeout: timeout)
    }

    /// The broker's ready messages per work queue this dispatcher publishes to, its isolation
    /// lane included (passive declares on the dispatcher's inspector connection), as the gauge
    /// `conveyor_queue_depth{queue}`.
    func measureQueueDepths() async {
        let queues = workQueues.names
        do {
            for (queue, d) in try await topology.workQueueDepths(queues, asking: inspector) {
                ConveyorMetrics.queueDepth(queue: queue, d.waiting, consumers: d.consumers)
            }
        } catch {
            logger.debug("queue depths not measured", metadata: ["error": "\(error)"])
        }
    }

    /// Runs created in a burst before autovacuum's next look: past this, the dispatcher analyzes.
    static let analyzeAfterRuns = 10_000

    /// Refreshes the planner's statistics of `runs` and `tasks` after a burst: at least
    /// `analyzeAfterRuns` runs created since the last refresh, and at most once every 30 s.
    ///
    /// Why: autovacuum analyzes a table about a minute after it changes by 10 %. Until then a
    /// table that was nearly empty (a new install, or right after retention emptied it) is
    /// planned as if it still were, and the claim and publish statements choose index scans that
    /// read the whole table per statement (docs/benchmarks.md, "100,000 tasks due at once").
    func refreshStatisticsAfterBursts(last: inout Duration, now: Duration) async {
        guard createdSinceAnalyze.load(ordering: .relaxed) >= Self.analyzeAfterRuns, now - last > .seconds(30)
        else { return }
        last = now
        createdSinceAnalyze.store(0, ordering: .relaxed)
        do {
            try await store.analyze()
            counters.withLock { $0.analyzes += 1 }
            logger.debug("statistics refreshed after a burst of new runs")
        } catch {
            logger.warning(
                """
                ANALYZE after a burst failed (the database user must own runs and tasks); plans may be poor until \
                autovacuum analyzes
                """,
                metadata: ["error": "\(error)"])
        }
    }

    /// Publishes one control message per cancelled run to every worker (fanout). A worker holding
    /// the run kills its executor; one that gets the task message later skips it.
    func sendCancels() async throws {
        let ids = try await store.pendingCancels()
        guard !ids.isEmpty, publisher.isConnected else { return }
        let messages = ids.map { id in
            AMQPOutgoingMessage(
                exchange: topology.controlExchange, routingKey: "",
                body: MessageCodec.encode(ControlMessage(cancel: id)),
                properties: AMQPProperties(
                    messageID: "cancel:\(id.lowercasedString)", type: controlMessageType,
                    timestamp: UInt64(Date().timeIntervalSince1970), persistent: false))
        }
        var sent: [UUID] = []
        for (id, r) in zip(ids, await publisher.publish(messages)) {
            switch r {
            case .success: sent.append(id)
            // No worker is bound: nobody holds the run, and nobody will be told.
            case .failure(let e) where e.code == .unroutable: sent.append(id)
            case .failure(let e):
                logger.debug("cancel publish failed; will retry", metadata: ["run.id": "\(id)", "error": "\(e)"])
            }
        }
        try await store.markCancelsSent(sent)
        counters.withLock { $0.cancelsSent += sent.count }
    }

    /// Records what the broker dead-lettered: keeps the message and ends its run `dead` with the
    /// reason (`x-first-death-reason`: rejected by a worker, or past the delivery limit).
    func deadLetterLoop() async {
        for await d in deadConsumer.deliveries {
            var proof: StatusProof?
            await untilCommitted("reading the status key") { proof = try await statusProof() }
            guard let proof else { return }
            let letter = Self.deadLetter(d, proof: proof)
            await untilCommitted("recording dead letters") {
                let ended = try await store.recordDeadLetters([letter])
                counters.withLock {
                    $0.deadLetters += 1
                    $0.dead += ended
                }
                ConveyorMetrics.deadLetter()
                deadConsumer.ack(d)
            }
        }
    }

    /// The dead letter to keep. It names a run (and ends it) only when its body carries that
    /// attempt's proof: a dead letter anyone could publish cannot end someone else's run.
    static func deadLetter(_ d: AMQPDelivery, proof: StatusProof) -> DeadLetter {
        let h = d.properties.headers
        let reason = h["x-first-death-reason"]?.stringValue ?? "unknown"
        let queue = h["x-first-death-queue"]?.stringValue ?? d.queue
        let explained =
            switch reason {
            case "delivery_limit" where h[ConveyorTopology.isolatedFromHeader] != nil:
                """
                delivery limit exceeded in \(queue), the isolation lane: taken alone, it never settled; its worker \
                crashed or was killed each time
                """
            case "delivery_limit":
                "delivery limit exceeded in \(queue): workers took it and never settled it (crash or kill each time)"
            case "rejected": "rejected by a worker in \(queue) (malformed or not runnable there)"
            case "expired": "expired in \(queue)"
            default: "\(reason) in \(queue)"
            }
        let claims = d.properties.type == taskMessageType ? MessageCodec.claims(inMalformed: d.body) : nil
        let runID = claims.flatMap {
            proof.check($0.proof, runID: $0.runID, attempt: $0.attempt) == nil ? $0.runID : nil
        }
        return DeadLetter(
            runID: runID, reason: explained, source: queue, type: d.properties.type,
            body: String(decoding: d.body.prefix(65_536), as: UTF8.self))
    }
}
