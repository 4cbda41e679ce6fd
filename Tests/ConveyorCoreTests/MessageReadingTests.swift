import ConveyorCore
import Foundation
import Testing

/// The one-pass reader of task messages, statuses and status batches (`JSONReader`) against
/// Foundation's `JSONDecoder` reading the same bytes into the messages' `Codable` forms, which
/// is what it replaced: both accept the same bodies with the same values and refuse the same ones,
/// over every strict prefix and thousands of single-byte corruptions of real messages. Then the
/// refusals a hostile sender could aim at a hand-written reader: deep nesting, duplicates, bad
/// escapes, bad numbers, bad UTF-8, trailing data.
@Suite struct MessageReadingTests {
    static let task: TaskMessage = {
        var m = TaskMessage(
            runID: UUID(), taskID: UUID(), taskName: "nightly \"report\" é 😀",
            occurrence: Date(timeIntervalSince1970: 1_795_435_200.25),
            attempt: 3, queue: "reports", executor: "shell",
            parameters: ["argv": ["/bin/echo", "a\\b\n\u{01}"], "n": 1.5, "i": -3, "z": .null, "t": true, "o": [:]],
            timeoutSeconds: 30.5)
        m.startBy = Date(timeIntervalSince1970: 1_795_438_800.5)
        m.proof = "cHJvb2Y"
        m.inputs = ["upstream": ["rows": 12, "ok": false]]
        return m
    }()

    static let status = StatusMessage(
        runID: UUID(), attempt: 2, event: .finished, outcome: .timedOut, exitCode: -9, output: "out\t\"x\"\n💥",
        errorClass: "timeout", errorMessage: "exceeded \\ 30 s", workerID: "w-1",
        at: Date(timeIntervalSince1970: 1_795_435_230.125), startedAt: Date(timeIntervalSince1970: 1_795_435_200),
        detached: false, result: ["rows": [1, 2.5, "three", .null]])

    /// Foundation's reading of the same bytes: the value, or nil when it refuses them.
    static func reference<T: Decodable>(_ type: T.Type, _ body: [UInt8]) -> T? {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .custom { dec in
            let c = try dec.singleValueContainer()
            guard let date = Timestamp.parse(try c.decode(String.self)) else {
                throw DecodingError.dataCorruptedError(in: c, debugDescription: "not an instant")
            }
            return date
        }
        return try? d.decode(T.self, from: Data(body))
    }

    /// Ours: the value, or nil when refused (checks after reading, such as the version, aside).
    static func ours<T>(_ read: ([UInt8]) throws(ValidationError) -> T, _ body: [UInt8]) -> T? {
        do { return try read(body) } catch { return nil }
    }

    /// Where we refuse what Foundation takes, on purpose, as RFC 8259 and Python's `json` do: a
    /// member given twice (Foundation keeps one of them), a comma before a closing bracket, and a
    /// UUID that is not 32 hex digits in the 8-4-4-4-12 form (Foundation's parser reads other
    /// bytes as digits).
    static func refusedOnPurpose<T>(_ read: ([UInt8]) throws(ValidationError) -> T, _ body: [UInt8]) -> Bool {
        do {
            _ = try read(body)
            return false
        } catch {
            return error.hint.contains("twice") || error.hint.contains("a comma before")
                || (["run_id", "task_id"].contains(error.field) && UUID(canonical: error.value) == nil)
        }
    }

    static func readTask(_ b: [UInt8]) throws(ValidationError) -> TaskMessage { try MessageCodec.decodeTask(b) }
    static func readStatus(_ b: [UInt8]) throws(ValidationError) -> StatusMessage {
        try MessageCodec.decodeStatus(b)
    }

