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
}

/// Replaces the password of a URL (`scheme://user:password@host…`) or of a libpq key=value
/// string (`password=…`) with `***`, for logs and error messages.
public func redactPassword(in url: String) -> String {
    if let scheme = url.range(of: "://") {
        guard let at = url[scheme.upperBound...].firstIndex(of: "@") else { return url }
        let userinfo = url[scheme.upperBound..<at]
        guard let colon = userinfo.firstIndex(of: ":") else { return url }
        return String(url[..<url.index(after: colon)]) + "***" + String(url[at...])
    }
    return url.split(separator: " ", omittingEmptySubsequences: true)
        .map { $0.lowercased().hasPrefix("password=") ? "password=***" : String($0) }
        .joined(separator: " ")
}
