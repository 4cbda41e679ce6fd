import ConveyorAMQP
import ConveyorBroker
import ConveyorCore
import ConveyorHTTP
import ConveyorPostgres
import ConveyorStore
import ConveyorWorker
import Crypto
import Foundation
import JWTKit
import Synchronization
import Testing
import Yams

@testable import ConveyorAPI

/// The REST API in-process against the real database, called over HTTP.
@Suite("REST API (real PostgreSQL)", .serialized)
struct APITests {
    struct Client: Sendable {
        let base: String
        let http: OutboundHTTP

        func call(
            _ method: String, _ path: String, key: String? = nil, body: String? = nil, headers: [(String, String)] = []
        )
            async throws -> (status: Int, json: JSONValue, headers: [(String, String)])
        {
            var h = headers
            if let key { h.append(("Authorization", "Bearer \(key)")) }
            if body != nil { h.append(("Content-Type", "application/json")) }
            let r = try await http.send(
                OutboundRequest(method: method, url: base + path, headers: h, body: Array((body ?? "").utf8)),
                timeout: .seconds(5))
            let json = (try? JSONDecoder().decode(JSONValue.self, from: Data(r.body))) ?? .null
            return (r.status, json, r.headers)
        }

        /// A GET's body as text.
        func text(_ path: String, key: String) async throws -> String {
            let r = try await http.send(
                OutboundRequest(url: base + path, headers: [("Authorization", "Bearer \(key)")]), timeout: .seconds(5))
            #expect(!r.truncated, "\(path) was cut at \(r.body.count) bytes")
            return String(decoding: r.body, as: UTF8.self)
        }
    }

    /// Runs `body` with the API listening on a free port.
    static func withAPI(
        _ sys: System, ttl: Duration = .seconds(30), options: APIOptions = APIOptions(), broker: Bool = false,
        jwt: JWTVerifier? = nil, clock: APIClock = .continuous, _ body: (Client, APIService) async throws -> Void
    ) async throws {
        let port = Mutex<Int>(0)
        let api = APIService(
            host: "127.0.0.1", port: 0, store: sys.store, logger: Servers.logger, keyCacheTTL: ttl, jwt: jwt,
            options: options,
            broker: broker ? sys.amqp : nil, topology: ConveyorTopology(prefix: sys.prefix), clock: clock
        ) { p in port.withLock { $0 = p } }
        try await withServices([api]) {
            _ = try await sys.eventually(timeout: .seconds(10), "the API listens") { port.withLock { $0 } > 0 }
            var policy = OutboundPolicy()
            policy.allowedNetworks = [try Network(parsing: "127.0.0.1")]
            // /metrics holds every series the test process recorded: more than the guard's default 64 KiB.
            policy.maxResponseBytes = 16 << 20
            try await body(
                Client(
                    base: "http://127.0.0.1:\(port.withLock { $0 })",
                    http: OutboundHTTP(policy: policy, logger: Servers.logger)), api)
        }
    }

    static func key(_ sys: System, role: Role, namespace: String) async throws -> String {
        let (key, prefix, hash) = APIKeyFormat.generate()
        try await sys.store.createAPIKey(
            prefix: prefix, secretHash: hash, name: "test", role: role.rawValue, namespace: namespace, expiresAt: nil)
        return key
    }

    /// The API runs inside its owner's ServiceGroup and handles no signal itself. A group of its own listening
    /// for SIGTERM raced the owner's: the API could return before the owner began its shutdown, and the
    /// process exited 1 ("A service has finished unexpectedly"). Listening for a signal installs a handler.
    @Test func theAPILeavesSignalsToItsOwner() async throws {
        try await System.with { sys in
            try await Self.withAPI(sys) { api, _ in
                let health = try await api.call("GET", "/healthz")
                #expect(health.status == 200)
                let handler = Self.handler(of: SIGTERM)
                #expect(handler == 0, "SIGTERM keeps its default action while the API runs; found \(handler)")
            }
        }
    }

    /// The signal's disposition as a number: 0 default, 1 ignored, otherwise a handler's address.
    static func handler(of signal: Int32) -> Int {
        var action = sigaction()
        guard sigaction(signal, nil, &action) == 0 else { return -1 }
        return action.__sigaction_handler.sa_handler.map { unsafeBitCast($0, to: Int.self) } ?? 0
    }

