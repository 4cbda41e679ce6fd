import ArgumentParser
import AsyncHTTPClient
import ConveyorCore
import Foundation
import NIOCore
import NIOHTTP1
import Yams

/// Where the API is and who we are: flags, then the environment, then the config file.
///
/// - URL: `--url`, `CONVEYOR_URL`, `url:` in the config file; default `http://127.0.0.1:8080`.
/// - Credential: `--key-file`, `CONVEYOR_API_KEY`, `key_file:` in the config file. Never a flag
///   with the key itself: it would show in `ps` and shell history.
/// - Config file: `--config`, `CONVEYORCTL_CONFIG`, `~/.config/conveyor/ctl.yaml` (if present),
///   else `.local/conveyorctl.yaml` in the current directory, which `conveyor dev` writes (the
///   local API and the admin key it printed) so a second shell needs no setup.
struct GlobalOptions: ParsableArguments {
    @Option(help: "The API's base URL (or CONVEYOR_URL).") var url: String?
    @Option(name: .customLong("key-file"), help: "A file holding the API key or token (or CONVEYOR_API_KEY).")
    var keyFile: String?
    @Option(help: "A YAML file with url and key_file (or CONVEYORCTL_CONFIG).") var config: String?
    @Option(help: "The namespace, for keys of every namespace ('*').") var namespace: String?
    @Option(
        name: [.short, .long],
        help: "How to print: a table, wide (more columns), json or yaml (the API's reply), name (kind/name lines).")
    var output: OutputFormat?
    @Flag(help: "Deprecated: the same as -o json.") var json = false

    /// What `-o` asked for (`--json` is `-o json`).
    var format: OutputFormat { output ?? (json ? .json : .table) }

    func validate() throws {
        if json, let output, output != .json {
            throw ValidationError("--json is -o json; it cannot go with -o \(output.rawValue)")
        }
    }

    /// Prints `value` as `-o` asks: the table `table(wide)` for people, the value as JSON or YAML,
    /// or `names` (`task/nightly`), one a line. `more` (a next page's hint) follows a table, and
    /// goes to standard error with `-o name`, so a pipe reads names only.
    func show(
        _ value: JSONValue, names: @autoclosure () -> [String], more: String? = nil, table: (_ wide: Bool) -> String
    ) {
        switch format {
        case .table, .wide: Swift.print(table(format == .wide) + (more.map { "\n" + $0 } ?? ""))
        case .json: Swift.print(String(decoding: value.jsonBytes, as: UTF8.self))
        case .yaml: Swift.print(Output.yaml(value), terminator: "")
        case .name:
            for name in names() { Swift.print(name) }
            if let more { FileHandle.standardError.write(Data((more + "\n").utf8)) }
        }
    }

    func client() throws -> APIClient {
        let env = ProcessInfo.processInfo.environment
        var fileURL: String?
        var fileKeyPath: String?
        let home = NSHomeDirectory() + "/.config/conveyor/ctl.yaml"
        let configPath =
            config ?? env["CONVEYORCTL_CONFIG"]
            ?? (FileManager.default.fileExists(atPath: home) ? home : Self.devConfigPath)
        if FileManager.default.fileExists(atPath: configPath) {
            guard let text = try? String(contentsOfFile: configPath, encoding: .utf8),
                let o = (try? Yams.load(yaml: text)) as? [String: Any]
            else {
                throw CLIError(
                    "the config file \(configPath) is not a YAML mapping",
                    fix: "write it as:\n  url: https://conveyor.example.com\n  key_file: ~/.config/conveyor/key")
            }
            if let unknown = o.keys.sorted().first(where: { !["url", "key_file"].contains($0) }) {
                throw CLIError("unknown key '\(unknown)' in \(configPath)", fix: "the keys are url and key_file")
            }
            fileURL = o["url"] as? String
            fileKeyPath = (o["key_file"] as? String).map { ($0 as NSString).expandingTildeInPath }
        } else if config != nil || env["CONVEYORCTL_CONFIG"] != nil {
            throw CLIError(
                "the config file \(configPath) does not exist",
                fix: "create it, or leave out --config / CONVEYORCTL_CONFIG")
        }
        let base = (url ?? env["CONVEYOR_URL"] ?? fileURL ?? "http://127.0.0.1:8080").trimmingCharacters(
            in: CharacterSet(charactersIn: "/"))
        guard let parsed = URL(string: base), ["http", "https"].contains(parsed.scheme ?? ""), parsed.host != nil else {
            throw CLIError(
                "'\(base)' is not an http or https URL", fix: "pass --url http://host:8080 or set CONVEYOR_URL")
        }
        func read(_ path: String) throws -> String {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
                throw CLIError(
                    "cannot read the key file \(path)",
                    fix: "check the path and its permissions (it should be readable by you only)")
            }
            return text.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        var key: String?
        if let keyFile {
            key = try read(keyFile)
        } else if let k = env["CONVEYOR_API_KEY"], !k.isEmpty {
            key = k
        } else if let fileKeyPath {
            key = try read(fileKeyPath)
        }
        return APIClient(base: base, key: key, namespace: namespace)
    }

