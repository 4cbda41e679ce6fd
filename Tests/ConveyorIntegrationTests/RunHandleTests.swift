import ConveyorAPI
import ConveyorCore
import ConveyorStore
import ConveyorWorker
import Foundation
import Testing

/// Issue 23 item 3: run handles. Creating or triggering a task returns the id its next run will
/// have; `GET /v1/runs/{id}` answers `pending` until a dispatcher makes the run, and `?wait=`
/// answers when it is final. `conveyorctl run wait` and `run logs --follow` use it.
@Suite("Run handles (real PostgreSQL and RabbitMQ)", .serialized)
struct RunHandleTests {
    @Test func triggerReturnsTheRunItMakesAndWaitAnswersWhenItEnds() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .submitter, namespace: "default")
                let created = try await api.call(
                    "POST", "/v1/tasks", key: k,
                    body:
                        #"{"name": "echo", "executor": "shell", "queue": "\#(sys.queue)", "schedule": "manual", "parameters": {"argv": ["/bin/echo", "handled"]}}"#
                )
                #expect(created.status == 201)
                #expect(created.json["next_run_id"] == nil, "a manual task has no next run: \(created.json)")
                let once = try await api.call(
                    "POST", "/v1/tasks", key: k,
                    body: #"{"name": "later", "executor": "noop", "queue": "\#(sys.queue)", "after": "1h"}"#)
                let onceHandle = try #require(once.json["next_run_id"]?.stringValue, "\(once.json)")

                let first = try await api.call("POST", "/v1/tasks/echo/trigger", key: k)
                #expect(first.status == 202)
                let handle = try #require(first.json["run_id"]?.stringValue, "\(first.json)")
                let again = try await api.call("POST", "/v1/tasks/echo/trigger", key: k)
                #expect(again.json["run_id"]?.stringValue == handle, "a second trigger before the scan: the same run")

                // No dispatcher yet: the handle is pending, at once or after a short wait.
                let pending = try await api.call("GET", "/v1/runs/\(handle)?wait=300ms", key: k)
                #expect(pending.status == 200 && pending.json["state"] == "pending", "\(pending.json)")
                #expect(pending.json["task"] == "echo")
                #expect(try await api.call("GET", "/v1/runs/\(onceHandle)", key: k).json["state"] == "pending")
                let other = try await APITests.key(sys, role: .viewer, namespace: "elsewhere")
                #expect(try await api.call("GET", "/v1/runs/\(handle)", key: other).status == 404)
                #expect(try await api.call("GET", "/v1/runs/\(UUID())?wait=1s", key: k).status == 404)
                for bad in ["soon", "61s", "-1", "2h"] {
                    let r = try await api.call("GET", "/v1/runs/\(handle)?wait=\(bad)", key: k)
                    #expect(r.status == 400 && r.json["field"] == "wait", "\(bad): \(r.json)")
                }

                var env = sys.workerEnvironment(id: "handle-worker", executors: "shell")
                env["CONVEYOR_EXECUTORS_SHELL_ALLOWED_COMMANDS"] = "/bin/echo"
                let worker = try spawnConveyor(["worker"], env: env)
                defer { if worker.isRunning { worker.terminate() } }
                try await withServices([sys.dispatcher()]) {
                    let done = try await api.call("GET", "/v1/runs/\(handle)?wait=30s", key: k)
                    #expect(done.json["state"] == "succeeded", "\(done.json)")
                    #expect(done.json["id"]?.stringValue == handle)
                    #expect(done.json["output"]?.stringValue?.contains("handled") == true)

                    // The CLI: wait (exit 0 on success), logs --follow, trigger printing the handle.
                    let ctlEnv = ["CONVEYOR_URL": api.base, "CONVEYOR_API_KEY": k]
                    let waited = try CtlTests.ctl(["run", "wait", handle, "--timeout", "30"], env: ctlEnv)
                    #expect(
                        waited.status == 0 && waited.out == "run \(handle) succeeded\n", "\(waited.out)\(waited.err)")
                    let triggered = try CtlTests.ctl(["task", "trigger", "echo"], env: ctlEnv)
                    let id = try #require(
                        triggered.out.split(separator: " ").dropFirst(3).first.map(String.init), "\(triggered.out)")
                    let logs = try CtlTests.ctl(["run", "logs", id, "--follow", "--timeout", "30"], env: ctlEnv)
                    #expect(logs.status == 0 && logs.out.contains("handled"), "\(logs.out)\(logs.err)")
                }
                #expect(
                    try await sys.count("SELECT count(*) FROM runs WHERE id = $1", [UUID(uuidString: handle)!]) == 1,
                    "the run the dispatcher made has the handle's id")
            }
        }
    }

    /// `Idempotency-Key` on `POST /v1/tasks` and trigger: a retry gets the first answer and
    /// creates nothing, concurrent retries included; another body under the same key is refused;
    /// after 24 hours the key is forgotten. Without it the retry's create answers 409 and a
    /// retried trigger makes a second run.
    @Test func idempotencyKeysReplayTheFirstAnswerAndCreateNothing() async throws {
        try await System.with { sys in
            var generous = APIOptions()
            generous.perAddress = .init(rate: 100, burst: 1000)
            try await APITests.withAPI(sys, options: generous) { api, _ in
                let k = try await APITests.key(sys, role: .submitter, namespace: "default")
                let body = #"{"name": "pay", "executor": "noop", "queue": "\#(sys.queue)", "schedule": "manual"}"#
                let first = try await api.call(
                    "POST", "/v1/tasks", key: k, body: body, headers: [("Idempotency-Key", "create-pay-1")])
                #expect(first.status == 201)
                let retry = try await api.call(
                    "POST", "/v1/tasks", key: k, body: body, headers: [("Idempotency-Key", "create-pay-1")])
                #expect(retry.status == 201 && retry.json == first.json, "\(retry.json)")
                #expect(retry.headers.contains { $0.0.lowercased() == "idempotent-replayed" && $0.1 == "true" })
                let other = try await api.call(
                    "POST", "/v1/tasks", key: k, body: body.replacingOccurrences(of: "noop", with: "sleep"),
                    headers: [("Idempotency-Key", "create-pay-1")])
                #expect(other.status == 422 && other.json["field"] == "Idempotency-Key", "\(other.json)")
                for bad in [String(repeating: "k", count: 256), "with space"] {
                    let r = try await api.call(
                        "POST", "/v1/tasks", key: k, body: body, headers: [("Idempotency-Key", bad)])
                    #expect(r.status == 400 && r.json["field"] == "Idempotency-Key", "\(r.json)")
                }

                // Eight retries at once of a batch: one batch made, the others replay it or wait.
                let batch = #"[{"name": "b1", "executor": "noop", "schedule": "manual"}]"#
                let statuses = try await withThrowingTaskGroup(of: (Int, String?).self) { group in
                    for _ in 0..<8 {
                        group.addTask {
                            let r = try await api.call(
                                "POST", "/v1/tasks", key: k, body: batch, headers: [("Idempotency-Key", "batch-1")])
                            return (r.status, r.json["batch_id"]?.stringValue)
                        }
                    }
                    var out: [(Int, String?)] = []
                    for try await s in group { out.append(s) }
                    return out
                }
                #expect(statuses.allSatisfy { [201, 409].contains($0.0) }, "\(statuses)")
                #expect(Set(statuses.filter { $0.0 == 201 }.map(\.1)).count == 1, "\(statuses)")
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE name = 'b1'") == 1)

                // A retried trigger after the dispatcher made the run: the same run, not a second one.
                let t1 = try await api.call(
                    "POST", "/v1/tasks/pay/trigger", key: k, headers: [("Idempotency-Key", "\"trigger-1\"")])
                _ = try await sys.store.claimDue(
                    ClaimRequest(
                        group: 0, groups: 1, limit: 10, lease: .seconds(60), misfireGrace: .seconds(60),
                        newTraceParent: { _ in "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" }))
                let t2 = try await api.call(
                    "POST", "/v1/tasks/pay/trigger", key: k, headers: [("Idempotency-Key", "\"trigger-1\"")])
                #expect(t1.status == 202 && t2.json["run_id"] == t1.json["run_id"], "\(t1.json) \(t2.json)")
                #expect(try await sys.count("SELECT count(*) FROM runs") == 1)
                // Forgotten after 24 hours: the same key triggers anew.
                _ = try await sys.rows(
                    "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' RETURNING key")
                let t3 = try await api.call(
                    "POST", "/v1/tasks/pay/trigger", key: k, headers: [("Idempotency-Key", "\"trigger-1\"")])
                #expect(t3.status == 202 && t3.json["run_id"] != t1.json["run_id"], "\(t3.json)")
            }
        }
    }
    /// `run wait` tells a run that ended badly (2) and a wait that ran out (3) apart from success.
    @Test func runWaitExitStatusSaysHowTheRunEnded() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .submitter, namespace: "default")
                _ = try await api.call(
                    "POST", "/v1/tasks", key: k,
                    body: #"{"name": "held", "executor": "noop", "queue": "\#(sys.queue)", "schedule": "manual"}"#)
                let handle = try #require(
                    try await api.call("POST", "/v1/tasks/held/trigger", key: k).json["run_id"]?.stringValue)
                let ctlEnv = ["CONVEYOR_URL": api.base, "CONVEYOR_API_KEY": k]
                let timedOut = try CtlTests.ctl(["run", "wait", handle, "--timeout", "1"], env: ctlEnv)
                #expect(timedOut.status == 3 && timedOut.out == "run \(handle) pending\n", "\(timedOut.out)")
                // Made and failed by hand (no worker): the wait says so with 2.
                _ = try await sys.store.claimDue(
                    ClaimRequest(
                        group: 0, groups: 1, limit: 10, lease: .seconds(60), misfireGrace: .seconds(60),
                        newTraceParent: { _ in "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" }))
                _ = try await sys.rows(
                    "UPDATE runs SET state = 'failed', finished_at = now() WHERE id = '\(handle)' RETURNING id")
                let failed = try CtlTests.ctl(["run", "wait", handle, "--timeout", "10"], env: ctlEnv)
                #expect(failed.status == 2 && failed.out == "run \(handle) failed\n", "\(failed.out)\(failed.err)")
            }
        }
    }
}
