/// Conveyor's version: `conveyor --version`, `conveyorctl --version`, and CHANGELOG.md's headings.
package enum ConveyorVersion {
    package static let current = "0.10.0"
}
