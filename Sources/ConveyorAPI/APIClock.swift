/// The API's time source: `ContinuousClock.now`, or a test's, which moves only when told. Every age
/// the API measures (key cache, readiness cache, overview cache, rate-limit buckets) reads it.
package struct APIClock: Sendable {
    package let now: @Sendable () -> ContinuousClock.Instant

    package init(now: @escaping @Sendable () -> ContinuousClock.Instant = { .now }) { self.now = now }

    package static let continuous = APIClock()
}
