public import Instrumentation

/// Writes trace headers (`traceparent`, `tracestate`, `baggage`) into AMQP message headers, as
/// strings: the carrier an instrument injects into for a message it publishes.
public struct AMQPHeadersInjector: Injector {
    public init() {}
    public func inject(_ value: String, forKey key: String, into carrier: inout AMQPHeaders) {
        carrier[key] = .string(value)
    }
}

/// Reads trace headers from AMQP message headers; a header that is not a string is absent.
public struct AMQPHeadersExtractor: Extractor {
    public init() {}
    public func extract(key: String, from carrier: AMQPHeaders) -> String? {
        carrier[key]?.stringValue
    }
}
