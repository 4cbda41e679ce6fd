import ConveyorAMQP
import ConveyorAPI
import ConveyorCore
import ConveyorHTTP
import ConveyorStore
import ConveyorTelemetry
import Foundation
import Synchronization
import Testing

/// One span as an OTLP/JSON export carries it.
struct ExportedSpan: CustomStringConvertible {
    var service: String
    var traceID: String
    var spanID: String
    var parentID: String
    var name: String
    /// OTLP's SpanKind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    var kind: Int
    var attributes: [String: String]
    /// Links to other spans' contexts, with the link's attributes.
    var links: [(traceID: String, spanID: String, attributes: [String: String])] = []

    var description: String {
        "\(service) \(name) kind=\(kind) \(spanID)←\(parentID.isEmpty ? "root" : parentID) \(attributes)"
            + (links.isEmpty ? "" : " links: \(links.map(\.spanID))")
    }

    /// The dispatcher's record spans (one per status batch) that link to `span` with these link attributes.
    static func records(linking span: ExportedSpan, in all: [ExportedSpan]) -> [[String: String]] {
        all.filter {
            $0.service == "conveyor-dispatcher" && $0.name.hasPrefix("record ") && $0.kind == 5 && $0.parentID.isEmpty
        }
        .flatMap { $0.links.filter { $0.traceID == span.traceID && $0.spanID == span.spanID }.map(\.attributes) }
    }

    /// Ids are hex in the OTLP/JSON spec, base64 from protobuf's JSON mapping: either is read.
    static func hex(_ s: String) -> String {
        if s.count % 2 == 0, s.allSatisfy(\.isHexDigit) { return s.lowercased() }
        return Data(base64Encoded: s).map { $0.map { String(format: "%02x", $0) }.joined() } ?? s
    }

    static func parse(_ body: String) -> [ExportedSpan] {
        guard let root = try? JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any] else { return [] }
        func attributes(_ list: Any?) -> [String: String] {
            var out: [String: String] = [:]
            for a in list as? [[String: Any]] ?? [] {
                guard let key = a["key"] as? String, let value = (a["value"] as? [String: Any])?.values.first else {
                    continue
                }
                out[key] = "\(value)"
            }
            return out
        }
        var spans: [ExportedSpan] = []
        for rs in root["resourceSpans"] as? [[String: Any]] ?? [] {
            let service = attributes((rs["resource"] as? [String: Any])?["attributes"])["service.name"] ?? ""
            for ss in rs["scopeSpans"] as? [[String: Any]] ?? [] {
                for s in ss["spans"] as? [[String: Any]] ?? [] {
                    spans.append(
                        ExportedSpan(
                            service: service, traceID: hex(s["traceId"] as? String ?? ""),
                            spanID: hex(s["spanId"] as? String ?? ""),
                            parentID: hex(s["parentSpanId"] as? String ?? ""), name: s["name"] as? String ?? "",
                            kind: s["kind"] as? Int ?? 0, attributes: attributes(s["attributes"]),
                            links: (s["links"] as? [[String: Any]] ?? []).map {
                                (
                                    hex($0["traceId"] as? String ?? ""), hex($0["spanId"] as? String ?? ""),
                                    attributes($0["attributes"])
                                )
                            }))
                }
            }
        }
        return spans
    }
}

/// Spans exported by real API, dispatcher and worker processes to the test's own OTLP/HTTP
/// receiver, checked as one tree per run.
@Suite("OpenTelemetry traces across real processes (real PostgreSQL and RabbitMQ)")
struct TracingTests {
    static func call(_ method: String, _ url: String, headers: [(String, String)] = [], body: String = "") async throws
        -> (status: Int, body: String)
    {
        var policy = OutboundPolicy()
        policy.allowedNetworks = [try Network(parsing: "127.0.0.1")]
        let r = try await OutboundHTTP(policy: policy, logger: Servers.logger)
            .send(
                OutboundRequest(method: method, url: url, headers: headers, body: Array(body.utf8)),
                timeout: .seconds(5))
        return (r.status, String(decoding: r.body, as: UTF8.self))
    }