    @Test func everyRouteButHealthNeedsAValidKey() async throws {
        try await System.with { sys in
            try await Self.withAPI(sys) { api, _ in
                #expect(try await api.call("GET", "/healthz").status == 200)
                #expect(try await api.call("GET", "/readyz").status == 200)
                let none = try await api.call("GET", "/v1/tasks", headers: [("X-Request-ID", "req-42")])
                #expect(none.status == 401)
                #expect(none.json["title"] == "authentication required")
                #expect(none.json["request_id"] == "req-42")
                #expect(none.headers.contains { $0.0.lowercased() == "x-request-id" && $0.1 == "req-42" })
                #expect(
                    none.headers.contains { $0.0.lowercased() == "content-type" && $0.1 == "application/problem+json" })
                #expect(
                    try await api.call("GET", "/v1/tasks", key: "not-a-key").json["detail"]
                        == "the credential is not an API key (cvk_<prefix>_<secret>)")
                let real = try await Self.key(sys, role: .viewer, namespace: "default")
                let forged = String(real.dropLast(4)) + "AAAA"
                #expect(try await api.call("GET", "/v1/tasks", key: forged).status == 401, "a key with a wrong secret")
                let ok = try await api.call("GET", "/v1/tasks", key: real)
                #expect(ok.status == 200)
                #expect(
                    ok.headers.contains { $0.0.lowercased() == "x-request-id" && !$0.1.isEmpty },
                    "a request id is generated")
            }
        }
    }

    @Test func tasksAreCreatedReadAndTriggeredInTheKeysNamespaceOnly() async throws {
        try await System.with { sys in
            try await Self.withAPI(sys) { api, _ in
                let a = try await Self.key(sys, role: .submitter, namespace: "team-a")
                let b = try await Self.key(sys, role: .admin, namespace: "team-b")
                let viewerA = try await Self.key(sys, role: .viewer, namespace: "team-a")
                let created = try await api.call(
                    "POST", "/v1/tasks", key: a,
                    body: """
                        {"name": "nightly", "executor": "noop", "schedule": "0 3 * * *", "timezone": "Europe/London"}
                        """
                )
                #expect(created.status == 201, "\(created.json)")
                #expect(created.json["name"] == "nightly")
                #expect(created.json["timezone"] == "Europe/London")
                #expect(
                    try await sys.count("SELECT count(*) FROM tasks WHERE name = 'nightly' AND namespace = 'team-a'")
                        == 1)

                let got = try await api.call("GET", "/v1/tasks/nightly", key: viewerA)
                #expect(got.status == 200)
                #expect(got.json["recent_runs"] == .array([]))
                // Another tenant, even an admin of it, gets 404: not 403, which would confirm it exists.
                #expect(try await api.call("GET", "/v1/tasks/nightly", key: b).status == 404)
                #expect(try await api.call("POST", "/v1/tasks/nightly/trigger", key: b).status == 404)
                #expect(try await api.call("GET", "/v1/tasks", key: b).json["tasks"] == .array([]))

                #expect(
                    try await api.call("POST", "/v1/tasks/nightly/trigger", key: viewerA).status == 403,
                    "a viewer cannot trigger")
                #expect(try await api.call("POST", "/v1/tasks/nightly/trigger", key: a).status == 202)
                #expect(
                    try await api.call("POST", "/v1/tasks/nightly/pause", key: a).status == 403,
                    "pausing needs the operator role")
                let duplicate = try await api.call(
                    "POST", "/v1/tasks", key: a, body: #"{"name": "nightly", "executor": "noop"}"#)
                #expect(duplicate.status == 409)
                #expect(duplicate.json["field"] == "name")
            }
        }
    }

    @Test func badBodiesGetProblemsThatNameTheField() async throws {
        try await System.with { sys in
            try await Self.withAPI(sys) { api, _ in
                let k = try await Self.key(sys, role: .submitter, namespace: "default")
                let massAssign = try await api.call(
                    "POST", "/v1/tasks", key: k, body: #"{"name": "x", "executor": "noop", "state": "succeeded"}"#)
                #expect(massAssign.status == 400)
                #expect(massAssign.json["field"] == "state", "unknown fields are refused: \(massAssign.json)")
                let badCron = try await api.call(
                    "POST", "/v1/tasks", key: k, body: #"{"name": "x", "executor": "noop", "schedule": "61 * * * *"}"#)
                #expect(badCron.status == 400)
                #expect(badCron.json["field"] == "schedule", "\(badCron.json)")
                let deep = String(repeating: "[", count: 40) + String(repeating: "]", count: 40)
                let tooDeep = try await api.call("POST", "/v1/tasks", key: k, body: deep)
                #expect(tooDeep.status == 400)
                #expect(tooDeep.json["detail"] == "JSON may nest at most 32 levels")
                let huge =
                    #"{"name": "x", "executor": "noop", "parameters": {"blob": ""#
                    + String(repeating: "a", count: 1_100_000) + #""}}"#
                let tooBig = try await api.call("POST", "/v1/tasks", key: k, body: huge)
                #expect(tooBig.status == 413, "\(tooBig.status) \(tooBig.json)")
                #expect(try await api.call("POST", "/v1/tasks", key: k, body: "{not json").status == 400)
                #expect(try await api.call("GET", "/v1/tasks?limit=1000", key: k).json["field"] == "limit")
                #expect(try await sys.count("SELECT count(*) FROM tasks") == 0)
            }
        }
    }

    @Test func aRevokedKeyStopsWorkingWithinTheCacheTimeAndUsesAreCounted() async throws {
        try await System.with { sys in
            let time = ManualClock()
            try await Self.withAPI(sys, ttl: .milliseconds(500), clock: time.apiClock) { api, _ in
                let k = try await Self.key(sys, role: .viewer, namespace: "default")
                for _ in 0..<3 { #expect(try await api.call("GET", "/v1/tasks", key: k).status == 200) }
                let prefix = try #require(APIKeyFormat.parse(k)?.prefix)
                try await sys.store.revokeAPIKey(prefix: prefix)
                time.advance(by: .milliseconds(600))
                let refused = try await api.call("GET", "/v1/tasks", key: k)
                #expect(refused.status == 401)
                #expect(refused.json["detail"] == "this API key was revoked")
            }
            // The usage writer flushes on shutdown.
            let keys = try await sys.store.apiKeys()
            #expect(keys.first?.useCount == 3)
            #expect(keys.first?.lastUsedAt != nil)
        }
    }

    /// The API writes key usage once more after its server stops. Here that write has to wait
    /// for row locks the test holds: it must wait and then commit, not be cancelled with the
    /// task it runs in (a cancelled task's query is sent a cancel request, and the counts were lost).
    @Test func theLastKeyUsageWriteWaitsForItsLocksAndIsNotLost() async throws {
        try await System.with { sys in
            let k = try await Self.key(sys, role: .viewer, namespace: "default")
            let released = Mutex<Task<Void, any Error>?>(nil)
            try await Self.withAPI(sys) { api, _ in
                for _ in 0..<2 { #expect(try await api.call("GET", "/v1/tasks", key: k).status == 200) }
                let blocker = try await PostgresConnection.connect(url: sys.databaseURL, logger: Servers.logger)
                try await blocker.simple("BEGIN")
                try await blocker.simple("SELECT 1 FROM api_keys FOR UPDATE")
                // Leaving this body stops the API; the write then waits, and only then is the lock let go.
                released.withLock {
                    $0 = Task {
                        try await sys.eventually(timeout: .seconds(10), "the last usage write waits on the locks") {
                            try await sys.count(
                                """
                                SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'
                                AND query LIKE 'UPDATE api_keys SET use_count%'
                                """) > 0
                        }
                        try await blocker.simple("COMMIT")
                    }
                }
            }
            try await released.withLock { $0 }?.value
            #expect(try await sys.store.apiKeys().first?.useCount == 2)
        }
    }

    @Test func aFloodOfUnknownKeysCostsABoundedNumberOfLookups() async throws {
        try await System.with { sys in
            var options = APIOptions()
            options.perAddress = .init(rate: 0.01, burst: 5)
            try await Self.withAPI(sys, options: options) { api, service in
                let keys = service.env.keys
                let real = try await Self.key(sys, role: .viewer, namespace: "default")
                #expect(
                    try await api.call("GET", "/v1/tasks", key: real).status == 200,
                    "its lookup took a token of the address and gave it back")
                let before = keys.lookupCount
                var statuses: [Int] = []
                for i in 0..<40 {
                    // Shaped like a key, with a new prefix each time: no cache can answer it.
                    let madeUp = APIKeyFormat.generate().key
                    statuses.append(try await api.call("GET", "/v1/tasks", key: madeUp).status)
                    // Not a key at all: refused from memory, spending the address's tokens too.
                    statuses.append(try await api.call("GET", "/v1/tasks", key: "garbage-\(i)").status)
                }
                let lookups = keys.lookupCount - before
                #expect(lookups >= 1 && lookups <= 5, "at most the address's 5 tokens in lookups, made \(lookups)")
                #expect(Array(statuses.prefix(5)) == [401, 401, 401, 401, 401], "\(statuses.prefix(8))")
                #expect(
                    statuses.dropFirst(5).allSatisfy { $0 == 429 },
                    "past the address's budget every one gets 429: \(statuses)")
                let throttled = try await api.call("GET", "/v1/tasks", key: APIKeyFormat.generate().key)
                #expect(throttled.status == 429 && throttled.headers.contains { $0.0.lowercased() == "retry-after" })
                #expect(keys.lookupCount - before == lookups, "a throttled request makes no lookup")
                #expect(
                    try await api.call("GET", "/v1/tasks", key: real).status == 200,
                    "a key already found is not held up by its address's flood")
                // The trade-off: a key this process has not found yet needs a lookup, and the
                // address has no token left for it (without a query it looks like a made-up one).
                let fresh = try await Self.key(sys, role: .viewer, namespace: "default")
                #expect(try await api.call("GET", "/v1/tasks", key: fresh).status == 429)
            }
        }
    }

    @Test func aKeyCreatedAfterAMissWorksOnceTheMissExpires() async throws {
        try await System.with { sys in
            let ttl = Duration.seconds(1)
            let time = ManualClock()
            try await Self.withAPI(sys, ttl: ttl, clock: time.apiClock) { api, service in
                let keys = service.env.keys
                let (key, prefix, hash) = APIKeyFormat.generate()
                #expect(try await api.call("GET", "/v1/tasks", key: key).status == 401, "no such key yet")
                let lookups = keys.lookupCount
                try await sys.store.createAPIKey(
                    prefix: prefix, secretHash: hash, name: "late", role: Role.viewer.rawValue, namespace: "default",
                    expiresAt: nil)
                let again = try await api.call("GET", "/v1/tasks", key: key)
                #expect(
                    again.status == 401 && keys.lookupCount == lookups,
                    "within the time to live the miss is answered from memory")
                time.advance(by: ttl + .milliseconds(1))
                #expect(
                    try await api.call("GET", "/v1/tasks", key: key).status == 200,
                    "the new key works once the miss expired")
            }
        }
    }

    @Test func theNegativeKeyCacheStaysBounded() async throws {
        try await System.with { sys in
            let keys = KeyAuthenticator(store: sys.store, maxMisses: 8)
            var madeUp: [String] = []
            for _ in 0..<50 {
                madeUp.append(APIKeyFormat.generate().key)
                guard case .failure(.unknown) = try await keys.authenticate(madeUp[madeUp.count - 1]) else {
                    Issue.record("a made-up key was not refused as unknown")
                    continue
                }
                #expect(keys.missCount <= 8)
            }
            #expect(keys.missCount == 8)
            #expect(keys.lookupCount == 50)
            _ = try await keys.authenticate(madeUp[49])
            #expect(keys.lookupCount == 50, "the newest misses are remembered")
            _ = try await keys.authenticate(madeUp[0])
            #expect(keys.lookupCount == 51, "the oldest were let go")
            #expect(keys.missCount == 8)

            // In time: expired misses leave with the next one.
            let time = ManualClock()
            let short = KeyAuthenticator(
                store: sys.store, ttl: .milliseconds(50), maxMisses: 1000, clock: time.apiClock)
            for _ in 0..<20 { _ = try await short.authenticate(APIKeyFormat.generate().key) }
            time.advance(by: .milliseconds(100))
            _ = try await short.authenticate(APIKeyFormat.generate().key)
            #expect(short.missCount == 1)
        }
    }
}

