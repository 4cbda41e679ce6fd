import ConveyorCore
import CoreMetrics
import Foundation
import Synchronization

/// What a connection-owning thread shares with the Swift side: the wake-up pipe, the stop flag,
/// the reconnect counter and backoff, and the last connection error (for start-up errors).
/// Used by `AMQPPublisher` and `AMQPConsumer`.
final class ConnectionOwner: Sendable {
    let configuration: AMQPConfiguration
    let wake = WakePipe()
    private let stopped = Atomic<Bool>(false)
    /// The thread's life: 0 not started, 1 running, 2 ended (its connection closed).
    private let life = Atomic<Int>(0)
    /// Signalled once when the thread ends; `stopAndWait` is its one waiter.
    private let ended = DispatchSemaphore(value: 0)
    private let waiting = Atomic<Bool>(false)
    private let reconnects = Atomic<Int>(0)
    private let lastError = Mutex<AMQPError?>(nil)
    /// `publish` or `consume`: the reconnect counter's label.
    let role: String
    /// Which entry of the broker list the next connection tries. It starts at random, so the
    /// connections of a fleet spread over a cluster's nodes, and moves on after each failed
    /// connect and each lost connection.
    private let cursor: Atomic<Int>
    /// Whether a connection has declared the whole topology, so a reconnect need only look it up
    /// and declare what is missing. Cleared while a declaration is under way: one cut short (a
    /// queue declared, the connection lost before its binding) leaves the next connection to
    /// declare everything again, or the binding would never be made.
    private let declared = Atomic<Bool>(false)
    /// The broker list, parsed once (start-up has already checked it: `AMQPConfiguration.validate`).
    private let endpoints: Result<[AMQPConfiguration.Endpoint], AMQPError>

    init(configuration: AMQPConfiguration, role: String) {
        self.configuration = configuration
        self.role = role
        cursor = Atomic(configuration.startAtFirstEndpoint ? 0 : Int.random(in: 0..<1024))
        endpoints = Result { () throws(AMQPError) in try configuration.endpoints() }
        // Present at 0 from the start, so a dashboard sees the series before the first reconnect.
        CoreMetrics.Counter(label: "conveyor_amqp_reconnects_total", dimensions: [("connection", role)]).increment(
            by: 0)
    }

    var isStopped: Bool { stopped.load(ordering: .relaxed) }
    var reconnectCount: Int { reconnects.load(ordering: .relaxed) }

    /// Starts the owner thread running `body`.
    func start(name: String, _ body: @escaping @Sendable () -> Void) {
        guard life.compareExchange(expected: 0, desired: 1, ordering: .acquiringAndReleasing).exchanged else { return }
        let t = Thread { [self] in
            body()
            life.store(2, ordering: .releasing)
            ended.signal()
        }
        t.name = name
        t.start()
    }

    /// Asks the thread to stop and returns at once; the thread finishes what was queued for the
    /// connection, closes it and ends soon after (see `stopAndWait`).
    func stop() {
        stopped.store(true, ordering: .relaxed)
        wake.wake()
    }

    /// Whether the thread has ended (or never started): its connection is closed.
    var hasEnded: Bool { life.load(ordering: .acquiring) != 1 }

    /// Stops the thread and waits until it has ended, at most `limit`; returns whether it did.
    /// A process that exits while the thread still runs drops what the thread had not yet
    /// written, such as the ack of a run that just finished: the broker then delivers that run
    /// again. Only the first caller waits; a later one returns at once.
    @discardableResult
    func stopAndWait(within limit: Duration) async -> Bool {
        stop()
        guard waiting.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else {
            return hasEnded
        }
        if hasEnded { return true }
        // Waited for on a thread of its own (never on the cooperative pool), and not cut short
        // when the calling task is cancelled: the acks matter most then.
        let until = DispatchTime.now() + .milliseconds(Int(limit / .milliseconds(1)))
        let semaphore = ended
        return await withCheckedContinuation { (c: CheckedContinuation<Bool, Never>) in
            Thread.detachNewThread { c.resume(returning: semaphore.wait(timeout: until) == .success) }
        }
    }

    func failed(_ error: AMQPError) { lastError.withLock { $0 = error } }

