import ConveyorAPI
import ConveyorCore
import ConveyorStore
import Foundation
import Testing

/// `conveyorctl`, the separate client binary, against the real API and database.
@Suite("conveyorctl (real processes)", .serialized)
struct CtlTests {
    /// Runs `conveyorctl <args>`; returns its exit status, standard output and error.
    static func ctl(_ args: [String], env: [String: String], stdin: String? = nil) throws -> (status: Int32, out: String, err: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try conveyorBinary("conveyorctl"))
        p.arguments = args
        var e = ProcessInfo.processInfo.environment
        e.removeValue(forKey: "CONVEYOR_API_KEY")
        e.removeValue(forKey: "CONVEYOR_URL")
        e["HOME"] = NSTemporaryDirectory()
        for (k, v) in env { e[k] = v }
        p.environment = e
        let out = Pipe(), err = Pipe(), input = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = input
        try p.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try input.fileHandleForWriting.close()
        let o = out.fileHandleForReading.readDataToEndOfFile(), r = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: r, as: UTF8.self))
    }

    @Test func submitsListsTriggersAndManagesKeysWithErrorsThatSayWhatToDo() async throws {
        try await System.with { sys in
            try await APITests.withAPI(sys) { api, _ in
                let admin = try await APITests.key(sys, role: .admin, namespace: "default")
                let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ctl-\(UUID())")
                try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
                defer { try? FileManager.default.removeItem(at: dir) }
                let keyFile = dir.appendingPathComponent("key").path
                try admin.write(toFile: keyFile, atomically: true, encoding: .utf8)
                let env = ["CONVEYOR_URL": api.base]

                // 1,200 tasks from one YAML file, in batches of 500.
                var yaml = "tasks:\n"
                for i in 0..<1200 { yaml += "  - {name: t-\(String(format: "%04d", i)), executor: noop, schedule: manual, group: bulk}\n" }
                let file = dir.appendingPathComponent("tasks.yaml").path
                try yaml.write(toFile: file, atomically: true, encoding: .utf8)
                let submit = try Self.ctl(["task", "submit", "-f", file, "--key-file", keyFile], env: env)
                #expect(submit.status == 0, "\(submit.err)")
                #expect(submit.out.hasPrefix("submitted 1200 tasks in 3 batches"), "\(submit.out)")
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE group_name = 'bulk'") == 1200)
                #expect(try await sys.count("SELECT count(DISTINCT batch_id) FROM tasks") == 3)

                let keyEnv = env.merging(["CONVEYOR_API_KEY": admin]) { a, _ in a }
                let list = try Self.ctl(["task", "list", "--prefix", "t-000", "--json"], env: keyEnv)
                #expect(list.status == 0, "\(list.err)")
                let listed = try JSONDecoder().decode(JSONValue.self, from: Data(list.out.utf8))
                #expect(listed["tasks"]?.arrayValue?.count == 10)
                let all = try Self.ctl(["task", "list", "--group", "bulk", "--limit", "100", "--all", "--json"], env: keyEnv)
                #expect(try JSONDecoder().decode(JSONValue.self, from: Data(all.out.utf8))["tasks"]?.arrayValue?.count == 1200, "--all follows every page")
                let table = try Self.ctl(["task", "list", "--prefix", "t-0001"], env: keyEnv)
                #expect(table.out.split(separator: "\n").first?.hasPrefix("NAME") == true && table.out.contains("t-0001"), "\(table.out)")

                #expect(try Self.ctl(["task", "trigger", "t-0001"], env: keyEnv).out == "triggered t-0001\n")
                #expect(try Self.ctl(["task", "pause", "t-0002"], env: keyEnv).status == 0)
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE name = 't-0002' AND paused") == 1)
                #expect(try Self.ctl(["group", "get", "bulk", "--json"], env: keyEnv).out.contains("\"paused_tasks\":1"))
                #expect(try Self.ctl(["group", "pause", "bulk"], env: keyEnv).out == "paused 1199 tasks of bulk\n")
                #expect(try Self.ctl(["group", "resume", "bulk"], env: keyEnv).out == "resumed 1200 tasks of bulk\n")
                #expect(try Self.ctl(["group", "cancel", "bulk"], env: keyEnv).out.hasPrefix("cancelled "))
                let cancel = try Self.ctl(["run", "cancel", UUID().uuidString], env: keyEnv)
                #expect(cancel.status != 0 && cancel.err.contains("no run"), "\(cancel.err)")
                #expect(try Self.ctl(["task", "get", "t-0001"], env: keyEnv).out.contains("recent runs:"))
                #expect(try Self.ctl(["task", "delete", "t-0003"], env: keyEnv).status == 0)
                #expect(try Self.ctl(["run", "list", "--json"], env: keyEnv).status == 0)
                // Workers are the fleet's: an admin of one namespace is refused, naming the rule;
                // a viewer key for every namespace lists them.
                let refused = try Self.ctl(["worker", "list"], env: keyEnv)
                #expect(refused.status != 0 && refused.err.contains("every namespace"), "\(refused.err)")
                let fleet = try await APITests.key(sys, role: .viewer, namespace: "*")
                #expect(try Self.ctl(["worker", "list"], env: env.merging(["CONVEYOR_API_KEY": fleet]) { a, _ in a }).out.hasPrefix("WORKER"))

                let created = try Self.ctl(["key", "create", "--name", "ci", "--role", "viewer"], env: keyEnv)
                #expect(created.status == 0, "\(created.err)")
                let newKey = created.out.trimmingCharacters(in: .whitespacesAndNewlines)
                #expect(APIKeyFormat.parse(newKey) != nil, "the key alone on standard output: \(created.out)")
                let viewerEnv = env.merging(["CONVEYOR_API_KEY": newKey]) { a, _ in a }
                let denied = try Self.ctl(["task", "trigger", "t-0001"], env: viewerEnv)
                #expect(denied.status != 0)
                #expect(denied.err.contains("forbidden") && denied.err.contains("fix: ask an admin"), "\(denied.err)")
                #expect(denied.err.contains("request id:"))

                // Errors that say what to do.
                let noKey = try Self.ctl(["task", "list"], env: env)
                #expect(noKey.status != 0 && noKey.err.contains("fix: set CONVEYOR_API_KEY"), "\(noKey.err)")
                let down = try Self.ctl(["task", "list"], env: ["CONVEYOR_URL": "http://127.0.0.1:1", "CONVEYOR_API_KEY": admin])
                #expect(down.err.contains("cannot reach the API at http://127.0.0.1:1"), "\(down.err)")
                let badURL = try Self.ctl(["task", "list", "--url", "ftp://x"], env: keyEnv)
                #expect(badURL.err.contains("is not an http or https URL"), "\(badURL.err)")
                let missing = try Self.ctl(["task", "get", "nope"], env: keyEnv)
                #expect(missing.err.contains("no task named 'nope'") && missing.err.contains("namespace"), "\(missing.err)")
                var broken = "tasks:\n"
                for i in 0..<700 { broken += "  - {name: u-\(i), executor: noop}\n" }
                broken += "  - {name: u-bad, executor: noop, schedule: \"61 * * * *\"}\n"
                let partial = try Self.ctl(["task", "submit", "-f", "-"], env: keyEnv, stdin: broken)
                #expect(partial.status != 0)
                #expect(partial.err.contains("tasks[700].schedule"), "the field path is the task's place in the file: \(partial.err)")
                #expect(partial.err.contains("500 tasks before it were created"), "\(partial.err)")
                #expect(try await sys.count("SELECT count(*) FROM tasks WHERE name LIKE 'u-%'") == 500, "the failing batch is not half-created")

                let prefix = try #require(APIKeyFormat.parse(newKey)?.prefix)
                #expect(try Self.ctl(["key", "revoke", prefix], env: keyEnv).status == 0)
                #expect(try Self.ctl(["key", "list", "--json"], env: keyEnv).out.contains("\"revoked_at\""))
            }
        }
    }
}
