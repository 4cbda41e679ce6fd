import ConveyorPostgres

/// What the store reports in its own terms, so no caller matches SQLSTATE codes: the API and
/// the CLI turn these into their answers.
package struct StoreError: Error, Sendable, Equatable, CustomStringConvertible {
    package enum Kind: Sendable, Equatable {
        /// A task of one of these names exists in the namespace (a unique name was taken,
        /// possibly by a concurrent request).
        case taskExists
    }

    package var kind: Kind
    package var message: String

    package var description: String { message }
}

extension Store {
    /// Whether `error` means the database cannot be reached now (no connection could be made or
    /// one broke, the pool had none free in time, the server is shutting down or refuses
    /// connections): worth retrying later, unlike a refused statement. The API answers 503 with
    /// `Retry-After` for these.
    package static func isUnavailable(_ error: any Error) -> Bool {
        guard let e = error as? PostgresError else { return false }
        switch e.code {
        case .connection, .poolTimeout, .closed, .commitOutcomeUnknown: return true
        default:
            guard let s = e.sqlState else { return false }
            return s.hasPrefix("08") || ["57P01", "57P02", "57P03", "53300"].contains(s)
        }
    }
}
