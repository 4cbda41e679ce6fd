import Foundation

/// Exponential backoff with full jitter: the one retry delay used everywhere (database connects,
/// broker reconnects, status retries).
package enum Backoff {
    /// A random delay in `0 ... min(cap, base × 2^(attempt−1))`.
    package static func delay(attempt: Int, base: Duration, cap: Duration) -> Duration {
        let exp = min(max(attempt - 1, 0), 20)
        let ceiling = min(cap, base * (1 << exp))
        return .milliseconds(Int64(Double.random(in: 0...max(ceiling.inMilliseconds, 1))))
    }
}

extension Duration {
    /// The duration in seconds, as a `Double`.
    package var inSeconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
    /// The duration in whole milliseconds.
    package var inMilliseconds: Double { inSeconds * 1000 }
    /// The duration in nanoseconds (what swift-metrics timers record).
    package var inNanoseconds: Int64 { components.seconds * 1_000_000_000 + components.attoseconds / 1_000_000_000 }
}

/// Replaces every password in `text` with `***`: the password of each URL
/// (`scheme://user:password@host…`, wherever it stands in the text) and of libpq key=value
/// strings (`password=…`). For logs and error messages; text without one is returned as is.
///
/// People write passwords into URLs unencoded, `/`, `?`, `#` and `@` included
/// (`amqp://user:pa/ss?w#rd@host:5672/%2F`), so the userinfo is not taken to end where RFC 3986
/// ends the authority (the first `/`, `?` or `#`) but at the last `@` of the URL, which runs to
/// whitespace, a quote or the next `scheme://`. It is a userinfo only if the user part before
/// its first `:` holds no `/`, `?` or `#` (else the `@` is in a path or query: `http://h/p?a=b:c@d`),
/// and the password is not a port followed by a path (`http://host:8080/x@y`). A password that is
/// digits followed by `/`, `?` or `#` therefore stays visible, and a URL with both a password and
/// an `@` in its path or query has its host masked too: masking too much is the safe side.
package func redactPassword(in text: String) -> String {
    var out = text
    if out.contains("://"), out.contains("@") {
        var masked = ""
        var rest = Substring(out)
        while let scheme = rest.range(of: "://") {
            masked += rest[..<scheme.upperBound]
            rest = rest[scheme.upperBound...]
            var end = rest.firstIndex { " \n\t\"'".contains($0) } ?? rest.endIndex
            if let next = rest[..<end].range(of: "://") { end = next.lowerBound }
            let url = rest[..<end]
            guard let at = url.lastIndex(of: "@"), let colon = url[..<at].firstIndex(of: ":"),
                !url[..<colon].contains(where: { "/?#".contains($0) })
            else { continue }
            let password = url[url.index(after: colon)..<at]
            let digits = password.prefix { $0.isASCII && $0.isNumber }
            if !digits.isEmpty, digits.endIndex < password.endIndex, "/?#".contains(password[digits.endIndex]) {
                continue
            }
            masked += url[..<colon] + ":***"
            rest = rest[at...]
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
