import ConveyorCore
import Crypto
public import Foundation
import Synchronization

/// The capability a status must present to change a run (docs/architecture.md, "Status proof").
///
/// The dispatcher signs each attempt it publishes: `HMAC-SHA256(secret, "conveyor.status.v1",
/// run id, attempt)`, the first 16 bytes, base64url (22 characters). The task message carries it
/// to the one worker the broker delivers it to, which returns it on every `started` and
/// `finished` status. Only the dispatchers know the secret (`status_keys`, read from PostgreSQL at
/// start), so nobody else who can publish to the status exchange can forge a status for a run,
/// replay another run's proof, or end a run by a dead letter naming it.
public struct StatusProof: Sendable {
    let key: SymmetricKey

    public init(secret: [UInt8]) { key = SymmetricKey(data: secret) }

    public func sign(runID: UUID, attempt: Int) -> String {
        var mac = HMAC<SHA256>(key: key)
        mac.update(data: Array("conveyor.status.v1\n\(runID.lowercasedString)\n\(attempt)".utf8))
        return Data(Array(mac.finalize()).prefix(16)).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }

    /// Why a presented proof is refused, or nil when it is the attempt's. Compared in constant time.
    public func check(_ presented: String?, runID: UUID, attempt: Int) -> StatusRefusal? {
        guard let presented, !presented.isEmpty else { return .noProof }
        let expected = Array(sign(runID: runID, attempt: attempt).utf8), given = Array(presented.utf8)
        guard given.count == expected.count else { return .badProof }
        var diff: UInt8 = 0
        for (a, b) in zip(expected, given) { diff |= a ^ b }
        return diff == 0 ? nil : .badProof
    }
}

/// Why a status message was refused: the `reason` label of `conveyor_status_rejected_total`.
public enum StatusRefusal: String, Sendable {
    /// Not a status or heartbeat the dispatcher can read (dead-lettered).
    case malformed
    /// A status without a proof (acked away).
    case noProof = "no_proof"
    /// A proof that is not this attempt's: forged, or replayed from another run (acked away).
    case badProof = "bad_proof"
}

/// Refused statuses are logged at most once per source (the `worker_id` they claim) per minute,
/// so a flood of forgeries costs a counter increment each, not a log line each. At most 1,024
/// sources are remembered; past that (a flood with random ids), new sources are not logged until
/// old entries age out. The counter counts every one.
final class RefusalLog: Sendable {
    let last = Mutex<[String: ContinuousClock.Instant]>([:])
    static let every: Duration = .seconds(60)
    static let sources = 1024

    func shouldLog(_ source: String, now: ContinuousClock.Instant = .now) -> Bool {
        last.withLock { seen in
            if let t = seen[source], now - t < Self.every { return false }
            if seen.count >= Self.sources {
                seen = seen.filter { now - $0.value < Self.every }
                if seen.count >= Self.sources { return false }
            }
            seen[source] = now
            return true
        }
    }
}
