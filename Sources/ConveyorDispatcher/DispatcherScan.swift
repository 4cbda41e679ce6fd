import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorFaults
import ConveyorStore
import ConveyorTelemetry
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import Tracing

/// What one dispatcher's scan knows of the due tasks that wait for room as tasks (see
/// `Store.dueTasks` and docs/architecture.md, "Due tasks wait for room as tasks"): where each task
/// group's walk got to, and the queues with due tasks left waiting.
struct DueWalks {
    /// Each group's walk (its positions), by the number of groups of the tick that walked (a tick
    /// claims as one group or as `dispatcher.groups`; the shards differ).
    var positions: [Int: [Int: DueWalk]] = [:]
    var waiting: Set<String> = []
    /// Bumped whenever the positions are forgotten, so that a tick that began before does not store its own.
    var generation = 0
    var forgottenAt = ContinuousClock.now
    /// When each waiting queue was last read (step 1).
    var claimedAt: [String: ContinuousClock.Instant] = [:]

    /// A waiting queue is read when it has room for half the bound, or when it has any room and
    /// was not read for this long: in a burst the room comes fast and claims are large; when part
    /// of the backlog is held up (a broker failover, workers lost) the rest still moves.
    static let pause: Duration = .milliseconds(200)

    /// How long a position is trusted: a task due by a write whose NOTIFY was lost (the listener
    /// reconnecting), or skipped while another dispatcher held it locked, is found within this.
    static let trust: Duration = .seconds(10)

    mutating func forgetPositions() {
        positions = [:]
        generation += 1
        forgottenAt = .now
    }

    /// When every group of a `groups` tick last walked to the end of the due tasks (none left
    /// unseen), the earliest of those ends: a claim can find nothing new unless a task became due
    /// after it (`ScanProbe.newDueIn`).
    func walkedToTheEnd(groups: Int) -> Date? {
        guard let layout = positions[groups], layout.count == groups else { return nil }
        var end: Date?
        for w in layout.values {
            guard let p = w.seenUpTo, p.id == DuePosition.end else { return nil }
            end = min(end ?? p.at, p.at)
        }
        return end
    }

    /// Every due task became a run (a claim with ready runs ahead): nothing is waiting.
    mutating func forgetAll() {
        forgetPositions()
        waiting = []
        claimedAt = [:]
    }

    /// Takes in one tick's walks (group → walk, of the groups that claimed).
    mutating func merge(_ walks: [Int: DueWalk], groups: Int, generation began: Int) {
        if began == generation {
            for (g, w) in walks { positions[groups, default: [:]][g] = w }
        }
        let left = walks.values.reduce(into: Set<String>()) { $0.formUnion($1.leftWaiting) }
        waiting.formUnion(left)
        // A queue stops waiting when the group that reads the waiting queues (across every
        // shard) found nothing of it left, and no group left one of its tasks in this tick.
        let drained = walks.values.reduce(into: Set<String>()) { $0.formUnion($1.drained) }.subtracting(left)
        guard !drained.isEmpty else { return }
        waiting.subtract(drained)
        for queue in drained { claimedAt[queue] = nil }
        // The other groups' walks passed over the drained queue's tasks (it was waiting) up to their
        // own claim's now(), later than the read that found it empty: a task of it that fell due
        // in between sits behind their positions. Drains are rare; walk again from the start.
        forgetPositions()
    }
}

extension Dispatcher {
    // MARK: scan and publish

    func scanLoop() async {
        // A tick claims in `groups` concurrent groups only after a tick that moved at least a batch
        // of runs (created plus published: a burst). After a lighter one it claims as one group:
        // at a steady rate a tick holds tens of runs, and splitting them makes more statements per
        // run and a tick as slow as its slowest group (docs/benchmarks.md, "Task groups at a
        // steady rate").
        var groups = 1
        while !stopping.load(ordering: .relaxed) {
            var tick = (work: 0, nextDueIn: Double?.none)
            if publisher.isConnected && !publisher.isBlocked {
                tick = await scanTick(groups: groups)
            }
            groups = tick.work >= configuration.batchSize ? configuration.groups : 1
            if stopping.load(ordering: .relaxed) { break }
            if tick.work > 0 { continue }  // more may be due: scan again at once
            // Nothing moved. Sleep until the next due time, but never spin on work that is due and
            // held back (a full broker backlog, a rate limit): a recorded status batch, a NOTIFY or
            // the scan interval wakes the loop.
            var sleep = configuration.scanInterval
            if let next = tick.nextDueIn, next > 0, next < sleep.inSeconds {
                sleep = .milliseconds(Int64(next * 1000) + 1)
            }
            await wakeup.wait(timeout: sleep)
        }
        // Stopping: the runs this loop published are marked now, not a moment later.
        await mark(marks.takeDue(all: true).due)
    }

