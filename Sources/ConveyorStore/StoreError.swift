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
