import ConveyorCore
import ConveyorDispatcher
import ConveyorStore
import Foundation
import Testing

/// Due tasks over a queue's backlog bound wait for room as tasks (docs/architecture.md, "Due tasks
/// wait for room as tasks"), on the real servers.
@Suite(
    "Due tasks wait for room as tasks (real PostgreSQL and RabbitMQ)",
    .enabled(if: Servers.available, Comment(rawValue: Servers.skipMessage)), .serialized)
struct DueWaitTests {
    /// With no worker, a queue's backlog fills at the bound and stays full. The due tasks over it
    /// make no run (before, each became a `scheduled` run, to be rewritten `queued` later), are
    /// counted as waiting, and once a worker drains the queue every task runs exactly once.
    @Test func dueTasksOverTheBoundMakeNoRunUntilTheQueueHasRoom() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher {
                $0.maxBacklogPerQueue = 4
                $0.groups = 2
            }
            try await withServices([dispatcher]) {
                try await sys.store.createTasks(sys.tasks(20))
                let filled = try await sys.eventually(timeout: .seconds(20), "the backlog fills to its bound") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state IN ('queued', 'dispatched')") == 4
                }
                try #require(filled)
                let scans = dispatcher.stats.scans
                let scanned = try await sys.eventually(timeout: .seconds(20), "five more scans") {
                    dispatcher.stats.scans >= scans + 5
                }
                try #require(scanned)
                #expect(try await sys.count("SELECT count(*) FROM runs") == 4, "no run past the bound")
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE next_run_at <= now()") == 16)
                let stats = try await sys.store.queueStats(namespace: nil)
                #expect(stats.first?.waiting == 16 && stats.first?.backlog == 4, "\(stats)")
            }
            let recorder = Recorder()
            let worker = sys.worker(["record": RecordingExecutor(recorder: recorder)], concurrency: 2)
            try await withServices([sys.dispatcher { $0.maxBacklogPerQueue = 4 }, worker]) {
                let done = try await sys.eventually(timeout: .seconds(30), "all twenty succeed") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 20
                }
                try #require(done)
            }
            #expect(try await sys.count("SELECT count(*) FROM runs") == 20, "one run per task")
            #expect(try await sys.count("SELECT count(DISTINCT task_id) FROM runs") == 20)
        }
    }

    /// A due task does not wait as a task past half the misfire grace: it becomes a `scheduled`
    /// run, so it is never judged missed however long its queue stays paused, and it runs once
    /// the queue is resumed.
    @Test func aTaskWaitingForRoomBecomesARunBeforeItCouldBeMissed() async throws {
        try await System.with { sys in
            #expect(try await sys.store.pauseQueue(sys.queue, by: "test"))
            let recorder = Recorder()
            let dispatcher = sys.dispatcher { $0.misfireGrace = .seconds(2) }
            let worker = sys.worker(["record": RecordingExecutor(recorder: recorder)])
            try await withServices([dispatcher, worker]) {
                var tasks = sys.tasks(3)
                for i in tasks.indices { tasks[i].misfire = .skip }
                try await sys.store.createTasks(tasks)
                let made = try await sys.eventually(timeout: .seconds(20), "three scheduled runs") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'scheduled'") == 3
                }
                try #require(made)
                #expect(try await sys.count("SELECT coalesce(sum(skipped_occurrences), 0) FROM tasks") == 0)
                #expect(dispatcher.stats.published == 0)
                #expect(try await sys.store.resumeQueue(sys.queue))
                let ran = try await sys.eventually(timeout: .seconds(20), "all three succeed once resumed") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state = 'succeeded'") == 3
                }
                try #require(ran)
            }
        }
    }

    /// The dispatcher walks the due tasks from where its last walk stopped. A task created due
    /// in the past sorts before that point: its NOTIFY makes the dispatcher forget the point, so
    /// the task is published at once, not after the positions' 10 s of trust.
    @Test func aTaskDueInThePastIsFoundWhileAnotherQueueWaits() async throws {
        try await System.with { sys in
            let dispatcher = sys.dispatcher {
                $0.maxBacklogPerQueue = 2
                $0.queues = [sys.queue, "other"]
            }
            try await withServices([dispatcher]) {
                try await sys.store.createTasks(sys.tasks(10))
                let filled = try await sys.eventually(timeout: .seconds(20), "the backlog fills to its bound") {
                    try await sys.count("SELECT count(*) FROM runs WHERE state IN ('queued', 'dispatched')") == 2
                }
                try #require(filled)
                let waits = dispatcher.stats.idleWaits
                let idle = try await sys.eventually(timeout: .seconds(20), "ticks that find nothing to move") {
                    dispatcher.stats.idleWaits >= waits + 2
                }
                try #require(idle)
                var late = NewTask(name: "late", executor: "record", schedule: .once)
                late.queue = "other"
                late.startAt = Date().addingTimeInterval(-10)  // before the walk's end, not yet half the grace old
                let published = dispatcher.stats.published
                let created = ContinuousClock.now
                try await sys.store.createTasks([late])
                let found = try await sys.eventually(timeout: .seconds(20), "the late task is published") {
                    dispatcher.stats.published > published
                }
                try #require(found)
                #expect(ContinuousClock.now - created < .seconds(5), "found by its NOTIFY, not the 10 s refresh")
                #expect(
                    try await sys.count(
                        "SELECT count(*) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.name = 'late'") == 1)
            }
        }
    }

    /// The walk reads due tasks in due order, but a queue's room goes to the highest priority
    /// among them: with room for one, a `high` task due after a `low` one takes it, and the `low`
    /// one waits as a task.
    @Test func theRoomFoundByAWalkGoesToTheHighestPriority() async throws {
        try await System.with { sys in
            var (low, high) = (sys.tasks(1, name: "low")[0], sys.tasks(1, name: "high")[0])
            low.priority = .low
            low.startAt = Date().addingTimeInterval(-6)  // due first, not yet half the misfire grace old
            high.priority = .high
            high.startAt = Date().addingTimeInterval(-3)
            try await sys.store.createTasks([low, high])
            let dispatcher = sys.dispatcher {
                $0.maxBacklogPerQueue = 1
                $0.groups = 1
            }
            try await withServices([dispatcher]) {
                let published = try await sys.eventually(timeout: .seconds(20), "one run published") {
                    dispatcher.stats.published >= 1
                }
                try #require(published)
                let scans = dispatcher.stats.scans
                let scanned = try await sys.eventually(timeout: .seconds(20), "three more scans") {
                    dispatcher.stats.scans >= scans + 3
                }
                try #require(scanned)
                let names = try await sys.rows("SELECT t.name FROM runs r JOIN tasks t ON t.id = r.task_id")
                    .map { $0[0] }
                #expect(names == ["high-0"], "the room went to \(names)")
                #expect(
                    try await sys.count("SELECT count(*) FROM tasks WHERE name = 'low-0' AND next_run_at <= now()") == 1
                )
            }
        }
    }
}
