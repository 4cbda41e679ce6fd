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
        let ok = try await http.send(
            OutboundRequest(method: "POST", url: receiver.url + "/to-b", body: Array("x".utf8)), timeout: .seconds(5))
        #expect(ok.status == 200 && ok.url == receiver.url + "/b")
        #expect(receiver.received(path: "/b").first?.method == "GET", "a 302 after a POST continues as a GET")
        #expect(String(decoding: ok.body, as: UTF8.self) == "ok")

        await #expect {
            _ = try await http.send(OutboundRequest(url: receiver.url + "/to-metadata"), timeout: .seconds(5))
        } throws: { e in
            (e as? OutboundError)?.kind == .refused && "\(e)".contains("169.254.169.254 is a metadata address")
        }
        // The default policy allows no private network: the same server is refused outright.
        await #expect {
            _ = try await OutboundHTTP(policy: OutboundPolicy(), logger: Servers.logger).send(
                OutboundRequest(url: receiver.url + "/b"), timeout: .seconds(5))
        } throws: { e in
            (e as? OutboundError)?.kind == .refused
        }
        #expect(receiver.received(path: "/b").count == 1, "nothing reached the server past a refusal")
    }

    /// Credentials and bodies stay with the origin they were given to (issue 19, part 5). A
    /// redirect to another origin (here the same address, another port) drops `Authorization`,
    /// `Cookie`, `Proxy-Authorization` and the request's own headers, and never replays a body
    /// there (a 307 with one is refused); a same-origin redirect keeps everything. Before, the
    /// other receiver got every header, and the 307 POST with its body.
    @Test func credentialsAndBodiesStayWithTheirOrigin() async throws {
        let other = try await HTTPReceiver()
        defer { Task { await other.close() } }
        let origin = try await HTTPReceiver { request, _ in
            switch request.path {
            case "/away-302": .init(status: 302, headers: [("Location", other.url + "/landed-302")])
            case "/away-307": .init(status: 307, headers: [("Location", other.url + "/landed-307")])
            case "/home-302": .init(status: 302, headers: [("Location", "/landed-home-302")])
            case "/home-307": .init(status: 307, headers: [("Location", "/landed-home-307")])
            default: .init(status: 200)
            }
        }
        defer { Task { await origin.close() } }
        let http = OutboundHTTP(policy: Self.loopbackPolicy(), logger: Servers.logger)
        let headers: [(String, String)] = [
            ("Authorization", "Bearer s3cret"), ("Cookie", "session=s3cret"), ("Proxy-Authorization", "Basic s3cret"),
            ("X-Api-Key", "s3cret"), ("X-Plain", "kept"), ("Content-Type", "text/plain"),
        ]
        // X-Api-Key stands for a task's own header (the http executor marks all of them).
        func post(_ path: String) -> OutboundRequest {
            OutboundRequest(
                method: "POST", url: origin.url + path, headers: headers, body: Array("payload".utf8),
                originOnlyHeaders: ["X-Api-Key"])
        }
        let dropped = ["authorization", "cookie", "proxy-authorization", "x-api-key"]

        // 302 after a POST: a GET without the body (as before), and now without the credentials.
        let moved = try await http.send(post("/away-302"), timeout: .seconds(5))
        #expect(moved.status == 200 && moved.url == other.url + "/landed-302")
        let landed = try #require(other.received(path: "/landed-302").first)
        #expect(landed.method == "GET" && landed.body.isEmpty)
        for name in dropped {
            #expect(landed.headers[name] == nil, "\(name) reached another origin: \(landed.headers)")
        }
        #expect(landed.headers["x-plain"] == "kept", "only credentials and the request's own headers are dropped")

        // 307 keeps method and body: to another origin that is refused, and nothing is sent there.
        let away307 = post("/away-307")
        await #expect { _ = try await http.send(away307, timeout: .seconds(5)) } throws: { e in
            let text = "\(e)"
            return (e as? OutboundError)?.kind == .refused && text.contains("another origin")
                && !text.contains("s3cret")
        }
        #expect(other.received(path: "/landed-307").isEmpty, "a body was replayed to another origin")
        // A 307 without a body is followed, without the credentials.
        var get = away307
        get.method = "GET"
        get.body = []
        let followed = try await http.send(get, timeout: .seconds(5))
        #expect(followed.status == 200)
        let bodiless = try #require(other.received(path: "/landed-307").first)
        #expect(bodiless.method == "GET")
        for name in dropped {
            #expect(bodiless.headers[name] == nil, "\(name) reached another origin: \(bodiless.headers)")
        }

        // Same origin: a 307 keeps method, body and headers; a 302 keeps the headers.
        let kept = try await http.send(post("/home-307"), timeout: .seconds(5))
        #expect(kept.status == 200)
        let home = try #require(origin.received(path: "/landed-home-307").first)
        #expect(home.method == "POST" && home.body == "payload")
        let kept302 = try await http.send(post("/home-302"), timeout: .seconds(5))
        #expect(kept302.status == 200)
        let home302 = try #require(origin.received(path: "/landed-home-302").first)
        for request in [home, home302] {
            for name in ["authorization", "cookie", "x-api-key"] {
                #expect(request.headers[name]?.contains("s3cret") == true, "\(name) was dropped on the same origin")
            }
        }
    }

    @Test func hostsAndSchemesOutsideThePolicyAreRefusedBeforeAnyConnection() async throws {
        var p = Self.loopbackPolicy()
        p.allowedHosts = ["hooks.example.com"]
        let http = OutboundHTTP(policy: p, logger: Servers.logger)
        await #expect {
            _ = try await http.send(OutboundRequest(url: "http://127.0.0.1:9/x"), timeout: .seconds(5))
        } throws: { e in
            "\(e)".contains("host '127.0.0.1' is not in the allowed hosts")
        }
        await #expect {
            _ = try await http.send(OutboundRequest(url: "file:///etc/passwd"), timeout: .seconds(5))
        } throws: { e in
            (e as? OutboundError)?.kind == .invalidURL || "\(e)".contains("scheme 'file'")
        }
        // A closed port is a connect failure (retried by the client until the deadline): retryable, unlike a refusal.
        let open = OutboundHTTP(policy: Self.loopbackPolicy(), logger: Servers.logger)
        await #expect {
            _ = try await open.send(OutboundRequest(url: "http://127.0.0.1:9/x"), timeout: .milliseconds(500))
        } throws: { e in
            (e as? OutboundError)?.retryable == true
        }
    }
}
