public import ConveyorConfig
public import ConveyorCore
import Foundation
import Synchronization

/// Runs a command from an allowlist, exec'd as argv (never through a shell), in a process group
/// of its own, with stdout and stderr captured up to a cap (the tail is kept).
///
/// Settings (`executors.<name>.*`):
/// - `allowed_commands` (required): absolute paths that `parameters.argv[0]` may name.
/// - `output_limit_bytes` (default 65536): bytes kept of stdout and of stderr each.
/// - `kill_grace_ms` (default 2000): time between SIGTERM and SIGKILL on timeout or cancel.
///
/// Parameters: `argv` (list of strings, required), `env` (object of strings, optional; names
/// must be upper-case identifiers, and `PATH`, `LD_*` and `CONVEYOR_*` are refused).
///
/// The child gets `CONVEYOR_RUN_ID`, `CONVEYOR_ATTEMPT`, `TRACEPARENT`, `TRACESTATE`, a fixed
/// `PATH=/usr/local/bin:/usr/bin:/bin`, and nothing else from the worker's environment.
public struct ShellExecutor: Executor {
    public var allowedCommands: Set<String>
    public var outputLimit: Int
    public var killGrace: Duration

    public init(settings: Settings) throws(ValidationError) {
        let commands = try settings.strings("allowed_commands", default: [])
        guard !commands.isEmpty else {
            throw ValidationError(field: "\(settings.source): allowed_commands", value: "(missing)",
                                  hint: "a shell executor needs a list of absolute command paths it may run, e.g. [/bin/echo]")
        }
        for c in commands where !c.hasPrefix("/") || c.contains("/../") || c.hasSuffix("/..") {
            throw ValidationError(field: "\(settings.source): allowed_commands", value: c, hint: "each entry must be an absolute path without '..'")
        }
        allowedCommands = Set(commands)
        outputLimit = try settings.int("output_limit_bytes", default: 65_536, range: 0...(16 << 20))
        killGrace = try settings.milliseconds("kill_grace_ms", default: 2000, range: 0...600_000)
    }

    public func execute(_ context: ExecutionContext) async -> ExecutionResult {
        guard let argv = context.parameters["argv"]?.arrayValue?.compactMap(\.stringValue),
              argv.count == context.parameters["argv"]?.arrayValue?.count, let command = argv.first else {
            return .failed("bad_parameters", "parameters.argv must be a non-empty list of strings, e.g. [\"/bin/echo\", \"hi\"]")
        }
        guard allowedCommands.contains(command) else {
            return .failed("command_not_allowed", "'\(command)' is not in this executor's allowed_commands")
        }
        var env: [String: String] = [:]
        if let extra = context.parameters["env"]?.objectValue {
            for (k, v) in extra {
                guard let s = v.stringValue else { return .failed("bad_parameters", "parameters.env.\(k) must be a string") }
                let valid = !k.isEmpty && k.allSatisfy { $0.isUppercase || $0.isNumber || $0 == "_" } && !(k.first?.isNumber ?? true)
                guard valid, k != "PATH", !k.hasPrefix("LD_"), !k.hasPrefix("CONVEYOR_") else {
                    return .failed("bad_parameters", "parameters.env.\(k) is not allowed: names are upper-case identifiers, and PATH, LD_* and CONVEYOR_* are reserved")
                }
                env[k] = s
            }
        }
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
        env["CONVEYOR_RUN_ID"] = context.idempotencyKey
        env["CONVEYOR_ATTEMPT"] = String(context.attempt)
        if let tp = context.traceparent { env["TRACEPARENT"] = tp }
        if let ts = context.tracestate { env["TRACESTATE"] = ts }

        let r = await ChildProcess.run(argv: argv, environment: env, outputLimit: outputLimit, killGrace: killGrace)
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

/// posix_spawn plus a reader thread that drains the pipes and reaps the child with `waitpid`,
/// off Swift's cooperative pool. Cancelling the awaiting task sends SIGTERM to the process
/// group, then SIGKILL after the grace period.
enum ChildProcess {
    struct Finished: Sendable {
        var exitCode: Int32?
        var signal: Int32?
        var stdout: String
        var stderr: String
        var killedByUs: Bool
    }

    enum Outcome: Sendable { case success(Finished), failure(String) }

    final class Handle: Sendable {
        let pid: pid_t
        let done = Atomic<Bool>(false)
        let killed = Atomic<Bool>(false)
        init(pid: pid_t) { self.pid = pid }

        func terminate(grace: Duration) {
            guard !done.load(ordering: .acquiring) else { return }
            killed.store(true, ordering: .relaxed)
            kill(-pid, SIGTERM)
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(Int(grace.inMilliseconds))) { [self] in
                if !done.load(ordering: .acquiring) { kill(-pid, SIGKILL) }
            }
        }
    }

    static func run(argv: [String], environment: [String: String], outputLimit: Int, killGrace: Duration) async -> Outcome {
        var outPipe: [Int32] = [0, 0], errPipe: [Int32] = [0, 0]
        // pipe2 is not visible from Swift's Glibc; set FD_CLOEXEC right after (other children
        // spawned in between could inherit an end only for that instant).
        guard pipe(&outPipe) == 0 else { return .failure("pipe: \(String(cString: strerror(errno)))") }
        guard pipe(&errPipe) == 0 else {
            close(outPipe[0]); close(outPipe[1])
            return .failure("pipe: \(String(cString: strerror(errno)))")
        }
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

        let cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        let cEnv: [UnsafeMutablePointer<CChar>?] = environment.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for p in cArgs { free(p) }; for p in cEnv { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, &attr, cArgs, cEnv)
        close(outPipe[1]); close(errPipe[1])
        guard rc == 0 else {
            close(outPipe[0]); close(errPipe[0])
            return .failure("cannot start \(argv[0]): \(String(cString: strerror(rc)))")
        }
        let handle = Handle(pid: pid)
        let outFD = outPipe[0], errFD = errPipe[0]
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (cont: CheckedContinuation<Outcome, Never>) in
                let t = Thread {
                    var out = TailBuffer(limit: outputLimit), err = TailBuffer(limit: outputLimit)
                    var fds = [pollfd(fd: outFD, events: Int16(POLLIN), revents: 0), pollfd(fd: errFD, events: Int16(POLLIN), revents: 0)]
                    var open = 2
                    var buf = [UInt8](repeating: 0, count: 16_384)
                    while open > 0 {
                        if poll(&fds, 2, 1000) < 0 && errno != EINTR { break }
                        for i in 0..<2 where fds[i].fd >= 0 && fds[i].revents != 0 {
                            let n = read(fds[i].fd, &buf, buf.count)
                            if n > 0 {
                                if i == 0 { out.append(buf[0..<n]) } else { err.append(buf[0..<n]) }
                            } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                                close(fds[i].fd); fds[i].fd = -1; open -= 1
                            }
                        }
                    }
                    for f in fds where f.fd >= 0 { close(f.fd) }
                    var status: Int32 = 0
                    while waitpid(handle.pid, &status, 0) < 0 && errno == EINTR {}
                    handle.done.store(true, ordering: .releasing)
                    let exited = status & 0x7f == 0
                    cont.resume(returning: .success(Finished(
                        exitCode: exited ? (status >> 8) & 0xff : nil, signal: exited ? nil : status & 0x7f,
                        stdout: out.string, stderr: err.string, killedByUs: handle.killed.load(ordering: .relaxed))))
                }
                t.name = "conveyor.shell.\(handle.pid)"
                t.start()
            }
        } onCancel: {
            handle.terminate(grace: killGrace)
        }
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
