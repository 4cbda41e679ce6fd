import AsyncHTTPClient
import ConveyorCore
import Dispatch
import Foundation
package import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
package import Tracing

/// Where outbound HTTP may go. One guard for every request Conveyor makes on a user's behalf
/// (callbacks, the http executor): a host allowlist, then every resolved address checked
/// against the refused kinds, the connection pinned to the address checked, and each redirect
/// checked again.
package struct OutboundPolicy: Sendable {
    /// Host names allowed; empty allows any host. `*.example.com` allows the subdomains of
    /// `example.com` (not `example.com` itself).
    package var allowedHosts: [String] = []
    /// Networks allowed although they are loopback, private, link-local or metadata ranges
    /// (for example `10.20.0.0/16` for an internal service, `127.0.0.1` in tests).
    package var allowedNetworks: [Network] = []
    /// `http` and `https` by default.
    package var allowedSchemes: Set<String> = ["http", "https"]
    /// Redirects followed, each one checked like the first request. 0 refuses every redirect.
    package var maxRedirects = 5
    /// Response body bytes kept; the rest is read and dropped.
    package var maxResponseBytes = 65_536
    package var connectTimeout: Duration = .seconds(5)

    package init() {}

    /// Whether the host name passes the allowlist.
    package func allows(host: String) -> Bool {
        guard !allowedHosts.isEmpty else { return true }
        let h = host.lowercased()
        return allowedHosts.contains { pattern in
            let p = pattern.lowercased()
            if p.hasPrefix("*.") { return h.hasSuffix(String(p.dropFirst())) }
            return h == p
        }
    }

    /// Why the address is refused, or nil when it may be used.
    package func refusal(of ip: IPAddress) -> String? {
        let kind = ip.kind
        if kind == .public || allowedNetworks.contains(where: { $0.contains(ip) }) { return nil }
        // An IPv6 address that carries an IPv4 one is refused for that one: name it.
        let carried = ip.embeddedIPv4.map { " (it carries \($0))" } ?? ""
        return "\(ip) is a \(kind.rawValue) address\(carried)"
    }
}

/// A refused or failed outbound request. `retryable` tells callers whether trying again later
/// may help (a timeout, a refused connection) or cannot (a refused host, a bad URL).
package struct OutboundError: Error, Sendable, CustomStringConvertible {
    package enum Kind: String, Sendable {
        case refused
        case invalidURL = "invalid_url"
        case connect, timeout, transport
    }
    package var kind: Kind
    package var message: String
    package var retryable: Bool { kind == .connect || kind == .timeout || kind == .transport }
    package var description: String { message }
}

package struct OutboundRequest: Sendable {
    package var method: String
    package var url: String
    package var headers: [(String, String)]
    package var body: [UInt8]
    /// Names of headers meant for the request's own origin only (compared without case): a
    /// redirect to another origin drops them, as it drops `credentialHeaders`. The http executor
    /// puts the task's own headers here: they are where tasks put API keys.
    package var originOnlyHeaders: Set<String>

    /// Dropped on every redirect to another origin, as browsers and curl drop them.
    package static let credentialHeaders: Set<String> = ["authorization", "cookie", "proxy-authorization"]

    package init(
        method: String = "GET", url: String, headers: [(String, String)] = [], body: [UInt8] = [],
        originOnlyHeaders: Set<String> = []
    ) {
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.originOnlyHeaders = originOnlyHeaders
    }
}

extension OutboundRequest {
    /// OpenTelemetry HTTP client span attributes. The query is left out: it may carry secrets.
    package var spanAttributes: SpanAttributes {
        var a = SpanAttributes()
        a["http.request.method"] = method
        if let u = URLComponents(string: url) {
            if let scheme = u.scheme { a["url.scheme"] = scheme }
            if let host = u.host { a["server.address"] = host }
            if let port = u.port ?? (u.scheme == "https" ? 443 : u.scheme == "http" ? 80 : nil) {
                a["server.port"] = port
            }
            a["url.path"] = u.path.isEmpty ? "/" : u.path
        }
        return a
    }
}

