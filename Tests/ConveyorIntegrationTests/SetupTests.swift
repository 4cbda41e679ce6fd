import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// README's two commands hold on any machine: the requirements table is complete, its preflight
/// names what is missing, and a port held by someone else stops `scripts/services.sh` naming the
/// port, its holder and the variable that moves it.
@Suite("Set-up of the two commands", .serialized)
struct SetupTests {
    static let root = FileManager.default.currentDirectoryPath

    // MARK: the table is complete

    /// Program names a source file spawns: absolute paths ending in `/bin/NAME` or `/sbin/NAME`
    /// (any file), `shutil.which("NAME")` and `subprocess.…(["NAME"` (Python), `command -v NAME`
    /// (shell).
    static func programsNamed(in text: String, python: Bool = false, shell: Bool = false) -> Set<String> {
        var patterns = [#"(?:^|[^A-Za-z0-9_.~$-])(?:/[A-Za-z0-9_.+-]+)*/s?bin/([A-Za-z0-9_+-][A-Za-z0-9_.+-]*)"#]
        if python { patterns += [#"shutil\.which\(\s*"([^"]+)""#, #"subprocess\.\w+\(\s*\[\s*"([^"]+)""#] }
        if shell { patterns += [#"command -v ([A-Za-z0-9_.+-]+)"#] }
        var names = Set<String>()
        for pattern in patterns {
            let regex = try! NSRegularExpression(pattern: pattern, options: [.anchorsMatchLines])
            for m in regex.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
                if let r = Range(m.range(at: 1), in: text) { names.insert(String(text[r])) }
            }
        }
        return names
    }

    static func codeFiles() -> [String] {
        var files: [String] = []
        for dir in ["Sources", "Tests", "Examples", "scripts"] {
            let base = root + "/" + dir
            guard let walker = FileManager.default.enumerator(atPath: base) else { continue }
            // This file names programs only as the scanner's own examples.
            for case let path as String in walker
            where [".swift", ".sh", ".py"].contains(where: path.hasSuffix) && !path.hasSuffix("SetupTests.swift") {
                files.append(base + "/" + path)
            }
        }
        return files
    }

    @Test func theScannerFindsEveryWayCodeNamesAProgram() {
        #expect(Self.programsNamed(in: #"p.executableURL = URL(fileURLWithPath: "/usr/bin/faketime")"#) == ["faketime"])
        #expect(Self.programsNamed(in: #"["argv": ["/bin/../usr/sbin/iptables", "-L"]]"#) == ["iptables"])
        #expect(Self.programsNamed(in: "as_pg /usr/lib/postgresql/15/bin/pg_basebackup -D x") == ["pg_basebackup"])
        #expect(Self.programsNamed(in: #"exe = shutil.which("chromium")"#, python: true) == ["chromium"])
        #expect(Self.programsNamed(in: #"subprocess.run(["kubectl", "kustomize"])"#, python: true) == ["kubectl"])
        #expect(Self.programsNamed(in: "X=\"$(command -v llvm-strip)\"", shell: true) == ["llvm-strip"])
        // Not programs: a folder named bin inside the build, a variable's path.
        #expect(Self.programsNamed(in: #"".build/debug/conveyor" "$BIN/conveyor" ~/bin/x"#).isEmpty)
    }

    @Test func everyProgramTheCodeNamesHasARowInTheRequirementsTable() throws {
        let names = Set(try Requirements.rows().map(\.name))
        let files = Self.codeFiles()
        #expect(files.count > 50, "found only \(files.count) source files under \(Self.root)")
        var missing: [String] = []
        for file in files {
            let text = try String(contentsOfFile: file, encoding: .utf8)
            let found = Self.programsNamed(in: text, python: file.hasSuffix(".py"), shell: file.hasSuffix(".sh"))
            for name in found.sorted() where !names.contains(name) {
                missing.append("\(file.dropFirst(Self.root.count + 1)) names \(name)")
            }
        }
        #expect(missing.isEmpty, "no row in scripts/requirements.tsv, so nothing installs them: \(missing)")
    }

    @Test func everyRowIsWellFormed() throws {
        let rows = try Requirements.rows()
        #expect(rows.count > 30)
        for row in rows {
            #expect(row.check.hasPrefix("/") || ["PATH", "pkg-config", "python"].contains(row.check), "\(row)")
            #expect(row.package.hasPrefix("apt:") || row.package.hasPrefix("pip:"), "\(row)")
            if row.check.hasPrefix("/") { #expect(row.check.hasSuffix("/" + row.name), "\(row)") }
        }
    }

    // MARK: the preflight

    static func script(_ args: [String], env: [String: String]) throws -> (status: Int32, out: String, err: String) {
        let p = try Process.required("bash", args)
        var e = ProcessInfo.processInfo.environment
        for (k, v) in env { e[k] = v }
        p.environment = e
        return try runCapturing(p)
    }

    @Test func thePreflightPassesOnThisMachineAndNamesWhatIsMissingWithItsInstallCommand() throws {
        let real = try Self.script([Self.root + "/scripts/requirements.sh", "check"], env: [:])
        #expect(real.status == 0, "\(real.err)")

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("conveyor-req-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let table = dir.appendingPathComponent("requirements.tsv")
        try """
        # a table with one row present and two absent
        env                       /usr/bin/env                        apt:coreutils             tests
        conveyor-absent           /usr/bin/conveyor-absent            apt:conveyor-absent-pkg   the fault suite
        conveyor_absent_module    python                              pip:conveyor-absent==1.0  a script

        """.write(to: table, atomically: true, encoding: .utf8)
        let r = try Self.script(
            [Self.root + "/scripts/requirements.sh", "check"], env: ["CONVEYOR_REQUIREMENTS": table.path])
        #expect(r.status == 1)
        #expect(
            r.err.contains(
                """
                missing: conveyor-absent (/usr/bin/conveyor-absent), needed by the fault suite; install it with: \
                apt-get install -y conveyor-absent-pkg
                """
            ), "\(r.err)")
        #expect(r.err.contains("install it with: python3 -m pip install 'conveyor-absent==1.0'"), "\(r.err)")
        #expect(!r.err.contains("missing: env"), "\(r.err)")
    }

    // MARK: ports

    /// A socket listening on a free loopback port, held by this test process.
    final class Listener {
        let fd: Int32
        let port: Int
        init() throws {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            self.fd = fd
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            addr.sin_port = 0
            var len = socklen_t(MemoryLayout<sockaddr_in>.size)
            let ok = withUnsafeMutablePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(fd, $0, len) == 0 && listen(fd, 1) == 0 && getsockname(fd, $0, &len) == 0
                }
            }
            port = Int(UInt16(bigEndian: addr.sin_port))
            try #require(ok, "could not listen on a loopback port: errno \(errno)")
        }
        deinit { close(fd) }
    }

    @Test(arguments: ["CONVEYOR_PG_PORT", "CONVEYOR_AMQP_PORT", "CONVEYOR_AMQP_DIST_PORT"])
    func aTakenPortStopsTheServicesScriptBeforeAnythingStarts(variable: String) throws {
        let held = try Listener()
        // The other ports: free ones (taken and released), so only `variable` clashes.
        var env = [
            "CONVEYOR_PG_PORT": "", "CONVEYOR_AMQP_PORT": "", "CONVEYOR_AMQP_DIST_PORT": "",
            "CONVEYOR_AMQP_EPMD_PORT": "",
        ]
        for key in env.keys { env[key] = String(key == variable ? held.port : try Listener().port) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("conveyor-ports-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        env["CONVEYOR_LOCAL_DIR"] = dir.path

        let r = try Self.script([Self.root + "/scripts/services.sh", "start"], env: env)
        // Asking whether the node runs (rabbitmqctl) starts an epmd on the private port: stop it.
        let epmd = try runCapturing(
            try Process.required("ss", ["-Hltnp", "sport = :\(env["CONVEYOR_AMQP_EPMD_PORT"]!)"])
        ).out
        for pid in epmd.matches(of: /"epmd",pid=(\d+)/).compactMap({ Int32($0.output.1) }) { kill(pid, SIGTERM) }
        #expect(r.status == 1, "\(r.err)")
        #expect(r.err.contains("port \(held.port) is already in use by"), "\(r.err)")
        #expect(r.err.contains("pid=\(getpid())"), "the holder is not named: \(r.err)")
        #expect(r.err.contains("\(variable)=<free port>"), "\(r.err)")
        #expect(
            !FileManager.default.fileExists(atPath: dir.appendingPathComponent("pg/data").path),
            "postgres was set up before the check")
    }
}
