import Foundation

/// Properties of a message, the subset Conveyor reads and writes.
public struct AMQPProperties: Sendable, Hashable {
    public var contentType: String?
    public var messageID: String?
    public var type: String?
    /// Seconds since the epoch.
    public var timestamp: UInt64?
    /// Per-message TTL in milliseconds, as a string (AMQP's form).
    public var expiration: String?
    /// `delivery-mode: 2`.
    public var persistent: Bool
    public var headers: AMQPHeaders

    public init(contentType: String? = "application/json", messageID: String? = nil, type: String? = nil,
                timestamp: UInt64? = nil, expiration: String? = nil, persistent: Bool = true, headers: AMQPHeaders = [:]) {
        self.contentType = contentType
        self.messageID = messageID
        self.type = type
        self.timestamp = timestamp
        self.expiration = expiration
        self.persistent = persistent
        self.headers = headers
    }
}

/// A message to publish.
public struct AMQPOutgoingMessage: Sendable {
    public var exchange: String
    public var routingKey: String
    public var body: [UInt8]
    public var properties: AMQPProperties
    /// Whether a message no queue takes fails as `.unroutable` (the default) instead of being
    /// dropped by the broker.
    public var mandatory: Bool

    public init(exchange: String, routingKey: String, body: [UInt8], properties: AMQPProperties, mandatory: Bool = true) {
        self.exchange = exchange
        self.routingKey = routingKey
        self.body = body
        self.properties = properties
        self.mandatory = mandatory
    }
}

/// A message delivered to a consumer. Acknowledge it through the consumer that delivered it.
public struct AMQPDelivery: Sendable {
    public var body: [UInt8]
    public var properties: AMQPProperties
    public var routingKey: String
    public var exchange: String
    public var redelivered: Bool
    /// The queue it came from (the consumer tag is the queue name).
    public var queue: String
    public var deliveryTag: UInt64
    /// Which connection delivered it: a tag is only meaningful on the connection that issued it.
    public var generation: UInt64
}
