import ArgumentParser
import ConveyorCore
import ConveyorPostgres
import ConveyorStore
import Foundation

/// Plain aligned columns for people.
enum Table {
    static func print(_ header: [String], _ rows: [[String]]) { Swift.print(TextTable.render(header, rows)) }
}

extension CommonOptions {
    /// Runs `body` with a one-connection store (admin commands), closing it afterwards.
    func withStore<T: Sendable>(_ body: (Store) async throws -> T) async throws -> T {
        let logger = try logger("conveyor.task")
        let c = try Connections(settings: try await settings("dispatcher.yaml"), poolSize: 1)
        let pool = c.pool(logger: logger, connectRetryFor: .seconds(5))
        defer { pool.close() }
        return try await body(Store(pool: pool))
    }
}
