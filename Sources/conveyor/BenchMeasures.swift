import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import ConveyorWorker
import Foundation

/// What the bench reads from outside its own process: CPU and memory of the processes it started
/// and of the servers (from /proc), and what RabbitMQ carried (from the broker itself).
extension Bench {
    /// `count` tasks named `<queue>-<i>` on `schedule`, no-op (or `--sleep-ms` sleeps), not due
    /// for an hour: the bench makes them due itself, with one UPDATE, when it starts the clock.
    func createTasks(_ count: Int, schedule: Schedule, queue: String, pool: PostgresPool, store: Store) async throws {
        let later = try await pool.withConnection { c in
            try await c.query("SELECT now() + interval '1 hour'").first!.date(0)
        }
        for chunk in stride(from: 0, to: count, by: 5000) {
            try await store.createTasks(
                (chunk..<min(chunk + 5000, count)).map { i in
                    var t = NewTask(name: "\(queue)-\(i)", executor: sleepMS > 0 ? "sleep" : "noop", schedule: schedule)
                    if sleepMS > 0 { t.parameters = ["seconds": .number(Double(sleepMS) / 1000)] }
                    t.queue = queue
                    t.timeoutSeconds = 60
                    t.startAt = later
                    return t
                })
        }
    }

    /// Removes the bench's runs and tasks, then VACUUMs both tables, so the next bench starts from
    /// the state this one found: back-to-back bursts left each 60,000 dead row versions that
    /// autovacuum did not keep up with (the tasks table grew to 684 MB over a dozen bursts, and
    /// each burst ran slower than the one before).
    func removeRows(_ pool: PostgresPool, queue: String) async throws {
        try await pool.withConnection { c in
            try await c.query("DELETE FROM runs WHERE queue = $1", [queue])
            try await c.query("DELETE FROM tasks WHERE queue = $1", [queue])
            try await c.simple("VACUUM runs, tasks")
        }
    }

    /// Prints `result` as one JSON object (`--json`) or as `text`.
    func emit(_ result: some Encodable, text: String) throws {
        if json {
            let e = JSONEncoder()
            e.outputFormatting = [.sortedKeys]
            print(String(decoding: try e.encode(result), as: UTF8.self))
        } else {
            print(text)
        }
    }

    /// CPU seconds so far of each bench process, and of the servers: every `postgres` process and
    /// RabbitMQ's `beam.smp` (summed by name from /proc; a backend that exited in between is missed).
    func processCPU(_ children: [(role: String, process: Process)]) -> [String: Double] {
        var cpu = Dictionary(uniqueKeysWithValues: children.map { ($0.role, cpuSeconds($0.process.processIdentifier)) })
        let names = ["postgres": "postgres", "beam.smp": "rabbitmq"]
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(entry),
                let comm = try? String(contentsOfFile: "/proc/\(entry)/comm", encoding: .utf8),
                let role = names[comm.trimmingCharacters(in: .whitespacesAndNewlines)]
            else { continue }
            cpu[role, default: 0] += cpuSeconds(pid)
        }
        return cpu
    }

    /// User plus system CPU seconds of a process so far (`/proc/<pid>/stat`, fields 14 and 15).
    func cpuSeconds(_ pid: Int32) -> Double {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = text.lastIndex(of: ")")
        else { return 0 }
        // Fields after the command name (which may hold spaces) start at field 3.
        let f = text[text.index(after: close)...].split(separator: " ")
        guard f.count > 12, let user = Double(f[11]), let system = Double(f[12]) else { return 0 }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Resident set size in MB, from /proc.
    func rssMB(_ pid: Int32) -> Double {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
            let kb = Double(line.split(separator: " ").dropFirst().first ?? "")
        else { return 0 }
        return (kb / 1024 * 10).rounded() / 10
    }
}

/// The values of a PostgreSQL float8 array as text (`{0.01,0.02,0.05}`), e.g. `percentile_cont(ARRAY[…])`.
func float8Array(_ text: String?) -> [Double] {
    (text ?? "{}").trimmingCharacters(in: CharacterSet(charactersIn: "{}")).split(separator: ",")
        .compactMap { Double($0) }
}

