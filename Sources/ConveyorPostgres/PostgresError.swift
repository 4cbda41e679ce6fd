/// An error from PostgreSQL or from talking to it.
///
/// `description` is safe to show (no SQL text, no parameter values); `debugDescription` adds the
/// server's detail for logs.
package struct PostgresError: Error, Sendable, CustomStringConvertible, CustomDebugStringConvertible {
    package struct Code: Sendable, Hashable, CustomStringConvertible {
        enum Base: String, Sendable { case connection, query, poolTimeout, closed, commitOutcomeUnknown, decoding }
        let base: Base
        /// The connection could not be made or broke.
        package static let connection = Code(base: .connection)
        /// The server refused a statement (see `sqlState`).
        package static let query = Code(base: .query)
        /// No pooled connection became free within the acquire timeout.
        package static let poolTimeout = Code(base: .poolTimeout)
        /// The pool or connection was shut down.
        package static let closed = Code(base: .closed)
        /// The connection broke during COMMIT: the transaction may or may not have committed.
        /// Re-read before redoing.
        package static let commitOutcomeUnknown = Code(base: .commitOutcomeUnknown)
        /// A column could not be read as the requested type.
        package static let decoding = Code(base: .decoding)
        package var description: String { base.rawValue }
    }

    package var code: Code
    /// The five-character SQLSTATE, when the server sent one.
    package var sqlState: String?
    package var message: String
    var detail: String?

    package init(code: Code, sqlState: String? = nil, message: String, detail: String? = nil) {
        self.code = code
        self.sqlState = sqlState
        self.message = message
        self.detail = detail
    }

    /// Whether running the same work again later may succeed: broken connections, serialization
    /// failures, deadlocks, server shutdown, pool exhaustion, statement timeouts.
    package var isRetriable: Bool {
        switch code.base {
        case .connection, .poolTimeout, .commitOutcomeUnknown: return true
        case .closed, .decoding: return false
        case .query:
            guard let s = sqlState else { return false }
            return s.hasPrefix("08") || s == "40001" || s == "40P01" || s.hasPrefix("57P") || s == "57014"
                || s == "53300"
        }
    }

    /// A unique-constraint violation.
    package var isUniqueViolation: Bool { sqlState == "23505" }

    package var description: String {
        "postgres \(code)\(sqlState.map { " (SQLSTATE \($0))" } ?? ""): \(message)"
    }

    package var debugDescription: String {
        description + (detail.map { " — \($0)" } ?? "")
    }
}
