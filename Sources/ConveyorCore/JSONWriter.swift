/// A small JSON writer for the wire messages: keys in a fixed order, strings escaped per
/// RFC 8259. It replaces Foundation's `JSONEncoder` on the hot path, which crashed under
/// concurrent use on Linux (see docs/architecture.md, "Known platform issues").
struct JSONWriter {
    private(set) var bytes: [UInt8] = []
    private var needsComma = [false]

    init() { bytes.reserveCapacity(256) }

    mutating func beginObject() {
        separator()
        bytes.append(UInt8(ascii: "{"))
        needsComma.append(false)
    }
    mutating func endObject() {
        bytes.append(UInt8(ascii: "}"))
        needsComma.removeLast()
    }
    mutating func beginArray() {
        separator()
        bytes.append(UInt8(ascii: "["))
        needsComma.append(false)
    }
    mutating func endArray() {
        bytes.append(UInt8(ascii: "]"))
        needsComma.removeLast()
    }

    mutating func key(_ k: String) {
        separator()
        writeString(k)
        bytes.append(UInt8(ascii: ":"))
        needsComma[needsComma.count - 1] = false  // the value follows without a comma
    }

    /// `"key": value` for each present value; an absent (nil) one writes nothing.
    mutating func field(_ k: String, _ v: String?) {
        guard let v else { return }
        key(k)
        string(v)
    }
    mutating func field(_ k: String, _ v: Int?) {
        guard let v else { return }
        key(k)
        int(v)
    }
    mutating func field(_ k: String, _ v: Bool?) {
        guard let v else { return }
        key(k)
        bool(v)
    }
    mutating func field(_ k: String, _ v: Double) {
        key(k)
        double(v)
    }
    mutating func field(_ k: String, _ v: JSONValue) {
        key(k)
        value(v)
    }

    mutating func string(_ s: String) {
        separator()
        writeString(s)
    }
    mutating func int(_ i: Int) {
        separator()
        bytes.append(contentsOf: String(i).utf8)
    }
    mutating func bool(_ b: Bool) {
        separator()
        bytes.append(contentsOf: (b ? "true" : "false").utf8)
    }
    mutating func null() {
        separator()
        bytes.append(contentsOf: "null".utf8)
    }
    mutating func double(_ d: Double) {
        separator()
        if !d.isFinite {
            bytes.append(contentsOf: "null".utf8)
        } else if d.rounded() == d, abs(d) < 1e15 {
            bytes.append(contentsOf: String(Int64(d)).utf8)
        } else {
            bytes.append(contentsOf: "\(d)".utf8)
        }
    }

    mutating func value(_ v: JSONValue) {
        switch v {
        case .null: null()
        case .bool(let b): bool(b)
        case .number(let n): double(n)
        case .string(let s): string(s)
        case .array(let a):
            beginArray()
            for e in a { value(e) }
            endArray()
        case .object(let o):
            beginObject()
            for k in o.keys.sorted() {
                key(k)
                value(o[k]!)
            }
            endObject()
        }
    }

    private mutating func separator() {
        if needsComma[needsComma.count - 1] { bytes.append(UInt8(ascii: ",")) }
        needsComma[needsComma.count - 1] = true
    }

    private mutating func writeString(_ s: String) {
        bytes.append(UInt8(ascii: "\""))
        let hex: [UInt8] = Array("0123456789abcdef".utf8)
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\""): bytes.append(contentsOf: [92, 34])
            case UInt8(ascii: "\\"): bytes.append(contentsOf: [92, 92])
            case 0x0A: bytes.append(contentsOf: [92, UInt8(ascii: "n")])
            case 0x0D: bytes.append(contentsOf: [92, UInt8(ascii: "r")])
            case 0x09: bytes.append(contentsOf: [92, UInt8(ascii: "t")])
            case 0..<0x20:
                bytes.append(contentsOf: [92, UInt8(ascii: "u"), 48, 48, hex[Int(b >> 4)], hex[Int(b & 0xF)]])
            default: bytes.append(b)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }
}

extension JSONValue {
    /// The value as compact JSON (object keys sorted).
    package var jsonBytes: [UInt8] {
        var w = JSONWriter()
        w.value(self)
        return w.bytes
    }
}