    /// Marks confirmed runs `dispatched` once they are `marks.delay` old (`DispatchMarks`).
    func markLoop() async {
        while !stopping.load(ordering: .relaxed) && !Task.isCancelled {
            let (due, nextIn) = marks.takeDue()
            await mark(due)
            await marks.wakeup.wait(timeout: nextIn ?? .seconds(60))
        }
    }

    /// Marks runs still `queued` as `dispatched`, dated from their confirm.
    func mark(_ due: [DispatchMarks.Pending]) async {
        guard !due.isEmpty else { return }
        let now = ContinuousClock.now
        do {
            try await store.markDispatched(
                due.map { ($0.id, $0.startWithin, (now - $0.confirmed).inSeconds) }, grace: configuration.lostGrace)
        } catch {
            // The rows stay `queued`: any dispatcher republishes them when the lease ends.
            logger.warning(
                "marking dispatched failed; runs will be republished after the lease", metadata: ["error": "\(error)"])
        }
    }

    /// One scan tick; returns how much it did (runs created plus runs published: 0 means nothing
    /// was due, or nothing due could move).
    package func scanOnce() async -> Int { await scanTick(groups: configuration.groups).work }

    /// One scan tick: the probe, then `groups` task groups' claims and publishes, concurrently. Returns
    /// the work done and the seconds until something is next due (from the probe).
    func scanTick(groups: Int) async -> (work: Int, nextDueIn: Double?) {
        let began = ContinuousClock.now
        defer {
            ConveyorMetrics.scanDuration(ContinuousClock.now - began)
            counters.withLock { $0.scans += 1 }
        }
        let since = dueWalks.withLock { w in
            if ContinuousClock.now - w.forgottenAt > DueWalks.trust { w.forgetPositions() }
            return w.walkedToTheEnd(groups: groups)
        }
        let probe: ScanProbe
        do { probe = try await store.scanProbe(since: since) } catch {
            logger.warning("scan probe failed", metadata: ["error": "\(error)"])
            return (0, nil)
        }
        guard probe.due else { return (0, probe.nextDueIn) }
        // Each queue's broker backlog is bounded: what is over it waits in PostgreSQL, where
        // priority orders it. The room is shared out among the groups.
        func share(_ room: Int) -> Int { room <= 0 ? 0 : (room + groups - 1) / groups }
        // A paused queue has no room: its due runs wait in PostgreSQL, in order, until resumed.
        let fullRoom = probe.backlog.mapValues { configuration.maxBacklogPerQueue - $0 }
            .merging(probe.paused.map { ($0, 0) }) { _, paused in paused }
        @Sendable func roomOf(_ queue: String) -> Int { fullRoom[queue] ?? configuration.maxBacklogPerQueue }
        let room = fullRoom.mapValues(share)
        let defaultRoom = share(configuration.maxBacklogPerQueue)
        // The waiting queues are read by the tick's first group alone, across every shard, with
        // their whole room (`fullRoom`): one statement per queue and tick, not one per group. Half
        // the bound at a time: the broker still holds the other half for the workers, and a claim's
        // fixed cost is paid per half a bound of runs.
        // At most a claim's batch: a read takes no more, and the rest of the room must not wait
        // for the pause.
        let waitingBatch = max(1, min(configuration.maxBacklogPerQueue / 2, configuration.batchSize))
        let now = ContinuousClock.now
        let walks = dueWalks.withLock { w in
            // With ready runs ahead, every due task becomes a run (priority orders runs): none waits.
            if probe.runsReady { w.forgetAll() }
            return w
        }
        // Nothing can move when due tasks only wait: no run is ready, no lease ran out, every due
        // task was seen (none became due since) and none has waited half the misfire grace, and no
        // waiting queue has room for a batch. Then the tick claims nothing, and wakes when a task
        // falls due or ages (or sooner: a recorded status, a NOTIFY).
        let half = configuration.misfireGrace.inSeconds / 2
        let waited = -(probe.nextDueIn ?? 0)  // at least the oldest due task's wait
        let nothingNew = since != nil && (probe.newDueIn ?? 1) > 0
        // Only the waiting queues' read can move anything (in a burst that waits for room, the
        // usual case): the groups other than the first have nothing to claim.
        let othersIdle = nothingNew && waited < half && !probe.runsReady && !probe.leasesExpired
        // The waiting queues worth a claim now, and when the next one with some room will be.
        var claimWaiting: Set<String> = []
        var nextClaim = Double.infinity
        for queue in walks.waiting where roomOf(queue) > 0 {
            let unread = walks.claimedAt[queue].map { now - $0 } ?? DueWalks.pause
            if roomOf(queue) >= waitingBatch || unread >= DueWalks.pause {
                claimWaiting.insert(queue)
            } else {
                nextClaim = min(nextClaim, (DueWalks.pause - unread).inSeconds)
            }
        }
        if othersIdle && claimWaiting.isEmpty {
            counters.withLock { $0.idleWaits += 1 }
            return (0, min(probe.newDueIn ?? .infinity, half - waited, nextClaim))
        }
        let toClaim = claimWaiting
        if !toClaim.isEmpty {
            dueWalks.withLock { w in for queue in toClaim { w.claimedAt[queue] = now } }
        }
        let (work, walked) = await withTaskGroup(of: (Int, Int, DueWalk?).self) { group in
            for g in 0..<groups where g == 0 || !othersIdle {
                group.addTask {
                    let spans = DispatchSpans()
                    var request = ClaimRequest(
                        group: g, groups: groups, limit: self.configuration.batchSize,
                        lease: self.configuration.publishLease, misfireGrace: self.configuration.misfireGrace,
                        newTraceParent: { spans.start(parent: $0) })
                    // The waiting queues' whole room is the first group's; the others write their
                    // aged tasks `scheduled`, so that the bound holds.
                    request.room = room
                    for queue in walks.waiting {
                        request.room[queue] = g == 0 ? roomOf(queue) : 0
                    }
                    request.defaultRoom = defaultRoom
                    request.rateLimited = probe.rateLimited
                    request.straightToQueue = !probe.runsReady
                    request.leasesExpired = probe.leasesExpired
                    request.seenUpTo = walks.positions[groups]?[g]?.seenUpTo
                    request.waitingFrom = walks.positions[groups]?[g]?.waitingFrom ?? [:]
                    request.waiting = walks.waiting
                    if g == 0 { request.claimWaiting = toClaim }
                    request.agedPossible = waited >= half
                    request.newDuePossible = !nothingNew
                    let (work, walk) = await self.dispatchGroup(request, spans: spans)
                    return (g, work, walk)
                }
            }
            var total = 0
            var walked: [Int: DueWalk] = [:]
            for await (g, n, walk) in group {
                total += n
                walked[g] = walk
            }
            return (total, walked)
        }
        if !walked.isEmpty {
            dueWalks.withLock { $0.merge(walked, groups: groups, generation: walks.generation) }
        }
        return (work, probe.nextDueIn)
    }

