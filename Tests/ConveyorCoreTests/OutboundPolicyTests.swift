import ConveyorCore
import ConveyorHTTP
import Logging
import Testing

@Suite("Outbound HTTP guard: address kinds, networks, host allowlist")
struct OutboundPolicyTests {
    @Test(arguments: [
        ("8.8.8.8", AddressKind.public), ("2606:4700::1111", .public),
        ("127.0.0.1", .loopback), ("127.9.9.9", .loopback), ("::1", .loopback), ("::ffff:127.0.0.1", .loopback),
        ("10.1.2.3", .private), ("172.16.0.1", .private), ("172.31.255.255", .private), ("192.168.1.1", .private),
        ("100.64.0.1", .private), ("fd12::1", .private), ("::ffff:10.0.0.1", .private),
        ("169.254.169.254", .metadata), ("fd00:ec2::254", .metadata), ("169.254.1.1", .linkLocal),
        ("fe80::1", .linkLocal),
        ("0.0.0.0", .unspecified), ("::", .unspecified), ("224.0.0.1", .multicast), ("255.255.255.255", .reserved),
    ])
    func kinds(address: String, kind: AddressKind) throws {
        let ip = try #require(IPAddress(address))
        #expect(ip.kind == kind, "\(address)")
    }

    /// IPv6 forms that carry an IPv4 address are the kind of that address: a relay or
    /// translator delivers them there. Before, all but IPv4-mapped were `.public` (NAT64
    /// `.reserved` whatever it carried), so each private case here reached the private address.
    @Test(
        arguments: [
            // IPv4-compatible ::a.b.c.d (::/96); :: and ::1 stay unspecified and loopback.
            ("::127.0.0.1", .loopback), ("::10.0.0.1", .private), ("::169.254.169.254", .metadata),
            ("::8.8.8.8", .public),
            ("::1", .loopback), ("::", .unspecified), ("::2", .unspecified),
            // IPv4-mapped ::ffff:a.b.c.d (unwrapped to IPv4 when parsed).
            ("::ffff:169.254.169.254", .metadata), ("::ffff:8.8.8.8", .public),
            // IPv4-translated (SIIT) ::ffff:0:a.b.c.d.
            ("::ffff:0:127.0.0.1", .loopback), ("::ffff:0:10.1.2.3", .private), ("::ffff:0:8.8.8.8", .public),
            // 6to4 2002:AABB:CCDD::/48 carries A.B.C.D.
            ("2002:7f00:1::", .loopback), ("2002:a00:1::1", .private), ("2002:c0a8:101::", .private),
            ("2002:a9fe:a9fe::", .metadata), ("2002:808:808::1", .public),
            // NAT64, well-known prefix 64:ff9b::/96.
            ("64:ff9b::127.0.0.1", .loopback), ("64:ff9b::10.0.0.1", .private), ("64:ff9b::a9fe:a9fe", .metadata),
            ("64:ff9b::8.8.8.8", .public),
            // Local-use NAT64 64:ff9b:1::/48: the /96 form by what it carries, the rest refused.
            ("64:ff9b:1::192.168.0.1", .private), ("64:ff9b:1::8.8.8.8", .public),
            ("64:ff9b:1:a00:1::8.8.8.8", .reserved),
            // Site-local fec0::/10 (deprecated), next to link-local fe80::/10.
            ("fec0::1", .private), ("feff::1", .private), ("febf::1", .linkLocal),
            // Ordinary global IPv6 carries nothing.
            ("2606:4700::1111", .public), ("2001:4860:4860::8888", .public),
        ] as [(String, AddressKind)])
    func ipv6FormsThatCarryIPv4(address: String, kind: AddressKind) throws {
        let ip = try #require(IPAddress(address))
        #expect(ip.kind == kind, "\(address)")
    }

