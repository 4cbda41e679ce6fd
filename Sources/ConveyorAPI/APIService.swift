package import ConveyorAMQP
package import ConveyorBroker
import ConveyorCore
package import ConveyorStore
import Hummingbird
package import Logging
import ServiceLifecycle

/// The API as a service: the HTTP server, and the writer of API key usage (every 10 s).
package struct APIService: Service {
    package let host: String
    package let port: Int
    package let env: APIEnvironment
    let logger: Logger
    /// Called with the bound port once listening (tests bind port 0).
    let onListening: @Sendable (Int) -> Void

    package init(
        host: String, port: Int, store: Store, logger: Logger, keyCacheTTL: Duration = .seconds(30),
        jwt: JWTVerifier? = nil,
        options: APIOptions = APIOptions(), broker: AMQPConfiguration? = nil,
        topology: ConveyorTopology = ConveyorTopology(), clock: APIClock = .continuous,
        onListening: @escaping @Sendable (Int) -> Void = { _ in }
    ) {
        self.host = host
        self.port = port
        self.env = APIEnvironment(
            store: store, keys: KeyAuthenticator(store: store, ttl: keyCacheTTL, clock: clock), jwt: jwt,
            options: options,
            broker: broker, topology: topology, logger: logger, clock: clock)
        self.logger = logger
        self.onListening = onListening
    }

    package func run() async throws {
        let app = Application(
            router: APIServer.router(env),
            configuration: .init(address: .hostname(host, port: port), serverName: "conveyor"),
            onServerRunning: { channel in onListening(channel.localAddress?.port ?? port) },
            logger: logger)
        let keys = env.keys
        let logger = logger
        // Key usage is written every 10 s and once more after the server has stopped. That last
        // write runs in a task that is told to stop, not cancelled: a cancelled task's query is
        // sent a cancel request, which aborted the write and lost the counts.
        let stop = Wakeup()
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask {
                while !Task.isCancelled {
                    let stopping = await stop.wait(timeout: .seconds(10))
                    do { try await keys.flush() } catch {
                        logger.debug("API key usage not written yet", metadata: ["error": "\(error)"])
                    }
                    if stopping { return }
                }
            }
            // `run()`, not `runService()`: the latter is a ServiceGroup of its own that handles SIGTERM,
            // and would race the owner's group for it.
            try await app.run()
            stop.signal()
        }
        env.inspector?.close()
    }
}
