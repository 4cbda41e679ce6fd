package import ConveyorConfig
package import ConveyorCore
import ConveyorTelemetry
import Foundation
import Logging
import Synchronization
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
/// Parameters: `argv` (list of strings, required), `env` (object of strings), `cwd` (string),
/// `result` (`last_line`: the last non-empty line of stdout is the run's JSON result; a last
/// line that is not JSON fails the run as `invalid_result`; default none).
///
/// The child gets `CONVEYOR_RUN_ID` (this attempt), `CONVEYOR_OCCURRENCE_KEY` (every attempt of
/// the occurrence), `CONVEYOR_ATTEMPT`, `CONVEYOR_INPUTS` (a dependent's upstream results, JSON), `TRACEPARENT`, `TRACESTATE`, a fixed
/// `PATH=/usr/local/bin:/usr/bin:/bin`, the `inherit_env` names and the task's `env`; names that
/// change how programs load or start (`LD_*`, `BASH_ENV`, `NODE_OPTIONS`, …) are refused. No
/// descriptor of the worker but the three standard ones reaches it. When the command exits,
/// whatever it left running in its process group is killed.
package struct ShellExecutor: Executor {
    package var allowedCommands: Set<String>
    var blockedArguments: [(pattern: String, regex: NSRegularExpression)]
    package var inheritEnv: [String]
    package var allowedEnv: Set<String>
    package var allowedRoots: [String]
    package var limits: [(flag: String, value: Int)]
    package var outputLimit: Int
    package var logOutput: Bool
    package var killGrace: Duration
    static let prlimit = "/usr/bin/prlimit"

    /// Environment names a task may never set: they change how programs are loaded or started.
    static let reservedEnvPrefixes = ["LD_", "DYLD_", "CONVEYOR_", "BASH_FUNC_", "MALLOC_"]
    static let reservedEnv: Set<String> = [
        "PATH", "TRACEPARENT", "TRACESTATE", "BAGGAGE", "BASH_ENV", "ENV", "IFS", "PS4", "SHELLOPTS", "BASHOPTS",
        "CDPATH",
        "GLIBC_TUNABLES", "GCONV_PATH", "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS", "NLSPATH", "LOCPATH",
        "NODE_OPTIONS", "NODE_PATH", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONINSPECT", "PERL5LIB",
        "PERL5OPT",
        "PERLLIB", "RUBYOPT", "RUBYLIB", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "GIT_SSH_COMMAND",
        "EDITOR",
    ]

    package init(settings: Settings) throws(ValidationError) {
        let commands = try settings.strings("allowed_commands", default: [])
        guard !commands.isEmpty else {
            throw ValidationError(
                field: "\(settings.source): allowed_commands", value: "(missing)",
                hint: "a shell executor needs a list of absolute command paths it may run, e.g. [/bin/echo]")
        }
        for c in commands where !c.hasPrefix("/") || c.contains("/../") || c.hasSuffix("/..") || c.contains("/./") {
            throw ValidationError(
                field: "\(settings.source): allowed_commands", value: c,
                hint: "each entry must be an absolute path without '.' or '..'")
        }
        allowedCommands = Set(commands)
        blockedArguments = []
        for pattern in try settings.strings("blocked_arguments", default: []) {
            guard let regex = try? NSRegularExpression(pattern: pattern) else {
                throw ValidationError(
                    field: "\(settings.source): blocked_arguments", value: pattern,
                    hint: "not a valid regular expression")
            }
            blockedArguments.append((pattern, regex))
        }
        inheritEnv = try settings.strings("inherit_env", default: [])
        allowedEnv = Set(try settings.strings("allowed_env", default: []))
        for name in inheritEnv + allowedEnv.sorted() where Self.refusal(ofEnv: name) != nil {
            throw ValidationError(
                field: "\(settings.source): inherit_env / allowed_env", value: name, hint: Self.refusal(ofEnv: name)!)
        }
        allowedRoots = []
        for root in try settings.strings("allowed_roots", default: ["/tmp"]) {
            guard root.hasPrefix("/"), let real = Self.realPath(root) else {
                throw ValidationError(
                    field: "\(settings.source): allowed_roots", value: root,
                    hint: "an absolute path to an existing directory")
            }
            allowedRoots.append(real)
        }
        guard !allowedRoots.isEmpty else {
            throw ValidationError(
                field: "\(settings.source): allowed_roots", value: "[]",
                hint: "list at least one directory commands may run in, e.g. [/tmp]")
        }
        limits = []
        let limitFlags = [
            ("cpu_seconds", "--cpu"), ("memory_bytes", "--as"), ("file_size_bytes", "--fsize"),
            ("processes", "--nproc"), ("open_files", "--nofile"),
        ]
        for (key, flag) in limitFlags {
            let v = try settings.int("limits.\(key)", default: 0, range: 0...Int(Int64.max / 2))
            if v > 0 { limits.append((flag, v)) }
        }
        if !limits.isEmpty && access(Self.prlimit, X_OK) != 0 {
            throw ValidationError(
                field: "\(settings.source): limits",
                value: limits.map { "\($0.flag)=\($0.value)" }.joined(separator: " "),
                hint:
                    "resource limits need \(Self.prlimit) (Debian package util-linux); install it or remove the limits")
        }
        outputLimit = try settings.int("output_limit_bytes", default: 65_536, range: 0...(16 << 20))
        logOutput = try settings.bool("log_output", default: true)
        killGrace = try settings.milliseconds("kill_grace_ms", default: 2000, range: 0...600_000)
    }

    static func refusal(ofEnv k: String) -> String? {
        let identifier =
            !k.isEmpty && k.allSatisfy { ($0.isASCII && ($0.isUppercase || $0.isNumber)) || $0 == "_" }
            && !(k.first?.isNumber ?? true)
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
    func prepare(_ context: ExecutionContext) -> Result<
        (argv: [String], env: [String: String], cwd: String), ExecutionFailure
    > {
        guard let list = context.parameters["argv"]?.arrayValue, !list.isEmpty else {
            return .failure(
                .init(
                    "bad_parameters",
                    "parameters.argv must be a non-empty list of strings, e.g. [\"/bin/echo\", \"hi\"]"))
        }
        var argv: [String] = []
        for (i, v) in list.enumerated() {
            guard let s = v.stringValue else {
                return .failure(.init("bad_parameters", "parameters.argv[\(i)] must be a string, got \(v)"))
            }
            guard !s.contains("\0") else {
                return .failure(.init("bad_parameters", "parameters.argv[\(i)] contains a NUL byte"))
            }
            argv.append(s)
        }
        guard allowedCommands.contains(argv[0]) else {
            return .failure(
                .init(
                    "command_not_allowed",
                    """
                    '\(argv[0])' is not in this executor's allowed_commands; add its absolute path there if it is \
                    meant to run
                    """
                ))
        }
        for (i, arg) in argv.enumerated().dropFirst() {
            let range = NSRange(arg.startIndex..., in: arg)
            if let hit = blockedArguments.first(where: { $0.regex.firstMatch(in: arg, range: range) != nil }) {
                return .failure(
                    .init(
                        "argument_blocked",
                        "parameters.argv[\(i)] '\(arg)' matches the blocked pattern '\(hit.pattern)'"))
            }
        }
        var env: [String: String] = [:]
        let host = ProcessInfo.processInfo.environment
        for name in inheritEnv { if let v = host[name] { env[name] = v } }
        if let extra = context.parameters["env"] {
            guard let o = extra.objectValue else {
                return .failure(.init("bad_parameters", "parameters.env must be an object of strings"))
            }
            for (k, v) in o.sorted(by: { $0.key < $1.key }) {
                guard let s = v.stringValue, !s.contains("\0") else {
                    return .failure(.init("bad_parameters", "parameters.env.\(k) must be a string"))
                }
                if let why = Self.refusal(ofEnv: k) {
                    return .failure(.init("bad_parameters", "parameters.env.\(k) is not allowed: \(why)"))
                }
                if !allowedEnv.isEmpty && !allowedEnv.contains(k) {
                    return .failure(
                        .init(
                            "bad_parameters",
                            """
                            parameters.env.\(k) is not in this executor's allowed_env \
                            (\(allowedEnv.sorted().joined(separator: ", ")))
                            """
                        ))
                }
                env[k] = s
            }
        }
        if let r = context.parameters["result"], r != .null, r.stringValue != "last_line" {
            return .failure(
                .init("bad_parameters", "parameters.result is 'last_line' (the last line of stdout is the JSON result)")
            )
        }
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
        env["CONVEYOR_RUN_ID"] = context.idempotencyKey
        env["CONVEYOR_OCCURRENCE_KEY"] = context.occurrenceKey
        env["CONVEYOR_ATTEMPT"] = String(context.attempt)
        if let inputs = context.inputs { env["CONVEYOR_INPUTS"] = String(decoding: inputs.jsonBytes, as: UTF8.self) }

        var cwd = allowedRoots[0]
        if let requested = context.parameters["cwd"] {
            guard let text = requested.stringValue, !text.isEmpty else {
                return .failure(.init("bad_parameters", "parameters.cwd must be a path"))
            }
            let full = text.hasPrefix("/") ? text : allowedRoots[0] + "/" + text
            guard let real = Self.realPath(full) else {
                return .failure(.init("bad_parameters", "parameters.cwd '\(text)' is not an existing directory"))
            }
            guard allowedRoots.contains(where: { real == $0 || real.hasPrefix($0 == "/" ? "/" : $0 + "/") }) else {
                return .failure(
                    .init(
                        "cwd_not_allowed",
                        "parameters.cwd '\(text)' resolves to \(real), outside the allowed roots \(allowedRoots)"))
            }
            cwd = real
        }
        if !limits.isEmpty {
            argv = [Self.prlimit] + limits.map { "\($0.flag)=\($0.value)" } + ["--"] + argv
        }
        return .success((argv, env, cwd))
    }

    package func execute(_ context: ExecutionContext) async -> ExecutionResult {
        let argv: [String]
        let cwd: String
        var env: [String: String]
        switch prepare(context) {
        case .failure(let f): return .failed(f.errorClass, f.message)
        case .success(let p): (argv, env, cwd) = p
        }
        // The process span; the program continues the trace from TRACEPARENT / TRACESTATE / BAGGAGE.
        let program = context.parameters["argv"]?.arrayValue?.first?.stringValue ?? argv[0]
        let span = Traces.startSpan(
            "exec \((program as NSString).lastPathComponent)", context: context.spanParent,
            attributes: ["process.executable.path": .string(program)])
        defer { span.end() }
        for (name, value) in Traces.headers(span.context) { env[name.uppercased()] = value }
        var log: ChildProcess.LineSink?
        if logOutput {
            let logger = context.logger
            log = { stream, line in logger.info("\(line)", metadata: ["output.stream": "\(stream)"]) }
        }
        let r = await ChildProcess.run(
            argv: argv, environment: env, directory: cwd, outputLimit: outputLimit, killGrace: killGrace, log: log)
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
                guard code == 0 else {
                    return .failed("exit_code", "exited with status \(code)", exitCode: Int(code), output: output)
                }
                guard context.parameters["result"]?.stringValue == "last_line" else {
                    return ExecutionResult(outcome: .succeeded, exitCode: 0, output: output)
                }
                let last = p.stdout.split(whereSeparator: \.isNewline).last { !$0.allSatisfy(\.isWhitespace) }
                guard let last, let value = try? JSONDecoder().decode(JSONValue.self, from: Data(last.utf8)) else {
                    return .failed(
                        "invalid_result",
                        """
                        parameters.result is last_line, but the last line of stdout is not JSON: \
                        \(String((last ?? "(no output)").prefix(200)))
                        """, exitCode: 0, output: output)
                }
                return ExecutionResult(outcome: .succeeded, exitCode: 0, output: output, result: value)
            }
            let sig = p.signal ?? 0
            return ExecutionResult(
                outcome: p.killedByUs ? .cancelled : .failed, output: output,
                errorClass: p.killedByUs ? "killed" : "signal", errorMessage: "terminated by signal \(sig)")
        }
    }
}

/// Why an executor refused a task before running it.
package struct ExecutionFailure: Error, Sendable {
    package var errorClass: String
    package var message: String
    package init(_ errorClass: String, _ message: String) {
        self.errorClass = errorClass
        self.message = message
    }
}
