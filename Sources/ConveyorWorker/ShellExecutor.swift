public import ConveyorConfig
public import ConveyorCore
import Foundation
import Logging
import Synchronization
import ConveyorTelemetry
import Tracing

/// Runs a command from an allowlist, exec'd as argv (never through a shell), in a process group
/// of its own, with stdout and stderr captured up to a cap (the tail is kept) and streamed to the
/// worker's log.
///
/// Settings (`executors.<name>.*`):
/// - `allowed_commands` (required): absolute paths that `parameters.argv[0]` may name.
/// - `blocked_arguments`: regular expressions; an argument matching any of them is refused
///   (for example `^-` against option injection, `(^|/)\.\.(/|$)` against path escapes).
/// - `inherit_env`: names copied from the worker's own environment (default none).
/// - `allowed_env`: when set, the only names `parameters.env` may use.
/// - `allowed_roots` (default `[/tmp]`): directories `parameters.cwd` must resolve inside
///   (symbolic links and `..` resolved first); the first is the default working directory.
/// - `limits`: `cpu_seconds`, `memory_bytes`, `file_size_bytes`, `processes`, `open_files`
///   (0 or absent: not limited), applied by exec'ing through `/usr/bin/prlimit` so they hold
///   from the command's first instruction.
/// - `output_limit_bytes` (default 65536): bytes kept of stdout and of stderr each.
/// - `log_output` (default true): each output line goes to the worker log (at most
///   `output_limit_bytes` per stream and run).
/// - `kill_grace_ms` (default 2000): time between SIGTERM and SIGKILL on timeout or cancel.
///
/// Parameters: `argv` (list of strings, required), `env` (object of strings), `cwd` (string).
///
/// The child gets `CONVEYOR_RUN_ID`, `CONVEYOR_ATTEMPT`, `TRACEPARENT`, `TRACESTATE`, a fixed
/// `PATH=/usr/local/bin:/usr/bin:/bin`, the `inherit_env` names and the task's `env`; names that
/// change how programs load or start (`LD_*`, `BASH_ENV`, `NODE_OPTIONS`, …) are refused. No
/// descriptor of the worker but the three standard ones reaches it. When the command exits,
/// whatever it left running in its process group is killed.
public struct ShellExecutor: Executor {
    public var allowedCommands: Set<String>
    var blockedArguments: [(pattern: String, regex: NSRegularExpression)]
    public var inheritEnv: [String]
    public var allowedEnv: Set<String>
    public var allowedRoots: [String]
    public var limits: [(flag: String, value: Int)]
    public var outputLimit: Int
    public var logOutput: Bool
    public var killGrace: Duration
    static let prlimit = "/usr/bin/prlimit"

    /// Environment names a task may never set: they change how programs are loaded or started.
    static let reservedEnvPrefixes = ["LD_", "DYLD_", "CONVEYOR_", "BASH_FUNC_", "MALLOC_"]
    static let reservedEnv: Set<String> = [
        "PATH", "TRACEPARENT", "TRACESTATE", "BAGGAGE", "BASH_ENV", "ENV", "IFS", "PS4", "SHELLOPTS", "BASHOPTS", "CDPATH",
        "GLIBC_TUNABLES", "GCONV_PATH", "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS", "NLSPATH", "LOCPATH",
        "NODE_OPTIONS", "NODE_PATH", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONINSPECT", "PERL5LIB", "PERL5OPT",
        "PERLLIB", "RUBYOPT", "RUBYLIB", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "GIT_SSH_COMMAND", "EDITOR",
    ]

