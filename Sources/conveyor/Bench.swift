import ArgumentParser
import ConveyorConfig
import ConveyorCore
import ConveyorDispatcher
import ConveyorPostgres
import ConveyorStore
import ConveyorWorker
import Foundation
import Logging

/// `conveyor bench`: N no-op tasks due at one instant, a dispatcher and W workers as separate
/// processes, and the end-to-end figures: throughput (first due → last outcome committed),
/// fire lateness (due → started) percentiles, and each process's RSS.
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure end-to-end throughput, lateness and memory on the configured servers.")
    @OptionGroup var common: CommonOptions
    @Option(help: "No-op tasks due at the same instant.") var tasks = 20_000
    @Option(help: "Worker processes.") var workers = 2
    @Option(help: "Concurrency of each worker.") var concurrency = 64
    @Option(help: "Dispatcher processes.") var dispatchers = 1
    @Option(help: "Give up after this many seconds.") var timeout = 300
    @Flag(help: "Print one JSON object instead of text.") var json = false
    @Option(
        name: .customLong("idle-tasks"), help: "Tasks that are not due (next run in a year), present during the run.")
    var idleTasks = 0
    @Option(
        name: .customLong("sleep-ms"),
        help: "Tasks run the sleep executor for this long instead of no-op (memory with runs in flight).") var sleepMS =
        0
    @Option(
        name: .customLong("shell-runs"),
        help: "Only time the shell executor: spawn to exit of /bin/true, this many times (no servers needed).")
    var shellRuns = 0
    @Option(
        help: "Steady mode: this many tasks, each every 1 s, first due times spread over one second (runs/s).")
    var rate = 0
    @Option(help: "Steady mode: seconds of steady load measured (after a warm-up of a fifth of it, at most 5 s).")
    var duration = 30
    @Option(
        name: .customLong("trigger-latency"),
        help: "Only trigger one task this many times on an idle system and report trigger → start.")
    var triggerLatency = 0
    @Flag(
        name: .customLong("scan-only"),
        help: "Only time the dispatcher's scan tick over --idle-tasks (nothing due) and show the plan.") var scanOnly =
        false

    func validate() throws {
        guard idleTasks >= 0, idleTasks <= 10_000_000 else {
            throw ValidationError(field: "--idle-tasks", value: String(idleTasks), hint: "0 to 10000000")
        }
        guard tasks > 0 else {
            throw ValidationError(field: "--tasks", value: String(tasks), hint: "must be at least 1")
        }
        guard (1...64).contains(workers) else {
            throw ValidationError(field: "--workers", value: String(workers), hint: "1 to 64")
        }
        guard (0...100_000).contains(rate) else {
            throw ValidationError(field: "--rate", value: String(rate), hint: "0 (a burst) to 100000 runs/s")
        }
        guard (5...3600).contains(duration) else {
            throw ValidationError(field: "--duration", value: String(duration), hint: "5 to 3600 seconds")
        }
        guard (0...10_000).contains(triggerLatency) else {
            throw ValidationError(
                field: "--trigger-latency", value: String(triggerLatency), hint: "0 (off) to 10000 triggers")
        }
        guard (1...8).contains(dispatchers) else {
            throw ValidationError(field: "--dispatchers", value: String(dispatchers), hint: "1 to 8")
        }
    }

    func run() async throws {
        let logger = try common.logger("conveyor.bench")
        if shellRuns > 0 { return try await measureShell() }
        let settings = try await common.settings("dispatcher.yaml")
        let c = try Connections(settings: settings, poolSize: 4)
        let pool = c.pool(logger: logger, connectRetryFor: .seconds(10))
        defer { pool.close() }
        try await Migrator(logger: logger).migrate(pool)
        let store = Store(pool: pool)
        let queue = "bench-" + UUID().lowercasedString.prefix(8)
        if idleTasks > 0 { try await createIdleTasks(pool, queue: queue) }
        if scanOnly {
            try await measureScan(pool, store: store, settings: settings, logger: logger, queue: queue)
            try await removeRows(pool, queue: queue)
            return
        }
        let children = try await startProcesses(queue: queue)
        defer { for (_, p) in children where p.isRunning { p.terminate() } }
        if rate > 0 { return try await runSteady(pool: pool, store: store, queue: queue, children: children) }
        if triggerLatency > 0 { return try await runTriggers(pool: pool, store: store, queue: queue) }
        let brokerBefore = await BrokerTotals.read()
        let idleRSS = Dictionary(uniqueKeysWithValues: children.map { ($0.role, rssMB($0.process.processIdentifier)) })

        // N tasks due together. They are created due in an hour, then one UPDATE makes them all due
        // 3 s after its start (database clock); if the setup ends later than that, the delay counts
        // against the measurement (the clock starts at the due time either way). The UPDATE leaves
        // each task a dead row version that tasks created by the API do not have: VACUUM removes
        // them before the burst. The CPU the burst costs is counted from here, after the setup.
        try await createTasks(tasks, schedule: .once, queue: queue, pool: pool, store: store)
        let dueAt = try await pool.withConnection { c in
            try await c.query(
                """
                UPDATE tasks SET next_run_at = now() + interval '3 seconds', anchor_at = now() + interval '3 seconds' \
                WHERE queue = $1 RETURNING next_run_at
                """,
                [queue]
            ).first?.date(0)
        }
        let setupLate = try await pool.withConnection { c in
            try await c.simple("VACUUM tasks")
            return try await c.query("SELECT now() > $1::timestamptz", [dueAt ?? Date()]).first!.bool(0)
        }
        let idleCPU = processCPU(children)

        // Done when no run of the queue is open and no task of it is still due: two EXISTS probes on
        // partial indexes, cheap at any size (a count over the runs cost PostgreSQL ~80 ms a poll at
        // 100,000 runs and slowed what it measured).
        var peakRSS = idleRSS
        let deadline = ContinuousClock.now + .seconds(timeout)
        var doneAt: Date?
        while ContinuousClock.now < deadline {
            for (role, p) in children { peakRSS[role] = max(peakRSS[role] ?? 0, rssMB(p.processIdentifier)) }
            let r = try await pool.withConnection { c in
                try await c.query(
                    """
                    SELECT EXISTS (SELECT 1 FROM runs WHERE state = 'scheduled' AND queue = $1)
                        OR EXISTS (SELECT 1 FROM runs WHERE state IN ('queued', 'dispatched') AND queue = $1)
                        OR EXISTS (SELECT 1 FROM runs WHERE state = 'running' AND queue = $1)
                        OR EXISTS (SELECT 1 FROM tasks WHERE next_run_at IS NOT NULL AND NOT paused AND deleted_at IS
                            NULL
                                   AND next_run_at < now() + interval '1 hour' AND queue = $1),
                           now()
                    """, [queue]
                ).first!
            }
            if !(try r.bool(0)) {
                doneAt = try r.date(1)
                break
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        let stats = try await pool.withConnection { c in
            try await c.query(
                """
                SELECT count(*), count(*) FILTER (WHERE state = 'succeeded'),
                       extract(epoch FROM min(occurrence)), extract(epoch FROM max(finished_at)),
                       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM started_at -
                           occurrence)),
                       count(*) - count(DISTINCT task_id)
                FROM runs WHERE queue = $1
                """, [queue]
            ).first!
        }
        // CPU each process spent on the burst (user + system), read before they stop.
        let cpu = processCPU(children).reduce(into: [String: Double]()) { out, e in
            out[e.key] = ((e.value - (idleCPU[e.key] ?? 0)) * 100).rounded() / 100
        }
        let brokerAfter = await BrokerTotals.read()
        for (_, p) in children where p.isRunning { p.terminate() }
        try await removeRows(pool, queue: queue)

        let runs = try stats.int(0)
        let succeeded = try stats.int(1)
        let firstDue = Double(stats[2] ?? "") ?? 0
        let lastFinished = Double(stats[3] ?? "") ?? 0
        let lateness = float8Array(stats[4])
        let committedSpan = (doneAt?.timeIntervalSince1970 ?? Date().timeIntervalSince1970) - firstDue
        let result = BenchResult(
            tasks: tasks, workers: workers, dispatchers: dispatchers, workerConcurrency: concurrency,
            completed: doneAt != nil, runs: runs, succeeded: succeeded, duplicateRuns: try stats.int(5),
            seconds: committedSpan, throughputPerSecond: Double(runs) / max(committedSpan, 0.001),
            executionSpanSeconds: lastFinished - firstDue,
            latenessP50ms: (lateness.first ?? 0) * 1000, latenessP95ms: (lateness.dropFirst().first ?? 0) * 1000,
            latenessP99ms: (lateness.last ?? 0) * 1000, idleRSSMB: idleRSS, peakRSSMB: peakRSS, cpuSeconds: cpu,
            broker: BrokerPerRun(from: brokerBefore, to: brokerAfter, runs: Double(runs)), setupOverran: setupLate)
        try emit(result, text: result.text)
        if !result.completed { throw ExitCode(2) }
    }

    /// Starts the worker and dispatcher processes on `queue`, lets them connect and settle, and
    /// checks that every one is still running.
    func startProcesses(queue: String) async throws -> [(role: String, process: Process)] {
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path

        var env = ProcessInfo.processInfo.environment
        env["CONVEYOR_CONFIG_DIR"] = common.directory
        env["CONVEYOR_LOG_LEVEL"] = env["CONVEYOR_BENCH_CHILD_LOG_LEVEL"] ?? "warning"
        env["CONVEYOR_DISPATCHER_QUEUES"] = queue
        env["CONVEYOR_WORKER_QUEUES"] = queue
        env["CONVEYOR_WORKER_EXECUTORS"] = sleepMS > 0 ? "sleep" : "noop"
        env["CONVEYOR_WORKER_HTTP_PORT"] = "0"
        env["CONVEYOR_DISPATCHER_HTTP_PORT"] = "0"
        env["CONVEYOR_WORKER_CONCURRENCY"] = String(concurrency)
        var children: [(role: String, process: Process)] = []
        for i in 0..<workers {
            var e = env
            e["CONVEYOR_WORKER_ID"] = "bench-worker-\(i)"
            children.append(("worker-\(i)", try spawn(exe, ["worker"], e)))
        }
        for i in 0..<dispatchers { children.append(("dispatcher-\(i)", try spawn(exe, ["dispatcher"], env))) }

        // Let them connect and settle (the caller then takes the idle footprint).
        try await Task.sleep(for: .seconds(3))
        for (role, p) in children where !p.isRunning {
            for (_, p) in children where p.isRunning { p.terminate() }
            throw ValidationError(
                field: role, value: "exited with status \(p.terminationStatus)",
                hint: "run 'conveyor \(role.hasPrefix("worker") ? "worker" : "dispatcher")' by hand to see why")
        }
        return children
    }

    /// Spawn-to-exit of `/bin/true` through the shell executor, one at a time and 8 at a time.
    func measureShell() async throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("bench-shell-\(UUID()).yaml").path
        try "allowed_commands: [/bin/true]\nlog_output: false\n".write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        let shell = try ShellExecutor(settings: try await Settings.load(file: file, environment: [:]))
        let context = ExecutionContext(
            runID: UUID(), taskName: "bench", attempt: 1, parameters: ["argv": ["/bin/true"]],
            timeout: .seconds(10), traceparent: nil, tracestate: nil, idempotencyKey: "bench")
        for _ in 0..<20 { _ = await shell.execute(context) }
        var samples: [Double] = []
        let clock = ContinuousClock()
        let serial = clock.now
        for _ in 0..<shellRuns {
            let t0 = clock.now
            let r = await shell.execute(context)
            guard r.outcome == .succeeded else {
                throw ValidationError(field: "/bin/true", value: "\(r)", hint: "the shell executor failed")
            }
            samples.append((clock.now - t0).inMilliseconds)
        }
        let serialTotal = (clock.now - serial).inSeconds
        samples.sort()
        func p(_ q: Double) -> Double { samples[min(samples.count - 1, Int(Double(samples.count) * q))] }
        let parallel = clock.now
        await withTaskGroup(of: Void.self) { g in
            for lane in 0..<8 {
                g.addTask { for _ in stride(from: lane, to: shellRuns, by: 8) { _ = await shell.execute(context) } }
            }
        }
        let parallelTotal = (clock.now - parallel).inSeconds
        print(
            """
            conveyor bench --shell-runs \(shellRuns): the shell executor, spawn to exit of /bin/true
              one at a time    p50 \(String(format: "%.2f", p(0.5))) ms   p95 \(String(format: "%.2f", p(0.95))) ms   \
            p99 \(String(format: "%.2f", p(0.99))) ms   \
            (\(String(format: "%.0f", Double(shellRuns) / serialTotal)) runs/s)
              8 at a time      \(String(format: "%.0f", Double(shellRuns) / parallelTotal)) runs/s
            """)
    }

    /// `idleTasks` tasks due in a year, inserted by the database in batches of 100,000.
    func createIdleTasks(_ pool: PostgresPool, queue: String) async throws {
        var made = 0
        let started = ContinuousClock.now
        while made < idleTasks {
            let n = min(100_000, idleTasks - made)
            try await pool.withConnection { c in
                _ = try await c.query(
                    """
                    INSERT INTO tasks (id, name, executor, schedule, queue, next_run_at, shard)
                    SELECT u, $1 || '-idle-' || g, 'noop', 'every 1d', $1, now() + interval '365 days' + g * interval
                        '1 second', hashtext(u::text) & 2147483647
                    FROM (SELECT gen_random_uuid() AS u, g FROM generate_series($2::int, $3::int) g) s
                    """, [queue, made, made + n - 1])
            }
            made += n
        }
        try await pool.withConnection { c in _ = try await c.simple("ANALYZE tasks") }
        FileHandle.standardError.write(
            Data("[bench] \(idleTasks) idle tasks inserted in \(ContinuousClock.now - started)\n".utf8))
    }

    /// Times the dispatcher's scan tick with nothing due (the probe: next due time, backlog, rate
    /// limits), and prints the probe's plan.
    func measureScan(_ pool: PostgresPool, store: Store, settings: Settings, logger: Logger, queue: String) async throws
    {
        let c = try Connections(settings: settings)
        let dc = try DispatcherConfiguration(settings: settings)
        let dispatcher = Dispatcher(configuration: dc, store: store, amqp: c.amqp, databaseURL: nil, logger: logger)
        var ticks: [Double] = []
        for i in 0..<220 {
            let t0 = ContinuousClock.now
            let n = await dispatcher.scanOnce()  // the probe, which also yields the next due time
            let ms = (ContinuousClock.now - t0).inMilliseconds
            if i >= 20 { ticks.append(ms) }  // the first ones warm the pool and the caches
            if n != 0 {
                throw ValidationError(
                    field: "--scan-only", value: "\(n)", hint: "something was due; run it on a quiet database")
            }
        }
        ticks.sort()
        let plan = try await pool.withConnection { c in
            try await c.query(
                "EXPLAIN (ANALYZE, BUFFERS) " + Store.probeSQL, [Priority.allCases.map(\.rawValue), Date?.none]
            ).rows
                .compactMap { $0[0] }
        }
        let total = try await pool.withConnection { c in try await c.query("SELECT count(*) FROM tasks").first!.int(0) }
        func p(_ q: Double) -> String {
            String(format: "%.2f", ticks[min(ticks.count - 1, Int(Double(ticks.count) * q))])
        }
        print(
            """
            conveyor bench --scan-only: \(total) tasks in the database, none due; \(dc.groups) task groups per tick
              scan tick        p50 \(p(0.5)) ms   p95 \(p(0.95)) ms   p99 \(p(0.99)) ms   max \(p(1)) ms  \
            (\(ticks.count) ticks)
              probe plan (what an idle tick runs):
            """)
        for line in plan { print("    " + line) }
    }

    func spawn(_ exe: String, _ args: [String], _ env: [String: String]) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        p.environment = env
        try p.run()
        return p
    }
}

