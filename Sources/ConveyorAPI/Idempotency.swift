import ConveyorCore
import ConveyorStore
import Crypto
import Foundation
import HTTPTypes
import Hummingbird

extension HTTPField.Name {
    static let idempotencyKey = HTTPField.Name("Idempotency-Key")!
    static let idempotentReplayed = HTTPField.Name("Idempotent-Replayed")!
}

extension APIServer {
    /// An answer a retry with the same `Idempotency-Key` gets again.
    struct Answer {
        var status: HTTPResponse.Status
        var body: JSONValue
        var batchID: String?
    }

    /// `Idempotency-Key` (as Stripe and the IETF draft use it): the first request with a key runs
    /// `operation`, and its answer is kept for 24 hours; a retry with the same key, route and
    /// body gets that answer again (`Idempotent-Replayed: true`) and creates nothing. The same
    /// key with another route or body is refused (422); while the first request is still being
    /// answered, 409 with `Retry-After`. A failed first request gives the key up. Keys belong to
    /// the caller's namespace. Without the header, `operation` simply runs.
    static func idempotent(
        _ request: Request, _ who: Identity, _ env: APIEnvironment, route: String, fingerprint: JSONValue,
        _ operation: () async throws -> Answer
    ) async throws -> Response {
        guard let raw = request.headers[.idempotencyKey] else { return response(try await operation()) }
        // A structured-field string ("…", the IETF draft) or the bare key (Stripe's clients).
        var key = raw
        if key.count >= 2, key.hasPrefix("\""), key.hasSuffix("\"") { key = String(key.dropFirst().dropLast()) }
        guard (1...255).contains(key.utf8.count), key.utf8.allSatisfy({ (0x21...0x7e).contains($0) }) else {
            throw Problem(
                .badRequest, "invalid request",
                "an Idempotency-Key is 1 to 255 visible ASCII characters, for example a UUID the client makes",
                field: "Idempotency-Key", value: String(raw.prefix(300)))
        }
        let hash = SHA256.hash(data: Data(MessageCodec.encode(fingerprint))).map { String(format: "%02x", $0) }
            .joined()
        let store = env.store
        switch try await store.claimIdempotencyKey(namespace: who.namespace, key: key, route: route, hash: hash) {
        case .replay(let status, let body, let batchID):
            let value = (try? JSONDecoder().decode(JSONValue.self, from: Data(body.utf8))) ?? .null
            var r = response(Answer(status: HTTPResponse.Status(code: status), body: value, batchID: batchID))
            r.headers[.idempotentReplayed] = "true"
            return r
        case .mismatch(let first):
            var p = Problem(
                .unprocessableContent, "Idempotency-Key reused",
                first == route
                    ? "this key was first sent with another body; use a new key for a new request"
                    : "this key was first sent to \(first); use a new key for a new request",
                field: "Idempotency-Key", value: key)
            p.type = .idempotencyKeyReused
            throw p
        case .inProgress:
            var p = Problem(
                .conflict, "request in progress",
                "the first request with this Idempotency-Key is still being answered; retry shortly",
                field: "Idempotency-Key", value: key)
            p.retryAfter = 1
            p.type = .requestInProgress
            throw p
        case .fresh:
            let answer: Answer
            do { answer = try await operation() } catch {
                try? await store.releaseIdempotencyKey(namespace: who.namespace, key: key)
                throw error
            }
            try await store.completeIdempotencyKey(
                namespace: who.namespace, key: key, status: Int(answer.status.code),
                body: String(decoding: MessageCodec.encode(answer.body), as: UTF8.self), batchID: answer.batchID)
            return response(answer)
        }
    }

    static func response(_ a: Answer) -> Response {
        var r = json(a.body, status: a.status)
        if let b = a.batchID { r.headers[.batchID] = b }
        return r
    }
}
