import ConveyorCore
import Foundation
package import Logging
import Synchronization

/// One log line per event on standard error, as JSON, logfmt or plain text
/// (`CONVEYOR_LOG_FORMAT`). Metadata keys stay in dot notation (`run.id`, `task.name`,
/// `trace.id`); nested metadata is flattened the same way. Values under a key that names a
/// credential (`password`, `secret`, `token`, `authorization`, `api_key`, … or ending in one)
/// are written as `[redacted]`, and passwords in URLs or `password=` settings are masked
/// wherever they appear, in messages too (`redactPassword(in:)`).
package struct StructuredLogHandler: LogHandler {
    package enum Format: String, Sendable, CaseIterable { case json, logfmt, text }

    package var metadata: Logger.Metadata = [:]
    package var logLevel: Logger.Level
    let label: String
    let format: Format
    let sink: LogSink

    package init(label: String, format: Format, level: Logger.Level, sink: LogSink = .standardError) {
        self.label = label
        self.format = format
        self.logLevel = level
        self.sink = sink
    }

    package subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    package func log(event: LogEvent) {
        var fields: [(String, String)] = []
        var merged = metadata
        if let extra = event.metadata { merged.merge(extra) { _, new in new } }
        Self.flatten(merged, prefix: "", into: &fields)
        fields.sort { $0.0 < $1.0 }
        let time = Self.timestamp()
        let message = redactPassword(in: "\(event.message)")
        let line: String
        switch format {
        case .json:
            var out = "{\"time\":\(Self.quote(time)),\"level\":\(Self.quote(event.level.rawValue))"
            out += ",\"logger\":\(Self.quote(label)),\"message\":\(Self.quote(message))"
            for (k, v) in fields { out += ",\(Self.quote(k)):\(Self.quote(v))" }
            line = out + "}"
        case .logfmt:
            var out =
                """
                time=\(time) level=\(event.level.rawValue) logger=\(Self.logfmt(label)) \
                message=\(Self.logfmt(message))
                """
            for (k, v) in fields { out += " \(k)=\(Self.logfmt(v))" }
            line = out
        case .text:
            var out = "\(time) \(event.level.rawValue) \(label): \(message)"
            if !fields.isEmpty { out += " " + fields.map { "\($0.0)=\($0.1)" }.joined(separator: " ") }
            line = out
        }
        sink.write(line + "\n")
    }

    static func flatten(_ metadata: Logger.Metadata, prefix: String, into fields: inout [(String, String)]) {
        for (key, value) in metadata {
            let name = prefix.isEmpty ? key : prefix + "." + key
            switch value {
            case .dictionary(let d): flatten(d, prefix: name, into: &fields)
            case .array(let a):
                fields.append((name, Redaction.value(for: name, "[" + a.map { "\($0)" }.joined(separator: ", ") + "]")))
            case .string(let s): fields.append((name, Redaction.value(for: name, s)))
            case .stringConvertible(let c): fields.append((name, Redaction.value(for: name, c.description)))
            }
        }
    }

    static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = ts.tv_sec
        var tm = tm()
        gmtime_r(&t, &tm)
        return String(
            format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", Int(tm.tm_year) + 1900, Int(tm.tm_mon) + 1, Int(tm.tm_mday),
            Int(tm.tm_hour), Int(tm.tm_min), Int(tm.tm_sec), Int(ts.tv_nsec / 1_000_000))
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where u.value < 0x20: out += String(format: "\\u%04x", u.value)
            default: out.unicodeScalars.append(u)
            }
        }
        return out + "\""
    }

    static func logfmt(_ s: String) -> String {
        s.isEmpty || s.contains(where: { $0 == " " || $0 == "=" || $0 == "\"" || $0.isNewline }) ? quote(s) : s
    }
}

/// Where log lines go. Callers only enqueue (a lock held for an append): a thread of the
/// sink's own writes them with `write(2)`, one line at a time, so a slow reader of standard
/// error never blocks a task on Swift's cooperative pool. Past `capacity` lines waiting, new
/// lines are counted instead of kept, and a line saying how many were dropped follows.
package final class LogSink: Sendable {
    struct Queue {
        var lines: [String] = []
        var dropped = 0
        var writing = false
    }
    let fd: Int32
    let capacity: Int
    let queue = Mutex(Queue())
    let ready = DispatchSemaphore(value: 0)

    package init(fd: Int32, capacity: Int = 100_000) {
        self.fd = fd
        self.capacity = capacity
        let thread = Thread { [self] in drain() }
        thread.name = "conveyor.log"
        thread.start()
    }

    package static let standardError = LogSink(fd: 2)

    /// Writes what is still queued on standard error when the process exits normally.
    package static func flushAtExit() {
        atexit { LogSink.standardError.flush() }
    }

    func write(_ line: String) {
        let accepted = queue.withLock { q in
            guard q.lines.count < capacity else {
                q.dropped += 1
                return false
            }
            q.lines.append(line)
            return true
        }
        if accepted { ready.signal() }
    }

    /// Writes `text` after every line queued so far, in one `write(2)`, and returns once it is out:
    /// a process's last words, which threads still logging cannot cut into.
    package func writeNow(_ text: String) {
        write(text)
        flush()
    }

    /// Waits until every line enqueued so far is written (tests, and `exit`: see `flushAtExit`).
    package func flush() {
        while queue.withLock({ !$0.lines.isEmpty || $0.writing }) { usleep(1000) }
    }

    private func drain() {
        while true {
            ready.wait()
            let (lines, dropped) = queue.withLock { q in
                defer {
                    q.lines = []
                    q.dropped = 0
                    q.writing = true
                }
                return (q.lines, q.dropped)
            }
            for line in lines { writeAll(line) }
            if dropped > 0 {
                writeAll(
                    """
                    {\"level\":\"warning\",\"message\":\"\(dropped) log lines dropped: standard error was not read \
                    fast enough\"}\n
                    """
                )
            }
            queue.withLock { $0.writing = false }
        }
    }

    private func writeAll(_ line: String) {
        var bytes = Array(line.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeMutableBytes { Foundation.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if n <= 0 {
                if errno == EINTR { continue }
                return
            }
            offset += n
        }
    }
}

/// What never reaches a log line.
package enum Redaction {
    /// Key segments that name a credential.
    static let secretNames: Set<String> = [
        "password", "passwd", "secret", "token", "authorization", "api_key", "apikey", "credential",
        "credentials", "cookie", "private_key", "hs256_secret",
    ]

    /// Whether a metadata key (or parameter name) names a credential: its last segment is one of
    /// the names above or ends in `_<name>` (`db.password`, `client_secret`, `auth.token`).
    package static func isSecret(_ key: String) -> Bool {
        let last = key.split(separator: ".").last.map { $0.lowercased() } ?? key.lowercased()
        return secretNames.contains(last)
            || secretNames.contains { last.hasSuffix("_" + $0) || last.hasSuffix("-" + $0) }
    }

    static func value(for key: String, _ value: String) -> String {
        isSecret(key) ? "[redacted]" : redactPassword(in: value)
    }
}
