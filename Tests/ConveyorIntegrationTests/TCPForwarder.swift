import Foundation
import Synchronization

/// A TCP forwarder on 127.0.0.1 in front of a real server, for tests that need the path between
/// a client and its server to misbehave. While `holding` is set, new connections are accepted and
/// held (nothing forwarded, nothing closed) until `release()`.
final class TCPForwarder: Sendable {
    let port: Int
    private let listener: Int32
    private let upstreamPort: UInt16
    private let state = Mutex(State())
    private struct State {
        var holding = false
        var held: [Int32] = []
        var stopped = false
        /// Both sockets of every connection forwarded (never closed here, so never reused).
        var forwarded: [Int32] = []
    }

    init(upstreamPort: Int) throws {
        self.upstreamPort = UInt16(upstreamPort)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = Self.loopback(port: 0)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard bound == 0, listen(fd, 16) == 0 else { throw POSIXError(.EADDRINUSE) }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        listener = fd
        port = Int(UInt16(bigEndian: addr.sin_port))
        Thread.detachNewThread { [self] in acceptLoop() }
    }

    /// New connections are accepted and held from now on.
    func hold() { state.withLock { $0.holding = true } }

    /// Closes the connections held, and forwards new ones again.
    func release() {
        let held = state.withLock { s in
            s.holding = false
            defer { s.held = [] }
            return s.held
        }
        for fd in held { close(fd) }
    }

    func stop() {
        release()
        state.withLock { $0.stopped = true }
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
    }

    /// Connections forwarded so far.
    var connectionsForwarded: Int { state.withLock { $0.forwarded.count / 2 } }

    /// Stops accepting, and ends every connection forwarded so far: the server behind it is gone,
    /// as far as its clients can tell.
    func kill() {
        stop()
        for fd in state.withLock({ $0.forwarded }) { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    private static func loopback(port: UInt16) -> sockaddr_in {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = port.bigEndian
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        return a
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            guard client >= 0 else { return }
            let hold = state.withLock { s in
                if s.holding { s.held.append(client) }
                return s.holding || s.stopped
            }
            if hold { continue }
            let upstream = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = Self.loopback(port: upstreamPort)
            let connected = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(upstream, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            guard connected == 0 else {
                close(client)
                close(upstream)
                continue
            }
            state.withLock { $0.forwarded += [client, upstream] }
            Thread.detachNewThread { Self.copy(from: client, to: upstream) }
            Thread.detachNewThread { Self.copy(from: upstream, to: client) }
        }
    }

    private static func copy(from source: Int32, to sink: Int32) {
        var buffer = [UInt8](repeating: 0, count: 16_384)
        while true {
            let n = read(source, &buffer, buffer.count)
            guard n > 0 else { break }
            var sent = 0
            while sent < n {
                let w = buffer.withUnsafeBytes { write(sink, $0.baseAddress! + sent, n - sent) }
                guard w > 0 else { break }
                sent += w
            }
        }
        shutdown(sink, Int32(SHUT_WR))
        shutdown(source, Int32(SHUT_RD))
    }
}
