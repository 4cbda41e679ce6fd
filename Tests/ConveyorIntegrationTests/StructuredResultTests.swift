import ConveyorAPI
import ConveyorConfig
import ConveyorCore
import ConveyorHTTP
import ConveyorStore
import Foundation
import Testing

@testable import ConveyorWorker

/// Returns what its parameters ask: `result` as the run's result, `big` a 40 KB one, `nul` one
/// holding NUL.
struct ResultExecutor: Executor {
    func execute(_ context: ExecutionContext) async -> ExecutionResult {
        if context.parameters["big"] == true {
            return ExecutionResult(
                outcome: .succeeded, result: ["blob": .string(String(repeating: "y", count: 40_000))])
        }
        if context.parameters["nul"] == true { return ExecutionResult(outcome: .succeeded, result: ["k": "a\u{0}b"]) }
        return ExecutionResult(outcome: .succeeded, result: context.parameters["result"])
    }
}

/// Structured results from the executors to the API: the http executor's JSON responses, and
/// any executor's `ExecutionResult.result`, carried on the status, stored with the run, shown by
/// the API and conveyorctl.
@Suite("Structured results (real PostgreSQL and RabbitMQ)", .serialized)
struct StructuredResultTests {
    @Test func aJSONResponseIsTheHTTPExecutorsResult() async throws {
        let server = try await HTTPReceiver(host: "127.0.0.2") { request, _ in
            switch request.path {
            case "/json":
                .init(status: 200, headers: [("Content-Type", "application/json; charset=utf-8")], body: #"{"id": 7}"#)
            case "/problem": .init(status: 200, headers: [("Content-Type", "application/problem+json")], body: "[1, 2]")
            case "/long":
                .init(
                    status: 200, headers: [("Content-Type", "application/json")],
                    body: String(repeating: "[", count: 500))
            default: .init(status: 200, headers: [("Content-Type", "text/plain")], body: #"{"id": 7}"#)
            }
        }
        defer { Task { await server.close() } }
        var policy = OutboundPolicy()
        policy.allowedNetworks = [try Network(parsing: "127.0.0.2")]
        policy.maxResponseBytes = 100
        let http = HTTPExecutor(policy: policy)
        func call(_ path: String, _ extra: [String: JSONValue] = [:]) async -> ExecutionResult {
            var p: [String: JSONValue] = ["url": .string(server.url + path)]
            p.merge(extra) { a, _ in a }
            return await http.execute(
                ExecutionContext(
                    runID: UUID(), taskName: "t", attempt: 1, parameters: .object(p), timeout: .seconds(5),
                    traceparent: nil, tracestate: nil, idempotencyKey: "k"))
        }
        #expect(await call("/json").result == ["id": 7])
        #expect(await call("/problem").result == [1, 2], "any +json media type")
        #expect(await call("/text").result == nil, "text is output, not a result")
        #expect(await call("/json", ["result": "none"]).result == nil)
        let cut = await call("/long")
        #expect(cut.outcome == .succeeded && cut.result?["conveyor_truncated"] == true, "\(cut)")
    }

    @Test func aResultTravelsToTheRunAndIsShownByTheAPIAndConveyorctl() async throws {
        try await System.with { sys in
            let worker = sys.worker(["produce": ResultExecutor()])
            try await withServices([sys.dispatcher(), worker]) {
                var tasks: [NewTask] = []
                for (name, params) in [
                    ("plain", JSONValue.object(["result": ["rows": 3, "names": ["a", "b"]]])),
                    ("big", ["big": true]), ("nul", ["nul": true]), ("none", [:]),
                ] {
                    var t = NewTask(name: name, executor: "produce", schedule: .once)
                    t.queue = sys.queue
                    t.parameters = params
                    tasks.append(t)
                }
                try await sys.store.createTasks(tasks)
                _ = try await sys.eventually(timeout: .seconds(30), "the four runs succeed") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 4
                }
            }
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .viewer, namespace: "default")
                func run(_ task: String) async throws -> JSONValue {
                    let r = try await api.call("GET", "/v1/runs?task=\(task)", key: k)
                    return try #require(r.json["runs"]?.arrayValue?.first, "\(r.json)")
                }
                #expect(try await run("plain")["result"] == ["rows": 3, "names": ["a", "b"]])
                let big = try await run("big")["result"]
                #expect(big?["conveyor_truncated"] == true && big?["limit"] == 32768, "\(String(describing: big))")
                #expect(try await run("nul")["result"] == ["k": "a\u{FFFD}b"])
                #expect(try await run("none")["result"] == nil)
                let id = try #require(try await run("plain")["id"]?.stringValue)
                let ctl = try CtlTests.ctl(
                    ["run", "get", id], env: ["CONVEYOR_URL": api.base, "CONVEYOR_API_KEY": k])
                #expect(ctl.out.contains(#"result        {"names":["a","b"],"rows":3}"#), "\(ctl.out)\(ctl.err)")
            }
        }
    }

    /// A dependent gets its upstreams' results: as `CONVEYOR_INPUTS` in a shell command (which
    /// here prints them as its own result), and as `inputs` in an http task's JSON body.
    @Test func dependentsReceiveTheirUpstreamsResults() async throws {
        let receiver = try await HTTPReceiver(host: "127.0.0.2")
        defer { Task { await receiver.close() } }
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sh-\(UUID()).yaml").path
        try "type: shell\nallowed_commands: [/usr/bin/printenv]\n".write(
            toFile: path, atomically: true, encoding: .utf8)
        let shell = try ShellExecutor(settings: try await Settings.load(file: path, environment: [:]))
        var policy = OutboundPolicy()
        policy.allowedNetworks = [try Network(parsing: "127.0.0.2")]
        try await System.with { sys in
            let worker = sys.worker(["produce": ResultExecutor(), "sh": shell, "http": HTTPExecutor(policy: policy)])
            try await withServices([sys.dispatcher(), worker]) {
                // extract → count → load → notify, and extract → load: one root, one workflow run.
                func task(_ name: String, _ executor: String, _ params: JSONValue, after: [String]) -> NewTask {
                    var t = NewTask(name: name, executor: executor, schedule: after.isEmpty ? .once : .manual)
                    t.queue = sys.queue
                    t.parameters = params
                    t.dependsOn = after
                    return t
                }
                try await sys.store.createTasks([
                    task("extract", "produce", ["result": ["rows": 3]], after: []),
                    task("count", "produce", ["result": ["n": 7]], after: ["extract"]),
                    task(
                        "load", "sh", ["argv": ["/usr/bin/printenv", "CONVEYOR_INPUTS"], "result": "last_line"],
                        after: ["extract", "count"]),
                    task(
                        "notify", "http",
                        ["url": .string(receiver.url + "/done"), "method": "POST", "body": ["event": "loaded"]],
                        after: ["load"]),
                ])
                _ = try await sys.eventually(timeout: .seconds(30), "the four runs succeed") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 4
                }
            }
            let load = try #require(
                try await sys.rows(
                    "SELECT r.result::text FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'load'"
                ).first?[0])
            #expect(
                try JSONDecoder().decode(JSONValue.self, from: Data(load.utf8))
                    == ["extract": ["rows": 3], "count": ["n": 7]], "\(load)")
            let posted = try #require(receiver.received(path: "/done").first)
            #expect(
                try JSONDecoder().decode(JSONValue.self, from: Data(posted.body.utf8))
                    == ["event": "loaded", "inputs": ["load": ["extract": ["rows": 3], "count": ["n": 7]]]],
                "\(posted.body)")
        }
    }
}
