import ConveyorCore
import ConveyorWorker
import Foundation
import Synchronization
import Testing

@Suite struct RunTimersTests {
    /// Waits until `condition` holds, at most `timeout`.
    static func eventually(timeout: Duration = .seconds(5), _ condition: () -> Bool) async throws -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if condition() { return true }
            try await Task.sleep(for: .milliseconds(5))
        }
        return condition()
    }

    /// The loop sleeps toward the earliest deadline it knows; one earlier than that, added while
    /// it sleeps, must wake it, or that deadline would wait for the later one.
    @Test func anEarlierDeadlineWakesTheSleepingLoop() async throws {
        let timers = RunTimers()
        let late = Mutex(false)
        let fired = Wakeup()
        try await timers.serving { () async throws in
            let far = ContinuousClock.now + .seconds(60)
            let farEntry = timers.schedule(at: far) { late.withLock { $0 = true } }
            try #require(try await Self.eventually { timers.armed == far }, "the loop sleeps toward the only deadline")
            let added = ContinuousClock.now
            timers.schedule(at: added + .milliseconds(20)) { fired.signal() }
            #expect(await fired.wait(timeout: .seconds(5)), "the earlier deadline fired")
            #expect(ContinuousClock.now - added < .seconds(5))
            #expect(timers.armed == far, "back to sleeping toward the later one")
            timers.cancel(farEntry)
        }
        #expect(!late.withLock { $0 })
        #expect(timers.count == 0)
    }

    /// What docs/architecture.md claims: runs that start while others go add deadlines later
    /// than the one the loop sleeps toward, so a busy worker's loop does not wake per run. 2,000
    /// short runs, each adding its two deadlines (`started` after 1 s, a timeout after 300 s) and
    /// removing them when it ends, beside one long run: the first short run's `started` is the
    /// earliest deadline and wakes the loop; the later ones' are later still. (A few more passes
    /// come from signals sent while the loop was waking; signalling on every deadline made 1,124.)
    @Test func shortRunsDoNotWakeTheLoopOnePerRun() async throws {
        let timers = RunTimers()
        try await timers.serving { () async throws in
            let long = timers.schedule(at: ContinuousClock.now + .seconds(60)) {}
            try #require(try await Self.eventually { timers.armed != nil }, "the loop sleeps toward the long run's")
            let before = timers.passes
            for _ in 0..<2000 {
                let now = ContinuousClock.now
                let started = timers.schedule(at: now + .seconds(1)) {}
                let timeout = timers.schedule(at: now + .seconds(300)) {}
                await Task.yield()
                timers.cancel(started)
                timers.cancel(timeout)
            }
            #expect(timers.passes - before <= 20, "the loop woke \(timers.passes - before) times for 2,000 runs")
            timers.cancel(long)
        }
    }

    /// Entries added and cancelled in any order (cancels from every place in the heap): each
    /// left fires once, in deadline order, and a cancelled one never fires.
    @Test func firesInDeadlineOrderAndNeverACancelledEntry() async throws {
        let timers = RunTimers()
        let fired = Mutex<[(Int, ContinuousClock.Instant)]>([])
        let allFired = Wakeup()
        var generator = SystemRandomNumberGenerator()
        // All are scheduled and cancelled before the loop runs, so none can pass meanwhile.
        let start = ContinuousClock.now + .milliseconds(50)
        let n = 600
        let deadlines = (0..<n).map { i in
            // The last entry comes last and is kept: once it has fired, every deadline has passed.
            i == n - 1
                ? start + .milliseconds(400) : start + .microseconds(Int.random(in: 0..<300_000, using: &generator))
        }
        let cancelled = Set((0..<n - 1).filter { _ in Bool.random(using: &generator) })
        let expected = n - cancelled.count
        var entries: [RunTimers.Entry] = []
        for (i, d) in deadlines.enumerated() {
            entries.append(
                timers.schedule(at: d) {
                    let count = fired.withLock { f in
                        f.append((i, ContinuousClock.now))
                        return f.count
                    }
                    if count == expected { allFired.signal() }
                })
        }
        for i in cancelled.shuffled(using: &generator) { timers.cancel(entries[i]) }
        #expect(timers.count == expected)
        try await timers.serving { () async throws in
            try #require(await allFired.wait(timeout: .seconds(10)), "every kept entry fired")
        }
        let order = fired.withLock { $0 }
        #expect(order.count == expected)
        #expect(Set(order.map(\.0)).isDisjoint(with: cancelled), "a cancelled entry fired")
        #expect(Set(order.map(\.0)).count == expected, "an entry fired twice")
        let firedDeadlines = order.map { deadlines[$0.0] }
        #expect(firedDeadlines == firedDeadlines.sorted(), "entries fired out of deadline order")
        #expect(order.allSatisfy { deadlines[$0.0] <= $0.1 }, "an entry fired before its deadline")
        #expect(timers.count == 0)
    }

    /// A run's timeout comes from the shared timers: a run past it is stopped and reported
    /// `timed_out`; one that ends first leaves no deadline behind.
    @Test func aRunsTimeoutIsADeadlineOnTheTimers() async throws {
        let timers = RunTimers()
        struct Hang: Executor {
            func execute(_ context: ExecutionContext) async -> ExecutionResult {
                try? await Task.sleep(for: .seconds(30))
                return .succeeded
            }
        }
        struct Quick: Executor {
            func execute(_ context: ExecutionContext) async -> ExecutionResult { .succeeded }
        }
        func context(_ timeout: Duration) -> ExecutionContext {
            ExecutionContext(
                runID: UUID(), taskName: "t", attempt: 1, parameters: [:], timeout: timeout, traceparent: nil,
                tracestate: nil, idempotencyKey: "k")
        }
        try await timers.serving { () async throws in
            let began = ContinuousClock.now
            let r = await Worker.runForTesting(Hang(), context(.milliseconds(100)), timers: timers)
            #expect(r.outcome == .timedOut)
            #expect(ContinuousClock.now - began < .seconds(10))
            let q = await Worker.runForTesting(Quick(), context(.seconds(3600)), timers: timers)
            #expect(q.outcome == .succeeded)
            #expect(timers.count == 0, "the quick run's timeout was left behind")
        }
    }
}
