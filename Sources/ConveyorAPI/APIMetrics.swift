import Foundation
import Synchronization

/// Request counts and durations by route, method and status, in the Prometheus text format
/// (`GET /metrics`). Routes are the router's patterns (`/v1/tasks/{name}`), never raw paths,
/// so label cardinality stays bounded.
public final class APIMetrics: Sendable {
    static let bounds: [Double] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
    struct Histogram { var buckets = [Int](repeating: 0, count: APIMetrics.bounds.count); var count = 0; var sum = 0.0 }
    struct State { var requests: [String: Int] = [:]; var durations: [String: Histogram] = [:] }
    let state = Mutex(State())

    public init() {}

    func record(route: String, method: String, status: Int, seconds: Double) {
        let route = route.split(separator: "/").map { $0.hasPrefix(":") ? "{\($0.dropFirst())}" : String($0) }.reduce("") { $0 + "/" + $1 }
        let series = "route=\"\(Self.escape(route.isEmpty ? "/" : route))\",method=\"\(method)\""
        state.withLock { s in
            s.requests[series + ",status=\"\(status)\"", default: 0] += 1
            var h = s.durations[series] ?? Histogram()
            for (i, b) in Self.bounds.enumerated() where seconds <= b { h.buckets[i] += 1 }
            h.count += 1
            h.sum += seconds
            s.durations[series] = h
        }
    }

    public func render() -> String {
        let s = state.withLock { $0 }
        var out = "# HELP conveyor_api_requests_total API requests by route, method and status.\n# TYPE conveyor_api_requests_total counter\n"
        for (series, n) in s.requests.sorted(by: { $0.key < $1.key }) { out += "conveyor_api_requests_total{\(series)} \(n)\n" }
        out += "# HELP conveyor_api_request_duration_seconds API request duration by route and method.\n# TYPE conveyor_api_request_duration_seconds histogram\n"
        for (series, h) in s.durations.sorted(by: { $0.key < $1.key }) {
            for (i, b) in Self.bounds.enumerated() { out += "conveyor_api_request_duration_seconds_bucket{\(series),le=\"\(b)\"} \(h.buckets[i])\n" }
            out += "conveyor_api_request_duration_seconds_bucket{\(series),le=\"+Inf\"} \(h.count)\n"
            out += "conveyor_api_request_duration_seconds_sum{\(series)} \(h.sum)\n"
            out += "conveyor_api_request_duration_seconds_count{\(series)} \(h.count)\n"
        }
        return out
    }

    static func escape(_ s: String) -> String { s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") }
}
