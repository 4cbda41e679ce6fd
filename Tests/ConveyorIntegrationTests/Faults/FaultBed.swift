import ConveyorAMQP
import ConveyorCore
import ConveyorHTTP
import ConveyorPostgres
import ConveyorStore
import Foundation
import Synchronization
import Testing

/// The fault suite's profile, from `scripts/faults.sh`: `fast` (CI) or `full`.
enum FaultProfile {
    static var name: String { Servers.env["CONVEYOR_FAULT_PROFILE"] ?? "" }
    /// The suite runs only under `scripts/faults.sh`, which gives it servers of its own (it
    /// restarts, kills and starves them). `scripts/test.sh` runs it after the other suites.
    static var enabled: Bool { !name.isEmpty }
    static var full: Bool { name == "full" }
    static func n(fast: Int, full: Int) -> Int { self.full ? full : fast }
}

/// What the oracle counts once the system is quiet (see docs/reliability.md).
struct OracleCounts: Sendable {
    /// Due occurrences with no final outcome: no run at all, or a latest attempt not final.
    var lost = 0
    /// Transitions out of a final state, backwards moves, and attempts recorded twice.
    var doubleRecorded = 0
    /// Non-final runs whose lease or deadline has passed.
    var stuck = 0
    /// Rows in `dead_letters`.
    var deadLettered = 0
    /// Runs ended `dead`.
    var dead: Int { states["dead"] ?? 0 }
    /// Sink calls, distinct runs called, and calls beyond one per run.
    var executions = 0
    var executedRuns = 0
    var duplicateExecutions: Int { executions - executedRuns }
    /// A few runs called more than once (their idempotency keys: the run ids), for the report.
    var repeated: [String] = []
    /// Runs by state, for the report.
    var states: [String: Int] = [:]
    /// A few audit rows behind a double-recorded count.
    var examples: [String] = []
}

/// One scenario's result line (printed, and appended to `$CONVEYOR_FAULT_RESULTS`).
struct FaultReport {
    var name: String
    var n: Int
    var counts = OracleCounts()
    var recovery: Duration?
    var notes: [String] = []
    var failures: [String] = []
    var pass: Bool { failures.isEmpty }

    mutating func require(_ ok: Bool, _ what: String) { if !ok { failures.append(what) } }

    /// The standard verdict: nothing lost, recorded twice or stuck, dead letters as injected.
    mutating func standard(deadLettered expected: Int = 0) {
        require(counts.lost == 0, "lost \(counts.lost)")
        require(counts.doubleRecorded == 0, "double-recorded \(counts.doubleRecorded)")
        require(counts.stuck == 0, "stuck \(counts.stuck)")
        require(counts.deadLettered == expected, "dead-lettered \(counts.deadLettered), expected \(expected)")
    }

    var line: String {
        let rec = recovery.map { String(format: "%.1fs", $0.inSeconds) } ?? "-"
        var s =
            """
            \(name.padding(toLength: 28, withPad: " ", startingAt: 0)) N=\(n) lost=\(counts.lost) \
            double=\(counts.doubleRecorded) 
            """
                + """
                executions=\(counts.executions)(+\(counts.duplicateExecutions)) stuck=\(counts.stuck) \
                dead-lettered=\(counts.deadLettered) 
                """
            + "recovery=\(rec) \(pass ? "PASS" : "FAIL")"
        if !notes.isEmpty { s += " | " + notes.joined(separator: "; ") }
        if !failures.isEmpty { s += " | failed: " + failures.joined(separator: "; ") }
        if !counts.examples.isEmpty { s += " | audit: " + counts.examples.joined(separator: ", ") }
        if !pass && !counts.repeated.isEmpty { s += " | called twice: " + counts.repeated.joined(separator: ", ") }
        return s
    }

    /// Prints the line, appends it to the results file, and records a test issue when it failed.
    func publish(sourceLocation: SourceLocation = #_sourceLocation) {
        print("fault: " + line)
        if let path = Servers.env["CONVEYOR_FAULT_RESULTS"], let h = FileHandle(forWritingAtPath: path) {
            h.seekToEndOfFile()
            h.write(Data((line + "\n").utf8))
            try? h.close()
        }
        if !pass { Issue.record("scenario \(name) failed: \(line)", sourceLocation: sourceLocation) }
    }
}

