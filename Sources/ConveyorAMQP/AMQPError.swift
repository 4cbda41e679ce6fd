/// An error from the broker or from talking to it.
public struct AMQPError: Error, Sendable, CustomStringConvertible {
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        enum Base: String, Sendable {
            case connection, notConnected, accessRefused, closedByBroker, consumerCancelled, timeout, nacked,
                unroutable, invalidURL, stopped, protocolError
        }
        let base: Base
        /// The TCP connection or the login failed, or the socket broke.
        public static let connection = Code(base: .connection)
        /// The client is between connections (circuit open): the call failed fast without trying.
        public static let notConnected = Code(base: .notConnected)
        /// The login lacks a permission (the broker answered 403 ACCESS_REFUSED): fatal at start-up.
        public static let accessRefused = Code(base: .accessRefused)
        /// The broker closed the channel or connection (see `replyCode`).
        public static let closedByBroker = Code(base: .closedByBroker)
        /// The broker cancelled a consumer (`basic.cancel`: its queue was deleted). The consumer
        /// reconnects, which declares the queue again.
        public static let consumerCancelled = Code(base: .consumerCancelled)
        /// No confirm or reply within the configured timeout.
        public static let timeout = Code(base: .timeout)
        /// The broker refused the message (basic.nack): it was not stored.
        public static let nacked = Code(base: .nacked)
        /// No queue is bound for the routing key: the message was returned (mandatory).
        public static let unroutable = Code(base: .unroutable)
        /// The URL is not `amqp://user:pass@host:port/vhost`.
        public static let invalidURL = Code(base: .invalidURL)
        /// The client was shut down.
        public static let stopped = Code(base: .stopped)
        /// An unexpected frame or state.
        public static let protocolError = Code(base: .protocolError)
        public var description: String { base.rawValue }
    }

    public var code: Code
    public var message: String
    /// The AMQP reply code when the broker closed something (404 not found, 406 precondition failed, 320 forced).
    public var replyCode: Int?

    public init(code: Code, message: String, replyCode: Int? = nil) {
        self.code = code
        self.message = message
        self.replyCode = replyCode
    }

    /// Whether the same call may succeed later (after a reconnect).
    public var isRetriable: Bool {
        switch code.base {
        case .connection, .notConnected, .closedByBroker, .consumerCancelled, .timeout, .nacked: true
        case .accessRefused, .unroutable, .invalidURL, .stopped, .protocolError: false
        }
    }

    public var description: String {
        "amqp \(code)\(replyCode.map { " (\($0))" } ?? ""): \(message)"
    }
}
