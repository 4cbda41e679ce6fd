package import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import ServiceLifecycle

/// A process's small HTTP endpoint for probes and scraping: `GET /healthz` (the process is up),
/// `GET /readyz` (200 when `ready()` says so, else 503), `GET /metrics` (Prometheus text from
/// `metrics()`). Anything else is 404; other methods 405. It reads no request body.
package final class StatusServer: Service, Sendable {
    package let host: String
    package let port: Int
    let ready: @Sendable () -> Bool
    let metrics: @Sendable () -> String
    let logger: Logger

    package init(
        host: String, port: Int, logger: Logger, ready: @escaping @Sendable () -> Bool,
        metrics: @escaping @Sendable () -> String
    ) {
        self.host = host
        self.port = port
        self.ready = ready
        self.metrics = metrics
        self.logger = logger
    }

    /// The response to `GET path`: status, content type, body.
    func respond(method: HTTPMethod, path: String) -> (HTTPResponseStatus, String, String) {
        let route = path.split(separator: "?", maxSplits: 1).first.map(String.init) ?? path
        guard ["/healthz", "/readyz", "/metrics"].contains(route) else {
            return (.notFound, "text/plain", "not found\n")
        }
        guard method == .GET || method == .HEAD else { return (.methodNotAllowed, "text/plain", "use GET\n") }
        switch route {
        case "/healthz": return (.ok, "text/plain", "ok\n")
        case "/readyz":
            return ready() ? (.ok, "text/plain", "ready\n") : (.serviceUnavailable, "text/plain", "not ready\n")
        default: return (.ok, "text/plain; version=0.0.4", metrics())
        }
    }

    package func run() async throws {
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(Handler(server: self))
                }
            }
            .bind(host: host, port: port).get()
        logger.info(
            "status endpoint listening", metadata: ["http.address": "\(host):\(channel.localAddress?.port ?? port)"])
        try? await gracefulShutdown()
        try? await channel.close()
    }

    final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let server: StatusServer
        var head: HTTPRequestHead?

        init(server: StatusServer) { self.server = server }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): head = h
            case .body: break
            case .end:
                guard let head else { return }
                let (status, type, text) = server.respond(method: head.method, path: head.uri)
                var headers = HTTPHeaders([("content-type", type), ("content-length", String(text.utf8.count))])
                if !head.isKeepAlive { headers.add(name: "connection", value: "close") }
                context.write(
                    wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))),
                    promise: nil)
                if head.method != .HEAD {
                    context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: text)))), promise: nil)
                }
                let keepAlive = head.isKeepAlive
                let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
                if !keepAlive {
                    let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                    done.whenComplete { _ in bound.value.close(promise: nil) }
                }
                self.head = nil
            }
        }
    }
}
