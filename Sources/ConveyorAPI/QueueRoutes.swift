import ConveyorCore
import ConveyorStore
import Foundation
import Hummingbird

extension APIServer {
    /// Queue rate limits and pauses. A work queue is the fleet's (every namespace's runs share
    /// it), so both are set with a key for every namespace.
    static func queueRoutes(_ r: inout Routes, _ env: APIEnvironment) {
        let store = env.store
        r.on(.post, "/v1/queues/:name/pause") { _, context in
            let who = try context.requireFleet(.operator)
            let queue = try queueName(context)
            let changed = try await store.pauseQueue(queue, by: who.keyPrefix)
            if changed { await env.audit(context, who, "queue.pause", queue, namespace: "*") }
            return json(["queue": .string(queue), "paused": true, "changed": .bool(changed)])
        }
        r.on(.post, "/v1/queues/:name/resume") { _, context in
            let who = try context.requireFleet(.operator)
            let queue = try queueName(context)
            let changed = try await store.resumeQueue(queue)
            if changed { await env.audit(context, who, "queue.resume", queue, namespace: "*") }
            return json(["queue": .string(queue), "paused": false, "changed": .bool(changed)])
        }
        r.on(.put, "/v1/queues/:name/limit") { request, context in
            let who = try context.requireFleet(.operator)
            let queue = try queueName(context)
            let body = try await body(request, context)
            guard let o = body.objectValue else {
                throw Problem(
                    .badRequest, "invalid request", "send {\"rate\": runs per second, \"burst\": optional}",
                    field: "body")
            }
            if let unknown = o.keys.sorted().first(where: { !["rate", "burst"].contains($0) }) {
                throw Problem(
                    .badRequest, "invalid request", "unknown field; known fields are burst, rate", field: unknown,
                    value: "\(o[unknown]!)")
            }
            guard let rate = o["rate"]?.doubleValue, rate.isFinite, rate > 0, rate <= 1_000_000 else {
                throw Problem(
                    .badRequest, "invalid request",
                    "runs per second that may start from the queue, above 0 and at most 1000000; "
                        + "DELETE the limit to remove it",
                    field: "rate", value: "\(o["rate"] ?? .null)")
            }
            var burst = max(1, rate)
            if let b = o["burst"], b != .null {
                guard let n = b.doubleValue, n.isFinite, n >= 1, n <= 1_000_000 else {
                    throw Problem(
                        .badRequest, "invalid request",
                        "runs that may start at once after an idle spell, 1 to 1000000 (default: the rate, at least 1)",
                        field: "burst", value: "\(b)")
                }
                burst = n
            }
            try await store.setRateLimit(queue: queue, rate: rate, burst: burst)
            await env.audit(
                context, who, "queue.limit", queue, namespace: "*",
                ["rate": .number(rate), "burst": .number(burst)])
            return json(["queue": .string(queue), "rate": .number(rate), "burst": .number(burst)])
        }
        r.on(.delete, "/v1/queues/:name/limit") { _, context in
            let who = try context.requireFleet(.operator)
            let queue = try queueName(context)
            try await store.setRateLimit(queue: queue, rate: nil)
            await env.audit(context, who, "queue.unlimit", queue, namespace: "*")
            return json(["queue": .string(queue), "rate": .null, "burst": .null])
        }
    }

    static func queueName(_ context: APIContext) throws(Problem) -> String {
        let name = context.parameters.get("name") ?? ""
        guard name.count <= 200, QueueName.isValid(name) else {
            throw Problem(
                .badRequest, "invalid request", "a queue name: \(QueueName.hint), at most 200 characters",
                field: "name", value: name)
        }
        return name
    }
}
