public import ConveyorConfig
public import ConveyorCore
import ConveyorTelemetry
public import Foundation
public import Logging
public import Tracing

/// What an executor is given for one attempt.
public struct ExecutionContext: Sendable {
    public var runID: UUID
    public var taskName: String
    public var attempt: Int
    public var parameters: JSONValue
    public var timeout: Duration
    /// The execute span's context, for passing on (`TRACEPARENT`, HTTP `traceparent`).
    public var traceparent: String?
    public var tracestate: String?
    /// Equal to the run id: one attempt. A retry is a new run, so a new key (`Idempotency-Key`,
    /// `CONVEYOR_RUN_ID`).
    public var idempotencyKey: String
    /// The same for every attempt of one occurrence (`<task id>@<occurrence>`): the key that
    /// deduplicates a side effect an earlier attempt may already have made, for example one
    /// declared lost while it still ran on a partitioned worker (`Conveyor-Occurrence-Key`,
    /// `CONVEYOR_OCCURRENCE_KEY`). A context made without one uses `idempotencyKey`.
    public var occurrenceKey: String
    /// The worker's logger, with `run.id`, `task.name`, `trace.id` and `span.id` set.
    public var logger: Logger
    /// The execute span's context: an executor's own spans are its children
    /// (`Traces.startSpan(_:context:)`), as the HTTP and shell executors' are.
    public var trace: ServiceContext
    /// For a dependent in a workflow run: its upstreams' structured results, by upstream task
    /// name (those that returned one). Shell commands get it as `CONVEYOR_INPUTS`; the http
    /// executor adds it to a JSON object body as `inputs`.
    public var inputs: JSONValue?

    public init(
        runID: UUID, taskName: String, attempt: Int, parameters: JSONValue, timeout: Duration,
        traceparent: String?, tracestate: String?, idempotencyKey: String, occurrenceKey: String? = nil,
        logger: Logger = Logger(label: "conveyor.executor"), trace: ServiceContext = .topLevel
    ) {
        self.runID = runID
        self.taskName = taskName
        self.attempt = attempt
        self.parameters = parameters
        self.timeout = timeout
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.idempotencyKey = idempotencyKey
        self.occurrenceKey = occurrenceKey ?? idempotencyKey
        self.logger = logger
        self.trace = trace
    }
}

extension ExecutionContext {
    /// The parent of an executor's spans: `trace`, or, for a context made without one, the
    /// context of its `traceparent`.
    public var spanParent: ServiceContext {
        Traces.traceparent(trace) != nil
            ? trace : Traces.context(headers: ["traceparent": traceparent ?? "", "tracestate": tracestate ?? ""])
    }
}

/// How an attempt ended.
public struct ExecutionResult: Sendable, Equatable {
    public var outcome: Outcome
    public var exitCode: Int?
    public var output: String?
    public var errorClass: String?
    public var errorMessage: String?
    /// A structured result (any JSON value): it travels on the status message, is stored with the
    /// run, and is shown by the API, the CLI and the dashboard. Encoded, at most 32 KiB; a larger
    /// one is replaced by a marker (`{"conveyor_truncated": true, …}`).
    public var result: JSONValue?

    public init(
        outcome: Outcome, exitCode: Int? = nil, output: String? = nil, errorClass: String? = nil,
        errorMessage: String? = nil, result: JSONValue? = nil
    ) {
        self.outcome = outcome
        self.exitCode = exitCode
        self.output = output
        self.errorClass = errorClass
        self.errorMessage = errorMessage
        self.result = result
    }

    public static let succeeded = ExecutionResult(outcome: .succeeded)

    public static func failed(_ errorClass: String, _ message: String, exitCode: Int? = nil, output: String? = nil)
        -> ExecutionResult
    {
        ExecutionResult(
            outcome: .failed, exitCode: exitCode, output: output, errorClass: errorClass, errorMessage: message)
    }
}

