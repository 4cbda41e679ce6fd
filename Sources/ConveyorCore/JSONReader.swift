package import Foundation

/// A one-pass reader of JSON (RFC 8259) for the wire messages on the hot path: task messages,
/// statuses and status batches. Foundation's `JSONDecoder` went through `Codable` for each field
/// and cost a worker 13 % and the dispatcher 15 % of their CPU in a burst (docs/benchmarks.md,
/// "One-pass message decoding"); `JSONWriter` is its counterpart on the encoding side.
///
/// It is strict where a hostile body could make it lenient: the whole input must be one value
/// with nothing after it, strings must be valid UTF-8 with no raw control characters and only
/// paired surrogate escapes, numbers follow JSON's grammar and must be finite, and values nest at
/// most `maxDepth` deep (the stack stays bounded whatever the body). Refusals are `Failure`s that
/// name the field by its path.
package struct JSONReader: ~Copyable {
    /// What was wrong, and where.
    package struct Failure: Error, Sendable, Equatable {
        package enum Kind: Sendable, Equatable {
            /// Not JSON at all (or not UTF-8): the body is refused whole.
            case syntax
            /// A required member is absent.
            case missing
            /// A member holds another kind of value than the field takes.
            case type
            /// A member's value is of the right kind but not acceptable (a bad UUID, instant, name).
            case value
            /// A member appears twice in one object.
            case duplicate
        }
        package var kind: Kind
        /// The field, outermost first: `["statuses", "[3]", "body"]`.
        package var path: [String] = []
        /// What was found (for `value`, the value given).
        package var found: String = ""
        /// What was expected, or what is wrong.
        package var detail: String

        /// `statuses[3].body`, or `body` for the message as a whole.
        package var field: String {
            guard !path.isEmpty else { return "body" }
            var s = ""
            for p in path {
                if !s.isEmpty && !p.hasPrefix("[") { s += "." }
                s += p
            }
            return s
        }
    }

    /// Deepest nesting of arrays and objects accepted (as Foundation's decoder allows).
    package static let maxDepth = 512

    private let b: UnsafeBufferPointer<UInt8>
    private var i = 0
    /// Objects and arrays open here, counted from the top of the document (as Foundation counts).
    private var depth = 0

    private init(_ b: UnsafeBufferPointer<UInt8>) { self.b = b }

    /// Reads `bytes` with `body`, which must consume exactly one JSON value; only whitespace may follow.
    package static func read<T>(_ bytes: [UInt8], _ body: (inout JSONReader) throws(Failure) -> T) throws(Failure)
        -> T
    {
        let result: Result<T, Failure> = bytes.withUnsafeBufferPointer { buf in
            var r = JSONReader(buf)
            do throws(Failure) {
                let v = try body(&r)
                r.skipSpace()
                guard r.i == r.b.count else { throw r.syntax("unexpected data after the JSON value") }
                return .success(v)
            } catch {
                return .failure(error)
            }
        }
        return try result.get()
    }

    // MARK: structure

    /// Reads an object, giving each member's key to `each`, which must read the member's value.
    /// A failure inside a member names its key in the path.
    package mutating func object(_ each: (inout JSONReader, String) throws(Failure) -> Void) throws(Failure) {
        try elements(UInt8(ascii: "{"), UInt8(ascii: "}"), "an object") { (r: inout JSONReader, _) throws(Failure) in
            guard r.peek() == UInt8(ascii: "\"") else { throw r.syntax("expected a member name in quotes") }
            let key = try r.rawString()
            r.skipSpace()
            guard r.peek() == UInt8(ascii: ":") else { throw r.syntax("expected ':' after a member name") }
            r.i += 1
            try r.under(key) { (r: inout JSONReader) throws(Failure) in try each(&r, key) }
        }
    }

    /// Reads an array, giving each element's index to `each`, which must read the element.
    package mutating func array(_ each: (inout JSONReader, Int) throws(Failure) -> Void) throws(Failure) {
        try elements(UInt8(ascii: "["), UInt8(ascii: "]"), "an array") { (r: inout JSONReader, n) throws(Failure) in
            try r.under("[\(n)]") { (r: inout JSONReader) throws(Failure) in try each(&r, n) }
        }
    }

    /// The comma-separated elements between `open` and `close`, each read by `each`.
    private mutating func elements(
        _ open: UInt8, _ close: UInt8, _ what: String, _ each: (inout JSONReader, Int) throws(Failure) -> Void
    ) throws(Failure) {
        try self.open(open, what)
        skipSpace()
        if peek() == close {
            i += 1
            depth -= 1
            return
        }
        let closing = Character(Unicode.Scalar(close))
        var n = 0
        while true {
            skipSpace()
            if peek() == close { throw syntax("a comma before '\(closing)'") }
            try each(&self, n)
            n += 1
            skipSpace()
            switch peek() {
            case UInt8(ascii: ","): i += 1
            case close:
                i += 1
                depth -= 1
                return
            default: throw syntax("expected ',' or '\(closing)' in \(what)")
            }
        }
    }

    /// Runs `body`, naming `component` (a member's key, an element's index) in the path of a
    /// failure inside it; the name is made only then.
    private mutating func under(
        _ component: @autoclosure () -> String, _ body: (inout JSONReader) throws(Failure) -> Void
    ) throws(Failure) {
        do throws(Failure) {
            try body(&self)
        } catch {
            var e = error
            if e.kind != .syntax { e.path.insert(component(), at: 0) }
            throw e
        }
    }

    // MARK: scalars

    /// Consumes a `null` if one is next.
    package mutating func null() -> Bool {
        skipSpace()
        guard literal("null") else { return false }
        return true
    }

    package mutating func string() throws(Failure) -> String {
        skipSpace()
        guard peek() == UInt8(ascii: "\"") else { throw mismatch("a string") }
        return try rawString()
    }

    package mutating func bool() throws(Failure) -> Bool {
        skipSpace()
        if literal("true") { return true }
        if literal("false") { return false }
        throw mismatch("true or false")
    }

    package mutating func double() throws(Failure) -> Double {
        skipSpace()
        guard let c = peek(), c == UInt8(ascii: "-") || isDigit(c) else { throw mismatch("a number") }
        return try number()
    }

    /// An integer: a number with no fraction (`2`, or `2.0`, `2e0`), in `Int`'s range; digits
    /// alone are read exactly, to the last one.
    package mutating func int() throws(Failure) -> Int {
        skipSpace()
        guard let c = peek(), c == UInt8(ascii: "-") || isDigit(c) else { throw mismatch("an integer") }
        let start = i
        let d = try number()
        var exact: Int? = 0
        var k = start
        let negative = b[k] == UInt8(ascii: "-")
        if negative { k += 1 }
        while k < i, isDigit(b[k]), let v = exact {
            let digit = Int(b[k] - UInt8(ascii: "0"))
            let (m, o1) = v.multipliedReportingOverflow(by: 10)
            let (n, o2) = negative ? m.subtractingReportingOverflow(digit) : m.addingReportingOverflow(digit)
            exact = o1 || o2 ? nil : n
            k += 1
        }
        if k == i, let exact { return exact }
        // A fraction or an exponent: whole, and small enough for a float to hold exactly.
        if k < i, let n = Int(exactly: d), abs(d) <= 9_007_199_254_740_992 { return n }
        let text = String(decoding: b[start..<i], as: UTF8.self)
        throw Failure(kind: .value, found: text, detail: "a whole number from \(Int.min) to \(Int.max)")
    }

    /// Any JSON value, as `JSONValue`.
    package mutating func value() throws(Failure) -> JSONValue {
        skipSpace()
        guard let c = peek() else { throw syntax("unexpected end of input") }
        switch c {
        case UInt8(ascii: "\""): return .string(try rawString())
        case UInt8(ascii: "{"):
            var o: [String: JSONValue] = [:]
            try object { (r: inout JSONReader, key: String) throws(Failure) in
                guard o.updateValue(try r.value(), forKey: key) == nil else {
                    throw Failure(kind: .duplicate, detail: "a member may appear once; this one appears twice")
                }
            }
            return .object(o)
        case UInt8(ascii: "["):
            var a: [JSONValue] = []
            try array { (r: inout JSONReader, _: Int) throws(Failure) in a.append(try r.value()) }
            return .array(a)
        case UInt8(ascii: "t"), UInt8(ascii: "f"): return .bool(try bool())
        case UInt8(ascii: "n"):
            guard null() else { throw syntax("expected a JSON value") }
            return .null
        default:
            guard c == UInt8(ascii: "-") || isDigit(c) else { throw syntax("expected a JSON value") }
            return .number(try number())
        }
    }

    /// Reads and drops one value of any kind (a member this version does not know), checked as
    /// strictly as any other but built into nothing.
    package mutating func skip() throws(Failure) {
        skipSpace()
        switch peek() {
        case UInt8(ascii: "{")?: try object { (r: inout JSONReader, _: String) throws(Failure) in try r.skip() }
        case UInt8(ascii: "[")?: try array { (r: inout JSONReader, _: Int) throws(Failure) in try r.skip() }
        case UInt8(ascii: "\"")?: _ = try rawString()
        default: _ = try value()
        }
    }

    // MARK: lexing

    private func peek() -> UInt8? { i < b.count ? b[i] : nil }

    private func isDigit(_ c: UInt8) -> Bool { c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") }

    private mutating func skipSpace() {
        while i < b.count {
            switch b[i] {
            case UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\n"), UInt8(ascii: "\r"): i += 1
            default: return
            }
        }
    }

    private mutating func open(_ c: UInt8, _ what: String) throws(Failure) {
        skipSpace()
        guard peek() == c else { throw mismatch(what) }
        guard depth < Self.maxDepth else { throw syntax("values nested more than \(Self.maxDepth) deep") }
        i += 1
        depth += 1
    }

    private mutating func literal(_ word: StaticString) -> Bool {
        let n = word.utf8CodeUnitCount
        guard i + n <= b.count else { return false }
        for k in 0..<n where b[i + k] != word.utf8Start[k] { return false }
        i += n
        return true
    }

    /// A number per JSON's grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, finite.
    private mutating func number() throws(Failure) -> Double {
        let start = i
        if peek() == UInt8(ascii: "-") { i += 1 }
        guard let first = peek(), isDigit(first) else { throw syntax("a number needs digits") }
        i += 1
        if first != UInt8(ascii: "0") { while let c = peek(), isDigit(c) { i += 1 } }
        var integral = true
        if peek() == UInt8(ascii: ".") {
            integral = false
            i += 1
            guard let c = peek(), isDigit(c) else { throw syntax("a number needs digits after '.'") }
            while let c = peek(), isDigit(c) { i += 1 }
        }
        if peek() == UInt8(ascii: "e") || peek() == UInt8(ascii: "E") {
            integral = false
            i += 1
            if peek() == UInt8(ascii: "+") || peek() == UInt8(ascii: "-") { i += 1 }
            guard let c = peek(), isDigit(c) else { throw syntax("a number needs digits in its exponent") }
            while let c = peek(), isDigit(c) { i += 1 }
        }
        // Short integers (counts, attempts, exit codes) are summed here; the rest go to the
        // standard library's correctly rounded parser.
        if integral && i - start <= 18 {
            var v = 0
            for k in start..<i where b[k] != UInt8(ascii: "-") { v = v * 10 + Int(b[k] - UInt8(ascii: "0")) }
            return Double(b[start] == UInt8(ascii: "-") ? -v : v)
        }
        let text = String(decoding: b[start..<i], as: UTF8.self)
        guard let d = Double(text), d.isFinite else {
            throw Failure(kind: .value, found: text, detail: "a number within the range of a 64-bit float")
        }
        return d
    }

    /// A string starting at its opening quote: escapes resolved, UTF-8 checked.
    private mutating func rawString() throws(Failure) -> String {
        i += 1
        let start = i
        // The common case: no escape, so the bytes are the string.
        while i < b.count {
            let c = b[i]
            if c == UInt8(ascii: "\"") {
                defer { i += 1 }
                return try text(UnsafeBufferPointer(rebasing: b[start..<i]))
            }
            if c == UInt8(ascii: "\\") { break }
            guard c >= 0x20 else { throw syntax("a control character inside a string must be escaped") }
            i += 1
        }
        var out = Array(b[start..<i])
        while i < b.count {
            let c = b[i]
            i += 1
            switch c {
            case UInt8(ascii: "\""): return try out.withUnsafeBufferPointer { (o) throws(Failure) in try text(o) }
            case UInt8(ascii: "\\"):
                guard let e = peek() else { break }
                i += 1
                switch e {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var scalar = try hex4()
                    if (0xD800...0xDBFF).contains(scalar) {
                        guard literal("\\u") else { throw syntax("an unpaired surrogate in a \\u escape") }
                        let low = try hex4()
                        guard (0xDC00...0xDFFF).contains(low) else {
                            throw syntax("an unpaired surrogate in a \\u escape")
                        }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    } else if (0xDC00...0xDFFF).contains(scalar) {
                        throw syntax("an unpaired surrogate in a \\u escape")
                    }
                    out.append(contentsOf: String(Character(Unicode.Scalar(scalar)!)).utf8)
                default: throw syntax("an unknown escape '\\\(Character(Unicode.Scalar(e)))' in a string")
                }
            default:
                guard c >= 0x20 else { throw syntax("a control character inside a string must be escaped") }
                out.append(c)
            }
        }
        throw syntax("a string is not closed")
    }

    private mutating func hex4() throws(Failure) -> UInt32 {
        guard i + 4 <= b.count else { throw syntax("a \\u escape needs four hex digits") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = b[i]
            let d: UInt8
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = c - UInt8(ascii: "A") + 10
            default: throw syntax("a \\u escape needs four hex digits")
            }
            v = v << 4 | UInt32(d)
            i += 1
        }
        return v
    }

    private func text(_ bytes: UnsafeBufferPointer<UInt8>) throws(Failure) -> String {
        guard let s = String(validating: bytes, as: UTF8.self) else { throw syntax("a string is not valid UTF-8") }
        return s
    }

    private func syntax(_ detail: String) -> Failure {
        Failure(kind: .syntax, found: "", detail: "\(detail) (at byte \(i))")
    }

    /// The value here is of another kind than `expected`.
    private func mismatch(_ expected: String) -> Failure {
        func starts(_ word: String) -> Bool {
            let w = Array(word.utf8)
            return i + w.count <= b.count && b[i..<(i + w.count)].elementsEqual(w)
        }
        let found: String? =
            switch peek() {
            case UInt8(ascii: "\"")?: "a string"
            case UInt8(ascii: "{")?: "an object"
            case UInt8(ascii: "[")?: "an array"
            case UInt8(ascii: "t")? where starts("true"), UInt8(ascii: "f")? where starts("false"): "true or false"
            case UInt8(ascii: "n")? where starts("null"): "null"
            case let c? where isDigit(c): "a number"
            case UInt8(ascii: "-")? where i + 1 < b.count && isDigit(b[i + 1]): "a number"
            default: nil  // the end of the input, a broken literal, or no JSON value at all
            }
        guard let found else { return syntax("expected \(expected)") }
        return Failure(kind: .type, found: found, detail: "expected \(expected)")
    }
}

