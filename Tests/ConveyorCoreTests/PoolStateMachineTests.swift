import Testing

@testable import ConveyorPostgres

/// The pool's bookkeeping without a server: connections are strings, waiters are names.
@Suite("Pool state machine")
struct PoolStateMachineTests {
    typealias Machine = PoolStateMachine<String, String>

    /// A machine of `size` slots, all handed out.
    func full(_ size: Int) -> Machine {
        var m = Machine(maxConnections: size)
        for _ in 0..<size {
            guard case .create = m.acquire() else {
                Issue.record("a free slot is opened")
                return m
            }
        }
        return m
    }

    func waitID(_ action: Machine.AcquireAction) -> Int? {
        if case .wait(let id) = action { return id }
        return nil
    }

    @Test func aWaiterCancelledBeforeItsTimerFiresLeavesAndItsTimerChangesNothing() throws {
        var m = full(1)
        let id = try #require(waitID(m.acquire()))
        guard case .wait = m.register(id, "a") else {
            Issue.record("a waits")
            return
        }
        #expect(m.cancelled(id) == "a", "the cancelled waiter is resumed")
        #expect(m.waiting == 0)
        #expect(m.timedOut(id) == nil, "its timer, firing later, finds no one")
        guard case .keepIdle = m.release("c1", reusable: true) else {
            Issue.record("the connection goes idle: no one is waiting")
            return
        }
        #expect(m.idle == ["c1"] && m.open == 1)
    }

    @Test func aTimerThatFiresBeforeTheWaiterRegistersFailsTheRegistrationAtOnce() throws {
        var m = full(1)
        let id = try #require(waitID(m.acquire()))
        #expect(m.timedOut(id) == nil, "nothing to resume yet")
        guard case .fail(.timedOut) = m.register(id, "a") else {
            Issue.record("the late registration is answered with the timeout, not left waiting")
            return
        }
        #expect(m.waiting == 0)
        // So is a cancellation that comes first.
        let other = try #require(waitID(m.acquire()))
        _ = m.cancelled(other)
        guard case .fail(.cancelled) = m.register(other, "b") else {
            Issue.record("a waiter cancelled before it registered does not wait")
            return
        }
        // A timer firing after the cancel keeps the first answer.
        let third = try #require(waitID(m.acquire()))
        _ = m.cancelled(third)
        _ = m.timedOut(third)
        guard case .fail(.cancelled) = m.register(third, "c") else {
            Issue.record("the first failure is the answer")
            return
        }
    }

    @Test func closingWhileWaitersWaitFailsThemAndClosesWhatComesBack() throws {
        var m = full(2)
        let a = try #require(waitID(m.acquire()))
        let b = try #require(waitID(m.acquire()))
        guard case .wait = m.register(a, "a"), case .wait = m.register(b, "b") else {
            Issue.record("both wait")
            return
        }
        let late = try #require(waitID(m.acquire()))
        let (idle, waiters) = m.close()
        #expect(idle.isEmpty && waiters == ["a", "b"], "both waiters are failed")
        guard case .fail(.closed) = m.register(late, "late") else {
            Issue.record("a waiter registering after the close does not wait")
            return
        }
        guard case .close("c1", slotTo: nil) = m.release("c1", reusable: true) else {
            Issue.record("a connection coming back after the close is closed")
            return
        }
        guard case .fail(.closed) = m.acquire() else {
            Issue.record("a closed pool hands nothing out")
            return
        }
        #expect(m.open == 1)
    }

    @Test func connectionsGoToWaitersInOrderAndABrokenOnePassesItsSlot() throws {
        var m = full(1)
        let a = try #require(waitID(m.acquire()))
        let b = try #require(waitID(m.acquire()))
        _ = m.register(a, "a")
        _ = m.register(b, "b")
        guard case .hand("c1", to: "a") = m.release("c1", reusable: true) else {
            Issue.record("the first waiter gets the connection")
            return
        }
        guard case .close("c1", slotTo: "b") = m.release("c1", reusable: false) else {
            Issue.record("a broken connection is closed and its slot goes to the next waiter")
            return
        }
        #expect(m.open == 1, "the slot stays counted for b to open")
        #expect(m.createFailed() == nil, "b's open failed: the slot is given back")
        #expect(m.open == 0)
        guard case .create = m.acquire() else {
            Issue.record("the free slot is opened again")
            return
        }
    }
}
