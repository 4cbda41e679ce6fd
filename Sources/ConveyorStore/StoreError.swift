/// What the store reports in its own terms, so no caller matches SQLSTATE codes: the API and
/// the CLI turn these into their answers.
public struct StoreError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// A task of one of these names exists in the namespace (a unique name was taken,
        /// possibly by a concurrent request).
        case taskExists
    }

    public var kind: Kind
    public var message: String

    public var description: String { message }
}
