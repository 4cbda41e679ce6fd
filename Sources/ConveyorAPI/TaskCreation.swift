import ConveyorCore
import ConveyorStore
import ConveyorTelemetry
import Foundation
import Hummingbird
import Tracing

extension APIServer {
    /// Creates tasks in the namespace `placement` gives, within the caller's submission limits;
    /// a name that exists is 409, naming it. Returns the tasks as placed, and those not created
    /// because another task holds their uniqueness key, by index, with the holder.
    static func create(_ tasks: [NewTask], _ who: Identity, _ env: APIEnvironment) async throws -> (
        tasks: [NewTask], held: [Int: Store.Holder]
    ) {
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
        let held: [Int: Store.Holder]
        do {
            held = try await env.store.createTasks(tasks)
        } catch let e as StoreError where e.kind == .taskExists {
            let names = tasks.map(\.name)
            let existing = try await env.store.tasks(
                Store.TaskFilter.named(names, namespace: namespace), limit: names.count
            ).map(\.task.name)
            let name = existing.first ?? names[0]
            throw Problem(
                .conflict, "task exists",
                "a task named '\(name)' exists in namespace '\(namespace)'; PATCH it or pick another name",
                field: "name", value: name)
        }
        return (tasks, held)
    }

    /// A task not created because `holder` holds its uniqueness key: the holder, marked
    /// `deduplicated` (200, not 201: nothing was created).
    static func deduplicated(_ holder: Store.Holder, namespace: String, _ env: APIEnvironment) async throws -> JSONValue
    {
        var o =
            try await env.store.task(named: holder.name, namespace: namespace).map(view)?.objectValue ?? [
                "id": .string(holder.id.lowercasedString), "name": .string(holder.name),
            ]
        o["deduplicated"] = true
        return .object(o)
    }

    /// The namespace new tasks go to: the key's own (a body naming another is refused), or for
    /// an every-namespace admin the body's (default `default`).
    static func placement(_ tasks: [NewTask], _ who: Identity) throws(Problem) -> String {
        let asked = Set(tasks.map(\.namespace))
        if who.namespace == "*" {
            guard asked.count == 1 else {
                throw Problem(
                    .badRequest, "invalid request", "one batch goes to one namespace", field: "namespace",
                    value: asked.sorted().joined(separator: ","))
            }
            return asked.first!
        }
        if let other = asked.first(where: { $0 != "default" && $0 != who.namespace }) {
            throw Problem(
                .badRequest, "invalid request", "this key creates tasks in namespace '\(who.namespace)' only",
                field: "namespace", value: other)
        }
        return who.namespace
    }

    /// One submission per priority against the key's per-priority buckets (429 when empty).
    static func submitLimit(_ env: APIEnvironment, _ who: Identity, priorities: Set<Priority>) throws(Problem) {
        for p in priorities.sorted(by: { $0.rawValue < $1.rawValue }) {
            guard let limit = env.options.submitByPriority[p] else { continue }
            if let wait = env.limiter.take("submit:\(p.name):" + who.keyPrefix, limit, now: env.clock.now()) {
                throw AuthMiddleware.tooMany(
                    wait, "this key submitted \(p.name)-priority work faster than \(limit.rate) per second")
            }
        }
    }
}
