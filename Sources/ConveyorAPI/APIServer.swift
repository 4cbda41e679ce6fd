public import ConveyorCore
public import ConveyorStore
import ConveyorPostgres
import Foundation
import HTTPTypes
public import Hummingbird
public import Logging
import NIOCore

/// The REST API (`conveyor api`): tasks and runs, behind API keys.
///
/// Routes so far: `GET /healthz`, `GET /readyz`, `POST /v1/tasks`, `GET /v1/tasks`,
/// `GET /v1/tasks/{name}`, `POST /v1/tasks/{name}/trigger|pause|resume`, `GET /v1/runs/{id}`, `GET /openapi.yaml`.
/// Errors are `application/problem+json` (RFC 9457) with the field, the value and a hint.
public enum APIServer {
    /// Largest request body; larger ones get 413 before decoding.
    public static let maxBodyBytes = 1 << 20
    /// Deepest JSON nesting accepted; deeper gets 400 before decoding.
    public static let maxDepth = 32
    /// Page size of lists: default and largest.
    public static let defaultPage = 50, maxPage = 100

    public static func router(store: Store, keys: KeyAuthenticator, jwt: JWTVerifier? = nil) -> Router<APIContext> {
        build(store: store, keys: keys, jwt: jwt).router
    }

    /// The router, and each route as `METHOD /path/{param}` (what `openapi.yaml` must list).
    public static func build(store: Store, keys: KeyAuthenticator, jwt: JWTVerifier? = nil) -> (router: Router<APIContext>, routes: [String]) {
        let router = Router(context: APIContext.self)
        router.add(middleware: RequestIDMiddleware())
        router.add(middleware: AuthMiddleware(keys: keys, jwt: jwt))
        var routes: [String] = []
        func on(_ method: HTTPRequest.Method, _ path: String, _ handler: @escaping @Sendable (Request, APIContext) async throws -> Response) {
            routes.append("\(method.rawValue) " + path.split(separator: "/").map { $0.hasPrefix(":") ? "{\($0.dropFirst())}" : String($0) }
                .reduce("") { $0 + "/" + $1 })
            router.on(RouterPath(path), method: method, use: handler)
        }
        on(.get, "/openapi.yaml") { _, _ in
            Response(status: .ok, headers: [.contentType: "application/yaml"], body: .init(byteBuffer: ByteBuffer(bytes: openAPIDocument)))
        }
        on(.get, "/healthz") { _, _ in json(["status": "ok"]) }
        on(.get, "/readyz") { _, _ in
            do {
                _ = try await store.pool.withConnection { c in try await c.query("SELECT 1") }
                return json(["status": "ready"])
            } catch {
                throw Problem(.serviceUnavailable, "not ready", "the database is unreachable")
            }
        }
        on(.post, "/v1/tasks") { request, context in
            let who = try context.require(.submitter)
            var task = try TaskSpec.decode(try await body(request, context), now: Date())
            if who.namespace != "*" {
                guard task.namespace == "default" || task.namespace == who.namespace else {
                    throw Problem(.badRequest, "invalid request", "this key creates tasks in namespace '\(who.namespace)' only",
                                  field: "namespace", value: task.namespace)
                }
                task.namespace = who.namespace
            }
            do {
                try await store.createTasks([task])
            } catch let e as PostgresError where e.sqlState == "23505" {
                throw Problem(.conflict, "task exists", "a task named '\(task.name)' exists in namespace '\(task.namespace)'; PATCH it or pick another name",
                              field: "name", value: task.name)
            }
            let created = try await store.task(named: task.name, namespace: task.namespace)
            return json(created.map(view) ?? .null, status: .created)
        }
        on(.get, "/v1/tasks") { request, context in
            let who = try context.require(.viewer)
            let limitText = request.uri.queryParameters.get("limit") ?? "\(defaultPage)"
            guard let limit = Int(limitText), (1...maxPage).contains(limit) else {
                throw Problem(.badRequest, "invalid request", "a whole number from 1 to \(maxPage)", field: "limit", value: limitText)
            }
            let cursor = request.uri.queryParameters.get("cursor")
            let namespace = who.namespace == "*" ? request.uri.queryParameters.get("namespace") : who.namespace
            let page = try await store.tasks(namespace: namespace, after: cursor, limit: limit + 1)
            var out: [String: JSONValue] = ["tasks": .array(page.prefix(limit).map(view))]
            if page.count > limit, let last = page.prefix(limit).last { out["next_cursor"] = .string(last.name) }
            return json(.object(out))
        }
        on(.get, "/v1/tasks/:name") { request, context in
            let who = try context.require(.viewer)
            let task = try await findTask(request, context, who, store)
            var v = view(task)
            if case .object(var o) = v {
                o["recent_runs"] = .array(try await store.runs(taskID: task.id, limit: 10).map(view))
                v = .object(o)
            }
            return json(v)
        }
        on(.post, "/v1/tasks/:name/trigger") { request, context in
            let who = try context.require(.submitter)
            let task = try await findTask(request, context, who, store)
            try await store.trigger(taskID: task.id)
            return json(["task": .string(task.name), "triggered": true], status: .accepted)
        }
        for (action, paused) in [("pause", true), ("resume", false)] {
            on(.post, "/v1/tasks/:name/\(action)") { request, context in
                let who = try context.require(.operator)
                let task = try await findTask(request, context, who, store)
                _ = try await store.setPaused(paused, names: [task.name], namespace: namespaceOf(who, request))
                return json(["task": .string(task.name), "paused": .bool(paused)])
            }
        }
        on(.delete, "/v1/tasks/:name") { request, context in
            let who = try context.require(.operator)
            let task = try await findTask(request, context, who, store)
            _ = try await store.deleteTask(named: task.name, namespace: namespaceOf(who, request))
            return json(["task": .string(task.name), "deleted": true])
        }
        on(.get, "/v1/runs") { request, context in
            let who = try context.require(.viewer)
            let q = request.uri.queryParameters
            var f = Store.RunFilter()
            f.namespace = who.namespace == "*" ? q.get("namespace") : who.namespace
            if let name = q.get("task") {
                guard let task = try await store.task(named: name, namespace: namespaceOf(who, request)) else {
                    throw Problem(.notFound, "not found", "no task named '\(name)'", field: "task", value: name)
                }
                f.taskID = task.id
            }
            if let text = q.get("state") {
                guard let state = RunState(rawValue: text) else {
                    throw Problem(.badRequest, "invalid request", "one of \(RunState.allCases.map(\.rawValue).joined(separator: ", "))", field: "state", value: text)
                }
                f.state = state
            }
            for (key, keyPath) in [("since", \Store.RunFilter.since), ("until", \Store.RunFilter.until)] {
                if let text = q.get(key) {
                    guard let d = Timestamp.parse(text) else {
                        throw Problem(.badRequest, "invalid request", "an ISO-8601 instant such as 2026-11-23T10:00:00Z", field: key, value: text)
                    }
                    f[keyPath: keyPath] = d
                }
            }
            let limitText = q.get("limit") ?? "\(defaultPage)"
            guard let limit = Int(limitText), (1...maxPage).contains(limit) else {
                throw Problem(.badRequest, "invalid request", "a whole number from 1 to \(maxPage)", field: "limit", value: limitText)
            }
            if let cursor = q.get("cursor") {
                let parts = cursor.split(separator: "_", maxSplits: 1).map(String.init)
                guard parts.count == 2, let d = Timestamp.parse(parts[0]), let id = UUID(uuidString: parts[1]) else {
                    throw Problem(.badRequest, "invalid request", "pass the next_cursor of the previous page unchanged", field: "cursor", value: cursor)
                }
                f.after = (d, id)
            }
            let page = try await store.runs(f, limit: limit + 1)
            var out: [String: JSONValue] = ["runs": .array(page.prefix(limit).map(view))]
            if page.count > limit, let last = page.prefix(limit).last {
                out["next_cursor"] = .string(Timestamp.format(last.occurrence) + "_" + last.id.uuidString.lowercased())
            }
            return json(.object(out))
        }
        on(.get, "/v1/runs/:id") { request, context in
            let who = try context.require(.viewer)
            return json(view(try await findRun(context, who, store)))
        }
        on(.post, "/v1/runs/:id/cancel") { request, context in
            let who = try context.require(.operator)
            let run = try await findRun(context, who, store)
            guard try await !store.cancel(runs: [run.id], reason: "cancelled through the API by key \(who.keyPrefix)").isEmpty else {
                throw Problem(.conflict, "run already ended", "run \(run.id.uuidString.lowercased()) ended \(run.state.rawValue); only a run that has not ended can be cancelled")
            }
            return json(["run_id": .string(run.id.uuidString.lowercased()), "state": "cancelled"])
        }
        on(.post, "/v1/runs/:id/redrive") { request, context in
            let who = try context.require(.operator)
            let run = try await findRun(context, who, store)
            do {
                let next = try await store.redrive(run: run.id)
                return json(["run_id": .string(next.uuidString.lowercased()), "attempt": .number(Double(run.attempt + 1))], status: .created)
            } catch let v as ValidationError {
                throw Problem(.conflict, "cannot re-drive", v.hint, field: "id", value: v.value)
            }
        }
        on(.get, "/v1/workers") { _, context in
            _ = try context.require(.viewer)
            let workers = try await store.workers()
            return json(["workers": .array(workers.map { w in
                .object(["id": .string(w.id), "host": .string(w.host), "state": .string(w.state), "concurrency": .number(Double(w.concurrency)),
                         "in_flight": .number(Double(w.inFlight)), "queues": .array(w.queues.map(JSONValue.string)),
                         "executors": .array(w.executors.map(JSONValue.string)), "seconds_since_heartbeat": .number(w.secondsSinceHeartbeat)])
            })])
        }
        return (router, routes)
    }

