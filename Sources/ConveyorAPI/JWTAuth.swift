package import ConveyorCore
import ConveyorStore
import Foundation
import JWTKit

/// JWT bearer tokens: HS256 with a shared secret, and RS256/ES256 keys from a JWKS file. The
/// algorithm is pinned per key: the secret verifies HS256 only, each JWKS key only the `alg` it
/// declares (a key without one is refused at start). `iss`, `aud`, `exp` and `nbf` are checked
/// with at most 60 s of leeway. The token names the identity: `sub`, `role`, `namespace`.
package struct JWTSettings: Sendable {
    package var issuer: String
    package var audience: String
    package var leeway: Duration = .seconds(30)
    package var hs256Secret: [UInt8]?
    /// The secret being rotated out: tokens it signed still verify (HS256 only) until it is
    /// removed (docs/security.md, "Rotating credentials").
    package var hs256PreviousSecret: [UInt8]?
    package var jwksJSON: String?

    package init(
        issuer: String, audience: String, leeway: Duration = .seconds(30), hs256Secret: [UInt8]? = nil,
        hs256PreviousSecret: [UInt8]? = nil, jwksJSON: String? = nil
    ) {
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.hs256Secret = hs256Secret
        self.hs256PreviousSecret = hs256PreviousSecret
        self.jwksJSON = jwksJSON
    }
}

struct ConveyorClaims: JWTPayload {
    var iss: IssuerClaim
    var aud: AudienceClaim
    var sub: SubjectClaim
    var exp: ExpirationClaim
    var nbf: NotBeforeClaim?
    var role: String
    var namespace: String

    /// Checked by `JWTVerifier` against its settings, with leeway.
    func verify(using algorithm: some JWTAlgorithm) async throws {}
}