    /// Claims one task group and publishes what it claimed; returns runs created plus runs published,
    /// and what the claim learned of the due tasks waiting for room.
    func dispatchGroup(_ request: ClaimRequest, spans: DispatchSpans = DispatchSpans()) async -> (Int, DueWalk?) {
        let claimed = ContinuousClock.now  // no later than the lease's start (the claim's now())
        let result: ClaimResult
        do {
            result = try await store.claimDue(request)
        } catch {
            spans.end(failed: error)
            logger.warning("claim failed", metadata: ["dispatcher.group": "\(request.group)", "error": "\(error)"])
            return (0, nil)
        }
        let live = spans.claimed(result.runs, exchange: topology.tasksExchange)
        if !result.cancelled.isEmpty { maintenanceWakeup.signal() }
        if result.created > 0 {
            let total = createdSinceAnalyze.add(result.created, ordering: .relaxed).newValue
            if total >= Self.analyzeAfterRuns && total - result.created < Self.analyzeAfterRuns {
                maintenanceWakeup.signal()
            }
        }
        if result.runs.isEmpty { return (result.created, result.walk) }
        if configuration.faults.dispatcherCrash == .afterClaim { FaultInjection.crash() }
        ConveyorMetrics.claimBatch(result.runs.count)
        let (ok, failed) = await publish(result.runs, spans: live)
        if configuration.faults.dispatcherCrash == .afterPublish { FaultInjection.crash() }
        let okSet = Set(ok)
        let confirmed = result.runs.filter { okSet.contains($0.message.runID) }
        for (key, runs) in Dictionary(
            grouping: confirmed,
            by: { QueuePriority(queue: $0.message.queue, priority: $0.priority) })
        {
            ConveyorMetrics.dispatched(queue: key.queue, priority: key.priority.name, count: runs.count)
        }
        if !failed.isEmpty { ConveyorMetrics.publishFailed(failed.count) }
        // Marked `dispatched` by `markLoop` a moment later, unless a status moves them on first.
        marks.add(confirmed.map { ($0.message.runID, $0.scheduleToStartSeconds) }, claimed: claimed)
        if !failed.isEmpty {
            do { try await store.retryPublishSoon(failed, delay: .seconds(1)) } catch {
                // The rows stay `queued`: any dispatcher republishes them when the lease ends.
                logger.warning(
                    "shortening the lease of failed publishes failed; they are republished after the lease",
                    metadata: ["error": "\(error)"])
            }
        }
        counters.withLock {
            $0.published += ok.count
            $0.publishFailed += failed.count
        }
        return (result.created + ok.count, result.walk)
    }

