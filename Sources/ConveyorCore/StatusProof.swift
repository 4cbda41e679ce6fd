import Crypto
package import Foundation

/// The capability a status must present to change a run (docs/architecture.md, "Status proof").
///
/// The dispatcher signs each attempt it publishes: `proof = HMAC-SHA256(secret,
/// "conveyor.status.v1", run id, attempt)`, the first 16 bytes, base64url (22 characters). The
/// task message carries the proof to the one worker the broker delivers it to. The proof itself
/// never travels back: the worker seals each status it sends, `HMAC-SHA256(key: proof, the exact
/// body bytes)`, in the `conveyor-status-mac` header. The dispatcher derives the proof from its
/// secret and checks the seal. So a status changes a run only when whoever sent it held the
/// attempt's task message, and a seal seen on the status exchange (a `started`) cannot be put on
/// another body (a forged `finished`). Only dispatchers know the secret (`status_keys`, read from
/// PostgreSQL); dead letters, which are task messages, are checked against the proof they carry.
package struct StatusProof: Sendable {
    /// The header a status's seal travels in.
    package static let sealHeader = "conveyor-status-mac"

    /// The HMAC keyed with the secret, before any message: each proof starts from a copy of it,
    /// so the key schedule (two SHA-256 blocks) is paid once per dispatcher, not per run.
    let keyed: HMAC<SHA256>

    package init(secret: [UInt8]) { keyed = HMAC<SHA256>(key: SymmetricKey(data: secret)) }

    /// The proof of attempt `attempt` of run `runID`, as the task message carries it.
    package func sign(runID: UUID, attempt: Int) -> String {
        var message: [UInt8] = []
        message.reserveCapacity(Self.domain.count + 36 + 1 + 20)
        message += Self.domain
        message += runID.lowercasedString.utf8
        message.append(UInt8(ascii: "\n"))
        message += String(attempt).utf8
        var mac = keyed
        mac.update(data: message)
        return Self.text(Array(mac.finalize()))
    }

    /// What each proof's message starts with (the message is `conveyor.status.v1\n<run id>\n<attempt>`).
    static let domain = Array("conveyor.status.v1\n".utf8)

    /// The seal a worker puts on a status body: HMAC-SHA256 keyed by the attempt's proof, over
    /// the body exactly as sent.
    package static func seal(_ body: [UInt8], proof: String) -> String {
        var mac = HMAC<SHA256>(key: SymmetricKey(data: Array(proof.utf8)))
        mac.update(data: body)
        return text(Array(mac.finalize()))
    }

    /// Why a presented proof (a dead-lettered task message's) is refused, or nil when it is the
    /// attempt's.
    package func check(_ presented: String?, runID: UUID, attempt: Int) -> StatusRefusal? {
        guard let presented, !presented.isEmpty else { return .noProof }
        return Self.equal(presented, sign(runID: runID, attempt: attempt)) ? nil : .badProof
    }

    /// Why a status's seal is refused, or nil when it seals this body with the attempt's proof.
    package func check(seal presented: String?, body: [UInt8], runID: UUID, attempt: Int) -> StatusRefusal? {
        guard let presented, !presented.isEmpty else { return .noProof }
        return Self.equal(presented, Self.seal(body, proof: sign(runID: runID, attempt: attempt))) ? nil : .badProof
    }

    /// The first 16 bytes, base64url without padding (22 characters).
    static func text(_ mac: [UInt8]) -> String {
        Base64URL.encode(mac.prefix(16))
    }

    /// Compared in constant time (only the length, which is public, ends it early).
    static func equal(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8)
        let y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var diff: UInt8 = 0
        for (p, q) in zip(x, y) { diff |= p ^ q }
        return diff == 0
    }
}

/// Why a status message was refused: the `reason` label of `conveyor_status_rejected_total`.
package enum StatusRefusal: String, Sendable {
    /// Not a status or heartbeat the dispatcher can read (dead-lettered).
    case malformed
    /// A status without a seal (acked away).
    case noProof = "no_proof"
    /// A seal that is not this body's with this attempt's proof: forged, replayed from another
    /// status or run (acked away).
    case badProof = "bad_proof"
    /// Readable and sealed, but PostgreSQL refused to store a value in it for good (a data
    /// exception or an integrity violation, which retrying cannot change): set aside alone so
    /// that the statuses beside and behind it are recorded; its run is left as it was.
    case refusedByDatabase = "refused_by_database"
}
