// swift-tools-version:6.2
// An embedding program: a Conveyor worker with a custom executor type. Copy this folder out of
// the repository and point the dependency at a Conveyor release; inside the repository, the root
// package builds the same source as `conveyor-example-worker`, so CI compiles it on every change.
import PackageDescription

let package = Package(
    name: "custom-executor",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "conveyor", path: "../.."),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
    ],
    targets: [
        .executableTarget(
            name: "CustomWorker",
            dependencies: [
                .product(name: "ConveyorWorker", package: "conveyor"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ])
    ]
)
