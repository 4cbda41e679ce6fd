import ConveyorCore
import ConveyorHTTP
import ConveyorWorker
import Foundation
import Testing

/// The http executor against real HTTP servers on loopback addresses.
@Suite("http executor (real HTTP servers)")
struct HTTPExecutorTests {
    static func context(_ parameters: JSONValue, timeout: Duration = .seconds(5)) -> ExecutionContext {
        ExecutionContext(
            runID: UUID(), taskName: "call", attempt: 2, parameters: parameters, timeout: timeout,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", tracestate: "vendor=1",
            idempotencyKey: "run-key-1", occurrenceKey: "task-1@2026-12-04T05:00:00.000000Z")
    }

    /// An executor that may reach only the loopback address `allowed`.
    static func executor(allowing allowed: String) -> HTTPExecutor {
        var p = OutboundPolicy()
        p.allowedNetworks = [try! Network(parsing: allowed)]
        return HTTPExecutor(policy: p)
    }

    @Test func outcomeFollowsTheStatusClassAndTheRequestCarriesRunAndTrace() async throws {
        let server = try await HTTPReceiver(host: "127.0.0.2") { request, _ in
            switch request.path {
            case "/busy": .init(status: 503)
            case "/missing": .init(status: 404)
            default: .init(status: 201)
            }
        }
        defer { Task { await server.close() } }
        let http = Self.executor(allowing: "127.0.0.2")

        let ok = await http.execute(
            Self.context([
                "url": .string(server.url + "/hook"), "method": "post",
                "headers": ["X-Tenant": "42"], "body": ["n": 1],
            ]))
        #expect(ok.outcome == .succeeded)
        #expect(ok.output == "ok")
        let got = try #require(server.received(path: "/hook").first)
        #expect(got.method == "POST")
        #expect(got.headers["idempotency-key"] == "run-key-1")
        #expect(got.headers["conveyor-occurrence-key"] == "task-1@2026-12-04T05:00:00.000000Z")
        // The request carries the executor's client span: the run's trace, a new span id.
        let tp = try #require(got.headers["traceparent"]).split(separator: "-")
        #expect(tp.count == 4 && tp[1] == "4bf92f3577b34da6a3ce929d0e0e4736" && tp[2] != "00f067aa0ba902b7")
        #expect(got.headers["tracestate"] == "vendor=1")
        #expect(got.headers["x-tenant"] == "42")
        #expect(got.headers["content-type"] == "application/json")
        #expect(got.body == #"{"n":1}"#)

        let busy = await http.execute(Self.context(["url": .string(server.url + "/busy")]))
        #expect(busy.outcome == .failed && busy.errorClass == "http_503")
        let missing = await http.execute(Self.context(["url": .string(server.url + "/missing")]))
        #expect(missing.outcome == .failed && missing.errorClass == "http_404")

        // The default retry policy: 5xx, 408 and 429 are retried; other 4xx and refusals are not.
        let policy = try RetryPolicy(maxAttempts: 3, json: .object([:]))
        #expect(policy.isRetryable(state: .failed, exitCode: nil, errorClass: "http_503"))
        #expect(policy.isRetryable(state: .failed, exitCode: nil, errorClass: "http_429"))
        #expect(!policy.isRetryable(state: .failed, exitCode: nil, errorClass: "http_404"))
        #expect(!policy.isRetryable(state: .failed, exitCode: nil, errorClass: "http_refused"))
    }

