import ArgumentParser
import ConveyorCore
import Foundation

/// `conveyor cron next`: check an expression before deploying it.
struct CronCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cron", abstract: "Check cron expressions.", subcommands: [Next.self])

    struct Next: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the next fire times of a cron expression, one ISO-8601 instant with offset per line.",
            discussion:
                "Example: conveyor cron next '30 2 * * *' --tz America/New_York --from 2026-03-07T00:00:00Z --count 3")
        @Argument(help: "5 fields, 6 with leading seconds, or @yearly/@monthly/@weekly/@daily/@hourly.") var expression:
            String
        @Option(help: "IANA time zone (default UTC).") var tz = "UTC"
        @Option(help: "Start after this instant, ISO-8601 (default now).") var from: String?
        @Option(help: "How many (1–1000).") var count = 5

        func run() throws {
            let cron = try CronExpression(parsing: expression)
            guard let zone = TimeZone(identifier: tz) else {
                throw ValidationError(
                    field: "--tz", value: tz, hint: "an IANA time zone such as UTC, Europe/London or America/New_York")
            }
            guard (1...1000).contains(count) else {
                throw ValidationError(field: "--count", value: "\(count)", hint: "1 to 1000")
            }
            var t = Date()
            if let from {
                guard let d = Timestamp.parse(from) else {
                    throw ValidationError(
                        field: "--from", value: from, hint: "an ISO-8601 instant such as 2026-11-23T12:00:00Z")
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
