import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorStore
import ConveyorTelemetry
import Foundation
import Hummingbird
import NIOCore
import ServiceLifecycle

extension APIServer {
    /// `?wait=` of `GET /v1/runs/{id}`: `30s`, `1m`, `500ms` or plain seconds, at most a minute
    /// (proxies close quieter requests); absent or 0 answers at once.
    static func waitParameter(_ request: Request) throws(Problem) -> Duration {
        guard let text = request.uri.queryParameters.get("wait"), !text.isEmpty else { return .zero }
        let units: [(String, Double)] = [("ms", 0.001), ("s", 1), ("m", 60)]
        var seconds: Double?
        if let n = Double(text) { seconds = n }
        for (unit, scale) in units where seconds == nil && text.hasSuffix(unit) {
            if let n = Double(text.dropLast(unit.count)) { seconds = n * scale }
        }
        guard let s = seconds, s.isFinite, (0...60).contains(s) else {
            throw Problem(
                .badRequest, "invalid request",
                "how long to wait for the run to end: 0 to 60 seconds, as 30s, 1m, 500ms or 30", field: "wait",
                value: text)
        }
        return .milliseconds(Int64(s * 1000))
    }

    /// A run handle whose run is not made yet: its task is due (or will be) and no dispatcher
    /// has made the run. `state` is `pending`.
    static func pendingView(_ id: UUID, _ task: TaskRecord, _ occurrence: Date) -> JSONValue {
        [
            "id": .string(id.lowercasedString), "task_id": .string(task.id.lowercasedString),
            "task": .string(task.name), "occurrence": .string(Timestamp.format(occurrence)), "attempt": 1,
            "state": "pending", "priority": .string(task.priority.name), "attempts": [], "callbacks": [],
        ]
    }

