package import ConveyorCore
package import ConveyorHTTP
import Foundation
import Synchronization

/// How the API limits and whom it trusts; from `config/api.yaml` (`api.rate_limit.*`,
/// `api.trusted_proxies`, `api.max_page_size`, `api.max_event_streams_per_key`).
package struct APIOptions: Sendable {
    /// A token bucket: `rate` requests per second on average, bursts up to `burst`.
    package struct Limit: Sendable, Equatable {
        package var rate: Double
        package var burst: Double
        package init(rate: Double, burst: Double) {
            self.rate = rate
            self.burst = burst
        }
    }

    /// Per API key or token subject.
    package var perKey = Limit(rate: 50, burst: 100)
    /// Per client address, for requests without valid credentials (slows key guessing).
    package var perAddress = Limit(rate: 5, burst: 20)
    /// Task creations and triggers per key, by the priority of the work submitted: a flood of
    /// background work cannot crowd out critical submissions.
    package var submitByPriority: [Priority: Limit] = [
        .critical: Limit(rate: 100, burst: 200), .high: Limit(rate: 50, burst: 100),
        .normal: Limit(rate: 20, burst: 50),
        .low: Limit(rate: 10, burst: 20), .background: Limit(rate: 5, burst: 10),
    ]
    /// Peers whose `X-Forwarded-For` is believed (load balancers, ingress controllers).
    package var trustedProxies: [Network] = []
    /// Largest page a list returns.
    package var maxPage = 100
    /// `/v1/events` streams one key or token subject may hold open at once
    /// (`api.max_event_streams_per_key`): each holds a connection and polls the database.
    package var maxEventStreamsPerKey = 4
    /// A link to a run's trace in a trace UI, `{trace_id}` replaced (`api.trace_link_template`,
    /// e.g. `http://jaeger:16686/trace/{trace_id}` or a Grafana Tempo explore URL).
    package var traceLinkTemplate: String?

    package init() {}
}

/// Token buckets by key, in memory (each API replica limits on its own: with N replicas a
/// client gets up to N times the rate).
package final class RateLimiter: Sendable {
    struct Bucket {
        var tokens: Double
        var at: ContinuousClock.Instant
    }
    let buckets = Mutex<[String: Bucket]>([:])

    package init() {}

    /// Takes one token from `key`'s bucket: nil when allowed, otherwise how long until a token is there.
    package func take(_ key: String, _ limit: APIOptions.Limit, now: ContinuousClock.Instant = .now) -> Duration? {
        buckets.withLock { b in
            if b.count > 100_000 { Self.evictFull(&b, now: now, limit: limit) }
            var bucket = b[key] ?? Bucket(tokens: limit.burst, at: now)
            bucket.tokens = min(limit.burst, bucket.tokens + (now - bucket.at).inSeconds * limit.rate)
            bucket.at = now
            if bucket.tokens >= 1 {
                bucket.tokens -= 1
                b[key] = bucket
                return nil
            }
            b[key] = bucket
            return .milliseconds(Int64(((1 - bucket.tokens) / limit.rate * 1000).rounded(.up)))
        }
    }

    /// Gives back a token `take` took for a request that turned out to be valid (the lookup of a
    /// key charged to its address before anyone knew).
    package func giveBack(_ key: String, _ limit: APIOptions.Limit) {
        buckets.withLock { b in
            guard var bucket = b[key] else { return }
            bucket.tokens = min(limit.burst, bucket.tokens + 1)
            b[key] = bucket
        }
    }

    /// Forgets buckets that have refilled (they would start full anyway).
    static func evictFull(_ b: inout [String: Bucket], now: ContinuousClock.Instant, limit: APIOptions.Limit) {
        let full = Duration.seconds(limit.burst / max(limit.rate, 0.001))
        b = b.filter { now - $0.value.at < full }
    }
}

/// The address a request came from: the peer, or when the peer is a trusted proxy, the
/// right-most address of `X-Forwarded-For` that is not itself a trusted proxy.
enum ClientAddress {
    static func resolve(peer: String?, forwardedFor: String?, trusted: [Network]) -> String {
        guard let peer else { return "unknown" }
        func isTrusted(_ s: String) -> Bool { IPAddress(s).map { ip in trusted.contains { $0.contains(ip) } } ?? false }
        guard isTrusted(peer), let forwardedFor else { return peer }
        let hops = forwardedFor.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        for hop in hops.reversed() where !isTrusted(hop) {
            return IPAddress(hop).map(\.description) ?? peer
        }
        return hops.first.flatMap { IPAddress($0)?.description } ?? peer
    }
}
