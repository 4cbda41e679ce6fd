import CRabbitMQ
import ConveyorCore
import Foundation

/// How to reach the broker.
public struct AMQPConfiguration: Sendable {
    /// `amqp://user:pass@host:port/vhost`, or several such URLs separated by commas: one per
    /// node of a cluster. Env `CONVEYOR_AMQP_URL`. Missing parts take rabbitmq-c's defaults
    /// (port 5672, vhost `/`). A comma inside a password is written `%2C`.
    ///
    /// With several, each connection starts at a random entry (so a fleet spreads its
    /// connections over the nodes) and moves to the next one after a failed connect or a lost
    /// connection, with the same backoff as a single URL.
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
    /// Test only: every connection starts at the first endpoint of the list instead of a random
    /// one, so a test knows which endpoint a connection uses.
    package var startAtFirstEndpoint = false

    public init(url: String) { self.url = url }

    /// The same settings under another connection name.
    public func named(_ name: String) -> AMQPConfiguration {
        var c = self
        c.name = name
        return c
    }

    package struct Endpoint: Sendable {
        package var host: String, port: Int, vhost: String, user: String, password: String
        /// This entry's URL with its password replaced by `***`, for messages.
        package var redacted: String
    }

    /// The entries of `url`, in order.
    public var urls: [String] {
        url.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    /// Checks every URL now, so a bad one stops start-up with a clear error.
    public func validate() throws(AMQPError) { _ = try endpoints() }

    /// Parses every entry with rabbitmq-c's own parser. An entry that does not start with
    /// `amqp://` is refused by name: it is most often the tail of a password that held a comma.
    /// `amqps://` is refused too: connections are plain TCP, and a TLS URL must not quietly
    /// become one.
    package func endpoints() throws(AMQPError) -> [Endpoint] {
        let urls = urls
        guard !urls.isEmpty else {
            throw AMQPError(
                code: .invalidURL,
                message: "CONVEYOR_AMQP_URL is empty: use amqp://user:password@host:5672/vhost (vhost '/' is %2F)")
        }
        // Entries are checked for their scheme first, and such an entry is not echoed: it is most
        // often a password's tail, and the entry before it the password's head.
        if let i = urls.firstIndex(where: { !$0.lowercased().hasPrefix("amqp") }) {
            throw AMQPError(
                code: .invalidURL,
                message:
                    """
                    CONVEYOR_AMQP_URL: entry \(i + 1) of \(urls.count) (split at commas) does not start with amqp://. \
                    Several brokers are separated by commas, so a comma inside a password must be written %2C
                    """
            )
        }
        var out: [Endpoint] = []
        for (i, entry) in urls.enumerated() {
            let which = urls.count == 1 ? "" : " (entry \(i + 1) of \(urls.count))"
            var info = amqp_connection_info()
            amqp_default_connection_info(&info)
            guard let buffer = strdup(entry) else { throw AMQPError(code: .invalidURL, message: "out of memory") }
            defer { free(buffer) }
            if entry.lowercased().hasPrefix("amqps://") {
                throw AMQPError(
                    code: .invalidURL,
                    message:
                        """
                        CONVEYOR_AMQP_URL '\(redactPassword(in: entry))'\(which) asks for TLS (amqps://), which \
                        Conveyor's broker connections do not speak: use amqp:// on a private network, or a TLS \
                        sidecar or tunnel that presents plain AMQP locally
                        """
                )
            }
            guard entry.lowercased().hasPrefix("amqp://"), amqp_parse_url(buffer, &info) == AMQP_STATUS_OK.rawValue
            else {
                throw AMQPError(
                    code: .invalidURL,
                    message:
                        """
                        CONVEYOR_AMQP_URL '\(redactPassword(in: entry))'\(which) is not an AMQP URL: use \
                        amqp://user:password@host:5672/vhost (vhost '/' is %2F), several separated by commas \
                        (a comma in a password is %2C)
                        """
                )
            }
            out.append(
                Endpoint(
                    host: String(cString: info.host), port: Int(info.port), vhost: String(cString: info.vhost),
                    user: String(cString: info.user), password: String(cString: info.password),
                    redacted: redactPassword(in: entry)))
        }
        return out
    }

    /// The URL (every entry) with its passwords replaced by `***`.
    public var redactedURL: String { redactPassword(in: url) }
}

extension Duration {
    var timeval: timeval {
        let c = components
        return Glibc.timeval(tv_sec: Int(c.seconds), tv_usec: Int(c.attoseconds / 1_000_000_000_000))
    }
}