    @Test func oneTracePerRunFromTheAPIRequestThroughARetryToTheCalledService() async throws {
        try await System.with { sys in
            let collector = try await HTTPReceiver { _, _ in
                .init(status: 200, headers: [("content-type", "application/json")], body: "{}")
            }
            // The service the http executor calls: 500 the first time (the run retries), then 200.
            let service = try await HTTPReceiver(host: "127.0.0.3") { _, n in .init(status: n == 0 ? 500 : 200) }
            defer {
                Task {
                    await collector.close()
                    await service.close()
                }
            }
            let fleet = try await TracedFleet.start(
                sys, collector: collector.url, protocol: "http/json", workerID: "trace-worker", executors: "http,shell",
                worker: [
                    "CONVEYOR_EXECUTORS_HTTP_ALLOWED_NETWORKS": "127.0.0.3/32",
                    "CONVEYOR_EXECUTORS_SHELL_ALLOWED_COMMANDS": "/usr/bin/printenv",
                ],
                dispatcher: ["CONVEYOR_CALLBACKS_ALLOWED_NETWORKS": "127.0.0.3/32"])
            defer { fleet.stop() }
            let (key, base) = (fleet.key, fleet.base)

            // The caller's own span: the API request continues it.
            let clientTrace = (0..<4).map { _ in String(format: "%08x", UInt32.random(in: 1...UInt32.max)) }.joined()
            let clientSpan = String(
                format: "%08x%08x", UInt32.random(in: 1...UInt32.max), UInt32.random(in: 1...UInt32.max))
            let body = """
                {"name": "traced", "executor": "http", "queue": "\(sys.queue)", "timeout": 10,
                 "parameters": {"url": "\(service.url)/hook", "method": "POST"},
                 "callback_url": "\(service.url)/callback",
                 "retry": {"max_attempts": 2, "base_seconds": 0.1, "jitter": false}}
                """
            let created = try await Self.call(
                "POST", base + "/v1/tasks",
                headers: [
                    ("Authorization", "Bearer \(key)"), ("Content-Type", "application/json"),
                    ("traceparent", "00-\(clientTrace)-\(clientSpan)-01"),
                    ("baggage", "tenant=acme"),
                ], body: body)
            #expect(created.status == 201, "\(created.body)")
            // A task the scheduler fires with no request behind it: a new root; its program sees TRACEPARENT.
            var shell = NewTask(name: "printenv", executor: "shell", schedule: .once)
            shell.queue = sys.queue
            shell.parameters = ["argv": ["/usr/bin/printenv", "TRACEPARENT"]]
            try await sys.store.createTasks([shell])

            _ = try await sys.eventually(
                timeout: .seconds(60), "both tasks succeed, the http one on its second attempt"
            ) {
                try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 2
            }
            let runs = try await sys.rows(
                """
                SELECT t.name, r.id::text, r.attempt::text, r.trace_id, coalesce(r.output, '') FROM runs r JOIN tasks t
                    ON t.id = r.task_id ORDER BY t.name, r.attempt
                """)
            let traced = runs.filter { $0[0] == "traced" }
            #expect(
                traced.count == 2 && traced.allSatisfy { $0[3] == clientTrace },
                "every attempt is in the caller's trace: \(runs)")
            let printenv = try #require(runs.first { $0[0] == "printenv" })
            let rootTrace = try #require(printenv[3])
            #expect(rootTrace != clientTrace && rootTrace.count == 32)
            #expect(
                printenv[4]?.hasPrefix("00-\(rootTrace)-") == true,
                "the program got its span's TRACEPARENT: \(printenv[4] ?? "")")

