import ArgumentParser
import ConveyorAMQP
import ConveyorAPI
import ConveyorBroker
import ConveyorConfig
import ConveyorCore
import ConveyorHTTP
import ConveyorPostgres
import ConveyorStore
import Foundation
import Logging

struct APICommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "api",
        abstract:
            """
            Run the REST API (needs PostgreSQL). Every route but /healthz and /readyz needs an API key: see 'conveyor \
            apikey'.
            """
    )
    @OptionGroup var common: CommonOptions

    func run() async throws {
        let logger = try common.logger("conveyor.api")
        let s = try await common.settings("api.yaml")
        let host = try s.string("api.host", default: "0.0.0.0")
        let port = try s.int("api.port", default: 8080, range: 1...65_535)
        let c = try Connections(settings: s, poolSize: try s.int("database.pool_size", default: 10, range: 1...500))
        let jwt = try await Self.jwt(s)
        // A request during a database outage answers 503 within seconds rather than holding
        // the client while connections are retried for a minute.
        let pool = c.pool(logger: logger, connectRetryFor: .seconds(3))
        defer { pool.close() }
        let options = try Self.options(s)
        logger.info(
            "API authentication", metadata: ["auth.api_keys": "on", "auth.jwt": "\(jwt == nil ? "off" : "on")"])
        try await runUntilSignalled(
            [
                APIService(
                    host: host, port: port, store: Store(pool: pool), logger: logger, jwt: jwt, options: options,
                    broker: c.amqp, topology: ConveyorTopology(prefix: try s.string("amqp.prefix", default: "conveyor"))
                )
            ],
            logger: logger)
    }

    /// Rate limits, trusted proxies, page size and event streams per key (`api.*`).
    static func options(_ s: Settings) throws -> APIOptions {
        var o = APIOptions()
        func limit(_ key: String, _ d: APIOptions.Limit) throws -> APIOptions.Limit {
            APIOptions.Limit(
                rate: try s.double("\(key).rate_per_second", default: d.rate, range: 0.01...100_000),
                burst: try s.double("\(key).burst", default: d.burst, range: 1...1_000_000))
        }
        o.perKey = try limit("api.rate_limit.per_key", o.perKey)
        o.perAddress = try limit("api.rate_limit.per_address", o.perAddress)
        for p in Priority.allCases {
            o.submitByPriority[p] = try limit("api.rate_limit.submit.\(p.name)", o.submitByPriority[p] ?? o.perKey)
        }
        o.trustedProxies = try s.strings("api.trusted_proxies", default: []).map {
            text throws(ConveyorCore.ValidationError) in
            try Network(parsing: text, field: "api.trusted_proxies")
        }
        o.maxPage = try s.int("api.max_page_size", default: 100, range: 1...1000)
        o.maxEventStreamsPerKey = try s.int("api.max_event_streams_per_key", default: 4, range: 1...100)
        if let t = try s.optionalString("api.trace_link_template") {
            guard t.contains("{trace_id}"), let u = URL(string: t.replacingOccurrences(of: "{trace_id}", with: "x")),
                ["http", "https"].contains(u.scheme ?? ""), u.host != nil
            else {
                throw ValidationError(
                    field: "api.trace_link_template", value: t,
                    hint: "an http(s) URL containing {trace_id}, e.g. http://jaeger:16686/trace/{trace_id}")
            }
            o.traceLinkTemplate = t
        }
        return o
    }

    /// The JWT verifier when `auth.jwt.enabled`; it refuses to start without a key, an issuer
    /// and an audience. The HS256 secret comes from a file or the environment only.
    static func jwt(_ s: Settings) async throws -> JWTVerifier? {
        guard try s.bool("auth.jwt.enabled", default: false) else { return nil }
        var secret: [UInt8]?
        if let file = try s.optionalString("auth.jwt.hs256_secret_file") {
            guard let data = FileManager.default.contents(atPath: file) else {
                throw ValidationError(field: "auth.jwt.hs256_secret_file", value: file, hint: "the file cannot be read")
            }
            secret = Array(String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines).utf8)
        } else if let env = ProcessInfo.processInfo.environment["CONVEYOR_AUTH_JWT_HS256_SECRET"], !env.isEmpty {
            secret = Array(env.utf8)
        }
        var previous: [UInt8]?
        if let file = try s.optionalString("auth.jwt.hs256_previous_secret_file") {
            guard let data = FileManager.default.contents(atPath: file) else {
                throw ValidationError(
                    field: "auth.jwt.hs256_previous_secret_file", value: file, hint: "the file cannot be read")
            }
            previous = Array(String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines).utf8)
        } else if let env = ProcessInfo.processInfo.environment["CONVEYOR_AUTH_JWT_HS256_PREVIOUS_SECRET"], !env.isEmpty
        {
            previous = Array(env.utf8)
        }
        var jwks: String?
        if let file = try s.optionalString("auth.jwt.jwks_file") {
            guard let data = FileManager.default.contents(atPath: file) else {
                throw ValidationError(field: "auth.jwt.jwks_file", value: file, hint: "the file cannot be read")
            }
            jwks = String(decoding: data, as: UTF8.self)
        }
        let settings = JWTSettings(
            issuer: try s.string("auth.jwt.issuer", default: ""),
            audience: try s.string("auth.jwt.audience", default: ""),
            leeway: .seconds(try s.int("auth.jwt.leeway_seconds", default: 30, range: 0...60)),
            hs256Secret: secret, hs256PreviousSecret: previous, jwksJSON: jwks)
        return try await JWTVerifier(settings)
    }
}