    public init(settings: Settings) throws(ValidationError) {
        let commands = try settings.strings("allowed_commands", default: [])
        guard !commands.isEmpty else {
            throw ValidationError(field: "\(settings.source): allowed_commands", value: "(missing)",
                                  hint: "a shell executor needs a list of absolute command paths it may run, e.g. [/bin/echo]")
        }
        for c in commands where !c.hasPrefix("/") || c.contains("/../") || c.hasSuffix("/..") || c.contains("/./") {
            throw ValidationError(field: "\(settings.source): allowed_commands", value: c, hint: "each entry must be an absolute path without '.' or '..'")
        }
        allowedCommands = Set(commands)
        blockedArguments = []
        for pattern in try settings.strings("blocked_arguments", default: []) {
            guard let regex = try? NSRegularExpression(pattern: pattern) else {
                throw ValidationError(field: "\(settings.source): blocked_arguments", value: pattern, hint: "not a valid regular expression")
            }
            blockedArguments.append((pattern, regex))
        }
        inheritEnv = try settings.strings("inherit_env", default: [])
        allowedEnv = Set(try settings.strings("allowed_env", default: []))
        for name in inheritEnv + allowedEnv.sorted() where Self.refusal(ofEnv: name) != nil {
            throw ValidationError(field: "\(settings.source): inherit_env / allowed_env", value: name, hint: Self.refusal(ofEnv: name)!)
        }
        allowedRoots = []
        for root in try settings.strings("allowed_roots", default: ["/tmp"]) {
            guard root.hasPrefix("/"), let real = Self.realPath(root) else {
                throw ValidationError(field: "\(settings.source): allowed_roots", value: root, hint: "an absolute path to an existing directory")
            }
            allowedRoots.append(real)
        }
        guard !allowedRoots.isEmpty else {
            throw ValidationError(field: "\(settings.source): allowed_roots", value: "[]", hint: "list at least one directory commands may run in, e.g. [/tmp]")
        }
        limits = []
        let limitFlags = [("cpu_seconds", "--cpu"), ("memory_bytes", "--as"), ("file_size_bytes", "--fsize"),
                          ("processes", "--nproc"), ("open_files", "--nofile")]
        for (key, flag) in limitFlags {
            let v = try settings.int("limits.\(key)", default: 0, range: 0...Int(Int64.max / 2))
            if v > 0 { limits.append((flag, v)) }
        }
        if !limits.isEmpty && access(Self.prlimit, X_OK) != 0 {
            throw ValidationError(field: "\(settings.source): limits", value: limits.map { "\($0.flag)=\($0.value)" }.joined(separator: " "),
                                  hint: "resource limits need \(Self.prlimit) (Debian package util-linux); install it or remove the limits")
        }
        outputLimit = try settings.int("output_limit_bytes", default: 65_536, range: 0...(16 << 20))
        logOutput = try settings.bool("log_output", default: true)
        killGrace = try settings.milliseconds("kill_grace_ms", default: 2000, range: 0...600_000)
    }

    static func refusal(ofEnv k: String) -> String? {
        let identifier = !k.isEmpty && k.allSatisfy { ($0.isASCII && ($0.isUppercase || $0.isNumber)) || $0 == "_" } && !(k.first?.isNumber ?? true)
        guard identifier else { return "environment names are upper-case identifiers (A-Z, 0-9, _)" }
        if reservedEnv.contains(k) || reservedEnvPrefixes.contains(where: k.hasPrefix) {
            return "\(k) changes how programs load or start, or is set by Conveyor; it cannot be set by a task"
        }
        return nil
    }

