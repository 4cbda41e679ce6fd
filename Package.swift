// swift-tools-version:6.2
import PackageDescription

let package = Package(
    name: "conveyor",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "conveyor", targets: ["conveyor"]),
        .executable(name: "conveyorctl", targets: ["conveyorctl"]),
        // For programs that embed a worker with executors of their own (Examples/CustomExecutor).
        .library(
            name: "ConveyorWorker", targets: ["ConveyorWorker", "ConveyorConfig", "ConveyorCore", "ConveyorAMQP"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-distributed-tracing.git", from: "1.7.3"),
        .package(url: "https://github.com/swift-otel/swift-w3c-trace-context.git", from: "1.0.0"),
        // Spans exported over OTLP/HTTP; the gRPC trait (grpc-swift and its HTTP/2 stack) is left off.
        // Exact minor: Conveyor counts lost spans from this release's log lines (SpanDropCounter).
        .package(
            url: "https://github.com/swift-otel/swift-otel.git", .upToNextMinor(from: "1.6.0"), traits: ["OTLPHTTP"]),
        // One trait only: SwiftPM 6.3 may rebuild a dependency with several traits from scratch.
        .package(url: "https://github.com/apple/swift-configuration.git", from: "1.4.0", traits: ["YAML"]),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.8.1"),
        // Already built for swift-configuration's YAML trait; conveyorctl reads task files with it.
        .package(url: "https://github.com/jpsim/Yams", from: "6.0.0"),
        // Outbound HTTP: callbacks from the dispatcher, the http executor in workers.
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        // Already built for async-http-client; the tests' HTTP receiver uses it directly.
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        // Metrics: swift-metrics (already built for Hummingbird) exported as Prometheus text.
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        // The REST API and the dashboard.
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        // API key hashing; jwt-kit needs the 4.x line.
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        // JWT bearer tokens (HS256 secret, RS256/ES256 from a JWKS file).
        .package(url: "https://github.com/vapor/jwt-kit.git", from: "5.8.0"),
        // jwt-kit's base64 (already resolved through it): base64url for proofs, keys and tokens.
        .package(url: "https://github.com/swift-extras/swift-extras-base64", from: "1.2.0"),
        // Already built for Hummingbird: header names.
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
    ],
    targets: [
        // System libraries: module maps and shims only.
        .systemLibrary(name: "CLibPQ", pkgConfig: "libpq", providers: [.apt(["libpq-dev"])]),
        .systemLibrary(name: "CRabbitMQ", pkgConfig: "librabbitmq", providers: [.apt(["librabbitmq-dev"])]),

        // The domain, pure: no I/O. Crypto for the status proofs (HMAC-SHA256) both sides check.
        .target(
            name: "ConveyorCore",
            dependencies: [
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ExtrasBase64", package: "swift-extras-base64"),
            ]),

        // C libraries made safe.
        .target(
            name: "ConveyorPostgres",
            dependencies: [
                "CLibPQ", "ConveyorCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ]),
        .target(
            name: "ConveyorAMQP",
            dependencies: [
                "CRabbitMQ", "ConveyorCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                // The W3C header carrier of AMQP messages (AMQPHeadersInjector/Extractor).
                .product(name: "Instrumentation", package: "swift-distributed-tracing"),
            ]),

        // Conveyor's broker objects: the names and shapes of its exchanges and queues (ConveyorTopology),
        // isolation lanes, and work-queue depths. The AMQP wrapper below it knows AMQP, not Conveyor.
        .target(name: "ConveyorBroker", dependencies: ["ConveyorAMQP", "ConveyorCore"]),

        // Test-only faults a process injects into itself (CONVEYOR_TEST_FAULTS): signals and kills,
        // outside the pure Core; `package` access, so no product exposes them.
        .target(name: "ConveyorFaults", dependencies: ["ConveyorCore"]),

        // The SQL of tasks, runs and workers.
        .target(
            name: "ConveyorStore", dependencies: ["ConveyorCore", "ConveyorPostgres"],
            resources: [.copy("Migrations")]),

        // Trace context over any carrier; the structured log handler; metrics. No broker: AMQP's
        // header carrier lives beside the AMQP message (ConveyorAMQP).
        .target(
            name: "ConveyorTelemetry",
            dependencies: [
                "ConveyorCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "Instrumentation", package: "swift-distributed-tracing"),
                .product(name: "W3CTraceContext", package: "swift-w3c-trace-context"),
                .product(name: "OTel", package: "swift-otel"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]),

        // YAML files with CONVEYOR_* environment overrides, validated with errors that name the key.
        .target(
            name: "ConveyorConfig",
            dependencies: [
                "ConveyorCore",
                .product(name: "Configuration", package: "swift-configuration"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]),

        // Outbound HTTP behind one guard: host allowlist, addresses checked and pinned, redirects re-checked.
        .target(
            name: "ConveyorHTTP",
            dependencies: [
                "ConveyorCore", "ConveyorConfig",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ]),

        // The REST API: authentication, validation, problem+json errors.
        .target(
            name: "ConveyorAPI",
            dependencies: [
                // No ConveyorPostgres: the API reaches the database only through the Store.
                "ConveyorCore", "ConveyorStore", "ConveyorAMQP", "ConveyorBroker", "ConveyorHTTP", "ConveyorTelemetry",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "W3CTraceContext", package: "swift-w3c-trace-context"),
            ], resources: [.copy("openapi.yaml"), .copy("Dashboard")]),

        .target(
            name: "ConveyorDispatcher",
            dependencies: [
                "ConveyorCore", "ConveyorFaults", "ConveyorHTTP", "ConveyorStore", "ConveyorPostgres", "ConveyorAMQP",
                "ConveyorBroker", "ConveyorTelemetry",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ]),
        // Workers never touch Postgres: the graph has no edge to ConveyorStore or ConveyorPostgres.
        .target(
            name: "ConveyorWorker",
            dependencies: [
                "ConveyorCore", "ConveyorFaults", "ConveyorAMQP", "ConveyorBroker", "ConveyorTelemetry",
                "ConveyorConfig",
                "ConveyorHTTP",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ]),

        .executableTarget(
            name: "conveyor",
            dependencies: [
                "ConveyorCore", "ConveyorFaults", "ConveyorStore", "ConveyorDispatcher", "ConveyorWorker",
                "ConveyorBroker", "ConveyorTelemetry", "ConveyorConfig",
                "ConveyorHTTP",
                "ConveyorAPI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ]),

        // The API's client: talks HTTP only (no database, no broker).
        .executableTarget(
            name: "conveyorctl",
            dependencies: [
                "ConveyorCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Yams", package: "Yams"),
            ]),

        // Examples/CustomExecutor's program, built here so CI compiles it on every change.
        .executableTarget(
            name: "conveyor-example-worker",
            dependencies: [
                "ConveyorWorker", "ConveyorConfig", "ConveyorCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ], path: "Examples/CustomExecutor/Sources/CustomWorker"),

        // Examples/Enqueue's Swift program: conveyor.enqueue(...) in the caller's transaction, over libpq.
        .executableTarget(
            name: "conveyor-example-enqueue", dependencies: ["CLibPQ"], path: "Examples/Enqueue/Sources/EnqueueExample"),

        .testTarget(
            name: "ConveyorCoreTests",
            dependencies: [
                "ConveyorCore", "ConveyorFaults", "ConveyorWorker", "ConveyorTelemetry", "ConveyorConfig",
                "ConveyorAMQP", "ConveyorPostgres", "ConveyorHTTP",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ]),
        .testTarget(
            name: "ConveyorIntegrationTests",
            dependencies: [
                "ConveyorCore", "ConveyorFaults", "ConveyorStore", "ConveyorPostgres", "ConveyorAMQP", "ConveyorBroker",
                "ConveyorDispatcher",
                "ConveyorWorker", "ConveyorTelemetry", "ConveyorHTTP", "ConveyorAPI",
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]),
    ],
    swiftLanguageModes: [.v6]
)

for target in package.targets where target.type != .system {
    target.swiftSettings =
        (target.swiftSettings ?? []) + [
            // https://github.com/swiftlang/swift-evolution/blob/main/proposals/0335-existential-any.md
            .enableUpcomingFeature("ExistentialAny"),
            // https://github.com/swiftlang/swift-evolution/blob/main/proposals/0444-member-import-visibility.md
            .enableUpcomingFeature("MemberImportVisibility"),
            // https://github.com/swiftlang/swift-evolution/blob/main/proposals/0409-access-level-on-imports.md
            .enableUpcomingFeature("InternalImportsByDefault"),
            // https://github.com/swiftlang/swift-evolution/blob/main/proposals/0461-async-function-isolation.md
            .enableUpcomingFeature("NonisolatedNonsendingByDefault"),
            // No warning lives on: every build, the test command's included, fails on one (SE-0480).
            .treatAllWarnings(as: .error),
        ]
}