package struct OutboundResponse: Sendable {
    package var status: Int
    package var headers: [(String, String)]
    /// At most `maxResponseBytes`; `truncated` says whether more came.
    package var body: [UInt8]
    package var truncated: Bool
    /// The URL that answered, after redirects.
    package var url: String
}

/// Sends requests through the guard. Each request gets a client pinned to the address that was
/// checked (async-http-client's `dnsOverride`, so TLS still verifies the host name), and no
/// redirect is followed by the client itself.
package struct OutboundHTTP: Sendable {
    package let policy: OutboundPolicy
    let logger: Logger

    package init(policy: OutboundPolicy, logger: Logger) {
        self.policy = policy
        self.logger = logger
    }

    /// Sends the request, following redirects the policy allows (303, and 301/302 for a POST,
    /// become a GET without body; 307/308 keep method and body). `timeout` bounds the whole
    /// exchange, redirects included.
    ///
    /// A redirect to another origin (scheme, host or port differs from the request's) drops
    /// `Authorization`, `Cookie`, `Proxy-Authorization` and the request's `originOnlyHeaders`,
    /// for that hop and every later one: a server may send the client anywhere, and the
    /// credentials were given for the origin the caller named. A body is never sent to another
    /// origin: a redirect that would replay one there (307/308, or 301/302 after anything but a
    /// POST) is refused, not sent without its body — a PUT without its body is another request
    /// than the one asked for. Same-origin redirects keep headers and body.
    package func send(_ request: OutboundRequest, timeout: Duration) async throws(OutboundError) -> OutboundResponse {
        let deadline = NIODeadline.now() + .nanoseconds(Int64(timeout.inSeconds * 1e9))
        var current = request
        var hops = 0
        while true {
            let response = try await sendOnce(current, deadline: deadline)
            guard [301, 302, 303, 307, 308].contains(response.status),
                let location = response.headers.first(where: { $0.0.lowercased() == "location" })?.1
            else {
                return response
            }
            guard hops < policy.maxRedirects else {
                if policy.maxRedirects == 0 { return response }
                throw OutboundError(
                    kind: .refused,
                    message: "more than \(policy.maxRedirects) redirects from \(strippedURL(request.url))")
            }
            guard let next = URL(string: location, relativeTo: URL(string: current.url))?.absoluteURL.absoluteString
            else {
                throw OutboundError(
                    kind: .invalidURL, message: "redirect to an invalid location '\(strippedURL(location))'")
            }
            hops += 1
            if response.status == 303 || (current.method == "POST" && [301, 302].contains(response.status)) {
                current.method = "GET"
                current.body = []
                current.headers.removeAll { ["content-type", "content-length"].contains($0.0.lowercased()) }
            }
            if !Self.sameOrigin(next, request.url) {
                guard current.body.isEmpty else {
                    throw OutboundError(
                        kind: .refused,
                        message:
                            "HTTP \(response.status) from \(strippedURL(current.url)) redirects a \(current.method) "
                                + """
                                with a body to another origin (\(strippedURL(next))); a body is never sent to another \
                                origin: call that URL directly
                                """
                    )
                }
                let dropped = OutboundRequest.credentialHeaders.union(current.originOnlyHeaders.map { $0.lowercased() })
                current.headers.removeAll { dropped.contains($0.0.lowercased()) }
            }
            current.url = next
        }
    }

    /// Sends the request as `send(_:timeout:)` does, recording the exchange on `span`: the
    /// caller's HTTP client span, whose context (and only it) the request's `traceparent`,
    /// `tracestate` and `baggage` carry. Sets `http.response.status_code`, and `error.type` with
    /// an error status for a status other than 2xx or a failed exchange. The caller ends the span.
    package func send(_ request: OutboundRequest, timeout: Duration, span: any Span) async throws(OutboundError)
        -> OutboundResponse
    {
        do {
            let response = try await send(request, timeout: timeout)
            span.attributes["http.response.status_code"] = response.status
            if !(200..<300).contains(response.status) {
                span.attributes["error.type"] = "\(response.status)"
                span.setStatus(SpanStatus(code: .error, message: "HTTP \(response.status)"))
            }
            return response
        } catch {
            span.attributes["error.type"] = "http_\(error.kind.rawValue)"
            span.setStatus(SpanStatus(code: .error, message: error.message))
            throw error
        }
    }

    /// Whether two absolute URLs have the same origin: scheme, host and port (the scheme's
    /// default port when none is written), compared without case. Unreadable URLs are never
    /// the same origin.
    static func sameOrigin(_ a: String, _ b: String) -> Bool {
        func origin(_ text: String) -> String? {
            guard let url = URL(string: text), let scheme = url.scheme?.lowercased(), let host = url.host?.lowercased(),
                !host.isEmpty
            else {
                return nil
            }
            return "\(scheme)://\(host):\(url.port ?? (scheme == "https" ? 443 : 80))"
        }
        guard let x = origin(a), let y = origin(b) else { return false }
        return x == y
    }

    /// Checks the URL, resolves and checks its host, and sends one request pinned to the
    /// checked address.
    func sendOnce(_ request: OutboundRequest, deadline: NIODeadline) async throws(OutboundError) -> OutboundResponse {
        let (host, port) = try check(url: request.url)
        let ip = try await resolveChecked(host: host, port: port)
        var configuration = HTTPClient.Configuration()
        configuration.redirectConfiguration = .disallow
        // One traceparent per request: the caller's own span writes it (the http executor's
        // client span, a callback's run context). async-http-client's tracing would add a
        // second header and a span of its own with no parent, as it starts that span on an
        // event loop, outside the caller's task and its ServiceContext.
        configuration.tracing.tracer = nil
        configuration.timeout = .init(connect: .nanoseconds(Int64(policy.connectTimeout.inSeconds * 1e9)))
        if IPAddress(host) == nil { configuration.dnsOverride = [host: ip.description] }
        let client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: configuration)
        let result: Result<OutboundResponse, OutboundError>
        do {
            var r = HTTPClientRequest(url: request.url)
            r.method = HTTPMethod(rawValue: request.method)
            for (k, v) in request.headers { r.headers.add(name: k, value: v) }
            if !request.body.isEmpty { r.body = .bytes(ByteBuffer(bytes: request.body)) }
            let response = try await client.execute(r, deadline: deadline, logger: logger)
            var body: [UInt8] = []
            var truncated = false
            for try await chunk in response.body {
                let room = policy.maxResponseBytes - body.count
                if chunk.readableBytes > room { truncated = true }
                if room > 0 { body += chunk.readableBytesView.prefix(room) }
            }
            result = .success(
                OutboundResponse(
                    status: Int(response.status.code), headers: response.headers.map { ($0.name, $0.value) },
                    body: body, truncated: truncated, url: request.url))
        } catch {
            result = .failure(Self.classify(error, url: request.url))
        }
        try? await client.shutdown()
        return try result.get()
    }

    /// The URL's host and port, if the scheme and host are allowed.
    func check(url text: String) throws(OutboundError) -> (String, Int) {
        guard let url = URL(string: text), let scheme = url.scheme?.lowercased(), let host = url.host, !host.isEmpty
        else {
            throw OutboundError(kind: .invalidURL, message: "'\(strippedURL(text))' is not an absolute URL")
        }
        guard policy.allowedSchemes.contains(scheme) else {
            throw OutboundError(
                kind: .refused,
                message:
                    """
                    scheme '\(scheme)' of \(strippedURL(text)) is not allowed (allowed: \
                    \(policy.allowedSchemes.sorted().joined(separator: ", ")))
                    """
            )
        }
        guard policy.allows(host: host) else {
            throw OutboundError(
                kind: .refused,
                message: "host '\(host)' is not in the allowed hosts (\(policy.allowedHosts.joined(separator: ", ")))")
        }
        return (host, url.port ?? (scheme == "https" ? 443 : 80))
    }

    /// Resolves the host (off the cooperative pool) and refuses it when any of its addresses is
    /// refused: a name that mixes package and private addresses is not used at all.
    func resolveChecked(host: String, port: Int) async throws(OutboundError) -> IPAddress {
        let addresses: [IPAddress]
        if let literal = IPAddress(host) {
            addresses = [literal]
        } else {
            addresses = try await Self.resolve(host)
        }
        guard !addresses.isEmpty else { throw OutboundError(kind: .connect, message: "\(host) resolved to no address") }
        for ip in addresses {
            if let why = policy.refusal(of: ip) {
                throw OutboundError(
                    kind: .refused,
                    message:
                        "\(host) refused: \(why); allow its network in allowed_networks if it is meant to be reached")
            }
        }
        return addresses[0]
    }

    /// getaddrinfo on a Dispatch thread: it blocks, so never on the cooperative pool.
    static func resolve(_ host: String) async throws(OutboundError) -> [IPAddress] {
        let result: Result<[IPAddress], OutboundError> = await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                var hints = addrinfo()
                hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
                var list: UnsafeMutablePointer<addrinfo>?
                let rc = getaddrinfo(host, nil, &hints, &list)
                guard rc == 0 else {
                    let why = String(cString: gai_strerror(rc))
                    continuation.resume(
                        returning: .failure(OutboundError(kind: .connect, message: "cannot resolve \(host): \(why)")))
                    return
                }
                defer { freeaddrinfo(list) }
                var out: [IPAddress] = []
                var p = list
                while let ai = p {
                    if let sa = ai.pointee.ai_addr {
                        if ai.pointee.ai_family == AF_INET {
                            var a = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr }
                            out.append(IPAddress(bytes: withUnsafeBytes(of: &a) { Array($0) }))
                        } else if ai.pointee.ai_family == AF_INET6 {
                            var a = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
                            out.append(IPAddress(bytes: withUnsafeBytes(of: &a) { Array($0) }))
                        }
                    }
                    p = ai.pointee.ai_next
                }
                var seen = Set<IPAddress>()
                continuation.resume(returning: .success(out.filter { seen.insert($0).inserted }))
            }
        }
        return try result.get()
    }

    /// The error of a failed exchange. The URL in its message has no query and no userinfo
    /// (`strippedURL`): messages are stored as a run's error and a callback's `last_error`.
    static func classify(_ error: any Error, url full: String) -> OutboundError {
        let url = strippedURL(full)
        if let e = error as? HTTPClientError {
            if e == .deadlineExceeded || e == .readTimeout || e == .connectTimeout || e == .writeTimeout {
                return OutboundError(kind: .timeout, message: "\(url): timed out (\(e))")
            }
            if e == .remoteConnectionClosed {
                return OutboundError(kind: .connect, message: "\(url): \(e)")
            }
            return OutboundError(kind: .transport, message: "\(url): \(e)")
        }
        if error is NIOConnectionError || error is IOError {
            return OutboundError(kind: .connect, message: "\(url): cannot connect (\(error))")
        }
        return OutboundError(kind: .transport, message: "\(url): \(error)")
    }
}

