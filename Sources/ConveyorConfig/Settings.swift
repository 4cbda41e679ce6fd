public import Configuration
public import ConveyorCore
public import Foundation
import SystemPackage

/// Configuration read from one YAML file, where every key can be overridden by an environment
/// variable: key `worker.concurrency` ← `CONVEYOR_WORKER_CONCURRENCY`. Lists in the environment
/// are comma-separated.
///
/// A key that is absent takes its default. A key that is present but wrong is an error naming
/// the file, the key, the environment variable, the value and the fix: never a silent default.
public struct Settings: Sendable {
    public let reader: ConfigReader
    /// The file it came from, for error messages.
    public let source: String

    public init(reader: ConfigReader, source: String) {
        self.reader = reader
        self.source = source
    }

    /// Environment first, then the file (missing file allowed when `required` is false).
    public static func load(
        file: String?, required: Bool = false,
        environment: [String: String] = ProcessInfo.processInfo.environment
    ) async throws -> Settings {
        var providers: [any ConfigProvider] = [
            EnvironmentVariablesProvider(environmentVariables: environment).prefixKeys(with: "conveyor")
        ]
        if let file {
            if required && !FileManager.default.fileExists(atPath: file) {
                throw ValidationError(
                    field: "config file", value: file,
                    hint:
                        "the file does not exist: pass an existing YAML file, or omit the flag to use config/ defaults")
            }
            do {
                providers.append(try await FileProvider<YAMLSnapshot>(filePath: FilePath(file), allowMissing: true))
            } catch {
                throw ValidationError(
                    field: "config file", value: file, hint: "not valid YAML (\(error)); fix the syntax")
            }
        }
        return Settings(reader: ConfigReader(providers: providers), source: file ?? "environment")
    }

    /// A reader of the keys under `prefix` (for example `executors.echo`).
    public func scoped(_ prefix: String) -> Settings {
        Settings(reader: reader.scoped(to: ConfigKey(prefix)), source: source)
    }

    /// The environment variable that overrides `key` (relative to the root).
    public static func environmentName(_ key: String) -> String {
        "CONVEYOR_" + key.uppercased().replacingOccurrences(of: ".", with: "_")
    }

    /// An error for `key` naming the file, the env variable and the value found.
    public func bad(_ key: String, _ hint: String) -> ValidationError {
        let raw = reader.string(forKey: ConfigKey(key)) ?? "(not readable as text)"
        return ValidationError(field: "\(source): \(key) (env \(Self.environmentName(key)))", value: raw, hint: hint)
    }

    private func read<T>(_ key: String, hint: String, _ get: () throws -> T) throws(ValidationError) -> T? {
        do {
            return try get()
        } catch {
            if "\(error)".hasPrefix("Missing required config value") { return nil }
            throw bad(key, hint)
        }
    }

    public func string(_ key: String, default d: String) throws(ValidationError) -> String {
        try read(key, hint: "must be text") { try reader.requiredString(forKey: ConfigKey(key)) } ?? d
    }

    public func optionalString(_ key: String) throws(ValidationError) -> String? {
        try read(key, hint: "must be text") { try reader.requiredString(forKey: ConfigKey(key)) }
    }

    public func int(_ key: String, default d: Int, range: ClosedRange<Int>) throws(ValidationError) -> Int {
        let hint = "must be a whole number from \(range.lowerBound) to \(range.upperBound)"
        let v = try read(key, hint: hint) { try reader.requiredInt(forKey: ConfigKey(key)) } ?? d
        guard range.contains(v) else { throw bad(key, hint) }
        return v
    }

    public func double(_ key: String, default d: Double, range: ClosedRange<Double>) throws(ValidationError) -> Double {
        let hint = "must be a number from \(range.lowerBound) to \(range.upperBound)"
        let asInt: Int?? = try? read(key, hint: hint) { try reader.requiredInt(forKey: ConfigKey(key)) }
        let v: Double
        if case .some(.some(let i)) = asInt {
            v = Double(i)
        } else {
            v = try read(key, hint: hint) { try reader.requiredDouble(forKey: ConfigKey(key)) } ?? d
        }
        guard range.contains(v) else { throw bad(key, hint) }
        return v
    }

    public func bool(_ key: String, default d: Bool) throws(ValidationError) -> Bool {
        try read(key, hint: "must be true or false") { try reader.requiredBool(forKey: ConfigKey(key)) } ?? d
    }

    public func strings(_ key: String, default d: [String]) throws(ValidationError) -> [String] {
        try read(key, hint: "must be a list of text values (in the environment: comma-separated)") {
            try reader.requiredStringArray(forKey: ConfigKey(key))
        } ?? d
    }

    /// Milliseconds as a `Duration`.
    public func milliseconds(_ key: String, default d: Int, range: ClosedRange<Int>) throws(ValidationError) -> Duration
    {
        .milliseconds(try int(key, default: d, range: range))
    }
}
