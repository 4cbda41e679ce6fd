import ConveyorAPI
import ConveyorCore
import ConveyorDispatcher
import ConveyorStore
import Foundation
import Testing

/// Issue 23 item 6: upgrades are one `kubectl apply`. A new version's pods may start before its
/// migrate Job has run; they wait for the schema they need, and readiness says why.
@Suite("Upgrades (real PostgreSQL and RabbitMQ)", .serialized)
struct UpgradeTests {
    /// With the last migration unrecorded, the API's `/readyz` answers 503 naming it and the
    /// dispatcher connects nothing and makes no run; once the migration is there, both go on.
    @Test func processesWaitForTheSchemaTheyNeed() async throws {
        try await System.with { sys in
            let last = try #require(try Migrator(logger: Servers.logger).migrations.last?.version)
            _ = try await sys.rows("DELETE FROM schema_migrations WHERE version = '\(last)' RETURNING version")
            try await sys.store.createTasks(sys.tasks(1))
            try await APITests.withAPI(sys) { api, _ in
                let waiting = try await api.call("GET", "/readyz")
                #expect(waiting.status == 503, "\(waiting.json)")
                #expect(waiting.json["detail"]?.stringValue?.contains(last) == true, "\(waiting.json)")
                let dispatcher = sys.dispatcher()
                try await withServices([dispatcher]) {
                    let waited1 = try await sys.eventually(timeout: .seconds(20), "the dispatcher looked twice") {
                        dispatcher.stats.schemaWaits >= 2
                    }
                    try #require(waited1)
                    #expect(!dispatcher.isReady)
                    #expect(try await sys.count("SELECT count(*) FROM runs") == 0, "no run made on an old schema")
                    // `conveyor migrate` records it (its objects are still there).
                    _ = try await sys.rows(
                        "INSERT INTO schema_migrations (version) VALUES ('\(last)') RETURNING version")
                    let waited2 = try await sys.eventually(timeout: .seconds(20), "the run is dispatched") {
                        try await sys.count("SELECT count(*) FROM runs WHERE state = 'dispatched'") == 1
                    }
                    try #require(waited2)
                    #expect(dispatcher.isReady)
                }
                let waited3 = try await sys.eventually(timeout: .seconds(10), "the API is ready") {
                    try await api.call("GET", "/readyz").status == 200
                }
                try #require(waited3)
            }
        }
    }
}
