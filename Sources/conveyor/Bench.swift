import ArgumentParser
import Foundation
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Measure end-to-end throughput and lateness.")
    func run() async throws {}
}