/// RabbitMQ's running totals: messages published to it over AMQP 0-9-1 and messages it delivered
/// to consumers (its global counters), bytes in and out over every AMQP connection open now, and
/// the broker's clock when read. Read with `rabbitmqctl eval` through `CONVEYOR_RABBITMQCTL`, the
/// command `scripts/services.sh` writes to `.local/env`; without it the bench leaves these out.
/// One read costs about 2 s (an Erlang VM starts), so the bench reads outside what it times.
struct BrokerTotals: Sendable {
    var published = 0
    var delivered = 0
    var bytesIn = 0
    var bytesOut = 0
    var atMilliseconds = 0

    static let expression = """
        M = rabbit_global_counters:overview(), \
        P = maps:get(messages_received_total, maps:get([{protocol, amqp091}], M)), \
        D = lists:sum([maps:get(messages_delivered_total, V) \
            || {[{protocol, amqp091}, {queue_type, _}], V} <- maps:to_list(M)]), \
        {I, O} = lists:foldl(fun(C, {A, B}) -> {A + proplists:get_value(recv_oct, C, 0), \
            B + proplists:get_value(send_oct, C, 0)} end, {0, 0}, \
            [rabbit_networking:connection_info(C, [recv_oct, send_oct]) || C <- rabbit_networking:connections()]), \
        lists:flatten(io_lib:format("totals ~p ~p ~p ~p ~p", \
            [P, D, I, O, erlang:system_time(millisecond)])).
        """

    /// The totals now, or nil (no `CONVEYOR_RABBITMQCTL`, or the command failed).
    static func read() async -> BrokerTotals? {
        guard let command = ProcessInfo.processInfo.environment["CONVEYOR_RABBITMQCTL"], !command.isEmpty else {
            return nil
        }
        let argv = command.split(separator: " ").map(String.init) + ["eval", expression]
        // Spawned and reaped with waitpid on a thread of its own (the shell executor's way):
        // Foundation's `Process` was seen to miss a child's exit while other children run, and
        // the bench's dispatcher and workers are children too.
        let output: String?
        switch await ChildProcess.run(
            argv: argv, environment: ProcessInfo.processInfo.environment,
            directory: FileManager.default.currentDirectoryPath, outputLimit: 65_536, killGrace: .seconds(1))
        {
        case .success(let f) where f.exitCode == 0: output = f.stdout
        default: output = nil
        }
        guard let output, let range = output.range(of: "totals ") else { return nil }
        let n = output[range.upperBound...].split(whereSeparator: { !$0.isNumber }).compactMap { Int($0) }
        guard n.count >= 5 else { return nil }
        return BrokerTotals(published: n[0], delivered: n[1], bytesIn: n[2], bytesOut: n[3], atMilliseconds: n[4])
    }
}

/// What the broker carried per run between two readings of its totals.
struct BrokerPerRun: Encodable, Sendable {
    /// Messages published to the broker, and delivered by it, per run.
    var messagesIn, messagesOut: Double
    /// Bytes received from and sent to AMQP clients per run (frames, headers and bodies).
    var bytesIn, bytesOut: Double

    /// Per run, from `before` to `after`, over `runs` runs; nil if either reading is missing.
    init?(from before: BrokerTotals?, to after: BrokerTotals?, runs: Double) {
        guard let before, let after, runs > 0 else { return nil }
        func per(_ a: Int, _ b: Int) -> Double { (Double(b - a) / runs * 100).rounded() / 100 }
        messagesIn = per(before.published, after.published)
        messagesOut = per(before.delivered, after.delivered)
        bytesIn = per(before.bytesIn, after.bytesIn).rounded()
        bytesOut = per(before.bytesOut, after.bytesOut).rounded()
    }

    var text: String {
        String(
            format: "messages in %.2f, out %.2f; bytes in %.0f, out %.0f", messagesIn, messagesOut, bytesIn,
            bytesOut)
    }
}
