#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
public import ConveyorCore

/// An IPv4 or IPv6 address as its bytes (4 or 16). IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`)
/// are unwrapped to IPv4, so a check on `127.0.0.1` also catches `::ffff:127.0.0.1`.
public struct IPAddress: Sendable, Hashable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init?(_ text: String) {
        var t = text
        if t.hasPrefix("[") && t.hasSuffix("]") { t = String(t.dropFirst().dropLast()) }
        var v4 = in_addr(), v6 = in6_addr()
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

    public var isV4: Bool { bytes.count == 4 }

    public var description: String {
        var out = [CChar](repeating: 0, count: 64)
        let family = isV4 ? AF_INET : AF_INET6
        _ = bytes.withUnsafeBytes { inet_ntop(family, $0.baseAddress, &out, socklen_t(out.count)) }
        return String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// What kind of network the address belongs to; `.public` for everything not listed.
    public var kind: AddressKind {
        for (net, kind) in Self.reserved where net.contains(self) { return kind }
        return .public
    }

    static let reserved: [(Network, AddressKind)] = ([
        // Cloud metadata endpoints first: they sit inside link-local and private ranges.
        ("169.254.169.254/32", .metadata), ("fd00:ec2::254/128", .metadata), ("100.100.100.200/32", .metadata),
        ("0.0.0.0/8", .unspecified), ("::/128", .unspecified),
        ("127.0.0.0/8", .loopback), ("::1/128", .loopback),
        ("169.254.0.0/16", .linkLocal), ("fe80::/10", .linkLocal),
        ("10.0.0.0/8", .private), ("172.16.0.0/12", .private), ("192.168.0.0/16", .private),
        ("100.64.0.0/10", .private), ("fc00::/7", .private),
        ("224.0.0.0/4", .multicast), ("ff00::/8", .multicast),
        ("240.0.0.0/4", .reserved), ("192.0.0.0/24", .reserved), ("198.18.0.0/15", .reserved),
        ("64:ff9b::/96", .reserved), ("2001:db8::/32", .reserved),
    ] as [(String, AddressKind)]).map { (try! Network(parsing: $0.0), $0.1) }
}

/// The kinds of address the outbound guard tells apart. Everything but `.public` is refused
/// unless an allowed network covers it.
public enum AddressKind: String, Sendable {
    case `public`, loopback, `private`, linkLocal = "link-local", metadata, unspecified, multicast, reserved
}

/// A CIDR block: `10.0.0.0/8`, `fd00::/8`, or one address (`/32`, `/128` implied).
public struct Network: Sendable, Hashable, CustomStringConvertible {
    public let address: IPAddress
    public let prefix: Int

    /// `field` names where the text came from, for the error.
    public init(parsing text: String, field: String = "network") throws(ValidationError) {
        let parts = text.split(separator: "/", maxSplits: 1).map(String.init)
        guard let first = parts.first, let a = IPAddress(first) else {
            throw ValidationError(field: field, value: text, hint: "a CIDR block such as 10.0.0.0/8 or fd00::/8, or one address")
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

    public func contains(_ ip: IPAddress) -> Bool {
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

    public var description: String { "\(address)/\(prefix)" }
}
