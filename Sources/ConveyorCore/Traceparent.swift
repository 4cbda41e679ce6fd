/// A W3C `traceparent` value, `version-traceid-parentid-flags`
/// (https://www.w3.org/TR/trace-context/#traceparent-header), read the way the specification tells a
/// receiver to: lowercase hex digits, ids that are not all zeros, version `ff` refused, version `00`
/// exactly 55 characters, and a later version read by its first four fields when a `-` follows them.
///
/// The project's one parser: the store (a run's trace id), the worker (log metadata), the status events
/// and the telemetry module all read a traceparent through it.
package struct Traceparent: Sendable, Hashable {
    /// 2 hex digits.
    package let version: String
    /// 32 hex digits, not all zeros.
    package let traceID: String
    /// The parent span's id: 16 hex digits, not all zeros.
    package let spanID: String
    /// 2 hex digits; bit 0 is `sampled`.
    package let flags: String

    package init?(_ text: String) {
        let bytes = Array(text.utf8)
        let dash = UInt8(ascii: "-")
        guard bytes.count >= 55, bytes[2] == dash, bytes[35] == dash, bytes[52] == dash else { return nil }
        func field(_ range: Range<Int>, nonZero: Bool = false) -> String? {
            let digits = bytes[range]
            guard digits.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }) else { return nil }
            guard !nonZero || digits.contains(where: { $0 != 0x30 }) else { return nil }
            return String(decoding: digits, as: UTF8.self)
        }
        guard let version = field(0..<2), version != "ff", let traceID = field(3..<35, nonZero: true),
            let spanID = field(36..<52, nonZero: true), let flags = field(53..<55)
        else { return nil }
        if version == "00" {
            guard bytes.count == 55 else { return nil }
        } else if bytes.count > 55 {
            guard bytes[55] == dash else { return nil }
        }
        (self.version, self.traceID, self.spanID, self.flags) = (version, traceID, spanID, flags)
    }

    /// The trace id of `text`, when it is a traceparent.
    package static func traceID(_ text: String?) -> String? { text.flatMap(Traceparent.init)?.traceID }
}
