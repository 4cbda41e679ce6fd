import Foundation

/// Exponential backoff with full jitter: the one retry delay used everywhere (database connects,
/// broker reconnects, status retries).
public enum Backoff {
    /// A random delay in `0 ... min(cap, base × 2^(attempt−1))`.
    public static func delay(attempt: Int, base: Duration, cap: Duration) -> Duration {
        let exp = min(max(attempt - 1, 0), 20)
        let ceiling = min(cap, base * (1 << exp))
        return .milliseconds(Int64(Double.random(in: 0...max(ceiling.inMilliseconds, 1))))
    }
}

extension Duration {
    /// The duration in seconds, as a `Double`.
    public var inSeconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
    /// The duration in whole milliseconds.
    public var inMilliseconds: Double { inSeconds * 1000 }
    /// The duration in nanoseconds (what swift-metrics timers record).
    public var inNanoseconds: Int64 { components.seconds * 1_000_000_000 + components.attoseconds / 1_000_000_000 }
}

/// Replaces every password in `text` with `***`: the password of each URL
/// (`scheme://user:password@host…`, wherever it stands in the text) and of libpq key=value
/// strings (`password=…`). For logs and error messages; text without one is returned as is.
public func redactPassword(in text: String) -> String {
    var out = text
    if out.contains("://"), out.contains("@") {
        var masked = ""
        var rest = Substring(out)
        while let scheme = rest.range(of: "://") {
            masked += rest[..<scheme.upperBound]
            rest = rest[scheme.upperBound...]
            // The authority ends at the first '/', '?', '#', quote or whitespace.
            let end = rest.firstIndex { "/?# \n\t\"'".contains($0) } ?? rest.endIndex
            let authority = rest[..<end]
            if let at = authority.lastIndex(of: "@"), let colon = authority[..<at].firstIndex(of: ":") {
                masked += authority[..<colon] + ":***" + authority[at...]
            } else {
                masked += authority
            }
            rest = rest[end...]
        }
        out = masked + rest
    }
    if out.range(of: "password=", options: .caseInsensitive) != nil {
        // Rare (libpq key=value strings), so the pattern is built only when needed; a quoted value may hold spaces.
        if let pattern = try? Regex(#"(?i)\bpassword=('(?:[^'\\]|\\.)*'|\S+)"#) {
            out = out.replacing(pattern) { _ in "password=***" }
        }
    }
    return out
}
