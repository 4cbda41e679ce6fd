import ConveyorPostgres
import ConveyorStore
import Foundation
import Logging
import Synchronization
import Testing

@Suite("Postgres (libpq, real server)", .enabled(if: Servers.available, Comment(rawValue: Servers.skipMessage)))
struct PostgresTests {
    @Test func boundParametersRoundTrip() async throws {
        try await Servers.withDatabase { url in
            let c = try await PostgresConnection.connect(url: url, logger: Servers.logger)
            let evil = "'); DROP TABLE x; --"
            let ids = [UUID(), UUID()]
            let rows = try await c.query(
                """
                SELECT $1::text, $2::int + 1, $3::uuid[], array_length($3::uuid[], 1), $4::text IS NULL, \
                $5::timestamptz, ($6::uuid[])[1] = $7::uuid AND ($6::uuid[])[2] IS NULL, \
                ($8::timestamptz[])[1] = '2023-11-14 22:13:20.25+00' AND ($8::timestamptz[])[2] IS NULL
                """,
                [
                    evil, 41, ids, String?.none, Date(timeIntervalSince1970: 1_700_000_000.25), [ids[0], nil], ids[0],
                    [Date(timeIntervalSince1970: 1_700_000_000.25), nil],
                ])
            let r = try #require(rows.first)
            #expect(try r.string(0) == evil)
            #expect(try r.int(1) == 42)
            #expect(try r.int(3) == 2)
            #expect(try r.bool(4))
            #expect(try r.date(5).timeIntervalSince1970 == 1_700_000_000.25)
            #expect(try r.bool(6), "a uuid array with a NULL, its elements unquoted")
            #expect(try r.bool(7), "a timestamptz array with a NULL, its elements unquoted")
        }
    }