            // Every hop's span reaches the receiver (batches every 100 ms).
            func spans() -> [ExportedSpan] {
                collector.received(path: "/v1/traces").flatMap { ExportedSpan.parse($0.body) }
            }
            _ = try await sys.eventually(timeout: .seconds(30), "the spans of both attempts are exported") {
                let s = spans().filter { $0.traceID == clientTrace }
                let executes = s.filter { $0.name == "execute http" }
                return executes.count == 2
                    && executes.allSatisfy { !ExportedSpan.records(linking: $0, in: spans()).isEmpty }
                    && s.filter { $0.kind == 3 && $0.service == "conveyor-worker" }.count == 2
            }
            let all = spans().filter { $0.traceID == clientTrace }
            let tree = all.map(\.description).joined(separator: "\n")
            let byID = Dictionary(all.map { ($0.spanID, $0) }, uniquingKeysWith: { a, _ in a })
            func children(of parent: ExportedSpan?, _ name: (String) -> Bool) -> [ExportedSpan] {
                all.filter { $0.parentID == (parent?.spanID ?? "") && name($0.name) }
            }

            // API: the server span continues the caller's span.
            let server = try #require(all.first { $0.kind == 2 && $0.service == "conveyor-api" }, "\(tree)")
            #expect(server.parentID == clientSpan)
            // Dispatcher: one dispatch span, a child of the request, that published attempt 1;
            // attempt 2 (the retry) is a publish span under it. Both are producers with messaging attributes.
            let dispatch = children(of: server, { $0 == "dispatch" })
            #expect(dispatch.count == 1 && dispatch.first?.service == "conveyor-dispatcher", "\(tree)")
            let publishes = dispatch + children(of: dispatch.first, { $0 == "publish \(sys.queue)" })
            #expect(
                publishes.count == 2
                    && publishes.allSatisfy { $0.kind == 4 && $0.attributes["messaging.system"] == "rabbitmq" },
                "\(tree)")
            #expect(publishes.map { $0.attributes["conveyor.attempt"] } == ["1", "2"], "\(tree)")
            // Worker: an execute span under each producer span, with the run's attributes.
            for publish in publishes {
                let execute = children(of: publish, { $0 == "execute http" })
                #expect(execute.count == 1, "\(tree)")
                guard let e = execute.first else { continue }
                #expect(e.service == "conveyor-worker" && e.kind == 5)
                #expect(e.attributes["conveyor.run.id"] == publish.attributes["conveyor.run.id"])
                #expect(e.attributes["conveyor.attempt"] == publish.attributes["conveyor.attempt"])
                #expect(
                    e.attributes["conveyor.task.name"] == "traced" && e.attributes["conveyor.executor"] == "http"
                        && e.attributes["conveyor.queue"] == sys.queue)
                // The executor's client span, whose context the called service received.
                let client = children(of: e, { $0 == "POST" })
                #expect(client.count == 1 && client.first?.kind == 3, "\(tree)")
                // The dispatcher recorded the run's status in a batch: its record span links to the execute span.
                let links = ExportedSpan.records(linking: e, in: spans())
                #expect(
                    links.contains {
                        $0["conveyor.run.id"] == e.attributes["conveyor.run.id"]
                            && $0["conveyor.outcome"] == e.attributes["conveyor.outcome"]
                    },
                    "\(links)\n\(tree)")
                #expect(children(of: e, { $0.hasPrefix("record") }).isEmpty, "no span per status\n\(tree)")
            }
            // The run's callback (its final outcome): one traceparent, from the dispatcher's client
            // span under the run's dispatch span, with the run's baggage.
            _ = try await sys.eventually(timeout: .seconds(30), "the callback is delivered and its span exported") {
                let callback =
                    service.received(path: "/callback").first?.headers["traceparent"]?.split(separator: "-").map(
                        String.init) ?? []
                return callback.count == 4 && spans().contains { $0.spanID == callback[2] }
            }
            let callback = try #require(service.received(path: "/callback").first)
            #expect(callback.repeatedHeaders.isEmpty, "a header sent twice: \(callback.fields)")
            #expect(callback.headers["baggage"] == "tenant=acme", "\(callback.fields)")
            let callbackParent = callback.headers["traceparent"]?.split(separator: "-").map(String.init) ?? []
            let callbackSpan = callbackParent.count == 4 ? spans().first { $0.spanID == callbackParent[2] } : nil
            #expect(
                callbackParent.count == 4 && callbackParent[1] == clientTrace
                    && callbackSpan?.service == "conveyor-dispatcher" && callbackSpan?.kind == 3
                    && callbackSpan?.parentID == dispatch.first?.spanID, "\(callback.fields)\n\(tree)")

            let calls = service.received(path: "/hook")
            #expect(calls.count == 2)
            for call in calls {
                #expect(call.repeatedHeaders.isEmpty, "a header sent twice: \(call.fields)")
                let tp = try #require(call.headers["traceparent"]).split(separator: "-").map(String.init)
                #expect(tp[1] == clientTrace, "the called service continues the run's trace")
                #expect(byID[tp[2]]?.name == "POST", "its parent is the executor's client span: \(tp)")
                #expect(
                    call.headers["baggage"] == "tenant=acme",
                    "baggage travels from the API request to the called service")
            }
            // Nothing of this trace is orphaned: every parent is in the trace, but the caller's own span.
            for span in all where span.parentID != clientSpan {
                #expect(byID[span.parentID] != nil, "\(span) has a parent that was not exported\n\(tree)")
            }

            // Trace headers a caller got wrong: never a refused request; counted; a malformed or
            // repeated traceparent starts a fresh trace, an oversized tracestate is dropped (the
            // trace goes on, as W3C Trace Context says), an oversized baggage is dropped.
            let kept = "00-\(clientTrace)-\(clientSpan)-01"
            let bad: [(name: String, headers: [(String, String)])] = [
                ("bad-parent", [("traceparent", "00-\(clientTrace)-zz-01")]),
                (
                    "two-parents",
                    [
                        ("traceparent", kept),
                        ("traceparent", "00-\(String(repeating: "ab", count: 16))-\(clientSpan)-01"),
                    ]
                ),
                (
                    "big-state",
                    [("traceparent", kept), ("tracestate", (0..<40).map { "k\($0)=v" }.joined(separator: ","))]
                ),
                (
                    "big-baggage",
                    [
                        (
                            "baggage",
                            (0..<100).map { "k\($0)=\(String(repeating: "v", count: 90))" }.joined(separator: ",")
                        )
                    ]
                ),
                // Not W3C tracestate (no key=value): swift-otel would drop the whole context for it.
                ("bad-state", [("traceparent", kept), ("tracestate", "Foo")]),
                // One list in two header lines is allowed (W3C, RFC 9110): kept, not counted.
                ("split-state", [("traceparent", kept), ("tracestate", "a=1"), ("tracestate", "b=2")]),
                ("split-baggage", [("baggage", "a=1"), ("baggage", "b=2")]),
            ]
            for (name, headers) in bad {
                let r = try await Self.call(
                    "POST", base + "/v1/tasks",
                    headers: [("Authorization", "Bearer \(key)"), ("Content-Type", "application/json")] + headers,
                    body: """
                        {"name": "\(name)", "executor": "shell", "queue": "parked", "schedule": "every 1h",
                         "parameters": {"argv": ["/bin/true"]}}
                        """
                )
                #expect(r.status == 201, "\(name): \(r.body)")
            }
            let stored = Dictionary(
                // A dispatcher may already have made the task's occurrence, which takes the stored context over.
                try await sys.rows(
                    """
                    SELECT t.name, coalesce(t.trace_parent, r.traceparent, ''), coalesce(t.trace_baggage, r.baggage, '')
                    FROM tasks t LEFT JOIN runs r ON r.task_id = t.id
                    """
                ).map { ($0[0] ?? "", $0) },
                uniquingKeysWith: { a, _ in a })
            for name in ["bad-parent", "two-parents"] {
                let tp = try #require(stored[name], "task \(name) was not created")[1] ?? ""
                // No parent kept: the task's occurrence will be a root (or a child of the request's own fresh span).
                #expect(
                    (tp.isEmpty || Traceparent.traceID(tp) != nil) && !tp.contains(clientTrace)
                        && !tp.contains("abababab"),
                    "\(name) starts a fresh trace: \(tp)")
            }
            for name in ["big-state", "bad-state", "split-state"] {
                #expect(
                    stored[name]?[1]?.contains(clientTrace) == true, "\(name): the trace goes on: \(stored[name] ?? [])"
                )
            }
            #expect(stored["big-baggage"]?[2] == "", "the oversized baggage is not stored")
            #expect(stored["split-baggage"]?[2] == "a=1, b=2", "baggage in two lines is one list")
            let metrics = try await Self.call("GET", base + "/metrics", headers: [("Authorization", "Bearer \(key)")])
            for (header, n) in [("traceparent", 2), ("tracestate", 2), ("baggage", 1)] {
                #expect(
                    metrics.body.contains(#"conveyor_trace_context_refused_total{header="\#(header)"} \#(n)"#),
                    "\(header) counted \(n)")
            }

            // No span of Conveyor's starts a trace of its own but a scheduled task's dispatch and
            // an API request that came without a traceparent.
            let roots = spans().filter {
                $0.parentID.isEmpty && $0.name != "dispatch" && !$0.name.hasPrefix("record ")
                    && !($0.service == "conveyor-api" && $0.kind == 2)
            }
            #expect(roots.isEmpty, "orphan spans: \(roots)")

            // The scheduled task: a root dispatch span, then execute → exec.
            let rootSpans = spans().filter { $0.traceID == rootTrace }
            let rootDispatch = rootSpans.first { $0.name == "dispatch" }
            #expect(rootDispatch?.parentID == "", "\(rootSpans)")
            #expect(
                rootSpans.contains { $0.name == "exec printenv" && printenv[4]?.contains($0.spanID) == true },
                "\(rootSpans)")
        }
    }
}