    /// What `conveyor dev` writes (the same path, relative to where it runs).
    static let devConfigPath = FileManager.default.currentDirectoryPath + "/.local/conveyorctl.yaml"
}

/// An error for people: what went wrong and what to do.
struct CLIError: Error, CustomStringConvertible {
    var message: String
    var fix: String?
    var requestID: String?
    /// The exit status (docs/api.md, "conveyorctl", exit statuses): what kind of failure, for scripts.
    var exitCode: Int32
    init(_ message: String, fix: String? = nil, requestID: String? = nil, exitCode: Int32 = CtlExit.failure) {
        self.message = message
        self.fix = fix
        self.requestID = requestID
        self.exitCode = exitCode
    }
    var description: String {
        var s = message
        if let fix { s += "\n  fix: \(fix)" }
        if let requestID { s += "\n  request id: \(requestID) (quote it when asking for help)" }
        return s
    }
}

/// The API over HTTP: JSON in, JSON out, problems turned into `CLIError`s.
struct APIClient: Sendable {
    let base: String
    let key: String?
    let namespace: String?

    struct Reply {
        var status: Int
        var json: JSONValue
        var headers: HTTPHeaders
    }

    /// One client for the process (never shut down: the process ends). A refused connection is
    /// reported at once and a silent host after 5 s, not retried for the whole request timeout.
    static let http: HTTPClient = {
        var c = HTTPClient.Configuration(timeout: .init(connect: .seconds(5), read: .seconds(120)))
        c.connectionPool.retryConnectionEstablishment = false
        return HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: c)
    }()

    /// A listing's pages: the `key` array of each page, following `next_cursor` while `all` (else
    /// one page). Returns the items and the cursor of the page after them, if there is one.
    func pages(_ path: String, key: String, query: [(String, String?)], all: Bool, from start: String? = nil)
        async throws -> (items: [JSONValue], next: String?)
    {
        var cursor = start
        var items: [JSONValue] = []
        repeat {
            let reply = try await call(.GET, path, query: query + [("cursor", cursor)])
            items += reply.json[key]?.arrayValue ?? []
            cursor = reply.json["next_cursor"]?.stringValue
        } while all && cursor != nil
        return (items, cursor)
    }

    func call(
        _ method: HTTPMethod, _ path: String, query: [(String, String?)] = [], body: JSONValue? = nil,
        accept: Set<Int> = [200, 201, 202]
    ) async throws -> Reply {
        guard let key else {
            throw CLIError(
                "no API key",
                fix:
                    """
                    set CONVEYOR_API_KEY, or pass --key-file FILE (an admin creates keys with 'conveyorctl key \
                    create' or 'conveyor apikey create')
                    """
            )
        }
        var items = query.compactMap { k, v in v.map { URLQueryItem(name: k, value: $0) } }
        if let namespace { items.append(URLQueryItem(name: "namespace", value: namespace)) }
        var components = URLComponents(string: base + path)!
        if !items.isEmpty { components.queryItems = items }
        // '+' in a query value would read as a space.
        components.percentEncodedQuery = components.percentEncodedQuery?.replacingOccurrences(of: "+", with: "%2B")
        var request = HTTPClientRequest(url: components.string!)
        request.method = method
        request.headers.add(name: "Authorization", value: "Bearer \(key)")
        request.headers.add(name: "User-Agent", value: "conveyorctl")
        if let body {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: body.jsonBytes))
        }
        for attempt in 1... {
            let response: HTTPClientResponse
            do {
                response = try await Self.http.execute(request, timeout: .seconds(120))
            } catch {
                throw CLIError(
                    "cannot reach the API at \(base): \(error)",
                    fix: "check --url / CONVEYOR_URL, and that 'conveyor api' (or 'conveyor dev') runs there",
                    exitCode: CtlExit.unreachable)
            }
            let bytes = try await response.body.collect(upTo: 64 << 20)
            let json = (try? JSONDecoder().decode(JSONValue.self, from: Data(bytes.readableBytesView))) ?? .null
            let status = Int(response.status.code)
            // Rate-limited: wait as told, a few times.
            if status == 429, attempt <= 5, let wait = response.headers.first(name: "Retry-After").flatMap(Int.init) {
                try await Task.sleep(for: .seconds(min(wait, 30)))
                continue
            }
            guard accept.contains(status) else { throw Self.problem(status, json, base: base) }
            return Reply(status: status, json: json, headers: response.headers)
        }
        fatalError("unreachable")
    }

    static func problem(_ status: Int, _ json: JSONValue, base: String) -> CLIError {
        let title = json["title"]?.stringValue ?? "HTTP \(status)"
        var message = "\(title): \(json["detail"]?.stringValue ?? "no details")"
        if let field = json["field"]?.stringValue {
            message += " (field \(field)" + (json["value"]?.stringValue.map { ", value \($0)" } ?? "") + ")"
        }
        let fix: String? =
            switch status {
            case 401: "check the key (CONVEYOR_API_KEY or --key-file): it may be mistyped, expired or revoked"
            case 403: "ask an admin for a key with a higher role ('conveyorctl key create --role ...')"
            case 404: "check the name, and the namespace: objects of other namespaces look like they do not exist"
            case 413: "send less: bodies are limited to 1 MiB (submit files in smaller batches)"
            case 429: "slow down, or ask for a higher limit (api.rate_limit.* in config/api.yaml)"
            case 503: "the API cannot reach its database or broker; see 'conveyor api' logs"
            default: nil
            }
        return CLIError(
            message, fix: fix, requestID: json["request_id"]?.stringValue, exitCode: CtlExit.forStatus(status))
    }
}

