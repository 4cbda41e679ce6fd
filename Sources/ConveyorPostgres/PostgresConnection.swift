import CLibPQ
import ConveyorCore
import Dispatch
import Foundation
package import Logging
import Synchronization

/// One libpq connection.
///
/// Every libpq call on the `PGconn` runs on this connection's own serial `DispatchQueue`, never
/// on Swift's cooperative pool: a slow query blocks one GCD thread, not the executor that serves
/// every other task. Callers `await` the result through a continuation.
///
/// Task cancellation of a running query sends a cancel request (`PQcancel`, which libpq
/// documents as safe to call from another thread) from a global dispatch queue: the request is a
/// connection of its own that waits for the server to close it, and must not block the thread
/// that cancelled (often the cooperative pool's).
///
/// A cancel request races the statement it was meant for: the server may deliver it after that
/// statement ended and the next one began. So a connection that has been sent a cancel is no
/// longer `isHealthy`, and a pool closes it instead of handing it to the next caller, whose
/// statement the late cancel would otherwise abort.
package final class PostgresConnection: @unchecked Sendable {
    // @unchecked Sendable: `conn` is only touched on `queue` (serial), and `cancelHandle` is
    // immutable after init and used only through PQcancel, which is thread-safe.
    private let conn: OpaquePointer
    private let cancelHandle: OpaquePointer?
    private let queue: DispatchQueue
    private let closed = Atomic<Bool>(false)
    /// A cancel request is on its way: one at a time per connection.
    private let cancelling = Atomic<Bool>(false)
    /// A cancel request has been sent at some point: a late one may still abort a later statement.
    private let cancelSent = Atomic<Bool>(false)
    /// `PQstatus == CONNECTION_OK` after the last call, recorded on `queue`, so callers never
    /// block on the queue to ask.
    private let healthy = Atomic<Bool>(true)
    /// `PQtransactionStatus == PQTRANS_IDLE` after the last call: no transaction left open.
    private let idle = Atomic<Bool>(true)
    package let logger: Logger
    /// The notice receiver's context; lives until `PQfinish` (see `FinishHandles`).
    private let notices: PostgresNotices

    /// Options applied to every new session.
    package struct Options: Sendable {
        /// `statement_timeout` for every statement; `nil` leaves the server default. Default 30 s.
        package var statementTimeout: Duration? = .seconds(30)
        /// `application_name` shown in `pg_stat_activity`.
        package var applicationName: String = "conveyor"
        package init() {}
    }

    private init(conn: OpaquePointer, queue: DispatchQueue, logger: Logger) {
        self.conn = conn
        self.cancelHandle = PQgetCancel(conn)
        self.queue = queue
        self.logger = logger
        self.notices = PostgresNotices.install(on: conn, logger: logger)
    }

    deinit {
        // PQfinish writes to the socket: run it on the connection's own queue, never on the
        // thread (possibly the cooperative pool) that dropped the last reference.
        let handles = FinishHandles(conn: conn, cancel: cancelHandle, notices: notices)
        queue.async { handles.finish() }
    }

    /// Opens one connection (one attempt, no retry). The URL is a libpq URI or key=value string.
    package static func connect(url: String, options: Options = .init(), logger: Logger) async throws(PostgresError)
        -> PostgresConnection
    {
        let queue = DispatchQueue(label: "conveyor.postgres.connection")
        let result: Result<PostgresConnection, PostgresError> = await withCheckedContinuation { cont in
            queue.async {
                guard let c = PQconnectdb(url) else {
                    cont.resume(
                        returning: .failure(
                            PostgresError(code: .connection, message: "out of memory creating a libpq connection")))
                    return
                }
                guard PQstatus(c) == CONNECTION_OK else {
                    let msg = String(cString: PQerrorMessage(c)).trimmingCharacters(in: .whitespacesAndNewlines)
                    PQfinish(c)
                    cont.resume(
                        returning: .failure(
                            PostgresError(
                                code: .connection, message: "cannot connect to \(redactPassword(in: url)): \(msg)")))
                    return
                }
                cont.resume(returning: .success(PostgresConnection(conn: c, queue: queue, logger: logger)))
            }
        }
        let connection = try result.get()
        var setup =
            """
            SET TimeZone = 'UTC'; SET application_name = \
            '\(options.applicationName.filter { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" })'
            """
        if let t = options.statementTimeout {
            setup += "; SET statement_timeout = \(Int64(t.inMilliseconds))"
        }
        try await connection.simple(setup)
        return connection
    }

    /// Whether the connection may run the next caller's statements: open, not broken, and never
    /// sent a cancel request (which might still arrive and abort that statement).
    package var isHealthy: Bool {
        !closed.load(ordering: .relaxed) && healthy.load(ordering: .acquiring)
            && !cancelSent.load(ordering: .acquiring)
    }

    /// Runs one statement with bound parameters and returns its rows.
    @discardableResult
    package func query(_ sql: String, _ parameters: [any PostgresEncodable] = []) async throws(PostgresError)
        -> PostgresRows
    {
        let texts = parameters.map(\.postgresText)
        // libpq takes parameters as C strings: a NUL would silently cut the value short.
        if let i = texts.firstIndex(where: { $0?.utf8.contains(0) ?? false }) {
            throw PostgresError(
                code: .query, sqlState: "22021",
                message:
                    """
                    parameter $\(i + 1) contains a NUL byte, which PostgreSQL text cannot hold: remove or replace it \
                    before storing
                    """
            )
        }
        return try await run { conn throws(PostgresError) in
            try Self.execParams(conn, sql, texts)
        }
    }

    /// Whether no transaction is open (or aborted) on this connection, as of the last call.
    /// A pool must only reuse idle connections: anything else would run the next caller's
    /// statements inside someone else's transaction.
    package var isIdle: Bool { idle.load(ordering: .acquiring) }

    /// Runs statements without parameters (several may be separated by `;`). For fixed SQL only.
    @discardableResult
    package func simple(_ sql: String) async throws(PostgresError) -> PostgresRows {
        try await run { conn throws(PostgresError) in
            let res = PQexec(conn, sql)
            defer { PQclear(res) }
            return try Self.collect(conn, res)
        }
    }

    /// Closes the connection; later calls fail with `.closed`.
    package func close() {
        closed.store(true, ordering: .relaxed)
    }

    private func run<T: Sendable>(_ body: @Sendable @escaping (OpaquePointer) throws(PostgresError) -> T)
        async throws(PostgresError) -> T
    {
        if closed.load(ordering: .relaxed) { throw PostgresError(code: .closed, message: "connection is closed") }
        // A task cancelled before its statement is sent does not send it. (Sent with a cancel request
        // behind it, the statement would race the request: an idle server ignores a cancel that comes
        // first, so the statement would run anyway, or be aborted part-way: either, by timing.)
        if Task.isCancelled {
            throw PostgresError(
                code: .query, sqlState: "57014",
                message: "canceling statement: its task was cancelled before it was sent")
        }
        let result: Result<T, PostgresError> = await withTaskCancellationHandler {
            await withCheckedContinuation { cont in
                queue.async {
                    let result: Result<T, PostgresError>
                    do throws(PostgresError) { result = .success(try body(self.conn)) } catch {
                        result = .failure(error)
                    }
                    self.healthy.store(PQstatus(self.conn) == CONNECTION_OK, ordering: .releasing)
                    self.idle.store(PQtransactionStatus(self.conn) == PQTRANS_IDLE, ordering: .releasing)
                    cont.resume(returning: result)
                }
            }
        } onCancel: {
            self.sendCancel()
        }
        return try result.get()
    }

    /// Asks the server to cancel the statement running on this connection, from a global dispatch
    /// queue; returns at once. Thread-safe. A request still on its way absorbs this one. From now on
    /// the connection is not `isHealthy`.
    package func sendCancel() {
        cancelSent.store(true, ordering: .releasing)
        guard cancelHandle != nil, !cancelling.exchange(true, ordering: .acquiring) else { return }
        DispatchQueue.global().async {
            var buf = [CChar](repeating: 0, count: 256)
            _ = PQcancel(self.cancelHandle, &buf, 256)
            self.cancelling.store(false, ordering: .releasing)
        }
    }

    static func execParams(_ conn: OpaquePointer, _ sql: String, _ texts: [String?]) throws(PostgresError)
        -> PostgresRows
    {
        // Copy each parameter into C memory that lives for the duration of the call.
        var cStrings: [UnsafeMutablePointer<CChar>?] = texts.map { $0.map { strdup($0) } ?? nil }
        defer { for p in cStrings { free(p) } }
        let res: OpaquePointer? = cStrings.withUnsafeMutableBufferPointer { buf in
            buf.baseAddress!.withMemoryRebound(to: UnsafePointer<CChar>?.self, capacity: max(buf.count, 1)) { ptr in
                PQexecParams(conn, sql, Int32(texts.count), nil, texts.isEmpty ? nil : ptr, nil, nil, 0)
            }
        }
        defer { PQclear(res) }
        return try collect(conn, res)
    }

    static func collect(_ conn: OpaquePointer, _ res: OpaquePointer?) throws(PostgresError) -> PostgresRows {
        guard let res else {
            throw PostgresError(
                code: .connection,
                message: String(cString: PQerrorMessage(conn)).trimmingCharacters(in: .whitespacesAndNewlines))
        }
        let status = PQresultStatus(res)
        switch status {
        case PGRES_TUPLES_OK, PGRES_COMMAND_OK, PGRES_EMPTY_QUERY:
            let nf = Int(PQnfields(res))
            let nt = Int(PQntuples(res))
            var columns: [String] = []
            columns.reserveCapacity(nf)
            for f in 0..<nf { columns.append(String(cString: PQfname(res, Int32(f)))) }
            var rows: [PostgresRow] = []
            rows.reserveCapacity(nt)
            for t in 0..<nt {
                var values: [String?] = []
                values.reserveCapacity(nf)
                for f in 0..<nf {
                    if PQgetisnull(res, Int32(t), Int32(f)) == 1 {
                        values.append(nil)
                    } else {
                        values.append(String(cString: PQgetvalue(res, Int32(t), Int32(f))))
                    }
                }
                rows.append(PostgresRow(values: values))
            }
            let affected = Int(String(cString: PQcmdTuples(res))) ?? 0
            return PostgresRows(columns: columns, rows: rows, affectedRows: affected)
        default:
            let sqlState = PQresultErrorField(res, Int32(UInt8(ascii: "C"))).map { String(cString: $0) }
            let primary =
                PQresultErrorField(res, Int32(UInt8(ascii: "M"))).map { String(cString: $0) }
                ?? String(cString: PQerrorMessage(conn)).trimmingCharacters(in: .whitespacesAndNewlines)
            let detail = PQresultErrorField(res, Int32(UInt8(ascii: "D"))).map { String(cString: $0) }
            let broken = PQstatus(conn) != CONNECTION_OK
            throw PostgresError(
                code: broken && sqlState == nil ? .connection : .query, sqlState: sqlState, message: primary,
                detail: detail)
        }
    }
}

/// The raw handles of a connection being closed.
private struct FinishHandles: @unchecked Sendable {
    // @unchecked Sendable: created in `deinit`, when no other reference to the connection exists,
    // and used once, on the connection's serial queue.
    let conn: OpaquePointer
    let cancel: OpaquePointer?
    /// Kept alive until `PQfinish` has returned: libpq holds a raw pointer to it.
    let notices: PostgresNotices

    func finish() {
        if let cancel { PQfreeCancel(cancel) }
        withExtendedLifetime(notices) { PQfinish(conn) }
    }
}
