package import ConveyorCore
import ConveyorStore
import ConveyorTelemetry
import Foundation
package import HTTPTypes
package import Hummingbird
import Logging
import NIOCore
import Synchronization
import Tracing
import W3CTraceContext

/// What a request runs with: who it acts as, and its request id.
package struct APIContext: RequestContext {
    package var coreContext: CoreRequestContextStorage
    package var identity: Identity?
    package var requestID = ""
    /// The TCP peer's address.
    package var peer: String?
    /// The client's address: the peer, or what a trusted proxy forwarded.
    package var client = "unknown"

    package init(source: Source) {
        coreContext = .init(source: source)
        peer = source.channel.remoteAddress?.ipAddress
    }

    /// Request bodies larger than this are refused with 413 before any decoding.
    package var maxUploadSize: Int { APIServer.maxBodyBytes }

    /// The identity, or 401; and 403 when its role is below `role`.
    func require(_ role: Role) throws(Problem) -> Identity {
        guard let identity else {
            throw Problem(.unauthorized, "authentication required", "send Authorization: Bearer <API key>")
        }
        guard identity.role >= role else {
            throw Problem(
                .forbidden, "forbidden", "this needs the \(role.rawValue) role; the key has \(identity.role.rawValue)")
        }
        return identity
    }

    /// The whole fleet's data (workers, process metrics): it spans every namespace, so it needs
    /// a key for every namespace (`*`: an admin key, or a viewer key made for it), with `role`.
    func requireFleet(_ role: Role = .viewer) throws(Problem) -> Identity {
        let identity = try require(role)
        guard identity.namespace == "*" else {
            throw Problem(
                .forbidden, "forbidden",
                """
                this is the whole fleet's, across namespaces: it needs a key for every namespace ('*'), an admin key \
                or a viewer key created with namespace '*'; this key is limited to namespace '\(identity.namespace)'
                """
            )
        }
        return identity
    }
}

/// An RFC 9457 problem: `application/problem+json` with the field, the value and a hint where
/// a request was at fault, and the request id to quote.
package struct Problem: Error, Sendable {
    package var status: HTTPResponse.Status
    package var title: String
    package var detail: String
    package var field: String?
    package var value: String?
    /// Seconds, for 429 and 503 (`Retry-After`).
    package var retryAfter: Int?
    /// The class of error, when the status alone does not tell it (see `ProblemType`).
    package var type: ProblemType?
    /// The methods the path has, for 405 (`Allow`).
    var allow: [String]?

    package init(
        _ status: HTTPResponse.Status, _ title: String, _ detail: String, field: String? = nil, value: String? = nil
    ) {
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.value = value
    }

    package init(_ v: ValidationError) {
        self.init(.badRequest, "invalid request", v.hint, field: v.field, value: v.value)
    }

    func response(requestID: String) -> Response {
        var o: [String: JSONValue] = [
            "type": .string((type ?? ProblemType(status: status)).uri), "title": .string(title),
            "status": .number(Double(status.code)),
            "detail": .string(detail), "request_id": .string(requestID),
        ]
        if let field { o["field"] = .string(field) }
        if let value { o["value"] = .string(value) }
        var headers: HTTPFields = [.contentType: "application/problem+json"]
        if status == .unauthorized { headers[.wwwAuthenticate] = "Bearer" }
        if let retryAfter { headers[.retryAfter] = String(retryAfter) }
        if let allow { headers[.allow] = allow.joined(separator: ", ") }
        return Response(
            status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: JSONValue.object(o).jsonBytes)))
    }
}

/// The `type` of a problem: one stable URN per class of error, listed in `openapi.yaml`'s
/// Problem schema and docs/api.md ("Errors"), so clients branch on it rather than on the title
/// or the detail, which may be reworded.
package enum ProblemType: String, CaseIterable, Sendable {
    case invalidRequest = "invalid-request"
    case unauthenticated
    case forbidden
    case notFound = "not-found"
    case methodNotAllowed = "method-not-allowed"
    case conflict
    /// 409: the first request with this Idempotency-Key is still being answered.
    case requestInProgress = "request-in-progress"
    case bodyTooLarge = "body-too-large"
    /// 422: the Idempotency-Key came with another request before.
    case idempotencyKeyReused = "idempotency-key-reused"
    case rateLimited = "rate-limited"
    case internalError = "internal"
    case unavailable

    package var uri: String { "urn:conveyor:problem:" + rawValue }

    /// The class a status means when nothing more precise is said.
    init(status: HTTPResponse.Status) {
        self =
            switch status.code {
            case 401: .unauthenticated
            case 403: .forbidden
            case 404: .notFound
            case 405: .methodNotAllowed
            case 409: .conflict
            case 413: .bodyTooLarge
            case 422: .idempotencyKeyReused
            case 429: .rateLimited
            case 502, 503, 504: .unavailable
            case 400..<500: .invalidRequest
            default: .internalError
            }
    }
}

