public import ConveyorCore
import Foundation
public import Logging
import OTel
public import ServiceLifecycle
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
    public static func bootstrap(serviceName: String, environment env: [String: String], logger: Logger) throws(ValidationError) -> (any Service)? {
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
        config.diagnosticLogger = .custom(logger)
        config.diagnosticLogLevel = .warning
        config.propagators = [.traceContext]   // baggage is carried by Traces itself
        config.metrics.enabled = false          // metrics are Prometheus (/metrics)
        config.logs.enabled = false             // logs are the structured handler's
        // Only the variables about traces reach swift-otel; the others were handled above.
        let passed = env.filter { key, _ in
            key == "OTEL_SERVICE_NAME" || key == "OTEL_RESOURCE_ATTRIBUTES" || key.hasPrefix("OTEL_TRACES_") || key.hasPrefix("OTEL_BSP_")
                || (key.hasPrefix("OTEL_EXPORTER_OTLP_") && !key.hasPrefix("OTEL_EXPORTER_OTLP_METRICS_") && !key.hasPrefix("OTEL_EXPORTER_OTLP_LOGS_"))
        }
        do {
            let service = try OTel.bootstrap(configuration: config, environment: passed)
            bootstrapped.withLock { $0 = InstrumentationSystem.tracer }
            return service
        } catch {
            throw ValidationError(field: "OTEL_* environment", value: "\(error)", hint: "see docs/tracing.md for the variables Conveyor reads")
        }
    }

    static let samplers = ["always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio"]

    /// Refuses the values swift-otel 1.6 does not support (it would call fatalError on them).
    static func validate(_ env: [String: String]) throws(ValidationError) {
        if let v = env["OTEL_PROPAGATORS"] {
            for p in v.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces).lowercased() })
            where !["tracecontext", "baggage", ""].contains(p) {
                throw ValidationError(field: "OTEL_PROPAGATORS", value: v,
                                      hint: "Conveyor propagates W3C tracecontext and baggage; '\(p)' is not supported: use tracecontext,baggage or unset it")
            }
        }
        if let v = env["OTEL_TRACES_SAMPLER"], !samplers.contains(v.lowercased()) {
            throw ValidationError(field: "OTEL_TRACES_SAMPLER", value: v, hint: "use one of \(samplers.joined(separator: ", "))")
        }
        if let v = env["OTEL_TRACES_EXPORTER"], !["otlp", "none"].contains(v.lowercased()) {
            throw ValidationError(field: "OTEL_TRACES_EXPORTER", value: v, hint: "use otlp (with OTEL_EXPORTER_OTLP_ENDPOINT) or none")
        }
        for key in ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] {
            if let v = env[key], !["http/protobuf", "http/json"].contains(v.lowercased()) {
                throw ValidationError(field: key, value: v,
                                      hint: "this build exports OTLP over HTTP: use http/protobuf (collector port 4318) or http/json")
            }
        }
    }
}
