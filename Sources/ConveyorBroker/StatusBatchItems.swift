package import ConveyorAMQP
package import ConveyorCore

extension StatusBatchItem {
    /// A status message as a batch carries it: its body, its seal and its trace headers.
    package init(_ message: AMQPOutgoingMessage) {
        let h = message.properties.headers
        self.init(
            body: message.body, seal: h[StatusProof.sealHeader]?.stringValue,
            traceparent: h["traceparent"]?.stringValue, tracestate: h["tracestate"]?.stringValue)
    }

    /// The trace headers this status would have carried alone (its seal is checked apart).
    package var traceHeaders: AMQPHeaders {
        var h: AMQPHeaders = [:]
        if let traceparent { h["traceparent"] = .string(traceparent) }
        if let tracestate { h["tracestate"] = .string(tracestate) }
        return h
    }
}
