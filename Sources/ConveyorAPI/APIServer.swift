package import ConveyorAMQP
package import ConveyorBroker
import ConveyorCore
package import ConveyorStore
import Foundation
import HTTPTypes
package import Hummingbird
package import Logging
import NIOCore
import Synchronization

/// Everything the routes share: the store, authentication, limits, the broker, metrics.
package struct APIEnvironment: Sendable {
    package let store: Store
    package let keys: KeyAuthenticator
    package let jwt: JWTVerifier?
    package let options: APIOptions
    /// Asks the broker for queue depths and readiness on one kept connection; nil when the API runs
    /// without a broker (tests).
    package let inspector: AMQPInspector?
    package let topology: ConveyorTopology
    package let limiter = RateLimiter()
    /// `/readyz` needs no key: its answer is reused for 2 s, so probes (or anyone) calling it
    /// often cost one database query and one broker round trip per 2 s, not per call.
    let readiness = ReadinessCache()
    /// Whether the database had every migration this build knows, once: it stays so (migrations
    /// only move forward), and readiness stops asking.
    let schemaCurrent = SchemaGate()
    /// Open `/v1/events` streams per key, and the overview they share.
    let eventStreams = EventStreams()
    let overviews = OverviewCache()
    package let logger: Logger
    /// What the caches and rate limits measure time with.
    package let clock: APIClock

    package init(
        store: Store, keys: KeyAuthenticator, jwt: JWTVerifier? = nil, options: APIOptions = APIOptions(),
        broker: AMQPConfiguration? = nil, topology: ConveyorTopology = ConveyorTopology(),
        logger: Logger = Logger(label: "conveyor.api"), clock: APIClock = .continuous
    ) {
        self.clock = clock
        self.store = store
        self.keys = keys
        self.jwt = jwt
        self.options = options
        self.inspector = broker.map(AMQPInspector.init(configuration:))
        self.topology = topology
        self.logger = logger
    }

    /// Writes an audit entry after a change committed. A failure to write it is logged as an
    /// error with the request id (the change itself stands).
    func audit(
        _ context: APIContext, _ who: Identity, _ action: String, _ target: String, namespace: String,
        _ detail: [String: JSONValue] = [:]
    ) async {
        let entry = Store.AuditEntry(
            actor: who.keyPrefix, role: who.role.rawValue, namespace: namespace, action: action, target: target,
            requestID: context.requestID, client: context.client, detail: .object(detail))
        do { try await store.audit(entry) } catch {
            context.logger.error(
                "audit entry not written",
                metadata: ["audit.action": "\(action)", "audit.target": "\(target)", "error": "\(error)"])
        }
    }
}

/// The last readiness check, when it started, and its answer (being found, or found). Callers
/// within 2 s of its start share it, those that arrive while it runs included: one check at a
/// time, however many probes come at once.
final class ReadinessCache: Sendable {
    let state = Mutex<(at: ContinuousClock.Instant, answer: Task<Problem?, Never>)?>(nil)
}

/// The routes being registered, and their list as `METHOD /path/{param}` (what `openapi.yaml` must list).
struct Routes {
    let router: Router<APIContext>
    var list: [String] = []

    mutating func on(
        _ method: HTTPRequest.Method, _ path: String,
        _ handler: @escaping @Sendable (Request, APIContext) async throws -> Response
    ) {
        let documented = path.split(separator: "/").map { $0.hasPrefix(":") ? "{\($0.dropFirst())}" : String($0) }
            .reduce("") { $0 + "/" + $1 }
        list.append("\(method.rawValue) " + (documented.isEmpty ? "/" : documented))
        router.on(RouterPath(path), method: method, use: handler)
    }
}