/// The test's OTLP/HTTP collector: a real HTTP server that keeps every export, reading JSON
/// bodies itself and protobuf ones through the OpenTelemetry Python SDK's own message types
/// (`scripts/otel_peer.py decode`), as a collector would.
final class OTLPCollector: Sendable {
    let receiver: HTTPReceiver
    private let decoded = Mutex<(count: Int, spans: [ExportedSpan])>((0, []))

    init() async throws {
        receiver = try await HTTPReceiver { request, _ in
            request.headers["content-type"] == "application/x-protobuf"
                ? .init(status: 200, headers: [("content-type", "application/x-protobuf")], body: "")
                : .init(status: 200, headers: [("content-type", "application/json")], body: "{}")
        }
    }

    var url: String { receiver.url }

    /// Every span received so far.
    func spans() async throws -> [ExportedSpan] {
        let (done, _) = decoded.withLock { $0 }
        let fresh = Array(receiver.received(path: "/v1/traces").dropFirst(done))
        guard !fresh.isEmpty else { return decoded.withLock { $0.spans } }
        var spans = fresh.filter { $0.headers["content-type"] != "application/x-protobuf" }.flatMap {
            ExportedSpan.parse($0.body)
        }
        let protobuf = fresh.filter { $0.headers["content-type"] == "application/x-protobuf" }
        if !protobuf.isEmpty {
            let file = FileManager.default.temporaryDirectory.appendingPathComponent("otlp-\(UUID()).b64").path
            defer { try? FileManager.default.removeItem(atPath: file) }
            try protobuf.map { Data($0.bytes).base64EncodedString() }.joined(separator: "\n").write(
                toFile: file, atomically: true, encoding: .utf8)
            let r = try await runRequired("python3", ["scripts/otel_peer.py", "decode", file])
            #expect(r.status == 0, "decode: \(r.err)")
            spans += r.out.split(separator: "\n").flatMap { ExportedSpan.parse(String($0)) }
        }
        return decoded.withLock {
            $0.count = done + fresh.count
            $0.spans += spans
            return $0.spans
        }
    }

