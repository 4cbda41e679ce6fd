import Synchronization

/// Refused statuses are logged at most once per source (the `worker_id` they claim) per minute,
/// so a flood of forgeries costs a counter increment each, not a log line each. At most 1,024
/// sources are remembered; past that (a flood with random ids), new sources are not logged until
/// old entries age out. The counter counts every one.
final class RefusalLog: Sendable {
    let last = Mutex<[String: ContinuousClock.Instant]>([:])
    static let every: Duration = .seconds(60)
    static let sources = 1024

    func shouldLog(_ source: String, now: ContinuousClock.Instant = .now) -> Bool {
        last.withLock { seen in
            if let t = seen[source], now - t < Self.every { return false }
            if seen.count >= Self.sources {
                seen = seen.filter { now - $0.value < Self.every }
                if seen.count >= Self.sources { return false }
            }
            seen[source] = now
            return true
        }
    }
}
