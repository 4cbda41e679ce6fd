import ConveyorCore
package import Instrumentation
import ServiceContextModule
import Synchronization
package import Tracing
import W3CTraceContext

/// Reads trace headers from a plain dictionary (environment, HTTP headers).
package struct DictionaryExtractor: Extractor {
    package init() {}
    package func extract(key: String, from carrier: [String: String]) -> String? { carrier[key] }
}

/// Writes trace headers into a plain dictionary.
package struct DictionaryInjector: Injector {
    package init() {}
    package func inject(_ value: String, forKey key: String, into carrier: inout [String: String]) {
        carrier[key] = value
    }
}

extension ServiceContext {
    /// The raw `baggage` header, carried through unchanged (swift-otel has no baggage propagator).
    package var baggageHeader: String? {
        get { self[BaggageKey.self] }
        set { self[BaggageKey.self] = newValue }
    }

    /// The W3C context of a `PropagatingTracer` span.
    var propagatedTraceContext: TraceContext? {
        get { self[PropagatedTraceContextKey.self] }
        set { self[PropagatedTraceContextKey.self] = newValue }
    }
}

private enum BaggageKey: ServiceContextKey { typealias Value = String }
private enum PropagatedTraceContextKey: ServiceContextKey { typealias Value = TraceContext }

/// Spans and their propagation for every hop of a run (see docs/tracing.md).
///
/// The tracer is the one bootstrapped into `InstrumentationSystem` by `Traces.bootstrap`:
/// swift-otel's when spans are exported, else `PropagatingTracer` (ids made and carried, nothing
/// recorded). A process that bootstrapped none (a program embedding a worker, the in-process
/// tests) gets `PropagatingTracer` too. Contexts are made and read by the same tracer, so one
/// process never mixes the two.
package enum Traces {
    /// The tracer spans start on. Kept once `bootstrap` ran: `InstrumentationSystem.tracer`
    /// searches and casts on every call, and a run reads it several times.
    package static var tracer: any Tracer {
        if let kept = bootstrapped.withLock({ $0 }) { return kept }
        let found = InstrumentationSystem.tracer
        return found is NoOpTracer ? PropagatingTracer() : found
    }

    static let bootstrapped = Mutex<(any Tracer)?>(nil)

    /// Starts a span; the caller ends it.
    package static func startSpan(
        _ name: String, context: ServiceContext, kind: SpanKind = .internal,
        attributes: SpanAttributes = [:]
    ) -> any Span {
        let span = tracer.startSpan(name, context: context, ofKind: kind)
        if !attributes.isEmpty { span.attributes = attributes }
        return span
    }

    /// The context carried by a message's or request's W3C headers (`traceparent`, `tracestate`,
    /// `baggage`), read through `extractor` (for AMQP messages, ConveyorAMQP's
    /// `AMQPHeadersExtractor`): a new trace's parent when none or malformed.
    ///
    /// Only the W3C values are handed to the tracer, checked here: a `tracestate` that does not
    /// parse is left out and the trace goes on (W3C Trace Context), where swift-otel would drop
    /// the whole context and log the carrier, every header of the message or request with it.
    package static func context<Carrier, Extract: Extractor>(_ carrier: Carrier, using extractor: Extract)
        -> ServiceContext
    where Extract.Carrier == Carrier {
        var ctx = ServiceContext.topLevel
        if let parent = extractor.extract(key: "traceparent", from: carrier) {
            var w3c = ["traceparent": parent]
            if let state = extractor.extract(key: "tracestate", from: carrier),
                (try? TraceContext(traceParentHeaderValue: parent, traceStateHeaderValue: state)) != nil
            {
                w3c["tracestate"] = state
            }
            tracer.extract(w3c, into: &ctx, using: DictionaryExtractor())
        }
        if let baggage = extractor.extract(key: "baggage", from: carrier), !baggage.isEmpty {
            ctx.baggageHeader = baggage
        }
        return ctx
    }

    /// The context of W3C headers in a dictionary (`traceparent`, `tracestate`, `baggage`).
    package static func context(headers: [String: String]) -> ServiceContext {
        context(headers, using: DictionaryExtractor())
    }

    /// The context of a stored `traceparent` (top level when nil or malformed).
    package static func context(traceparent: String?) -> ServiceContext {
        guard let traceparent else { return .topLevel }
        return context(headers: ["traceparent": traceparent])
    }

    /// `traceparent`, `tracestate` (when not empty) and `baggage` of `context`.
    package static func headers(_ context: ServiceContext) -> [String: String] {
        var out: [String: String] = [:]
        tracer.inject(context, into: &out, using: DictionaryInjector())
        if out["tracestate"]?.isEmpty == true { out["tracestate"] = nil }
        if let baggage = context.baggageHeader, !baggage.isEmpty { out["baggage"] = baggage }
        return out
    }

    /// Writes `context`'s W3C headers into a message's or request's headers through `injector`
    /// (for AMQP messages, ConveyorAMQP's `AMQPHeadersInjector`).
    package static func inject<Carrier, Inject: Injector>(
        _ context: ServiceContext, into carrier: inout Carrier, using injector: Inject
    )
    where Inject.Carrier == Carrier {
        for (k, v) in Self.headers(context) { injector.inject(v, forKey: k, into: &carrier) }
    }

    /// The `traceparent` header value of `context`.
    package static func traceparent(_ context: ServiceContext) -> String? { headers(context)["traceparent"] }

    /// The trace id of `context`.
    package static func traceID(_ context: ServiceContext) -> String? { Traceparent.traceID(traceparent(context)) }
}

