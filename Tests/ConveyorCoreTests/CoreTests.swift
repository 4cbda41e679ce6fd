import ConveyorAMQP
import ConveyorConfig
import ConveyorCore
import ConveyorFaults
import ConveyorPostgres
import Foundation
import Testing
import Tracing

@testable import ConveyorTelemetry

@Suite struct RunStateTests {
    @Test func transitionsOnlyMoveForward() {
        #expect(RunState.queued.canTransition(to: .dispatched))
        #expect(RunState.dispatched.canTransition(to: .running))
        #expect(RunState.queued.canTransition(to: .succeeded), "a fast worker's result may beat the dispatched mark")
        #expect(!RunState.running.canTransition(to: .dispatched))
        #expect(!RunState.dispatched.canTransition(to: .queued))
        #expect(RunState.running.canTransition(to: .running), "a redelivered run may be taken over")
        for final in RunState.allCases where final.isFinal {
            for next in RunState.allCases {
                #expect(!final.canTransition(to: next), "\(final) → \(next) must be refused")
            }
        }
    }

    @Test func predecessorsAreTheSQLGuards() {
        #expect(Set(RunState.predecessors(of: .succeeded)) == [.scheduled, .queued, .dispatched, .running])
        #expect(Set(RunState.predecessors(of: .running)) == [.scheduled, .queued, .dispatched, .running])
    }
}

@Suite struct ScheduleTests {
    @Test func parsesIntervalsAndOnce() throws {
        #expect(try Schedule(parsing: "every 30s") == .interval(seconds: 30))
        #expect(try Schedule(parsing: "every 5m") == .interval(seconds: 300))
        #expect(try Schedule(parsing: "every 250ms") == .interval(seconds: 0.25))
        #expect(try Schedule(parsing: "once") == .once)
        #expect(try Schedule(parsing: "every 2h").text == "every 7200s")
        #expect(try Schedule(parsing: Schedule.interval(seconds: 0.2).text) == .interval(seconds: 0.2))
    }

    @Test(arguments: ["every", "every 0s", "every -5s", "every 5x", "daily", "every 1ms"])
    func refusesBadSchedulesNamingTheField(_ text: String) {
        #expect { try Schedule(parsing: text) } throws: { e in
            let v = try #require(e as? ValidationError)
            return v.field == "schedule" && v.value == text && !v.hint.isEmpty
        }
    }
}

@Suite struct MessageCodecTests {
    let message = TaskMessage(
        runID: UUID(), taskID: UUID(), taskName: "n", occurrence: Date(timeIntervalSince1970: 1_700_000_000.5),
        attempt: 2, queue: "q", executor: "shell", parameters: .object(["argv": .array([.string("/bin/echo")])]),
        timeoutSeconds: 30)

    @Test func taskMessageRoundTrips() throws {
        let decoded = try MessageCodec.decodeTask(MessageCodec.encode(message))
        #expect(decoded == message)
        #expect(decoded.idempotencyKey == message.runID.uuidString.lowercased())
    }