package final class JWTVerifier: Sendable {
    let keys: JWTKeyCollection
    /// The previous HS256 secret, tried when the current one does not verify an HS256 token.
    let previous: JWTKeyCollection?
    let settings: JWTSettings
    /// The algorithm each key verifies, by `kid` ("" for the HS256 secret, used when a token has no kid).
    let pinned: [String: String]

    package static let hmacKid = "conveyor-hs256"

    package init(_ settings: JWTSettings) async throws(ValidationError) {
        guard settings.leeway <= .seconds(60) else {
            throw ValidationError(
                field: "auth.jwt.leeway_seconds", value: "\(settings.leeway)", hint: "at most 60 seconds")
        }
        guard !settings.issuer.isEmpty, !settings.audience.isEmpty else {
            throw ValidationError(
                field: "auth.jwt.issuer / auth.jwt.audience", value: "(missing)",
                hint: "JWT needs the issuer and the audience to expect")
        }
        let keys = JWTKeyCollection()
        var pinned: [String: String] = [:]
        if let secret = settings.hs256Secret {
            guard secret.count >= 32 else {
                throw ValidationError(
                    field: "auth.jwt.hs256_secret", value: "\(secret.count) bytes",
                    hint: "use at least 32 random bytes, e.g. from 'openssl rand -base64 48'")
            }
            await keys.add(
                hmac: HMACKey(from: secret), digestAlgorithm: .sha256, kid: JWKIdentifier(string: Self.hmacKid))
            pinned[""] = "HS256"
            pinned[Self.hmacKid] = "HS256"
        }
        var previous: JWTKeyCollection?
        if let old = settings.hs256PreviousSecret {
            guard settings.hs256Secret != nil, old.count >= 32 else {
                throw ValidationError(
                    field: "auth.jwt.hs256_previous_secret_file", value: "\(old.count) bytes",
                    hint: "the secret being rotated out: at least 32 bytes, and only beside a current hs256 secret")
            }
            let p = JWTKeyCollection()
            await p.add(hmac: HMACKey(from: old), digestAlgorithm: .sha256, kid: JWKIdentifier(string: Self.hmacKid))
            previous = p
        }
        if let jwks = settings.jwksJSON {
            guard let doc = try? JSONDecoder().decode(JSONValue.self, from: Data(jwks.utf8)),
                let list = doc["keys"]?.arrayValue
            else {
                throw ValidationError(
                    field: "auth.jwt.jwks_file", value: "", hint: "not a JWKS document ({\"keys\": [...]})")
            }
            for (i, k) in list.enumerated() {
                guard let kid = k["kid"]?.stringValue, let alg = k["alg"]?.stringValue,
                    ["RS256", "ES256"].contains(alg)
                else {
                    throw ValidationError(
                        field: "auth.jwt.jwks_file: keys[\(i)]", value: k["kid"]?.stringValue ?? "",
                        hint: "each key needs a kid and an alg of RS256 or ES256 (the algorithm is pinned per key)")
                }
                pinned[kid] = alg
            }
            do { try await keys.add(jwksJSON: jwks) } catch {
                throw ValidationError(
                    field: "auth.jwt.jwks_file", value: "", hint: "a key could not be loaded: \(error)")
            }
        }
        guard !pinned.isEmpty else {
            throw ValidationError(
                field: "auth.jwt", value: "(no key)",
                hint: "set auth.jwt.hs256_secret_file (or CONVEYOR_AUTH_JWT_HS256_SECRET) or auth.jwt.jwks_file")
        }
        self.keys = keys
        self.previous = previous
        self.settings = settings
        self.pinned = pinned
    }

    /// The identity a token grants, or why it grants none.
    package func verify(_ token: String) async -> Result<Identity, JWTRefusal> {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let header = Self.decodeSegment(parts[0]), let alg = header["alg"]?.stringValue else {
            return .failure(.malformed)
        }
        let kid = header["kid"]?.stringValue ?? ""
        guard let expected = pinned[kid], expected == alg else { return .failure(.algorithm(alg)) }
        let claims: ConveyorClaims
        do { claims = try await keys.verify(token, as: ConveyorClaims.self) } catch {
            // Rotation: an HS256 token the previous secret signed still verifies until it is removed.
            guard alg == "HS256", let previous,
                let old = try? await previous.verify(token, as: ConveyorClaims.self)
            else { return .failure(.signature) }
            claims = old
        }
        let now = Date()
        let leeway = settings.leeway.inSeconds
        guard claims.iss.value == settings.issuer else { return .failure(.claim("iss")) }
        guard claims.aud.value.contains(settings.audience) else { return .failure(.claim("aud")) }
        guard claims.exp.value.addingTimeInterval(leeway) > now else { return .failure(.expired) }
        if let nbf = claims.nbf, nbf.value.addingTimeInterval(-leeway) > now { return .failure(.claim("nbf")) }
        guard let role = Role(rawValue: claims.role) else { return .failure(.claim("role")) }
        guard claims.namespace != "*" || role == .admin, !claims.namespace.isEmpty else {
            return .failure(.claim("namespace"))
        }
        return .success(Identity(keyPrefix: "jwt:\(claims.sub.value)", role: role, namespace: claims.namespace))
    }

    static func decodeSegment(_ s: Substring) -> JSONValue? {
        guard let bytes = Base64URL.decode(s) else { return nil }
        return try? JSONDecoder().decode(JSONValue.self, from: Data(bytes))
    }
}

/// Why a token was refused.
package enum JWTRefusal: Error, Sendable, CustomStringConvertible {
    case malformed
    case algorithm(String)
    case signature, expired
    case claim(String)

    package var description: String {
        switch self {
        case .malformed: "the bearer token is neither an API key nor a JWT"
        case .algorithm(let a): "the token's algorithm \(a) is not the one pinned for its key"
        case .signature: "the token's signature does not verify"
        case .expired: "the token has expired"
        case .claim(let c): "the token's \(c) claim is not accepted"
        }
    }
}
