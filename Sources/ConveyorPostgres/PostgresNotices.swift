import CLibPQ
import Logging

/// Routes the server's notices and warnings (`RAISE NOTICE`, "relation … already exists,
/// skipping") to the process's logger. libpq's default prints them as raw lines on standard
/// error, outside the structured (JSON) log an operator's collector parses.
///
/// A notice is logged at debug level, a server `WARNING` at warning level, with its SQLSTATE.
final class PostgresNotices: Sendable {
    let logger: Logger

    private init(logger: Logger) { self.logger = logger }

    /// Installs the receiver on `conn`. The returned object is the receiver's context: keep it
    /// alive until `PQfinish(conn)` has returned.
    static func install(on conn: OpaquePointer, logger: Logger) -> PostgresNotices {
        let notices = PostgresNotices(logger: logger)
        PQsetNoticeReceiver(
            conn,
            { arg, result in
                guard let arg, let result else { return }
                Unmanaged<PostgresNotices>.fromOpaque(arg).takeUnretainedValue().receive(result)
            }, Unmanaged.passUnretained(notices).toOpaque())
        return notices
    }

    private func receive(_ result: OpaquePointer) {
        func field(_ code: Character) -> String? {
            PQresultErrorField(result, Int32(code.asciiValue!)).map { String(cString: $0) }
        }
        let severity = field("V") ?? field("S") ?? "NOTICE"
        let message = field("M") ?? ""
        var metadata: Logger.Metadata = ["db.severity": "\(severity)"]
        if let state = field("C") { metadata["db.sqlstate"] = "\(state)" }
        if severity == "WARNING" {
            logger.warning("postgres: \(message)", metadata: metadata)
        } else {
            logger.debug("postgres: \(message)", metadata: metadata)
        }
    }
}
