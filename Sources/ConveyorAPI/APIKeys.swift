import ConveyorCore
package import ConveyorStore
import Crypto
import Foundation
import Synchronization

/// API keys look like `cvk_<prefix>_<secret>`: the prefix (12 hex digits) is visible and finds
/// the key; only a SHA-256 hash of the secret is stored. A key is shown once, when created.
package enum APIKeyFormat {
    /// A new key: what to show the user once, and what to store.
    package static func generate() -> (key: String, prefix: String, secretHash: String) {
        var rng = SystemRandomNumberGenerator()
        let prefix = (0..<6).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &rng)) }.joined()
        let secretBytes = (0..<32).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let secret = Base64URL.encode(secretBytes)
        return ("cvk_\(prefix)_\(secret)", prefix, hash(secret))
    }

    package static func hash(_ secret: String) -> String {
        SHA256.hash(data: Data(secret.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    /// The prefix and secret of a presented key, or nil when it is not shaped like one.
    package static func parse(_ key: String) -> (prefix: String, secret: String)? {
        let parts = key.split(separator: "_", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0] == "cvk", parts[1].count == 12, parts[1].allSatisfy(\.isHexDigit),
            (20...100).contains(parts[2].count)
        else { return nil }
        return (String(parts[1]), String(parts[2]))
    }

    /// Constant-time comparison of two hex digests.
    static func equal(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8)
        let y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var diff: UInt8 = 0
        for i in 0..<x.count { diff |= x[i] ^ y[i] }
        return diff == 0
    }
}

/// Who a request acts as.
package struct Identity: Sendable, Equatable {
    package var keyPrefix: String
    package var role: Role
    /// `*` for every namespace (admin and viewer keys only).
    package var namespace: String

    package func sees(namespace ns: String) -> Bool { namespace == "*" || namespace == ns }
}

/// Checks presented keys against the database through a short cache: a revoked or expired key
/// stops working within `ttl` (30 s) on every API process. Uses are counted in memory and
/// written in one statement per `flush`.
///
/// Prefixes that name no key are remembered too (so repeating one costs no query), but anyone can
/// make them up: that cache holds at most `maxMisses` (the oldest leave first) and each entry for
/// `ttl`, so a key created after a miss works within that time.
package final class KeyAuthenticator: Sendable {
    struct Cached {
        var record: APIKeyRecord
        var fetched: ContinuousClock.Instant
    }
    let store: Store
    let ttl: Duration
    /// Keys found, by prefix: no more than the database holds (admins make them).
    let cache = Mutex<[String: Cached]>([:])
    let misses: Mutex<MissCache>
    let uses = Mutex<[String: Int]>([:])
    /// Database lookups made, for tests: a flood of made-up keys must not raise it much.
    let lookups = Mutex(0)

    let clock: APIClock

    package init(store: Store, ttl: Duration = .seconds(30), maxMisses: Int = 10_000, clock: APIClock = .continuous) {
        self.store = store
        self.ttl = ttl
        self.clock = clock
        self.misses = Mutex(MissCache(capacity: maxMisses))
    }

    /// `throttled`: a lookup was needed and `beforeLookup` refused it (how long to wait).
    package enum Failure: Error, Sendable {
        case malformed, unknown, revoked, expired
        case throttled(Duration)
    }

    /// The identity of a presented key, or why there is none. `beforeLookup` is asked before a
    /// database lookup of a prefix this process has not found as a key (new, or a miss whose
    /// time ran out): nil lets it go ahead, a duration refuses it with `.throttled`. Keys found
    /// before are looked up again when their time runs out without asking: they are as many as
    /// the database holds, whereas unknown prefixes are free to make up.
    package func authenticate(_ presented: String, beforeLookup: () -> Duration? = { nil }) async throws -> Result<
        Identity, Failure
    > {
        guard let (prefix, secret) = APIKeyFormat.parse(presented) else { return .failure(.malformed) }
        let now = clock.now()
        let known = cache.withLock { $0[prefix] }
        var record: APIKeyRecord?
        if let known, now - known.fetched < ttl {
            record = known.record
        } else if misses.withLock({ $0.contains(prefix, now: now, ttl: ttl) }) {
            record = nil
        } else {
            if known == nil, let wait = beforeLookup() { return .failure(.throttled(wait)) }
            lookups.withLock { $0 += 1 }
            record = try await store.apiKey(prefix: prefix)
            if let record {
                cache.withLock { $0[prefix] = Cached(record: record, fetched: now) }
            } else {
                cache.withLock { $0[prefix] = nil }
                misses.withLock { $0.insert(prefix, now: now, ttl: ttl) }
            }
        }
        guard let record, APIKeyFormat.equal(record.secretHash, APIKeyFormat.hash(secret)) else {
            return .failure(.unknown)
        }
        if record.revokedAt != nil { return .failure(.revoked) }
        if let e = record.expiresAt, e <= Date() { return .failure(.expired) }
        // The table's CHECK allows only the four roles; a row that names another gets nothing.
        guard let role = Role(rawValue: record.role) else { return .failure(.unknown) }
        uses.withLock { $0[prefix, default: 0] += 1 }
        return .success(Identity(keyPrefix: prefix, role: role, namespace: record.namespace))
    }

    /// Database lookups so far (tests).
    var lookupCount: Int { lookups.withLock { $0 } }
    /// Prefixes remembered as naming no key (tests).
    var missCount: Int { misses.withLock { $0.count } }

    /// Writes the uses counted since the last flush (last-used time and counts).
    package func flush() async throws {
        let pending = uses.withLock { u in
            defer { u = [:] }
            return u
        }
        do { try await store.recordAPIKeyUse(pending) } catch {
            uses.withLock { u in for (k, n) in pending { u[k, default: 0] += n } }
            throw error
        }
    }
}

/// Prefixes looked up and not found, with when. Entries are kept in insertion order, which with
/// one time to live is also their expiry order: expired ones leave from the front, and when the
/// cache is full the oldest leave to make room. Each prefix in `found` is in `order[head...]`
/// exactly once.
struct MissCache {
    let capacity: Int
    private var found: [String: ContinuousClock.Instant] = [:]
    private var order: [String] = []
    private var head = 0

    init(capacity: Int) { self.capacity = capacity }

    var count: Int { found.count }

    /// Whether `prefix` was found missing less than `ttl` ago.
    func contains(_ prefix: String, now: ContinuousClock.Instant, ttl: Duration) -> Bool {
        found[prefix].map { now - $0 < ttl } ?? false
    }

    mutating func insert(_ prefix: String, now: ContinuousClock.Instant, ttl: Duration) {
        while head < order.count, found[order[head]].map({ now - $0 >= ttl }) ?? true { dropOldest() }
        if found.updateValue(now, forKey: prefix) == nil { order.append(prefix) }
        while found.count > capacity, head < order.count { dropOldest() }
        // The array's dropped front is reclaimed once it is most of it (amortized O(1)).
        if head > 1024 && head * 2 > order.count {
            order.removeFirst(head)
            head = 0
        }
    }

    private mutating func dropOldest() {
        found[order[head]] = nil
        head += 1
    }
}