extension HTTPField.Name {
    static let requestID = HTTPField.Name("X-Request-ID")!
}

/// The methods each route pattern has, for answering a method a path lacks with 405 and
/// `Allow` (Hummingbird's router answers 404 for it). Filled once, by `APIServer.build`, before
/// the server takes requests; read under the lock after.
final class RouteTable: Sendable {
    private let routes = Mutex<[(method: String, segments: [Substring])]>([])

    /// `routes` as `Routes.list` spells them: `METHOD /v1/tasks/{name}`.
    func set(_ list: [String]) {
        let parsed = list.compactMap { line -> (String, [Substring])? in
            let parts = line.split(separator: " ", maxSplits: 1)
            guard parts.count == 2 else { return nil }
            return (String(parts[0]), parts[1].split(separator: "/"))
        }
        routes.withLock { $0 = parsed.map { (method: $0.0, segments: $0.1) } }
    }

    /// The methods of the routes `path` matches (a `{param}` matches any one segment), sorted.
    func methods(for path: String) -> [String] {
        let segments = path.split(separator: "/")
        let found = routes.withLock { routes in
            routes.filter { route in
                route.segments.count == segments.count
                    && zip(route.segments, segments).allSatisfy { pattern, part in
                        pattern.hasPrefix("{") || pattern == part
                    }
            }.map(\.method)
        }
        return Array(Set(found)).sorted()
    }

    /// Whether `path` is a route's, but not with `method`.
    func lacksMethod(_ method: String, path: String) -> Bool {
        let methods = methods(for: path)
        return !methods.isEmpty && !methods.contains(method)
    }
}

/// Reads the request's W3C trace headers before `TracingMiddleware` does, as W3C Trace Context
/// and Baggage say a receiver must, and counts what it does not continue
/// (`conveyor_trace_context_refused_total{header}`); a request is never refused for its trace
/// headers. `tracestate` and `baggage` may come in several header lines: they are one list,
/// joined with commas (RFC 9110), and checked as one.
/// - A `traceparent` that does not parse (W3C version 00), or that came more than once: removed,
///   with its `tracestate`, so the request starts a fresh trace.
/// - A `tracestate` over 512 bytes or 32 members, or one that does not parse: removed; the trace
///   continues without it. (swift-otel would otherwise drop the whole context, and log the
///   request's headers, credentials included, while doing so.)
/// - A `baggage` over 8192 bytes or 64 members: dropped.
struct TraceHeadersMiddleware: RouterMiddleware {
    static let traceparent = HTTPField.Name("traceparent")!
    static let tracestate = HTTPField.Name("tracestate")!
    static let baggage = HTTPField.Name("baggage")!

    func handle(
        _ request: Request, context: APIContext, next: @concurrent (Request, APIContext) async throws -> Response
    ) async throws -> Response {
        var fields = request.headers
        let parents = fields[values: Self.traceparent]
        if !parents.isEmpty, parents.count > 1 || (try? TraceContext(traceParentHeaderValue: parents[0])) == nil {
            fields[values: Self.traceparent] = []
            fields[values: Self.tracestate] = []
            ConveyorMetrics.traceContextRefused(header: "traceparent")
        }
        if let state = fields[Self.tracestate] {
            let parent = fields[Self.traceparent]
            if state.utf8.count > 512 || state.split(separator: ",").count > 32
                || (parent.map { (try? TraceContext(traceParentHeaderValue: $0, traceStateHeaderValue: state)) == nil }
                    ?? false)
            {
                fields[values: Self.tracestate] = []
                ConveyorMetrics.traceContextRefused(header: "tracestate")
            }
        }
        if let baggage = fields[Self.baggage], baggage.utf8.count > 8192 || baggage.split(separator: ",").count > 64 {
            fields[values: Self.baggage] = []
            ConveyorMetrics.traceContextRefused(header: "baggage")
        }
        guard fields != request.headers else { return try await next(request, context) }
        var head = request.head
        head.headerFields = fields
        return try await next(Request(head: head, body: request.body), context)
    }
}

/// Puts the request's `baggage` (checked by `TraceHeadersMiddleware`) into the task-local
/// context, beside the span context `TracingMiddleware` extracted: tasks created or triggered
/// by the request carry it to their runs.
struct BaggageMiddleware: RouterMiddleware {
    func handle(
        _ request: Request, context: APIContext, next: @concurrent (Request, APIContext) async throws -> Response
    ) async throws -> Response {
        guard let baggage = request.headers[TraceHeadersMiddleware.baggage], !baggage.isEmpty else {
            return try await next(request, context)
        }
        var trace = ServiceContext.current ?? .topLevel
        trace.baggageHeader = baggage
        return try await ServiceContext.$current.withValue(trace) { try await next(request, context) }
    }
}

