/// Bad input: names the field, the value that was given, and how to fix it.
public struct ValidationError: Error, Sendable, Hashable, CustomStringConvertible {
    public var field: String
    public var value: String
    public var hint: String

    public init(field: String, value: String, hint: String) {
        self.field = field
        self.value = value
        self.hint = hint
    }

    public var description: String {
        let shown = value.count > 200 ? String(value.prefix(200)) + "…" : value
        return "invalid \(field) '\(shown)': \(hint)"
    }
}
