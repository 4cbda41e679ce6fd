// A worker with an executor type of its own, next to the built-in ones.
//
//   swift run conveyor-example-worker            (from the repository root)
//
// with a worker.yaml such as:
//
//   worker: {executors: [upper, noop]}
//   executors:
//     upper: {type: uppercase, max_length: 1000}
//     noop: {type: noop}
//
// A task then names `executor: upper` and `parameters: {text: "hello"}`.

import ConveyorConfig
import ConveyorCore
import ConveyorWorker
import Foundation
import Logging
import ServiceLifecycle
import UnixSignals

/// Upper-cases `parameters.text` (at most `max_length` characters) into the run's output.
struct UppercaseExecutor: Executor {
    var maxLength: Int

    init(settings: Settings) throws(ValidationError) {
        maxLength = try settings.int("max_length", default: 10_000, range: 1...1_000_000)
    }

    func execute(_ context: ExecutionContext) async -> ExecutionResult {
        guard let text = context.parameters["text"]?.stringValue else {
            return .failed("bad_parameters", "parameters.text must be a string, e.g. {\"text\": \"hello\"}")
        }
        guard text.count <= maxLength else {
            return .failed(
                "bad_parameters",
                "parameters.text has \(text.count) characters; this executor takes at most \(maxLength)")
        }
        context.logger.info("upper-casing", metadata: ["text.length": "\(text.count)"])
        return ExecutionResult(outcome: .succeeded, output: text.uppercased())
    }

    func cleanup(_ context: ExecutionContext, result: ExecutionResult) async {
        context.logger.debug("uppercase run ended", metadata: ["run.outcome": "\(result.outcome.rawValue)"])
    }
}

var factory = ExecutorFactory()  // noop, sleep, shell and http are registered already
factory.register("uppercase") { settings throws(ValidationError) in try UppercaseExecutor(settings: settings) }

LoggingSystem.bootstrap(StreamLogHandler.standardError)
let logger = Logger(label: "example.worker")
let directory = ProcessInfo.processInfo.environment["CONVEYOR_CONFIG_DIR"] ?? "config"
do {
    let settings = try await Settings.load(file: directory + "/worker.yaml")
    let worker = try Worker.make(settings: settings, factory: factory, logger: logger)
    try await ServiceGroup(
        configuration: .init(services: [worker], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
    ).run()
} catch {
    logger.critical("worker could not start", metadata: ["error": "\(error)"])
    exit(1)
}
