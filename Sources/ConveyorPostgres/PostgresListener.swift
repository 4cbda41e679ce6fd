import CLibPQ
import ConveyorCore
import Foundation
public import Logging
import Synchronization

/// LISTENs on channels over a connection of its own, on a dedicated thread that waits in
/// `poll()` on the socket (bounded), and yields each notification's channel name.
///
/// Reconnects with backoff when the connection breaks and yields a synthetic notification on
/// each reconnect (work may have been missed meanwhile).
public final class PostgresListener: Sendable {
    private let url: String
    private let channels: [String]
    private let logger: Logger
    private let stopped = Atomic<Bool>(false)
    public let notifications: AsyncStream<String>
    private let continuation: AsyncStream<String>.Continuation

    public init(url: String, channels: [String], logger: Logger) {
        precondition(channels.allSatisfy { $0.allSatisfy { $0.isLetter || $0 == "_" } }, "channel names are identifiers")
        self.url = url
        self.channels = channels
        self.logger = logger
        (notifications, continuation) = AsyncStream.makeStream(of: String.self, bufferingPolicy: .bufferingNewest(16))
    }

    /// Starts the listening thread.
    public func start() {
        let t = Thread { [self] in loop() }
        t.name = "conveyor.pg.listen"
        t.start()
    }

    public func stop() {
        stopped.store(true, ordering: .relaxed)
    }

    private func loop() {
        var attempt = 0
        while !stopped.load(ordering: .relaxed) {
            guard let conn = PQconnectdb(url), PQstatus(conn) == CONNECTION_OK else {
                attempt += 1
                logger.warning("listener cannot connect, retrying", metadata: ["db.url": "\(redactPassword(in: url))", "attempt": "\(attempt)"])
                let d = Backoff.delay(attempt: attempt, base: .milliseconds(200), cap: .seconds(5))
                Thread.sleep(forTimeInterval: d.inSeconds)
                continue
            }
            defer { PQfinish(conn) }
            var ok = true
            for ch in channels {
                let r = PQexec(conn, "LISTEN \(ch)")
                ok = ok && PQresultStatus(r) == PGRES_COMMAND_OK
                PQclear(r)
            }
            guard ok else { continue }
            attempt = 0
            continuation.yield("reconnected")
            while !stopped.load(ordering: .relaxed) {
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
            if !stopped.load(ordering: .relaxed) {
                logger.warning("listener connection lost, reconnecting")
            }
        }
        continuation.finish()
    }
}