    func close() async { await receiver.close() }
}

extension TracingTests {
    /// The run's trace as tracers nobody here wrote see it: a caller traced by the OpenTelemetry
    /// Python SDK creates the task through the API, and the http executor calls a service
    /// instrumented with that SDK's WSGI middleware. Every process exports OTLP/protobuf.
    @Test func thirdPartyTracersStartAndContinueTheRunsTrace() async throws {
        try await System.with { sys in
            let collector = try await OTLPCollector()
            let log = FileManager.default.temporaryDirectory.appendingPathComponent("otel-peer-\(UUID()).jsonl").path
            let service = try Process.required(
                "python3",
                [
                    "scripts/otel_peer.py", "service", "--host", "127.0.0.4", "--port", "0",
                    "--otlp", collector.url, "--log", log, "--fail-first", "1",
                ])
            service.standardOutput = FileHandle.nullDevice
            service.standardError =
                Servers.env["CONVEYOR_TEST_LOG"] == "1" ? FileHandle.standardError : FileHandle.nullDevice
            try service.run()
            defer {
                if service.isRunning { service.terminate() }
                Task { await collector.close() }
                try? FileManager.default.removeItem(atPath: log)
            }
            func entries() -> [[String: Any]] {
                ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").compactMap {
                    try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
                }
            }
            // The port the service bound (it chose a free one).
            _ = try await sys.eventually(timeout: .seconds(30), "the Python service is ready") {
                entries().contains { $0["ready"] != nil }
            }
            let servicePort = try #require(entries().compactMap { $0["ready"] as? Int }.first)
            let fleet = try await TracedFleet.start(
                sys, collector: collector.url, protocol: "http/protobuf", workerID: "sdk-worker", executors: "http",
                worker: ["CONVEYOR_EXECUTORS_HTTP_ALLOWED_NETWORKS": "127.0.0.4/32"])
            defer { fleet.stop() }
            let (key, base) = (fleet.key, fleet.base)

            // The caller: a span of the Python SDK, its traceparent and baggage on the POST.
            let body = """
                {"name": "sdk-traced", "executor": "http", "queue": "\(sys.queue)", "timeout": 10,
                 "parameters": {"url": "http://127.0.0.4:\(servicePort)/hook", "method": "POST"},
                 "retry": {"max_attempts": 2, "base_seconds": 0.1, "jitter": false}}
                """
            let r = try await runRequired(
                "python3",
                [
                    "scripts/otel_peer.py", "call", "--url", base + "/v1/tasks", "--header",
                    "Authorization: Bearer \(key)",
                    "--body", body, "--otlp", collector.url,
                ])
            let caller = try #require(
                try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any], "\(r.out) \(r.err)")
            #expect(caller["status"] as? Int == 201, "\(caller)")
            let callerTrace = try #require(caller["trace_id"] as? String)
            let callerSpan = try #require(caller["span_id"] as? String)

            _ = try await sys.eventually(timeout: .seconds(60), "the task succeeds on its second attempt") {
                try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 1
            }
            let runs = try await sys.rows(
                "SELECT r.id::text, r.attempt::text, r.trace_id FROM runs r ORDER BY r.attempt")
            #expect(
                runs.count == 2 && runs.allSatisfy { $0[2] == callerTrace },
                "every attempt is in the caller's trace: \(runs)")

            // The called service: one traceparent per request, continued by the SDK's middleware.
            let calls = entries().filter { $0["path"] as? String == "/hook" }
            #expect(calls.count == 2, "\(calls)")
            _ = try await sys.eventually(
                timeout: .seconds(30), "the spans of both attempts and the service's are exported"
            ) {
                let s = try await collector.spans().filter { $0.traceID == callerTrace }
                let executes = s.filter { $0.name == "execute http" }
                let everything = try await collector.spans()
                return s.filter { $0.service == "otel-peer-service" }.count == 2 && executes.count == 2
                    && executes.allSatisfy { !ExportedSpan.records(linking: $0, in: everything).isEmpty }
                    && s.contains { $0.service == "otel-peer-caller" }
            }
            let all = try await collector.spans()
            let trace = all.filter { $0.traceID == callerTrace }
            let tree = trace.map(\.description).joined(separator: "\n")
            let byID = Dictionary(trace.map { ($0.spanID, $0) }, uniquingKeysWith: { a, _ in a })
            for call in calls {
                let fields = call["headers"] as? [[String]] ?? []
                let names = fields.compactMap(\.first)
                #expect(Set(names).count == names.count, "a header sent twice: \(fields)")
                #expect(
                    call["trace_id"] as? String == callerTrace,
                    "the service's server span is in the run's trace: \(call)")
                let parent = byID[call["parent_span_id"] as? String ?? ""]
                #expect(
                    parent?.service == "conveyor-worker" && parent?.kind == 3,
                    "its parent is the executor's client span: \(call)\n\(tree)")
                #expect(
                    fields.contains { $0 == ["baggage", "tenant=acme"] },
                    "the caller's baggage reaches the service: \(fields)")
            }
            let served = trace.filter { $0.service == "otel-peer-service" }
            #expect(
                served.count == 2 && served.allSatisfy { $0.kind == 2 && byID[$0.parentID]?.name == "POST" }, "\(tree)")

            // Every Conveyor span of the run descends from the caller's span.
            let callerExported = try #require(byID[callerSpan], "the caller's span is exported\n\(tree)")
            #expect(callerExported.service == "otel-peer-caller" && callerExported.parentID.isEmpty)
            for span in trace where span.service.hasPrefix("conveyor-") {
                var cursor = span
                var hops = 0
                while let up = byID[cursor.parentID], hops < 32 {
                    cursor = up
                    hops += 1
                }
                #expect(cursor.spanID == callerSpan, "\(span) does not descend from the caller's span\n\(tree)")
            }
            // Nothing Conveyor exported is an orphan root (the API's /healthz polls are requests without a
            // traceparent).
            let roots = all.filter {
                $0.service.hasPrefix("conveyor-") && $0.parentID.isEmpty && $0.name != "dispatch"
                    && !$0.name.hasPrefix("record ") && $0.kind != 2
            }
            #expect(roots.isEmpty, "orphan spans: \(roots)")
        }
    }
}

