/// The pool's bookkeeping as a pure state machine: each event (a caller asks, a waiter registers,
/// its timer fires, it is cancelled, a connection comes back, the pool closes) changes the state and
/// returns what the caller must do outside the lock (resume a waiter, open or close a connection).
/// `PostgresPool` drives it under one lock; the unit tests drive it with plain values, no server.
///
/// A waiter is known by an id from the moment `acquire` says `.wait`, before its continuation is
/// registered: a timeout or a cancellation that comes first is remembered, and the registration that
/// follows is answered at once instead of waiting for ever.
struct PoolStateMachine<Connection, Waiter> {
    typealias Failure = PoolFailure

    enum AcquireAction {
        case use(Connection)
        /// A slot is counted for the caller: open a connection (and `createFailed()` if that fails).
        case create
        /// Register a waiter under this id, and start its timer.
        case wait(id: Int)
        case fail(Failure)
    }

    enum RegisterAction {
        case wait
        /// Resume the waiter at once: its timer fired or it was cancelled before it registered, or
        /// the pool closed.
        case fail(Failure)
    }

    enum ReleaseAction {
        /// Resume this waiter with the connection.
        case hand(Connection, to: Waiter)
        case keepIdle
        /// Close the connection; when there is a waiter, resume it with nil: the slot is its to open.
        case close(Connection, slotTo: Waiter?)
    }

    private(set) var idle: [Connection] = []
    private(set) var open = 0
    private var waiters: [(id: Int, waiter: Waiter)] = []
    /// Ids told to wait that have not registered yet, with the failure that came first (their timer
    /// fired, or they were cancelled), if any.
    private var unregistered: [Int: Failure?] = [:]
    private var nextID = 0
    private(set) var closed = false
    let maxConnections: Int

    init(maxConnections: Int) { self.maxConnections = maxConnections }

    var waiting: Int { waiters.count }
    /// Connections handed out now.
    var inUse: Int { open - idle.count }

    mutating func acquire() -> AcquireAction {
        if closed { return .fail(.closed) }
        if let c = idle.popLast() { return .use(c) }
        if open < maxConnections {
            open += 1
            return .create
        }
        nextID += 1
        unregistered[nextID] = .some(nil)
        return .wait(id: nextID)
    }

    mutating func register(_ id: Int, _ waiter: Waiter) -> RegisterAction {
        if case .some(.some(let failure)) = unregistered.removeValue(forKey: id) { return .fail(failure) }
        if closed { return .fail(.closed) }
        waiters.append((id, waiter))
        return .wait
    }

    /// The waiter's timer fired: the waiter to resume with `.timedOut`, if it is still waiting.
    mutating func timedOut(_ id: Int) -> Waiter? { leave(id, .timedOut) }

    /// The waiter's task was cancelled: the waiter to resume with `.cancelled`, if it is still waiting.
    mutating func cancelled(_ id: Int) -> Waiter? { leave(id, .cancelled) }

    private mutating func leave(_ id: Int, _ failure: Failure) -> Waiter? {
        if let i = waiters.firstIndex(where: { $0.id == id }) { return waiters.remove(at: i).waiter }
        // Not registered yet: the registration is answered with the first failure. (A waiter already
        // answered is in neither list, and a late timer or cancel changes nothing.)
        if case .some(.none) = unregistered[id] { unregistered[id] = .some(failure) }
        return nil
    }

    /// A connection comes back; `reusable` when it is healthy with no transaction open.
    mutating func release(_ connection: Connection, reusable: Bool) -> ReleaseAction {
        if closed {
            open -= 1
            return .close(connection, slotTo: nil)
        }
        if reusable {
            if !waiters.isEmpty { return .hand(connection, to: waiters.removeFirst().waiter) }
            idle.append(connection)
            return .keepIdle
        }
        if !waiters.isEmpty { return .close(connection, slotTo: waiters.removeFirst().waiter) }
        open -= 1
        return .close(connection, slotTo: nil)
    }

    /// Opening a connection for a counted slot failed: the slot passes to the first waiter (resume it
    /// with nil, to open one itself), or is given back.
    mutating func createFailed() -> Waiter? {
        if !waiters.isEmpty { return waiters.removeFirst().waiter }
        open -= 1
        return nil
    }

    /// Closes the pool: the idle connections to close and the waiters to fail with `.closed`.
    mutating func close() -> (idle: [Connection], waiters: [Waiter]) {
        closed = true
        defer {
            idle = []
            waiters = []
        }
        open -= idle.count
        return (idle, waiters.map(\.waiter))
    }
}

/// Why a caller got no connection.
enum PoolFailure: Equatable {
    case closed, timedOut, cancelled
}
