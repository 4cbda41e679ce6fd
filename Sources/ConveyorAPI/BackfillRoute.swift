import ConveyorCore
import ConveyorStore
import ConveyorTelemetry
import Foundation
import Hummingbird
import Tracing

extension APIServer {
    /// `POST /v1/tasks/{name}/backfill`: a recurring task's past occurrences, run now (or listed,
    /// with `dry_run`).
    static func backfillRoutes(_ r: inout Routes, _ env: APIEnvironment) {
        r.on(.post, "/v1/tasks/:name/backfill") { request, context in
            let who = try context.require(.operator)
            let body = try await body(request, context)
            let task = try await findTask(request, context, who, env.store)
            guard let o = body.objectValue else {
                throw Problem(
                    .badRequest, "invalid request",
                    #"send {"from": "2026-11-01T00:00:00Z", "to": "2026-11-08T00:00:00Z"} (max_runs, priority, dry_run optional)"#,
                    field: "body")
            }
            let known = ["dry_run", "from", "max_runs", "overlap", "priority", "to"]
            if let unknown = o.keys.sorted().first(where: { !known.contains($0) }) {
                throw Problem(
                    .badRequest, "invalid request", "unknown field; known fields are \(known.joined(separator: ", "))",
                    field: unknown, value: "\(o[unknown]!)")
            }
            func instant(_ key: String) throws(Problem) -> Date {
                guard let text = o[key]?.stringValue, let d = Timestamp.parse(text) else {
                    throw Problem(
                        .badRequest, "invalid request", "an ISO-8601 instant such as 2026-11-01T00:00:00Z", field: key,
                        value: o[key].map { "\($0)" } ?? "(missing)")
                }
                return d
            }
            let from = try instant("from")
            let to = try instant("to")
            var maxRuns = 1000
            if let m = o["max_runs"], m != .null {
                guard let n = m.doubleValue, n.rounded() == n, (1...Double(Store.maxBackfill)).contains(n) else {
                    throw Problem(
                        .badRequest, "invalid request", "a whole number from 1 to \(Store.maxBackfill)",
                        field: "max_runs", value: "\(m)")
                }
                maxRuns = Int(n)
            }
            var priority: Priority?
            if let p = o["priority"], p != .null {
                guard let text = p.stringValue else {
                    throw Problem(
                        .badRequest, "invalid request", "one of critical, high, normal, low, background",
                        field: "priority", value: "\(p)")
                }
                priority = try Priority(parsing: text)
            }
            var dryRun = false
            if let d = o["dry_run"], d != .null {
                guard case .bool(let b) = d else {
                    throw Problem(.badRequest, "invalid request", "true or false", field: "dry_run", value: "\(d)")
                }
                dryRun = b
            }
            var oneAtATime = false
            if let v = o["overlap"], v != .null {
                guard let text = v.stringValue, ["allow", "queue"].contains(text) else {
                    throw Problem(
                        .badRequest, "invalid request",
                        "allow (every occurrence due at once) or queue (one at a time, oldest first)",
                        field: "overlap", value: "\(v)")
                }
                oneAtATime = text == "queue"
            }
            if !dryRun { try submitLimit(env, who, priorities: [priority ?? task.priority]) }
            let trace = Traces.headers(ServiceContext.current ?? .topLevel)
            guard
                let entries = try await env.store.backfill(
                    taskID: task.id, from: from, to: to, maxRuns: maxRuns, priority: priority, dryRun: dryRun,
                    oneAtATime: oneAtATime, traceParent: trace["traceparent"], baggage: trace["baggage"])
            else { throw Problem(.notFound, "not found", "no task named '\(task.name)'") }
            let created = entries.filter { $0.runID != nil }.count
            let existing = entries.filter { $0.existing != nil }.count
            if !dryRun {
                await env.audit(
                    context, who, "task.backfill", task.name, namespace: task.namespace,
                    [
                        "from": .string(Timestamp.format(from)), "to": .string(Timestamp.format(to)),
                        "created": .number(Double(created)), "existing": .number(Double(existing)),
                    ])
            }
            return json(
                [
                    "task": .string(task.name), "from": .string(Timestamp.format(from)),
                    "to": .string(Timestamp.format(to)), "dry_run": .bool(dryRun),
                    "overlap": .string(oneAtATime ? "queue" : "allow"),
                    "occurrences": .number(Double(entries.count)), "created": .number(Double(created)),
                    "existing": .number(Double(existing)),
                    "runs": .array(
                        entries.map { e in
                            var o: [String: JSONValue] = ["occurrence": .string(Timestamp.format(e.occurrence))]
                            if let id = e.runID { o["run_id"] = .string(id.lowercasedString) }
                            if let s = e.existing { o["existing_state"] = .string(s) }
                            return .object(o)
                        }),
                ], status: dryRun ? .ok : .accepted)
        }
    }
}
