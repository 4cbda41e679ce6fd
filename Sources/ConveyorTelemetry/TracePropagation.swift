public import ConveyorAMQP
public import Instrumentation
import ServiceContextModule
public import W3CTraceContext

/// Writes trace headers into AMQP message headers.
public struct AMQPHeadersInjector: Injector {
    public init() {}
    public func inject(_ value: String, forKey key: String, into carrier: inout AMQPHeaders) {
        carrier[key] = .string(value)
    }
}

/// Reads trace headers from AMQP message headers.
public struct AMQPHeadersExtractor: Extractor {
    public init() {}
    public func extract(key: String, from carrier: AMQPHeaders) -> String? {
        carrier[key]?.stringValue
    }
}

/// Reads trace headers from a plain dictionary (environment, HTTP headers).
public struct DictionaryExtractor: Extractor {
    public init() {}
    public func extract(key: String, from carrier: [String: String]) -> String? { carrier[key] }
}


extension ServiceContext {
    /// The W3C trace context of the current span.
    public var traceContext: TraceContext? {
        get { self[TraceContextKey.self] }
        set { self[TraceContextKey.self] = newValue }
    }

    /// The raw `baggage` header, carried through unchanged.
    public var baggageHeader: String? {
        get { self[BaggageKey.self] }
        set { self[BaggageKey.self] = newValue }
    }
}

private enum TraceContextKey: ServiceContextKey { typealias Value = TraceContext }
private enum BaggageKey: ServiceContextKey { typealias Value = String }

/// W3C Trace Context propagation (`traceparent`, `tracestate`, `baggage`), with no exporter
/// needed: ids are generated and carried whether or not spans are exported.
///
/// The OpenTelemetry bootstrap (a later step) replaces this with swift-otel's propagator; the
/// headers on the wire stay the same.
public struct W3CPropagation: Instrument {
    public init() {}

    public func inject<Carrier, Inject: Injector>(_ context: ServiceContext, into carrier: inout Carrier, using injector: Inject)
    where Inject.Carrier == Carrier {
        guard let tc = context.traceContext else { return }
        injector.inject(tc.traceParentHeaderValue, forKey: "traceparent", into: &carrier)
        if let state = tc.traceStateHeaderValue, !state.isEmpty {
            injector.inject(state, forKey: "tracestate", into: &carrier)
        }
        if let baggage = context.baggageHeader, !baggage.isEmpty {
            injector.inject(baggage, forKey: "baggage", into: &carrier)
        }
    }

    public func extract<Carrier, Extract: Extractor>(_ carrier: Carrier, into context: inout ServiceContext, using extractor: Extract)
    where Extract.Carrier == Carrier {
        guard let parent = extractor.extract(key: "traceparent", from: carrier),
              let tc = try? TraceContext(traceParentHeaderValue: parent, traceStateHeaderValue: extractor.extract(key: "tracestate", from: carrier))
        else { return }
        context.traceContext = tc
        if let baggage = extractor.extract(key: "baggage", from: carrier) { context.baggageHeader = baggage }
    }
}

/// Making and deriving span contexts.
public enum TraceIDs {
    /// A new root context (a scheduled occurrence with no parent), sampled.
    public static func newRoot() -> ServiceContext {
        var c = ServiceContext.topLevel
        c.traceContext = TraceContext(traceID: .random(), spanID: .random(), flags: .sampled, state: TraceState([]))
        return c
    }

    /// A child of `parent`: same trace and baggage, new span id. A context without a trace becomes a new root.
    public static func child(of parent: ServiceContext) -> ServiceContext {
        guard let p = parent.traceContext else { return newRoot() }
        var c = parent
        c.traceContext = TraceContext(traceID: p.traceID, spanID: .random(), flags: p.flags, state: p.state)
        return c
    }

    /// The `traceparent` of a new dispatch span: a child of `parent` (the request that created
    /// or triggered the task) when it parses, else a new root.
    public static func dispatchTraceParent(parent: String?) -> String {
        let span = parent.map { child(of: context(traceparent: $0)) } ?? newRoot()
        return span.traceContext!.traceParentHeaderValue
    }

    /// The context of a stored `traceparent` (empty when it does not parse).
    public static func context(traceparent: String) -> ServiceContext {
        var ctx = ServiceContext.topLevel
        W3CPropagation().extract(["traceparent": traceparent], into: &ctx, using: DictionaryExtractor())
        return ctx
    }

    /// The context carried by message headers (empty when there is none or it is malformed).
    public static func extract(_ headers: AMQPHeaders) -> ServiceContext {
        var ctx = ServiceContext.topLevel
        W3CPropagation().extract(headers, into: &ctx, using: AMQPHeadersExtractor())
        return ctx
    }

    /// Headers for `context`.
    public static func inject(_ context: ServiceContext, into headers: inout AMQPHeaders) {
        W3CPropagation().inject(context, into: &headers, using: AMQPHeadersInjector())
    }

    /// The `traceparent` header value of `context`.
    public static func traceparent(_ context: ServiceContext) -> String? { context.traceContext?.traceParentHeaderValue }

    /// The `tracestate` header value of `context`, if any.
    public static func tracestate(_ context: ServiceContext) -> String? { context.traceContext?.traceStateHeaderValue }

    /// The trace id, 32 lowercase hex digits.
    public static func traceID(_ context: ServiceContext) -> String? {
        context.traceContext.map { "\($0.traceID)" }
    }
}
