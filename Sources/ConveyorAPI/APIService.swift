public import ConveyorAMQP
public import ConveyorStore
import Hummingbird
public import Logging
public import ServiceLifecycle

/// The API as a service: the HTTP server, and the writer of API key usage (every 10 s).
public struct APIService: Service {
    public let host: String
    public let port: Int
    public let env: APIEnvironment
    let logger: Logger
    /// Called with the bound port once listening (tests bind port 0).
    let onListening: @Sendable (Int) -> Void

    public init(host: String, port: Int, store: Store, logger: Logger, keyCacheTTL: Duration = .seconds(30), jwt: JWTVerifier? = nil,
                options: APIOptions = APIOptions(), broker: AMQPConfiguration? = nil, topology: ConveyorTopology = ConveyorTopology(),
                onListening: @escaping @Sendable (Int) -> Void = { _ in }) {
        self.host = host
        self.port = port
        self.env = APIEnvironment(store: store, keys: KeyAuthenticator(store: store, ttl: keyCacheTTL), jwt: jwt, options: options,
                                  broker: broker, topology: topology, logger: logger)
        self.logger = logger
        self.onListening = onListening
    }

    public func run() async throws {
        let app = Application(router: APIServer.router(env),
                              configuration: .init(address: .hostname(host, port: port), serverName: "conveyor"),
                              onServerRunning: { channel in onListening(channel.localAddress?.port ?? port) },
                              logger: logger)
        let keys = env.keys, logger = logger
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask {
                while !Task.isCancelled && !Task.isShuttingDownGracefully {
                    try? await Task.sleep(for: .seconds(10))
                    do { try await keys.flush() } catch { logger.debug("API key usage not written yet", metadata: ["error": "\(error)"]) }
                }
                try? await keys.flush()
            }
            try await app.runService()
            group.cancelAll()
        }
    }
}