/// The sink's counts, shared with its request handler.
final class SinkCounts: Sendable {
    /// Calls per run id (the `Idempotency-Key` the http executor sends).
    let calls = Mutex<[String: Int]>([:])
    /// Calls per task name; the sink replies 500 to the first `k` (query `fail=k&task=NAME`).
    let failuresByTask = Mutex<[String: Int]>([:])
}

/// One scenario's system: a fresh database and broker prefix, the sink, and dispatcher and
/// worker processes started from the `conveyor` binary. Used from one task only.
final class FaultBed {
    let sys: System
    let name: String
    let sink: HTTPReceiver
    /// What the sink counted.
    let counts = SinkCounts()
    private let logDir: String
    let sinkHost: String

    static let finalStates = "('succeeded', 'failed', 'timed_out', 'cancelled', 'lost', 'dead', 'skipped', 'expired')"

    /// Runs `body` on a fresh bed; stops every process afterwards, whatever happens.
    static func run<T>(_ name: String, sinkHost: String = "127.0.0.5", _ body: (FaultBed) async throws -> T)
        async throws -> T
    {
        try await System.with { sys in
            let bed = try await FaultBed(sys: sys, name: name, sinkHost: sinkHost)
            let result: Result<T, any Error>
            do { result = .success(try await body(bed)) } catch { result = .failure(error) }
            await bed.stopAll()
            await bed.sink.close()
            return try result.get()
        }
    }

    /// One scenario: a fresh bed, a report named `title` that `body` fills in, published at the end.
    static func scenario(
        _ name: String, _ title: String, n: Int, sinkHost: String = "127.0.0.5",
        _ body: (FaultBed, inout FaultReport) async throws -> Void
    ) async throws {
        try await run(name, sinkHost: sinkHost) { bed in
            var report = FaultReport(name: title, n: n)
            do {
                try await body(bed, &report)
            } catch {
                // A scenario that stopped half-way still prints its line, as a failure.
                report.require(false, "stopped by \(error)")
                report.publish()
                throw error
            }
            report.publish()
        }
    }

    /// Waits up to `timeout` for `condition`; if it never holds, the scenario fails with `what`
    /// on its line. Returns whether it held.
    @discardableResult
    func until(_ what: String, timeout: Duration, _ report: inout FaultReport, _ condition: () async throws -> Bool)
        async throws -> Bool
    {
        let held = try await System.poll(timeout: timeout, condition)
        report.require(held, "\(what) did not hold within \(timeout)")
        return held
    }

    private init(sys: System, name: String, sinkHost: String) async throws {
        self.sys = sys
        self.name = name
        self.sinkHost = sinkHost
        let counts = counts
        // The sink: counts each run's calls, waits `ms`, and fails the first `fail` calls of `task`.
        sink = try await HTTPReceiver(host: sinkHost == "10.77.0.1" ? "0.0.0.0" : sinkHost, keepRequests: false) {
            request, _ in
            let key = request.headers["idempotency-key"] ?? "?"
            counts.calls.withLock { $0[key, default: 0] += 1 }
            let query = FaultBed.query(request.path)
            var reply = HTTPReceiver.Reply(status: 200, delay: .milliseconds(Int64(query["ms"] ?? "0") ?? 0))
            if let k = Int(query["fail"] ?? ""), let task = query["task"] {
                let n = counts.failuresByTask.withLock { f in
                    defer { f[task, default: 0] += 1 }
                    return f[task, default: 0]
                }
                if n < k { reply.status = 500 }
            }
            return reply
        }
        logDir = (Servers.env["CONVEYOR_FAULT_LOGS"] ?? NSTemporaryDirectory()) + "/" + name
        try? FileManager.default.removeItem(atPath: logDir)
        try FileManager.default.createDirectory(atPath: logDir, withIntermediateDirectories: true)
        try await sys.pool.withConnection { c in _ = try await c.simple(Self.auditSQL) }
    }