    /// `start_by` travels when set and is absent otherwise (messages of older dispatchers carry
    /// none, and a worker starts them whenever it can).
    @Test func startByRoundTripsAndIsOptional() throws {
        #expect(!String(decoding: MessageCodec.encode(message), as: UTF8.self).contains("start_by"))
        var m = message
        m.startBy = Date(timeIntervalSince1970: 1_700_003_600.25)
        let body = MessageCodec.encode(m)
        #expect(String(decoding: body, as: UTF8.self).contains(#""start_by":"2023-11-14T23:13:20.250000Z""#))
        #expect(try MessageCodec.decodeTask(body) == m)
    }
    @Test func missingFieldIsNamed() throws {
        var obj = try JSONSerialization.jsonObject(with: Data(MessageCodec.encode(message))) as! [String: Any]
        obj.removeValue(forKey: "executor")
        let body = Array(try JSONSerialization.data(withJSONObject: obj))
        #expect { try MessageCodec.decodeTask(body) } throws: { ($0 as? ValidationError)?.field == "executor" }
        #expect(
            MessageCodec.runID(inMalformed: body) == message.runID,
            "the run id is still readable, so the run can be marked")
    }

    @Test func wrongVersionAndGarbageAreRefused() throws {
        var m = message
        m.version = 2
        #expect { try MessageCodec.decodeTask(MessageCodec.encode(m)) } throws: {
            ($0 as? ValidationError)?.field == "version"
        }
        #expect { try MessageCodec.decodeTask(Array("{nope".utf8)) } throws: {
            ($0 as? ValidationError)?.field == "body"
        }
        #expect { try MessageCodec.decodeTask([0xff, 0xfe, 0x00]) } throws: { $0 is ValidationError }
        #expect(MessageCodec.runID(inMalformed: Array("{nope".utf8)) == nil)
    }

    @Test func escapingRoundTripsThroughAStandardDecoder() throws {
        let nasty = "quote\" back\\ nl\n tab\t ctl\u{01} é 😀 </script>"
        var m = message
        m.taskName = nasty
        m.parameters = .object([
            "s": .string(nasty), "n": .number(1.5), "i": .number(-3), "b": .bool(false), "z": .null,
            "a": .array([.string("x"), .object([:])]),
        ])
        #expect(try MessageCodec.decodeTask(MessageCodec.encode(m)) == m)
        let st = StatusMessage(
            runID: UUID(), attempt: 2, event: .finished, outcome: .timedOut, exitCode: 137, output: nasty,
            errorClass: "timeout", errorMessage: nasty, workerID: "w-1",
            at: Date(timeIntervalSince1970: 1_795_435_200.5),
            startedAt: Date(timeIntervalSince1970: 1_795_435_199.25))
        #expect(try MessageCodec.decodeStatus(MessageCodec.encode(st)) == st)
    }

    @Test func finishedStatusNeedsAnOutcome() {
        let s = StatusMessage(runID: UUID(), attempt: 1, event: .finished, workerID: "w")
        #expect { try MessageCodec.decodeStatus(MessageCodec.encode(s)) } throws: {
            ($0 as? ValidationError)?.field == "outcome"
        }
    }
}

@Suite struct TracePropagationTests {
    // No tracer is bootstrapped in this process: Traces falls back to PropagatingTracer.
    @Test func injectAndExtractRoundTripThroughAMQPHeaders() throws {
        var root = Traces.startSpan("root", context: .topLevel).context
        root.baggageHeader = "tenant=42"
        var headers: AMQPHeaders = [:]
        Traces.inject(root, into: &headers, using: AMQPHeadersInjector())
        #expect(headers["traceparent"]?.stringValue?.hasPrefix("00-") == true)
        #expect(headers["baggage"] == .string("tenant=42"))
        let extracted = Traces.context(headers, using: AMQPHeadersExtractor())
        #expect(Traces.traceID(extracted) != nil)
        #expect(Traces.traceID(extracted) == Traces.traceID(root))
        #expect(extracted.baggageHeader == "tenant=42")
        let child = Traces.startSpan("child", context: extracted).context
        #expect(Traces.traceID(child) == Traces.traceID(root))
        #expect(Traces.traceparent(child) != Traces.traceparent(root))
        #expect(child.baggageHeader == "tenant=42", "baggage is carried to children")
    }

    @Test func aTracestateThatIsNotW3CIsLeftOutAndTheTraceGoesOn() throws {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        let headers: AMQPHeaders = [
            "traceparent": .string(parent), "tracestate": .string("Foo"), "seal": .string("secret"),
        ]
        let ctx = Traces.context(headers, using: AMQPHeadersExtractor())
        #expect(Traces.traceID(ctx) == "0af7651916cd43dd8448eb211c80319c", "the trace goes on")
        #expect(Traces.headers(ctx)["tracestate"] == nil, "the malformed tracestate is not propagated")
        let kept = Traces.context(headers: ["traceparent": parent, "tracestate": "vendor=1"])
        #expect(Traces.headers(kept)["tracestate"] == "vendor=1")
    }

