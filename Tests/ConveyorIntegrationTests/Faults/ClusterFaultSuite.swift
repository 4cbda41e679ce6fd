import ConveyorBroker
import ConveyorCore
import ConveyorStore
import Foundation
import Testing

/// The cluster bed's control: `scripts/cluster.sh` (a 3-node RabbitMQ cluster, each node in a
/// network namespace of its own, and a PostgreSQL primary with a synchronous streaming standby).
enum Cluster {
    /// `scripts/faults.sh` runs this suite in a second pass, with the standard variables
    /// (`CONVEYOR_AMQP_URL`, `CONVEYOR_TEST_PG_ADMIN_URL`, …) pointing at the cluster.
    static var enabled: Bool { FaultProfile.enabled && Servers.env["CONVEYOR_FAULT_CLUSTER"] == "1" }

    /// `scripts/cluster.sh <args>`; its output, trimmed. A failure stops the scenario.
    @discardableResult
    static func run(_ args: [String]) async throws -> String {
        let script = FileManager.default.currentDirectoryPath + "/scripts/cluster.sh"
        let r = try await FaultBed.spawnAndWait(script, args)
        guard r.status == 0 else {
            throw FaultSetupError(what: "cluster.sh \(args.joined(separator: " ")) exited \(r.status): \(r.out)")
        }
        return r.out.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The node (1…3) leading the quorum queue's Raft group.
    static func leader(_ queue: String) async throws -> Int {
        let out = try await run(["leader", queue])
        guard let n = Int(out.split(separator: "\n").last ?? ""), (1...3).contains(n) else {
            throw FaultSetupError(what: "no leader for \(queue): \(out)")
        }
        return n
    }
}

/// Issue 25: the guarantees on a cluster. Each scenario runs the usual fleet (two dispatchers,
/// three workers, every process given all three brokers and the multi-host database URL), injects
/// one cluster fault mid-burst, waits until the system is quiet and asks the oracle. Recovery is
/// measured from the fault to the first outcome of a run dispatched after it: the whole path
/// (publish, deliver, execute, report, record) working again, not a connection that happened to
/// be elsewhere.
@Suite(
    "ClusterFaultSuite", .enabled(if: Cluster.enabled, "run by scripts/faults.sh (its cluster pass)"), .serialized)
struct ClusterFaultSuite {
    /// One cluster scenario: waits until the cluster is whole, then runs `body` on a fresh bed
    /// with the fleet ready (`fleet`).
    static func scenario(
        _ name: String, _ title: String, n: Int, _ body: (FaultBed, inout FaultReport) async throws -> Void
    ) async throws {
        try await Cluster.run(["await"])
        try await FaultBed.scenario(name, title, n: n) { bed, report in
            try await fleet(bed, &report)
            try await body(bed, &report)
        }
    }

    /// Two dispatchers and three workers (16 runs at once each), each with a status port; waits
    /// until every one is ready, then writes the quorum-queue registry to disk on every node.
    static func fleet(_ bed: FaultBed, _ report: inout FaultReport) async throws {
        let ports = try (0..<5).map { _ in try FaultBed.freePort() }
        try bed.startDispatcher("d1", httpPort: ports[0])
        try bed.startDispatcher("d2", httpPort: ports[1])
        for i in 1...3 { try bed.startWorker("w\(i)", concurrency: 16, httpPort: ports[1 + i]) }
        try await bed.until("every process ready", timeout: .seconds(60), &report) {
            await FaultBed.allReady(ports)
        }
        try await Cluster.run(["sync-registry"])
    }

    /// The database's clock now, for "dispatched after the fault".
    static func databaseNow(_ bed: FaultBed) async throws -> String {
        try await bed.rows("SELECT now()::text")[0][0] ?? ""
    }

    /// Waits for the first outcome of a run dispatched after `since`; returns how long after
    /// `start` it came (nil if it did not within `timeout`).
    static func firstOutcome(
        _ bed: FaultBed, dispatchedAfter since: String, from start: ContinuousClock.Instant, timeout: Duration,
        _ report: inout FaultReport
    ) async throws -> Duration? {
        let came = try await bed.until("an outcome of a run dispatched after the fault", timeout: timeout, &report) {
            try await bed.count(
                "SELECT count(*) FROM runs WHERE state = 'succeeded' AND dispatched_at > $1::timestamptz", [since]) > 0
        }
        return came ? ContinuousClock.now - start : nil
    }