    /// Publishes runs with confirms; returns the confirmed and the failed run ids. A run's
    /// producer span is its dispatch span when this claim created the run (`spans`), else a new
    /// `publish` span, a child of the run's stored dispatch span (a retry, a run that waited).
    func publish(_ runs: [ClaimedRun], spans live: [UUID: any Span] = [:]) async -> (ok: [UUID], failed: [UUID]) {
        await workQueues.declare(runs.map(\.message.queue))
        let proof: StatusProof
        do { proof = try await statusProof() } catch {
            logger.warning("cannot read the status key; publishing later", metadata: ["error": "\(error)"])
            for span in live.values { span.end() }
            return ([], runs.map(\.message.runID))
        }
        let now = Date()
        var spans: [any Span] = []
        spans.reserveCapacity(runs.count)
        let messages = runs.map { run in
            if let span = live[run.message.runID] {
                spans.append(span)
            } else {
                var parent = Traces.context(traceparent: run.traceparent)
                parent.baggageHeader = run.baggage
                spans.append(
                    Traces.startSpan(
                        "publish \(run.message.queue)", context: parent, kind: .producer,
                        attributes: Self.publishAttributes(run, exchange: topology.tasksExchange)))
            }
            var headers: AMQPHeaders = [
                "conveyor-task": .string(run.message.taskName),
                "conveyor-attempt": .int(Int64(run.message.attempt)),
                "conveyor-deadline": .string(Timestamp.format(now.addingTimeInterval(run.message.timeoutSeconds))),
            ]
            // The publish span, a child of the run's stored dispatch span; its context travels in the headers.
            var context = spans[spans.count - 1].context
            context.baggageHeader = run.baggage
            Traces.inject(context, into: &headers, using: AMQPHeadersInjector())
            var message = run.message
            message.proof = proof.sign(runID: message.runID, attempt: message.attempt)
            return AMQPOutgoingMessage(
                exchange: topology.tasksExchange, routingKey: run.message.queue, body: MessageCodec.encode(message),
                properties: AMQPProperties(
                    contentType: "application/json", messageID: run.message.idempotencyKey,
                    type: taskMessageType, timestamp: UInt64(now.timeIntervalSince1970), persistent: true,
                    headers: headers))
        }
        let sent = ContinuousClock.now
        if configuration.faults.dispatcherCrash == .midBatch, messages.count >= 2 {
            _ = await publisher.publish(Array(messages.prefix(messages.count / 2)))
            FaultInjection.crash()
        }
        let results = await publisher.publish(messages)
        ConveyorMetrics.publishConfirm(ContinuousClock.now - sent)
        var ok: [UUID] = []
        var failed: [UUID] = []
        for ((run, r), span) in zip(zip(runs, results), spans) {
            defer { span.end() }
            switch r {
            case .success: ok.append(run.message.runID)
            case .failure(let e):
                span.recordError(e)
                span.setStatus(SpanStatus(code: .error, message: "publish not confirmed; republished later"))
                failed.append(run.message.runID)
                logger.debug(
                    "publish failed",
                    metadata: [
                        "run.id": "\(run.message.runID)", "task.name": "\(run.message.taskName)",
                        "trace.id": "\(Traceparent.traceID(run.traceparent) ?? "")", "error": "\(e)",
                    ])
            }
        }
        if !failed.isEmpty { logger.warning("publishes failed; will retry", metadata: ["count": "\(failed.count)"]) }
        return (ok, failed)
    }
}
