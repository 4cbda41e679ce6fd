import ConveyorCore
import ConveyorStore
import Foundation

extension APIServer {
    /// Runs by state, completions per minute over the last 30 minutes, and queue backlogs.
    static func overview(_ store: Store, namespace: String?) async throws -> JSONValue {
        let o = try await store.overview(namespace: namespace)
        return .object([
            "at": .string(Timestamp.format(o.at)),
            "runs_by_state": .object(
                Dictionary(
                    uniqueKeysWithValues: o.runsByState.map { ($0.key.rawValue, JSONValue.number(Double($0.value))) })),
            "throughput": .array(
                o.perMinute.map {
                    .object([
                        "minute": .string(Timestamp.format($0.minute)), "succeeded": .number(Double($0.succeeded)),
                        "failed": .number(Double($0.failed)),
                    ])
                }),
            "queues": .array(
                o.queues.map {
                    .object([
                        "name": .string($0.queue), "backlog": .number(Double($0.backlog)),
                        "running": .number(Double($0.running)),
                    ])
                }),
            "workers": .number(Double(o.activeWorkers)),
        ])
    }

    static func view(_ w: WorkerRecord) -> JSONValue {
        .object([
            "id": .string(w.id), "host": .string(w.host), "state": .string(w.state),
            "concurrency": .number(Double(w.concurrency)),
            "in_flight": .number(Double(w.inFlight)), "queues": .array(w.queues.map(JSONValue.string)),
            "executors": .array(w.executors.map(JSONValue.string)),
            "seconds_since_heartbeat": .number(w.secondsSinceHeartbeat),
        ])
    }

    static func view(_ g: Store.GroupSummary) -> JSONValue {
        .object([
            "name": .string(g.name), "tasks": .number(Double(g.tasks)), "paused_tasks": .number(Double(g.paused)),
            "retries": .number(Double(g.retries)),
            "runs_by_state": .object(
                Dictionary(uniqueKeysWithValues: g.runs.map { ($0.key.rawValue, JSONValue.number(Double($0.value))) })),
        ])
    }

    static func view(_ k: APIKeyRecord) -> JSONValue {
        var o: [String: JSONValue] = [
            "prefix": .string(k.prefix), "name": .string(k.name), "role": .string(k.role),
            "namespace": .string(k.namespace), "use_count": .number(Double(k.useCount)),
        ]
        if let d = k.expiresAt { o["expires_at"] = .string(Timestamp.format(d)) }
        if let d = k.revokedAt { o["revoked_at"] = .string(Timestamp.format(d)) }
        if let d = k.lastUsedAt { o["last_used_at"] = .string(Timestamp.format(d)) }
        return .object(o)
    }
}