    /// libpq takes parameters as C strings: a NUL inside one is refused with an error naming the
    /// parameter, never sent cut short (found by the fault suite: a dead letter whose body held
    /// a NUL made its array literal malformed, and blocked the dead-letter queue).
    @Test func aNulByteInAParameterIsRefusedNotTruncated() async throws {
        try await Servers.withDatabase { url in
            let c = try await PostgresConnection.connect(url: url, logger: Servers.logger)
            let values: [any PostgresEncodable] = ["before\0after", ["ok", "a\0b"]]
            for value in values {
                await #expect { try await c.query("SELECT $1::text", [value]) } throws: { e in
                    let e = try #require(e as? PostgresError)
                    return e.description.contains("parameter $1 contains a NUL byte") && !e.isRetriable
                }
            }
            #expect(try await c.query("SELECT $1::text", ["still usable"]).first?.string(0) == "still usable")
        }
    }

    @Test func errorsCarrySQLStateAndRetriability() async throws {
        try await Servers.withDatabase { url in
            let c = try await PostgresConnection.connect(url: url, logger: Servers.logger)
            await #expect { try await c.simple("SELECT * FROM no_such_table") } throws: { e in
                let e = try #require(e as? PostgresError)
                return e.sqlState == "42P01" && !e.isRetriable
            }
            try await c.simple("CREATE TABLE u (k int PRIMARY KEY)")
            try await c.query("INSERT INTO u VALUES ($1)", [1])
            await #expect { try await c.query("INSERT INTO u VALUES ($1)", [1]) } throws: { e in
                (e as? PostgresError)?.isUniqueViolation == true
            }
        }
    }

    @Test func transactionRollsBackOnError() async throws {
        try await Servers.withDatabase { url in
            let pool = PostgresPool(configuration: .init(url: url), logger: Servers.logger)
            defer { pool.close() }
            _ = try await pool.withConnection { try await $0.simple("CREATE TABLE t (v int)") }
            struct Boom: Error {}
            await #expect(throws: Boom.self) {
                try await pool.withTransaction { c in
                    try await c.query("INSERT INTO t VALUES ($1)", [1])
                    throw Boom()
                }
            }
            _ = try await pool.withTransaction { c in try await c.query("INSERT INTO t VALUES ($1)", [2]) }
            let rows = try await pool.withConnection { try await $0.query("SELECT v FROM t") }
            #expect(rows.rows.map { $0[0] } == ["2"])
        }
    }

    @Test func skipLockedClaimsAreDisjointAcrossConnections() async throws {
        try await Servers.withDatabase { url in
            let pool = PostgresPool(configuration: .init(url: url), logger: Servers.logger)
            defer { pool.close() }
            try await pool.withConnection { c in
                try await c.simple("CREATE TABLE jobs (id int PRIMARY KEY, claimed_by text)")
                try await c.simple("INSERT INTO jobs SELECT g, NULL FROM generate_series(1, 1000) g")
            }
            // Two claimers race, each in its own transaction, in batches of 50.
            let claims = try await withThrowingTaskGroup(of: [Int].self) { group in
                for who in ["a", "b"] {
                    group.addTask {
                        var mine: [Int] = []
                        while true {
                            let got = try await pool.withTransaction { c in
                                try await c.query(
                                    """
                                    UPDATE jobs SET claimed_by = $1 WHERE id IN (
                                      SELECT id FROM jobs WHERE claimed_by IS NULL ORDER BY id LIMIT 50 FOR UPDATE SKIP
                                          LOCKED)
                                    RETURNING id
                                    """, [who])
                            }
                            if got.count == 0 { return mine }
                            mine += try got.rows.map { try $0.int(0) }
                        }
                    }
                }
                var all: [[Int]] = []
                for try await c in group { all.append(c) }
                return all
            }
            let flat = claims.flatMap { $0 }
            #expect(flat.count == 1000)
            #expect(Set(flat).count == 1000)
        }
    }

    @Test func cancellingATaskCancelsTheRunningStatement() async throws {
        try await Servers.withDatabase { url in
            let c = try await PostgresConnection.connect(url: url, logger: Servers.logger)
            let watcher = try await PostgresConnection.connect(url: url, logger: Servers.logger)
            let start = ContinuousClock.now
            let t = Task { try await c.simple("SELECT pg_sleep(20)") }
            try await Self.waitUntilRunning("pg_sleep(20)", watcher)
            t.cancel()
            await #expect { try await t.value } throws: { e in (e as? PostgresError)?.sqlState == "57014" }
            #expect(ContinuousClock.now - start < .seconds(10))
            // Still open, but not for a pool to hand on: a late cancel could abort the next statement.
            #expect(try await c.query("SELECT 1").first?.int(0) == 1)
            #expect(!c.isHealthy)
        }
    }

    /// The cancel request may reach the server after the statement it was meant for has ended and
    /// the connection's next caller has begun (in CI it aborted another test's query). So the pool
    /// never hands on a connection that has been sent one.
    @Test func aConnectionSentACancelIsNotHandedToTheNextCaller() async throws {
        try await Servers.withDatabase { url in
            var cfg = PostgresPool.Configuration(url: url)
            cfg.maxConnections = 1
            let pool = PostgresPool(configuration: cfg, logger: Servers.logger)
            defer { pool.close() }
            let watcher = try await PostgresConnection.connect(url: url, logger: Servers.logger)
            let pid = "SELECT pg_backend_pid()"
            let first = try await pool.withConnection { try await $0.query(pid).first?.int(0) }
            let t = Task { try await pool.withConnection { try await $0.simple("SELECT pg_sleep(20)") } }
            try await Self.waitUntilRunning("pg_sleep(20)", watcher)
            t.cancel()
            await #expect { try await t.value } throws: { e in (e as? PostgresError)?.sqlState == "57014" }
            let next = try await pool.withConnection { try await $0.query(pid).first?.int(0) }
            #expect(first != nil && next != nil && first != next, "the cancelled connection was closed, not reused")
        }
    }

    /// A cancel request is a connection of its own that waits for the server to close it. Here the
    /// path to the server accepts that connection and holds it: cancelling the task still returns at
    /// once (the request waits on a dispatch queue, not on the cancelling thread), and the
    /// statement is cancelled once the path forwards again.
    @Test func aCancelRequestThatHangsDoesNotBlockTheTaskThatCancelled() async throws {
        try await Servers.withDatabase { url in
            let port = try #require(url.firstMatch(of: /@[^:\/]+:(\d+)\//).flatMap { Int($0.output.1) })
            let forwarder = try TCPForwarder(upstreamPort: port)
            defer { forwarder.stop() }
            let through = url.replacingOccurrences(of: ":\(port)/", with: ":\(forwarder.port)/")
            let c = try await PostgresConnection.connect(url: through, logger: Servers.logger)
            let watcher = try await PostgresConnection.connect(url: url, logger: Servers.logger)
            let t = Task { try await c.simple("SELECT pg_sleep(20)") }
            try await Self.waitUntilRunning("pg_sleep(20)", watcher)
            forwarder.hold()
            // Cancelled from a thread of its own, so a cancel() that blocks fails the test, not hangs it.
            let returned = DispatchSemaphore(value: 0)
            DispatchQueue.global().async {
                t.cancel()
                returned.signal()
            }
            let inTime = await withCheckedContinuation { done in
                DispatchQueue.global().async { done.resume(returning: returned.wait(timeout: .now() + 2) == .success) }
            }
            #expect(inTime, "cancel() returned within 2 s while the request hangs")
            // The held request gives up when its connection closes; the next one is forwarded.
            forwarder.release()
            let ended = try await System.poll(timeout: .seconds(10)) {
                c.sendCancel()
                return try await watcher.query(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' AND state = 'active'"
                ).first?.int(0) == 0
            }
            #expect(ended, "the statement was cancelled once the path forwarded again")
            await #expect { try await t.value } throws: { e in (e as? PostgresError)?.sqlState == "57014" }
        }
    }

    /// Waits (bounded) until `pg_stat_activity` shows `SELECT <what>` running.
    static func waitUntilRunning(_ what: String, _ watcher: PostgresConnection) async throws {
        let running = try await System.poll(timeout: .seconds(10)) {
            try await watcher.query(
                "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'", ["SELECT \(what)"]
            ).first?.int(0) == 1
        }
        try #require(running, "SELECT \(what) is running")
    }

    /// Runs `body` with a pool of one connection on a fresh database.
    static func withOneConnectionPool(
        acquireTimeout: Duration, _ body: (PostgresPool) async throws -> Void
    ) async throws {
        try await Servers.withDatabase { url in
            var cfg = PostgresPool.Configuration(url: url)
            cfg.maxConnections = 1
            cfg.acquireTimeout = acquireTimeout
            let pool = PostgresPool(configuration: cfg, logger: Servers.logger)
            defer { pool.close() }
            try await body(pool)
        }
    }

    @Test func poolTimesOutWhenExhausted() async throws {
        try await Self.withOneConnectionPool(acquireTimeout: .milliseconds(200)) { pool in
            _ = try await pool.withConnection { _ in
                await #expect { try await pool.withConnection { _ in } } throws: { e in
                    (e as? PostgresError)?.code == .poolTimeout
                }
            }
            let n = try await pool.withConnection { c in try await c.query("SELECT 1").count }
            #expect(n == 1)
        }
    }

    /// A caller cancelled while it waits for a connection stops waiting at once, with a cancellation
    /// (not a pool timeout, 30 s later), and the connection then goes to no one who left.
    @Test func aCancelledWaiterStopsWaitingAtOnce() async throws {
        try await Self.withOneConnectionPool(acquireTimeout: .seconds(30)) { pool in
            try await pool.withConnection { _ in
                let waiter = Task { try await pool.withConnection { _ in } }
                let waiting = try await System.poll(timeout: .seconds(10)) { pool.usage.waiting == 1 }
                #expect(waiting, "it waits")
                waiter.cancel()
                await #expect(throws: CancellationError.self) { try await waiter.value }
                #expect(pool.usage.waiting == 0)
            }
            #expect(pool.usage.idle == 1, "the connection came back to the pool, not to the cancelled waiter")
        }
    }

    @Test func thePoolNeverHandsOneConnectionToTwoCallers() async throws {
        try await Servers.withDatabase { url in
            var cfg = PostgresPool.Configuration(url: url)
            cfg.maxConnections = 3
            cfg.acquireTimeout = .milliseconds(50)
            let pool = PostgresPool(configuration: cfg, logger: Servers.logger)
            defer { pool.close() }
            final class Tally: Sendable {
                let inUse = Mutex<Set<ObjectIdentifier>>([])
                let overlaps = Mutex(0)
                let timeouts = Mutex(0)
            }
            let tally = Tally()
            await withTaskGroup(of: Void.self) { g in
                for i in 0..<300 {
                    g.addTask {
                        do {
                            try await pool.withConnection { c in
                                let id = ObjectIdentifier(c)
                                if !tally.inUse.withLock({ $0.insert(id).inserted }) {
                                    tally.overlaps.withLock { $0 += 1 }
                                }
                                try await c.query("SELECT pg_sleep($1)", [Double(i % 4) / 1000])
                                tally.inUse.withLock { _ = $0.remove(id) }
                            }
                        } catch let e as PostgresError where e.code == .poolTimeout {
                            tally.timeouts.withLock { $0 += 1 }
                        } catch {
                            Issue.record("unexpected \(error)")
                        }
                    }
                }
            }
            #expect(tally.overlaps.withLock { $0 } == 0)
            #expect(pool.usage.open <= 3)
            let after = try await pool.withConnection { c in try await c.query("SELECT 1").count }
            #expect(after == 1, "the pool still works after timeouts: \(tally.timeouts.withLock { $0 }) timed out")
        }
    }

    /// The server ends every session idle for 100 ms, so each LISTEN session is lost soon after it
    /// starts: every reconnect after such a loss waits its backoff first.
    @Test func aListenerWhoseSessionsKeepEndingBacksOffBeforeEachReconnect() async throws {
        try await Servers.withDatabase { url in
            let listener = PostgresListener(
                url: url + (url.contains("?") ? "&" : "?") + "options=-c%20idle_session_timeout%3D100",
                channels: ["conveyor_due"], retry: .init(base: .milliseconds(20), cap: .seconds(30)),
                logger: Servers.logger)
            let sessions = await Self.listening(listener) {
                var sessions = 0
                for await note in listener.notifications where note == "reconnected" {
                    sessions += 1
                    if sessions == 3 { break }
                }
                return sessions
            }
            #expect(sessions == 3, "three LISTEN sessions within 30 s")
            #expect(listener.backoffWaits >= 2, "a backoff before each reconnect: \(listener.backoffWaits)")
        }
    }

    /// Starts `listener`, runs `body`, then stops it. The listener is stopped after `limit` at the
    /// latest, which ends its notifications: a bound on `body`, not a synchronisation.
    static func listening<T>(
        _ listener: PostgresListener, within limit: Duration = .seconds(30), _ body: () async throws -> T
    ) async rethrows -> T {
        listener.start()
        defer { listener.stop() }
        let watchdog = Task {
            try? await Task.sleep(for: limit)
            listener.stop()
        }
        defer { watchdog.cancel() }
        return try await body()
    }

    /// Issue 25: a libpq multi-host URL (a primary and its standbys), whose first host never
    /// answers, with `target_session_attrs=read-write`: migrations, the pool and LISTEN all reach
    /// the writable host. (The fault suite's cluster scenario does this through a real promotion.)
    @Test func aMultiHostURLReachesTheWritableHost() async throws {
        try await Servers.withDatabase { url in
            let hosts = try #require(url.firstRange(of: "@")).upperBound
            var multi = url
            multi.insert(contentsOf: "127.0.0.1:1,", at: hosts)
            multi += (multi.contains("?") ? "&" : "?") + "target_session_attrs=read-write&connect_timeout=5"
            #expect(multi.contains("@127.0.0.1:1,127.0.0.1:"))
            let pool = PostgresPool(configuration: .init(url: multi), logger: Servers.logger)
            defer { pool.close() }
            try await Migrator(logger: Servers.logger).migrate(pool)
            let writable = try await pool.withConnection { c in
                try await c.query("SELECT NOT pg_is_in_recovery(), count(*) FROM schema_migrations").rows.first
            }
            #expect(writable?[0] == "t")
            #expect(Int(writable?[1] ?? "") ?? 0 > 10)
            let listener = PostgresListener(url: multi, channels: ["conveyor_due"], logger: Servers.logger)
            let heard = try await Self.listening(listener) {
                for await note in listener.notifications {
                    if note == "reconnected" {
                        try await pool.withConnection { c in _ = try await c.simple("NOTIFY conveyor_due") }
                    } else if note == "conveyor_due" {
                        return true
                    }
                }
                return false
            }
            #expect(heard, "the listener on the multi-host URL heard the NOTIFY within 30 s")
        }
    }

    /// A listener waiting out a long backoff (nothing listens on port 1) stops at once.
    @Test func stoppingAListenerEndsItsBackoffWaitAtOnce() async throws {
        let listener = PostgresListener(
            url: "postgresql://conveyor@127.0.0.1:1/none", channels: ["conveyor_due"],
            retry: .init(base: .seconds(600), cap: .seconds(600)), logger: Servers.logger)
        listener.start()
        let inBackoff = try await System.poll(timeout: .seconds(20)) { listener.backoffWaits >= 1 }
        try #require(inBackoff, "the listener never began its backoff wait")
        listener.stop()
        let ended = await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                for await _ in listener.notifications {}
                return true
            }
            group.addTask {
                try? await Task.sleep(for: .seconds(10))
                return false
            }
            let first = await group.next() ?? false
            group.cancelAll()
            return first
        }
        #expect(ended, "the listener ended within 10 s of stop(), not after its backoff")
    }

    @Test func connectRetryGivesUpWithARedactedURL() async throws {
        var cfg = PostgresPool.Configuration(url: "postgresql://conveyor:s3cret@127.0.0.1:1/none")
        cfg.connectRetryFor = .milliseconds(300)
        let pool = PostgresPool(configuration: cfg, logger: Servers.logger)
        await #expect { try await pool.waitUntilReachable() } throws: { e in
            let text = "\(e)"
            return text.contains("127.0.0.1:1") && !text.contains("s3cret") && text.contains("***")
        }
    }
}