/// `-o`: what a command prints.
/// Checks a flag's seconds before any request: above 0 and at most `max`. JSON has no infinity
/// or NaN (such a number would go as null, which the API reads as "the default"), and a wait
/// past the bound would overflow its clock.
func checkSeconds(
    _ value: Double, flag: String, max: Double = TaskMessage.maxTimeoutSeconds, named: String = "365 days"
)
    throws
{
    guard value > 0, value <= max else {
        throw ValidationError("--\(flag) must be seconds above 0, at most \(Int(max)) (\(named)); got \(value)")
    }
}

enum OutputFormat: String, CaseIterable, ExpressibleByArgument, Sendable {
    /// Columns for people.
    case table
    /// The table with more columns, where there are more useful ones.
    case wide
    /// The API's reply as JSON, as the API sent it (keys sorted).
    case json
    /// The same value as YAML (keys sorted).
    case yaml
    /// `kind/name`, one a line, as kubectl's `-o name`.
    case name
}

/// Output: tables for people, JSON, YAML or names for scripts.
enum Output {
    /// `value` as a YAML document: keys sorted, text that would read as another type (`"yes"`,
    /// `"1"`, a timestamp) quoted, so loading it gives back the JSON value.
    static func yaml(_ value: JSONValue) -> String {
        (try? Yams.serialize(node: node(value), width: -1, allowUnicode: true)) ?? "null\n"
    }

    static func node(_ value: JSONValue) -> Node {
        switch value {
        case .null: return Node("null", Tag(.null))
        case .bool(let b): return Node(b ? "true" : "false", Tag(.bool))
        case .number(let n) where n.rounded() == n && abs(n) < 1e15: return Node(String(Int64(n)), Tag(.int))
        case .number(let n):
            // YAML 1.1 reads a float only with a '.': 1e+20 must be 1.0e+20.
            var text = String(n)
            if !text.contains("."), let e = text.firstIndex(where: { $0 == "e" || $0 == "E" }) {
                text.insert(contentsOf: ".0", at: e)
            }
            return Node(text, Tag(.float))
        case .string(let s):
            let scalar = s.represented()
            return .scalar(s.contains("\n") && scalar.style == .any ? Node.Scalar(s, Tag(.str), .literal) : scalar)
        case .array(let a): return Node(a.map(node))
        case .object(let o):
            return Node(o.sorted { $0.key < $1.key }.map { (Node.scalar($0.key.represented()), node($0.value)) })
        }
    }

    /// A listing as the API gives a page of it: `{key: items, next_cursor}` (the cursor if any).
    static func page(_ key: String, _ items: [JSONValue], next: String?) -> JSONValue {
        .object([key: .array(items)].merging(next.map { ["next_cursor": .string($0)] } ?? [:]) { a, _ in a })
    }

    /// An array's items, comma-separated (`-` when there are none).
    static func list(_ v: JSONValue?) -> String {
        let items = (v?.arrayValue ?? []).map(text)
        return items.isEmpty ? "-" : items.joined(separator: ",")
    }

