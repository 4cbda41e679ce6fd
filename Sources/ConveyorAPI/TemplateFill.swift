import ConveyorCore
import Foundation
import HTTPTypes

/// `{{name}}` placeholders in template bodies: a string that is exactly one placeholder takes
/// the value as is (a number stays a number); inside longer text the value is written as text.
enum TemplateFill {
    static func isName(_ s: String) -> Bool {
        !s.isEmpty && s.count <= 64 && s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }
    }

    static func placeholders(in value: JSONValue) -> Set<String> {
        switch value {
        case .string(let s): return Set(tokens(s).map(\.name))
        case .array(let a): return a.reduce(into: []) { $0.formUnion(placeholders(in: $1)) }
        case .object(let o): return o.values.reduce(into: []) { $0.formUnion(placeholders(in: $1)) }
        default: return []
        }
    }

    static func fill(_ value: JSONValue, _ values: [String: JSONValue]) throws(Problem) -> JSONValue {
        switch value {
        case .string(let s):
            let found = tokens(s)
            if found.count == 1, found[0].range == s.startIndex..<s.endIndex, let v = values[found[0].name] { return v }
            var out = s
            for t in found.reversed() {
                guard let v = values[t.name] else { continue }
                let text: String =
                    switch v {
                    case .string(let x): x
                    case .number(let n): n.rounded() == n && abs(n) < 1e15 ? String(Int(n)) : String(n)
                    case .bool(let b): String(b)
                    default:
                        throw Problem(
                            .badRequest, "invalid request",
                            "{{\(t.name)}} sits inside text; give it text, a number or a boolean",
                            field: "values.\(t.name)",
                            value: "\(v)")
                    }
                out.replaceSubrange(t.range, with: text)
            }
            return .string(out)
        case .array(let a):
            var out: [JSONValue] = []
            for v in a { out.append(try fill(v, values)) }
            return .array(out)
        case .object(let o):
            var out: [String: JSONValue] = [:]
            for (k, v) in o { out[k] = try fill(v, values) }
            return .object(out)
        default: return value
        }
    }

    static func tokens(_ s: String) -> [(name: String, range: Range<String.Index>)] {
        var out: [(String, Range<String.Index>)] = []
        var rest = s.startIndex..<s.endIndex
        while let open = s.range(of: "{{", range: rest),
            let close = s.range(of: "}}", range: open.upperBound..<s.endIndex)
        {
            let name = s[open.upperBound..<close.lowerBound].trimmingCharacters(in: .whitespaces)
            if isName(name) { out.append((name, open.lowerBound..<close.upperBound)) }
            rest = close.upperBound..<s.endIndex
        }
        return out
    }
}