    /// Opens a session on the broker endpoint the cursor points at (one of `configuration.url`'s
    /// entries) and declares `topology` on it: all of it the first time, and again after a
    /// declaration was cut short; only what is missing after one completed. Callers call `moveOn`
    /// when it fails or its connection is later lost.
    func connect(topology: AMQPTopology, generation: UInt64) throws(AMQPError) -> AMQPSession {
        let endpoints = try self.endpoints.get()
        let endpoint = endpoints[cursor.load(ordering: .relaxed) % endpoints.count]
        let session = try AMQPSession(configuration: configuration, endpoint: endpoint, generation: generation)
        let onlyMissing = declared.exchange(false, ordering: .relaxed)
        do throws(AMQPError) {
            try session.declare(topology, onlyMissing: onlyMissing)
        } catch {
            session.abandon()  // never a polite close on a connection the broker may have dropped
            throw error
        }
        declared.store(true, ordering: .relaxed)
        return session
    }

    /// The next connection tries the next endpoint of the list (the same one when there is one).
    /// Returns the endpoint left (password masked), for the log line that says why.
    @discardableResult
    func moveOn() -> String {
        let left = cursor.add(1, ordering: .relaxed).oldValue
        guard case .success(let endpoints) = self.endpoints else { return configuration.redactedURL }
        return endpoints[left % endpoints.count].redacted
    }
    func reconnected() {
        reconnects.add(1, ordering: .relaxed)
        CoreMetrics.Counter(label: "conveyor_amqp_reconnects_total", dimensions: [("connection", role)]).increment()
    }

    /// Sleeps `Backoff.delay` (base and cap from the configuration), waking early on stop.
    func sleepBackoff(_ attempt: Int) {
        let delay = Backoff.delay(attempt: attempt, base: configuration.reconnectBase, cap: configuration.reconnectCap)
        let end = Date().addingTimeInterval(delay.inSeconds)
        while Date() < end && !isStopped {
            wake.wait(on: nil, timeoutMS: Int32(max(1, min(100, end.timeIntervalSinceNow * 1000))))
        }
    }

    /// The permission (in RabbitMQ's configure/write/read terms) the operation an error names
    /// needs: RabbitMQ's refusal names the object and the user, not always the permission.
    static func permissionNeeded(by message: String) -> String? {
        let table = [
            ("exchange.declare", "the 'configure' permission on the exchange"),
            ("queue.declare", "the 'configure' permission on the queue"),
            ("basic.consume", "the 'read' permission on the queue"),
            ("queue.bind", "'write' on the queue and 'read' on the exchange"),
            ("basic.publish", "the 'write' permission on the exchange"),
        ]
        return table.first { message.hasPrefix($0.0) }.map(\.1)
    }

    /// Waits until `ready()` holds, up to `configuration.connectRetryFor`; then throws an error
    /// that names the URL (password redacted) and the last failure. A permission the broker
    /// refused (403) fails at once: retrying cannot grant it, and a process that starts with the
    /// wrong login should say so, not wait a minute.
    func waitUntil(_ ready: () -> Bool) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + configuration.connectRetryFor
        while !ready() {
            let last = lastError.withLock { $0 }
            if let last, last.replyCode == 403 {
                let user = (try? endpoints.get().first?.user) ?? "?"
                let needs = Self.permissionNeeded(by: last.message).map { " The operation needs \($0)." } ?? ""
                throw AMQPError(
                    code: .accessRefused,
                    message:
                        "the broker refused user '\(user)' at \(configuration.redactedURL): \(last.message).\(needs) "
                            + """
                            Each component logs in as its own user with the permissions in \
                            deploy/broker-permissions.tsv (docs/operations.md, \"Broker identities\"): 
                            """
                            + """
                            give this component's CONVEYOR_AMQP_URL that user, or grant the permission with \
                            rabbitmqctl set_permissions
                            """,
                    replyCode: 403)
            }
            if clock.now >= deadline {
                var hint = "Check CONVEYOR_AMQP_URL and that RabbitMQ is running"
                if last?.replyCode == 404 {
                    hint =
                        """
                        Dispatchers declare the exchanges and queues that workers and the API only look up: start a \
                        dispatcher with the same amqp.prefix
                        """
                }
                throw AMQPError(
                    code: .connection,
                    message:
                        """
                        broker \(configuration.redactedURL) unreachable for \
                        \(configuration.connectRetryFor)\(last.map { ": \($0.message)" } ?? ""). \(hint)
                        """
                )
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }
}
