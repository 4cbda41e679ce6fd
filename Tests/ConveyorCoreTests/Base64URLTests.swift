import ConveyorCore
import Crypto
import Foundation
import Testing

@Suite struct Base64URLTests {
    /// Foundation's base64 with the URL alphabet and no padding: what status proofs and API keys
    /// were before `Base64URL`, so a dispatcher and a worker of either version agree on a proof.
    static func reference(_ bytes: [UInt8]) -> String {
        Data(bytes).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    @Test func encodesAsFoundationDoesAndRoundTrips() {
        var rng = SystemRandomNumberGenerator()
        for length in 0...70 {
            for _ in 0..<20 {
                let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
                let text = Base64URL.encode(bytes)
                #expect(text == Self.reference(bytes), "\(bytes)")
                #expect(Base64URL.decode(text) == bytes, "\(text)")
            }
        }
        // Every character of the alphabet, both URL-safe ones included.
        #expect(Base64URL.encode([0xfb, 0xff, 0xbf]) == "-_-_")
        #expect(Base64URL.decode("-_-_") == [0xfb, 0xff, 0xbf])
    }

    @Test func paddingIsOptionalWhenDecoding() {
        #expect(Base64URL.decode("YQ==") == Array("a".utf8))
        #expect(Base64URL.decode("YQ") == Array("a".utf8))
        #expect(Base64URL.decode("") == [])
    }

    @Test(arguments: ["a", "ab+c", "ab/c", "ab c", "YR", "YWJ", "é"])
    func refusesWhatNoEncoderWrites(_ text: String) {
        // A lone character, the standard alphabet's + and /, a space, stray low bits.
        #expect(Base64URL.decode(text) == nil, "\(text)")
    }

    @Test func statusProofsKeepTheirForm() {
        let proof = StatusProof(secret: Array(repeating: 7, count: 32))
        let id = UUID(uuidString: "6F0E1C2A-3B4D-4E5F-8A9B-0C1D2E3F4A5B")!
        let text = proof.sign(runID: id, attempt: 3)
        // The definition, computed from scratch: dispatchers of any version derive the same proof.
        let mac = HMAC<SHA256>.authenticationCode(
            for: Array("conveyor.status.v1\n\(id.lowercasedString)\n3".utf8),
            using: SymmetricKey(data: Array(repeating: UInt8(7), count: 32)))
        #expect(text == Self.reference(Array(Array(mac).prefix(16))))
        // Each proof starts from a copy of the keyed HMAC: signing others leaves it untouched.
        _ = proof.sign(runID: UUID(), attempt: 1)
        #expect(proof.sign(runID: id, attempt: 3) == text)
        #expect(text.utf8.count == 22)
        #expect(Base64URL.decode(text)?.count == 16)
        #expect(proof.check(text, runID: id, attempt: 3) == nil)
        #expect(proof.check(text, runID: id, attempt: 4) == .badProof)
        let body = Array("{\"event\":\"finished\"}".utf8)
        let seal = StatusProof.seal(body, proof: text)
        #expect(proof.check(seal: seal, body: body, runID: id, attempt: 3) == nil)
        #expect(proof.check(seal: seal, body: body + [32], runID: id, attempt: 3) == .badProof)
    }
}
