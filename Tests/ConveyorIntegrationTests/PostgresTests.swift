import ConveyorPostgres
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
                "SELECT $1::text, $2::int + 1, $3::uuid[], array_length($3::uuid[], 1), $4::text IS NULL, $5::timestamptz",
                [evil, 41, ids, String?.none, Date(timeIntervalSince1970: 1_700_000_000.25)])
            let r = try #require(rows.first)
            #expect(try r.string(0) == evil)
            #expect(try r.int(1) == 42)
            #expect(try r.int(3) == 2)
            #expect(try r.bool(4))
            #expect(try r.date(5).timeIntervalSince1970 == 1_700_000_000.25)
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
                                try await c.query("""
                                    UPDATE jobs SET claimed_by = $1 WHERE id IN (
                                      SELECT id FROM jobs WHERE claimed_by IS NULL ORDER BY id LIMIT 50 FOR UPDATE SKIP LOCKED)
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
            let start = ContinuousClock.now
            let t = Task { try await c.simple("SELECT pg_sleep(20)") }
            try await Task.sleep(for: .milliseconds(300))
            t.cancel()
            await #expect { try await t.value } throws: { e in (e as? PostgresError)?.sqlState == "57014" }
            #expect(ContinuousClock.now - start < .seconds(10))
            // The connection is usable afterwards.
            #expect(try await c.query("SELECT 1").first?.int(0) == 1)
        }
    }

    @Test func poolTimesOutWhenExhausted() async throws {
        try await Servers.withDatabase { url in
            var cfg = PostgresPool.Configuration(url: url)
            cfg.maxConnections = 1
            cfg.acquireTimeout = .milliseconds(200)
            let pool = PostgresPool(configuration: cfg, logger: Servers.logger)
            defer { pool.close() }
            _ = try await pool.withConnection { _ in
                await #expect { try await pool.withConnection { _ in } } throws: { e in
                    (e as? PostgresError)?.code == .poolTimeout
                }
            }
            let n = try await pool.withConnection { c in try await c.query("SELECT 1").count }
            #expect(n == 1)
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
                                if !tally.inUse.withLock({ $0.insert(id).inserted }) { tally.overlaps.withLock { $0 += 1 } }
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
