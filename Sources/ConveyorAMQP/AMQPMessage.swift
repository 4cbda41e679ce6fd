import Foundation

/// Properties of a message, the subset Conveyor reads and writes.
package struct AMQPProperties: Sendable, Hashable {
    package var contentType: String?
    package var messageID: String?
    package var type: String?
    /// Seconds since the epoch.
    package var timestamp: UInt64?
    /// Per-message TTL in milliseconds, as a string (AMQP's form).
    package var expiration: String?
    /// `delivery-mode: 2`.
    package var persistent: Bool
    package var headers: AMQPHeaders

    package init(
        contentType: String? = "application/json", messageID: String? = nil, type: String? = nil,
        timestamp: UInt64? = nil, expiration: String? = nil, persistent: Bool = true, headers: AMQPHeaders = [:]
    ) {
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
package struct AMQPOutgoingMessage: Sendable {
    package var exchange: String
    package var routingKey: String
    package var body: [UInt8]
    package var properties: AMQPProperties
    /// Whether a message no queue takes fails as `.unroutable` (the default) instead of being
    /// dropped by the broker.
    package var mandatory: Bool

    package init(
        exchange: String, routingKey: String, body: [UInt8], properties: AMQPProperties, mandatory: Bool = true
    ) {
        self.exchange = exchange
        self.routingKey = routingKey
        self.body = body
        self.properties = properties
        self.mandatory = mandatory
    }
}

/// A message delivered to a consumer. Acknowledge it through the consumer that delivered it.
package struct AMQPDelivery: Sendable {
    package var body: [UInt8]
    package var properties: AMQPProperties
    package var routingKey: String
    package var exchange: String
    package var redelivered: Bool
    /// The queue it came from (the consumer tag is the queue name).
    package var queue: String
    package var deliveryTag: UInt64
    /// Which connection delivered it: a tag is only meaningful on the connection that issued it.
    package var generation: UInt64
}
