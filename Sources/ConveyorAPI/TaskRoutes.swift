import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import ConveyorTelemetry
import Foundation
import HTTPTypes
import Hummingbird
import Tracing

extension HTTPField.Name {
    static let batchID = HTTPField.Name("X-Batch-ID")!
}

extension APIServer {
    /// Most tasks in one POST.
    public static let maxBatch = 1000
    /// The role that pauses and resumes a task, by whichever route (PATCH `paused`, POST
    /// `…/pause`, `…/resume`).
    static let pauseRole = Role.operator

    /// Tasks and templates.
    static func taskRoutes(_ r: inout Routes, _ env: APIEnvironment) {
        let store = env.store
        r.on(.post, "/v1/tasks") { request, context in
            let who = try context.require(.submitter)
            let body = try await body(request, context)
            // A list, or {"tasks": [...]}, is a batch; anything else one task. Both decode as a task file does.
            let batch = TaskSpec.list(in: body)
            if let batch, !(1...maxBatch).contains(batch.count) {
                throw Problem(
                    .badRequest, "invalid request", "a batch holds 1 to \(maxBatch) tasks; split larger files", field: "tasks", value: "\(batch.count) tasks")
            }
            var tasks = try TaskSpec.decodeFile(body, now: Date())
            guard batch != nil else {
                guard let task = try await create(tasks, who, env).first else {
                    throw Problem(.badRequest, "invalid request", "one task, a list of tasks, or {\"tasks\": [...]}", field: "body")
                }
                await env.audit(context, who, "task.create", task.name, namespace: task.namespace)
                return json(try await store.task(named: task.name, namespace: task.namespace).map(view) ?? .null, status: .created)
            }
            let batchID = UUID()
            for i in tasks.indices { tasks[i].batchID = batchID }
            tasks = try await create(tasks, who, env)
            await env.audit(
                context, who, "task.create_batch", batchID.lowercasedString, namespace: tasks[0].namespace,
                ["count": .number(Double(tasks.count))])
            var response = json(
                [
                    "batch_id": .string(batchID.lowercasedString), "count": .number(Double(tasks.count)),
                    "tasks": .array(tasks.map { .object(["id": .string($0.id.lowercasedString), "name": .string($0.name)]) }),
                ],
                status: .created)
            response.headers[.batchID] = batchID.lowercasedString
            return response
        }
        r.on(.get, "/v1/tasks") { request, context in
            let who = try context.require(.viewer)
            let q = request.uri.queryParameters
            let limit = try pageLimit(request, env)
            var f = Store.TaskFilter()
            f.namespace = listScope(who, request)
            if let text = q.get("state") {
                guard let state = RunState(rawValue: text) else {
                    throw Problem(
                        .badRequest, "invalid request",
                        "the state of the task's latest run: one of \(RunState.allCases.map(\.rawValue).joined(separator: ", "))",
                        field: "state", value: text)
                }
                f.state = state
            }
            f.queue = q.get("queue")
            f.group = q.get("group")
            f.prefix = q.get("prefix")
            f.after = q.get("cursor")
            if let label = q.get("label") {
                let parts = label.split(separator: "=", maxSplits: 1).map(String.init)
                guard let key = parts.first, !key.isEmpty else {
                    throw Problem(.badRequest, "invalid request", "key or key=value, e.g. label=team=data", field: "label", value: label)
                }
                f.label = (key, parts.count == 2 ? parts[1] : nil)
            }
            if let text = q.get("batch_id") {
                guard let id = UUID(uuidString: text) else {
                    throw Problem(.badRequest, "invalid request", "the X-Batch-ID a batch POST returned (a UUID)", field: "batch_id", value: text)
                }
                f.batchID = id
            }
            if let text = q.get("paused") {
                guard let b = Bool(text) else { throw Problem(.badRequest, "invalid request", "true or false", field: "paused", value: text) }
                f.paused = b
            }
            let page = try await store.tasks(f, limit: limit + 1)
            var out: [String: JSONValue] = [
                "tasks": .array(
                    page.prefix(limit).map { t, last in
                        var o = view(t).objectValue ?? [:]
                        o["last_run"] = last.map(view)
                        return .object(o)
                    })
            ]
            if page.count > limit, let last = page.prefix(limit).last { out["next_cursor"] = .string(last.task.name) }
            return json(.object(out))
        }
        r.on(.get, "/v1/tasks/:name") { request, context in
            let who = try context.require(.viewer)
            let task = try await findTask(request, context, who, store)
            var o = view(task).objectValue ?? [:]
            // Two statements for the task and its runs, whatever the number of runs.
            let runs = try await store.runs(taskID: task.id, limit: 10)
            o["recent_runs"] = .array(runs.map(view))
            o["last_run"] = runs.first.map(view)
            return json(.object(o))
        }
        r.on(.patch, "/v1/tasks/:name") { request, context in
            var who = try context.require(.submitter)
            let patch = try await body(request, context)
            let task = try await findTask(request, context, who, store)
            guard let fields = patch.objectValue else {
                throw Problem(.badRequest, "invalid request", "a JSON merge patch: an object whose absent fields stay, null clears a field", field: "body")
            }
            // Pausing or resuming needs the same role by every route (POST …/pause, …/resume).
            if fields["paused"] != nil { who = try context.require(pauseRole) }
            for key in ["name", "namespace"] where fields[key] != nil && fields[key] != .string(key == "name" ? task.name : task.namespace) {
                throw Problem(
                    .badRequest, "invalid request", "the \(key) of a task cannot change; create a new task and delete this one", field: key,
                    value: "\(fields[key]!)")
            }
            if let d = fields["depends_on"], d != .array(task.dependsOn.map(JSONValue.string)) {
                throw Problem(
                    .badRequest, "invalid request", "dependencies cannot change in place; delete and recreate the task with the new depends_on",
                    field: "depends_on", value: "\(d)")
            }
            for key in ["start", "after"] where fields[key] != nil {
                throw Problem(
                    .badRequest, "invalid request", "start and after place a new task's first run; to run now use POST /v1/tasks/{name}/trigger", field: key,
                    value: "\(fields[key]!)")
            }
            let current = (try? JSONDecoder().decode(JSONValue.self, from: Data(task.spec.utf8))) ?? .object([:])
            // The name is the path's (checked above to be unchanged).
            var changes = fields.filter { $0.key != "paused" }
            changes["name"] = .string(task.name)
            var updated = try TaskSpec.decode(TaskSpec.merge(.object(changes), into: current), now: Date())
            updated.namespace = task.namespace
            var paused: Bool?
            if let p = fields["paused"], p != .null {
                guard case .bool(let b) = p else { throw Problem(.badRequest, "invalid request", "true or false", field: "paused", value: "\(p)") }
                paused = b
            }
            let reschedule = ["schedule", "timezone"].contains { fields[$0] != nil }
            guard try await store.updateTask(id: task.id, updated, reschedule: reschedule, paused: paused) else {
                throw Problem(.notFound, "not found", "no task named '\(task.name)'")
            }
            await env.audit(context, who, "task.update", task.name, namespace: task.namespace, ["fields": .array(fields.keys.sorted().map(JSONValue.string))])
            return json(try await store.task(named: task.name, namespace: task.namespace).map(view) ?? .null)
        }
        r.on(.post, "/v1/tasks/:name/trigger") { request, context in
            let who = try context.require(.submitter)
            let task = try await findTask(request, context, who, store)
            try submitLimit(env, who, priorities: [task.priority])
            let trace = Traces.headers(ServiceContext.current ?? .topLevel)
            try await store.trigger(taskID: task.id, traceParent: trace["traceparent"], baggage: trace["baggage"])
            await env.audit(context, who, "task.trigger", task.name, namespace: task.namespace)
            return json(["task": .string(task.name), "triggered": true], status: .accepted)
        }
        for (action, paused) in [("pause", true), ("resume", false)] {
            r.on(.post, "/v1/tasks/:name/\(action)") { request, context in
                let who = try context.require(pauseRole)
                let task = try await findTask(request, context, who, store)
                _ = try await store.setPaused(paused, names: [task.name], namespace: task.namespace)
                await env.audit(context, who, "task.\(action)", task.name, namespace: task.namespace)
                return json(["task": .string(task.name), "paused": .bool(paused)])
            }
        }
        r.on(.delete, "/v1/tasks/:name") { request, context in
            let purge = request.uri.queryParameters.get("purge") == "true"
            let who = try context.require(purge ? .admin : .operator)
            let task = try await findTask(request, context, who, store)
            guard purge else {
                _ = try await store.deleteTask(named: task.name, namespace: task.namespace)
                await env.audit(context, who, "task.delete", task.name, namespace: task.namespace)
                return json(["task": .string(task.name), "deleted": true])
            }
            do {
                let runs = try await store.purgeTask(id: task.id) ?? 0
                await env.audit(context, who, "task.purge", task.name, namespace: task.namespace, ["runs": .number(Double(runs))])
                return json(["task": .string(task.name), "deleted": true, "purged_runs": .number(Double(runs))])
            } catch let v as ValidationError {
                throw Problem(.conflict, "cannot purge", v.hint, field: "name", value: v.value)
            }
        }

        // Templates: a task body with {{placeholders}}, filled in per task.
        r.on(.put, "/v1/templates/:name") { request, context in
            let who = try context.require(.operator)
            let name = context.parameters.get("name") ?? ""
            let namespace = namespaceOf(who, request)
            let body = try await body(request, context)
            guard let o = body.objectValue, let task = o["task"], task.objectValue != nil, Set(o.keys).isSubset(of: ["task", "parameters"]) else {
                throw Problem(
                    .badRequest, "invalid request", "a template is {\"task\": {...a task body with {{placeholders}}...}, \"parameters\": [\"names\"]}",
                    field: "body")
            }
            let declared = try (o["parameters"]?.arrayValue ?? []).map { p throws(Problem) -> String in
                guard let s = p.stringValue, TemplateFill.isName(s) else {
                    throw Problem(.badRequest, "invalid request", "parameter names are letters, digits and '_'", field: "parameters", value: "\(p)")
                }
                return s
            }
            let used = TemplateFill.placeholders(in: task)
            if let undeclared = used.subtracting(declared).sorted().first {
                throw Problem(.badRequest, "invalid request", "the task uses {{\(undeclared)}}; list it in parameters", field: "parameters", value: undeclared)
            }
            guard !name.isEmpty, name.count <= 200 else { throw Problem(.badRequest, "invalid request", "1 to 200 characters", field: "name", value: name) }
            // Fields are checked now; values when a task is made from it (errors then name the field).
            if let unknown = task.objectValue!.keys.sorted().first(where: { !TaskSpec.keys.contains($0) }) {
                throw Problem(
                    .badRequest, "invalid request", "unknown task field; known fields are \(TaskSpec.keys.sorted().joined(separator: ", "))",
                    field: "task.\(unknown)", value: "\(task[unknown]!)")
            }
            try await store.putTemplate(Store.TemplateRecord(namespace: namespace, name: name, body: task, parameters: declared))
            await env.audit(context, who, "template.put", name, namespace: namespace)
            return json(["name": .string(name), "namespace": .string(namespace), "parameters": .array(declared.map(JSONValue.string)), "task": task])
        }
        r.on(.get, "/v1/templates") { request, context in
            let who = try context.require(.viewer)
            let list = try await store.templates(namespace: listScope(who, request))
            return json([
                "templates": .array(
                    list.map { t in
                        .object([
                            "name": .string(t.name), "namespace": .string(t.namespace), "parameters": .array(t.parameters.map(JSONValue.string)),
                            "task": t.body,
                        ])
                    })
            ])
        }
        r.on(.post, "/v1/templates/:name/tasks") { request, context in
            let who = try context.require(.submitter)
            let name = context.parameters.get("name") ?? ""
            let namespace = namespaceOf(who, request)
            guard let template = try await store.template(named: name, namespace: namespace) else {
                throw Problem(.notFound, "not found", "no template named '\(name)'")
            }
            let body = try await body(request, context)
            guard let o = body.objectValue, let taskName = o["name"]?.stringValue, Set(o.keys).isSubset(of: ["name", "values"]) else {
                throw Problem(.badRequest, "invalid request", "send {\"name\": \"new-task\", \"values\": {\"param\": ...}}", field: "body")
            }
            let values = o["values"]?.objectValue ?? [:]
            if let missing = template.parameters.first(where: { values[$0] == nil }) {
                throw Problem(
                    .badRequest, "invalid request", "template '\(name)' needs a value for every parameter: \(template.parameters.joined(separator: ", "))",
                    field: "values.\(missing)", value: "(missing)")
            }
            if let unknown = values.keys.sorted().first(where: { !template.parameters.contains($0) }) {
                throw Problem(
                    .badRequest, "invalid request", "template '\(name)' has no parameter '\(unknown)'; it takes \(template.parameters.joined(separator: ", "))",
                    field: "values.\(unknown)", value: "\(values[unknown]!)")
            }
            guard case .object(var filled) = try TemplateFill.fill(template.body, values) else {
                throw Problem(.internalServerError, "template broken", "template '\(name)' is not an object")
            }
            filled["name"] = .string(taskName)
            filled["namespace"] = .string(namespace)
            _ = try await create([try TaskSpec.decode(.object(filled), now: Date())], who, env)
            await env.audit(context, who, "task.create", taskName, namespace: namespace, ["template": .string(name)])
            return json(try await store.task(named: taskName, namespace: namespace).map(view) ?? .null, status: .created)
        }
    }