    /// The variants compared: each body, every strict prefix of it, and every byte replaced in
    /// turn by each of a set of bytes that change JSON's structure, numbers, names or encoding.
    static func variants(of body: [UInt8]) -> [[UInt8]] {
        var out = [body]
        for n in 0..<body.count { out.append(Array(body.prefix(n))) }
        let substitutes = Array(#" "\0189aeE{}[],:-.nt/u"#.utf8) + [0x01, 0x7F, 0xC3, 0xFF]
        for i in body.indices {
            for s in substitutes where s != body[i] {
                var v = body
                v[i] = s
                out.append(v)
            }
        }
        return out
    }

    @Test func taskMessagesReadAsFoundationReadsThem() {
        var bodies = [MessageCodec.encode(Self.task)]
        // Another writer's layout: members in another order, spaces and newlines, escaped slashes.
        let pretty = try! JSONSerialization.data(
            withJSONObject: try! JSONSerialization.jsonObject(with: Data(bodies[0])), options: [.prettyPrinted])
        bodies.append(Array(pretty))
        var accepted = 0
        var refused = 0
        for body in bodies {
            for v in Self.variants(of: body) {
                let theirs = Self.reference(TaskMessage.self, v)
                let mine = Self.ours(Self.readTask, v)
                // Foundation's form has no version check: a variant with version 2 is refused by
                // us after reading, as it was before.
                if let theirs,
                    theirs.version != 1 || theirs.attempt < 1 || !(theirs.timeoutSeconds > 0) || theirs.executor.isEmpty
                {
                    #expect(mine == nil)
                    continue
                }
                if mine == nil && Self.refusedOnPurpose(Self.readTask, v) { continue }
                #expect(mine == theirs, "\(String(decoding: v, as: UTF8.self))")
                if mine == nil { refused += 1 } else { accepted += 1 }
            }
        }
        #expect(accepted > 100 && refused > 1000, "the corpus exercises both sides: \(accepted) / \(refused)")
    }

    @Test func statusesReadAsFoundationReadsThem() {
        var accepted = 0
        var refused = 0
        for v in Self.variants(of: MessageCodec.encode(Self.status)) {
            let theirs = Self.reference(StatusMessage.self, v)
            let mine = Self.ours(Self.readStatus, v)
            if var theirs, theirs.version == 1, theirs.event != StatusEvent.finished || theirs.outcome != nil {
                // What decodeStatus does after reading, whichever reader read.
                theirs.result = StatusMessage.bounded(theirs.result)
                if mine == nil && Self.refusedOnPurpose(Self.readStatus, v) { continue }
                #expect(mine == theirs, "\(String(decoding: v, as: UTF8.self))")
            } else {
                #expect(mine == nil, "\(String(decoding: v, as: UTF8.self))")
            }
            if mine == nil { refused += 1 } else { accepted += 1 }
        }
        #expect(accepted > 100 && refused > 1000, "the corpus exercises both sides: \(accepted) / \(refused)")
    }

    @Test func everyStrictPrefixOfABatchIsRefusedAndTheWholeReadsBack() throws {
        let items = (0..<3).map { i in
            StatusBatchItem(
                body: MessageCodec.encode(Self.status), seal: "s\(i)", traceparent: i == 1 ? nil : "00-a-b-01",
                tracestate: nil)
        }
        let body = MessageCodec.encode(batch: items)
        #expect(try MessageCodec.decode(batch: body) == items)
        for n in 0..<body.count {
            #expect(throws: ValidationError.self) { try MessageCodec.decode(batch: Array(body.prefix(n))) }
        }
    }

    /// A refusal, by field and hint.
    static func refusal(_ json: String, _ read: ([UInt8]) throws(ValidationError) -> Any = readStatus)
        -> ValidationError?
    {
        do {
            _ = try read(Array(json.utf8))
            return nil
        } catch { return error }
    }

    /// A `started` status with only its required members, and `patch` (members) before them.
    static func statusJSON(_ patch: String) -> String {
        let started = StatusMessage(runID: UUID(), attempt: 1, event: .started, workerID: "w")
        let base = String(decoding: MessageCodec.encode(started), as: UTF8.self)
        return patch.isEmpty ? base : "{\(patch)," + base.dropFirst()
    }

    @Test func refusalsNameTheField() {
        let missing = Self.refusal(
            #"{"version":1,"attempt":1,"event":"started","worker_id":"w","at":"2026-11-23T12:00:00Z"}"#)
        #expect(missing?.field == "run_id" && missing?.value == "(missing)")
        let wrongType = Self.refusal(
            #"{"version":1,"run_id":"\#(UUID())","attempt":"2","event":"started","worker_id":"w","at":"2026-11-23T12:00:00Z"}"#
        )
        #expect(
            wrongType?.field == "attempt" && wrongType?.hint.contains("expected an integer, found a string") == true)
        let badEvent = Self.refusal(
            #"{"version":1,"run_id":"\#(UUID())","attempt":2,"event":"begun","worker_id":"w","at":"2026-11-23T12:00:00Z"}"#
        )
        #expect(badEvent?.field == "event" && badEvent?.value == "begun" && badEvent?.hint.contains("started") == true)
        let badRun = Self.refusal(
            #"{"version":1,"run_id":"run-1","attempt":2,"event":"started","worker_id":"w","at":"2026-11-23T12:00:00Z"}"#
        )
        #expect(badRun?.field == "run_id" && badRun?.value == "run-1")
        let inBatch = Self.refusal(
            #"{"version":1,"statuses":[{"body":"{}"},{"seal":"x"}]}"#,
            { (b) throws(ValidationError) in try MessageCodec.decode(batch: b) })
        #expect(inBatch?.field == "statuses[1].body" && inBatch?.value == "(missing)")
        let fraction = Self.refusal(Self.statusJSON(#""exit_code":1.5"#))
        #expect(fraction?.field == "exit_code" && fraction?.value == "1.5")
    }

    /// A member given twice is refused by name: a sender cannot show one value to one reader and
    /// another to the next.
    @Test func aMemberGivenTwiceIsRefused() {
        let twice = Self.refusal(Self.statusJSON(#""worker_id":"someone-else""#))
        #expect(twice?.field == "worker_id" && twice?.hint.contains("twice") == true)
        #expect(Self.refusal(Self.statusJSON(#""x-unknown":[1,{"a":null}]"#)) == nil, "unknown members are skipped")
        let unknownTwice = Self.refusal(Self.statusJSON(#""x-new":1,"x-new":2"#))
        #expect(unknownTwice?.field == "x-new" && unknownTwice?.hint.contains("twice") == true)
        let nestedTwice = Self.refusal(Self.statusJSON(#""result":{"a":1,"a":2}"#))
        #expect(nestedTwice?.field == "result.a" && nestedTwice?.hint.contains("twice") == true)
    }

    /// Integers are read exactly, to the last digit and across `Int`'s whole range (a float
    /// holds 53 bits); a whole number written with a fraction or an exponent is taken.
    @Test func integersAreReadExactly() throws {
        func status(attempt text: String) -> String {
            #"{"version":1,"run_id":"\#(UUID())","attempt":\#(text),"event":"started","worker_id":"w","at":"2026-11-23T12:00:00Z"}"#
        }
        func attempt(_ text: String) -> Int? {
            try? MessageCodec.decodeStatus(Array(status(attempt: text).utf8)).attempt
        }
        #expect(attempt("9007199254740993") == 9_007_199_254_740_993)
        #expect(attempt("\(Int.max)") == Int.max)
        #expect(attempt("\(Int.min)") == Int.min)
        #expect(attempt("-0") == 0)
        #expect(attempt("2.0") == 2 && attempt("1e2") == 100 && attempt("-25E-1") == nil)
        let over = Self.refusal(status(attempt: "9223372036854775808"))
        #expect(over?.field == "attempt" && over?.value == "9223372036854775808")
        #expect(Self.refusal(status(attempt: "-9223372036854775809"))?.field == "attempt")
    }

    /// A status's worker id is 1 to 200 characters, as a heartbeat's: a longer one overflowed an
    /// index entry of `runs`, and PostgreSQL refused the whole batch it came in.
    @Test func aWorkerIDPast200CharactersIsRefused() {
        func status(_ worker: String) -> String {
            #"{"version":1,"run_id":"\#(UUID())","attempt":1,"event":"started","worker_id":"\#(worker)","at":"2026-11-23T12:00:00Z"}"#
        }
        let refusal = Self.refusal(status(String(repeating: "w", count: 201)))
        #expect(refusal?.field == "worker_id", "\(String(describing: refusal))")
        #expect(Self.refusal(status(String(repeating: "w", count: 200))) == nil)
        #expect(Self.refusal(status(""))?.field == "worker_id")
    }

    /// An exit code is stored in PostgreSQL's `integer`: one outside 32 bits is refused naming
    /// `exit_code` (it made the database refuse the whole batch it came in).
    @Test func anExitCodeOutside32BitsIsRefused() {
        func exitCode(_ text: String) -> Int? {
            try? MessageCodec.decodeStatus(Array(Self.statusJSON(#""exit_code":\#(text)"#).utf8)).exitCode
        }
        #expect(exitCode("2147483647") == 2_147_483_647 && exitCode("-2147483648") == -2_147_483_648)
        #expect(exitCode("null") == nil && Self.refusal(Self.statusJSON(#""exit_code":null"#)) == nil)
        let over = Self.refusal(Self.statusJSON(#""exit_code":2147483648"#))
        #expect(over?.field == "exit_code" && over?.value == "2147483648" && over?.hint.contains("2147483647") == true)
        #expect(Self.refusal(Self.statusJSON(#""exit_code":-2147483649"#))?.field == "exit_code")
        #expect(Self.refusal(Self.statusJSON(#""exit_code":1e13"#))?.field == "exit_code")
    }

    /// Depth counts from the top of the document, as Foundation counts it: the status is one
    /// level, so its result may nest `maxDepth - 1` more, and not one more; an unknown member
    /// is held to the same bound while it is skipped.
    @Test func nestingIsBoundedFromTheTop() {
        func nested(_ n: Int) -> String { String(repeating: "[", count: n) + String(repeating: "]", count: n) }
        #expect(Self.refusal(Self.statusJSON(#""result":\#(nested(JSONReader.maxDepth - 1))"#)) == nil)
        #expect(Self.refusal(Self.statusJSON(#""result":\#(nested(JSONReader.maxDepth))"#))?.field == "body")
        #expect(Self.refusal(Self.statusJSON(#""x-new":\#(nested(JSONReader.maxDepth - 1))"#)) == nil)
        #expect(Self.refusal(Self.statusJSON(#""x-new":\#(nested(JSONReader.maxDepth))"#))?.field == "body")
    }

    @Test func hostileBodiesAreRefusedWithoutHarm() {
        // Nesting deeper than the limit is refused, not followed down the stack.
        for depth in [JSONReader.maxDepth + 1, 200_000] {
            let deep = String(repeating: "[", count: depth) + String(repeating: "]", count: depth)
            #expect(Self.refusal(Self.statusJSON(#""result":\#(deep)"#))?.field == "body")
        }
        let fine = String(repeating: "[", count: 100) + String(repeating: "]", count: 100)
        #expect(Self.refusal(Self.statusJSON(#""result":\#(fine)"#)) == nil)
        for bad in [
            #""output":"\ud800""#, #""output":"\udc00x""#, #""output":"\ud800\u0041""#, #""output":"\x""#,
            #""output":"\u12""#, "\"output\":\"a\u{01}b\"", #""exit_code":01"#, #""exit_code":-"#,
            #""exit_code":1e400"#, #""exit_code":NaN"#, #""exit_code":+1"#, #""exit_code":.5"#,
            #""exit_code":99999999999999999999"#, #""detached":tru"#, #""detached":nul"#,
        ] {
            #expect(Self.refusal(Self.statusJSON(bad)) != nil, "\(bad)")
        }
        #expect(Self.refusal(Self.statusJSON("") + " x")?.field == "body", "trailing data")
        for broken in [#""detached":nul"#, #""exit_code":-x"#, #""result":[1,]"#, #""result":{"a":1,}"#] {
            #expect(Self.refusal(Self.statusJSON(broken))?.field == "body", "\(broken): refused as not JSON")
        }
        #expect(Self.refusal(Self.statusJSON(#""result":[1,]"#))?.hint.contains("a comma before ']'") == true)
        #expect(Self.refusal(#"{"version":"#)?.field == "body", "the end of the input")
        #expect(Self.refusal("\u{FEFF}" + Self.statusJSON(""))?.field == "body", "a byte-order mark")
        #expect(Self.refusal(Self.statusJSON("") + " \n") == nil, "trailing whitespace")
        var invalidUTF8 = Array(Self.statusJSON(#""output":"ab""#).utf8)
        invalidUTF8[invalidUTF8.firstIndex(of: UInt8(ascii: "b"))!] = 0xFF
        #expect(throws: ValidationError.self) { try MessageCodec.decodeStatus(invalidUTF8) }
        #expect(Self.refusal(Self.statusJSON(#""output":"\ud83d\ude00 \u00e9 \/""#)) == nil)
        let escaped = try? MessageCodec.decodeStatus(Array(Self.statusJSON(#""output":"\ud83d\ude00 \u00e9 \/""#).utf8))
        #expect(escaped?.output == "😀 é /")
    }
}
