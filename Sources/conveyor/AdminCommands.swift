import ArgumentParser
import ConveyorCore
import ConveyorStore
import Foundation

/// `conveyor run …`: inspect, cancel and re-drive runs.
struct RunCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "Show, cancel and re-drive runs (needs database access).",
        subcommands: [Show.self, Cancel.self, Redrive.self])

    static func printRun(_ r: RunRecord, indent: String = "") {
        var line = "\(indent)run \(r.id.lowercasedString) #\(r.attempt) \(r.state.rawValue) due \(Timestamp.format(r.occurrence))"
        if let w = r.workerID { line += " on \(w)" }
        if let e = r.exitCode { line += " exit \(e)" }
        if r.state == .scheduled, let a = r.availableAt { line += " available \(Timestamp.format(a))" }
        if let m = r.reason ?? r.errorMessage { line += " — \(m)" }
        if let tid = r.traceID { line += " trace \(tid)" }
        print(line)
        if let o = r.output, !o.isEmpty { print("\(indent)  output: \(o.prefix(200).replacingOccurrences(of: "\n", with: "⏎"))") }
    }

    static func runID(_ text: String) throws -> UUID {
        guard let id = UUID(uuidString: text) else {
            throw ValidationError(field: "run id", value: text, hint: "a run id as printed by 'conveyor task show', e.g. 0b8f…-…")
        }
        return id
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one run with its output, error and trace id.")
        @OptionGroup var common: CommonOptions
        @Argument var id: String

        func run() async throws {
            let id = try RunCommand.runID(id)
            guard let r = try await common.withStore({ try await $0.run(id: id) }) else {
                throw ValidationError(field: "run id", value: self.id, hint: "no such run")
            }
            RunCommand.printRun(r)
            for c in try await common.withStore({ try await $0.callbacks(run: id) }) {
                var line = "  callback \(c.url) \(c.state) after \(c.attempts) attempt(s)"
                if let s = c.lastStatus { line += " HTTP \(s)" }
                if let e = c.lastError, c.state != "delivered" { line += " — \(e)" }
                print(line)
            }
        }
    }

    struct Cancel: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Cancel runs that have not ended; a worker running one kills its executor.")
        @OptionGroup var common: CommonOptions
        @Argument var ids: [String]

        func run() async throws {
            let ids = try ids.map(RunCommand.runID)
            let done = try await common.withStore { try await $0.cancel(runs: ids) }
            print("cancelled \(done.count) of \(ids.count) run(s)\(done.count < ids.count ? " (the others had ended)" : "")")
        }
    }

    struct Redrive: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Run an ended (dead, failed, lost, timed out, cancelled) run again as a new attempt.")
        @OptionGroup var common: CommonOptions
        @Argument var id: String

        func run() async throws {
            let id = try RunCommand.runID(id)
            let new = try await common.withStore { try await $0.redrive(run: id) }
            print(new.lowercasedString)
        }
    }
}

/// `conveyor group …`: a group's tasks at once.
struct GroupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "group", abstract: "Count, pause, resume and cancel a group of tasks (needs database access).",
        subcommands: [Counts.self, Pause.self, Resume.self, Cancel.self])

    struct Counts: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Runs of the group's tasks by state, and their retries.")
        @OptionGroup var common: CommonOptions
        @Argument(help: "The group; every task when left out.") var group: String?

        func run() async throws {
            let (counts, retries) = try await common.withStore { (try await $0.runCounts(group: group), try await $0.retryCount(group: group)) }
            Table.print(["STATE", "RUNS"], RunState.allCases.compactMap { s in counts[s].map { [s.rawValue, String($0)] } })
            print("retries: \(retries) (attempts after the first, re-drives included)")
        }
    }

    struct Pause: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Pause every task of the group.")
        @OptionGroup var common: CommonOptions
        @Argument var group: String

        func run() async throws { print("paused \(try await common.withStore { try await $0.setPaused(true, group: group) }) task(s)") }
    }

    struct Resume: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Resume every task of the group.")
        @OptionGroup var common: CommonOptions
        @Argument var group: String

        func run() async throws { print("resumed \(try await common.withStore { try await $0.setPaused(false, group: group) }) task(s)") }
    }

    struct Cancel: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Cancel every run of the group that has not ended.")
        @OptionGroup var common: CommonOptions
        @Argument var group: String

        func run() async throws { print("cancelled \(try await common.withStore { try await $0.cancel(group: group) }.count) run(s)") }
    }
}