extension TracingTests {
    /// A collector that is not there and a batch queue too small for the burst: every run still
    /// ends, and the spans lost are counted on /metrics by reason (swift-otel only logs them).
    @Test func lostSpansAreCountedAndRunsStillEnd() async throws {
        try await System.with { sys in
            let otel = [
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_BSP_MAX_QUEUE_SIZE": "4",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2",
                "OTEL_BSP_EXPORT_TIMEOUT": "1000", "OTEL_EXPORTER_OTLP_TIMEOUT": "500",
            ]
            let port = Int.random(in: 40_001...50_000)
            let dispatcher = try spawnConveyor(
                ["dispatcher"],
                env: [
                    "CONVEYOR_DATABASE_URL": sys.databaseURL, "CONVEYOR_AMQP_URL": sys.dispatcherAMQPURL,
                    "CONVEYOR_AMQP_PREFIX": sys.prefix, "CONVEYOR_DISPATCHER_QUEUES": sys.queue,
                    "CONVEYOR_DISPATCHER_HTTP_PORT": "\(port)",
                ].merging(otel) { a, _ in a })
            let worker = try spawnConveyor(
                ["worker"],
                env: sys.workerEnvironment(id: "lossy-worker", executors: "shell").merging(otel) { a, _ in a }
                    .merging([
                        "CONVEYOR_WORKER_HTTP_PORT": "0", "CONVEYOR_EXECUTORS_SHELL_ALLOWED_COMMANDS": "/bin/true",
                    ]) { a, _ in a })
            defer { for p in [dispatcher, worker] where p.isRunning { p.terminate() } }
            try await sys.store.createTasks(
                (0..<200).map { i in
                    var t = NewTask(name: "lossy-\(i)", executor: "shell", schedule: .once)
                    t.queue = sys.queue
                    t.parameters = ["argv": ["/bin/true"]]
                    return t
                })
            _ = try await sys.eventually(timeout: .seconds(90), "every run ends although no span can be exported") {
                try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 200
            }
            func dropped(_ reason: String) async -> Int {
                let text = (try? await Self.call("GET", "http://127.0.0.1:\(port)/metrics"))?.body ?? ""
                let prefix = #"conveyor_trace_spans_dropped_total{reason="\#(reason)"} "#
                return text.split(separator: "\n").first { $0.hasPrefix(prefix) }.flatMap {
                    Int($0.dropFirst(prefix.count))
                } ?? 0
            }
            _ = try await sys.eventually(
                timeout: .seconds(30), "the dispatcher counts spans lost to the full queue and to the failed exports"
            ) {
                let full = await dropped("queue_full")
                let failed = await dropped("export_failed")
                return full > 0 && failed > 0
            }
        }
    }
}