    /// `openapi.yaml`, as shipped in the module's resources.
    public static let openAPIDocument: [UInt8] = {
        guard let url = Bundle.module.url(forResource: "openapi", withExtension: "yaml"), let data = try? Data(contentsOf: url) else {
            return Array("openapi.yaml is missing from the ConveyorAPI bundle\n".utf8)
        }
        return Array(data)
    }()

    /// The task named in the path, in the caller's namespace; another namespace's task is 404,
    /// never 403, so a key cannot learn what other tenants have.
    static func findTask(_ request: Request, _ context: APIContext, _ who: Identity, _ store: Store) async throws -> TaskRecord {
        let name = context.parameters.get("name") ?? ""
        guard let task = try await store.task(named: name, namespace: namespaceOf(who, request)) else {
            throw Problem(.notFound, "not found", "no task named '\(name)'")
        }
        return task
    }

    /// The run named in the path, if its task is in the caller's namespace (404 otherwise).
    static func findRun(_ context: APIContext, _ who: Identity, _ store: Store) async throws -> RunRecord {
        let text = context.parameters.get("id") ?? ""
        guard let id = UUID(uuidString: text) else { throw Problem(.badRequest, "invalid request", "a run id is a UUID", field: "id", value: text) }
        guard let run = try await store.run(id: id), let ns = try await store.namespace(ofTask: run.taskID), who.sees(namespace: ns) else {
            throw Problem(.notFound, "not found", "no run \(text)")
        }
        return run
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
            throw Problem(.contentTooLarge, "request body too large", "bodies are limited to \(maxBodyBytes) bytes", field: "body")
        }
        let bytes = Array(buffer.readableBytesView)
        try checkDepth(bytes)
        do {
            return try JSONDecoder().decode(JSONValue.self, from: Data(bytes))
        } catch {
            throw Problem(.badRequest, "invalid request", "the body is not valid JSON", field: "body")
        }
    }

    /// Refuses JSON nested deeper than `maxDepth` before a decoder recurses into it.
    static func checkDepth(_ bytes: [UInt8]) throws(Problem) {
        var depth = 0, inString = false, escaped = false
        for b in bytes {
            if inString {
                if escaped { escaped = false } else if b == UInt8(ascii: "\\") { escaped = true } else if b == UInt8(ascii: "\"") { inString = false }
                continue
            }
            switch b {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                depth += 1
                if depth > maxDepth { throw Problem(.badRequest, "invalid request", "JSON may nest at most \(maxDepth) levels", field: "body") }
            case UInt8(ascii: "}"), UInt8(ascii: "]"): depth -= 1
            default: break
            }
        }
    }

    static func json(_ value: JSONValue, status: HTTPResponse.Status = .ok) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: value.jsonBytes)))
    }

    static func view(_ t: TaskRecord) -> JSONValue {
        var o: [String: JSONValue] = [
            "id": .string(t.id.uuidString.lowercased()), "name": .string(t.name), "executor": .string(t.executor),
            "schedule": .string(t.schedule), "timezone": .string(t.timeZone), "queue": .string(t.queue),
            "priority": .string("\(t.priority)"), "timeout": .number(t.timeoutSeconds), "paused": .bool(t.paused),
            "max_attempts": .number(Double(t.maxAttempts)),
        ]
        o["parameters"] = (try? JSONDecoder().decode(JSONValue.self, from: Data(t.parameters.utf8))) ?? .null
        if let n = t.nextRunAt { o["next_run_at"] = .string(Timestamp.format(n)) }
        if let g = t.group { o["group"] = .string(g) }
        if !t.dependsOn.isEmpty { o["depends_on"] = .array(t.dependsOn.map(JSONValue.string)) }
        return .object(o)
    }

    static func view(_ r: RunRecord) -> JSONValue {
        var o: [String: JSONValue] = [
            "id": .string(r.id.uuidString.lowercased()), "task_id": .string(r.taskID.uuidString.lowercased()),
            "occurrence": .string(Timestamp.format(r.occurrence)), "attempt": .number(Double(r.attempt)), "state": .string(r.state.rawValue),
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
        return .object(o)
    }
}