/// `openapi.yaml` against the router and the responses.
@Suite("OpenAPI document (real PostgreSQL)")
struct OpenAPITests {
    static func document() throws -> [String: Any] {
        let text = String(decoding: APIServer.openAPIDocument, as: UTF8.self)
        return try #require(try Yams.load(yaml: text) as? [String: Any], "openapi.yaml does not parse")
    }

    @Test func everyDocumentedRouteExistsAndEveryRouteIsDocumented() async throws {
        try await System.with { sys in
            let doc = try Self.document()
            #expect(doc["openapi"] as? String == "3.1.0")
            let paths = try #require(doc["paths"] as? [String: Any])
            var documented: Set<String> = []
            for (path, item) in paths {
                for method in ["get", "post", "put", "patch", "delete"] where (item as? [String: Any])?[method] != nil {
                    documented.insert("\(method.uppercased()) \(path)")
                }
            }
            let routed = Set(
                APIServer.build(APIEnvironment(store: sys.store, keys: KeyAuthenticator(store: sys.store))).routes)
            #expect(
                routed.subtracting(documented).isEmpty,
                "routes missing from openapi.yaml: \(routed.subtracting(documented).sorted())")
            #expect(
                documented.subtracting(routed).isEmpty,
                "documented routes the router lacks: \(documented.subtracting(routed).sorted())")
        }
    }

    /// What a client generator needs and what a client must be told: a unique operationId and a
    /// declared tag on every operation; 429 and 503 with Retry-After on every authenticated one;
    /// no object schema that says nothing of its fields; the problem types the server uses.
    @Test func everyOperationIsNamedTaggedAndTypedAndListsLimitsAndOutages() throws {
        let doc = try Self.document()
        #expect(
            (doc["info"] as? [String: Any])?["version"] as? String == ConveyorVersion.current,
            "info.version is the release's")
        let declaredTags = Set(((doc["tags"] as? [[String: Any]]) ?? []).compactMap { $0["name"] as? String })
        var ids: [String: String] = [:]
        for (path, item) in try #require(doc["paths"] as? [String: Any]) {
            for (method, value) in item as? [String: Any] ?? [:] {
                guard let op = value as? [String: Any] else { continue }
                let operation = "\(method.uppercased()) \(path)"
                let id = op["operationId"] as? String ?? ""
                #expect(!id.isEmpty, "\(operation) has no operationId")
                #expect(ids[id] == nil, "operationId \(id) of \(operation) is also \(ids[id] ?? "")'s")
                ids[id] = operation
                let tags = op["tags"] as? [String] ?? []
                #expect(!tags.isEmpty && Set(tags).isSubset(of: declaredTags), "\(operation) tags \(tags)")
                let open = (op["security"] as? [Any])?.isEmpty == true
                let responses = op["responses"] as? [String: Any] ?? [:]
                if !open {
                    for status in ["401", "429", "503"] {
                        #expect(responses[status] != nil, "\(operation) does not list \(status)")
                    }
                    for status in ["429", "503"] {
                        let ref = (responses[status] as? [String: Any])?["$ref"] as? String ?? ""
                        let headers = Self.resolve(ref, doc)?["headers"] as? [String: Any]
                        #expect(headers?["Retry-After"] != nil, "\(operation) \(status) does not carry Retry-After")
                    }
                }
            }
        }
        // No bare {type: object}: every object schema names its properties, or says what its
        // other keys hold (additionalProperties), or is composed.
        func walk(_ node: Any, _ at: String) {
            if let o = node as? [String: Any] {
                let isObject =
                    (o["type"] as? String) == "object" || (o["type"] as? [String])?.contains("object") == true
                if isObject {
                    #expect(
                        ["properties", "additionalProperties", "allOf", "oneOf", "anyOf", "$ref"].contains {
                            o[$0] != nil
                        }, "\(at) is an object schema with nothing said of its fields")
                }
                for (k, v) in o { walk(v, at + "/" + k) }
            } else if let a = node as? [Any] {
                for (i, v) in a.enumerated() { walk(v, at + "/\(i)") }
            }
        }
        walk(doc, "#")
        let problemTypes = Set(
            ((((doc["components"] as? [String: Any])?["schemas"] as? [String: Any])?["Problem"] as? [String: Any])?[
                "properties"] as? [String: Any])?["type"].flatMap { ($0 as? [String: Any])?["enum"] as? [String] }
                ?? [])
        #expect(problemTypes == Set(ProblemType.allCases.map(\.uri)), "the document's problem types, the server's")
    }

    /// Numbers beyond Int's range where the server wants a whole number or text: a 400 naming the
    /// field. They crashed the API process (converting 1e300 to Int traps), as schemathesis found
    /// once the document gave it typed bodies to generate.
    @Test func hugeNumbersAreRefusedWithoutCrashing() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .admin, namespace: "default")
                for (body, field) in [
                    (#"{"name": "h", "executor": "noop", "retry": {"max_attempts": 1e300}}"#, "retry.max_attempts"),
                    (
                        #"{"name": "h", "executor": "noop", "concurrency": {"key": "k", "limit": -1e300}}"#,
                        "concurrency"
                    ),
                    (#"{"name": "h", "executor": "noop", "timeout": -1e300}"#, "timeout"),
                    (#"{"name": "h", "executor": "noop", "schedule": 1e300}"#, "schedule"),
                    // Numbers in text and in policies that no clock or interval can hold: they
                    // crashed the API (an interval's text, a cron's first time after `after`) or
                    // jammed the recording of outcomes (a retry's delay).
                    (#"{"name": "h", "executor": "noop", "schedule": "every 1e300s"}"#, "schedule"),
                    (#"{"name": "h", "executor": "noop", "schedule": "every 1e305d"}"#, "schedule"),
                    (#"{"name": "h", "executor": "noop", "schedule": "every 3651d"}"#, "schedule"),
                    (#"{"name": "h", "executor": "noop", "schedule": "0 * * * *", "after": "1e300s"}"#, "after"),
                    (#"{"name": "h", "executor": "noop", "timeout": 1e13}"#, "timeout"),
                    // An instant PostgreSQL cannot store (it has no year 0).
                    (#"{"name": "h", "executor": "noop", "start": "0000-06-01T00:00:00Z"}"#, "start"),
                    (
                        #"{"name": "h", "executor": "noop", "retry": {"max_attempts": 2, "base_seconds": 1e300}}"#,
                        "retry.base_seconds"
                    ),
                    (
                        #"{"name": "h", "executor": "noop", "retry": {"max_attempts": 2, "cap_seconds": 31536001}}"#,
                        "retry.cap_seconds"
                    ),
                ] {
                    let r = try await api.call("POST", "/v1/tasks", key: k, body: body)
                    #expect(r.status == 400 && r.json["field"]?.stringValue == field, "\(body): \(r.status) \(r.json)")
                }
                // The bounds themselves are accepted.
                let edge = try await api.call(
                    "POST", "/v1/tasks", key: k,
                    body: #"""
                        {"name": "edge", "executor": "noop", "schedule": "every 3650d", "timeout": 31536000,
                         "retry": {"max_attempts": 2, "base_seconds": 31536000, "cap_seconds": 31536000}}
                        """#)
                #expect(edge.status == 201, "\(edge.json)")
                let group = try await api.call(
                    "POST", "/v1/tasks", key: k, body: #"{"name": "g", "executor": "noop", "group": 1e300}"#)
                #expect(group.status == 201 && group.json["group"] == "1e+300", "\(group.json)")
            }
        }
    }

    /// A method a path does not have: 405 with `Allow`, not the 404 Hummingbird gives (which
    /// reads as "no such task").
    @Test func aMethodThePathLacksAnswers405WithAllow() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .admin, namespace: "default")
                for (method, path, allow) in [
                    ("DELETE", "/v1/runs", "GET"), ("PUT", "/v1/tasks/x", "DELETE, GET, PATCH"),
                    ("GET", "/v1/tasks/x/trigger", "POST"), ("POST", "/healthz", "GET"),
                    ("PATCH", "/v1/queues/q/limit", "DELETE, PUT"),
                ] {
                    let r = try await api.call(method, path, key: k, body: method == "GET" ? nil : "{}")
                    #expect(r.status == 405, "\(method) \(path): \(r.status) \(r.json)")
                    #expect(r.headers.first { $0.0.lowercased() == "allow" }?.1 == allow, "\(method) \(path)")
                    #expect(r.json["type"] == "urn:conveyor:problem:method-not-allowed", "\(r.json)")
                }
                let unknown = try await api.call("GET", "/v1/nothing", key: k)
                #expect(unknown.status == 404 && unknown.json["type"] == "urn:conveyor:problem:not-found")
                let task = try await api.call("GET", "/v1/tasks/nope", key: k)
                #expect(task.status == 404, "a path with its method but no such task stays 404")
                let stranger = try await api.call("DELETE", "/v1/runs")
                #expect(stranger.status == 401, "credentials are checked before the method")
            }
        }
    }

    /// The database unreachable: every authenticated route answers 503 with Retry-After (a
    /// client retries), not 500 (a bug to report), within seconds.
    @Test func anUnreachableDatabaseAnswers503WithRetryAfter() async throws {
        try await System.with { sys in
            // A pool whose server is gone: a port that was listening and is closed now.
            let gone = try TCPForwarder(upstreamPort: 1)
            let port = gone.port
            gone.stop()
            var c = PostgresPool.Configuration(
                url: "postgresql://conveyor@127.0.0.1:\(port)/conveyor?connect_timeout=2")
            c.connectRetryFor = .milliseconds(500)
            let pool = PostgresPool(configuration: c, logger: Servers.logger)
            defer { pool.close() }
            let down = System(
                databaseURL: sys.databaseURL, pool: pool, store: Store(pool: pool), prefix: sys.prefix, amqp: sys.amqp,
                queue: sys.queue, dispatcherAMQPURL: sys.dispatcherAMQPURL, workerAMQPURL: sys.workerAMQPURL,
                apiAMQPURL: sys.apiAMQPURL)
            let key = try await APITests.key(sys, role: .admin, namespace: "default")
            try await APITests.withAPI(down) { api, _ in
                for (method, path) in [("GET", "/v1/tasks"), ("POST", "/v1/tasks/a/trigger"), ("GET", "/v1/runs")] {
                    let r = try await api.call(method, path, key: key)
                    #expect(r.status == 503, "\(method) \(path): \(r.status) \(r.json)")
                    #expect(r.json["type"] == "urn:conveyor:problem:unavailable", "\(r.json)")
                    #expect(r.headers.first { $0.0.lowercased() == "retry-after" }?.1 == "5")
                }
                #expect(try await api.call("GET", "/readyz").status == 503)
            }
        }
    }

    @Test func responsesMatchTheirSchemas() async throws {
        try await System.with { sys in
            let doc = try Self.document()
            try await APITests.withAPI(sys) { api, _ in
                let k = try await APITests.key(sys, role: .admin, namespace: "default")
                func check(_ method: String, _ route: String, _ path: String, body: String? = nil, key: String? = nil)
                    async throws
                {
                    let r = try await api.call(method, path, key: key ?? k, body: body)
                    let schema = try #require(
                        Self.responseSchema(doc, route: route, method: method, status: r.status),
                        "\(method) \(route) answered \(r.status), which the document does not list")
                    let problems = Self.validate(r.json, schema, doc, at: "$")
                    #expect(problems.isEmpty, "\(method) \(path) \(r.status): \(problems)")
                }
                try await check("GET", "/healthz", "/healthz")
                try await check(
                    "POST", "/v1/tasks", "/v1/tasks",
                    body: #"{"name": "a", "executor": "noop", "schedule": "every 30s", "group": "g"}"#)
                try await check("POST", "/v1/tasks", "/v1/tasks", body: #"{"name": "a", "executor": "noop"}"#)
                try await check(
                    "POST", "/v1/tasks", "/v1/tasks", body: #"{"name": "b", "executor": "noop", "bogus": 1}"#)
                try await check("GET", "/v1/tasks", "/v1/tasks?limit=1")
                try await check("GET", "/v1/tasks/{name}", "/v1/tasks/a")
                try await check("GET", "/v1/tasks/{name}", "/v1/tasks/nope")
                try await check("POST", "/v1/tasks/{name}/trigger", "/v1/tasks/a/trigger")
                try await check("POST", "/v1/tasks/{name}/pause", "/v1/tasks/a/pause")
                try await check("POST", "/v1/tasks/{name}/resume", "/v1/tasks/a/resume")
                try await check("GET", "/v1/runs/{id}", "/v1/runs/\(UUID())")
                try await check("GET", "/v1/runs/{id}", "/v1/runs/not-a-uuid")
                try await check("GET", "/v1/tasks", "/v1/tasks", key: "cvk_000000000000_nope-nope-nope-nope-nope")
            }
        }
    }

    @Test func runsCanBeReadCancelledAndRedrivenAndWorkersListed() async throws {
        try await System.with { sys in
            let doc = try Self.document()
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            let worker = sys.worker(["long": ScriptedExecutor(recorder: recorder)], id: "api-worker") {
                $0.heartbeatInterval = .milliseconds(200)
                $0.startedAfter = .milliseconds(50)
            }
            try await withServices([dispatcher, worker]) {
                try await APITests.withAPI(sys) { api, _ in
                    let op = try await APITests.key(sys, role: .operator, namespace: "default")
                    let other = try await APITests.key(sys, role: .admin, namespace: "elsewhere")
                    func checked(_ method: String, _ route: String, _ path: String, key: String) async throws -> (
                        Int, JSONValue
                    ) {
                        let r = try await api.call(method, path, key: key)
                        let schema = try #require(
                            Self.responseSchema(doc, route: route, method: method, status: r.status),
                            "\(method) \(route) \(r.status) undocumented")
                        let problems = Self.validate(r.json, schema, doc, at: "$")
                        #expect(problems.isEmpty, "\(method) \(path) \(r.status): \(problems)")
                        return (r.status, r.json)
                    }
                    let created = try await api.call(
                        "POST", "/v1/tasks", key: op,
                        body:
                            """
                            {\"name\": \"slow\", \"executor\": \"long\", \"queue\": \"\(sys.queue)\", \"parameters\": \
                            {\"sleep_ms\": 30000}}
                            """
                    )
                    #expect(created.status == 201, "\(created.json)")
                    var runID = ""
                    _ = try await sys.eventually(timeout: .seconds(20), "the run starts") {
                        runID = try await sys.pool.withConnection { c in
                            try await c.query("SELECT id::text FROM runs WHERE state = 'running'").rows.first?[0] ?? ""
                        }
                        return !runID.isEmpty
                    }
                    let (status, run) = try await checked("GET", "/v1/runs/{id}", "/v1/runs/\(runID)", key: op)
                    #expect(status == 200 && run["state"] == "running" && run["worker_id"] == "api-worker")
                    #expect(
                        try await api.call("POST", "/v1/runs/\(runID)/cancel", key: other).status == 404,
                        "another namespace cannot see the run")
                    #expect(
                        try await checked("POST", "/v1/runs/{id}/cancel", "/v1/runs/\(runID)/cancel", key: op).0 == 200)
                    #expect(
                        try await checked("POST", "/v1/runs/{id}/cancel", "/v1/runs/\(runID)/cancel", key: op).0 == 409,
                        "a second cancel")
                    _ = try await sys.eventually(timeout: .seconds(10), "the worker stops the cancelled run") {
                        recorder.cancelled.withLock { $0.count } == 1
                    }
                    let (redriven, next) = try await checked(
                        "POST", "/v1/runs/{id}/redrive", "/v1/runs/\(runID)/redrive", key: op)
                    #expect(redriven == 201 && next["attempt"] == 2)
                    let (_, secondAttempt) = try await checked(
                        "GET", "/v1/runs/{id}", "/v1/runs/\(next["run_id"]?.stringValue ?? "")", key: op)
                    #expect(
                        secondAttempt["attempts"]?.arrayValue?.map { $0["attempt"] } == [1, 2],
                        "the run shows its occurrence's attempts")
                    #expect(secondAttempt["attempts"]?.arrayValue?.first?["state"] == "cancelled")
                    #expect(
                        try await checked("POST", "/v1/runs/{id}/redrive", "/v1/runs/\(runID)/redrive", key: op).0
                            == 409, "only the latest attempt")
                    // Workers are the fleet's: a key of one namespace is refused, a fleet viewer's is not.
                    #expect(try await checked("GET", "/v1/workers", "/v1/workers", key: op).0 == 403)
                    let fleet = try await APITests.key(sys, role: .viewer, namespace: "*")
                    let (_, workers) = try await checked("GET", "/v1/workers", "/v1/workers", key: fleet)
                    #expect(workers["workers"]?.arrayValue?.first?["id"] == "api-worker")

                    // Listing: two attempts of one occurrence, a page at a time.
                    let (_, first) = try await checked("GET", "/v1/runs", "/v1/runs?task=slow&limit=1", key: op)
                    let cursor = try #require(first["next_cursor"]?.stringValue)
                    let (_, second) = try await checked(
                        "GET", "/v1/runs", "/v1/runs?task=slow&limit=1&cursor=\(cursor)", key: op)
                    #expect(second["next_cursor"] == nil)
                    let ids = [first, second].compactMap { $0["runs"]?.arrayValue?.first?["id"]?.stringValue }
                    #expect(Set(ids).count == 2 && ids.contains(runID.lowercased()), "\(ids)")
                    let (_, cancelled) = try await checked("GET", "/v1/runs", "/v1/runs?state=cancelled", key: op)
                    #expect(cancelled["runs"]?.arrayValue?.map { $0["id"] } == [.string(runID.lowercased())])
                    #expect(
                        try await api.call("GET", "/v1/runs", key: other).json["runs"] == .array([]),
                        "another namespace sees none")
                    #expect(try await checked("GET", "/v1/runs", "/v1/runs?state=bogus", key: op).0 == 400)
                    #expect(try await checked("GET", "/v1/runs", "/v1/runs?since=yesterday", key: op).0 == 400)
                    #expect(try await checked("GET", "/v1/runs", "/v1/runs?task=nope", key: op).0 == 404)

                    #expect(try await checked("DELETE", "/v1/tasks/{name}", "/v1/tasks/slow", key: op).0 == 200)
                    #expect(try await checked("GET", "/v1/tasks/{name}", "/v1/tasks/slow", key: op).0 == 404)
                }
            }
        }
    }

    /// The JSON schema of a response, following `$ref`s of responses.
    static func responseSchema(_ doc: [String: Any], route: String, method: String, status: Int) -> [String: Any]? {
        guard
            let op = ((doc["paths"] as? [String: Any])?[route] as? [String: Any])?[method.lowercased()]
                as? [String: Any],
            var response = (op["responses"] as? [String: Any])?[String(status)] as? [String: Any]
        else { return nil }
        if let ref = response["$ref"] as? String { response = resolve(ref, doc) ?? [:] }
        let content = response["content"] as? [String: Any]
        return (content?.values.first as? [String: Any])?["schema"] as? [String: Any]
    }

    static func resolve(_ ref: String, _ doc: [String: Any]) -> [String: Any]? {
        var node: Any = doc
        for part in ref.dropFirst(2).split(separator: "/") { node = (node as? [String: Any])?[String(part)] as Any }
        return node as? [String: Any]
    }

    /// What is wrong with `value` under `schema` (a subset of JSON Schema: $ref, allOf, oneOf,
    /// anyOf, type, required, properties, additionalProperties false, items, enum).
    static func validate(_ value: JSONValue, _ schema: [String: Any], _ doc: [String: Any], at path: String) -> [String]
    {
        if let ref = schema["$ref"] as? String { return validate(value, resolve(ref, doc) ?? [:], doc, at: path) }
        var problems: [String] = []
        for sub in schema["allOf"] as? [[String: Any]] ?? [] { problems += validate(value, sub, doc, at: path) }
        if let one = schema["oneOf"] as? [[String: Any]] {
            let matching = one.filter { validate(value, $0, doc, at: path).isEmpty }.count
            if matching != 1 { problems.append("\(path): matches \(matching) of oneOf's \(one.count) schemas") }
        }
        if let any = schema["anyOf"] as? [[String: Any]],
            !any.contains(where: { validate(value, $0, doc, at: path).isEmpty })
        {
            problems.append("\(path): matches none of anyOf's schemas")
        }
        let types: [String] = (schema["type"] as? String).map { [$0] } ?? (schema["type"] as? [String] ?? [])
        if !types.isEmpty {
            let ok = types.contains { t in
                switch (t, value) {
                case ("object", .object), ("array", .array), ("string", .string), ("boolean", .bool),
                    ("number", .number):
                    true
                case ("integer", .number(let n)): n.rounded() == n
                case ("null", .null): true
                default: false
                }
            }
            if !ok { return problems + ["\(path): expected \(types), got \(value)"] }
        }
        if let e = schema["enum"] as? [String], case .string(let s) = value, !e.contains(s) {
            problems.append("\(path): '\(s)' not in \(e)")
        }
        if case .object(let o) = value {
            for r in schema["required"] as? [String] ?? [] where o[r] == nil {
                problems.append("\(path): missing '\(r)'")
            }
            let props = schema["properties"] as? [String: Any] ?? [:]
            for (k, v) in o {
                if let p = props[k] as? [String: Any] {
                    problems += validate(v, p, doc, at: "\(path).\(k)")
                } else if schema["additionalProperties"] as? Bool == false {
                    problems.append("\(path): unexpected '\(k)'")
                }
            }
        }
        if case .array(let a) = value, let items = schema["items"] as? [String: Any] {
            for (i, v) in a.enumerated() { problems += validate(v, items, doc, at: "\(path)[\(i)]") }
        }
        return problems
    }
}

/// JWT bearer tokens against the real API.
@Suite("REST API: JWT (real PostgreSQL)", .serialized)
struct JWTTests {
    struct Claims: JWTPayload {
        var iss: IssuerClaim
        var aud: AudienceClaim
        var sub: SubjectClaim
        var exp: ExpirationClaim
        var nbf: NotBeforeClaim?
        var role: String
        var namespace: String
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }

    static let secret = Array("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".utf8)

    static func token(
        iss: String = "https://auth.test", aud: String = "conveyor", expiresIn: TimeInterval = 300,
        role: String = "viewer",
        namespace: String = "default", digest: DigestAlgorithm = .sha256, key: [UInt8] = secret
    ) async throws -> String {
        let keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: key), digestAlgorithm: digest)
        return try await keys.sign(
            Claims(
                iss: .init(value: iss), aud: .init(value: [aud]), sub: "user-1",
                exp: .init(value: Date().addingTimeInterval(expiresIn)),
                nbf: nil, role: role, namespace: namespace))
    }

    /// Rotating the HS256 secret: with the old one as `hs256_previous_secret`, tokens it signed
    /// still verify, and the new one's too; a third secret's do not. Without the previous secret
    /// (the rotation done), the old tokens stop.
    @Test func anHS256SecretRotatesWithoutRefusingTokensInFlight() async throws {
        let new = Array("fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210".utf8)
        let during = try await JWTVerifier(
            JWTSettings(
                issuer: "https://auth.test", audience: "conveyor", hs256Secret: new, hs256PreviousSecret: Self.secret))
        let old = try await Self.token(key: Self.secret)
        let fresh = try await Self.token(key: new)
        let stranger = try await Self.token(key: Array(String(repeating: "z", count: 64).utf8))
        #expect(try (await during.verify(old)).get().role == .viewer)
        #expect(try (await during.verify(fresh)).get().role == .viewer)
        guard case .failure(.signature) = await during.verify(stranger) else {
            Issue.record("a token signed by neither secret verified")
            return
        }
        let after = try await JWTVerifier(
            JWTSettings(issuer: "https://auth.test", audience: "conveyor", hs256Secret: new))
        guard case .failure(.signature) = await after.verify(old) else {
            Issue.record("the old secret's token verified after the rotation")
            return
        }
        await #expect {
            _ = try await JWTVerifier(
                JWTSettings(issuer: "i", audience: "a", hs256PreviousSecret: Self.secret))
        } throws: { ($0 as? ValidationError)?.field == "auth.jwt.hs256_previous_secret_file" }
    }

    @Test func tokensAreCheckedForSignatureAlgorithmIssuerAudienceAndExpiry() async throws {
        let verifier = try await JWTVerifier(
            JWTSettings(
                issuer: "https://auth.test", audience: "conveyor", leeway: .seconds(30), hs256Secret: Self.secret))
        try await System.with { sys in
            try await APITests.withAPI(sys, jwt: verifier) { client, _ in
                func status(_ token: String) async throws -> (Int, String) {
                    let r = try await client.call("GET", "/v1/tasks", key: token)
                    return (r.status, r.json["detail"]?.stringValue ?? "")
                }
                #expect(try await status(try await Self.token()).0 == 200)
                #expect(
                    try await status(try await Self.token(expiresIn: -10)).0 == 200,
                    "expired 10 s ago: within the 30 s leeway")
                #expect(try await status(try await Self.token(expiresIn: -120)) == (401, "the token has expired"))
                #expect(
                    try await status(try await Self.token(aud: "someone-else")) == (
                        401, "the token's aud claim is not accepted"
                    ))
                #expect(
                    try await status(try await Self.token(iss: "https://evil.test")) == (
                        401, "the token's iss claim is not accepted"
                    ))
                #expect(
                    try await status(
                        try await Self.token(
                            key: Array("another-secret-another-secret-another-secret-another-secret-xx".utf8))) == (
                            401, "the token's signature does not verify"
                        ))
                #expect(
                    try await status(try await Self.token(digest: .sha384)).0 == 401,
                    "HS384 is not the algorithm pinned for the secret")
                #expect(try await status(try await Self.token(role: "superuser")).0 == 401)
                #expect(
                    try await status(try await Self.token(role: "viewer", namespace: "*")).0 == 401,
                    "only admins may span namespaces")
                // alg "none", unsigned.
                let header = Data(#"{"alg":"none","typ":"JWT"}"#.utf8).base64EncodedString().replacingOccurrences(
                    of: "=", with: "")
                let body = Data(
                    (#"{"iss":"https://auth.test","aud":"conveyor","sub":"x","exp":9999999999,"#
                        + #""role":"admin","namespace":"*"}"#).utf8
                )
                .base64EncodedString().replacingOccurrences(of: "=", with: "")
                #expect(try await status("\(header).\(body).").0 == 401, "an unsigned token")
                // The token's role and namespace apply like a key's.
                let viewer = try await Self.token(role: "viewer", namespace: "team-a")
                #expect(
                    try await client.call("POST", "/v1/tasks", key: viewer, body: #"{"name": "t", "executor": "noop"}"#)
                        .status == 403)
                let submitter = try await Self.token(role: "submitter", namespace: "team-a")
                #expect(
                    try await client.call(
                        "POST", "/v1/tasks", key: submitter, body: #"{"name": "t", "executor": "noop"}"#
                    ).status == 201)
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE namespace = 'team-a'") == 1)
            }
        }
    }

    /// Forgeries against a verifier holding an HS256 secret and an ES256 public key (JWKS).
    @Test func forgedTokensAreRefused() async throws {
        let ec = try ES256PrivateKey(backing: P256.Signing.PrivateKey())
        let params = try #require(ec.parameters)
        let jwks =
            #"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256", "#
            + #""x": "\#(params.x)", "y": "\#(params.y)"}]}"#
        let verifier = try await JWTVerifier(
            JWTSettings(
                issuer: "https://auth.test", audience: "conveyor", leeway: .seconds(30),
                hs256Secret: Self.secret, jwksJSON: jwks))
        func claims(role: String = "viewer", nbf: Date? = nil) -> Claims {
            Claims(
                iss: .init(value: "https://auth.test"), aud: .init(value: ["conveyor"]), sub: "user-1",
                exp: .init(value: Date().addingTimeInterval(300)),
                nbf: nbf.map { .init(value: $0) }, role: role, namespace: "default")
        }
        func refused(_ token: String) async -> String? {
            if case .failure(let why) = await verifier.verify(token) { return why.description }
            return nil
        }
        // The control: a token signed with the EC private key is accepted.
        let signer = JWTKeyCollection()
        await signer.add(ecdsa: ec, kid: "ec-1")
        let good = try await signer.sign(claims(), kid: "ec-1")
        #expect(await refused(good) == nil)

        // HS/RS confusion: HMAC with the public key as the secret, claiming the EC key's kid.
        let confused = JWTKeyCollection()
        await confused.add(hmac: HMACKey(from: Array(jwks.utf8)), digestAlgorithm: .sha256, kid: "ec-1")
        #expect(
            await refused(try await confused.sign(claims(role: "admin"), kid: "ec-1"))
                == "the token's algorithm HS256 is not the one pinned for its key")
        // The secret's key used with the EC kid, and the EC kid with no kid at all.
        let hsWithECKid = JWTKeyCollection()
        await hsWithECKid.add(hmac: HMACKey(from: Self.secret), digestAlgorithm: .sha256, kid: "ec-1")
        #expect(await refused(try await hsWithECKid.sign(claims(), kid: "ec-1")) != nil)

        // A future nbf (beyond the leeway).
        let hs = JWTKeyCollection()
        await hs.add(hmac: HMACKey(from: Self.secret), digestAlgorithm: .sha256)
        #expect(
            await refused(try await hs.sign(claims(nbf: Date().addingTimeInterval(600))))
                == "the token's nbf claim is not accepted")
        #expect(
            await refused(try await hs.sign(claims(nbf: Date().addingTimeInterval(10)))) == nil, "within the leeway")

        // A tampered payload: role raised to admin, signature kept.
        let parts = try await hs.sign(claims()).split(separator: ".").map(String.init)
        let raised = Data(
            (#"{"iss":"https://auth.test","aud":["conveyor"],"sub":"user-1","exp":9999999999,"#
                + #""role":"admin","namespace":"*"}"#).utf8
        )
        .base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
        .replacingOccurrences(of: "=", with: "")
        #expect(
            await refused([parts[0], raised, parts[2]].joined(separator: "."))
                == "the token's signature does not verify")
        // Garbage and a header with no alg.
        #expect(await refused("a.b.c") == "the bearer token is neither an API key nor a JWT")
        #expect(await refused("e30.e30.") == "the bearer token is neither an API key nor a JWT")

        // An oversized token is refused by the API before any parsing.
        try await System.with { sys in
            try await APITests.withAPI(sys, jwt: verifier) { client, _ in
                let huge = try await client.call("GET", "/v1/tasks", key: good + String(repeating: "A", count: 9000))
                #expect(huge.status == 401)
                #expect(huge.json["detail"] == "the credential is longer than 8192 characters")
                #expect(try await client.call("GET", "/v1/tasks", key: good).status == 200)
            }
        }
    }

    /// Bad API settings stop `conveyor api` with the key, the value and the fix.
    @Test func badAPISettingsStopStartUp() async throws {
        for (variable, value, expected) in [
            (
                "CONVEYOR_API_TRACE_LINK_TEMPLATE", "ftp://x",
                "invalid api.trace_link_template 'ftp://x': an http(s) URL containing {trace_id}"
            ),
            ("CONVEYOR_API_TRUSTED_PROXIES", "10.0.0.0/99", "api.trusted_proxies"),
            ("CONVEYOR_API_MAX_PAGE_SIZE", "0", "api.max_page_size"),
            ("CONVEYOR_API_MAX_EVENT_STREAMS_PER_KEY", "0", "api.max_event_streams_per_key"),
            ("CONVEYOR_API_RATE_LIMIT_PER_KEY_RATE_PER_SECOND", "-1", "api.rate_limit.per_key.rate_per_second"),
            // swift-otel would stop the process with fatalError on these; Conveyor refuses them by name.
            ("OTEL_PROPAGATORS", "tracecontext,b3", "invalid OTEL_PROPAGATORS 'tracecontext,b3'"),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc",
                "invalid OTEL_EXPORTER_OTLP_PROTOCOL 'grpc': this build exports OTLP over HTTP"
            ),
        ] {
            // Under timeout(1): were the value accepted, the API would serve until killed (status 124).
            let p = try Process.required("timeout", ["15", try conveyorBinary(), "api"])
            var e = ProcessInfo.processInfo.environment
            e["CONVEYOR_CONFIG_DIR"] = FileManager.default.currentDirectoryPath + "/config"
            e[variable] = value
            e["CONVEYOR_API_PORT"] = String(Int.random(in: 40_001...50_000))
            p.environment = e
            let err = Pipe()
            p.standardError = err
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            #expect(p.terminationStatus == 1, "\(variable)=\(value) was accepted (status \(p.terminationStatus))")
            #expect(text.contains(expected), "\(variable)=\(value): \(text)")
        }
    }

    @Test func misconfiguredJWTRefusesToStart() async throws {
        await #expect { _ = try await JWTVerifier(JWTSettings(issuer: "i", audience: "a")) } throws: {
            "\($0)".contains("auth.jwt")
        }
        await #expect {
            _ = try await JWTVerifier(JWTSettings(issuer: "i", audience: "a", hs256Secret: Array("short".utf8)))
        } throws: {
            "\($0)".contains("at least 32")
        }
        await #expect {
            _ = try await JWTVerifier(JWTSettings(issuer: "", audience: "a", hs256Secret: Self.secret))
        } throws: { "\($0)".contains("issuer") }
        await #expect {
            _ = try await JWTVerifier(
                JWTSettings(issuer: "i", audience: "a", leeway: .seconds(120), hs256Secret: Self.secret))
        } throws: {
            "\($0)".contains("at most 60")
        }
        await #expect {
            _ = try await JWTVerifier(
                JWTSettings(issuer: "i", audience: "a", jwksJSON: #"{"keys": [{"kty": "RSA", "kid": "k1"}]}"#))
        } throws: {
            "\($0)".contains("alg")
        }
    }
}

/// `conveyor dev` (what `scripts/run.sh` runs) serves the API and hands out a first admin key.
@Suite("conveyor dev with the API (real processes)")
struct DevCommandTests {
    @Test func devServesTheAPIAndPrintsAFirstAdminKeyOnce() async throws {
        try await System.with { sys in
            // Below Linux's ephemeral range (32768-60999): a port there may be any outgoing
            // connection's, and dev's bind failed with EADDRINUSE once.
            let port = Int.random(in: 20_000...32_000)
            let log = FileManager.default.temporaryDirectory.appendingPathComponent("dev-\(UUID()).log").path
            _ = FileManager.default.createFile(atPath: log, contents: nil)
            let p = try conveyorProcess(
                ["dev", "--workers", "1", "--api-port", "\(port)"],
                env: [
                    "CONVEYOR_DATABASE_URL": sys.databaseURL, "CONVEYOR_AMQP_URL": sys.dispatcherAMQPURL,
                    "CONVEYOR_AMQP_PREFIX": sys.prefix,
                ])
            p.standardOutput = FileHandle.nullDevice
            p.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
            // A directory of its own: dev leaves conveyorctl's configuration under its .local/.
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("dev-\(UUID())")
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(at: dir) }
            p.currentDirectoryURL = dir
            try p.run()
            defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
            var key = ""
            _ = try await sys.eventually(timeout: .seconds(30), "dev prints an admin key") {
                let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                key =
                    text.components(separatedBy: "admin key (shown once): ").dropFirst().first?.prefix { !$0.isNewline }
                    .description ?? ""
                return !key.isEmpty
            }
            var policy = OutboundPolicy()
            policy.allowedNetworks = [try Network(parsing: "127.0.0.1")]
            let client = APITests.Client(
                base: "http://127.0.0.1:\(port)", http: OutboundHTTP(policy: policy, logger: Servers.logger))
            var status = 0
            _ = try await sys.eventually(timeout: .seconds(20), "the API answers with the printed key") {
                status = (try? await client.call("GET", "/v1/tasks", key: key).status) ?? 0
                return status == 200
            }
            // The newcomer's second shell: conveyorctl works there with nothing set.
            let keyPath = dir.appendingPathComponent(".local/dev/api-key").path
            #expect(try String(contentsOfFile: keyPath, encoding: .utf8) == key + "\n")
            let mode = try FileManager.default.attributesOfItem(atPath: keyPath)[.posixPermissions] as? Int
            #expect(mode == 0o600, "the key file is the owner's only: \(String(mode ?? 0, radix: 8))")
            let add = try CtlTests.ctl(["task", "add", "hello", "--executor", "noop"], env: [:], in: dir)
            #expect(add.status == 0, "\(add.out)\(add.err)")
            #expect(try CtlTests.ctl(["task", "list"], env: [:], in: dir).out.contains("hello"))
            kill(p.processIdentifier, SIGTERM)
            p.waitUntilExit()
            #expect(p.terminationStatus == 0)
            #expect(try await sys.count("SELECT count(*) FROM api_keys WHERE role = 'admin' AND namespace = '*'") == 1)
        }
    }
}