    @Test func aTraceparentIsReadAsTheW3CSpecificationSays() throws {
        let tp = try #require(Traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))
        #expect(tp.version == "00" && tp.flags == "01")
        #expect(tp.traceID == "0af7651916cd43dd8448eb211c80319c")
        #expect(tp.spanID == "b7ad6b7169203331")
        // A later version may carry more fields after a dash; version 00 may not.
        #expect(Traceparent("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes")?.version == "cc")
        for bad in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  // 00 is exactly 55 characters
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  // version ff is invalid
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",  // all-zero trace id
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  // all-zero span id
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  // uppercase hex
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",  // short span id
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0g",  // not hex
            "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",  // a later version's fields need a dash
            "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01", "00-zz", "",
        ] {
            #expect(Traceparent(bad) == nil, "\(bad)")
        }
        #expect(Traceparent.traceID(nil) == nil)
        #expect(Traceparent.traceID("garbage") == nil)
    }

    @Test func aStoredParentIsContinuedAndGarbageStartsARoot() throws {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        let tp = try #require(
            Traces.traceparent(Traces.startSpan("dispatch", context: Traces.context(traceparent: parent)).context))
        #expect(Traceparent.traceID(tp) == "0af7651916cd43dd8448eb211c80319c")
        #expect(tp != parent)
        let root = try #require(
            Traces.traceparent(Traces.startSpan("dispatch", context: Traces.context(traceparent: "garbage")).context))
        #expect(root.split(separator: "-").count == 4)
        #expect(Traceparent.traceID(root) != "0af7651916cd43dd8448eb211c80319c")
        #expect(
            Traces.traceID(
                Traces.context(["traceparent": .string("00-zz")] as AMQPHeaders, using: AMQPHeadersExtractor())) == nil)
    }

    @Test func otelVariablesSwiftOTelWouldStopTheProcessOnAreRefusedByName() throws {
        for (key, value) in [
            ("OTEL_PROPAGATORS", "tracecontext,b3"), ("OTEL_TRACES_SAMPLER", "jaeger_remote"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
        ] {
            #expect { try Traces.validate([key: value]) } throws: { e in
                let v = e as? ValidationError
                return v?.field == key && v?.value == value && v?.hint.isEmpty == false
            }
        }
        try Traces.validate([
            "OTEL_PROPAGATORS": "tracecontext,baggage", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json", "OTEL_TRACES_EXPORTER": "otlp",
        ])
    }
}

@Suite struct PostgresValueTests {
    @Test func arrayLiteralsQuoteAndEscapeEveryElement() {
        #expect(["a", "b\"c", "d\\e", "{,}"].postgresText == #"{"a","b\"c","d\\e","{,}"}"#)
        #expect([String?.some("x"), nil].postgresText == #"{"x",NULL}"#)
        #expect(
            ["žluť \"ok\"", "日本", ""].postgresText == #"{"žluť \"ok\"","日本",""}"#,
            "multi-byte text passes through whole")
    }

    @Test func uuidTextIsTheLowercaseCanonicalForm() {
        for _ in 0..<1000 {
            let id = UUID()
            #expect(id.lowercasedString == id.uuidString.lowercased())
        }
        for _ in 0..<1000 {
            let id = UUID()
            #expect(UUID(canonical: id.lowercasedString) == id && UUID(canonical: id.uuidString) == id)
        }
        for bad in [
            "", "0af7651916cd43dd8448eb211c80319c", "0af76519-16cd-43dd-8448-eb211c80319",
            "0af76519-16cd-43dd-8448-eb211c80319cc",
            "0af76519+16cd-43dd-8448-eb211c80319c", "0af76519-16cd-43dd-8448-eb211c80319g",
            "0af76519-16cd-43dd-8448-eb211c8031é",
        ] {
            #expect(UUID(canonical: bad) == nil, "\(bad)")
        }
        let ids = (0..<200).map { _ in UUID() }
        #expect(
            ids.sorted { $0.precedes($1) } == ids.sorted { $0.uuidString < $1.uuidString }, "byte order is text order")
        #expect(
            [UUID(uuidString: "0AF76519-16CD-43DD-8448-EB211C80319C")!].postgresText
                == "{0af76519-16cd-43dd-8448-eb211c80319c}", "hex and dashes need no quotes")
        let id = UUID()
        #expect([id, nil].postgresText == "{\(id.lowercasedString),NULL}")
        let instant = Date(timeIntervalSince1970: 1_795_435_200.25)
        #expect([instant, nil].postgresText == "{2026-11-23T12:00:00.250000Z,NULL}")
    }

    @Test func timestampsParseWhatTheServerPrints() {
        #expect(Timestamp.parse("2026-11-23 12:00:00+00")?.timeIntervalSince1970 == 1_795_435_200)
        #expect(Timestamp.parse("2026-11-23 12:00:00.25+00")?.timeIntervalSince1970 == 1_795_435_200.25)
        #expect(Timestamp.parse("2026-11-23 13:30:00+01:30")?.timeIntervalSince1970 == 1_795_435_200)
        #expect(Timestamp.parse("nonsense") == nil)
    }

    @Test func urlsAreRedacted() {
        #expect(redactPassword(in: "postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db")
        #expect(redactPassword(in: "host=h password=secret user=u") == "host=h password=*** user=u")
        #expect(AMQPConfiguration(url: "amqp://u:secret@h:5672/%2F").redactedURL == "amqp://u:***@h:5672/%2F")
    }
}

