public import ConveyorCore
import ConveyorStore
import Foundation
public import HTTPTypes
public import Hummingbird
import Logging
import NIOCore

/// What a request runs with: who it acts as, and its request id.
public struct APIContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    public var identity: Identity?
    public var requestID = ""

    public init(source: Source) { coreContext = .init(source: source) }

    /// Request bodies larger than this are refused with 413 before any decoding.
    public var maxUploadSize: Int { APIServer.maxBodyBytes }

    /// The identity, or 401; and 403 when its role is below `role`.
    func require(_ role: Role) throws(Problem) -> Identity {
        guard let identity else { throw Problem(.unauthorized, "authentication required", "send Authorization: Bearer <API key>") }
        guard identity.role >= role else {
            throw Problem(.forbidden, "forbidden", "this needs the \(role.rawValue) role; the key has \(identity.role.rawValue)")
        }
        return identity
    }
}

/// An RFC 9457 problem: `application/problem+json` with the field, the value and a hint where
/// a request was at fault, and the request id to quote.
public struct Problem: Error, Sendable {
    public var status: HTTPResponse.Status
    public var title: String
    public var detail: String
    public var field: String?
    public var value: String?

    public init(_ status: HTTPResponse.Status, _ title: String, _ detail: String, field: String? = nil, value: String? = nil) {
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.value = value
    }

    public init(_ v: ValidationError) {
        self.init(.badRequest, "invalid request", v.hint, field: v.field, value: v.value)
    }

    func response(requestID: String) -> Response {
        var o: [String: JSONValue] = ["type": "about:blank", "title": .string(title), "status": .number(Double(status.code)),
                                      "detail": .string(detail), "request_id": .string(requestID)]
        if let field { o["field"] = .string(field) }
        if let value { o["value"] = .string(value) }
        var headers: HTTPFields = [.contentType: "application/problem+json"]
        if status == .unauthorized { headers[.wwwAuthenticate] = "Bearer" }
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: JSONValue.object(o).jsonBytes)))
    }
}

extension HTTPField.Name {
    static let requestID = HTTPField.Name("X-Request-ID")!
}

/// Outermost: gives every request an id (a sane `X-Request-ID` it brought, or a new one), puts
/// it in the logs and the response, and turns every error into a problem response.
struct RequestIDMiddleware: RouterMiddleware {
    func handle(_ request: Request, context: APIContext, next: @concurrent (Request, APIContext) async throws -> Response) async throws -> Response {
        var context = context
        let given = request.headers[.requestID] ?? ""
        context.requestID = given.count <= 128 && !given.isEmpty && given.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.:".contains($0)) })
            ? given : UUID().uuidString.lowercased()
        context.logger[metadataKey: "request.id"] = "\(context.requestID)"
        var response: Response
        do {
            response = try await next(request, context)
        } catch let p as Problem {
            response = p.response(requestID: context.requestID)
        } catch let v as ValidationError {
            response = Problem(v).response(requestID: context.requestID)
        } catch let e as HTTPError {
            let title = e.status == .contentTooLarge ? "request body too large" : e.status.reasonPhrase
            let detail = e.status == .contentTooLarge ? "bodies are limited to \(APIServer.maxBodyBytes) bytes" : (e.body ?? e.status.reasonPhrase)
            response = Problem(e.status, title, detail).response(requestID: context.requestID)
        } catch {
            context.logger.error("request failed", metadata: ["error": "\(error)"])
            response = Problem(.internalServerError, "internal error", "the server could not complete the request; quote the request id").response(requestID: context.requestID)
        }
        response.headers[.requestID] = context.requestID
        context.logger.info("request", metadata: ["http.method": "\(request.method)", "http.path": "\(request.uri.path)",
                                                  "http.status": "\(response.status.code)", "auth.key": "\(context.identity?.keyPrefix ?? "-")"])
        return response
    }
}

/// Every route but `/healthz` and `/readyz` needs `Authorization: Bearer <API key>`.
struct AuthMiddleware: RouterMiddleware {
    let keys: KeyAuthenticator
    let jwt: JWTVerifier?
    static let open: Set<String> = ["/healthz", "/readyz"]

    func handle(_ request: Request, context: APIContext, next: @concurrent (Request, APIContext) async throws -> Response) async throws -> Response {
        if Self.open.contains(request.uri.path) { return try await next(request, context) }
        guard let header = request.headers[.authorization], header.lowercased().hasPrefix("bearer ") else {
            throw Problem(.unauthorized, "authentication required", "send Authorization: Bearer <API key or JWT>")
        }
        let credential = String(header.dropFirst(7)).trimmingCharacters(in: .whitespaces)
        if !credential.hasPrefix("cvk_"), let jwt {
            switch await jwt.verify(credential) {
            case .success(let identity):
                var context = context
                context.identity = identity
                return try await next(request, context)
            case .failure(let why):
                throw Problem(.unauthorized, "authentication failed", why.description)
            }
        }
        switch try await keys.authenticate(credential) {
        case .success(let identity):
            var context = context
            context.identity = identity
            return try await next(request, context)
        case .failure(let why):
            let detail = switch why {
            case .malformed: "the credential is not an API key (cvk_<prefix>_<secret>)"
            case .unknown: "unknown API key"
            case .revoked: "this API key was revoked"
            case .expired: "this API key has expired"
            }
            throw Problem(.unauthorized, "authentication failed", detail)
        }
    }
}
