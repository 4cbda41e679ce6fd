package import ConveyorConfig
package import ConveyorCore

extension OutboundPolicy {
    /// Reads the guard's keys from `s` (already scoped, e.g. to `callbacks` or `executors.http`):
    /// `allowed_hosts`, `allowed_networks`, `allowed_schemes`, `max_redirects`,
    /// `max_response_bytes`, `connect_timeout_ms`. Every key is optional; what is absent keeps
    /// the value already set.
    package mutating func read(_ s: Settings) throws(ValidationError) {
        allowedHosts = try s.strings("allowed_hosts", default: allowedHosts)
        var networks: [Network] = []
        for n in try s.strings("allowed_networks", default: []) {
            networks.append(try Network(parsing: n, field: "allowed_networks"))
        }
        if !networks.isEmpty { allowedNetworks = networks }
        let schemes = try s.strings("allowed_schemes", default: allowedSchemes.sorted())
        for scheme in schemes where scheme != "http" && scheme != "https" {
            throw s.bad("allowed_schemes", "only http and https can be allowed, not '\(scheme)'")
        }
        allowedSchemes = Set(schemes)
        maxRedirects = try s.int("max_redirects", default: maxRedirects, range: 0...20)
        maxResponseBytes = try s.int("max_response_bytes", default: maxResponseBytes, range: 0...(16 << 20))
        connectTimeout = try s.milliseconds(
            "connect_timeout_ms", default: Int(connectTimeout.inMilliseconds), range: 1...600_000)
    }
}
