import ConveyorCore
import ConveyorHTTP
import Testing

@Suite("Outbound HTTP guard: address kinds, networks, host allowlist")
struct OutboundPolicyTests {
    @Test(arguments: [
        ("8.8.8.8", AddressKind.public), ("2606:4700::1111", .public),
        ("127.0.0.1", .loopback), ("127.9.9.9", .loopback), ("::1", .loopback), ("::ffff:127.0.0.1", .loopback),
        ("10.1.2.3", .private), ("172.16.0.1", .private), ("172.31.255.255", .private), ("192.168.1.1", .private),
        ("100.64.0.1", .private), ("fd12::1", .private), ("::ffff:10.0.0.1", .private),
        ("169.254.169.254", .metadata), ("fd00:ec2::254", .metadata), ("169.254.1.1", .linkLocal), ("fe80::1", .linkLocal),
        ("0.0.0.0", .unspecified), ("::", .unspecified), ("224.0.0.1", .multicast), ("255.255.255.255", .reserved),
    ])
    func kinds(address: String, kind: AddressKind) throws {
        let ip = try #require(IPAddress(address))
        #expect(ip.kind == kind, "\(address)")
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