struct APIKeyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "apikey", abstract: "Create, list and revoke API keys (needs database access).",
        subcommands: [Create.self, List.self, Revoke.self])

    /// An audit entry for a change made with database access, not through the API: the actor is
    /// `cli:<OS user>` (role `database`), the client this host, and the request id one of its own.
    static func cliAudit(_ action: String, target: String, namespace: String, _ detail: [String: JSONValue] = [:])
        -> Store.AuditEntry
    {
        let user =
            ProcessInfo.processInfo.environment["USER"] ?? ProcessInfo.processInfo.environment["LOGNAME"]
            ?? String(getuid())
        return Store.AuditEntry(
            actor: "cli:\(user)", role: "database", namespace: namespace, action: action, target: target,
            requestID: "cli-" + UUID().uuidString.lowercased(), client: ProcessInfo.processInfo.hostName,
            detail: .object(detail))
    }

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a key and print it once: it is stored only as a hash.")
        @OptionGroup var common: CommonOptions
        @Option(help: "What the key is for (shown in lists).") var name: String
        @Option(help: "admin, operator, submitter or viewer.") var role: String
        @Option(help: "The namespace it acts in; '*' (admin and viewer keys only) for every namespace.") var namespace =
            "default"
        @Option(name: .customLong("expires-days"), help: "Days until it expires; none when left out.") var expiresDays:
            Int?

        func validate() throws {
            _ = try APIKeyRules.check(
                role: role, namespace: namespace, expiresDays: expiresDays,
                fields: ("--role", "--namespace", "--expires-days"))
        }

        func run() async throws {
            let (key, prefix, hash) = APIKeyFormat.generate()
            let expires = expiresDays.map { Date().addingTimeInterval(Double($0) * 86_400) }
            try await common.withStore { store in
                try await store.createAPIKey(
                    prefix: prefix, secretHash: hash, name: name, role: role, namespace: namespace,
                    expiresAt: expires)
                try await store.audit(
                    APIKeyCommand.cliAudit(
                        "key.create", target: prefix, namespace: namespace,
                        [
                            "name": .string(name), "role": .string(role),
                            "expires_days": expiresDays.map { .number(Double($0)) } ?? .null,
                        ]))
            }
            print(key)
            FileHandle.standardError.write(
                Data(
                    """
                    API key \(prefix) created (\(role), namespace \(namespace)). It is shown only now: store it as a \
                    secret.\n
                    """
                    .utf8))
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Keys by prefix: role, namespace, expiry, revocation, last use and count.")
        @OptionGroup var common: CommonOptions

        func run() async throws {
            let keys = try await common.withStore { try await $0.apiKeys() }
            Table.print(
                ["PREFIX", "NAME", "ROLE", "NAMESPACE", "EXPIRES", "REVOKED", "LAST USED", "USES"],
                keys.map { k in
                    [
                        k.prefix, k.name, k.role, k.namespace, k.expiresAt.map(Timestamp.format) ?? "-",
                        k.revokedAt.map(Timestamp.format) ?? "-",
                        k.lastUsedAt.map(Timestamp.format) ?? "-", String(k.useCount),
                    ]
                })
        }
    }

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Revoke a key by its prefix; every API process refuses it within 30 s.")
        @OptionGroup var common: CommonOptions
        @Argument(help: "The key's prefix (the 12 hex digits after cvk_).") var prefix: String

        func run() async throws {
            // One connection for the lookup, the revocation and its audit entry.
            let revoked = try await common.withStore { store -> Bool in
                let namespace = try await store.apiKey(prefix: prefix)?.namespace
                guard try await store.revokeAPIKey(prefix: prefix) else { return false }
                try await store.audit(APIKeyCommand.cliAudit("key.revoke", target: prefix, namespace: namespace ?? "*"))
                return true
            }
            guard revoked else {
                throw ValidationError(
                    field: "prefix", value: prefix, hint: "no active key has this prefix; see 'conveyor apikey list'")
            }
            print("revoked \(prefix)")
        }
    }
}