    /// Creates tasks in the namespace `placement` gives, within the caller's submission limits;
    /// a name that exists is 409, naming it. Returns the tasks as created.
    static func create(_ tasks: [NewTask], _ who: Identity, _ env: APIEnvironment) async throws -> [NewTask] {
        var tasks = tasks
        let namespace = try placement(tasks, who)
        // The request's span is the parent of each task's first dispatch span.
        let trace = Traces.headers(ServiceContext.current ?? .topLevel)
        for i in tasks.indices {
            tasks[i].namespace = namespace
            tasks[i].traceParent = trace["traceparent"]
            tasks[i].traceBaggage = trace["baggage"]
        }
        try submitLimit(env, who, priorities: Set(tasks.map(\.priority)))
        do {
            try await env.store.createTasks(tasks)
        } catch let e as StoreError where e.kind == .taskExists {
            let names = tasks.map(\.name)
            let existing = try await env.store.tasks(Store.TaskFilter.named(names, namespace: namespace), limit: names.count).map(\.task.name)
            let name = existing.first ?? names[0]
            throw Problem(
                .conflict, "task exists", "a task named '\(name)' exists in namespace '\(namespace)'; PATCH it or pick another name",
                field: "name", value: name)
        }
        return tasks
    }

    /// The namespace new tasks go to: the key's own (a body naming another is refused), or for
    /// an every-namespace admin the body's (default `default`).
    static func placement(_ tasks: [NewTask], _ who: Identity) throws(Problem) -> String {
        let asked = Set(tasks.map(\.namespace))
        if who.namespace == "*" {
            guard asked.count == 1 else {
                throw Problem(
                    .badRequest, "invalid request", "one batch goes to one namespace", field: "namespace", value: asked.sorted().joined(separator: ","))
            }
            return asked.first!
        }
        if let other = asked.first(where: { $0 != "default" && $0 != who.namespace }) {
            throw Problem(.badRequest, "invalid request", "this key creates tasks in namespace '\(who.namespace)' only", field: "namespace", value: other)
        }
        return who.namespace
    }