    static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        var isDir: ObjCBool = false
        let s = String(cString: p)
        return FileManager.default.fileExists(atPath: s, isDirectory: &isDir) && isDir.boolValue ? s : nil
    }

    /// The checked command line, environment and working directory, or why the task is refused.
    func prepare(_ context: ExecutionContext) -> Result<(argv: [String], env: [String: String], cwd: String), ExecutionFailure> {
        guard let list = context.parameters["argv"]?.arrayValue, !list.isEmpty else {
            return .failure(.init("bad_parameters", "parameters.argv must be a non-empty list of strings, e.g. [\"/bin/echo\", \"hi\"]"))
        }
        var argv: [String] = []
        for (i, v) in list.enumerated() {
            guard let s = v.stringValue else { return .failure(.init("bad_parameters", "parameters.argv[\(i)] must be a string, got \(v)")) }
            guard !s.contains("\0") else { return .failure(.init("bad_parameters", "parameters.argv[\(i)] contains a NUL byte")) }
            argv.append(s)
        }
        guard allowedCommands.contains(argv[0]) else {
            return .failure(.init("command_not_allowed", "'\(argv[0])' is not in this executor's allowed_commands; add its absolute path there if it is meant to run"))
        }
        for (i, arg) in argv.enumerated().dropFirst() {
            let range = NSRange(arg.startIndex..., in: arg)
            if let hit = blockedArguments.first(where: { $0.regex.firstMatch(in: arg, range: range) != nil }) {
                return .failure(.init("argument_blocked", "parameters.argv[\(i)] '\(arg)' matches the blocked pattern '\(hit.pattern)'"))
            }
        }
        var env: [String: String] = [:]
        let host = ProcessInfo.processInfo.environment
        for name in inheritEnv { if let v = host[name] { env[name] = v } }
        if let extra = context.parameters["env"] {
            guard let o = extra.objectValue else { return .failure(.init("bad_parameters", "parameters.env must be an object of strings")) }
            for (k, v) in o.sorted(by: { $0.key < $1.key }) {
                guard let s = v.stringValue, !s.contains("\0") else { return .failure(.init("bad_parameters", "parameters.env.\(k) must be a string")) }
                if let why = Self.refusal(ofEnv: k) { return .failure(.init("bad_parameters", "parameters.env.\(k) is not allowed: \(why)")) }
                if !allowedEnv.isEmpty && !allowedEnv.contains(k) {
                    return .failure(.init("bad_parameters", "parameters.env.\(k) is not in this executor's allowed_env (\(allowedEnv.sorted().joined(separator: ", ")))"))
                }
                env[k] = s
            }
        }
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
        env["CONVEYOR_RUN_ID"] = context.idempotencyKey
        env["CONVEYOR_ATTEMPT"] = String(context.attempt)

        var cwd = allowedRoots[0]
        if let requested = context.parameters["cwd"] {
            guard let text = requested.stringValue, !text.isEmpty else { return .failure(.init("bad_parameters", "parameters.cwd must be a path")) }
            let full = text.hasPrefix("/") ? text : allowedRoots[0] + "/" + text
            guard let real = Self.realPath(full) else {
                return .failure(.init("bad_parameters", "parameters.cwd '\(text)' is not an existing directory"))
            }
            guard allowedRoots.contains(where: { real == $0 || real.hasPrefix($0 == "/" ? "/" : $0 + "/") }) else {
                return .failure(.init("cwd_not_allowed", "parameters.cwd '\(text)' resolves to \(real), outside the allowed roots \(allowedRoots)"))
            }
            cwd = real
        }
        if !limits.isEmpty {
            argv = [Self.prlimit] + limits.map { "\($0.flag)=\($0.value)" } + ["--"] + argv
        }
        return .success((argv, env, cwd))
    }

    public func execute(_ context: ExecutionContext) async -> ExecutionResult {
        let argv: [String], cwd: String
        var env: [String: String]
        switch prepare(context) {
        case .failure(let f): return .failed(f.errorClass, f.message)
        case .success(let p): (argv, env, cwd) = p
        }
        // The process span; the program continues the trace from TRACEPARENT / TRACESTATE / BAGGAGE.
        let program = context.parameters["argv"]?.arrayValue?.first?.stringValue ?? argv[0]
        let span = Traces.startSpan("exec \((program as NSString).lastPathComponent)", context: context.spanParent,
                                    attributes: ["process.executable.path": .string(program)])
        defer { span.end() }
        for (name, value) in Traces.headers(span.context) { env[name.uppercased()] = value }
        var log: ChildProcess.LineSink?
        if logOutput {
            let logger = context.logger
            log = { stream, line in logger.info("\(line)", metadata: ["output.stream": "\(stream)"]) }
        }
        let r = await ChildProcess.run(argv: argv, environment: env, directory: cwd, outputLimit: outputLimit, killGrace: killGrace, log: log)
        if case .success(let p) = r, let code = p.exitCode {
            span.attributes["process.exit.code"] = Int(code)
            if code != 0 { span.setStatus(SpanStatus(code: .error, message: "exited with status \(code)")) }
        } else {
            span.setStatus(SpanStatus(code: .error, message: "not started, or ended by a signal"))
        }
        switch r {
        case .failure(let message):
            return .failed("spawn_failed", message)
        case .success(let p):
            let output = p.stdout + (p.stderr.isEmpty ? "" : (p.stdout.isEmpty ? "" : "\n") + "[stderr]\n" + p.stderr)
            if let code = p.exitCode {
                return code == 0 ? ExecutionResult(outcome: .succeeded, exitCode: 0, output: output)
                    : .failed("exit_code", "exited with status \(code)", exitCode: Int(code), output: output)
            }
            let sig = p.signal ?? 0
            return ExecutionResult(outcome: p.killedByUs ? .cancelled : .failed, output: output,
                                   errorClass: p.killedByUs ? "killed" : "signal", errorMessage: "terminated by signal \(sig)")
        }
    }
}

