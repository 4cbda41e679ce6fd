import ExtrasBase64

/// Base64url without padding (RFC 4648 §5), as status proofs, API keys and JWT segments use it:
/// swift-extras-base64 (jwt-kit's own encoder) with the options fixed in one place.
///
/// Not Foundation's `base64EncodedString()` and three `replacingOccurrences`: those go through
/// CFString searches, too slow for a seal on every message (docs/benchmarks.md, "Trust boundaries").
package enum Base64URL {
    /// The text of `bytes`, without `=` padding.
    package static func encode(_ bytes: some Collection<UInt8>) -> String {
        Base64.encodeToString(bytes: bytes, options: [.base64UrlAlphabet, .omitPaddingCharacter])
    }

    /// The bytes of base64url `text` (padding optional), or nil when it is not the one text an
    /// encoder writes for them: a character outside the alphabet, an impossible length, or stray
    /// bits in the last character (which the library alone would ignore).
    package static func decode(_ text: some StringProtocol) -> [UInt8]? {
        var unpadded = Substring(text)
        while unpadded.last == "=" { unpadded = unpadded.dropLast() }
        guard
            let bytes = try? Base64.decode(bytes: unpadded.utf8, options: [.base64UrlAlphabet, .omitPaddingCharacter]),
            encode(bytes) == unpadded
        else { return nil }
        return bytes
    }
}
