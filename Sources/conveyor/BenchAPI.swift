import ArgumentParser
import ConveyorAPI
import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// `conveyor bench-api`: the API's list and get latencies under a steady load, against a
/// database holding `--tasks` tasks and `--runs` runs (seeded once, in namespace `bench-api`).
/// The load comes from `wrk` (Debian's package), paced by a Lua `delay()` to about `--rate`
/// requests per second in all, one wrk run per kind of request.
struct BenchAPI: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-api",
        abstract: "Measure API list/get latency (wrk) against many tasks and runs.")
    @OptionGroup var common: CommonOptions
    @Option(help: "Tasks in the database.") var tasks = 100_000
    @Option(help: "Runs in the database (spread over the tasks).") var runs = 1_000_000
    @Option(help: "Requests per second in all, per kind of request.") var rate = 200
    @Option(help: "Seconds of load per kind of request.") var duration = 20
    @Option(help: "wrk connections.") var connections = 10
    @Flag(help: "Print one JSON object instead of text.") var json = false

    func validate() throws {
        guard (1...10_000_000).contains(tasks) else {
            throw ValidationError(field: "--tasks", value: String(tasks), hint: "1 to 10000000")
        }
        guard (0...100_000_000).contains(runs) else {
            throw ValidationError(field: "--runs", value: String(runs), hint: "0 to 100000000")
        }
        guard (1...100_000).contains(rate) else {
            throw ValidationError(field: "--rate", value: String(rate), hint: "1 to 100000")
        }
        guard (1...1000).contains(connections) else {
            throw ValidationError(field: "--connections", value: String(connections), hint: "1 to 1000")
        }
    }

    func run() async throws {
        let logger = try common.logger("conveyor.bench")
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/wrk") else {
            throw ValidationError(field: "wrk", value: "not installed", hint: "install it: apt-get install -y wrk")
        }
        let settings = try await common.settings("dispatcher.yaml")
        let c = try Connections(settings: settings, poolSize: 10)
        let pool = c.pool(logger: logger, connectRetryFor: .seconds(10))
        defer { pool.close() }
        try await Migrator(logger: logger).migrate(pool)
        let store = Store(pool: pool)
        let seedStart = ContinuousClock.now
        let seeded = try await seed(pool)
        let seedSeconds = (ContinuousClock.now - seedStart).components.seconds

        let (key, prefix, hash) = APIKeyFormat.generate()
        try await store.createAPIKey(
            prefix: prefix, secretHash: hash, name: "bench-api", role: Role.viewer.rawValue, namespace: "bench-api",
            expiresAt: nil)
        var options = APIOptions()
        options.perKey = .init(rate: 1_000_000, burst: 1_000_000)
        let port = Mutex(0)
        var quiet = logger
        quiet.logLevel = .warning
        let api = APIService(host: "127.0.0.1", port: 0, store: store, logger: quiet, options: options) { p in
            port.withLock { $0 = p }
        }
        let group = ServiceGroup(configuration: .init(services: [api], logger: quiet))
        var results: [[String: JSONValue]] = []
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            while port.withLock({ $0 }) == 0 { try await Task.sleep(for: .milliseconds(50)) }
            let base = "http://127.0.0.1:\(port.withLock { $0 })"
            // Each kind: a path template; {n} becomes a random task number.
            let kinds: [(String, String)] = [
                ("list tasks (first page)", "/v1/tasks?limit=50"),
                ("list tasks (filtered: prefix, state)", "/v1/tasks?limit=50&prefix=task-0{d}&state=failed"),
                ("get task (with recent runs)", "/v1/tasks/task-{n}"),
                ("list runs (newest)", "/v1/runs?limit=50"),
                ("list runs of a task", "/v1/runs?task=task-{n}&limit=50"),
            ]
            for (name, path) in kinds {
                results.append(try runWrk(name: name, base: base, path: path, key: key))
            }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        try await store.revokeAPIKey(prefix: prefix)
        let out: JSONValue = .object([
            "tasks": .number(Double(seeded.tasks)), "runs": .number(Double(seeded.runs)),
            "seed_seconds": .number(Double(seedSeconds)),
            "rate": .number(Double(rate)), "duration_s": .number(Double(duration)),
            "connections": .number(Double(connections)),
            "results": .array(results.map(JSONValue.object)),
        ])
        if json {
            print(String(decoding: out.jsonBytes, as: UTF8.self))
            return
        }
        print(
            """
            API latency with \(seeded.tasks) tasks and \(seeded.runs) runs (seeded in \(seedSeconds) s), ~\(rate) \
            req/s per kind, \(duration) s each, \(connections) connections
            """
        )
        print(
            TextTable.render(
                ["REQUEST", "REQ/S", "P50 MS", "P90 MS", "P99 MS", "MAX MS", "NON-2XX", "ERRORS"],
                results.map { r in
                    [
                        r["name"]?.stringValue ?? "", fmt(r["requests_per_second"]), fmt(r["p50_ms"]), fmt(r["p90_ms"]),
                        fmt(r["p99_ms"]), fmt(r["max_ms"]),
                        fmt(r["non_2xx"]), fmt(r["socket_errors"]),
                    ]
                }))
    }

    func fmt(_ v: JSONValue?) -> String {
        guard let d = v?.doubleValue else { return "-" }
        return d.rounded() == d ? String(Int(d)) : String(format: "%.2f", d)
    }

    /// Seeds the `bench-api` namespace up to the asked counts (kept between runs), then ANALYZE.
    func seed(_ pool: PostgresPool) async throws -> (tasks: Int, runs: Int) {
        try await pool.withConnection { c in
            let have = try await c.query("SELECT count(*) FROM tasks WHERE namespace = 'bench-api'").rows[0].int(0)
            if have < tasks {
                try await c.query(
                    """
                    INSERT INTO tasks (id, namespace, name, executor, parameters, schedule, queue, timeout_seconds,
                        shard, spec, labels, group_name)
                    SELECT gen_random_uuid(), 'bench-api', 'task-' || lpad(i::text, 6, '0'), 'noop', '{}', 'manual',
                        'bench-api', 300, i,
                           jsonb_build_object('name', 'task-' || lpad(i::text, 6, '0'), 'executor', 'noop', 'schedule',
                               'manual', 'queue', 'bench-api'),
                           jsonb_build_object('team', 'team-' || (i % 10)), 'group-' || (i % 100)
                    FROM generate_series($1::int + 1, $2::int) AS i
                    """, [have, tasks])
            }
            let haveRuns = try await c.query("SELECT count(*) FROM runs WHERE queue = 'bench-api'").rows[0].int(0)
            if haveRuns < runs {
                // Runs per task, newest first; states cycle so filters find some of each.
                let perTask = max(1, (runs - haveRuns + tasks - 1) / tasks)
                try await c.query(
                    """
                    INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at,
                        dispatched_at, started_at, finished_at,
                                      worker_id, exit_code, output, trace_id)
                    SELECT gen_random_uuid(), t.id, now() - make_interval(mins => g + $3::int), 1,
                           (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'dead'])[1 + ((t.shard + g) % 5)],
                               'bench-api', t.shard,
                           now(), now(), now(), now(), 'bench-worker', 0, 'ok', md5(t.id::text || g::text)
                    FROM (SELECT id, shard FROM tasks WHERE namespace = 'bench-api' ORDER BY name LIMIT $1) t,
                        generate_series(1, $2::int) AS g
                    """, [tasks, perTask, haveRuns / max(tasks, 1) + 1])
            }
            try await c.query("ANALYZE tasks")
            try await c.query("ANALYZE runs")
            let t = try await c.query("SELECT count(*) FROM tasks WHERE namespace = 'bench-api'").rows[0].int(0)
            let r = try await c.query("SELECT count(*) FROM runs WHERE queue = 'bench-api'").rows[0].int(0)
            return (t, r)
        }
    }

    /// One wrk run, paced to `rate` requests per second over all connections; its latency percentiles.
    func runWrk(name: String, base: String, path: String, key: String) throws -> [String: JSONValue] {
        // wrk waits `delay` after each response, so a connection sends 1 / (delay + latency) per
        // second: aim 10 % above the rate to land on it.
        let perConnectionMS = Double(connections) * 1000 / Double(rate) * 0.9
        let script = """
            math.randomseed(os.time())
            local n = \(tasks)
            request = function()
              local p = string.gsub("\(path)", "{n}", string.format("%06d", math.random(1, n)))
              p = string.gsub(p, "{d}", tostring(math.random(0, 9)))
              return wrk.format("GET", p, {["Authorization"] = "Bearer \(key)"})
            end
            delay = function() return \(Int(perConnectionMS)) end
            """
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("conveyor-bench-\(UUID()).lua")
        try script.write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/wrk")
        p.arguments = [
            "-t", "2", "-c", String(connections), "-d", "\(duration)s", "--latency", "--timeout", "5s", "-s", file.path,
            base,
        ]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return Self.parseWrk(text, name: name)
    }

    /// The figures of wrk's `--latency` report.
    static func parseWrk(_ text: String, name: String) -> [String: JSONValue] {
        func ms(_ s: Substring) -> Double? {
            let t = s.trimmingCharacters(in: .whitespaces)
            for (suffix, f) in [("us", 0.001), ("ms", 1.0), ("s", 1000.0), ("m", 60_000.0)] where t.hasSuffix(suffix) {
                if let v = Double(t.dropLast(suffix.count)) { return v * f }
            }
            return nil
        }
        var o: [String: JSONValue] = ["name": .string(name), "non_2xx": 0, "socket_errors": 0]
        for line in text.split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            if f.count == 2,
                let pct = ["50%": "p50_ms", "75%": "p75_ms", "90%": "p90_ms", "99%": "p99_ms"][String(f[0])],
                let v = ms(f[1])
            {
                o[pct] = .number(v)
            }
            if f.first == "Latency", f.count >= 4, let v = ms(f[3]) { o["max_ms"] = .number(v) }
            if f.first == "Requests/sec:", f.count == 2, let v = Double(f[1]) { o["requests_per_second"] = .number(v) }
            if line.contains("Non-2xx or 3xx responses:"), let v = f.last.flatMap({ Double($0) }) {
                o["non_2xx"] = .number(v)
            }
            if line.contains("Socket errors:") {
                o["socket_errors"] = .number(Double(f.compactMap { Double($0.filter(\.isNumber)) }.reduce(0, +)))
            }
        }
        if o["p99_ms"] == nil { o["wrk_output"] = .string(text) }
        return o
    }
}
