import ConveyorCore
import ConveyorStore
import Foundation
import Testing

/// The `conveyor` admin commands, run as the binary people run.
@Suite("conveyor CLI (real PostgreSQL)", .enabled(if: Servers.available, Comment(rawValue: Servers.skipMessage)), .serialized)
struct CLITests {
    @Test func cronNextPrintsInstantsWithTheirOffsets() throws {
        let r = try runConveyor(["cron", "next", "30 2 * * *", "--tz", "America/New_York", "--from", "2026-03-07T00:00:00Z", "--count", "3"])
        #expect(r.status == 0)
        #expect(r.out.split(separator: "\n") == ["2026-03-07T02:30:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"])
        let howe = try runConveyor(["cron", "next", "@daily", "--tz", "Australia/Lord_Howe", "--from", "2026-10-03T00:00:00Z", "--count", "2"])
        #expect(howe.out.split(separator: "\n") == ["2026-10-04T00:00:00+10:30", "2026-10-05T00:00:00+11:00"])
        let bad = try runConveyor(["cron", "next", "0 25 * * *"])
        #expect(bad.status != 0)
        #expect(bad.err.contains("field 2 (hour) '25'"), "\(bad.err)")
        let zone = try runConveyor(["cron", "next", "@hourly", "--tz", "Mars/Olympus"])
        #expect(zone.status != 0 && zone.err.contains("--tz"))
    }

    @Test func aYAMLTaskFileCreatesAWorkflowInOneTransaction() async throws {
        try await System.with { sys in
            let file = FileManager.default.temporaryDirectory.appendingPathComponent("tasks-\(UUID()).yaml")
            try """
            tasks:
              - name: extract
                executor: shell
                parameters: {argv: [/bin/echo, extract]}
                schedule: "0 30 2 * * MON-FRI"
                timezone: Europe/London
                misfire: skip
                priority: high
                retry: {max_attempts: 4, base_seconds: 5, retry_on: [timeout, "exit:75"]}
                group: nightly
                labels: {team: data}
              - name: load
                executor: noop
                depends_on: [extract]
                concurrency: {key: "warehouse", limit: 1}
            """.write(to: file, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(at: file) }
            let env = ["CONVEYOR_DATABASE_URL": sys.databaseURL]
            let r = try runConveyor(["task", "add", "--file", file.path], env: env)
            #expect(r.status == 0, "\(r.err)")
            let extract = try #require(try await sys.store.task(named: "extract"))
            #expect(extract.schedule == "0 30 2 * * MON-FRI" && extract.timeZone == "Europe/London" && extract.misfire == "skip")
            #expect(extract.priority == .high && extract.maxAttempts == 4 && extract.group == "nightly")
            let next = try #require(extract.nextRunAt)
            #expect(Calendar(identifier: .gregorian).dateComponents(in: TimeZone(identifier: "Europe/London")!, from: next).hour == 2)
            let load = try #require(try await sys.store.task(named: "load"))
            #expect(load.dependsOn == ["extract"] && load.schedule == "manual" && load.nextRunAt == nil && load.concurrencyLimit == 1)

            // A bad field is named with its path, and nothing is created.
            try "tasks:\n  - {name: ok, executor: noop}\n  - {name: bad, executor: noop, retry: {factor: 0}}\n".write(to: file, atomically: true, encoding: .utf8)
            let bad = try runConveyor(["task", "add", "--file", file.path], env: env)
            #expect(bad.status != 0 && bad.err.contains("tasks[1].retry.factor"), "\(bad.err)")
            #expect(try await sys.store.task(named: "ok") == nil)
            let flags = try runConveyor(["task", "add", "--name", "x", "--executor", "noop", "--misfire", "sometimes"], env: env)
            #expect(flags.status != 0 && flags.err.contains("misfire") && flags.err.contains("skip, once, all"), "\(flags.err)")
        }
    }
}
