import Foundation

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
