import ConveyorAPI
import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import Foundation
import Testing

/// Unique tasks: a task carrying a uniqueness key is not created while another holds the key;
/// the create answers the holder with `deduplicated: true`. Held by the primary key of
/// `task_unique_keys`, so it holds across concurrent submitters and API replicas.
@Suite("Unique tasks (real PostgreSQL and RabbitMQ)", .serialized)
struct UniqueTaskTests {
    /// Submissions per submitter; `CONVEYOR_UNIQUE_SUBMISSIONS=1000` with 100 keys is the measure
    /// in docs/benchmarks.md.
    static var submissions: Int { Int(ProcessInfo.processInfo.environment["CONVEYOR_UNIQUE_SUBMISSIONS"] ?? "") ?? 40 }
    static var keys: Int { Int(ProcessInfo.processInfo.environment["CONVEYOR_UNIQUE_KEYS"] ?? "") ?? 10 }

    static func unlimited() -> APIOptions {
        var options = APIOptions()
        options.perKey = .init(rate: 1_000_000, burst: 1_000_000)
        for p in Priority.allCases { options.submitByPriority[p] = .init(rate: 1_000_000, burst: 1_000_000) }
        return options
    }

    @Test func concurrentSubmittersCreateOneTaskPerKey() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys, options: Self.unlimited()) { api, _ in
                let k = try await APITests.key(sys, role: .submitter, namespace: "default")
                let (n, keys) = (Self.submissions, Self.keys)
                let started = ContinuousClock.now
                let s = try await withThrowingTaskGroup(of: [Int: Int].self) { group in
                    for submitter in 0..<16 {
                        group.addTask {
                            var statuses: [Int: Int] = [:]
                            for i in 0..<n {
                                let r = try await api.call(
                                    "POST", "/v1/tasks", key: k,
                                    body: """
                                        {"name": "u-\(submitter)-\(i)", "executor": "noop", "schedule": "once", \
                                        "after": "1h", "unique": {"key": "k\((i * 7 + submitter) % keys)"}}
                                        """)
                                statuses[r.status, default: 0] += 1
                                if r.status == 200 {
                                    #expect(r.json["deduplicated"] == true, "\(r.json)")
                                } else if r.status != 201 {
                                    Issue.record("submission answered \(r.status): \(r.json)")
                                }
                            }
                            return statuses
                        }
                    }
                    return try await group.reduce(into: [:]) { all, one in all.merge(one, uniquingKeysWith: +) }
                }
                let seconds = (ContinuousClock.now - started).inSeconds
                print("unique: \(16 * n) submissions of \(keys) keys in \(seconds) s: \(s)")
                #expect(s[201] == keys, "one created per key: \(s)")
                #expect(s[200] == 16 * n - keys, "\(s)")
                #expect(try await sys.count("SELECT count(*) FROM tasks") == keys)
                #expect(try await sys.count("SELECT count(DISTINCT spec->'unique'->>'key') FROM tasks") == keys)
            }
        }
    }

    @Test func aKeyIsHeldWhileItsHolderIsActiveOrForItsWindow() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .operator, namespace: "default")
                func submit(_ name: String, _ unique: String, schedule: String = "once") async throws -> (
                    Int, JSONValue
                ) {
                    let r = try await api.call(
                        "POST", "/v1/tasks", key: k,
                        body:
                            #"{"name": "\#(name)", "executor": "record", "queue": "\#(sys.queue)", "schedule": "\#(schedule)", "unique": \#(unique)}"#
                    )
                    return (r.status, r.json)
                }
                // Active: the one-off holder keeps the key until its run ends.
                let (s1, first) = try await submit("invoice-a", #"{"key": "invoice:42"}"#)
                #expect(s1 == 201 && first["unique"] == .object(["key": "invoice:42", "scope": "active"]), "\(first)")
                let (s2, dup) = try await submit("invoice-b", #"{"key": "invoice:42"}"#)
                #expect(s2 == 200 && dup["deduplicated"] == true && dup["name"] == "invoice-a", "\(dup)")
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE name = 'invoice-b'") == 0)
                let recorder = Recorder()
                try await withServices([
                    sys.dispatcher(), sys.worker(["record": RecordingExecutor(recorder: recorder)]),
                ]) {
                    _ = try await sys.eventually(timeout: .seconds(30), "invoice-a runs") {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 1
                    }
                    let (s3, again) = try await submit("invoice-c", #"{"key": "invoice:42"}"#)
                    #expect(s3 == 201 && again["name"] == "invoice-c", "the run ended: the key is free \(again)")
                }

                // A recurring holder keeps its key while it exists; deleting it frees the key.
                #expect(try await submit("hourly", #"{"key": "report"}"#, schedule: "0 * * * *").0 == 201)
                #expect(try await submit("hourly-2", #"{"key": "report"}"#, schedule: "0 * * * *").0 == 200)
                _ = try await api.call("DELETE", "/v1/tasks/hourly", key: k)
                #expect(try await submit("hourly-3", #"{"key": "report"}"#, schedule: "0 * * * *").0 == 201)
                let ctl = try CtlTests.ctl(
                    ["task", "add", "dup", "--executor", "noop", "--schedule", "manual", "--unique", "report"],
                    env: ["CONVEYOR_URL": api.base, "CONVEYOR_API_KEY": k])
                #expect(
                    ctl.status == 0 && ctl.out == "not created: task hourly-3 holds unique key report\n",
                    "\(ctl.out)\(ctl.err)")

                // Window: held for its time after the holder's creation, whatever the holder does.
                #expect(try await submit("w1", #"{"key": "digest", "window": "1h"}"#).0 == 201)
                let (s4, w2) = try await submit("w2", #"{"key": "digest", "scope": "window", "window": 3600}"#)
                #expect(s4 == 200 && w2["name"] == "w1", "\(w2)")
                try await sys.pool.withConnection { c in
                    _ = try await c.query("UPDATE task_unique_keys SET expires_at = now() - interval '1 s'")
                }
                #expect(try await submit("w3", #"{"key": "digest", "window": "1h"}"#).0 == 201, "the window passed")

                // A batch: the first entry with a key is created, later ones answer it.
                let batch = try await api.call(
                    "POST", "/v1/tasks", key: k,
                    body: """
                        [{"name": "b1", "executor": "noop", "schedule": "manual", "unique": {"key": "b"}},
                         {"name": "b2", "executor": "noop", "schedule": "manual", "unique": {"key": "b"}},
                         {"name": "b3", "executor": "noop", "schedule": "manual"},
                         {"name": "b4", "executor": "noop", "schedule": "manual", "unique": {"key": "digest"}}]
                        """)
                #expect(
                    batch.status == 201 && batch.json["count"] == 2 && batch.json["deduplicated"] == 2, "\(batch.json)")
                #expect(
                    batch.json["tasks"]?.arrayValue?.map(Self.entryName) == ["b1", "b1*", "b3", "w3*"],
                    "\(batch.json)")

                // A template's unique key may hold a placeholder: one task per filled-in key.
                let put = try await api.call(
                    "PUT", "/v1/templates/report", key: k,
                    body:
                        #"{"task": {"executor": "noop", "schedule": "manual", "unique": {"key": "report:{{region}}"}}, "parameters": ["region"]}"#
                )
                #expect(put.status == 200, "\(put.json)")
                func fromTemplate(_ name: String, _ region: String) async throws -> Int {
                    try await api.call(
                        "POST", "/v1/templates/report/tasks", key: k,
                        body: #"{"name": "\#(name)", "values": {"region": "\#(region)"}}"#
                    ).status
                }
                #expect(try await fromTemplate("report-eu", "eu") == 201)
                #expect(try await fromTemplate("report-eu-again", "eu") == 200)
                #expect(try await fromTemplate("report-us", "us") == 201)

                // Another namespace has keys of its own.
                let other = try await APITests.key(sys, role: .submitter, namespace: "elsewhere")
                let there = try await api.call(
                    "POST", "/v1/tasks", key: other,
                    body: #"{"name": "i", "executor": "noop", "after": "1h", "unique": {"key": "digest"}}"#)
                #expect(there.status == 201, "\(there.json)")

                for (unique, field) in [
                    (#""x""#, "unique"), (#"{"key": ""}"#, "unique.key"), (#"{"scope": "window"}"#, "unique"),
                    (#"{"key": "a", "scope": "window"}"#, "unique.window"),
                    (#"{"key": "a", "window": "forever"}"#, "unique.window"),
                    (#"{"key": "a", "window": 1e300}"#, "unique.window"),
                    (#"{"key": "a", "scope": "active", "window": "1h"}"#, "unique.window"),
                    (#"{"key": "a", "scope": "always"}"#, "unique.scope"),
                    (#"{"key": "a", "lock": true}"#, "unique"),
                ] {
                    let (s, r) = try await submit("bad", unique)
                    #expect(s == 400 && r["field"]?.stringValue == field, "\(unique): \(s) \(r)")
                }
                let patch = try await api.call(
                    "PATCH", "/v1/tasks/w1", key: k, body: #"{"unique": {"key": "other"}}"#)
                #expect(patch.status == 400 && patch.json["field"] == "unique", "\(patch.json)")
                #expect(
                    try await api.call("PATCH", "/v1/tasks/w1", key: k, body: #"{"timeout": 60}"#).status == 200,
                    "a patch that leaves unique alone")
            }
        }
    }
}

extension UniqueTaskTests {
    /// A batch entry as its name, with `*` when it was deduplicated.
    static func entryName(_ entry: JSONValue) -> String {
        (entry["name"]?.stringValue ?? "?") + (entry["deduplicated"] == true ? "*" : "")
    }
}
