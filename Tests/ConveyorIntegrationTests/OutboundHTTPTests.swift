import ConveyorCore
import ConveyorHTTP
import Foundation
import Testing

/// The outbound guard against a real HTTP server: redirects are checked hop by hop.
@Suite("Outbound HTTP guard (real HTTP server)")
struct OutboundHTTPTests {
    static func loopbackPolicy() -> OutboundPolicy {
        var p = OutboundPolicy()
        p.allowedNetworks = [try! Network(parsing: "127.0.0.1")]
        return p
    }

    @Test func redirectsAreFollowedAndEachHopIsChecked() async throws {
        let receiver = try await HTTPReceiver { request, _ in
            switch request.path {
            case "/to-b": .init(status: 302, headers: [("Location", "/b")])
            case "/to-metadata": .init(status: 307, headers: [("Location", "http://169.254.169.254/latest/meta-data")])
            default: .init(status: 200)
            }
        }
        defer { Task { await receiver.close() } }
        let http = OutboundHTTP(policy: Self.loopbackPolicy(), logger: Servers.logger)
        let ok = try await http.send(OutboundRequest(method: "POST", url: receiver.url + "/to-b", body: Array("x".utf8)), timeout: .seconds(5))
        #expect(ok.status == 200 && ok.url == receiver.url + "/b")
        #expect(receiver.received(path: "/b").first?.method == "GET", "a 302 after a POST continues as a GET")
        #expect(String(decoding: ok.body, as: UTF8.self) == "ok")

        await #expect { _ = try await http.send(OutboundRequest(url: receiver.url + "/to-metadata"), timeout: .seconds(5)) } throws: { e in
            (e as? OutboundError)?.kind == .refused && "\(e)".contains("169.254.169.254 is a metadata address")
        }
        // The default policy allows no private network: the same server is refused outright.
        await #expect { _ = try await OutboundHTTP(policy: OutboundPolicy(), logger: Servers.logger).send(OutboundRequest(url: receiver.url + "/b"), timeout: .seconds(5)) } throws: { e in
            (e as? OutboundError)?.kind == .refused
        }
        #expect(receiver.received(path: "/b").count == 1, "nothing reached the server past a refusal")
    }

    @Test func hostsAndSchemesOutsideThePolicyAreRefusedBeforeAnyConnection() async throws {
        var p = Self.loopbackPolicy()
        p.allowedHosts = ["hooks.example.com"]
        let http = OutboundHTTP(policy: p, logger: Servers.logger)
        await #expect { _ = try await http.send(OutboundRequest(url: "http://127.0.0.1:9/x"), timeout: .seconds(5)) } throws: { e in
            "\(e)".contains("host '127.0.0.1' is not in the allowed hosts")
        }
        await #expect { _ = try await http.send(OutboundRequest(url: "file:///etc/passwd"), timeout: .seconds(5)) } throws: { e in
            (e as? OutboundError)?.kind == .invalidURL || "\(e)".contains("scheme 'file'")
        }
        // A closed port is a connect failure (retried by the client until the deadline): retryable, unlike a refusal.
        let open = OutboundHTTP(policy: Self.loopbackPolicy(), logger: Servers.logger)
        await #expect { _ = try await open.send(OutboundRequest(url: "http://127.0.0.1:9/x"), timeout: .milliseconds(500)) } throws: { e in
            (e as? OutboundError)?.retryable == true
        }
    }
}
