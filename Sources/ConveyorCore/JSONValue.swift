import Foundation

/// A JSON value, for executor parameters that Conveyor carries without interpreting.
public enum JSONValue: Sendable, Hashable, Codable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let b = try? c.decode(Bool.self) {
            self = .bool(b)
        } else if let n = try? c.decode(Double.self) {
            self = .number(n)
        } else if let s = try? c.decode(String.self) {
            self = .string(s)
        } else if let a = try? c.decode([JSONValue].self) {
            self = .array(a)
        } else {
            self = .object(try c.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .number(let n):
            if n.rounded() == n, abs(n) < 1e15 { try c.encode(Int64(n)) } else { try c.encode(n) }
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }

    public var stringValue: String? { if case .string(let s) = self { s } else { nil } }
    public var doubleValue: Double? { if case .number(let n) = self { n } else { nil } }
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { a } else { nil } }
    public var objectValue: [String: JSONValue]? { if case .object(let o) = self { o } else { nil } }
    public subscript(key: String) -> JSONValue? { objectValue?[key] }

    /// Where the first NUL character sits (in a string or a key), as a field path such as
    /// `tasks[2].parameters.argv[0]`, or nil when there is none. PostgreSQL stores no NUL in
    /// `text` or `jsonb`, so input holding one is refused where it arrives, naming this path.
    public func pathOfNUL(_ path: String = "") -> String? {
        switch self {
        case .string(let s): return s.utf8.contains(0) ? (path.isEmpty ? "body" : path) : nil
        case .array(let a):
            for (i, v) in a.enumerated() { if let p = v.pathOfNUL("\(path)[\(i)]") { return p } }
        case .object(let o):
            for k in o.keys.sorted() {
                let sub = path.isEmpty ? k : "\(path).\(k)"
                if k.utf8.contains(0) { return sub.storable }
                if let p = o[k]!.pathOfNUL(sub) { return p }
            }
        case .null, .bool, .number: break
        }
        return nil
    }
}

extension JSONValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral,
    ExpressibleByBooleanLiteral,
    ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral
{
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int) { self = .number(Double(value)) }
    public init(floatLiteral value: Double) { self = .number(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self = .object(Dictionary(elements, uniquingKeysWith: { $1 }))
    }
}

extension JSONValue {
    /// A value as a YAML or JSON loader returns it (`Yams.load`, `JSONSerialization`):
    /// strings, numbers, booleans, dates (written as ISO-8601), arrays and mappings.
    public init(loaded any: Any?) {
        switch any {
        case nil, is NSNull: self = .null
        case let s as String: self = .string(s)
        case let b as Bool: self = .bool(b)
        case let i as Int: self = .number(Double(i))
        case let d as Double: self = .number(d)
        case let d as Date: self = .string(Timestamp.format(d))
        case let a as [Any]: self = .array(a.map { JSONValue(loaded: $0) })
        case let o as [String: Any]: self = .object(o.mapValues { JSONValue(loaded: $0) })
        case let o as [AnyHashable: Any]:
            self = .object(
                Dictionary(o.map { ("\($0.key)", JSONValue(loaded: $0.value)) }, uniquingKeysWith: { a, _ in a }))
        case let other?: self = .string("\(other)")
        }
    }
}

extension JSONValue {
    /// The tasks a task file or a `POST /v1/tasks` body holds when it is a batch: a list, or a
    /// mapping whose only key is `tasks` and holds a list. Nil for anything else, which is one
    /// task: a mapping with `tasks` beside other keys is one task (and its decoder names the
    /// unknown field), never a batch that drops the other keys. One rule for the API, the file
    /// decoder and conveyorctl.
    package var taskBatch: [JSONValue]? {
        arrayValue ?? (objectValue?.keys.sorted() == ["tasks"] ? self["tasks"]?.arrayValue : nil)
    }
}