/// How a URL may appear in an error message: without userinfo, without fragment, and with `?…`
/// in place of its query, whose tokens and signatures must not end up in a run's
/// `error_message` or a callback's `last_error` (`https://api.example.com/hook?token=s` becomes
/// `https://api.example.com/hook?…`). Text that is not a URL loses everything from its first
/// `?` or `#` the same way.
///
/// Passwords are masked first (`redactPassword(in:)`, which knows that people write `/`, `?`,
/// `#` and `@` into them unencoded); then the authority ends at the first `/`, `?` or `#` and
/// the userinfo at its last `@` (RFC 3986), and both the userinfo and what follows `?` or `#`
/// are dropped. Masking first keeps a password from surviving as a "host" or "path" (except
/// the one `redactPassword` reads as a port: digits then `/`), at the price of showing the wrong
/// host for a URL with both a password and an `@` in its path or query.
package func strippedURL(_ text: String) -> String {
    let masked = redactPassword(in: text)
    var head = ""
    var rest = Substring(masked)
    if let scheme = rest.range(of: "://") {
        head = String(rest[..<scheme.upperBound])
        rest = rest[scheme.upperBound...]
        let authorityEnd = rest.firstIndex { "/?#".contains($0) } ?? rest.endIndex
        if let at = rest[..<authorityEnd].lastIndex(of: "@") { rest = rest[rest.index(after: at)...] }
    }
    guard let cut = rest.firstIndex(where: { $0 == "?" || $0 == "#" }) else { return head + String(rest) }
    let tail = rest[cut] == "?" ? "?…" : ""
    return head + String(rest[..<cut]) + tail
}
