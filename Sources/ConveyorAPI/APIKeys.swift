import ConveyorCore
public import ConveyorStore
import Crypto
import Foundation
import Synchronization

/// API keys look like `cvk_<prefix>_<secret>`: the prefix (12 hex digits) is visible and finds
/// the key; only a SHA-256 hash of the secret is stored. A key is shown once, when created.
public enum APIKeyFormat {
    /// A new key: what to show the user once, and what to store.
    public static func generate() -> (key: String, prefix: String, secretHash: String) {
        var rng = SystemRandomNumberGenerator()
        let prefix = (0..<6).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &rng)) }.joined()
        let secretBytes = (0..<32).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let secret = Data(secretBytes).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
        return ("cvk_\(prefix)_\(secret)", prefix, hash(secret))
    }

    public static func hash(_ secret: String) -> String {
        SHA256.hash(data: Data(secret.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    /// The prefix and secret of a presented key, or nil when it is not shaped like one.
    public static func parse(_ key: String) -> (prefix: String, secret: String)? {
        let parts = key.split(separator: "_", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0] == "cvk", parts[1].count == 12, parts[1].allSatisfy(\.isHexDigit),
              (20...100).contains(parts[2].count) else { return nil }
        return (String(parts[1]), String(parts[2]))
    }

    /// Constant-time comparison of two hex digests.
    static func equal(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var diff: UInt8 = 0
        for i in 0..<x.count { diff |= x[i] ^ y[i] }
        return diff == 0
    }
}

/// Who a request acts as.
public struct Identity: Sendable, Equatable {
    public var keyPrefix: String
    public var role: Role
    /// `*` for every namespace (admin keys only).
    public var namespace: String

    public func sees(namespace ns: String) -> Bool { namespace == "*" || namespace == ns }
}

/// Checks presented keys against the database through a short cache: a revoked or expired key
/// stops working within `ttl` (30 s) on every API process. Uses are counted in memory and
/// written in one statement per `flush`.
public final class KeyAuthenticator: Sendable {
    struct Cached { var record: APIKeyRecord?; var fetched: ContinuousClock.Instant }
    let store: Store
    let ttl: Duration
    let cache = Mutex<[String: Cached]>([:])
    let uses = Mutex<[String: Int]>([:])

    public init(store: Store, ttl: Duration = .seconds(30)) {
        self.store = store
        self.ttl = ttl
    }

    public enum Failure: Error, Sendable { case malformed, unknown, revoked, expired }

    public func authenticate(_ presented: String) async throws -> Result<Identity, Failure> {
        guard let (prefix, secret) = APIKeyFormat.parse(presented) else { return .failure(.malformed) }
        let now = ContinuousClock.now
        var record: APIKeyRecord?
        if let hit = cache.withLock({ $0[prefix] }), now - hit.fetched < ttl {
            record = hit.record
        } else {
            record = try await store.apiKey(prefix: prefix)
            cache.withLock { $0[prefix] = Cached(record: record, fetched: now) }
        }
        guard let record, APIKeyFormat.equal(record.secretHash, APIKeyFormat.hash(secret)) else { return .failure(.unknown) }
        if record.revokedAt != nil { return .failure(.revoked) }
        if let e = record.expiresAt, e <= Date() { return .failure(.expired) }
        uses.withLock { $0[prefix, default: 0] += 1 }
        return .success(Identity(keyPrefix: prefix, role: record.role, namespace: record.namespace))
    }

    /// Writes the uses counted since the last flush (last-used time and counts).
    public func flush() async throws {
        let pending = uses.withLock { u in defer { u = [:] }; return u }
        do { try await store.recordAPIKeyUse(pending) } catch {
            uses.withLock { u in for (k, n) in pending { u[k, default: 0] += n } }
            throw error
        }
    }
}