struct BenchResult: Encodable {
    var tasks, workers, dispatchers, workerConcurrency: Int
    var completed: Bool
    var runs, succeeded, duplicateRuns: Int
    var seconds, throughputPerSecond, executionSpanSeconds: Double
    var latenessP50ms, latenessP95ms, latenessP99ms: Double
    var idleRSSMB, peakRSSMB: [String: Double]
    /// CPU seconds each process spent from the burst's start until all runs ended, with RabbitMQ's
    /// and PostgreSQL's (every `postgres` process). Counted from the end of the setup (tasks created,
    /// made due, vacuumed), which is before their due time unless `setupOverran`.
    var cpuSeconds: [String: Double]
    /// What the broker carried per run, idle traffic (heartbeats) included; nil without rabbitmqctl.
    var broker: BrokerPerRun?
    /// The setup ended after the tasks' due time: part of the burst's CPU was not counted.
    var setupOverran = false

    var text: String {
        func f(_ d: Double, _ p: Int = 1) -> String { String(format: "%.\(p)f", d) }
        var s = """
            conveyor bench: \(tasks) no-op tasks, \(dispatchers) dispatcher(s), \(workers) worker(s) × \
            \(workerConcurrency)
              completed        \(completed ? "yes" : "NO (timed out)")  runs \(runs), succeeded \(succeeded), \
            duplicate runs \(duplicateRuns)
              throughput       \(f(throughputPerSecond, 0)) tasks/s  \
            (first due → last outcome committed: \(f(seconds, 2)) s)
              fire lateness    p50 \(f(latenessP50ms)) ms   p95 \(f(latenessP95ms)) ms   p99 \(f(latenessP99ms)) ms
            """
        s +=
            "\n  CPU (s)          "
            + cpuSeconds.keys.sorted().map { "\($0) \(cpuSeconds[$0]!)" }.joined(separator: "; ")
        s +=
            "\n  RSS (MB)         "
            + idleRSSMB.keys.sorted().map { "\($0) idle \(idleRSSMB[$0]!) peak \(peakRSSMB[$0] ?? 0)" }.joined(
                separator: "; ")
        if let broker { s += "\n  broker per run   " + broker.text }
        if setupOverran { s += "\n  note             the setup ended after the due time: CPU counts part of the burst" }
        return s
    }
}
