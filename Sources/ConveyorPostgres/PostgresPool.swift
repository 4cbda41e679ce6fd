import ConveyorCore
import CoreMetrics
import Foundation
package import Logging
import Synchronization

/// A bounded pool of `PostgresConnection`s.
///
/// The bookkeeping is `PoolStateMachine`, driven under one `Mutex`; what it asks for (open or close
/// a connection, resume a waiter) is done outside the lock. A caller that finds every connection
/// busy waits up to `acquireTimeout` (on `clock`), then gets `.poolTimeout`; a cancelled caller
/// stops waiting at once. A connection that broke is dropped on release, and the next caller opens
/// a new one.
package final class PostgresPool: Sendable {
    package struct Configuration: Sendable {
        /// libpq URI or key=value string. Env `CONVEYOR_DATABASE_URL`.
        package var url: String
        /// Most connections open at once. Default 10.
        package var maxConnections: Int = 10
        /// How long `withConnection` waits for a free connection. Default 10 s.
        package var acquireTimeout: Duration = .seconds(10)
        /// How long the first connect keeps retrying (backoff with jitter) before giving up. Default 60 s.
        package var connectRetryFor: Duration = .seconds(60)
        package var connectionOptions = PostgresConnection.Options()
        /// The clock waits run on: the acquire timeout and the connect backoff.
        package var clock: any Clock<Duration> = ContinuousClock()
        package init(url: String) { self.url = url }
    }

    package let configuration: Configuration
    private typealias Waiter = CheckedContinuation<PostgresConnection?, any Error>
    private let state: Mutex<PoolStateMachine<PostgresConnection, Waiter>>
    private let logger: Logger

    package init(configuration: Configuration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        state = Mutex(PoolStateMachine(maxConnections: configuration.maxConnections))
    }

    /// Connects once, retrying with exponential backoff and full jitter for up to
    /// `connectRetryFor`, logging each failed attempt. Use at start-up.
    package func waitUntilReachable() async throws {
        try await withConnection { _ in }
    }

    /// Runs `body` with a connection of its own.
    package func withConnection<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
        let asked = ContinuousClock.now
        let connection = try await acquire()
        Self.waitTimer.recordNanoseconds((ContinuousClock.now - asked).inNanoseconds)
        do {
            let result = try await body(connection)
            release(connection)
            return result
        } catch {
            release(connection)
            throw error
        }
    }

    /// Runs `body` inside BEGIN … COMMIT, rolling back on any error.
    ///
    /// If the connection breaks during COMMIT the error is `.commitOutcomeUnknown`: the caller
    /// must re-read rather than blindly redo.
    package func withTransaction<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
        try await withConnection { conn in
            try await conn.simple("BEGIN")
            let result: T
            do {
                result = try await body(conn)
            } catch {
                if conn.isHealthy { _ = try? await conn.simple("ROLLBACK") }
                throw error
            }
            do {
                try await conn.simple("COMMIT")
            } catch let error as PostgresError
                where error.code == .connection || error.sqlState?.hasPrefix("08") == true
            {
                throw PostgresError(
                    code: .commitOutcomeUnknown, sqlState: error.sqlState,
                    message: "connection lost during COMMIT: \(error.message)")
            }
            return result
        }
    }

    /// Closes idle connections and fails waiters; in-use connections close on release.
    package func close() {
        let (idle, waiters) = state.withLock { $0.close() }
        for c in idle { c.close() }
        for w in waiters { w.resume(throwing: Self.error(.closed, configuration)) }
    }

    /// swift-metrics (a no-op until the process bootstraps a backend): time spent waiting for a
    /// connection, and connections handed out now (open less idle, recorded where a connection
    /// is taken or given back; of this process's pools, the last one measured).
    static let waitTimer = CoreMetrics.Timer(label: "conveyor_db_pool_wait_seconds")
    static let inUseGauge = CoreMetrics.Gauge(label: "conveyor_db_pool_in_use")

    /// Connections open now, and callers waiting for one.
    package var usage: (open: Int, idle: Int, waiting: Int) {
        state.withLock { ($0.open, $0.idle.count, $0.waiting) }
    }

    func acquire() async throws -> PostgresConnection {
        let (action, inUse) = state.withLock { s in (s.acquire(), s.inUse) }
        Self.inUseGauge.record(inUse)
        switch action {
        case .fail(let failure): throw Self.error(failure, configuration)
        case .use(let c): return c
        case .create: return try await createCounted()
        case .wait(let id):
            let timeout = configuration.acquireTimeout
            let clock = configuration.clock
            let handed: PostgresConnection? = try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { [self] in
                    // Cancelled when the waiter has its answer; only a timer that ran out answers it.
                    guard (try? await clock.sleep(for: timeout)) != nil else { return }
                    let w = state.withLock { $0.timedOut(id) }
                    w?.resume(throwing: Self.error(.timedOut, configuration))
                }
                defer { group.cancelAll() }
                return try await withTaskCancellationHandler {
                    try await withCheckedThrowingContinuation { (cont: Waiter) in
                        if case .fail(let failure) = state.withLock({ $0.register(id, cont) }) {
                            cont.resume(throwing: Self.error(failure, configuration))
                        }
                    }
                } onCancel: {
                    let w = state.withLock { $0.cancelled(id) }
                    w?.resume(throwing: Self.error(.cancelled, configuration))
                }
            }
            if let handed { return handed }
            return try await createCounted()  // a slot was freed for us to open
        }
    }

    static func error(_ failure: PoolFailure, _ c: Configuration)
        -> any Error
    {
        switch failure {
        case .closed: return PostgresError(code: .closed, message: "pool is closed")
        case .cancelled: return CancellationError()
        case .timedOut:
            return PostgresError(
                code: .poolTimeout,
                message:
                    """
                    no database connection free within \(c.acquireTimeout) (pool size \(c.maxConnections)); \
                    raise database.pool_size or find the slow statements
                    """)
        }
    }

    /// Opens a connection for a slot already counted in `open`; gives the slot back on failure.
    private func createCounted() async throws -> PostgresConnection {
        do {
            return try await connectWithRetry()
        } catch {
            state.withLock { $0.createFailed() }?.resume(returning: nil)
            throw error
        }
    }

    func connectWithRetry() async throws -> PostgresConnection {
        let time = Stopwatch(configuration.clock)
        var attempt = 0
        while true {
            attempt += 1
            do {
                return try await PostgresConnection.connect(
                    url: configuration.url, options: configuration.connectionOptions, logger: logger)
            } catch {
                let delay = Backoff.delay(attempt: attempt, base: .milliseconds(200), cap: .seconds(5))
                if time.elapsed + delay > configuration.connectRetryFor {
                    logger.error(
                        "database unreachable, giving up",
                        metadata: [
                            "db.url": "\(redactPassword(in: configuration.url))", "attempts": "\(attempt)",
                            "error": "\(error)",
                        ])
                    throw PostgresError(
                        code: .connection,
                        message:
                            """
                            database \(redactPassword(in: configuration.url)) unreachable after \(attempt) attempts \
                            over \(configuration.connectRetryFor): \(error.message). Check CONVEYOR_DATABASE_URL and \
                            that PostgreSQL is running
                            """
                    )
                }
                logger.warning(
                    "database connect failed, retrying",
                    metadata: [
                        "db.url": "\(redactPassword(in: configuration.url))", "attempt": "\(attempt)",
                        "retry.in": "\(delay)", "error": "\(error.message)",
                    ])
                try await configuration.clock.sleep(for: delay)
            }
        }
    }

    private func release(_ connection: PostgresConnection) {
        // Only an idle connection (no transaction open or aborted) may be reused.
        if connection.isHealthy && !connection.isIdle {
            logger.warning("connection returned inside a transaction; closing it instead of reusing it")
        }
        let reusable = connection.isHealthy && connection.isIdle
        let (action, inUse) = state.withLock { s in (s.release(connection, reusable: reusable), s.inUse) }
        Self.inUseGauge.record(inUse)
        switch action {
        case .hand(let c, let w): w.resume(returning: c)
        case .keepIdle: break
        case .close(let c, let w):
            c.close()
            w?.resume(returning: nil)
        }
    }
}