    /// One submission per priority against the key's per-priority buckets (429 when empty).
    static func submitLimit(_ env: APIEnvironment, _ who: Identity, priorities: Set<Priority>) throws(Problem) {
        for p in priorities.sorted(by: { $0.rawValue < $1.rawValue }) {
            guard let limit = env.options.submitByPriority[p] else { continue }
            if let wait = env.limiter.take("submit:\(p.name):" + who.keyPrefix, limit) {
                throw AuthMiddleware.tooMany(wait, "this key submitted \(p.name)-priority work faster than \(limit.rate) per second")
            }
        }
    }
}

extension Store.TaskFilter {
    /// The tasks of `namespace` among `names` (for naming the one that already exists).
    static func named(_ names: [String], namespace: String) -> Self {
        var f = Self()
        f.namespace = namespace
        f.names = names
        return f
    }
}

/// `{{name}}` placeholders in template bodies: a string that is exactly one placeholder takes
/// the value as is (a number stays a number); inside longer text the value is written as text.
enum TemplateFill {
    static func isName(_ s: String) -> Bool {
        !s.isEmpty && s.count <= 64 && s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }
    }

    static func placeholders(in value: JSONValue) -> Set<String> {
        switch value {
        case .string(let s): return Set(tokens(s).map(\.name))
        case .array(let a): return a.reduce(into: []) { $0.formUnion(placeholders(in: $1)) }
        case .object(let o): return o.values.reduce(into: []) { $0.formUnion(placeholders(in: $1)) }
        default: return []
        }
    }

    static func fill(_ value: JSONValue, _ values: [String: JSONValue]) throws(Problem) -> JSONValue {
        switch value {
        case .string(let s):
            let found = tokens(s)
            if found.count == 1, found[0].range == s.startIndex..<s.endIndex, let v = values[found[0].name] { return v }
            var out = s
            for t in found.reversed() {
                guard let v = values[t.name] else { continue }
                let text: String =
                    switch v {
                    case .string(let x): x
                    case .number(let n): n.rounded() == n && abs(n) < 1e15 ? String(Int(n)) : String(n)
                    case .bool(let b): String(b)
                    default:
                        throw Problem(
                            .badRequest, "invalid request", "{{\(t.name)}} sits inside text; give it text, a number or a boolean", field: "values.\(t.name)",
                            value: "\(v)")
                    }
                out.replaceSubrange(t.range, with: text)
            }
            return .string(out)
        case .array(let a):
            var out: [JSONValue] = []
            for v in a { out.append(try fill(v, values)) }
            return .array(out)
        case .object(let o):
            var out: [String: JSONValue] = [:]
            for (k, v) in o { out[k] = try fill(v, values) }
            return .object(out)
        default: return value
        }
    }

    static func tokens(_ s: String) -> [(name: String, range: Range<String.Index>)] {
        var out: [(String, Range<String.Index>)] = []
        var rest = s.startIndex..<s.endIndex
        while let open = s.range(of: "{{", range: rest), let close = s.range(of: "}}", range: open.upperBound..<s.endIndex) {
            let name = s[open.upperBound..<close.lowerBound].trimmingCharacters(in: .whitespaces)
            if isName(name) { out.append((name, open.lowerBound..<close.upperBound)) }
            rest = close.upperBound..<s.endIndex
        }
        return out
    }
}