    @Test func ssrfAttemptsNeverReachTheCanary() async throws {
        // Canaries listen on 127.0.0.1 and on [::1]; the executor may reach 127.0.0.2 only. Each
        // attempt must be refused by the guard (http_refused, or http_invalid_url for a URL it will
        // not read), never fail to connect: a connection error would mean the guard let it through.
        let canary = try await HTTPReceiver()
        defer { Task { await canary.close() } }
        let canary6 = try await HTTPReceiver(host: "::1")
        defer { Task { await canary6.close() } }
        let relay = try await HTTPReceiver(host: "127.0.0.2") { request, _ in
            .init(status: 302, headers: [("Location", "http://127.0.0.1:\(canary.port)/via-redirect")])
        }
        defer { Task { await relay.close() } }
        let http = Self.executor(allowing: "127.0.0.2")
        let p = canary.port
        let attempts = [
            "http://127.0.0.1:\(p)/direct",
            "http://[::1]:\(canary6.port)/v6",
            "http://0.0.0.0:\(p)/unspecified",
            "http://localhost:\(p)/name",
            "http://2130706433:\(p)/decimal",  // 127.0.0.1 written as one number
            "http://0x7f.0.0.1:\(p)/hex",
            "http://127.1:\(p)/short",
            "http://[::ffff:127.0.0.1]:\(p)/mapped",
            "http://169.254.169.254:\(p)/latest/meta-data/",
            relay.url + "/redirect",
        ]
        for url in attempts {
            let r = await http.execute(Self.context(["url": .string(url)], timeout: .seconds(3)))
            #expect(r.outcome == .failed, "\(url): \(r)")
            #expect(["http_refused", "http_invalid_url"].contains(r.errorClass ?? ""), "\(url): \(r)")
        }
        #expect(canary6.received().isEmpty, "the [::1] canary was reached")
        #expect(relay.received(path: "/redirect").count == 1, "the allowed relay was reached")
        #expect(canary.received().isEmpty, "the canary was reached: \(canary.received().map(\.path))")
    }

    /// A task's own headers go only to the origin it named, and its run errors keep no query
    /// string (issue 19, part 5). Before, the other origin got the task's Authorization and
    /// X-Api-Key, and the error held `?token=s3cret`.
    @Test func taskHeadersAndQueryTokensStayWithTheTask() async throws {
        let other = try await HTTPReceiver(host: "127.0.0.2")
        defer { Task { await other.close() } }
        let server = try await HTTPReceiver(host: "127.0.0.2") { request, _ in
            switch request.path {
            case "/away": .init(status: 302, headers: [("Location", other.url + "/landed")])
            default: .init(status: 404)
            }
        }
        defer { Task { await server.close() } }
        let http = Self.executor(allowing: "127.0.0.2")

        let moved = await http.execute(
            Self.context([
                "url": .string(server.url + "/away"),
                "headers": ["Authorization": "Bearer s3cret", "X-Api-Key": "s3cret"],
            ]))
        #expect(moved.outcome == .succeeded, "\(moved)")
        let first = try #require(server.received(path: "/away").first)
        #expect(first.headers["authorization"] == "Bearer s3cret" && first.headers["x-api-key"] == "s3cret")
        let landed = try #require(other.received(path: "/landed").first)
        #expect(landed.headers["authorization"] == nil && landed.headers["x-api-key"] == nil, "\(landed.headers)")
        #expect(landed.headers["idempotency-key"] == "run-key-1", "Conveyor's own headers still go")

        let missing = await http.execute(Self.context(["url": .string(server.url + "/missing?token=s3cret")]))
        #expect(missing.errorClass == "http_404")
        #expect(missing.errorMessage == "HTTP 404 from \(server.url)/missing?…")
        let closed = await http.execute(
            Self.context(["url": "http://127.0.0.2:1/x?token=s3cret"], timeout: .milliseconds(500)))
        let message = closed.errorMessage ?? ""
        #expect(closed.outcome == .failed && !message.contains("s3cret") && message.contains("/x?…"), "\(closed)")
    }

    @Test func badParametersNameTheField() async throws {
        let http = Self.executor(allowing: "127.0.0.2")
        let cases: [(JSONValue, String)] = [
            ([:], "parameters.url"),
            (["url": "http://127.0.0.2:1/", "method": "TRACE"], "parameters.method"),
            (["url": "http://127.0.0.2:1/", "headers": ["Host": "evil"]], "parameters.headers.Host"),
            (
                ["url": "http://127.0.0.2:1/", "headers": ["Conveyor-Occurrence-Key": "forged"]],
                "parameters.headers.Conveyor-Occurrence-Key"
            ),
            (["url": "http://127.0.0.2:1/", "headers": ["X-A": "a\r\nX-Injected: 1"]], "parameters.headers.X-A"),
        ]
        for (parameters, field) in cases {
            let r = await http.execute(Self.context(parameters))
            #expect(r.errorClass == "bad_parameters" && (r.errorMessage ?? "").contains(field), "\(parameters): \(r)")
        }
    }
}
