import CoreMetrics
import ConveyorCore
import Foundation
public import Logging
import Synchronization

/// A bounded pool of `PostgresConnection`s.
///
/// State lives in a `Mutex`; connections are opened outside the lock. A caller that finds every
/// connection busy waits up to `acquireTimeout`, then gets `.poolTimeout`. A connection that
/// broke is dropped on release, and the next caller opens a new one.
public final class PostgresPool: Sendable {
    public struct Configuration: Sendable {
        /// libpq URI or key=value string. Env `CONVEYOR_DATABASE_URL`.
        public var url: String
        /// Most connections open at once. Default 10.
        public var maxConnections: Int = 10
        /// How long `withConnection` waits for a free connection. Default 10 s.
        public var acquireTimeout: Duration = .seconds(10)
        /// How long the first connect keeps retrying (backoff with jitter) before giving up. Default 60 s.
        public var connectRetryFor: Duration = .seconds(60)
        public var connectionOptions = PostgresConnection.Options()
        public init(url: String) { self.url = url }
    }

    private struct Waiter { var id: Int; var continuation: CheckedContinuation<PostgresConnection?, any Error> }
    private struct State {
        var idle: [PostgresConnection] = []
        var open = 0
        var waiters: [Waiter] = []
        var nextWaiterID = 0
        var closed = false
    }

    public let configuration: Configuration
    private let state = Mutex(State())
    private let logger: Logger

