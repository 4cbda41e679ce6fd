package import ConveyorConfig
package import ConveyorCore
package import ConveyorHTTP
import ConveyorTelemetry
import Foundation
package import Logging
import Tracing

/// Calls an HTTP endpoint through the outbound guard (`ConveyorHTTP`): hosts from an allowlist,
/// every resolved address checked (loopback, private, link-local, metadata and reserved ranges
/// refused unless `allowed_networks` lists them), the connection pinned to the address checked,
/// and each redirect checked again.
///
/// Settings (`executors.<name>.*`): `allowed_hosts`, `allowed_networks`, `allowed_schemes`,
/// `max_redirects` (5), `max_response_bytes` (65536), `connect_timeout_ms` (5000).
///
/// Parameters: `url` (required), `method` (GET, HEAD, POST, PUT, PATCH or DELETE; default GET),
/// `headers` (object of strings), `body` (a string sent as is, or any other JSON value sent as
/// JSON). The task's timeout bounds the whole exchange. A dependent's upstream results
/// (`ExecutionContext.inputs`) are added to a JSON object body as `inputs`; with no body, a
/// POST, PUT or PATCH sends `{"inputs": …}`.
///
/// Redirects: a hop to another origin (scheme, host or port) drops `Authorization`, `Cookie`,
/// `Proxy-Authorization` and every header from `parameters.headers`; one that would send the
/// body to another origin (307/308, or 301/302 after anything but a POST) is refused
/// (`http_refused`).
///
/// Sent with every request: `Idempotency-Key: <run id>` (this attempt),
/// `Conveyor-Occurrence-Key: <task id>@<occurrence>` (every attempt of the occurrence), and the
/// W3C `traceparent`, `tracestate` and `baggage` of the request's client span (a child of the
/// worker's execute span).
/// Result: a 2xx response whose `Content-Type` is JSON (`application/json`, `…+json`) is also the
/// run's structured result, parsed (a body cut at `max_response_bytes` is marked, not parsed);
/// `parameters.result: none` turns that off.
/// Outcome: 2xx succeeds (the body is the output); any other status fails with error class
/// `http_<status>` (408, 429 and 5xx are retried by default, other 4xx are not); a refused or
/// invalid URL fails as `http_refused` / `http_invalid_url` (not retried by default); connect,
/// timeout and transport errors as `http_connect`, `http_timeout`, `http_transport` (retried).
package struct HTTPExecutor: Executor {
    package var policy: OutboundPolicy
    let http: OutboundHTTP

    static let methods: Set<String> = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    /// Headers the executor sets itself, or that would let a task break the framing.
    static let reservedHeaders: Set<String> = [
        "host", "content-length", "transfer-encoding", "connection", "upgrade",
        "idempotency-key", "conveyor-occurrence-key", "traceparent", "tracestate", "baggage",
    ]

    package init(policy: OutboundPolicy, logger: Logger = Logger(label: "conveyor.executor.http")) {
        self.policy = policy
        http = OutboundHTTP(policy: policy, logger: logger)
    }

    package init(settings: Settings) throws(ValidationError) {
        var policy = OutboundPolicy()
        try policy.read(settings)
        self.init(policy: policy)
    }

    package func execute(_ context: ExecutionContext) async -> ExecutionResult {
        var request: OutboundRequest
        do throws(ValidationError) { request = try Self.request(context) } catch {
            return .failed("bad_parameters", error.description)
        }
        // The client span; the server continues the trace from the headers it carries (the
        // only trace headers on the request: OutboundHTTP adds none of its own).
        let span = Traces.startSpan(
            request.method, context: context.spanParent, kind: .client, attributes: request.spanAttributes)
        defer { span.end() }
        for (name, value) in Traces.headers(span.context).sorted(by: { $0.key < $1.key }) {
            request.headers.append((name, value))
        }
        do {
            let response = try await http.send(request, timeout: context.timeout, span: span)
            var output = String(decoding: response.body, as: UTF8.self)
            if response.truncated { output += "\n[… response truncated at \(policy.maxResponseBytes) bytes]" }
            if (200..<300).contains(response.status) {
                return ExecutionResult(outcome: .succeeded, output: output, result: Self.result(of: response, context))
            }
            // Stored as the run's error: the URL without its query (tokens, signatures).
            return .failed(
                "http_\(response.status)", "HTTP \(response.status) from \(strippedURL(response.url))", output: output)
        } catch {
            if Task.isCancelled {
                return ExecutionResult(
                    outcome: .cancelled, errorClass: "cancelled", errorMessage: "cancelled during the request")
            }
            return .failed("http_\(error.kind.rawValue)", error.message)
        }
    }

    /// A JSON response's body as the run's result (see the type's comment).
    static func result(of response: OutboundResponse, _ context: ExecutionContext) -> JSONValue? {
        guard context.parameters["result"]?.stringValue != "none" else { return nil }
        let type = response.headers.first { $0.0.lowercased() == "content-type" }?.1.lowercased() ?? ""
        let media = type.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
        guard media == "application/json" || media.hasSuffix("+json") else { return nil }
        guard !response.truncated else {
            return .truncationMarker(of: response.body, bytes: nil, limit: response.body.count)
        }
        return try? JSONDecoder().decode(JSONValue.self, from: Data(response.body))
    }

    static func request(_ context: ExecutionContext) throws(ValidationError) -> OutboundRequest {
        let p = context.parameters
        guard let url = p["url"]?.stringValue, !url.isEmpty else {
            throw ValidationError(
                field: "parameters.url", value: "\(p["url"] ?? .null)",
                hint: "the URL to call, e.g. \"https://api.example.com/hook\"")
        }
        let method = (p["method"]?.stringValue ?? "GET").uppercased()
        guard methods.contains(method) else {
            throw ValidationError(
                field: "parameters.method", value: method, hint: "one of \(methods.sorted().joined(separator: ", "))")
        }
        var headers: [(String, String)] = []
        var taskHeaders: Set<String> = []
        if let h = p["headers"] {
            guard let o = h.objectValue else {
                throw ValidationError(
                    field: "parameters.headers", value: "\(h)", hint: "an object of header names to string values")
            }
            for (name, value) in o.sorted(by: { $0.key < $1.key }) {
                let tokenChars = CharacterSet(
                    charactersIn: "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
                guard !name.isEmpty, name.unicodeScalars.allSatisfy(tokenChars.contains) else {
                    throw ValidationError(
                        field: "parameters.headers", value: name,
                        hint: "header names are HTTP tokens (letters, digits, '-')")
                }
                guard !reservedHeaders.contains(name.lowercased()) else {
                    throw ValidationError(
                        field: "parameters.headers.\(name)", value: name,
                        hint: "set by Conveyor or by HTTP itself; remove it")
                }
                guard let v = value.stringValue, !v.contains("\r"), !v.contains("\n"), !v.contains("\0") else {
                    throw ValidationError(
                        field: "parameters.headers.\(name)", value: "\(value)", hint: "a string without line breaks")
                }
                headers.append((name, v))
                taskHeaders.insert(name.lowercased())
            }
        }
        var body: [UInt8] = []
        // A dependent's upstream results go in a JSON object body as `inputs` (a key the body
        // already has is left alone); without a body, a POST, PUT or PATCH sends {"inputs": …}.
        var given = p["body"]
        if let inputs = context.inputs {
            switch given {
            case .object(var o)?:
                if o["inputs"] == nil { o["inputs"] = inputs }
                given = .object(o)
            case nil, .null?:
                if ["POST", "PUT", "PATCH"].contains(method) { given = .object(["inputs": inputs]) }
            default: break
            }
        }
        switch given {
        case nil, .null?: break
        case .string(let s)?: body = Array(s.utf8)
        case let v?:
            body = v.jsonBytes
            if !headers.contains(where: { $0.0.lowercased() == "content-type" }) {
                headers.append(("Content-Type", "application/json"))
            }
        }
        headers.append(("Idempotency-Key", context.idempotencyKey))
        headers.append(("Conveyor-Occurrence-Key", context.occurrenceKey))
        // The task's headers are where its API keys are: a redirect to another origin drops them.
        return OutboundRequest(method: method, url: url, headers: headers, body: body, originOnlyHeaders: taskHeaders)
    }
}