/// Text PostgreSQL cannot store (NUL) is refused where it enters, before authentication or any
/// database work: the path and every query parameter here, every string and key of a JSON body in
/// `APIServer.body`. A 400 naming the field, not a 500 from the database driver.
struct TextInputMiddleware: RouterMiddleware {
    func handle(
        _ request: Request, context: APIContext, next: @concurrent (Request, APIContext) async throws -> Response
    ) async throws -> Response {
        let path = request.uri.path
        if path.utf8.contains(0) || (path.removingPercentEncoding ?? "").utf8.contains(0) {
            throw Problem(
                .badRequest, "invalid request", "the path holds a NUL byte (%00), which no name may contain",
                field: "path",
                value: (path.removingPercentEncoding ?? path).storable)
        }
        for (key, value) in request.uri.queryParameters where key.utf8.contains(0) || value.utf8.contains(0) {
            throw Problem(
                .badRequest, "invalid request", "query parameters may not contain a NUL byte (%00)",
                field: String(key).storable,
                value: String(value).storable)
        }
        return try await next(request, context)
    }
}

/// Outermost: gives every request an id (a sane `X-Request-ID` it brought, or a new one), puts
/// it in the logs and the response, and turns every error into a problem response.
struct RequestIDMiddleware: RouterMiddleware {
    let env: APIEnvironment
    let routes: RouteTable

    func handle(
        _ request: Request, context: APIContext, next: @concurrent (Request, APIContext) async throws -> Response
    ) async throws -> Response {
        let started = ContinuousClock.now
        var context = context
        context.client = ClientAddress.resolve(
            peer: context.peer, forwardedFor: request.headers[.xForwardedFor], trusted: env.options.trustedProxies)
        let given = request.headers[.requestID] ?? ""
        context.requestID =
            given.count <= 128 && !given.isEmpty
                && given.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.:".contains($0)) })
            ? given : UUID().lowercasedString
        context.logger[metadataKey: "request.id"] = "\(context.requestID)"
        var response: Response
        do {
            response = try await next(request, context)
        } catch let p as Problem {
            response = p.response(requestID: context.requestID)
        } catch let v as ValidationError {
            response = Problem(v).response(requestID: context.requestID)
        } catch let e as HTTPError
            where e.status == .notFound && routes.lacksMethod(request.method.rawValue, path: request.uri.path)
        {
            let allowed = routes.methods(for: request.uri.path)
            var p = Problem(
                .methodNotAllowed, "method not allowed",
                "\(request.uri.path) answers \(allowed.joined(separator: ", ")), not \(request.method.rawValue)")
            p.allow = allowed
            response = p.response(requestID: context.requestID)
        } catch let e as HTTPError {
            let title = e.status == .contentTooLarge ? "request body too large" : e.status.reasonPhrase
            let detail =
                e.status == .contentTooLarge
                ? "bodies are limited to \(APIServer.maxBodyBytes) bytes" : (e.body ?? e.status.reasonPhrase)
            response = Problem(e.status, title, detail).response(requestID: context.requestID)
        } catch  where Store.isUnavailable(error) {
            // The database cannot be reached (down, restarting, failing over, out of connections):
            // a 503 the client may retry, not a 500 that reads as a bug.
            context.logger.warning("request failed: the database is unavailable", metadata: ["error": "\(error)"])
            var p = Problem(
                .serviceUnavailable, "database unavailable",
                "the API cannot reach its database now; retry after Retry-After seconds (a POST with the same Idempotency-Key is safe to repeat)"
            )
            p.retryAfter = 5
            response = p.response(requestID: context.requestID)
        } catch {
            context.logger.error("request failed", metadata: ["error": "\(error)"])
            response = Problem(
                .internalServerError, "internal error",
                "the server could not complete the request; quote the request id"
            ).response(
                requestID: context.requestID)
        }
        response.headers[.requestID] = context.requestID
        ConveyorMetrics.apiRequest(
            route: Self.routePattern(context.endpointPath), method: request.method.rawValue,
            status: response.status.code, duration: ContinuousClock.now - started)
        context.logger.info(
            "request",
            metadata: [
                "http.method": "\(request.method)", "http.path": "\(request.uri.path)",
                "http.status": "\(response.status.code)", "client.address": "\(context.client)",
            ])
        return response
    }

