package import ConveyorCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// An IPv4 or IPv6 address as its bytes (4 or 16). IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`)
/// are unwrapped to IPv4, so a check on `127.0.0.1` also catches `::ffff:127.0.0.1`; the other
/// IPv6 forms that carry an IPv4 address keep their bytes and are classified by it (`kind`).
package struct IPAddress: Sendable, Hashable, CustomStringConvertible {
    package let bytes: [UInt8]

    package init?(_ text: String) {
        var t = text
        if t.hasPrefix("[") && t.hasSuffix("]") { t = String(t.dropFirst().dropLast()) }
        var v4 = in_addr()
        var v6 = in6_addr()
        if inet_pton(AF_INET, t, &v4) == 1 {
            self.init(bytes: withUnsafeBytes(of: &v4) { Array($0) })
        } else if inet_pton(AF_INET6, t, &v6) == 1 {
            self.init(bytes: withUnsafeBytes(of: &v6) { Array($0) })
        } else {
            return nil
        }
    }

    /// From 4 or 16 bytes in network order; an IPv4-mapped IPv6 address becomes its IPv4 address.
    init(bytes b: [UInt8]) {
        let mapped = b.count == 16 && b[0..<10].allSatisfy { $0 == 0 } && b[10] == 0xff && b[11] == 0xff
        bytes = mapped ? Array(b[12...]) : b
    }

    package var isV4: Bool { bytes.count == 4 }

    package var description: String {
        var out = [CChar](repeating: 0, count: 64)
        let family = isV4 ? AF_INET : AF_INET6
        _ = bytes.withUnsafeBytes { inet_ntop(family, $0.baseAddress, &out, socklen_t(out.count)) }
        return String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// What kind of network the address belongs to; `.public` for everything not listed. An IPv6
    /// address that carries an IPv4 address (IPv4-compatible, SIIT, 6to4, NAT64) is the kind of
    /// the IPv4 address it carries: a relay or translator on the way delivers it there, so
    /// `2002:a00:1::` is as private as `10.0.0.1`, and `64:ff9b::8.8.8.8` as package as `8.8.8.8`.
    package var kind: AddressKind {
        switch Self.entry(for: self) {
        case .kind(let k)?: k
        case .ipv4(let at)?: IPAddress(bytes: Array(bytes[at..<at + 4])).kind
        case nil: .public
        }
    }

    /// The IPv4 address an IPv6 address carries in one of the formats of `table`, or nil (for an
    /// IPv4 address too).
    package var embeddedIPv4: IPAddress? {
        guard bytes.count == 16, case .ipv4(let at)? = Self.entry(for: self) else { return nil }
        return IPAddress(bytes: Array(bytes[at..<at + 4]))
    }

    /// What an entry of `table` says about the addresses it covers.
    enum Meaning: Sendable {
        /// They are of this kind.
        case kind(AddressKind)
        /// They carry an IPv4 address in bytes `at ..< at + 4`, which decides their kind.
        case ipv4(at: Int)
    }

    /// The most specific entry of `table` that covers the address (longest prefix, as a router
    /// picks a route): so `::1/128` wins over `::/96`, the metadata address over the link-local
    /// range around it, and `64:ff9b:1::/96` over `64:ff9b:1::/48`. Order in the table does
    /// not matter.
    static func entry(for ip: IPAddress) -> Meaning? {
        var best: (prefix: Int, meaning: Meaning)?
        for (net, meaning) in table where net.contains(ip) && net.prefix > (best?.prefix ?? -1) {
            best = (net.prefix, meaning)
        }
        return best?.meaning
    }

    static let table: [(Network, Meaning)] =
        ([
            ("169.254.169.254/32", .kind(.metadata)), ("fd00:ec2::254/128", .kind(.metadata)),
            ("100.100.100.200/32", .kind(.metadata)),
            ("0.0.0.0/8", .kind(.unspecified)), ("::/128", .kind(.unspecified)),
            ("127.0.0.0/8", .kind(.loopback)), ("::1/128", .kind(.loopback)),
            ("169.254.0.0/16", .kind(.linkLocal)), ("fe80::/10", .kind(.linkLocal)),
            ("10.0.0.0/8", .kind(.private)), ("172.16.0.0/12", .kind(.private)), ("192.168.0.0/16", .kind(.private)),
            ("100.64.0.0/10", .kind(.private)), ("fc00::/7", .kind(.private)),
            // Site-local (RFC 3879 deprecated it, but stacks still route it inside a site).
            ("fec0::/10", .kind(.private)),
            ("224.0.0.0/4", .kind(.multicast)), ("ff00::/8", .kind(.multicast)),
            ("240.0.0.0/4", .kind(.reserved)), ("192.0.0.0/24", .kind(.reserved)), ("198.18.0.0/15", .kind(.reserved)),
            ("2001:db8::/32", .kind(.reserved)),
            // IPv6 that carries IPv4. IPv4-mapped `::ffff:a.b.c.d` is not listed: `init(bytes:)`
            // unwraps it to the IPv4 address itself, which is also what the connection then uses.
            ("::/96", .ipv4(at: 12)),  // IPv4-compatible `::a.b.c.d` (RFC 4291, deprecated)
            ("::ffff:0:0:0/96", .ipv4(at: 12)),  // IPv4-translated `::ffff:0:a.b.c.d` (SIIT, RFC 2765)
            ("64:ff9b::/96", .ipv4(at: 12)),  // NAT64 well-known prefix (RFC 6052)
            ("64:ff9b:1::/96", .ipv4(at: 12)),  // local-use NAT64 (RFC 8215) with a /96 prefix
            ("2002::/16", .ipv4(at: 2)),  // 6to4 (RFC 3056): 2002:AABB:CCDD::/48 is A.B.C.D
            // The rest of the local-use NAT64 block: a translator with a shorter prefix (/48 to /64,
            // RFC 6052) puts the IPv4 address elsewhere, and which one it uses cannot be known here.
            ("64:ff9b:1::/48", .kind(.reserved)),
        ] as [(String, Meaning)]).map { (try! Network(parsing: $0.0), $0.1) }
}

/// The kinds of address the outbound guard tells apart. Everything but `.public` is refused
/// unless an allowed network covers it.
package enum AddressKind: String, Sendable {
    case `public`, loopback, `private`
    case linkLocal = "link-local"
    case metadata, unspecified, multicast, reserved
}

/// A CIDR block: `10.0.0.0/8`, `fd00::/8`, or one address (`/32`, `/128` implied).
package struct Network: Sendable, Hashable, CustomStringConvertible {
    package let address: IPAddress
    package let prefix: Int

    /// `field` names where the text came from, for the error.
    package init(parsing text: String, field: String = "network") throws(ValidationError) {
        let parts = text.split(separator: "/", maxSplits: 1).map(String.init)
        guard let first = parts.first, let a = IPAddress(first) else {
            throw ValidationError(
                field: field, value: text, hint: "a CIDR block such as 10.0.0.0/8 or fd00::/8, or one address")
        }
        let max = a.bytes.count * 8
        var p = max
        if parts.count == 2 {
            guard let n = Int(parts[1]), (0...max).contains(n) else {
                throw ValidationError(field: field, value: text, hint: "the prefix length must be 0–\(max)")
            }
            p = n
        }
        address = a
        prefix = p
    }

    package func contains(_ ip: IPAddress) -> Bool {
        guard ip.bytes.count == address.bytes.count else { return false }
        var left = prefix
        for (x, y) in zip(ip.bytes, address.bytes) where left > 0 {
            let bits = min(left, 8)
            let mask = UInt8(truncatingIfNeeded: 0xff << (8 - bits))
            if x & mask != y & mask { return false }
            left -= bits
        }
        return true
    }

    package var description: String { "\(address)/\(prefix)" }
}