    public init(configuration: Configuration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Connects once, retrying with exponential backoff and full jitter for up to
    /// `connectRetryFor`, logging each failed attempt. Use at start-up.
    public func waitUntilReachable() async throws {
        try await withConnection { _ in }
    }

    /// Runs `body` with a connection of its own.
    public func withConnection<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
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
    public func withTransaction<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
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
            } catch let error as PostgresError where error.code == .connection || error.sqlState?.hasPrefix("08") == true {
                throw PostgresError(code: .commitOutcomeUnknown, sqlState: error.sqlState, message: "connection lost during COMMIT: \(error.message)")
            }
            return result
        }
    }

    /// Closes idle connections and fails waiters; in-use connections close on release.
    public func close() {
        let (idle, waiters) = state.withLock { s in
            s.closed = true
            defer { s.idle = []; s.waiters = [] }
            return (s.idle, s.waiters)
        }
        for c in idle { c.close() }
        for w in waiters { w.continuation.resume(throwing: PostgresError(code: .closed, message: "pool is closed")) }
    }

    /// swift-metrics (a no-op until the process bootstraps a backend): time spent waiting for a
    /// connection, and connections handed out now (open less idle, recorded where a connection
    /// is taken or given back; of this process's pools, the last one measured).
    static let waitTimer = CoreMetrics.Timer(label: "conveyor_db_pool_wait_seconds")
    static let inUseGauge = CoreMetrics.Gauge(label: "conveyor_db_pool_in_use")

    /// Connections open now, and callers waiting for one.
    public var usage: (open: Int, idle: Int, waiting: Int) {
        state.withLock { ($0.open, $0.idle.count, $0.waiters.count) }
    }

    enum Decision { case use(PostgresConnection), create, wait(Int), closed }

    func acquire() async throws -> PostgresConnection {
        let max = configuration.maxConnections
        var inUse = 0
        let decision: Decision = state.withLock { s in
            defer { inUse = s.open - s.idle.count }
            if s.closed { return .closed }
            if let c = s.idle.popLast() { return .use(c) }
            if s.open < max { s.open += 1; return .create }
            s.nextWaiterID += 1
            return .wait(s.nextWaiterID)
        }
        Self.inUseGauge.record(inUse)
        switch decision {
        case .closed: throw PostgresError(code: .closed, message: "pool is closed")
        case .use(let c): return c
        case .create: return try await createCounted()
        case .wait(let id):
            let timeout = configuration.acquireTimeout
            let handed: PostgresConnection? = try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { [self] in
                    try? await Task.sleep(for: timeout)
                    self.timeOut(waiter: id)
                }
                defer { group.cancelAll() }
                return try await withCheckedThrowingContinuation { cont in
                    let closed = state.withLock { s in
                        if s.closed { return true }
                        s.waiters.append(Waiter(id: id, continuation: cont))
                        return false
                    }
                    if closed { cont.resume(throwing: PostgresError(code: .closed, message: "pool is closed")) }
                }
            }
            if let handed { return handed }
            return try await createCounted()   // a slot was freed for us to open
        }
    }

    private func timeOut(waiter id: Int) {
        let w: Waiter? = state.withLock { s in
            guard let i = s.waiters.firstIndex(where: { $0.id == id }) else { return nil }
            return s.waiters.remove(at: i)
        }
        w?.continuation.resume(throwing: PostgresError(
            code: .poolTimeout,
            message: "no database connection free within \(configuration.acquireTimeout) (pool size \(configuration.maxConnections)); raise database.pool_size or find the slow statements"))
    }

    /// Opens a connection for a slot already counted in `open`; gives the slot back on failure.
    private func createCounted() async throws -> PostgresConnection {
        do {
            return try await connectWithRetry()
        } catch {
            let waiter: Waiter? = state.withLock { s in
                if let w = s.waiters.first { s.waiters.removeFirst(); return w }
                s.open -= 1
                return nil
            }
            waiter?.continuation.resume(returning: nil)
            throw error
        }
    }

    func connectWithRetry() async throws -> PostgresConnection {
        let clock = ContinuousClock()
        let deadline = clock.now + configuration.connectRetryFor
        var attempt = 0
        while true {
            attempt += 1
            do {
                return try await PostgresConnection.connect(url: configuration.url, options: configuration.connectionOptions, logger: logger)
            } catch {
                let delay = Backoff.delay(attempt: attempt, base: .milliseconds(200), cap: .seconds(5))
                if clock.now + delay > deadline {
                    logger.error("database unreachable, giving up", metadata: [
                        "db.url": "\(redactPassword(in: configuration.url))", "attempts": "\(attempt)", "error": "\(error)"])
                    throw PostgresError(code: .connection, message:
                        "database \(redactPassword(in: configuration.url)) unreachable after \(attempt) attempts over \(configuration.connectRetryFor): \(error.message). Check CONVEYOR_DATABASE_URL and that PostgreSQL is running")
                }
                logger.warning("database connect failed, retrying", metadata: [
                    "db.url": "\(redactPassword(in: configuration.url))", "attempt": "\(attempt)",
                    "retry.in": "\(delay)", "error": "\(error.message)"])
                try await Task.sleep(for: delay)
            }
        }
    }

    private func release(_ connection: PostgresConnection) {
        // Only an idle connection (no transaction open or aborted) may be reused.
        if connection.isHealthy && !connection.isIdle {
            logger.warning("connection returned inside a transaction; closing it instead of reusing it")
        }
        let healthy = connection.isHealthy && connection.isIdle
        enum After { case handed(Waiter), idle, dropped(Waiter?), closeIt }
        var inUse = 0
        let after: After = state.withLock { s in
            defer { inUse = s.open - s.idle.count }
            if s.closed { s.open -= 1; return .closeIt }
            if healthy {
                if let w = s.waiters.first { s.waiters.removeFirst(); return .handed(w) }
                s.idle.append(connection)
                return .idle
            }
            if let w = s.waiters.first { s.waiters.removeFirst(); return .dropped(w) }  // slot passes to the waiter
            s.open -= 1
            return .dropped(nil)
        }
        Self.inUseGauge.record(inUse)
        switch after {
        case .handed(let w): w.continuation.resume(returning: connection)
        case .idle: break
        case .dropped(let w):
            connection.close()
            w?.continuation.resume(returning: nil)
        case .closeIt: connection.close()
        }
    }
}