    static func query(_ path: String) -> [String: String] {
        guard let q = path.split(separator: "?", maxSplits: 1).dropFirst().first else { return [:] }
        var out: [String: String] = [:]
        for pair in q.split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1).map(String.init)
            if kv.count == 2 { out[kv[0]] = kv[1] }
        }
        return out
    }

    /// Every change of a run's state, and any overwrite of an outcome field of a run already
    /// final, written by the database itself with its transaction id: the oracle reads double
    /// recording and backwards moves from here, not from Conveyor's own counters. Steps inside
    /// one transaction are one recording (an attempt that used up its retries goes `failed` then
    /// `dead` in the transaction that records it); filling a field still empty is not an
    /// overwrite (a worker's error arriving after the dead letter that ended the run).
    static let auditSQL = """
        CREATE TABLE fault_audit (run_id uuid NOT NULL, old_state text, new_state text NOT NULL, overwrote boolean NOT
            NULL DEFAULT false,
                                  tx bigint NOT NULL DEFAULT txid_current(), at timestamptz NOT NULL DEFAULT
                                      clock_timestamp());
        CREATE FUNCTION fault_rank(s text) RETURNS int LANGUAGE sql IMMUTABLE AS $$
          SELECT CASE WHEN s IS NULL THEN -1 ELSE CASE s WHEN 'scheduled' THEN 0 WHEN 'queued' THEN 1 WHEN 'dispatched'
              THEN 2 WHEN 'running' THEN 3 ELSE 4 END END $$;
        CREATE FUNCTION fault_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE over boolean := fault_rank(OLD.state) = 4 AND (
            (OLD.finished_at IS NOT NULL AND NEW.finished_at IS DISTINCT FROM OLD.finished_at)
            OR (OLD.exit_code IS NOT NULL AND NEW.exit_code IS DISTINCT FROM OLD.exit_code)
            OR (OLD.error_class IS NOT NULL AND NEW.error_class IS DISTINCT FROM OLD.error_class)
            OR (OLD.worker_id IS NOT NULL AND NEW.worker_id IS DISTINCT FROM OLD.worker_id)
            OR (OLD.output IS NOT NULL AND NEW.output IS DISTINCT FROM OLD.output));
        BEGIN
          IF TG_OP = 'INSERT' THEN
            INSERT INTO fault_audit (run_id, old_state, new_state) VALUES (NEW.id, NULL, NEW.state);
          ELSIF NEW.state IS DISTINCT FROM OLD.state OR over THEN
            INSERT INTO fault_audit (run_id, old_state, new_state, overwrote) VALUES (NEW.id, OLD.state, NEW.state,
                over);
          END IF;
          RETURN NULL;
        END $$;
        CREATE TRIGGER fault_audit AFTER INSERT OR UPDATE ON runs FOR EACH ROW EXECUTE FUNCTION fault_audit();
        CREATE VIEW fault_double AS
          WITH settled AS (SELECT run_id, min(tx) AS tx FROM fault_audit WHERE fault_rank(new_state) = 4 GROUP BY
              run_id)
          SELECT a.* FROM fault_audit a JOIN settled s USING (run_id)
          WHERE a.tx <> s.tx AND fault_rank(a.old_state) = 4 AND (a.new_state <> a.old_state OR a.overwrote)
          UNION ALL
          SELECT a.* FROM fault_audit a WHERE fault_rank(a.new_state) < fault_rank(a.old_state);
        """

    // MARK: processes

    var commonEnvironment: [String: String] {
        [
            "CONVEYOR_DATABASE_URL": sys.databaseURL, "CONVEYOR_AMQP_URL": sys.dispatcherAMQPURL,
            "CONVEYOR_AMQP_PREFIX": sys.prefix,
            "CONVEYOR_AMQP_HEARTBEAT_SECONDS": "2", "CONVEYOR_LOG_LEVEL": "info",
        ]
    }

    /// A dispatcher process: 200 ms scans, a 3 s publish lease, 2 s lost grace.
    func startDispatcher(_ id: String, env extra: [String: String] = [:], httpPort: Int = 0, wrapper: [String] = [])
        throws
    {
        let env = commonEnvironment.merging([
            "CONVEYOR_DISPATCHER_QUEUES": sys.queue, "CONVEYOR_DISPATCHER_SCAN_INTERVAL_MS": "200",
            "CONVEYOR_DISPATCHER_MAINTENANCE_INTERVAL_MS": "200", "CONVEYOR_DISPATCHER_PUBLISH_LEASE_SECONDS": "3",
            "CONVEYOR_DISPATCHER_LOST_GRACE_MS": "2000", "CONVEYOR_DISPATCHER_GROUPS": "2",
            "CONVEYOR_DISPATCHER_HTTP_PORT": "\(httpPort)", "CONVEYOR_DISPATCHER_HTTP_HOST": "127.0.0.1",
        ]) { _, b in b }
        try start(id, ["dispatcher"], env: env.merging(extra) { _, b in b }, wrapper: wrapper)
    }

    /// A worker process offering http, noop and sleep; heartbeats every 500 ms, `started` after
    /// 100 ms, detached after 5 s (the fault broker's consumer timeout is 20 s), drained in 5 s.
    func startWorker(
        _ id: String, concurrency: Int = 8, env extra: [String: String] = [:], httpPort: Int = 0, wrapper: [String] = []
    ) throws {
        var env = commonEnvironment.merging([
            "CONVEYOR_WORKER_QUEUES": sys.queue, "CONVEYOR_WORKER_EXECUTORS": "http,noop,sleep",
            "CONVEYOR_WORKER_CONCURRENCY": "\(concurrency)", "CONVEYOR_WORKER_ID": id,
            "CONVEYOR_WORKER_HEARTBEAT_INTERVAL_MS": "500", "CONVEYOR_WORKER_STARTED_AFTER_MS": "100",
            "CONVEYOR_WORKER_DETACH_AFTER_MS": "5000", "CONVEYOR_WORKER_SHUTDOWN_GRACE_MS": "5000",
            "CONVEYOR_WORKER_HTTP_PORT": "\(httpPort)", "CONVEYOR_WORKER_HTTP_HOST": "127.0.0.1",
            "CONVEYOR_EXECUTORS_HTTP_ALLOWED_NETWORKS": "127.0.0.0/8,10.77.0.0/24",
        ]) { _, b in b }
        env.removeValue(forKey: "CONVEYOR_DATABASE_URL")
        env["CONVEYOR_AMQP_URL"] = sys.workerAMQPURL  // the worker's own login, as in production
        try start(id, ["worker"], env: env.merging(extra) { _, b in b }, wrapper: wrapper)
    }

    /// An API process on a free port, with the API's own broker login; waits until it answers
    /// /readyz. Returns the port.
    func startAPI(_ report: inout FaultReport, id: String = "api") async throws -> Int {
        let port = try Self.freePort()
        try start(
            id, ["api"],
            env: commonEnvironment.merging([
                "CONVEYOR_API_PORT": "\(port)", "CONVEYOR_API_HOST": "127.0.0.1", "CONVEYOR_AMQP_URL": sys.apiAMQPURL,
            ]) { _, b in b })
        try await until("api ready", timeout: .seconds(30), &report) { await Self.httpStatus(port: port) == 200 }
        return port
    }

    /// Starts `conveyor <args>` (through `wrapper`, e.g. `ip netns exec …`), its output in the
    /// bed's log folder. Spawned with posix_spawn and reaped with waitpid by the bed itself:
    /// Foundation's `Process` was seen to miss children's exits here and hang in `waitUntilExit`.
    func start(_ id: String, _ args: [String], env: [String: String], wrapper: [String] = []) throws {
        let template = try conveyorProcess(args, env: env)
        let argv = wrapper + [template.executableURL!.path] + args
        let environment = (template.environment ?? [:]).map { "\($0.key)=\($0.value)" }
        // Its own process group, so a signal reaches a wrapper's child too (faketime forks).
        let pid = try Self.spawn(argv, environment: environment, output: logPath(id), append: true, ownGroup: true)
        children[id] = Child(pid: pid)
    }

    struct Child {
        var pid: pid_t
        /// The exit status, or 128 + the signal that ended it; nil while it runs.
        var exit: Int32?
    }

    private(set) var children: [String: Child] = [:]

    func pid(_ id: String) -> pid_t { children[id]?.pid ?? 0 }

    func logPath(_ id: String) -> String { "\(logDir)/\(id).log" }

    /// The exit status if it has ended (reaping it), nil while it runs.
    @discardableResult
    func exitStatus(_ id: String) -> Int32? {
        guard var c = children[id] else { return nil }
        if let e = c.exit { return e }
        var st: Int32 = 0
        let r = waitpid(c.pid, &st, WNOHANG)
        guard r == c.pid else { return r < 0 ? -1 : nil }
        c.exit = Self.exitCode(st)
        children[id] = c
        return c.exit
    }

    func isRunning(_ id: String) -> Bool { children[id] != nil && exitStatus(id) == nil }

    /// Waits until it has ended; returns its status (128 + signal when killed).
    @discardableResult
    /// The process's exit status, waiting at most `limit`. A process still running then is a
    /// defect (it ignored its signal): recorded as an issue, then killed, so the suite goes on.
    func waitExit(_ id: String, within limit: Duration = .seconds(90)) async -> Int32 {
        let exited =
            (try? await System.poll(timeout: limit, every: .milliseconds(20)) { exitStatus(id) != nil }) ?? false
        if !exited {
            Issue.record("\(id) did not exit within \(limit); killing it")
            kill(-pid(id), SIGCONT)
            kill(-pid(id), SIGKILL)
            _ = try? await System.poll(timeout: .seconds(10), every: .milliseconds(20)) { exitStatus(id) != nil }
        }
        return exitStatus(id) ?? -1
    }

    /// Signals the process's group: the process and, under a wrapper, the wrapped program.
    func signal(_ id: String, _ sig: Int32) {
        guard isRunning(id) else { return }
        kill(-pid(id), sig)
    }

    /// `kill -9`, waiting until it is gone.
    func kill9(_ id: String) async {
        signal(id, SIGKILL)
        await waitExit(id)
    }

    func stopAll() async {
        for id in children.keys where isRunning(id) {
            kill(-pid(id), SIGCONT)
            kill(-pid(id), SIGKILL)
            await waitExit(id)
        }
    }

    // MARK: tasks

    /// `n` once-tasks calling the sink, each waiting `ms` there.
    func sinkTasks(
        _ n: Int, ms: Int = 0, name: String = "t", query: String = "", maxAttempts: Int = 1,
        timeoutSeconds: Double = 30
    ) -> [NewTask] {
        (0..<n).map { i in
            var t = NewTask(name: "\(name)-\(i)", executor: "http", schedule: .once)
            t.queue = sys.queue
            var url = "http://\(sinkHost):\(sink.port)/run?ms=\(ms)&task=\(name)-\(i)"
            if !query.isEmpty { url += "&" + query }
            t.parameters = .object(["url": .string(url), "method": .string("POST")])
            t.timeoutSeconds = timeoutSeconds
            t.retry.maxAttempts = maxAttempts
            return t
        }
    }

    func create(_ tasks: [NewTask]) async throws {
        for chunk in stride(from: 0, to: tasks.count, by: 2000) {
            try await sys.store.createTasks(Array(tasks[chunk..<min(chunk + 2000, tasks.count)]))
        }
    }

    // MARK: the oracle

    /// A count, tried again for up to 30 s while the database is away (scenario 5 restarts it
    /// under the harness's own connections too).
    func count(_ sql: String, _ params: [any PostgresEncodable] = []) async throws -> Int {
        try await retrying { try await self.sys.count(sql, params) }
    }

    func rows(_ sql: String, _ params: [any PostgresEncodable] = []) async throws -> [[String?]] {
        try await retrying { try await self.sys.rows(sql, params) }
    }

    func retrying<T>(_ body: () async throws -> T) async throws -> T {
        let deadline = ContinuousClock.now + .seconds(30)
        while true {
            do { return try await body() } catch let e as PostgresError
                where e.isRetriable && ContinuousClock.now < deadline
            {
                try await Task.sleep(for: .milliseconds(200))
            }
        }
    }

    /// Occurrences without a final outcome (the oracle's `lost` while the system still works).
    func unfinished() async throws -> Int {
        try await count(
            """
            SELECT (SELECT count(*) FROM tasks t WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.task_id = t.id))
                 + (SELECT count(*) FROM (SELECT DISTINCT ON (task_id, occurrence) state FROM runs
                                          ORDER BY task_id, occurrence, attempt DESC) l WHERE state NOT IN
                                              \(Self.finalStates))
            """)
    }

    /// Waits until every due occurrence has a final outcome, up to `timeout`; returns when it
    /// became quiet (nil if it never did).
    @discardableResult
    func waitQuiet(timeout: Duration) async throws -> ContinuousClock.Instant? {
        try await System.poll(timeout: timeout, every: .milliseconds(250)) { try await unfinished() == 0 }
            ? ContinuousClock.now : nil
    }

    func oracle() async throws -> OracleCounts {
        var c = OracleCounts()
        c.lost = try await unfinished()
        c.doubleRecorded = try await count(
            """
            SELECT (SELECT count(DISTINCT run_id) FROM fault_double)
                 + (SELECT count(*) FROM (SELECT 1 FROM runs GROUP BY task_id, occurrence, attempt HAVING count(*) > 1)
                     d)
            """)
        c.stuck = try await count(
            """
            SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE
              (r.state IN ('scheduled', 'queued') AND r.available_at < now() - interval '5 seconds')
              OR (r.state IN ('dispatched', 'running')
                  AND coalesce(r.started_at, r.dispatched_at, r.created_at) + make_interval(secs => t.timeout_seconds +
                      5) < now())
            """)
        c.deadLettered = try await count("SELECT count(*) FROM dead_letters")
        let calls = counts.calls.withLock { $0 }
        c.executions = calls.values.reduce(0, +)
        c.executedRuns = calls.count
        c.repeated = calls.filter { $0.value > 1 }.keys.sorted().prefix(4).map { "\($0) ×\(calls[$0] ?? 0)" }
        if c.doubleRecorded > 0 {
            c.examples = try await rows(
                """
                SELECT a.run_id::text || ' ' || coalesce(a.old_state, '-') || '>' || a.new_state || CASE WHEN
                    a.overwrote THEN ' (overwrote)' ELSE '' END
                FROM fault_audit a WHERE a.run_id IN (SELECT run_id FROM fault_double) ORDER BY a.run_id, a.at LIMIT 8
                """
            ).compactMap { $0[0] }
        }
        for row in try await rows("SELECT state, count(*)::text FROM runs GROUP BY 1 ORDER BY 1") {
            c.states[row[0] ?? "?"] = Int(row[1] ?? "") ?? 0
        }
        return c
    }

    // MARK: servers and probes

    /// `scripts/services.sh <args>` against the fault suite's servers (the environment says which).
    @discardableResult
    static func services(_ args: [String]) async throws -> (status: Int32, out: String) {
        try await spawnAndWait(FileManager.default.currentDirectoryPath + "/scripts/services.sh", args)
    }

    /// Runs a program to its end with posix_spawn and waits for it with waitpid on a thread of
    /// its own (never on the cooperative pool). Foundation's `Process.waitUntilExit` was seen to
    /// miss the exit of a script run while other children (the fleet) were alive, and hang.
    static func spawnAndWait(_ program: String, _ args: [String]) async throws -> (status: Int32, out: String) {
        let output = NSTemporaryDirectory() + "fault-spawn-\(UUID().uuidString).out"
        defer { try? FileManager.default.removeItem(atPath: output) }
        let child = try spawn([program] + args, environment: nil, output: output, append: false, ownGroup: false)
        let status: Int32 = await withCheckedContinuation { cont in
            Thread.detachNewThread {
                var st: Int32 = 0
                while waitpid(child, &st, 0) < 0 && errno == EINTR {}
                cont.resume(returning: exitCode(st))
            }
        }
        return (status, (try? String(contentsOfFile: output, encoding: .utf8)) ?? "")
    }

    /// posix_spawn: standard input from /dev/null, output and errors to `output`; `environment`
    /// nil inherits this process's. Returns the child's pid.
    static func spawn(_ argv: [String], environment: [String]?, output: String, append: Bool, ownGroup: Bool) throws
        -> pid_t
    {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC), 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        if ownGroup {
            posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
            posix_spawnattr_setpgroup(&attributes, 0)
        }
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = environment.map { $0.map { strdup($0) } + [nil] }
        defer { for p in cArgs + (cEnv ?? []) { free(p) } }
        var pid: pid_t = 0
        let rc =
            cEnv.map { posix_spawn(&pid, argv[0], &actions, &attributes, cArgs, $0) }
            ?? posix_spawn(&pid, argv[0], &actions, &attributes, cArgs, environ)
        guard rc == 0 else { throw FaultSetupError(what: "spawning \(argv): \(String(cString: strerror(rc)))") }
        return pid
    }

    /// A waitpid status as a shell shows it: the exit code, or 128 + the signal that ended it.
    static func exitCode(_ status: Int32) -> Int32 {
        (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }

    /// `rabbitmqctl <args>` against the fault suite's broker.
    @discardableResult
    static func rabbitmqctl(_ args: [String]) async throws -> String {
        try await services(["ctl"] + args).out
    }

    /// GET `http://127.0.0.1:<port><path>`; nil when nothing answers.
    static func httpStatus(port: Int, path: String = "/readyz") async -> Int? {
        await httpGet(port: port, path: path)?.status
    }

    /// A GET to a local status port; nil when nothing answers.
    static func httpGet(port: Int, path: String) async -> OutboundResponse? {
        var policy = OutboundPolicy()
        policy.allowedNetworks = [try! Network(parsing: "127.0.0.1")]
        return try? await OutboundHTTP(policy: policy, logger: Servers.logger)
            .send(
                OutboundRequest(method: "GET", url: "http://127.0.0.1:\(port)\(path)", headers: [], body: []),
                timeout: .seconds(2))
    }

    /// The sum of a metric's samples (all label sets) on a process's `/metrics`, or nil.
    static func metricSum(port: Int, _ name: String) async -> Double? {
        guard let r = await httpGet(port: port, path: "/metrics"), r.status == 200 else { return nil }
        return String(decoding: r.body, as: UTF8.self).split(separator: "\n")
            .filter { $0.hasPrefix(name + "{") || $0.hasPrefix(name + " ") }
            .compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }
            .reduce(0, +)
    }

    /// Resident memory of a process in MB (`VmRSS`).
    static func residentMB(_ pid: Int32) -> Double? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
            let kb = Double(line.split(separator: " ").dropFirst().first ?? "")
        else { return nil }
        return kb / 1024
    }

    /// A TCP port free on 127.0.0.1 now, as the kernel assigns it (a random pick could land on
    /// the fault servers' own ports).
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw FaultSetupError(what: "socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0
            }
        }
        guard ok else { throw FaultSetupError(what: "bind: \(String(cString: strerror(errno)))") }
        return Int(UInt16(bigEndian: addr.sin_port))
    }

    /// Whether every one of `ports` answers 200 on /readyz.
    static func allReady(_ ports: [Int]) async -> Bool {
        for p in ports where await httpStatus(port: p) != 200 { return false }
        return true
    }

    /// Freezes the broker's VM (SIGSTOP) for `frozen`, then kills it: what clients wrote to it
    /// meanwhile never reached its disk. `services.sh start` brings it back.
    static func freezeThenKillBroker(frozen: Duration = .seconds(2)) async throws {
        let out = try await services(["mq-pid"]).out.trimmingCharacters(in: .whitespacesAndNewlines)
        // kill(0, …) would stop this test's own process group: a pid must have been read.
        guard let vm = Int32(out), vm > 1 else { throw FaultSetupError(what: "no broker VM pid: \(out)") }
        kill(vm, SIGSTOP)
        try await Task.sleep(for: frozen)
        try await killBroker()
    }

    /// kill -9 of the broker's Erlang VM (`scripts/services.sh mq-kill`; `start` brings it back).
    static func killBroker() async throws {
        let r = try await services(["mq-kill"])
        if r.status != 0 { throw FaultSetupError(what: "services.sh mq-kill exited \(r.status): \(r.out)") }
    }

    /// Writes the broker's registry of quorum queues to disk. A scenario that kills the broker
    /// calls it once its processes are ready (every queue declared) and before its burst: the
    /// call takes a second or two (a CLI VM starts), which must not delay the fault itself.
    ///
    /// RabbitMQ 3.10.8 (Debian 12's) keeps each quorum queue's registration in a dets table that
    /// reaches the disk about two seconds after the queue is declared. A VM killed inside that
    /// window forgets the registration: on restart it starts the queue's Raft server from scratch
    /// (its confirmed messages gone) as a follower that never elects itself, and every consume and
    /// publish on that queue times out. With pika against this broker, three queues declared and
    /// 50 confirmed messages each, kill -9 0.5 s later: the last queue was lost 6 times of 6;
    /// with this sync before the kill, 0 of 3; with the kill 5 s or 20 s later, 0 of 4. Each
    /// scenario declares its own queues seconds before its fault, which a long-running broker does
    /// not; docs/reliability.md ("A quorum queue declared just before a hard kill") says what an
    /// operator sees and does if it happens in production.
    static func persistQueueRegistrations() async throws {
        let out = try await rabbitmqctl(["eval", "dets:sync(ra_directory_reverse)."])
        if out.trimmingCharacters(in: .whitespacesAndNewlines) != "ok" {
            throw FaultSetupError(what: "the broker's queue registry was not synced: \(out)")
        }
    }
}