extension JSONReader {
    /// A `uuid` in its canonical text form.
    package mutating func uuid() throws(Failure) -> UUID {
        let s = try string()
        guard let id = UUID(canonical: s) else {
            throw Failure(kind: .value, found: s, detail: "a UUID such as 0b4f6a3c-5d1e-4e8a-9c2b-7f3d2e1a0c9b")
        }
        return id
    }

    /// An ISO-8601 instant (`Timestamp.parse`).
    package mutating func instant() throws(Failure) -> Date {
        let s = try string()
        guard let d = Timestamp.parse(s) else {
            throw Failure(kind: .value, found: s, detail: "an ISO-8601 instant such as 2026-11-23T12:00:00.000Z")
        }
        return d
    }

    /// A string naming one case of `T`.
    package mutating func name<T: RawRepresentable & CaseIterable>(of _: T.Type) throws(Failure) -> T
    where T.RawValue == String {
        let s = try string()
        guard let v = T(rawValue: s) else {
            throw Failure(
                kind: .value, found: s, detail: "one of \(T.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return v
    }

    // An optional member's value: nil when it is `null`.
    package mutating func optionalString() throws(Failure) -> String? { null() ? nil : try string() }
    package mutating func optionalInt() throws(Failure) -> Int? { null() ? nil : try int() }
    package mutating func optionalBool() throws(Failure) -> Bool? { null() ? nil : try bool() }
    package mutating func optionalInstant() throws(Failure) -> Date? { null() ? nil : try instant() }
    package mutating func optionalValue() throws(Failure) -> JSONValue? { null() ? nil : try value() }
}

/// Which members of an object were seen, to refuse one given twice and name one missing.
package struct JSONMembers {
    private var seen: UInt64 = 0
    /// Members the reader does not know, kept only when some appear (a newer sender's additions).
    private var unknown: Set<String> = []

    package init() {}

    /// Marks member `index` (below 64) seen; a second time is a `duplicate` failure.
    package mutating func see(_ index: Int) throws(JSONReader.Failure) {
        let bit: UInt64 = 1 << UInt64(index)
        guard seen & bit == 0 else {
            throw JSONReader.Failure(
                kind: .duplicate, detail: "a member may appear once; this one appears twice")
        }
        seen |= bit
    }

    /// Skips a member this version does not know; a second one of the same name is a
    /// `duplicate` failure, as for the known ones.
    package mutating func skipUnknown(_ key: String, _ r: inout JSONReader) throws(JSONReader.Failure) {
        guard unknown.insert(key).inserted else {
            throw JSONReader.Failure(kind: .duplicate, detail: "a member may appear once; this one appears twice")
        }
        try r.skip()
    }

    /// The value of a required member, or a `missing` failure naming it.
    package func required<T>(_ v: T?, _ key: String) throws(JSONReader.Failure) -> T {
        guard let v else {
            throw JSONReader.Failure(kind: .missing, path: [key], found: "(missing)", detail: "")
        }
        return v
    }
}

extension JSONValue {
    /// Parses one JSON value (`JSONReader`: strict, bounded depth), such as PostgreSQL's text form
    /// of a `jsonb` column read on the hot path (a task's parameters in each claimed run).
    package init(json bytes: [UInt8]) throws(JSONReader.Failure) {
        self = try JSONReader.read(bytes) { (r: inout JSONReader) throws(JSONReader.Failure) in try r.value() }
    }
}