/// Why an executor refused a task before running it.
public struct ExecutionFailure: Error, Sendable {
    public var errorClass: String
    public var message: String
    public init(_ errorClass: String, _ message: String) {
        self.errorClass = errorClass
        self.message = message
    }
}

/// posix_spawn on a thread of its own, which then drains the pipes and reaps the child with
/// `waitpid`: no blocking call on Swift's cooperative pool. Cancelling the awaiting task sends
/// SIGTERM to the process group, then SIGKILL after the grace period. When the command exits,
/// anything it left running in its group is killed, so a background child cannot hold the pipes
/// (or the run) open.
enum ChildProcess {
    struct Finished: Sendable {
        var exitCode: Int32?
        var signal: Int32?
        var stdout: String
        var stderr: String
        var killedByUs: Bool
    }

    enum Outcome: Sendable { case success(Finished), failure(String) }

    /// Receives each output line ("stdout" or "stderr") as it is read.
    typealias LineSink = @Sendable (String, String) -> Void

    final class Handle: Sendable {
        let pid = Atomic<Int32>(0)
        let done = Atomic<Bool>(false)
        let killed = Atomic<Bool>(false)
        let grace: Duration
        init(grace: Duration) { self.grace = grace }

        /// Cancellation: signals the group now, or as soon as it exists.
        func terminate() {
            killed.store(true, ordering: .sequentiallyConsistent)
            let p = pid.load(ordering: .sequentiallyConsistent)
            if p > 0 { signalGroup(p) }
        }

        func spawned(_ p: Int32) {
            pid.store(p, ordering: .sequentiallyConsistent)
            if killed.load(ordering: .sequentiallyConsistent) { signalGroup(p) }
        }

        private func signalGroup(_ p: Int32) {
            guard !done.load(ordering: .acquiring) else { return }
            kill(-p, SIGTERM)
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(Int(grace.inMilliseconds))) { [self] in
                if !done.load(ordering: .acquiring) { kill(-p, SIGKILL) }
            }
        }
    }

    typealias FileActionFD = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    typealias FileActionPath = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, UnsafePointer<CChar>) -> Int32
    /// glibc 2.34+ and 2.29+; Swift's Glibc module does not declare them (they need _GNU_SOURCE).
    static let addCloseFrom: FileActionFD? =
        dlsym(nil, "posix_spawn_file_actions_addclosefrom_np").map { unsafeBitCast($0, to: FileActionFD.self) }
    static let addChdir: FileActionPath? =
        dlsym(nil, "posix_spawn_file_actions_addchdir_np").map { unsafeBitCast($0, to: FileActionPath.self) }

    static func run(argv: [String], environment: [String: String], directory: String, outputLimit: Int, killGrace: Duration,
                    log: LineSink? = nil) async -> Outcome {
        let handle = Handle(grace: killGrace)
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (cont: CheckedContinuation<Outcome, Never>) in
                let t = Thread {
                    cont.resume(returning: spawnAndWait(argv: argv, environment: environment, directory: directory,
                                                        outputLimit: outputLimit, handle: handle, log: log))
                }
                t.name = "conveyor.shell"
                t.start()
            }
        } onCancel: {
            handle.terminate()
        }
    }

    /// Runs on the child's own thread.
    static func spawnAndWait(argv: [String], environment: [String: String], directory: String, outputLimit: Int,
                             handle: Handle, log: LineSink?) -> Outcome {
        guard let closeFrom = addCloseFrom, let chdir = addChdir else {
            return .failure("this C library lacks posix_spawn_file_actions_addclosefrom_np/addchdir_np (glibc 2.34 or later is needed)")
        }
        var outPipe: [Int32] = [0, 0], errPipe: [Int32] = [0, 0]
        guard pipe(&outPipe) == 0 else { return .failure("pipe: \(String(cString: strerror(errno)))") }
        guard pipe(&errPipe) == 0 else {
            close(outPipe[0]); close(outPipe[1])
            return .failure("pipe: \(String(cString: strerror(errno)))")
        }
        // The child closes every descriptor above 2 anyway (closefrom below); CLOEXEC keeps other
        // children spawned meanwhile from inheriting these ends.
        for fd in outPipe + errPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        posix_spawnattr_setpgroup(&attr, 0)
        var all = sigset_t(); sigfillset(&all)
        var none = sigset_t(); sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setsigmask(&attr, &none)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        _ = closeFrom(&actions, 3)
        _ = chdir(&actions, directory)

        let cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        let cEnv: [UnsafeMutablePointer<CChar>?] = environment.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for p in cArgs { free(p) }; for p in cEnv { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, &attr, cArgs, cEnv)
        close(outPipe[1]); close(errPipe[1])
        guard rc == 0 else {
            close(outPipe[0]); close(errPipe[0])
            return .failure("cannot start \(argv[0]) in \(directory): \(String(cString: strerror(rc)))")
        }
        handle.spawned(pid)

        var out = TailBuffer(limit: outputLimit), err = TailBuffer(limit: outputLimit)
        var lines = [LineSplitter(stream: "stdout", budget: outputLimit), LineSplitter(stream: "stderr", budget: outputLimit)]
        var fds = [pollfd(fd: outPipe[0], events: Int16(POLLIN), revents: 0), pollfd(fd: errPipe[0], events: Int16(POLLIN), revents: 0)]
        var open = 2
        var buf = [UInt8](repeating: 0, count: 16_384)
        var status: Int32 = 0
        var reaped = false
        while open > 0 {
            let n = poll(&fds, 2, 100)
            if n < 0 && errno != EINTR { break }
            if n == 0 {
                // Quiet pipes: has the command exited while something it started holds them open?
                if waitpid(pid, &status, WNOHANG) == pid {
                    reaped = true
                    handle.done.store(true, ordering: .releasing)
                    kill(-pid, SIGKILL)
                }
                continue
            }
            for i in 0..<2 where fds[i].fd >= 0 && fds[i].revents != 0 {
                let n = read(fds[i].fd, &buf, buf.count)
                if n > 0 {
                    if i == 0 { out.append(buf[0..<n]) } else { err.append(buf[0..<n]) }
                    if let log { lines[i].feed(buf[0..<n], log) }
                } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                    close(fds[i].fd); fds[i].fd = -1; open -= 1
                }
            }
        }
        for f in fds where f.fd >= 0 { close(f.fd) }
        if let log { for i in 0..<2 { lines[i].flush(log) } }
        if !reaped {
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            handle.done.store(true, ordering: .releasing)
            // Whatever the command left behind in its group goes with it.
            kill(-pid, SIGKILL)
        }
        let exited = status & 0x7f == 0
        return .success(Finished(exitCode: exited ? (status >> 8) & 0xff : nil, signal: exited ? nil : status & 0x7f,
                                 stdout: out.string, stderr: err.string, killedByUs: handle.killed.load(ordering: .relaxed)))
    }
}

