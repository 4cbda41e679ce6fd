import ConveyorCore
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// A real HTTP server on 127.0.0.1 for tests: records every request and answers what `respond`
/// says (a status, after an optional delay).
final class HTTPReceiver: Sendable {
    struct Request: Sendable {
        var method: String
        var path: String
        /// The first value of each header (names in lower case).
        var headers: [String: String]
        var body: String
        /// Every header line as received, in order (names in lower case).
        var fields: [(name: String, value: String)] = []
        var bytes: [UInt8] = []

        /// Names that arrived more than once: a receiver reading the first value and one reading
        /// the last would see different requests.
        var repeatedHeaders: [String] {
            var seen: [String: Int] = [:]
            for f in fields { seen[f.name, default: 0] += 1 }
            return seen.filter { $0.value > 1 }.keys.sorted()
        }
    }
    struct Reply: Sendable {
        var status: Int
        var delay: Duration = .zero
        var headers: [(String, String)] = []
        var body = "ok"
    }

    let requests = Mutex<[Request]>([])
    let respond: @Sendable (Request, Int) -> Reply
    /// Whether requests are kept (`requests`, and the count per path given to `respond`); a sink
    /// taking tens of thousands of calls counts them itself instead.
    let keepRequests: Bool
    private let channel: any Channel
    let port: Int
    let host: String

    /// `respond` gets the request and how many requests came to its path before it. `host` is
    /// any loopback address (Linux answers on all of 127.0.0.0/8).
    init(
        host: String = "127.0.0.1", keepRequests: Bool = true,
        respond: @escaping @Sendable (Request, Int) -> Reply = { _, _ in Reply(status: 200) }
    ) async throws {
        self.respond = respond
        self.keepRequests = keepRequests
        self.host = host
        let box = Mutex<HTTPReceiver?>(nil)
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(Handler(receiver: { box.withLock { $0 } }))
                }
            }
            .bind(host: host, port: 0).get()
        self.channel = channel
        port = channel.localAddress?.port ?? 0
        box.withLock { $0 = self }
    }

    var url: String { "http://\(host):\(port)" }

    func received(path: String? = nil) -> [Request] {
        requests.withLock { all in all.filter { path == nil || $0.path == path } }
    }

    func close() async { try? await channel.close() }

    /// Handles one connection: collects a request, records it, replies.
    final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let receiver: @Sendable () -> HTTPReceiver?
        var head: HTTPRequestHead?
        var body: [UInt8] = []

        init(receiver: @escaping @Sendable () -> HTTPReceiver?) { self.receiver = receiver }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h):
                head = h
                body = []
            case .body(let b): body += b.readableBytesView
            case .end:
                guard let head, let receiver = receiver() else { return }
                let request = Request(
                    method: head.method.rawValue, path: head.uri,
                    headers: Dictionary(
                        head.headers.map { ($0.name.lowercased(), $0.value) }, uniquingKeysWith: { a, _ in a }),
                    body: String(decoding: body, as: UTF8.self),
                    fields: head.headers.map { ($0.name.lowercased(), $0.value) }, bytes: body)
                let before =
                    !receiver.keepRequests
                    ? 0
                    : receiver.requests.withLock { all in
                        defer { all.append(request) }
                        return all.filter { $0.path == request.path }.count
                    }
                let reply = receiver.respond(request, before)
                let keepAlive = head.isKeepAlive
                let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
                context.eventLoop.scheduleTask(in: .nanoseconds(Int64(reply.delay.inSeconds * 1e9))) {
                    let context = loopBound.value
                    var headers = HTTPHeaders([("content-length", "\(reply.body.utf8.count)")])
                    for (k, v) in reply.headers { headers.add(name: k, value: v) }
                    if !keepAlive { headers.add(name: "connection", value: "close") }
                    context.write(
                        NIOAny(
                            HTTPServerResponsePart.head(
                                HTTPResponseHead(
                                    version: head.version, status: .init(statusCode: reply.status), headers: headers))),
                        promise: nil)
                    context.write(
                        NIOAny(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(string: reply.body)))), promise: nil)
                    let done = context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil)))
                    if !keepAlive { done.whenComplete { _ in loopBound.value.close(promise: nil) } }
                }
            }
        }
    }
}
