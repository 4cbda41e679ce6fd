import ConveyorAMQP
import ConveyorCore
import ConveyorTelemetry
import Foundation
import Logging
import Testing

/// The structured log handler: shapes, flattening and redaction (pure; a pipe as the sink).
@Suite("Structured logs")
struct LogHandlerTests {
    /// Logs through a handler writing into a pipe, and returns the lines.
    static func capture(_ format: StructuredLogHandler.Format, _ body: (Logger) -> Void) throws -> [String] {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        let sink = LogSink(fd: fds[1])
        var logger = Logger(label: "test") {
            StructuredLogHandler(label: $0, format: format, level: .trace, sink: sink)
        }
        logger[metadataKey: "worker.id"] = "w1"
        body(logger)
        sink.flush()
        close(fds[1])
        let data = FileHandle(fileDescriptor: fds[0], closeOnDealloc: true).readDataToEndOfFile()
        return String(decoding: data, as: UTF8.self).split(separator: "\n").map(String.init)
    }

    @Test func jsonLinesCarryDotKeysAndNeverCredentials() throws {
        let lines = try Self.capture(.json) { log in
            log.info(
                "run finished \"quoted\"\nsecond line",
                metadata: [
                    "run.id": "r-1", "trace.id": "abc",
                    "db": ["url": "postgresql://u:canary-1@db:5432/x", "password": "canary-2"],
                    "auth.token": "canary-3", "client_secret": "canary-4", "Authorization": "Bearer canary-5",
                    "count": "\(3)",
                ])
            log.error("cannot connect to amqp://guest:canary-6@broker:5672/%2F, retrying")
        }
        #expect(lines.count == 2)
        for line in lines {
            #expect(!line.contains("canary"), "\(line)")
            let o = try #require(
                try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "not JSON: \(line)")
            #expect(
                o["time"] is String && o["level"] is String && o["message"] is String
                    && o["logger"] as? String == "test")
            #expect(o["worker.id"] as? String == "w1", "the logger's own metadata")
        }
        let first = try #require(try JSONSerialization.jsonObject(with: Data(lines[0].utf8)) as? [String: Any])
        #expect(first["message"] as? String == "run finished \"quoted\"\nsecond line")
        #expect(first["run.id"] as? String == "r-1")
        #expect(
            first["db.url"] as? String == "postgresql://u:***@db:5432/x",
            "nested metadata is flattened with dots; URL passwords masked")
        #expect(first["db.password"] as? String == "[redacted]")
        #expect(first["auth.token"] as? String == "[redacted]")
        #expect(first["client_secret"] as? String == "[redacted]")
        #expect(first["Authorization"] as? String == "[redacted]")
        #expect(first["level"] as? String == "info")
        #expect(
            (try #require(try JSONSerialization.jsonObject(with: Data(lines[1].utf8)) as? [String: Any]))["message"]
                as? String
                == "cannot connect to amqp://guest:***@broker:5672/%2F, retrying")
    }

    @Test func logfmtQuotesWhatNeedsIt() throws {
        let lines = try Self.capture(.logfmt) { $0.warning("a b", metadata: ["run.id": "r-1", "error": "x=y \"z\""]) }
        #expect(lines.count == 1)
        #expect(
            lines[0].contains(#" level=warning logger=test message="a b" error="x=y \"z\"" run.id=r-1 worker.id=w1"#),
            "\(lines[0])")
    }

    @Test func levelsBelowTheHandlersAreDropped() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        let sink = LogSink(fd: fds[1])
        let logger = Logger(label: "t") { StructuredLogHandler(label: $0, format: .text, level: .warning, sink: sink) }
        logger.info("hidden")
        logger.warning("shown")
        sink.flush()
        close(fds[1])
        let text = String(
            decoding: FileHandle(fileDescriptor: fds[0], closeOnDealloc: true).readDataToEndOfFile(), as: UTF8.self)
        #expect(!text.contains("hidden") && text.contains("warning t: shown"))
    }

    @Test func maskingLeavesOrdinaryTextAlone() {
        #expect(redactPassword(in: "no url here @ all") == "no url here @ all")
        #expect(redactPassword(in: "http://host/path?a=b@c") == "http://host/path?a=b@c")
        #expect(redactPassword(in: "a https://u:p@h/x and amqp://v:q@i") == "a https://u:***@h/x and amqp://v:***@i")
        #expect(redactPassword(in: "http://host:8080/x@y") == "http://host:8080/x@y", "a port is not a password")
        #expect(
            redactPassword(in: "connect host=h password='a b' user=u failed")
                == "connect host=h password=*** user=u failed")
        #expect(
            Redaction.isSecret("db.password") && Redaction.isSecret("API_KEY") && !Redaction.isSecret("run.id")
                && !Redaction.isSecret("tokens_used"))
    }

    /// Passwords written unencoded with `/`, `?`, `#` or `@` in them: the userinfo ends at the
    /// last `@` of the URL. Before, the authority ended at the first `/`, `?` or `#`, which left
    /// these passwords whole in logs and errors.
    @Test func passwordsWithSlashQuestionMarkOrHashAreMasked() {
        #expect(redactPassword(in: "amqp://user:pa/ss?w#rd@host:5672/%2F") == "amqp://user:***@host:5672/%2F")
        #expect(redactPassword(in: "postgresql://u:p/a?s#s@host/db") == "postgresql://u:***@host/db")
        #expect(redactPassword(in: "postgresql://u:p@ss@host/db") == "postgresql://u:***@host/db")
        #expect(
            redactPassword(in: "cannot connect to amqp://guest:a/b#c@broker:5672/%2F, retrying")
                == "cannot connect to amqp://guest:***@broker:5672/%2F, retrying")
        #expect(
            redactPassword(in: "from amqp://u:x/y@h to postgresql://v:z?w@i/db")
                == "from amqp://u:***@h to postgresql://v:***@i/db")
        #expect(
            redactPassword(in: "'postgresql://u:p#1@h/db' is not valid") == "'postgresql://u:***@h/db' is not valid")
        #expect(AMQPConfiguration(url: "amqp://u:pa/ss?w#rd@h:5672/%2F").redactedURL == "amqp://u:***@h:5672/%2F")
        // An '@' in a path or query is not a userinfo, with or without a port before it.
        #expect(redactPassword(in: "http://host:8080/p?mail=a@b.example") == "http://host:8080/p?mail=a@b.example")
        #expect(redactPassword(in: "https://h/p?at=12:30&by=a@b.example") == "https://h/p?at=12:30&by=a@b.example")
        #expect(redactPassword(in: "http://user@host:8080/x@y") == "http://user@host:8080/x@y")
    }
}