    // MARK: C1. kill -9 the node that leads a queue

    enum Leader: String, CaseIterable, Sendable {
        /// The work queue's leader: task messages in flight.
        case work
        /// The status queue's leader: outcomes in flight.
        case status
    }

    /// The fast profile kills the work queue's leader; the full one both, in turn.
    static var leaders: [Leader] { FaultProfile.full ? Leader.allCases : [.work] }

    @Test(arguments: leaders)
    func c1KillTheQueueLeaderMidBurst(_ which: Leader) async throws {
        let n = FaultProfile.n(fast: 2000, full: 10_000)
        try await Self.scenario("cluster-kill-\(which.rawValue)", "C1 kill \(which.rawValue) leader", n: n) {
            bed, report in
            let topology = ConveyorTopology(prefix: bed.sys.prefix)
            let queue = which == .work ? topology.workQueue(bed.sys.queue) : topology.statusQueue
            let node = try await Cluster.leader(queue)
            // 200 ms a run over 48 slots: about 240 a second, so the burst is still being
            // dispatched when the node dies.
            try await bed.create(bed.sinkTasks(n, ms: 200))
            try await bed.until("30 % done", timeout: .seconds(120), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") >= n * 3 / 10
            }
            let since = try await Self.databaseNow(bed)
            let killed = ContinuousClock.now
            try await Cluster.run(["node-kill", "\(node)"])
            report.recovery = try await Self.firstOutcome(
                bed, dispatchedAfter: since, from: killed, timeout: .seconds(60), &report)
            let successor = (try? await Cluster.leader(queue)).map(String.init) ?? "?"
            try await Cluster.run(["node-start", "\(node)"])
            try await bed.waitQuiet(timeout: .seconds(180))
            report.counts = try await bed.oracle()
            report.standard()
            report.require((report.recovery ?? .seconds(99)) < .seconds(15), "recovery took 15 s or more")
            report.notes.append("killed node \(node), the leader of \(queue); new leader node \(successor)")
        }
    }

    // MARK: C2. one node cut off for 30 s

    /// The work queue's leader is cut off from the other two nodes and from every client (its
    /// packets dropped, no socket closed) for 30 s, then healed. Its clients learn of the cut
    /// from missed heartbeats (2 s here) and move to the next broker; the majority elects a new
    /// leader; `pause_minority` stops the cut node, and it rejoins by itself after the heal.
    @Test(.enabled(if: FaultProfile.full, "full profile only"))
    func c2PartitionANodeForThirtySeconds() async throws {
        let n = 10_000
        try await Self.scenario("cluster-partition", "C2 node partitioned 30 s", n: n) { bed, report in
            let queue = ConveyorTopology(prefix: bed.sys.prefix).workQueue(bed.sys.queue)
            // 200 ms a run over 48 slots: the burst lasts about 40 s, past the 30 s cut.
            try await bed.create(bed.sinkTasks(n, ms: 200))
            try await bed.until("10 % done", timeout: .seconds(60), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") >= n / 10
            }
            let node = try await Cluster.leader(queue)
            let since = try await Self.databaseNow(bed)
            let cut = ContinuousClock.now
            try await Cluster.run(["partition", "\(node)"])
            report.recovery = try await Self.firstOutcome(
                bed, dispatchedAfter: since, from: cut, timeout: .seconds(30), &report)
            // The fault's length, not a synchronisation: the cut lasts 30 s from its start.
            try await Task.sleep(until: cut + .seconds(30))
            let healing = ContinuousClock.now
            try await Cluster.run(["heal", "\(node)"])
            let whole = ContinuousClock.now - healing
            try await bed.waitQuiet(timeout: .seconds(240))
            report.counts = try await bed.oracle()
            report.standard()
            report.require((report.recovery ?? .seconds(99)) < .seconds(15), "recovery took 15 s or more")
            report.notes.append(
                "cut node \(node), the leader of \(queue); cluster whole \(Int(whole.inSeconds)) s after the heal")
        }
    }

    // MARK: C3. a rolling restart of every node under a steady rate

