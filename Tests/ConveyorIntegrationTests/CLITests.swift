import ConveyorCore
import ConveyorStore
import Foundation
import Testing

/// The `conveyor` admin commands, run as the binary people run.
@Suite(
    "conveyor CLI (real PostgreSQL)", .enabled(if: Servers.available, Comment(rawValue: Servers.skipMessage)),
    .serialized)
struct CLITests {
    @Test func cronNextPrintsInstantsWithTheirOffsets() throws {
        let r = try runConveyor([
            "cron", "next", "30 2 * * *", "--tz", "America/New_York", "--from", "2026-03-07T00:00:00Z", "--count", "3",
        ])
        #expect(r.status == 0)
        #expect(
            r.out.split(separator: "\n") == [
                "2026-03-07T02:30:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00",
            ])
        let howe = try runConveyor([
            "cron", "next", "@daily", "--tz", "Australia/Lord_Howe", "--from", "2026-10-03T00:00:00Z", "--count", "2",
        ])
        #expect(howe.out.split(separator: "\n") == ["2026-10-04T00:00:00+10:30", "2026-10-05T00:00:00+11:00"])
        let bad = try runConveyor(["cron", "next", "0 25 * * *"])
        #expect(bad.status != 0)
        #expect(bad.err.contains("field 2 (hour) '25'"), "\(bad.err)")
        let zone = try runConveyor(["cron", "next", "@hourly", "--tz", "Mars/Olympus"])
        #expect(zone.status != 0 && zone.err.contains("--tz"))
    }

    /// Both binaries print the version CHANGELOG.md is headed by.
    @Test func bothBinariesPrintTheChangelogsVersion() throws {
        let conveyor = try runConveyor(["--version"])
        #expect(conveyor.status == 0 && conveyor.out == ConveyorVersion.current + "\n", "\(conveyor.out)")
        let ctl = try CtlTests.ctl(["--version"], env: [:])
        #expect(ctl.status == 0 && ctl.out == ConveyorVersion.current + "\n", "\(ctl.out)")
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let changelog = try String(contentsOf: root.appendingPathComponent("CHANGELOG.md"), encoding: .utf8)
        #expect(changelog.contains("\n## \(ConveyorVersion.current)\n"), "CHANGELOG.md has no heading for this version")
    }
    /// The bench's steady mode refuses settings it cannot run, naming the flag, the value and the
    /// range, before it touches a server.
    @Test func benchRefusesASteadyRateDurationOrTriggerCountOutOfRange() throws {
        for (flag, value, range) in [
            ("--rate", "200000", "0 (a burst) to 100000"), ("--duration", "2", "5 to 3600"),
            ("--trigger-latency", "20000", "0 (off) to 10000"),
        ] {
            let r = try runConveyor(["bench", flag, value])
            #expect(r.status != 0)
            #expect(r.err.contains("invalid \(flag) '\(value)'") && r.err.contains(range), "\(r.err)")
        }
    }
}
