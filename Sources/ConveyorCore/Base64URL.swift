/// Base64url without padding (RFC 4648 §5), as status proofs, API keys and JWT segments use it.
///
/// Written over bytes: Foundation's `base64EncodedString()` followed by three
/// `replacingOccurrences` went through CFString searches and took 9 % of the dispatcher's CPU in
/// `conveyor bench` (docs/benchmarks.md, "Trust boundaries").
public enum Base64URL {
  static let alphabet = Array(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)

  /// The text of `bytes`, without `=` padding.
  public static func encode<Bytes: Collection<UInt8>>(_ bytes: Bytes) -> String {
    let input = Array(bytes)
    let length = (input.count * 4 + 2) / 3
    return String(unsafeUninitializedCapacity: length) { out in
      var o = 0
      var i = 0
      func put(_ sextet: UInt32) {
        out[o] = alphabet[Int(sextet & 63)]
        o += 1
      }
      while i + 3 <= input.count {
        let n = UInt32(input[i]) << 16 | UInt32(input[i + 1]) << 8 | UInt32(input[i + 2])
        put(n >> 18)
        put(n >> 12)
        put(n >> 6)
        put(n)
        i += 3
      }
      switch input.count - i {
      case 1:
        let n = UInt32(input[i]) << 16
        put(n >> 18)
        put(n >> 12)
      case 2:
        let n = UInt32(input[i]) << 16 | UInt32(input[i + 1]) << 8
        put(n >> 18)
        put(n >> 12)
        put(n >> 6)
      default: break
      }
      return o
    }
  }

  /// The bytes of base64url `text` (padding optional), or nil when it is not base64url: a
  /// character outside the alphabet, a length no encoder produces, or stray bits in the last
  /// character.
  public static func decode<Text: StringProtocol>(_ text: Text) -> [UInt8]? {
    var chars = Array(text.utf8)
    while chars.last == UInt8(ascii: "=") { chars.removeLast() }
    guard chars.count % 4 != 1 else { return nil }
    var out: [UInt8] = []
    out.reserveCapacity(chars.count * 3 / 4)
    var buffer: UInt32 = 0
    var bits = 0
    for c in chars {
      guard let v = value(c) else { return nil }
      buffer = buffer << 6 | UInt32(v)
      bits += 6
      if bits >= 8 {
        bits -= 8
        out.append(UInt8(truncatingIfNeeded: buffer >> UInt32(bits)))
      }
    }
    // Leftover bits must be zero, so each byte string has exactly one text.
    guard buffer & ((1 << UInt32(bits)) - 1) == 0 else { return nil }
    return out
  }

  static func value(_ c: UInt8) -> UInt8? {
    switch c {
    case UInt8(ascii: "A")...UInt8(ascii: "Z"): c - UInt8(ascii: "A")
    case UInt8(ascii: "a")...UInt8(ascii: "z"): c - UInt8(ascii: "a") + 26
    case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0") + 52
    case UInt8(ascii: "-"): 62
    case UInt8(ascii: "_"): 63
    default: nil
    }
  }
}