/// `conveyor queue limit`: a work queue's rate limit.
struct WorkersCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "workers", abstract: "Workers known from their heartbeats: state, last heartbeat, runs in flight (needs database access).")
    @OptionGroup var common: CommonOptions

    func run() async throws {
        let workers = try await common.withStore { try await $0.workers() }
        Table.print(["WORKER", "STATE", "LAST HEARTBEAT", "IN FLIGHT", "CONCURRENCY", "QUEUES", "EXECUTORS", "HOST"], workers.map { w in
            [w.id, w.state, String(format: "%.1f s ago", w.secondsSinceHeartbeat), String(w.inFlight), String(w.concurrency),
             w.queues.joined(separator: ","), w.executors.joined(separator: ","), w.host]
        })
    }
}

struct QueueCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "queue", abstract: "Rate-limit work queues (needs database access).",
                                                    subcommands: [Limit.self])

    struct Limit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "At most --rate runs per second start from the queue, across all dispatchers.")
        @OptionGroup var common: CommonOptions
        @Argument var queue: String
        @Option(help: "Runs per second.") var rate: Double?
        @Option(help: "Most runs at once after a quiet spell (default: max(1, rate)).") var burst: Double?
        @Flag(help: "Remove the limit.") var remove = false

        func run() async throws {
            guard remove || (rate.map { $0 > 0 && $0.isFinite } ?? false) else {
                throw ValidationError(field: "--rate", value: rate.map { "\($0)" } ?? "(missing)", hint: "a positive number of runs per second, or --remove")
            }
            if let burst, burst < 1 { throw ValidationError(field: "--burst", value: "\(burst)", hint: "at least 1") }
            try await common.withStore { try await $0.setRateLimit(queue: queue, rate: remove ? nil : rate, burst: burst) }
            print(remove ? "removed the limit of \(queue)" : "\(queue): \(rate!) runs/s")
        }
    }
}

/// `conveyor cron next`: check an expression before deploying it.
struct CronCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "cron", abstract: "Check cron expressions.", subcommands: [Next.self])

    struct Next: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the next fire times of a cron expression, one ISO-8601 instant with offset per line.",
            discussion: "Example: conveyor cron next '30 2 * * *' --tz America/New_York --from 2026-03-07T00:00:00Z --count 3")
        @Argument(help: "5 fields, 6 with leading seconds, or @yearly/@monthly/@weekly/@daily/@hourly.") var expression: String
        @Option(help: "IANA time zone (default UTC).") var tz = "UTC"
        @Option(help: "Start after this instant, ISO-8601 (default now).") var from: String?
        @Option(help: "How many (1–1000).") var count = 5

        func run() throws {
            let cron = try CronExpression(parsing: expression)
            guard let zone = TimeZone(identifier: tz) else {
                throw ValidationError(field: "--tz", value: tz, hint: "an IANA time zone such as UTC, Europe/London or America/New_York")
            }
            guard (1...1000).contains(count) else { throw ValidationError(field: "--count", value: "\(count)", hint: "1 to 1000") }
            var t = Date()
            if let from {
                guard let d = Timestamp.parse(from) else {
                    throw ValidationError(field: "--from", value: from, hint: "an ISO-8601 instant such as 2026-11-23T12:00:00Z")
                }
                t = d
            }
            for _ in 0..<count {
                guard let n = cron.next(after: t, in: zone) else { break }
                print(Self.format(n, zone))
                t = n
            }
        }

        /// `2026-03-08T03:00:00-04:00`: the local time with its offset.
        static func format(_ d: Date, _ zone: TimeZone) -> String {
            let off = zone.secondsFromGMT(for: d)
            let local = String(Timestamp.format(d.addingTimeInterval(Double(off))).prefix(19))
            let sign = off < 0 ? "-" : "+"
            let a = abs(off)
            return local + (off == 0 ? "Z" : String(format: "%@%02d:%02d", sign, a / 3600, a % 3600 / 60))
        }
    }
}
