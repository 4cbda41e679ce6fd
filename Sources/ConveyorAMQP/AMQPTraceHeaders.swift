import Instrumentation

/// Writes trace headers (`traceparent`, `tracestate`, `baggage`) into AMQP message headers, as
/// strings: the carrier an instrument injects into for a message it publishes.
package struct AMQPHeadersInjector: Injector {
    package init() {}
    package func inject(_ value: String, forKey key: String, into carrier: inout AMQPHeaders) {
        carrier[key] = .string(value)
    }
}

/// Reads trace headers from AMQP message headers; a header that is not a string is absent.
package struct AMQPHeadersExtractor: Extractor {
    package init() {}
    package func extract(key: String, from carrier: AMQPHeaders) -> String? {
        carrier[key]?.stringValue
    }
}
