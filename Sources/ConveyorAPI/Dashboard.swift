import Foundation
import Hummingbird
import NIOCore

/// The dashboard: static files served at `/` and `/ui/{file}`. They hold no data and no
/// secrets; the page asks for an API key or token and calls the API with it, like any client.
enum Dashboard {
    static let files: [String: (type: String, bytes: [UInt8])] = {
        var out: [String: (String, [UInt8])] = [:]
        for (name, type) in [
            ("index.html", "text/html; charset=utf-8"), ("app.js", "text/javascript; charset=utf-8"),
            ("app.css", "text/css; charset=utf-8"),
        ] {
            let parts = name.split(separator: ".")
            if let url = Bundle.module.url(
                forResource: String(parts[0]), withExtension: String(parts[1]), subdirectory: "Dashboard"),
                let data = try? Data(contentsOf: url)
            {
                out[name] = (type, Array(data))
            }
        }
        return out
    }()

    static func serves(_ path: String) -> Bool { path == "/" || path.hasPrefix("/ui/") }

    static func routes(_ r: inout Routes) {
        r.on(.get, "/") { _, _ in try file("index.html") }
        r.on(.get, "/ui/:file") { _, context in try file(context.parameters.get("file") ?? "") }
    }

    static func file(_ name: String) throws(Problem) -> Response {
        guard let f = files[name] else { throw Problem(.notFound, "not found", "no dashboard file '\(name)'") }
        return Response(
            status: .ok,
            headers: [
                .contentType: f.type, .cacheControl: "no-cache",
                .contentSecurityPolicy:
                    """
                default-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors \
                'none'
                """,
                .xContentTypeOptions: "nosniff",
            ],
            body: .init(byteBuffer: ByteBuffer(bytes: f.bytes)))
    }
}
