package import ConveyorCore
import Foundation
package import Logging
import OTel
package import ServiceLifecycle
import Synchronization
import Tracing

extension Traces {
    /// Bootstraps swift-otel's tracer from the standard `OTEL_*` variables and returns the
    /// service that batches and exports spans: run it first in the process's ServiceGroup, so
    /// it shuts down last and flushes what the others ended.
    ///
    /// - Without `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`, or an explicit
    ///   `OTEL_TRACES_EXPORTER=otlp`), or with `OTEL_SDK_DISABLED=true` or
    ///   `OTEL_TRACES_EXPORTER=none`, the tracer is `PropagatingTracer`: ids are made and
    ///   propagated, nothing is recorded (recording spans that go nowhere cost measurable
    ///   throughput: docs/benchmarks.md), and nil is returned.
    /// - Values swift-otel would stop the process on (a gRPC protocol, B3 propagation, a Jaeger
    ///   sampler) are refused here with an error that names the variable.
    package static func bootstrap(serviceName: String, environment env: [String: String], logger: Logger)
        throws(ValidationError) -> (any Service)?
    {
        try validate(env)
        let endpoint = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] ?? env["OTEL_EXPORTER_OTLP_ENDPOINT"] ?? ""
        let exporter = env["OTEL_TRACES_EXPORTER"]?.lowercased() ?? (endpoint.isEmpty ? "none" : "otlp")
        if env["OTEL_SDK_DISABLED"]?.lowercased() == "true" || exporter == "none" {
            InstrumentationSystem.bootstrap(PropagatingTracer())
            bootstrapped.withLock { $0 = PropagatingTracer() }
            return nil
        }
        var config = OTel.Configuration.default
        config.serviceName = serviceName
        // swift-otel reports lost spans only as log lines: they are counted from those.
        var diagnostics = logger
        diagnostics.handler = SpanDropCounter(wrapped: logger.handler)
        config.diagnosticLogger = .custom(diagnostics)
        config.diagnosticLogLevel = .warning
        config.propagators = [.traceContext]  // baggage is carried by Traces itself
        config.metrics.enabled = false  // metrics are Prometheus (/metrics)
        config.logs.enabled = false  // logs are the structured handler's
        // Only the variables about traces reach swift-otel; the others were handled above.
        let passed = env.filter { key, _ in
            key == "OTEL_SERVICE_NAME" || key == "OTEL_RESOURCE_ATTRIBUTES" || key.hasPrefix("OTEL_TRACES_")
                || key.hasPrefix("OTEL_BSP_")
                || (key.hasPrefix("OTEL_EXPORTER_OTLP_") && !key.hasPrefix("OTEL_EXPORTER_OTLP_METRICS_")
                    && !key.hasPrefix("OTEL_EXPORTER_OTLP_LOGS_"))
        }.merging(batchDefaults) { set, _ in set }
        do {
            let service = try OTel.bootstrap(configuration: config, environment: passed)
            bootstrapped.withLock { $0 = InstrumentationSystem.tracer }
            return service
        } catch {
            throw ValidationError(
                field: "OTEL_* environment", value: "\(error)",
                hint: "see docs/tracing.md for the variables Conveyor reads")
        }
    }

    /// Conveyor's batching where the `OTEL_BSP_*` variable is unset. swift-otel exports one
    /// batch per tick (the schedule delay, or a full queue); with the specification's defaults
    /// (5000 ms, 512 of a queue of 2048) that is about 100 spans a second before the queue
    /// fills and drops, and a dispatcher at 2,000 runs/s makes 2,000. A tick every 200 ms of
    /// up to 2048 spans carries 10,000 a second; the queue holds 16,384 (about 16 MB at most)
    /// for a collector that is slow for a few seconds. docs/tracing.md, "Dropped spans".
    static let batchDefaults = [
        "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2048", "OTEL_BSP_MAX_QUEUE_SIZE": "16384",
    ]

    static let samplers = [
        "always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
        "parentbased_traceidratio",
    ]

    /// Refuses the values swift-otel 1.6 does not support (it would call fatalError on them).
    static func validate(_ env: [String: String]) throws(ValidationError) {
        if let v = env["OTEL_PROPAGATORS"] {
            for p in v.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces).lowercased() })
            where !["tracecontext", "baggage", ""].contains(p) {
                throw ValidationError(
                    field: "OTEL_PROPAGATORS", value: v,
                    hint:
                        """
                        Conveyor propagates W3C tracecontext and baggage; '\(p)' is not supported: use \
                        tracecontext,baggage or unset it
                        """
                )
            }
        }
        if let v = env["OTEL_TRACES_SAMPLER"], !samplers.contains(v.lowercased()) {
            throw ValidationError(
                field: "OTEL_TRACES_SAMPLER", value: v, hint: "use one of \(samplers.joined(separator: ", "))")
        }
        if let v = env["OTEL_TRACES_EXPORTER"], !["otlp", "none"].contains(v.lowercased()) {
            throw ValidationError(
                field: "OTEL_TRACES_EXPORTER", value: v, hint: "use otlp (with OTEL_EXPORTER_OTLP_ENDPOINT) or none")
        }
        for key in ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] {
            if let v = env[key], !["http/protobuf", "http/json"].contains(v.lowercased()) {
                throw ValidationError(
                    field: key, value: v,
                    hint: "this build exports OTLP over HTTP: use http/protobuf (collector port 4318) or http/json")
            }
        }
    }
}

/// The process's log handler, plus a count of the spans swift-otel says it lost: its batch
/// processor logs `Spans were dropped this iteration because queue was full` (metadata
/// `dropped_count`) and `Failed to export batch.` (metadata `batch_size`), and has no other
/// report of them. Every line still reaches the wrapped handler.
struct SpanDropCounter: LogHandler {
    var wrapped: any LogHandler

    var metadata: Logger.Metadata {
        get { wrapped.metadata }
        set { wrapped.metadata = newValue }
    }
    var logLevel: Logger.Level {
        get { wrapped.logLevel }
        set { wrapped.logLevel = newValue }
    }
    var metadataProvider: Logger.MetadataProvider? {
        get { wrapped.metadataProvider }
        set { wrapped.metadataProvider = newValue }
    }
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { wrapped[metadataKey: key] }
        set { wrapped[metadataKey: key] = newValue }
    }

    func log(event: LogEvent) {
        let all = wrapped.metadata.merging(event.metadata ?? [:]) { _, new in new }
        func count(_ key: String) -> Int { all[key].flatMap { Int("\($0)") } ?? 0 }
        switch event.message.description {
        case "Spans were dropped this iteration because queue was full":
            ConveyorMetrics.spansDropped(reason: "queue_full", count("dropped_count"))
        case "Failed to export batch.": ConveyorMetrics.spansDropped(reason: "export_failed", count("batch_size"))
        default: break
        }
        wrapped.log(event: event)
    }
}