/// A real API, dispatcher and worker exporting their spans to `collector` (batches every
/// 100 ms), and an admin key for the API.
struct TracedFleet {
    var processes: [Process]
    var key: String
    var base: String

    static func start(
        _ sys: System, collector: String, protocol: String, workerID: String, executors: String,
        worker: [String: String], dispatcher: [String: String] = [:]
    ) async throws -> TracedFleet {
        let otel = [
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector, "OTEL_EXPORTER_OTLP_PROTOCOL": `protocol`,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        ]
        let common = [
            "CONVEYOR_DATABASE_URL": sys.databaseURL, "CONVEYOR_AMQP_URL": sys.dispatcherAMQPURL,
            "CONVEYOR_AMQP_PREFIX": sys.prefix,
        ]
        .merging(otel) { a, _ in a }
        let apiPort = Int.random(in: 40_001...50_000)
        var processes: [Process] = []
        do {
            processes.append(
                try spawnConveyor(
                    ["dispatcher"],
                    env: common.merging(
                        ["CONVEYOR_DISPATCHER_QUEUES": sys.queue, "CONVEYOR_DISPATCHER_HTTP_PORT": "0"].merging(
                            dispatcher
                        ) { _, b in b }
                    ) {
                        a, _ in a
                    }))
            processes.append(
                try spawnConveyor(
                    ["worker"],
                    env: sys.workerEnvironment(id: workerID, executors: executors).merging(otel) { a, _ in a }
                        .merging(["CONVEYOR_WORKER_HTTP_PORT": "0"].merging(worker) { _, b in b }) { a, _ in a }))
            processes.append(
                try spawnConveyor(
                    ["api"],
                    env: common.merging([
                        "CONVEYOR_API_PORT": "\(apiPort)", "CONVEYOR_API_HOST": "127.0.0.1",
                        "CONVEYOR_AMQP_URL": sys.apiAMQPURL,
                    ]) { _, b in b
                    }))
            let (key, prefix, hash) = APIKeyFormat.generate()
            try await sys.store.createAPIKey(
                prefix: prefix, secretHash: hash, name: workerID, role: Role.admin.rawValue, namespace: "*",
                expiresAt: nil)
            let base = "http://127.0.0.1:\(apiPort)"
            _ = try await sys.eventually(timeout: .seconds(30), "the API answers") {
                (try? await TracingTests.call("GET", base + "/healthz"))?.status == 200
            }
            return TracedFleet(processes: processes, key: key, base: base)
        } catch {
            for p in processes where p.isRunning { p.terminate() }
            throw error
        }
    }

    func stop() { for p in processes where p.isRunning { p.terminate() } }
}