    /// Tasks arrive at a steady rate (about 170 a second) while each node in turn is stopped
    /// (`rabbitmqctl stop`) and started again, waiting until it has rejoined before the next.
    /// Recovery is the longest pause between two consecutive outcomes during the restarts.
    @Test(.enabled(if: FaultProfile.full, "full profile only"))
    func c3RollingRestartUnderASteadyRate() async throws {
        let n = 10_000
        try await Self.scenario("cluster-rolling", "C3 rolling node restart", n: n) { bed, report in
            let tasks = bed.sinkTasks(n, ms: 20)
            let chunk = 50
            let start = ContinuousClock.now
            let store = bed.sys.store
            async let fed: Void = {
                for (i, offset) in stride(from: 0, to: n, by: chunk).enumerated() {
                    // A load generator's pace (50 tasks every 300 ms), not a synchronisation.
                    try await Task.sleep(until: start + .milliseconds(300 * i))
                    try await store.createTasks(Array(tasks[offset..<min(offset + chunk, n)]))
                }
            }()
            try await bed.until("a steady flow of outcomes", timeout: .seconds(30), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") >= 500
            }
            let since = try await Self.databaseNow(bed)
            for node in 1...3 { try await Cluster.run(["node-restart", "\(node)"]) }
            let until = try await Self.databaseNow(bed)
            try await fed
            try await bed.waitQuiet(timeout: .seconds(240))
            report.counts = try await bed.oracle()
            report.standard()
            let gap =
                try await bed.rows(
                    """
                    SELECT coalesce(extract(epoch FROM max(gap)), 0)::text FROM (
                      SELECT finished_at - lag(finished_at) OVER (ORDER BY finished_at) AS gap FROM runs
                      WHERE state = 'succeeded' AND finished_at BETWEEN $1::timestamptz AND $2::timestamptz
                    ) g
                    """, [since, until])[0][0].flatMap(Double.init) ?? 99
            report.recovery = .milliseconds(Int64(gap * 1000))
            report.require(gap < 15, "outcomes paused \(gap) s during the restarts")
            let restarts = try await bed.count(
                """
                SELECT count(*) FROM runs WHERE state = 'succeeded' AND finished_at BETWEEN $1::timestamptz AND \
                $2::timestamptz
                """, [since, until])
            report.notes.append("\(restarts) outcomes during the three restarts; recovery = longest pause")
        }
    }

    // MARK: C4. the primary database dies; the standby is promoted

    /// kill -9 of the PostgreSQL primary mid-burst, then `pg_ctl promote` of its synchronous
    /// standby (what an operator or a failover manager does). Every process reaches the new
    /// primary through its multi-host URL (`target_session_attrs=read-write`); nothing committed
    /// is lost, because every commit waited for the standby's flush. Afterwards the bed is reset
    /// to a fresh primary and standby.
    @Test(.enabled(if: FaultProfile.full, "full profile only"))
    func c4PromoteTheStandbyWhenThePrimaryDies() async throws {
        let n = 10_000
        var failure: (any Error)?
        do { try await promotion(n: n) } catch { failure = error }
        // Whatever happened, a fresh primary and standby for whatever runs next.
        try await Cluster.run(["reset"])
        try await Cluster.run(["start"])
        if let failure { throw failure }
    }

    func promotion(n: Int) async throws {
        try await Self.scenario("cluster-promote", "C4 primary killed, promoted", n: n) { bed, report in
            let apiPort = try await bed.startAPI(&report)
            try await bed.create(bed.sinkTasks(n, ms: 20))
            try await bed.until("30 % done", timeout: .seconds(60), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") >= n * 3 / 10
            }
            let killed = ContinuousClock.now
            try await Cluster.run(["pg-kill-primary"])
            try await Cluster.run(["pg-promote"])
            let promoted = ContinuousClock.now - killed
            // Counted on the new primary, once the test's own pool reaches it: a larger count
            // later is an outcome recorded there, not one the old primary had already streamed.
            let atPromotion = try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'")
            let came = try await bed.until("an outcome after the promotion", timeout: .seconds(60), &report) {
                try await bed.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") > atPromotion
            }
            report.recovery = came ? ContinuousClock.now - killed : nil
            let apiBack = try await bed.until("the api ready on the new primary", timeout: .seconds(60), &report) {
                await FaultBed.httpStatus(port: apiPort) == 200
            }
            try await bed.waitQuiet(timeout: .seconds(240))
            report.counts = try await bed.oracle()
            report.standard()
            report.require((report.recovery ?? .seconds(99)) < .seconds(30), "recovery took 30 s or more")
            report.require(apiBack, "the api did not come back")
            report.notes.append(String(format: "promotion took %.1f s", promoted.inSeconds))
        }
    }
}