/// Runs one kind of task. The worker applies the timeout by cancelling the task that calls
/// `execute`: an executor must stop promptly when cancelled (and clean up what it started).
public protocol Executor: Sendable {
    func execute(_ context: ExecutionContext) async -> ExecutionResult
    /// Called once after every attempt, whatever its end (success, failure, timeout, cancel), with
    /// the result the worker reports. The default does nothing.
    func cleanup(_ context: ExecutionContext, result: ExecutionResult) async
}

extension Executor {
    public func cleanup(_ context: ExecutionContext, result: ExecutionResult) async {}
}

/// Builds executors from configuration by type name. The built-in types are registered by
/// default; an embedding program registers its own before starting the worker:
///
/// ```swift
/// var factory = ExecutorFactory()
/// factory.register("pdf") { settings in try PDFExecutor(settings: settings) }
/// ```
public struct ExecutorFactory: Sendable {
    public typealias Constructor = @Sendable (Settings) throws(ValidationError) -> any Executor

    private var constructors: [String: Constructor] = [:]

    public init(builtIns: Bool = true) {
        guard builtIns else { return }
        register("noop") { _ in NoopExecutor() }
        register("sleep") { s throws(ValidationError) in try SleepExecutor(settings: s) }
        register("shell") { s throws(ValidationError) in try ShellExecutor(settings: s) }
        register("http") { s throws(ValidationError) in try HTTPExecutor(settings: s) }
    }

    public mutating func register(_ type: String, _ constructor: @escaping Constructor) {
        constructors[type] = constructor
    }

    public var types: [String] { constructors.keys.sorted() }

    /// Builds the executors named in `names` from `executors.<name>.*` settings.
    public func make(names: [String], settings: Settings) throws(ValidationError) -> [String: any Executor] {
        var out: [String: any Executor] = [:]
        for name in names {
            let scoped = settings.scoped("executors.\(name)")
            guard let type = try scoped.optionalString("type") else {
                throw ValidationError(
                    field: "\(settings.source): executors.\(name).type", value: "(missing)",
                    hint:
                        """
                        worker.executors lists '\(name)', so define it with a type: one of \
                        \(types.joined(separator: ", "))
                        """
                )
            }
            guard let make = constructors[type] else {
                throw ValidationError(
                    field: "\(settings.source): executors.\(name).type", value: type,
                    hint:
                        """
                        unknown executor type; use one of \(types.joined(separator: ", ")) or register it with \
                        ExecutorFactory.register
                        """
                )
            }
            out[name] = try make(scoped)
        }
        return out
    }
}

/// Does nothing and succeeds (benchmarks, smoke tests).
public struct NoopExecutor: Executor {
    public init() {}
    public func execute(_ context: ExecutionContext) async -> ExecutionResult { .succeeded }
}

/// Sleeps `parameters.seconds` (at most `max_seconds`), then succeeds; `parameters.fail: true` fails it.
public struct SleepExecutor: Executor {
    public var maxSeconds: Double

    public init(maxSeconds: Double = 3600) { self.maxSeconds = maxSeconds }

    public init(settings: Settings) throws(ValidationError) {
        maxSeconds = try settings.double("max_seconds", default: 3600, range: 0...86_400)
    }

    public func execute(_ context: ExecutionContext) async -> ExecutionResult {
        let seconds = context.parameters["seconds"]?.doubleValue ?? 1
        guard seconds >= 0, seconds <= maxSeconds else {
            return .failed("bad_parameters", "parameters.seconds must be between 0 and \(maxSeconds), got \(seconds)")
        }
        do {
            try await Task.sleep(for: .milliseconds(Int64(seconds * 1000)))
        } catch {
            return ExecutionResult(
                outcome: .cancelled, errorClass: "cancelled", errorMessage: "cancelled while sleeping")
        }
        if case .bool(true) = context.parameters["fail"] ?? .null {
            return .failed("requested", "parameters.fail was true")
        }
        return .succeeded
    }
}