@Suite struct TimestampTests {
    @Test func formatsAndParsesToTheMicrosecond() {
        for t in [0.0, 1_795_435_200.123456, 951_782_400.5, -86_400.25, 4_102_444_799.999999] {
            let d = Date(timeIntervalSince1970: t)
            let back = Timestamp.parse(Timestamp.format(d))
            #expect(
                back.map { abs($0.timeIntervalSince1970 - t) < 0.000_001 } == true, "\(t) → \(Timestamp.format(d))")
        }
        #expect(Timestamp.format(Date(timeIntervalSince1970: 1_795_435_200.25)) == "2026-11-23T12:00:00.250000Z")
        #expect(Timestamp.format(Date(timeIntervalSince1970: 951_782_400)) == "2000-02-29T00:00:00.000000Z")
    }

    /// PostgreSQL has no year 0: an instant before 0001-01-01T00:00:00Z is not read (one stored
    /// made the database refuse the statement), and every instant read can be written back.
    @Test func instantsBeforeYearOneAreNotRead() {
        #expect(Timestamp.parse("0000-01-01T00:00:00Z") == nil)
        #expect(Timestamp.parse("0000-12-31T23:59:59.999Z") == nil)
        #expect(Timestamp.parse("0001-01-01T00:30:00+01:00") == nil, "year 0 once the offset is applied")
        let first = Timestamp.parse("0001-01-01T00:00:00Z")
        #expect(first?.timeIntervalSince1970 == Double(Timestamp.earliestSeconds))
        #expect(first.map(Timestamp.format) == "0001-01-01T00:00:00.000000Z")
        #expect(Timestamp.parse("9999-12-31T23:59:59Z") != nil)
        // Carried past 9999 by the offset: PostgreSQL would print a five-digit year, not read back.
        #expect(Timestamp.parse("9999-12-31T23:59:59-01:00") == nil)
    }

    /// The in-place form against Foundation's calendar, over instants from 1600 to 9999 (before and
    /// after the epoch); past 9999 the general form still writes the year whole.
    @Test func formatsAsTheGregorianCalendarSays() {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = .gmt
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let micros = Int64.random(in: -11_676_096_000_000_000...253_402_300_799_999_999, using: &rng)
            let d = Date(timeIntervalSince1970: Double(micros) / 1_000_000)
            let c = calendar.dateComponents([.year, .month, .day, .hour, .minute, .second], from: d)
            let exact = Int64((d.timeIntervalSince1970 * 1_000_000).rounded())
            let fraction = ((exact % 1_000_000) + 1_000_000) % 1_000_000
            let whole = Date(timeIntervalSince1970: Double((exact - fraction) / 1_000_000))
            let w = calendar.dateComponents([.year, .month, .day, .hour, .minute, .second], from: whole)
            let expected = String(
                format: "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", w.year!, w.month!, w.day!, w.hour!, w.minute!,
                w.second!, Int(fraction))
            #expect(Timestamp.format(d) == expected, "\(micros) \(c)")
        }
        #expect(Timestamp.format(Date(timeIntervalSince1970: 253_402_300_800)) == "10000-01-01T00:00:00.000000Z")
        // The ends of the in-place form, a microsecond before the epoch, and a rounding that
        // carries into the next second.
        for (t, text) in [
            (-62_167_219_200.0, "0000-01-01T00:00:00.000000Z"), (-0.000_001, "1969-12-31T23:59:59.999999Z"),
            (253_402_300_799.5, "9999-12-31T23:59:59.500000Z"),
            (1_795_435_199.999_999_6, "2026-11-23T12:00:00.000000Z"),
        ] {
            #expect(Timestamp.format(Date(timeIntervalSince1970: t)) == text, "\(t)")
        }
    }

    /// A date from arithmetic on a hostile number (a task's timeout added to now) is written, not
    /// a trap: the dispatcher formats each run's deadline this way.
    @Test func anInstantNoClockReachesIsWrittenAsTheBound() {
        #expect(Timestamp.format(Date(timeIntervalSince1970: 1e300)) == "287168-08-24T16:00:00.000000Z")
        #expect(Timestamp.format(Date(timeIntervalSince1970: 1e13)) == "287168-08-24T16:00:00.000000Z")
        #expect(
            Timestamp.format(Date(timeIntervalSince1970: -1e300))
                == Timestamp.format(Date(timeIntervalSince1970: -9e12)))
        #expect(Timestamp.format(Date(timeIntervalSince1970: .infinity)).hasPrefix("287168-"))
        #expect(Timestamp.format(Date(timeIntervalSince1970: .nan)) == "1970-01-01T00:00:00.000000Z")
    }

    @Test(arguments: [
        "", "2026-13-01T00:00:00Z", "2026-11-23T12:00:00", "2026-11-23T12:00:00Zjunk", "2026-11-23X12:00:00Z",
        "2026-11-23T12:00:00.Z",
    ])
    func refusesWhatIsNotAnInstant(_ s: String) {
        #expect(Timestamp.parse(s) == nil)
    }

    @Test func formattingIsSafeFromManyThreadsAtOnce() async {
        // Foundation's ISO8601FormatStyle crashed the worker here under load; this must not.
        await withTaskGroup(of: Bool.self) { g in
            for i in 0..<64 {
                g.addTask {
                    (0..<2000).allSatisfy { j in
                        Timestamp.parse(Timestamp.format(Date(timeIntervalSince1970: Double(i * 1000 + j)))) != nil
                    }
                }
            }
            for await ok in g { #expect(ok) }
        }
    }
}

