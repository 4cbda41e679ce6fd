import CLibPQ
import ConveyorCore
import Foundation
package import Logging
import Synchronization

/// LISTENs on channels over a connection of its own, on a dedicated thread that waits in
/// `poll()` on the socket (bounded), and yields each notification's channel name.
///
/// Reconnects when the connection breaks and yields a synthetic notification on each reconnect
/// (work may have been missed meanwhile). Every attempt after a failure (no connection, a LISTEN
/// refused, a session that ended before `retry.cap` had passed) waits `Backoff.delay` first, so a
/// server that keeps ending sessions is not hammered; `stop()` ends a wait at once.
package final class PostgresListener: Sendable {
    /// Backoff between attempts after a failure.
    package struct Retry: Sendable {
        package var base: Duration
        package var cap: Duration
        package init(base: Duration = .milliseconds(200), cap: Duration = .seconds(5)) {
            self.base = base
            self.cap = cap
        }
    }

    private let url: String
    private let channels: [String]
    private let retry: Retry
    private let logger: Logger
    private let stopped = Atomic<Bool>(false)
    /// Signalled by `stop()`: ends a backoff wait.
    private let stopSignal = DispatchSemaphore(value: 0)
    private let waits = Atomic<Int>(0)
    package let notifications: AsyncStream<String>
    private let continuation: AsyncStream<String>.Continuation

    package init(url: String, channels: [String], retry: Retry = Retry(), logger: Logger) {
        precondition(
            channels.allSatisfy { $0.allSatisfy { $0.isLetter || $0 == "_" } }, "channel names are identifiers")
        self.url = url
        self.channels = channels
        self.retry = retry
        self.logger = logger
        (notifications, continuation) = AsyncStream.makeStream(of: String.self, bufferingPolicy: .bufferingNewest(16))
    }

    /// Backoff waits begun so far.
    package var backoffWaits: Int { waits.load(ordering: .relaxed) }

    /// Starts the listening thread.
    package func start() {
        let t = Thread { [self] in loop() }
        t.name = "conveyor.pg.listen"
        t.start()
    }

    /// Stops listening: a backoff wait ends at once, a poll within 250 ms; then `notifications` ends.
    package func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        stopSignal.signal()
    }

    private var isStopped: Bool { stopped.load(ordering: .relaxed) }

    private func loop() {
        defer { continuation.finish() }
        var failures = 0
        while !isStopped {
            if failures > 0 {
                waits.add(1, ordering: .relaxed)
                let d = Backoff.delay(attempt: failures, base: retry.base, cap: retry.cap)
                if stopSignal.wait(timeout: .now() + .milliseconds(Int(d.inMilliseconds))) == .success { return }
            }
            guard let conn = PQconnectdb(url) else { return }
            let notices = PostgresNotices.install(on: conn, logger: logger)
            defer { withExtendedLifetime(notices) { PQfinish(conn) } }
            guard PQstatus(conn) == CONNECTION_OK else {
                failures += 1
                logger.warning(
                    "listener cannot connect, retrying",
                    metadata: ["db.url": "\(redactPassword(in: url))", "attempt": "\(failures)"])
                continue
            }
            var ok = true
            for ch in channels where ok {
                let r = PQexec(conn, "LISTEN \(ch)")
                ok = PQresultStatus(r) == PGRES_COMMAND_OK
                if !ok { logger.warning("LISTEN \(ch) refused, retrying", metadata: ["error": "\(errorText(conn))"]) }
                PQclear(r)
            }
            guard ok else {
                failures += 1
                continue
            }
            continuation.yield("reconnected")
            let since = ContinuousClock.now
            while !isStopped {
                var pfd = pollfd(fd: PQsocket(conn), events: Int16(POLLIN), revents: 0)
                let n = poll(&pfd, 1, 250)
                if n < 0 && errno != EINTR { break }
                if PQconsumeInput(conn) == 0 { break }
                while let note = PQnotifies(conn) {
                    continuation.yield(String(cString: note.pointee.relname))
                    PQfreemem(note)
                }
                if PQstatus(conn) != CONNECTION_OK { break }
            }
            guard !isStopped else { return }
            // A session that lasted past the cap was healthy: reconnecting is a first attempt again.
            failures = ContinuousClock.now - since >= retry.cap ? 1 : failures + 1
            logger.warning("listener connection lost, reconnecting", metadata: ["attempt": "\(failures)"])
        }
    }

    private func errorText(_ conn: OpaquePointer) -> String {
        String(cString: PQerrorMessage(conn)).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
