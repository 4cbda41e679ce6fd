/// Time passed since it was made, on any clock: code that compares ages reads this, so a test can
/// hand it a clock that moves only when told.
package struct Stopwatch: Sendable {
    private let read: @Sendable () -> Duration

    package init(_ clock: any Clock<Duration> = ContinuousClock()) { read = Self.reader(clock) }

    private static func reader<C: Clock<Duration>>(_ clock: C) -> @Sendable () -> Duration {
        let start = clock.now
        return { start.duration(to: clock.now) }
    }

    /// Time since the stopwatch was made.
    package var elapsed: Duration { read() }
}
