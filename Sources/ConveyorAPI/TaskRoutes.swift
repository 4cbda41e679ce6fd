import ConveyorCore
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
    package static let maxBatch = 1000
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
            let batch = body.taskBatch
            if let batch, !(1...maxBatch).contains(batch.count) {
                throw Problem(
                    .badRequest, "invalid request", "a batch holds 1 to \(maxBatch) tasks; split larger files",
                    field: "tasks", value: "\(batch.count) tasks")
            }
            var tasks = try TaskSpec.decodeFile(body, now: Date())
            return try await idempotent(request, who, env, route: "POST /v1/tasks", fingerprint: body) {
                guard batch != nil else {
                    let made = try await create(tasks, who, env)
                    guard let task = made.tasks.first else {
                        throw Problem(
                            .badRequest, "invalid request", "one task, a list of tasks, or {\"tasks\": [...]}",
                            field: "body")
                    }
                    if let holder = made.held[0] {
                        return Answer(status: .ok, body: try await deduplicated(holder, namespace: task.namespace, env))
                    }
                    await env.audit(context, who, "task.create", task.name, namespace: task.namespace)
                    return Answer(
                        status: .created,
                        body: try await store.task(named: task.name, namespace: task.namespace).map(view) ?? .null)
                }
                let batchID = UUID()
                for i in tasks.indices { tasks[i].batchID = batchID }
                let made = try await create(tasks, who, env)
                tasks = made.tasks
                let count = tasks.count - made.held.count
                await env.audit(
                    context, who, "task.create_batch", batchID.lowercasedString, namespace: tasks[0].namespace,
                    ["count": .number(Double(count)), "deduplicated": .number(Double(made.held.count))])
                return Answer(
                    status: .created,
                    body: [
                        "batch_id": .string(batchID.lowercasedString), "count": .number(Double(count)),
                        "deduplicated": .number(Double(made.held.count)),
                        "tasks": .array(
                            tasks.enumerated().map { i, t in
                                guard let h = made.held[i] else {
                                    return .object(["id": .string(t.id.lowercasedString), "name": .string(t.name)])
                                }
                                return .object([
                                    "id": .string(h.id.lowercasedString), "name": .string(h.name),
                                    "deduplicated": true,
                                ])
                            }),
                    ], batchID: batchID.lowercasedString)
            }
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
                        """
                        the state of the task's latest run: one of \
                        \(RunState.allCases.map(\.rawValue).joined(separator: ", "))
                        """,
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
                    throw Problem(
                        .badRequest, "invalid request", "key or key=value, e.g. label=team=data", field: "label",
                        value: label)
                }
                f.label = (key, parts.count == 2 ? parts[1] : nil)
            }
            if let text = q.get("batch_id") {
                guard let id = UUID(uuidString: text) else {
                    throw Problem(
                        .badRequest, "invalid request", "the X-Batch-ID a batch POST returned (a UUID)",
                        field: "batch_id", value: text)
                }
                f.batchID = id
            }
            if let text = q.get("paused") {
                guard let b = Bool(text) else {
                    throw Problem(.badRequest, "invalid request", "true or false", field: "paused", value: text)
                }
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
                throw Problem(
                    .badRequest, "invalid request",
                    "a JSON merge patch: an object whose absent fields stay, null clears a field", field: "body")
            }
            // Pausing or resuming needs the same role by every route (POST …/pause, …/resume).
            if fields["paused"] != nil { who = try context.require(pauseRole) }
            for key in ["name", "namespace"]
            where fields[key] != nil && fields[key] != .string(key == "name" ? task.name : task.namespace) {
                throw Problem(
                    .badRequest, "invalid request",
                    "the \(key) of a task cannot change; create a new task and delete this one", field: key,
                    value: "\(fields[key]!)")
            }
            let current = (try? JSONDecoder().decode(JSONValue.self, from: Data(task.spec.utf8))) ?? .object([:])
            if let u = fields["unique"], u != (current["unique"] ?? .null) {
                throw Problem(
                    .badRequest, "invalid request",
                    "a task's uniqueness key cannot change in place; create a new task with the new unique",
                    field: "unique", value: "\(u)")
            }
            if let d = fields["depends_on"], d != .array(task.dependsOn.map(JSONValue.string)) {
                throw Problem(
                    .badRequest, "invalid request",
                    "dependencies cannot change in place; delete and recreate the task with the new depends_on",
                    field: "depends_on", value: "\(d)")
            }
            for key in ["start", "after"] where fields[key] != nil {
                throw Problem(
                    .badRequest, "invalid request",
                    "start and after place a new task's first run; to run now use POST /v1/tasks/{name}/trigger",
                    field: key,
                    value: "\(fields[key]!)")
            }
            // The name is the path's (checked above to be unchanged).
            var changes = fields.filter { $0.key != "paused" }
            changes["name"] = .string(task.name)
            var updated = try TaskSpec.decode(TaskSpec.merge(.object(changes), into: current), now: Date())
            updated.namespace = task.namespace
            var paused: Bool?
            if let p = fields["paused"], p != .null {
                guard case .bool(let b) = p else {
                    throw Problem(.badRequest, "invalid request", "true or false", field: "paused", value: "\(p)")
                }
                paused = b
            }
            let reschedule = ["schedule", "timezone"].contains { fields[$0] != nil }
            guard try await store.updateTask(id: task.id, updated, reschedule: reschedule, paused: paused) else {
                throw Problem(.notFound, "not found", "no task named '\(task.name)'")
            }
            await env.audit(
                context, who, "task.update", task.name, namespace: task.namespace,
                ["fields": .array(fields.keys.sorted().map(JSONValue.string))])
            return json(try await store.task(named: task.name, namespace: task.namespace).map(view) ?? .null)
        }
        r.on(.post, "/v1/tasks/:name/trigger") { request, context in
            let who = try context.require(.submitter)
            let task = try await findTask(request, context, who, store)
            try submitLimit(env, who, priorities: [task.priority])
            let trace = Traces.headers(ServiceContext.current ?? .topLevel)
            return try await idempotent(
                request, who, env, route: "POST /v1/tasks/\(task.name)/trigger", fingerprint: .string(task.namespace)
            ) {
                guard
                    let made = try await store.trigger(
                        taskID: task.id, traceParent: trace["traceparent"], baggage: trace["baggage"])
                else { throw Problem(.notFound, "not found", "no task named '\(task.name)'") }
                await env.audit(
                    context, who, "task.trigger", task.name, namespace: task.namespace,
                    ["run_id": .string(made.runID.lowercasedString)])
                return Answer(
                    status: .accepted,
                    body: [
                        "task": .string(task.name), "triggered": true, "run_id": .string(made.runID.lowercasedString),
                        "occurrence": .string(Timestamp.format(made.occurrence)),
                    ])
            }
        }
        r.on(.post, "/v1/tasks/:name/cancel") { request, context in
            let who = try context.require(.operator)
            let task = try await findTask(request, context, who, store)
            let cancelled = try await store.cancel(
                task: task.id, reason: "task cancelled through the API by \(who.keyPrefix)")
            await env.audit(
                context, who, "task.cancel", task.name, namespace: task.namespace,
                ["runs": .number(Double(cancelled.count))])
            return json(["task": .string(task.name), "runs_cancelled": .number(Double(cancelled.count))])
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
                await env.audit(
                    context, who, "task.purge", task.name, namespace: task.namespace, ["runs": .number(Double(runs))])
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
            guard let o = body.objectValue, let task = o["task"], task.objectValue != nil,
                Set(o.keys).isSubset(of: ["task", "parameters"])
            else {
                throw Problem(
                    .badRequest, "invalid request",
                    "a template is {\"task\": {...a task body with {{placeholders}}...}, \"parameters\": [\"names\"]}",
                    field: "body")
            }
            let declared = try (o["parameters"]?.arrayValue ?? []).map { p throws(Problem) -> String in
                guard let s = p.stringValue, TemplateFill.isName(s) else {
                    throw Problem(
                        .badRequest, "invalid request", "parameter names are letters, digits and '_'",
                        field: "parameters", value: "\(p)")
                }
                return s
            }
            let used = TemplateFill.placeholders(in: task)
            if let undeclared = used.subtracting(declared).sorted().first {
                throw Problem(
                    .badRequest, "invalid request", "the task uses {{\(undeclared)}}; list it in parameters",
                    field: "parameters", value: undeclared)
            }
            guard !name.isEmpty, name.count <= 200 else {
                throw Problem(.badRequest, "invalid request", "1 to 200 characters", field: "name", value: name)
            }
            // Fields are checked now; values when a task is made from it (errors then name the field).
            if let unknown = task.objectValue!.keys.sorted().first(where: { !TaskSpec.keys.contains($0) }) {
                throw Problem(
                    .badRequest, "invalid request",
                    "unknown task field; known fields are \(TaskSpec.keys.sorted().joined(separator: ", "))",
                    field: "task.\(unknown)", value: "\(task[unknown]!)")
            }
            try await store.putTemplate(
                Store.TemplateRecord(namespace: namespace, name: name, body: task, parameters: declared))
            await env.audit(context, who, "template.put", name, namespace: namespace)
            return json([
                "name": .string(name), "namespace": .string(namespace),
                "parameters": .array(declared.map(JSONValue.string)), "task": task,
            ])
        }
        r.on(.get, "/v1/templates") { request, context in
            let who = try context.require(.viewer)
            let list = try await store.templates(namespace: listScope(who, request))
            return json([
                "templates": .array(
                    list.map { t in
                        .object([
                            "name": .string(t.name), "namespace": .string(t.namespace),
                            "parameters": .array(t.parameters.map(JSONValue.string)),
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
            guard let o = body.objectValue, let taskName = o["name"]?.stringValue,
                Set(o.keys).isSubset(of: ["name", "values"])
            else {
                throw Problem(
                    .badRequest, "invalid request", "send {\"name\": \"new-task\", \"values\": {\"param\": ...}}",
                    field: "body")
            }
            let values = o["values"]?.objectValue ?? [:]
            if let missing = template.parameters.first(where: { values[$0] == nil }) {
                throw Problem(
                    .badRequest, "invalid request",
                    """
                    template '\(name)' needs a value for every parameter: \
                    \(template.parameters.joined(separator: ", "))
                    """,
                    field: "values.\(missing)", value: "(missing)")
            }
            if let unknown = values.keys.sorted().first(where: { !template.parameters.contains($0) }) {
                throw Problem(
                    .badRequest, "invalid request",
                    """
                    template '\(name)' has no parameter '\(unknown)'; it takes \
                    \(template.parameters.joined(separator: ", "))
                    """,
                    field: "values.\(unknown)", value: "\(values[unknown]!)")
            }
            guard case .object(var filled) = try TemplateFill.fill(template.body, values) else {
                throw Problem(.internalServerError, "template broken", "template '\(name)' is not an object")
            }
            filled["name"] = .string(taskName)
            filled["namespace"] = .string(namespace)
            let made = try await create([try TaskSpec.decode(.object(filled), now: Date())], who, env)
            if let holder = made.held[0] {
                return json(try await deduplicated(holder, namespace: namespace, env))
            }
            await env.audit(context, who, "task.create", taskName, namespace: namespace, ["template": .string(name)])
            return json(
                try await store.task(named: taskName, namespace: namespace).map(view) ?? .null, status: .created)
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