    /// The router's pattern in the OpenAPI spelling (`/v1/tasks/{name}`), never the raw path, so the
    /// metrics' label set stays bounded; `unmatched` for a path no route has.
    static func routePattern(_ endpoint: String?) -> String {
        guard let endpoint else { return "unmatched" }
        let parts = endpoint.split(separator: "/").map { $0.hasPrefix(":") ? "{\($0.dropFirst())}" : String($0) }
        return "/" + parts.joined(separator: "/")
    }
}

/// Every route but `/healthz`, `/readyz` and the dashboard's static files needs
/// `Authorization: Bearer <API key or JWT>`. Requests are rate-limited per key; requests
/// without valid credentials per client address.
///
/// The order keeps refusals cheap: a missing, oversized or malformed credential (neither an API
/// key nor a JWT) is refused from memory, and so is a key answered from the key cache. The only
/// database work a stranger can cause is the lookup of a key prefix this process does not know,
/// and that lookup is charged to the client's address before it is made (a valid key gives the
/// token back): a flood of made-up keys from one address costs at most that address's budget in
/// queries, then gets 429 without one.
struct AuthMiddleware: RouterMiddleware {
    let env: APIEnvironment
    static let open: Set<String> = ["/healthz", "/readyz"]

    func handle(
        _ request: Request, context: APIContext, next: @concurrent (Request, APIContext) async throws -> Response
    ) async throws -> Response {
        let path = request.uri.path
        if Self.open.contains(path) || Dashboard.serves(path) { return try await next(request, context) }
        // Failures count against the client's address: past its burst they get 429, not 401.
        // Valid credentials from the same address are not held up, except a key this process
        // has not found yet while the address has no token left: its lookup needs one (see the
        // type's comment), given back when the key is valid.
        func refuse(_ problem: Problem) -> Problem {
            if let wait = env.limiter.take("addr:" + context.client, env.options.perAddress, now: env.clock.now()) {
                return Self.tooMany(wait, Self.addressDetail(context.client))
            }
            return problem
        }
        guard let header = request.headers[.authorization], header.lowercased().hasPrefix("bearer ") else {
            throw refuse(
                Problem(.unauthorized, "authentication required", "send Authorization: Bearer <API key or JWT>"))
        }
        let credential = String(header.dropFirst(7)).trimmingCharacters(in: .whitespaces)
        func admit(_ identity: Identity) async throws -> Response {
            if let wait = env.limiter.take("key:" + identity.keyPrefix, env.options.perKey, now: env.clock.now()) {
                throw Self.tooMany(
                    wait,
                    """
                    this key made more than \(Int(env.options.perKey.burst)) requests in a burst; at most \
                    \(env.options.perKey.rate) per second on average
                    """
                )
            }
            var context = context
            context.identity = identity
            context.logger[metadataKey: "auth.key"] = "\(identity.keyPrefix)"
            return try await next(request, context)
        }
        guard credential.count <= 8192 else {
            throw refuse(
                Problem(.unauthorized, "authentication failed", "the credential is longer than 8192 characters"))
        }
        if !credential.hasPrefix("cvk_"), let jwt = env.jwt {
            switch await jwt.verify(credential) {
            case .success(let identity): return try await admit(identity)
            case .failure(let why): throw refuse(Problem(.unauthorized, "authentication failed", why.description))
            }
        }
        // A lookup takes its token from the address before it is made; a valid key gives it
        // back, and a failure it leads to does not take a second one.
        var charged = false
        let outcome = try await env.keys.authenticate(credential) {
            charged = true
            return env.limiter.take("addr:" + context.client, env.options.perAddress, now: env.clock.now())
        }
        switch outcome {
        case .success(let identity):
            if charged { env.limiter.giveBack("addr:" + context.client, env.options.perAddress) }
            return try await admit(identity)
        case .failure(let why):
            let detail: String
            switch why {
            case .malformed: detail = "the credential is not an API key (cvk_<prefix>_<secret>)"
            case .unknown: detail = "unknown API key"
            case .revoked: detail = "this API key was revoked"
            case .expired: detail = "this API key has expired"
            case .throttled(let wait): throw Self.tooMany(wait, Self.addressDetail(context.client))
            }
            let problem = Problem(.unauthorized, "authentication failed", detail)
            throw charged ? problem : refuse(problem)
        }
    }

    static func addressDetail(_ client: String) -> String {
        "too many requests without valid credentials from \(client)"
    }

    static func tooMany(_ wait: Duration, _ detail: String) -> Problem {
        var p = Problem(.tooManyRequests, "too many requests", detail + "; retry after the Retry-After seconds")
        p.retryAfter = max(1, Int(wait.inSeconds.rounded(.up)))
        return p
    }
}

extension HTTPField.Name {
    static let xForwardedFor = HTTPField.Name("X-Forwarded-For")!
}
