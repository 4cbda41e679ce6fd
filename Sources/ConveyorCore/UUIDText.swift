package import Foundation

extension UUID {
    /// The canonical lowercase form (`8-4-4-4-12` hex digits), as `lowercasedString`
    /// gives, made without Foundation's `snprintf` and a second string: run ids are written on the
    /// hot path (SQL arrays, messages and spans), where that pair is costly (docs/benchmarks.md).
    package var lowercasedString: String {
        withUnsafeBytes(of: uuid) { bytes in
            String(unsafeUninitializedCapacity: 36) { out in
                var j = 0
                for (i, b) in bytes.enumerated() {
                    if i == 4 || i == 6 || i == 8 || i == 10 {
                        out[j] = UInt8(ascii: "-")
                        j += 1
                    }
                    out[j] = hexDigits[Int(b >> 4)]
                    out[j + 1] = hexDigits[Int(b & 0x0F)]
                    j += 2
                }
                return j
            }
        }
    }
}

extension UUID {
    /// Appends the canonical lowercase form's 36 bytes (as `lowercasedString`, without a string).
    package func appendLowercased(to out: inout [UInt8]) {
        withUnsafeBytes(of: uuid) { bytes in
            for (i, b) in bytes.enumerated() {
                if i == 4 || i == 6 || i == 8 || i == 10 { out.append(UInt8(ascii: "-")) }
                out.append(hexDigits[Int(b >> 4)])
                out.append(hexDigits[Int(b & 0x0F)])
            }
        }
    }
}

extension UUID {
    /// PostgreSQL's order of `uuid` values (their bytes, compared as unsigned), which is also the
    /// order of their hex text; rows are locked in it. Made without building strings.
    package func precedes(_ other: UUID) -> Bool {
        withUnsafeBytes(of: uuid) { a in withUnsafeBytes(of: other.uuid) { b in a.lexicographicallyPrecedes(b) } }
    }
}

extension UUID {
    /// Parses the canonical `8-4-4-4-12` hex form (either case), as PostgreSQL prints a `uuid`,
    /// without Foundation's general parser; nil for anything else.
    package init?(canonical text: String) {
        var bytes = [UInt8](repeating: 0, count: 16)
        var n = 0
        var high: UInt8?
        var i = 0
        for c in text.utf8 {
            defer { i += 1 }
            if i == 8 || i == 13 || i == 18 || i == 23 {
                guard c == UInt8(ascii: "-") else { return nil }
                continue
            }
            let v: UInt8
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): v = c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): v = c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): v = c - UInt8(ascii: "A") + 10
            default: return nil
            }
            guard n < 16 else { return nil }
            if let h = high {
                bytes[n] = h << 4 | v
                n += 1
                high = nil
            } else {
                high = v
            }
        }
        guard i == 36, n == 16 else { return nil }
        self.init(
            uuid: (
                bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
                bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15]
            ))
    }
}

private let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)