/// A network namespace joined to the host by a veth pair (10.77.x.1 on the host, .2 inside),
/// whose traffic can be dropped without closing anyone's sockets.
enum Netns {
    static let hostAddress = "10.77.0.1"

    static func ip(_ args: [String]) async throws {
        let r = try await FaultBed.spawnAndWait(try Requirements.program("ip"), args)
        if r.status != 0 { throw FaultSetupError(what: "ip \(args.joined(separator: " ")): \(r.out)") }
    }

    static func create(_ ns: String) async throws {
        await delete(ns)
        try await ip(["netns", "add", ns])
        try await ip(["link", "add", "\(ns)-h", "type", "veth", "peer", "name", "\(ns)-n"])
        try await ip(["link", "set", "\(ns)-n", "netns", ns])
        try await ip(["addr", "add", "\(hostAddress)/24", "dev", "\(ns)-h"])
        try await ip(["link", "set", "\(ns)-h", "up"])
        let inside = ["netns", "exec", ns, try Requirements.program("ip")]
        try await ip(inside + ["addr", "add", "10.77.0.2/24", "dev", "\(ns)-n"])
        try await ip(inside + ["link", "set", "\(ns)-n", "up"])
        try await ip(inside + ["link", "set", "lo", "up"])
    }

    static func delete(_ ns: String) async {
        _ = try? await ip(["link", "del", "\(ns)-h"])
        _ = try? await ip(["netns", "del", ns])
    }

    /// Drops (or lets through again) every packet in and out of the namespace.
    static func drop(_ ns: String, _ on: Bool) async throws {
        for chain in ["INPUT", "OUTPUT"] {
            try await ip([
                "netns", "exec", ns, try Requirements.program("iptables"), on ? "-I" : "-D", chain, "-j", "DROP",
            ])
        }
    }
}

struct FaultSetupError: Error, CustomStringConvertible {
    var what: String
    var description: String { "fault setup failed: \(what)" }
}