    /// A mapping as `k=v` pairs, keys sorted (`-` when empty).
    static func pairs(_ v: JSONValue?) -> String {
        let o = v?.objectValue ?? [:]
        return o.isEmpty
            ? "-" : o.sorted { $0.key < $1.key }.map { "\($0.key)=\(text($0.value))" }.joined(separator: ",")
    }

    /// A run's error on one line, cut to 60 characters: `error_class: error_message`, else its reason.
    static func error(_ run: JSONValue) -> String {
        let parts = [run["error_class"]?.stringValue, run["error_message"]?.stringValue].compactMap { $0 }
        var s = parts.isEmpty ? (run["reason"]?.stringValue ?? "-") : parts.joined(separator: ": ")
        s = s.split(whereSeparator: \.isNewline).joined(separator: " ")
        return s.count > 60 ? String(s.prefix(59)) + "…" : s
    }

    /// One line per key of `object`: the key padded to `width`, then its value.
    static func fields(_ object: JSONValue, _ keys: [String], width: Int) -> [String] {
        keys.map { field($0, text(object[$0]), width: width) }
    }

    static func field(_ label: String, _ value: String, width: Int) -> String {
        "\(label.padding(toLength: max(width, label.count), withPad: " ", startingAt: 0)) \(value)"
    }

    static func text(_ v: JSONValue?) -> String {
        switch v {
        case nil, .null?: "-"
        case .string(let s)?: s
        case .number(let n)?: n.rounded() == n && abs(n) < 1e15 ? String(Int(n)) : String(n)
        case .bool(let b)?: b ? "yes" : "no"
        case let other?: String(decoding: other.jsonBytes, as: UTF8.self)
        }
    }
}

/// A progress bar on standard error, only when it is a terminal.
struct Progress {
    let total: Int
    let label: String
    let tty = isatty(STDERR_FILENO) == 1

    func update(_ done: Int) {
        guard tty else { return }
        let width = 30
        let filled = total == 0 ? width : width * done / total
        let bar =
            String(repeating: "=", count: filled) + (filled < width ? ">" : "")
            + String(repeating: " ", count: max(0, width - filled - 1))
        FileHandle.standardError.write(Data("\r[\(bar)] \(done)/\(total) \(label)".utf8))
        if done >= total { FileHandle.standardError.write(Data("\n".utf8)) }
    }
}

/// conveyorctl's exit statuses, one per kind of failure a script may handle differently.
enum CtlExit {
    static let failure: Int32 = 1  // bad input (400, 422), a server error, anything else
    static let endedBadly: Int32 = 2  // run wait: the run ended, not succeeded
    static let stillGoing: Int32 = 3  // run wait, queue drain: --timeout passed first
    static let auth: Int32 = 4  // 401, 403: the key is wrong, expired, revoked, or its role too low
    static let notFound: Int32 = 5  // 404
    static let conflict: Int32 = 6  // 409: exists already, cannot be cancelled, in progress
    static let rateLimited: Int32 = 7  // 429 after five waits as told
    static let unreachable: Int32 = 8  // no answer, or 503 (the API cannot reach its database or broker)
    static let usage: Int32 = 64  // a flag or argument is wrong (as ArgumentParser's usage error), or --yes is missing

    static func forStatus(_ status: Int) -> Int32 {
        switch status {
        case 401, 403: auth
        case 404: notFound
        case 409: conflict
        case 429: rateLimited
        case 502, 503, 504: unreachable
        default: failure
        }
    }
}

/// `--yes` for a command that deletes, revokes or cancels: without it, a question on a terminal;
/// with no terminal to ask on (a script, a pipe), a refusal before anything is sent.
struct Confirmation: ParsableArguments {
    @Flag(name: [.short, .long], help: "Do it without asking (needed when standard input is not a terminal).")
    var yes = false

    /// Returns when the user agreed (`--yes`, or `y` to `question` on a terminal); throws otherwise.
    func confirm(_ question: String) throws {
        if yes { return }
        guard isatty(STDIN_FILENO) == 1 else {
            throw CLIError(
                "refusing to \(question) without --yes: standard input is not a terminal to ask on",
                fix: "pass --yes (or -y) to \(question)", exitCode: CtlExit.usage)
        }
        FileHandle.standardError.write(Data("\(question)? [y/N] ".utf8))
        let answer = readLine()?.trimmingCharacters(in: .whitespaces).lowercased()
        guard answer == "y" || answer == "yes" else {
            throw CLIError("not confirmed: nothing was changed", exitCode: CtlExit.failure)
        }
    }
}