/// The REST API (`conveyor api`) and the dashboard it serves.
///
/// Routes are in `TaskRoutes.swift` (tasks, templates) and `OperationRoutes.swift` (runs,
/// workers, groups, queues, keys, audit, events, metrics); `openapi.yaml` documents each.
/// Errors are `application/problem+json` (RFC 9457) with the field, the value and a hint.
package enum APIServer {
    /// Largest request body; larger ones get 413 before decoding.
    package static let maxBodyBytes = 1 << 20
    /// Deepest JSON nesting accepted; deeper gets 400 before decoding.
    package static let maxDepth = 32
    /// Default page size of lists (the largest is `APIOptions.maxPage`).
    package static let defaultPage = 50

    package static func router(_ env: APIEnvironment) -> Router<APIContext> { build(env).router }

    /// The router, and each route as `METHOD /path/{param}`.
    package static func build(_ env: APIEnvironment) -> (router: Router<APIContext>, routes: [String]) {
        let router = Router(context: APIContext.self)
        // A server span per request, continuing a caller's `traceparent` (docs/tracing.md).
        router.add(middleware: TraceHeadersMiddleware())
        router.add(middleware: TracingMiddleware())
        router.add(middleware: BaggageMiddleware())
        let table = RouteTable()
        router.add(middleware: RequestIDMiddleware(env: env, routes: table))
        router.add(middleware: TextInputMiddleware())
        router.add(middleware: AuthMiddleware(env: env))
        var r = Routes(router: router)
        r.on(.get, "/openapi.yaml") { _, _ in
            Response(
                status: .ok, headers: [.contentType: "application/yaml"],
                body: .init(byteBuffer: ByteBuffer(bytes: openAPIDocument)))
        }
        r.on(.get, "/healthz") { _, _ in json(["status": "ok"]) }
        r.on(.get, "/readyz") { _, _ in
            let now = env.clock.now()
            let answer = env.readiness.state.withLock { cached in
                if let cached, now - cached.at < .seconds(2) { return cached.answer }
                let check = Task { await readinessProblem(env) }
                cached = (now, check)
                return check
            }
            if let problem = await answer.value { throw problem }
            return json(["status": "ready"])
        }
        taskRoutes(&r, env)
        backfillRoutes(&r, env)
        operationRoutes(&r, env)
        queueRoutes(&r, env)
        Dashboard.routes(&r)
        table.set(r.list)
        return (router, r.list)
    }

    /// Why the API is not ready (the database or the broker does not answer), or nil.
    static func readinessProblem(_ env: APIEnvironment) async -> Problem? {
        do {
            try await env.store.ping()
        } catch {
            env.logger.warning("readiness: the database is unreachable", metadata: ["error": "\(error)"])
            var p = Problem(.serviceUnavailable, "not ready", "the database is unreachable")
            p.retryAfter = 5
            return p
        }
        if !env.schemaCurrent.current {
            do {
                let missing = try await Migrator(logger: env.logger).pending(env.store.pool)
                if missing.isEmpty {
                    env.schemaCurrent.current = true
                } else {
                    env.logger.warning("readiness: \(Migrator.waitingMessage(missing))")
                    var p = Problem(.serviceUnavailable, "not ready", Migrator.waitingMessage(missing))
                    p.retryAfter = 5
                    return p
                }
            } catch {
                env.logger.warning("readiness: the schema's version is unreadable", metadata: ["error": "\(error)"])
                var p = Problem(.serviceUnavailable, "not ready", "the database schema's version is unreadable")
                p.retryAfter = 5
                return p
            }
        }
        if let inspector = env.inspector {
            do { try await inspector.ping() } catch {
                // Which dependency, never its error text (addresses, user names): that is logged.
                env.logger.warning("readiness: the broker is unreachable", metadata: ["error": "\(error)"])
                var p = Problem(.serviceUnavailable, "not ready", "the broker is unreachable")
                p.retryAfter = 5
                return p
            }
        }
        return nil
    }

    /// `openapi.yaml`, as shipped in the module's resources.
    package static let openAPIDocument: [UInt8] = {
        guard let url = Bundle.module.url(forResource: "openapi", withExtension: "yaml"),
            let data = try? Data(contentsOf: url)
        else {
            return Array("openapi.yaml is missing from the ConveyorAPI bundle\n".utf8)
        }
        return Array(data)
    }()

    /// The task named in the path, in the caller's namespace; another namespace's task is 404,
    /// never 403, so a key cannot learn what other tenants have.
    static func findTask(_ request: Request, _ context: APIContext, _ who: Identity, _ store: Store) async throws
        -> TaskRecord
    {
        let name = context.parameters.get("name") ?? ""
        guard let task = try await store.task(named: name, namespace: namespaceOf(who, request)) else {
            throw Problem(.notFound, "not found", "no task named '\(name)'")
        }
        return task
    }

    /// The run named in the path and its task's namespace, if the caller sees that namespace
    /// (404 otherwise).
    static func findRun(_ context: APIContext, _ who: Identity, _ store: Store) async throws -> (
        run: RunRecord, namespace: String
    ) {
        let text = context.parameters.get("id") ?? ""
        guard let id = UUID(uuidString: text) else {
            throw Problem(.badRequest, "invalid request", "a run id is a UUID", field: "id", value: text)
        }
        guard let run = try await store.run(id: id), let ns = try await store.namespace(ofTask: run.taskID),
            who.sees(namespace: ns)
        else {
            throw Problem(.notFound, "not found", "no run \(text)")
        }
        return (run, ns)
    }

    /// The namespace a list reads: the caller's own, or for an every-namespace admin
    /// `?namespace=` (all of them when absent).
    static func listScope(_ who: Identity, _ request: Request) -> String? {
        who.namespace == "*" ? request.uri.queryParameters.get("namespace") : who.namespace
    }

    /// `?limit=`: from 1 to the configured largest page, 50 when absent.
    static func pageLimit(_ request: Request, _ env: APIEnvironment) throws(Problem) -> Int {
        let text = request.uri.queryParameters.get("limit") ?? "\(min(defaultPage, env.options.maxPage))"
        guard let limit = Int(text), (1...env.options.maxPage).contains(limit) else {
            throw Problem(
                .badRequest, "invalid request", "a whole number from 1 to \(env.options.maxPage)", field: "limit",
                value: text)
        }
        return limit
    }

    static func namespaceOf(_ who: Identity, _ request: Request) -> String {
        who.namespace == "*" ? (request.uri.queryParameters.get("namespace") ?? "default") : who.namespace
    }

    /// The body as JSON, after the size limit (413) and a nesting limit (400).
    static func body(_ request: Request, _ context: APIContext) async throws -> JSONValue {
        let buffer: ByteBuffer
        do {
            buffer = try await request.body.collect(upTo: context.maxUploadSize)
        } catch is NIOTooManyBytesError {
            throw Problem(
                .contentTooLarge, "request body too large", "bodies are limited to \(maxBodyBytes) bytes", field: "body"
            )
        }
        let bytes = Array(buffer.readableBytesView)
        try checkDepth(bytes)
        let value: JSONValue
        do {
            value = try JSONDecoder().decode(JSONValue.self, from: Data(bytes))
        } catch {
            throw Problem(.badRequest, "invalid request", "the body is not valid JSON", field: "body")
        }
        if let path = value.pathOfNUL() {
            throw Problem(
                .badRequest, "invalid request", "text may not contain the NUL character (\\u0000): remove it",
                field: path)
        }
        return value
    }

    /// Refuses JSON nested deeper than `maxDepth` before a decoder recurses into it.
    static func checkDepth(_ bytes: [UInt8]) throws(Problem) {
        var depth = 0
        var inString = false
        var escaped = false
        for b in bytes {
            if inString {
                if escaped {
                    escaped = false
                } else if b == UInt8(ascii: "\\") {
                    escaped = true
                } else if b == UInt8(ascii: "\"") {
                    inString = false
                }
                continue
            }
            switch b {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                depth += 1
                if depth > maxDepth {
                    throw Problem(
                        .badRequest, "invalid request", "JSON may nest at most \(maxDepth) levels", field: "body")
                }
            case UInt8(ascii: "}"), UInt8(ascii: "]"): depth -= 1
            default: break
            }
        }
    }

    static func json(_ value: JSONValue, status: HTTPResponse.Status = .ok) -> Response {
        Response(
            status: status, headers: [.contentType: "application/json"],
            body: .init(byteBuffer: ByteBuffer(bytes: value.jsonBytes)))
    }

    static func view(_ t: TaskRecord) -> JSONValue {
        var o: [String: JSONValue] = [
            "id": .string(t.id.lowercasedString), "name": .string(t.name), "executor": .string(t.executor),
            "schedule": .string(t.schedule), "timezone": .string(t.timeZone), "queue": .string(t.queue),
            "timeout": .number(t.timeoutSeconds), "schedule_to_start_timeout": .number(t.scheduleToStartSeconds),
            "paused": .bool(t.paused),
            "max_attempts": .number(Double(t.maxAttempts)),
        ]
        o["parameters"] = (try? JSONDecoder().decode(JSONValue.self, from: Data(t.parameters.utf8))) ?? .null
        if let n = t.nextRunAt { o["next_run_at"] = .string(Timestamp.format(n)) }
        if let id = t.nextRunID { o["next_run_id"] = .string(id.lowercasedString) }
        if let g = t.group { o["group"] = .string(g) }
        o["skipped_occurrences"] = .number(Double(t.skippedOccurrences))
        if !t.dependsOn.isEmpty { o["depends_on"] = .array(t.dependsOn.map(JSONValue.string)) }
        o["namespace"] = .string(t.namespace)
        o["labels"] = .object(t.labels.mapValues(JSONValue.string))
        o["priority"] = .string(t.priority.name)
        if let b = t.batchID { o["batch_id"] = .string(b.lowercasedString) }
        if let d = t.createdAt { o["created_at"] = .string(Timestamp.format(d)) }
        if let d = t.updatedAt { o["updated_at"] = .string(Timestamp.format(d)) }
        if let u = t.callbackURL { o["callback_url"] = .string(u) }
        if let k = t.concurrencyKey, let n = t.concurrencyLimit {
            o["concurrency"] = .object(["key": .string(k), "limit": .number(Double(n))])
        }
        o["misfire"] = .string(t.misfire)
        o["overlap"] = .string(t.overlap)
        o["trigger_rule"] = .string(t.triggerRule)
        // Most tasks have no uniqueness key: their spec is not decoded for one (a page lists 100).
        if t.spec.contains(#""unique""#), let spec = try? JSONDecoder().decode(JSONValue.self, from: Data(t.spec.utf8)),
            let u = spec["unique"]
        {
            o["unique"] = u
        }
        return .object(o)
    }

    static func view(_ r: RunRecord) -> JSONValue {
        var o: [String: JSONValue] = [
            "id": .string(r.id.lowercasedString), "task_id": .string(r.taskID.lowercasedString),
            "occurrence": .string(Timestamp.format(r.occurrence)), "attempt": .number(Double(r.attempt)),
            "state": .string(r.state.rawValue),
        ]
        if let v = r.workerID { o["worker_id"] = .string(v) }
        if let v = r.exitCode { o["exit_code"] = .number(Double(v)) }
        if let v = r.output { o["output"] = .string(v) }
        if let v = r.errorClass { o["error_class"] = .string(v) }
        if let v = r.errorMessage { o["error_message"] = .string(v) }
        if let v = r.reason { o["reason"] = .string(v) }
        if let v = r.traceID { o["trace_id"] = .string(v) }
        if let v = r.startedAt { o["started_at"] = .string(Timestamp.format(v)) }
        if let v = r.finishedAt { o["finished_at"] = .string(Timestamp.format(v)) }
        if let v = r.dispatchedAt { o["dispatched_at"] = .string(Timestamp.format(v)) }
        if let v = r.result, let value = try? JSONDecoder().decode(JSONValue.self, from: Data(v.utf8)) {
            o["result"] = value
        }
        o["priority"] = .string(r.priority.name)
        return .object(o)
    }
}

/// Whether the database had every migration this build knows (see `readinessProblem`).
final class SchemaGate: Sendable {
    private let value = Atomic<Bool>(false)
    var current: Bool {
        get { value.load(ordering: .relaxed) }
        set { value.store(newValue, ordering: .relaxed) }
    }
}