@Suite struct FaultInjectionTests {
    @Test func parsesTheTestOnlySwitches() throws {
        #expect(try FaultInjection.parse(nil).isEmpty)
        #expect(try FaultInjection.parse("").isEmpty)
        let f = try FaultInjection.parse(
            "dispatcher-crash=mid-batch, no-confirms,worker-crash-on-task=crasher-0,isolation-unroutable")
        #expect(f.dispatcherCrash == .midBatch)
        #expect(f.publishWithoutConfirms)
        #expect(f.workerCrashOnTask == "crasher-0")
        #expect(f.isolationUnroutable)
    }

    @Test func refusesAnythingElseNamingTheItem() {
        for bad in [
            "bogus", "dispatcher-crash=sometime", "no-confirms=yes", "worker-crash-on-task=", "dispatcher-crash",
            "isolation-unroutable=1",
        ] {
            #expect(throws: ValidationError.self) { try FaultInjection.parse(bad) }
            do { _ = try FaultInjection.parse(bad) } catch {
                #expect(
                    error.field == "CONVEYOR_TEST_FAULTS"
                        && ("\(error)".contains("leave it unset in production")
                            || "\(error)".contains("dispatcher-crash is one of")),
                    "\(error)")
            }
        }
    }
}

@Suite struct StorableTextTests {
    @Test func nulBecomesTheReplacementCharacterAndNothingElseChanges() throws {
        #expect("a\0b\0".storable == "a\u{FFFD}b\u{FFFD}")
        #expect("plain – ünïcode".storable == "plain – ünïcode")
        let s = StatusMessage(
            runID: UUID(), attempt: 1, event: .finished, outcome: .failed, exitCode: 1,
            output: "out\0", errorClass: "c\0", errorMessage: "m\0", workerID: "w\0", at: Date())
        let d = try MessageCodec.decodeStatus(MessageCodec.encode(s))
        #expect(
            [d.output, d.errorClass, d.errorMessage, d.workerID] == [
                "out\u{FFFD}", "c\u{FFFD}", "m\u{FFFD}", "w\u{FFFD}",
            ])
    }
}