/// The tracer of a process that bootstrapped none: W3C ids made and propagated, nothing
/// recorded or exported.
package struct PropagatingTracer: Tracer {
    package init() {}

    package struct Span: Tracing.Span {
        package let context: ServiceContext
        package var operationName: String {
            get { "" }
            nonmutating set {}
        }
        package var attributes: SpanAttributes {
            get { [:] }
            nonmutating set {}
        }
        package var isRecording: Bool { false }
        package func setStatus(_ status: SpanStatus) {}
        package func addEvent(_ event: SpanEvent) {}
        package func recordError<Instant: TracerInstant>(
            _ error: any Error, attributes: SpanAttributes, at instant: @autoclosure () -> Instant
        ) {}
        package func addLink(_ link: SpanLink) {}
        package func end<Instant: TracerInstant>(at instant: @autoclosure () -> Instant) {}
    }

    package func startSpan<Instant: TracerInstant>(
        _ operationName: String, context: @autoclosure () -> ServiceContext, ofKind kind: SpanKind,
        at instant: @autoclosure () -> Instant, function: String, file fileID: String, line: UInt
    ) -> Span {
        var ctx = context()
        let parent = ctx.propagatedTraceContext
        ctx.propagatedTraceContext = TraceContext(
            traceID: parent?.traceID ?? .random(), spanID: .random(),
            flags: parent?.flags ?? .sampled, state: parent?.state ?? TraceState([]))
        return Span(context: ctx)
    }

    package func activeSpan(identifiedBy context: ServiceContext) -> Span? { nil }
    package func forceFlush() {}

    package func inject<Carrier, Inject: Injector>(
        _ context: ServiceContext, into carrier: inout Carrier, using injector: Inject
    )
    where Inject.Carrier == Carrier {
        guard let tc = context.propagatedTraceContext else { return }
        injector.inject(tc.traceParentHeaderValue, forKey: "traceparent", into: &carrier)
        if let state = tc.traceStateHeaderValue, !state.isEmpty {
            injector.inject(state, forKey: "tracestate", into: &carrier)
        }
    }

    package func extract<Carrier, Extract: Extractor>(
        _ carrier: Carrier, into context: inout ServiceContext, using extractor: Extract
    )
    where Extract.Carrier == Carrier {
        guard let parent = extractor.extract(key: "traceparent", from: carrier),
            let tc = try? TraceContext(
                traceParentHeaderValue: parent,
                traceStateHeaderValue: extractor.extract(key: "tracestate", from: carrier))
        else { return }
        context.propagatedTraceContext = tc
    }
}
