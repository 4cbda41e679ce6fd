import ConveyorCore
import ConveyorDispatcher
import ConveyorPostgres
import ConveyorStore
import Foundation
import ServiceLifecycle
import Testing

/// The `dispatched` mark waits a moment after the broker's confirm (`DispatchMarks`): a run its
/// worker reports on first never gets the mark's row version; a run still waiting in the broker
/// gets it, dated from its confirm; a stopping dispatcher marks what is pending before it returns.
@Suite(
    "The deferred dispatch mark (real PostgreSQL and RabbitMQ)",
    .enabled(if: Servers.available, Comment(rawValue: Servers.skipMessage)), .serialized)
struct DispatchMarkTests {
    /// Every change of a run's state, as PostgreSQL saw it, with the time it was written.
    static func watchStates(_ sys: System) async throws {
        _ = try await sys.pool.withConnection { c in
            try await c.simple(
                """
                CREATE TABLE test_states_seen (run_id uuid, state text, at timestamptz DEFAULT clock_timestamp());
                CREATE FUNCTION test_note_state() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state THEN
                        INSERT INTO test_states_seen (run_id, state) VALUES (NEW.id, NEW.state);
                    END IF;
                    RETURN NEW;
                END $$;
                CREATE TRIGGER test_note_state AFTER INSERT OR UPDATE ON runs FOR EACH ROW
                    EXECUTE FUNCTION test_note_state();
                """)
        }
    }

    @Test func aRunReportedOnBeforeItsMarkGoesFromQueuedStraightToItsOutcome() async throws {
        try await System.with { sys in
            try await Self.watchStates(sys)
            let recorder = Recorder()
            let dispatcher = sys.dispatcher()
            let worker = sys.worker(["record": RecordingExecutor(recorder: recorder)])
            try await withServices([dispatcher, worker]) {
                try await sys.store.createTasks(sys.tasks(50))
                try await sys.eventually("50 runs succeeded") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 50
                }
            }
            #expect(dispatcher.stats.published == 50)
            #expect(try await sys.count("SELECT count(*) FROM test_states_seen WHERE state = 'queued'") == 50)
            // The worker finished each run within milliseconds of its confirm, long before its mark
            // was due (a second): no run was ever written `dispatched`.
            #expect(try await sys.count("SELECT count(*) FROM test_states_seen WHERE state = 'dispatched'") == 0)
            #expect(try await sys.count("SELECT count(*) FROM runs WHERE dispatched_at IS NULL") == 0)
            // Dated from the run's start as its worker reported it: never after it started.
            #expect(try await sys.count("SELECT count(*) FROM runs WHERE dispatched_at > started_at") == 0)
        }
    }

    @Test func aRunWaitingInTheBrokerIsMarkedDatedFromItsConfirmAndAStopMarksTheRestAtOnce() async throws {
        try await System.with { sys in
            try await Self.watchStates(sys)
            let dispatcher = sys.dispatcher()  // no worker: every run waits in the broker
            let group = ServiceGroup(configuration: .init(services: [dispatcher], logger: Servers.logger))
            let running = Task { try await group.run() }
            try await sys.store.createTasks(sys.tasks(20, name: "first"))
            try await sys.eventually("20 runs marked dispatched") {
                try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 20
            }
            // Each mark was written at least the mark's delay (a quarter of the 30 s lease, at most
            // 1 s) after the confirm it is dated from, and it carries the start deadline from then.
            #expect(
                try await sys.count(
                    """
                    SELECT count(*) FROM runs r JOIN test_states_seen s ON s.run_id = r.id AND s.state = 'dispatched'
                    WHERE s.at - r.dispatched_at >= interval '1 second' AND r.dispatched_at > r.created_at
                      AND r.deadline_at BETWEEN r.dispatched_at + interval '3629 seconds'
                                            AND r.dispatched_at + interval '3631 seconds'
                    """) == 20)
            try await sys.store.createTasks(sys.tasks(20, name: "second"))
            try await sys.eventually("40 runs published") { dispatcher.stats.published == 40 }
            await group.triggerGracefulShutdown()
            try await running.value
            // Published a moment ago, so not due for their marks yet: the stop marked them.
            #expect(try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 40)
        }
    }
}