    @Test func theCarriedIPv4IsExtractedAndNamedInTheRefusal() throws {
        #expect(IPAddress("2002:a00:1::")!.embeddedIPv4 == IPAddress("10.0.0.1"))
        #expect(IPAddress("64:ff9b::a9fe:a9fe")!.embeddedIPv4 == IPAddress("169.254.169.254"))
        #expect(IPAddress("::ffff:0:127.0.0.1")!.embeddedIPv4 == IPAddress("127.0.0.1"))
        #expect(IPAddress("::10.0.0.1")!.embeddedIPv4 == IPAddress("10.0.0.1"))
        #expect(IPAddress("::1")!.embeddedIPv4 == nil, "::1 is loopback, not the IPv4-compatible 0.0.0.1")
        #expect(IPAddress("10.0.0.1")!.embeddedIPv4 == nil)
        #expect(IPAddress("2606:4700::1111")!.embeddedIPv4 == nil)
        let p = OutboundPolicy()
        #expect(p.refusal(of: IPAddress("2002:a00:1::")!) == "2002:a00:1:: is a private address (it carries 10.0.0.1)")
        #expect(p.refusal(of: IPAddress("2002:808:808::1")!) == nil)
    }

    /// Run errors and callback errors are stored: the URL in them keeps no query, fragment or userinfo.
    @Test func urlsInErrorsLoseQueryAndUserinfo() async {
        #expect(strippedURL("https://api.example.com/hook?token=secret") == "https://api.example.com/hook?…")
        #expect(strippedURL("https://user:pw@api.example.com/hook?sig=abc#frag") == "https://api.example.com/hook?…")
        #expect(strippedURL("https://u:p/a?s#s@api.example.com/x?k=v") == "https://api.example.com/x?…")
        #expect(strippedURL("https://api.example.com/p#secret") == "https://api.example.com/p")
        #expect(strippedURL("http://[::1]:8080/x") == "http://[::1]:8080/x")
        #expect(strippedURL("not a url?token=secret") == "not a url?…")
        // The guard's own errors, before any connection.
        let http = OutboundHTTP(policy: OutboundPolicy(), logger: Logger(label: "test"))
        for url in ["ftp://files.example.com/x?token=secret", "/relative?token=secret"] {
            do throws(OutboundError) {
                _ = try await http.send(OutboundRequest(url: url), timeout: .seconds(1))
                Issue.record("\(url) was sent")
            } catch {
                #expect(!error.message.contains("secret") && error.message.contains("?…"), "\(error.message)")
            }
        }
    }

    @Test func edgesOfRanges() throws {
        #expect(IPAddress("172.15.255.255")!.kind == .public)
        #expect(IPAddress("172.32.0.0")!.kind == .public)
        #expect(IPAddress("100.128.0.0")!.kind == .public)
        #expect(IPAddress("not-an-ip") == nil)
        #expect(IPAddress("[::1]")!.kind == .loopback)
    }

    @Test func allowedNetworksOpenOnlyWhatTheyCover() throws {
        var p = OutboundPolicy()
        #expect(p.refusal(of: IPAddress("10.20.1.1")!) == "10.20.1.1 is a private address")
        #expect(p.refusal(of: IPAddress("1.1.1.1")!) == nil)
        p.allowedNetworks = [try Network(parsing: "10.20.0.0/16")]
        #expect(p.refusal(of: IPAddress("10.20.1.1")!) == nil)
        #expect(p.refusal(of: IPAddress("10.21.1.1")!) != nil)
        #expect(p.refusal(of: IPAddress("169.254.169.254")!) != nil)
        #expect(throws: ValidationError.self) { try Network(parsing: "10.0.0.0/33") }
        #expect(throws: ValidationError.self) { try Network(parsing: "example.com/8") }
        #expect(try Network(parsing: "fd00::/8").contains(IPAddress("fd12::1")!))
        #expect(!(try Network(parsing: "fd00::/8").contains(IPAddress("10.0.0.1")!)))
    }

    @Test func hostAllowlist() {
        var p = OutboundPolicy()
        #expect(p.allows(host: "anything.example"))
        p.allowedHosts = ["api.example.com", "*.hooks.example.org"]
        #expect(p.allows(host: "API.example.com"))
        #expect(p.allows(host: "a.hooks.example.org"))
        #expect(!p.allows(host: "hooks.example.org"))
        #expect(!p.allows(host: "evilhooks.example.org"))
        #expect(!p.allows(host: "api.example.com.evil.net"))
    }
}
