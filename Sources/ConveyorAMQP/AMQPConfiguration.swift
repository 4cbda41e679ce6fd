import CRabbitMQ
import ConveyorCore
import Foundation

/// How to reach the broker.
public struct AMQPConfiguration: Sendable {
    /// `amqp://user:pass@host:port/vhost`. Env `CONVEYOR_AMQP_URL`. Missing parts take
    /// rabbitmq-c's defaults (port 5672, vhost `/`).
    public var url: String
    /// Heartbeat interval negotiated with the broker. Default 10 s.
    public var heartbeat: Duration = .seconds(10)
    /// Bound on connect, login and every synchronous method. Default 10 s.
    public var operationTimeout: Duration = .seconds(10)
    /// Bound on waiting for a publisher confirm. Default 30 s.
    public var confirmTimeout: Duration = .seconds(30)
    /// Reconnect backoff: base and cap (full jitter). Default 100 ms, 2 s. The cap bounds how
    /// long a process waits, after the broker comes back, before its next attempt; 2 s keeps every
    /// reconnect inside the documented 5 s (docs/reliability.md, scenario 4) with room for a
    /// consume refused while quorum queues restart. Setting `amqp.reconnect_max_ms`.
    public var reconnectBase: Duration = .milliseconds(100)
    public var reconnectCap: Duration = .seconds(2)
    /// How long start-up waits for a first connection before failing with a clear error. Default 60 s.
    public var connectRetryFor: Duration = .seconds(60)
    /// Connection name: the broker shows it (`rabbitmqctl list_connections client_properties`,
    /// the management UI's "Client-provided name"), e.g. `worker w1 work` or
    /// `dispatcher host-123 publish`.
    public var name: String = "conveyor"
    /// Test only (the fault suite's negative control): a publish counts as confirmed once it is
    /// written to the socket, without waiting for the broker. Never set in production.
    public var publishWithoutConfirms = false

    public init(url: String) { self.url = url }

    /// The same settings under another connection name.
    public func named(_ name: String) -> AMQPConfiguration {
        var c = self
        c.name = name
        return c
    }

    struct Endpoint: Sendable {
        var host: String, port: Int, vhost: String, user: String, password: String
    }

    /// Checks the URL now, so a bad one stops start-up with a clear error.
    public func validate() throws(AMQPError) { _ = try endpoint() }

    /// Parses the URL with rabbitmq-c's own parser.
    func endpoint() throws(AMQPError) -> Endpoint {
        var info = amqp_connection_info()
        amqp_default_connection_info(&info)
        guard let buffer = strdup(url) else { throw AMQPError(code: .invalidURL, message: "out of memory") }
        defer { free(buffer) }
        guard amqp_parse_url(buffer, &info) == AMQP_STATUS_OK.rawValue else {
            throw AMQPError(
                code: .invalidURL,
                message:
                    """
                    CONVEYOR_AMQP_URL '\(redactedURL)' is not an AMQP URL: use amqp://user:password@host:5672/vhost \
                    (vhost '/' is %2F)
                    """
            )
        }
        return Endpoint(
            host: String(cString: info.host), port: Int(info.port), vhost: String(cString: info.vhost),
            user: String(cString: info.user), password: String(cString: info.password))
    }

    /// The URL with its password replaced by `***`.
    public var redactedURL: String { redactPassword(in: url) }
}

extension Duration {
    var timeval: timeval {
        let c = components
        return Glibc.timeval(tv_sec: Int(c.seconds), tv_usec: Int(c.attoseconds / 1_000_000_000_000))
    }
}
