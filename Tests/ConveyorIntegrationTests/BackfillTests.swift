import ConveyorAPI
import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import Foundation
import Testing

/// Backfill: a recurring task's past occurrences in a range, run now; the occurrence key keeps
/// each to one run, repeated or raced.
@Suite("Backfill (real PostgreSQL and RabbitMQ)", .serialized)
struct BackfillTests {
    @Test func occurrencesFollowTheCronAndTheIntervalGridBackwards() throws {
        let utc = TimeZone(identifier: "UTC")!
        let from = Timestamp.parse("2026-11-01T00:00:00Z")!
        let to = Timestamp.parse("2026-11-01T05:00:00Z")!
        let hourly = try Schedule(parsing: "0 * * * *")
        func instants(_ texts: [String]) -> [Date] { texts.map { Timestamp.parse($0)! } }
        #expect(
            hourly.occurrences(from: from, to: to, anchor: to, timeZone: utc, limit: 100)
                == instants([
                    "2026-11-01T00:00:00Z", "2026-11-01T01:00:00Z", "2026-11-01T02:00:00Z", "2026-11-01T03:00:00Z",
                    "2026-11-01T04:00:00Z",
                ]), "from included, to excluded")
        // An interval's grid runs through its anchor, also before it: 16 × 90 min before
        // 2026-11-02T00:15 is 2026-11-01T00:15.
        let every90m = try Schedule(parsing: "every 90m")
        let anchor = Timestamp.parse("2026-11-02T00:15:00Z")!
        #expect(
            every90m.occurrences(from: from, to: to, anchor: anchor, timeZone: utc, limit: 100)
                == instants([
                    "2026-11-01T00:15:00Z", "2026-11-01T01:45:00Z", "2026-11-01T03:15:00Z", "2026-11-01T04:45:00Z",
                ]))
        let perSecond = try Schedule(parsing: "* * * * * *")
        #expect(
            perSecond.occurrences(
                from: from, to: from.addingTimeInterval(86_400 * 365), anchor: from, timeZone: utc, limit: 50
            )
            .count == 51, "a huge range stops one past the limit")
        #expect(Schedule.manual.occurrences(from: from, to: to, anchor: from, timeZone: utc, limit: 10).isEmpty)
    }

    @Test func aBackfillRunsEachMissingOccurrenceOnceAndRefusesWhatItCannotDo() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let op = try await APITests.key(sys, role: .operator, namespace: "default")
                let created = try await api.call(
                    "POST", "/v1/tasks", key: op,
                    body:
                        #"{"name": "hourly", "executor": "record", "queue": "\#(sys.queue)", "schedule": "0 * * * *"}"#)
                #expect(created.status == 201, "\(created.json)")
                let now = Date()
                let to = Timestamp.format(now.addingTimeInterval(-3600 * 24))
                let from = Timestamp.format(now.addingTimeInterval(-3600 * 29))
                // One occurrence of the range ran already: it keeps its run.
                let hour = Timestamp.parse(Timestamp.format(now.addingTimeInterval(-3600 * 26)))!
                let ranOccurrence = Date(
                    timeIntervalSince1970: (hour.timeIntervalSince1970 / 3600).rounded(.down) * 3600)
                try await sys.pool.withConnection { c in
                    _ = try await c.query(
                        """
                        INSERT INTO runs (id, task_id, occurrence, attempt, state, queue, shard, available_at,
                            finished_at)
                        SELECT gen_random_uuid(), id, $1, 1, 'failed', queue, shard, now(), now() FROM tasks
                        WHERE name = 'hourly'
                        """, [ranOccurrence])
                }
                let body = #"{"from": "\#(from)", "to": "\#(to)""#
                let dry = try await api.call(
                    "POST", "/v1/tasks/hourly/backfill", key: op, body: body + #", "dry_run": true}"#)
                #expect(dry.status == 200, "\(dry.json)")
                #expect(
                    dry.json["occurrences"] == 5 && dry.json["existing"] == 1 && dry.json["created"] == 0, "\(dry.json)"
                )
                #expect(
                    dry.json["runs"]?.arrayValue?.filter { $0["existing_state"] == "failed" }.first?["occurrence"]
                        == .string(Timestamp.format(ranOccurrence)))
                #expect(try await sys.count("SELECT count(*) FROM runs") == 1, "a dry run writes nothing")
                let ctl = try CtlTests.ctl(
                    ["task", "backfill", "hourly", "--from", from, "--to", to, "--dry-run", "-o", "json"],
                    env: ["CONVEYOR_URL": api.base, "CONVEYOR_API_KEY": op])
                #expect(ctl.status == 0, "\(ctl.err)")
                let listed = try JSONDecoder().decode(JSONValue.self, from: Data(ctl.out.utf8))
                #expect(listed["occurrences"] == 5 && listed["dry_run"] == true, "\(ctl.out)")

                // Two backfills of the same range at once: four runs in all, one per missing occurrence.
                async let a = api.call(
                    "POST", "/v1/tasks/hourly/backfill", key: op, body: body + #", "priority": "low"}"#)
                async let b = api.call(
                    "POST", "/v1/tasks/hourly/backfill", key: op, body: body + #", "priority": "low"}"#)
                let (first, second) = try await (a, b)
                #expect(first.status == 202 && second.status == 202, "\(first.json) \(second.json)")
                #expect(
                    [first.json["created"], second.json["created"]].compactMap { $0?.doubleValue }.sorted() == [0, 4],
                    "\(first.json["created"] ?? .null) \(second.json["created"] ?? .null)")
                #expect(try await sys.count("SELECT count(*) FROM runs") == 5)
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM runs WHERE state = 'scheduled' AND priority = \(Priority.low.rawValue)")
                        == 4)

                let recorder = Recorder()
                let worker = sys.worker(["record": RecordingExecutor(recorder: recorder)])
                try await withServices([sys.dispatcher(), worker]) {
                    _ = try await sys.eventually(timeout: .seconds(30), "the backfilled runs succeed") {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 4
                    }
                }
                #expect(recorder.total == 4, "each occurrence ran once")

                for (b, field) in [
                    (#"{"from": "\#(from)", "to": "\#(from)"}"#, "to"),
                    (#"{"from": "\#(from)", "to": "\#(Timestamp.format(now.addingTimeInterval(3600)))"}"#, "to"),
                    (#"{"from": "yesterday", "to": "\#(to)"}"#, "from"),
                    (#"{"from": "\#(from)", "to": "\#(to)", "max_runs": 2}"#, "max_runs"),
                    (#"{"from": "\#(from)", "to": "\#(to)", "max_runs": 1e300}"#, "max_runs"),
                    (#"{"from": "\#(from)", "to": "\#(to)", "priority": "urgent"}"#, "priority"),
                    (#"{"from": "\#(from)", "to": "\#(to)", "overlap": "forbid"}"#, "overlap"),
                    (#"{"from": "\#(from)", "to": "\#(to)", "catch_up": true}"#, "catch_up"),
                ] {
                    let r = try await api.call("POST", "/v1/tasks/hourly/backfill", key: op, body: b)
                    #expect(r.status == 400 && r.json["field"]?.stringValue == field, "\(b): \(r.json)")
                }
                let tooMany = try await api.call(
                    "POST", "/v1/tasks/hourly/backfill", key: op,
                    body: #"{"from": "\#(from)", "to": "\#(to)", "max_runs": 2}"#)
                #expect(
                    tooMany.json["detail"]?.stringValue?.contains("holds 5 occurrences") == true
                        && tooMany.json["detail"]?.stringValue?.contains("max_runs is 2") == true, "\(tooMany.json)")
                _ = try await api.call(
                    "POST", "/v1/tasks", key: op,
                    body: #"{"name": "by-hand", "executor": "record", "schedule": "manual"}"#)
                let manual = try await api.call("POST", "/v1/tasks/by-hand/backfill", key: op, body: body + "}")
                #expect(manual.status == 400 && manual.json["field"] == "schedule", "\(manual.json)")
                let submitter = try await APITests.key(sys, role: .submitter, namespace: "default")
                #expect(
                    try await api.call("POST", "/v1/tasks/hourly/backfill", key: submitter, body: body + "}").status
                        == 403)
                let other = try await APITests.key(sys, role: .operator, namespace: "elsewhere")
                #expect(
                    try await api.call("POST", "/v1/tasks/hourly/backfill", key: other, body: body + "}").status == 404)
                #expect(try await sys.count("SELECT count(*) FROM runs") == 5, "refusals made nothing")
                #expect(try await sys.count("SELECT count(*) FROM audit_log WHERE action = 'task.backfill'") == 2)
            }
        }
    }

    /// `overlap: queue`: one at a time, oldest first, each after the one before has ended.
    @Test func aQueuedBackfillRunsOneOccurrenceAtATimeOldestFirst() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let op = try await APITests.key(sys, role: .operator, namespace: "default")
                let created = try await api.call(
                    "POST", "/v1/tasks", key: op,
                    body:
                        #"{"name": "slow", "executor": "scripted", "queue": "\#(sys.queue)", "schedule": "0 * * * *", "parameters": {"sleep_ms": 300}}"#
                )
                #expect(created.status == 201, "\(created.json)")
                let now = Date()
                let from = Timestamp.format(now.addingTimeInterval(-3600 * 28))
                let to = Timestamp.format(now.addingTimeInterval(-3600 * 24))
                let r = try await api.call(
                    "POST", "/v1/tasks/slow/backfill", key: op,
                    body: #"{"from": "\#(from)", "to": "\#(to)", "overlap": "queue"}"#)
                #expect(r.status == 202 && r.json["created"] == 4 && r.json["overlap"] == "queue", "\(r.json)")
                #expect(
                    try await sys.count("SELECT count(*) FROM runs WHERE available_at = 'infinity'") == 3,
                    "all but the oldest wait")
                let recorder = Recorder()
                let worker = sys.worker(["scripted": ScriptedExecutor(recorder: recorder)], concurrency: 8)
                try await withServices([sys.dispatcher(), worker]) {
                    _ = try await sys.eventually(timeout: .seconds(30), "the four runs succeed") {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 4
                    }
                }
                // In occurrence order, each started after the one before finished.
                let rows = try await sys.rows(
                    """
                    SELECT (started_at >= lag(finished_at) OVER (ORDER BY occurrence))::text,
                           (started_at >= lag(started_at) OVER (ORDER BY occurrence))::text
                    FROM runs ORDER BY occurrence
                    """)
                #expect(rows.dropFirst().allSatisfy { $0 == ["true", "true"] }, "\(rows)")
                #expect(recorder.total == 4)
            }
        }
    }
}