    /// Runs, workers, groups, queues, keys, the audit log, live events and metrics.
    static func operationRoutes(_ r: inout Routes, _ env: APIEnvironment) {
        let store = env.store
        r.on(.get, "/v1/runs") { request, context in
            let who = try context.require(.viewer)
            let q = request.uri.queryParameters
            var f = Store.RunFilter()
            f.namespace = listScope(who, request)
            if let name = q.get("task") {
                guard let task = try await store.task(named: name, namespace: namespaceOf(who, request)) else {
                    throw Problem(.notFound, "not found", "no task named '\(name)'", field: "task", value: name)
                }
                f.taskID = task.id
            }
            if let text = q.get("state") {
                guard let state = RunState(rawValue: text) else {
                    throw Problem(
                        .badRequest, "invalid request",
                        "one of \(RunState.allCases.map(\.rawValue).joined(separator: ", "))", field: "state",
                        value: text)
                }
                f.state = state
            }
            for (key, keyPath) in [("since", \Store.RunFilter.since), ("until", \Store.RunFilter.until)] {
                if let text = q.get(key) {
                    guard let d = Timestamp.parse(text) else {
                        throw Problem(
                            .badRequest, "invalid request", "an ISO-8601 instant such as 2026-11-23T10:00:00Z",
                            field: key, value: text)
                    }
                    f[keyPath: keyPath] = d
                }
            }
            let limit = try pageLimit(request, env)
            if let cursor = q.get("cursor") {
                let parts = cursor.split(separator: "_", maxSplits: 1).map(String.init)
                guard parts.count == 2, let d = Timestamp.parse(parts[0]), let id = UUID(uuidString: parts[1]) else {
                    throw Problem(
                        .badRequest, "invalid request", "pass the next_cursor of the previous page unchanged",
                        field: "cursor", value: cursor)
                }
                f.after = (d, id)
            }
            let page = try await store.runs(f, limit: limit + 1)
            var out: [String: JSONValue] = ["runs": .array(page.prefix(limit).map(view))]
            if page.count > limit, let last = page.prefix(limit).last {
                out["next_cursor"] = .string(Timestamp.format(last.occurrence) + "_" + last.id.lowercasedString)
            }
            return json(.object(out))
        }
        r.on(.get, "/v1/runs/:id") { request, context in
            let who = try context.require(.viewer)
            let wait = try waitParameter(request)
            let text = context.parameters.get("id") ?? ""
            guard let id = UUID(uuidString: text) else {
                throw Problem(.badRequest, "invalid request", "a run id is a UUID", field: "id", value: text)
            }
            // `?wait=`: answer when the run is final or the wait ends, whichever is first. The run
            // is read again after 100 ms, then at most every second (no connection held between).
            let deadline = ContinuousClock.now + wait
            var pause = Duration.milliseconds(100)
            var found: RunRecord?
            while true {
                if let run = try await store.run(id: id) {
                    guard let ns = try await store.namespace(ofTask: run.taskID), who.sees(namespace: ns) else {
                        throw Problem(.notFound, "not found", "no run \(text)")
                    }
                    if run.state.isFinal || ContinuousClock.now >= deadline {
                        found = run
                        break
                    }
                } else if let pending = try await store.pendingRun(id: id), who.sees(namespace: pending.task.namespace)
                {
                    if ContinuousClock.now >= deadline {
                        return json(pendingView(id, pending.task, pending.occurrence))
                    }
                } else if try await store.run(id: id) != nil {
                    // A dispatcher made the run between the two reads (it takes the handle and
                    // draws the task's next one in one commit): read it again at once.
                    continue
                } else {
                    throw Problem(.notFound, "not found", "no run \(text)")
                }
                try await Task.sleep(for: min(pause, deadline - ContinuousClock.now))
                pause = min(pause * 2, .seconds(1))
            }
            guard let run = found else { throw Problem(.notFound, "not found", "no run \(text)") }
            var o = view(run).objectValue ?? [:]
            if let template = env.options.traceLinkTemplate, let trace = run.traceID, !trace.isEmpty {
                o["trace_url"] = .string(template.replacingOccurrences(of: "{trace_id}", with: trace))
            }
            // The occurrence's attempts, so a retried run shows its history in one call.
            o["attempts"] = .array(
                try await store.attempts(of: run).map { a in
                    var x: [String: JSONValue] = [
                        "id": .string(a.id.lowercasedString), "attempt": .number(Double(a.attempt)),
                        "state": .string(a.state.rawValue),
                    ]
                    if let e = a.errorMessage { x["error_message"] = .string(e) }
                    if let f = a.finishedAt { x["finished_at"] = .string(Timestamp.format(f)) }
                    return .object(x)
                })
            // Its outcome's callbacks (docs/scheduling.md, "Callbacks").
            o["callbacks"] = .array(
                try await store.callbacks(run: run.id).map { c in
                    var x: [String: JSONValue] = [
                        "url": .string(c.url), "attempts": .number(Double(c.attempts)), "state": .string(c.state),
                    ]
                    if let s = c.lastStatus { x["last_status"] = .number(Double(s)) }
                    if let e = c.lastError { x["last_error"] = .string(e) }
                    return .object(x)
                })
            return json(.object(o))
        }
        r.on(.post, "/v1/runs/:id/cancel") { _, context in
            let who = try context.require(.operator)
            let (run, namespace) = try await findRun(context, who, store)
            guard
                try await !store.cancel(runs: [run.id], reason: "cancelled through the API by \(who.keyPrefix)").isEmpty
            else {
                throw Problem(
                    .conflict, "run already ended",
                    """
                    run \(run.id.lowercasedString) ended \(run.state.rawValue); only a run that has not ended can be \
                    cancelled
                    """
                )
            }
            await env.audit(context, who, "run.cancel", run.id.lowercasedString, namespace: namespace)
            return json(["run_id": .string(run.id.lowercasedString), "state": "cancelled"])
        }
        r.on(.post, "/v1/runs/:id/redrive") { _, context in
            let who = try context.require(.operator)
            let (run, namespace) = try await findRun(context, who, store)
            do {
                let next = try await store.redrive(run: run.id)
                await env.audit(
                    context, who, "run.redrive", run.id.lowercasedString, namespace: namespace,
                    ["new_run_id": .string(next.lowercasedString)])
                return json(
                    ["run_id": .string(next.lowercasedString), "attempt": .number(Double(run.attempt + 1))],
                    status: .created)
            } catch let v as ValidationError {
                throw Problem(.conflict, "cannot re-drive", v.hint, field: "id", value: v.value)
            }
        }

        // Workers serve queues, not namespaces: their hosts, queues and in-flight counts are the
        // fleet's, so these routes need a key for every namespace (docs/api.md, "Scope").
        r.on(.get, "/v1/workers") { request, context in
            _ = try context.requireFleet()
            let q = request.uri.queryParameters
            let state = q.get("state")
            if let state, !["active", "stopped", "lost"].contains(state) {
                throw Problem(
                    .badRequest, "invalid request", "one of active, stopped, lost", field: "state", value: state)
            }
            let limit = try pageLimit(request, env)
            let page = try await store.workers(state: state, after: q.get("cursor"), limit: limit + 1)
            var out: [String: JSONValue] = ["workers": .array(page.prefix(limit).map(view))]
            if page.count > limit, let last = page.prefix(limit).last { out["next_cursor"] = .string(last.id) }
            return json(.object(out))
        }
        r.on(.get, "/v1/workers/:id") { request, context in
            let who = try context.requireFleet()
            let id = context.parameters.get("id") ?? ""
            guard let (worker, runs) = try await store.worker(id: id, namespace: listScope(who, request)) else {
                throw Problem(.notFound, "not found", "no worker '\(id)' has sent a heartbeat")
            }
            var o = view(worker).objectValue ?? [:]
            o["runs"] = .array(runs.map(view))
            return json(.object(o))
        }

        r.on(.get, "/v1/groups") { request, context in
            let who = try context.require(.viewer)
            let groups = try await store.groups(namespace: listScope(who, request))
            return json(["groups": .array(groups.map(view))])
        }
        r.on(.get, "/v1/groups/:name") { request, context in
            let who = try context.require(.viewer)
            let name = context.parameters.get("name") ?? ""
            guard let group = try await store.groups(namespace: namespaceOf(who, request), name: name).first else {
                throw Problem(.notFound, "not found", "no group named '\(name)'")
            }
            return json(view(group))
        }
        for (action, paused) in [("pause", true), ("resume", false)] {
            r.on(.post, "/v1/groups/:name/\(action)") { request, context in
                let who = try context.require(pauseRole)
                let name = context.parameters.get("name") ?? ""
                let namespace = namespaceOf(who, request)
                guard try await store.groupExists(name, namespace: namespace) else {
                    throw Problem(.notFound, "not found", "no group named '\(name)'")
                }
                let changed = try await store.setPaused(paused, group: name, namespace: namespace)
                await env.audit(
                    context, who, "group.\(action)", name, namespace: namespace, ["tasks": .number(Double(changed))])
                return json([
                    "group": .string(name), "paused": .bool(paused), "tasks_changed": .number(Double(changed)),
                ])
            }
        }
        r.on(.post, "/v1/groups/:name/cancel") { request, context in
            let who = try context.require(.operator)
            let name = context.parameters.get("name") ?? ""
            let namespace = namespaceOf(who, request)
            guard try await store.groupExists(name, namespace: namespace) else {
                throw Problem(.notFound, "not found", "no group named '\(name)'")
            }
            let cancelled = try await store.cancel(
                group: name, namespace: namespace, reason: "group cancelled through the API by \(who.keyPrefix)")
            await env.audit(
                context, who, "group.cancel", name, namespace: namespace, ["runs": .number(Double(cancelled.count))])
            return json(["group": .string(name), "runs_cancelled": .number(Double(cancelled.count))])
        }

        r.on(.get, "/v1/queues") { request, context in
            let who = try context.require(.viewer)
            let stats = try await store.queueStats(namespace: listScope(who, request))
            var broker: [String: WorkQueueDepth] = [:]
            var brokerError: String?
            // A broker queue holds every namespace's messages: its depth and consumers are the
            // fleet's, shown to keys for every namespace only.
            if let inspector = env.inspector, who.namespace == "*" {
                do {
                    broker = try await env.topology.workQueueDepths(stats.map(\.queue), asking: inspector)
                } catch { brokerError = "\(error)" }
            }
            var out: [String: JSONValue] = [
                "queues": .array(
                    stats.map { s in
                        var o: [String: JSONValue] = [
                            "name": .string(s.queue), "tasks": .number(Double(s.tasks)),
                            "backlog": .number(Double(s.backlog)),
                            "running": .number(Double(s.running)),
                            "finished_last_minute": .number(Double(s.finishedLastMinute)),
                            "waiting": .number(Double(s.waiting)), "paused": .bool(s.paused),
                        ]
                        if let b = broker[s.queue] {
                            o["broker"] = .object([
                                "queue": .string(b.queue), "ready": .number(Double(b.ready)),
                                "consumers": .number(Double(b.consumers)),
                                "isolated": .number(Double(b.isolated)),
                            ])
                        }
                        return .object(o)
                    })
            ]
            if let brokerError { out["broker_error"] = .string(brokerError) }
            return json(.object(out))
        }

        r.on(.post, "/v1/keys") { request, context in
            let who = try context.require(.admin)
            let body = try await body(request, context)
            guard let o = body.objectValue else {
                throw Problem(
                    .badRequest, "invalid request", "send {\"name\": ..., \"role\": ..., \"namespace\": ...}",
                    field: "body")
            }
            if let unknown = o.keys.sorted().first(where: {
                !["name", "role", "namespace", "expires_days"].contains($0)
            }) {
                throw Problem(
                    .badRequest, "invalid request",
                    "unknown field; known fields are expires_days, name, namespace, role", field: unknown,
                    value: "\(o[unknown]!)")
            }
            guard let name = o["name"]?.stringValue, !name.isEmpty, name.count <= 200 else {
                throw Problem(
                    .badRequest, "invalid request", "what the key is for, 1 to 200 characters", field: "name",
                    value: "\(o["name"] ?? .null)")
            }
            let namespace = o["namespace"]?.stringValue ?? (who.namespace == "*" ? "default" : who.namespace)
            guard who.namespace == "*" || namespace == who.namespace else {
                throw Problem(
                    .forbidden, "forbidden", "this admin key manages keys of namespace '\(who.namespace)' only",
                    field: "namespace", value: namespace)
            }
            var days: Int?
            if let d = o["expires_days"], d != .null {
                guard let n = d.doubleValue, n.rounded() == n, abs(n) < 1e9 else {
                    throw Problem(
                        .badRequest, "invalid request", "a whole number of days from 1 to 3650", field: "expires_days",
                        value: "\(d)")
                }
                days = Int(n)
            }
            let role = try APIKeyRules.check(
                role: o["role"]?.stringValue ?? "\(o["role"] ?? .null)", namespace: namespace, expiresDays: days,
                fields: ("role", "namespace", "expires_days"))
            let expires = days.map { Date().addingTimeInterval(Double($0) * 86_400) }
            let (key, prefix, hash) = APIKeyFormat.generate()
            try await store.createAPIKey(
                prefix: prefix, secretHash: hash, name: name, role: role.rawValue, namespace: namespace,
                expiresAt: expires)
            await env.audit(
                context, who, "key.create", prefix, namespace: namespace,
                ["role": .string(role.rawValue), "name": .string(name)])
            var created = try await store.apiKey(prefix: prefix).map(view)?.objectValue ?? [:]
            created["key"] = .string(key)
            return json(.object(created), status: .created)
        }
        r.on(.get, "/v1/keys") { _, context in
            let who = try context.require(.admin)
            let keys = try await store.apiKeys().filter { who.namespace == "*" || $0.namespace == who.namespace }
            return json(["keys": .array(keys.map(view))])
        }
        r.on(.delete, "/v1/keys/:prefix") { _, context in
            let who = try context.require(.admin)
            let prefix = context.parameters.get("prefix") ?? ""
            guard let key = try await store.apiKey(prefix: prefix),
                who.namespace == "*" || key.namespace == who.namespace
            else {
                throw Problem(.notFound, "not found", "no key with prefix '\(prefix)'")
            }
            guard try await store.revokeAPIKey(prefix: prefix) else {
                throw Problem(
                    .conflict, "already revoked",
                    "key \(prefix) was revoked at \(key.revokedAt.map(Timestamp.format) ?? "?")")
            }
            await env.audit(context, who, "key.revoke", prefix, namespace: key.namespace)
            return json(["prefix": .string(prefix), "revoked": true])
        }

        r.on(.get, "/v1/audit") { request, context in
            let who = try context.require(.admin)
            let q = request.uri.queryParameters
            let limit = try pageLimit(request, env)
            var before: Int64?
            if let c = q.get("cursor") {
                guard let n = Int64(c), n > 0 else {
                    throw Problem(
                        .badRequest, "invalid request", "pass the next_cursor of the previous page unchanged",
                        field: "cursor", value: c)
                }
                before = n
            }
            let entries = try await store.auditLog(
                namespace: listScope(who, request), action: q.get("action"),
                before: before, limit: limit + 1)
            var out: [String: JSONValue] = [
                "entries": .array(
                    entries.prefix(limit).map { e in
                        var o: [String: JSONValue] = [
                            "id": .number(Double(e.id)), "at": .string(e.at.map(Timestamp.format) ?? ""),
                            "actor": .string(e.actor),
                            "role": .string(e.role), "namespace": .string(e.namespace), "action": .string(e.action),
                            "target": .string(e.target), "request_id": .string(e.requestID), "detail": e.detail,
                        ]
                        if let c = e.client { o["client"] = .string(c) }
                        return .object(o)
                    })
            ]
            if entries.count > limit, let last = entries.prefix(limit).last {
                out["next_cursor"] = .string(String(last.id))
            }
            return json(.object(out))
        }

        // Live figures for the dashboard: server-sent events, one `stats` event every 2 s. A
        // stream holds a connection for up to 10,000 events, so each key may hold only a few
        // (`api.max_event_streams_per_key`); and streams of one namespace share one overview
        // per interval, so their number does not multiply the queries.
        r.on(.get, "/v1/events") { request, context in
            let who = try context.require(.viewer)
            let namespace = listScope(who, request)
            var intervalMS = 2000
            if let text = request.uri.queryParameters.get("interval_ms") {
                guard let ms = Int(text), (200...60_000).contains(ms) else {
                    throw Problem(
                        .badRequest, "invalid request",
                        "milliseconds between events: an integer from 200 to 60000 (default 2000)",
                        field: "interval_ms", value: String(text))
                }
                intervalMS = ms
            }
            let interval = Duration.milliseconds(Int64(intervalMS))
            let limit = env.options.maxEventStreamsPerKey
            guard let slot = env.eventStreams.acquire(who.keyPrefix, limit: limit) else {
                var p = Problem(
                    .tooManyRequests, "too many event streams",
                    """
                    this key has \(limit) event streams open, the most api.max_event_streams_per_key allows; close \
                    one (it is let go within one interval) or share one stream
                    """
                )
                p.retryAfter = max(1, Int(interval.inSeconds.rounded(.up)))
                throw p
            }
            return Response(
                status: .ok, headers: [.contentType: "text/event-stream", .cacheControl: "no-store"],
                body: ResponseBody { writer in
                    // Given back however the stream ends: finished, the client gone (the write throws), cancelled.
                    defer { slot.release() }
                    var sent = 0
                    while !Task.isCancelled && !Task.isShuttingDownGracefully && sent < 10_000 {
                        let payload = try await env.overviews.overview(
                            store, namespace: namespace, maxAge: interval, now: env.clock.now())
                        try await writer.write(
                            ByteBuffer(
                                string: "event: stats\ndata: " + String(decoding: payload.jsonBytes, as: UTF8.self)
                                    + "\n\n"))
                        sent += 1
                        // A stream ends when the API shuts down: stopping never waits out an
                        // interval (up to a minute) of every open stream. A client that went
                        // away cancels the sleep too; the loop's condition ends the stream.
                        try? await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) }
                    }
                    try await writer.finish(nil)
                })
        }
        r.on(.get, "/v1/overview") { request, context in
            let who = try context.require(.viewer)
            return json(try await overview(store, namespace: listScope(who, request)))
        }
        // The process's own numbers (every namespace's requests, and in `conveyor dev` the
        // dispatcher's per-queue series): the fleet's.
        r.on(.get, "/metrics") { _, context in
            _ = try context.requireFleet()
            return Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                body: .init(byteBuffer: ByteBuffer(string: ConveyorMetrics.text())))
        }
    }
}