/// Splits output into lines for the log, up to a byte budget per stream; long lines are cut.
struct LineSplitter {
    let stream: String
    var budget: Int
    var pending: [UInt8] = []
    var exhausted = false

    init(stream: String, budget: Int) {
        self.stream = stream
        self.budget = budget
    }

    mutating func feed(_ chunk: ArraySlice<UInt8>, _ sink: ChildProcess.LineSink) {
        guard !exhausted else { return }
        for byte in chunk {
            if byte == UInt8(ascii: "\n") { emit(sink) } else if pending.count < 2048 { pending.append(byte) }
            if exhausted { return }
        }
    }

    mutating func flush(_ sink: ChildProcess.LineSink) { if !pending.isEmpty && !exhausted { emit(sink) } }

    private mutating func emit(_ sink: ChildProcess.LineSink) {
        budget -= pending.count + 1
        if budget < 0 {
            exhausted = true
            sink(stream, "[output beyond output_limit_bytes is not logged]")
        } else {
            sink(stream, String(decoding: pending, as: UTF8.self))
        }
        pending.removeAll(keepingCapacity: true)
    }
}

/// Keeps the last `limit` bytes written.
struct TailBuffer {
    let limit: Int
    private(set) var bytes: [UInt8] = []
    private(set) var dropped = 0

    init(limit: Int) { self.limit = limit }

    mutating func append(_ chunk: ArraySlice<UInt8>) {
        bytes.append(contentsOf: chunk)
        if bytes.count > limit * 2 || (bytes.count > limit && chunk.count < 64) { trim() }
    }

    mutating func trim() {
        guard bytes.count > limit else { return }
        let extra = bytes.count - limit
        dropped += extra
        bytes.removeFirst(extra)
    }

    var string: String {
        var copy = self
        copy.trim()
        let text = String(decoding: copy.bytes, as: UTF8.self)
        return copy.dropped > 0 ? "[… \(copy.dropped) bytes dropped]\n" + text : text
    }
}
