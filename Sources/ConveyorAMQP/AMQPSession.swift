import CRabbitMQ
import Foundation

/// One live AMQP connection with channel 1 open (`ConnectionOwner.connect` then declares the
/// topology on it).
///
/// Not Sendable: a session is created, used and closed on its owner's single thread
/// (rabbitmq-c connections belong to one thread).
final class AMQPSession {
    let conn: amqp_connection_state_t
    let generation: UInt64
    let channel: amqp_channel_t = 1
    private var open = true

    /// The broker endpoint this session is connected to (one entry of the configuration's list).
    let endpoint: AMQPConfiguration.Endpoint

    init(
        configuration: AMQPConfiguration, endpoint ep: AMQPConfiguration.Endpoint, generation: UInt64
    ) throws(AMQPError) {
        endpoint = ep
        guard let conn = amqp_new_connection() else { throw AMQPError(code: .connection, message: "out of memory") }
        self.conn = conn
        self.generation = generation
        do throws(AMQPError) {
            guard let socket = amqp_tcp_socket_new(conn) else {
                throw AMQPError(code: .connection, message: "cannot create socket")
            }
            var tv = configuration.operationTimeout.timeval
            let status = amqp_socket_open_noblock(socket, ep.host, Int32(ep.port), &tv)
            guard status == AMQP_STATUS_OK.rawValue else {
                throw AMQPError(
                    code: .connection,
                    message:
                        "cannot connect to \(ep.redacted): \(String(cString: amqp_error_string2(status)))"
                )
            }
            // With nothing listening on a local port inside the ephemeral range, a reconnect can
            // pick that very port as its source and connect to itself (TCP simultaneous open).
            // Kept open, it holds the port, and the broker cannot listen on it when it restarts.
            guard !Self.isSelfConnected(amqp_get_sockfd(conn)) else {
                throw AMQPError(
                    code: .connection,
                    message:
                        """
                        cannot connect to \(ep.redacted): nothing listens there (the socket connected \
                        to itself)
                        """
                )
            }
            _ = amqp_set_handshake_timeout(conn, &tv)
            _ = amqp_set_rpc_timeout(conn, &tv)
            let heartbeat = Int32(configuration.heartbeat.components.seconds)
            let login = CRabbitMQ_login_plain(
                conn, ep.vhost, 0, 131_072, heartbeat, ep.user, ep.password, configuration.name)
            try Self.check(login, "login to \(ep.redacted)")
            amqp_channel_open(conn, channel)
            try Self.check(amqp_get_rpc_reply(conn), "channel.open")
        } catch {
            // The broker may already have closed the connection: a polite close would wait for
            // replies that never come (up to the RPC timeout). Drop it instead.
            abandon()
            throw error
        }
    }

    deinit { close() }

    /// Whether the socket's local and peer addresses are the same (a self-connected socket).
    static func isSelfConnected(_ fd: Int32) -> Bool {
        guard fd >= 0 else { return false }
        var local = sockaddr_storage()
        var peer = sockaddr_storage()
        var localLen = socklen_t(MemoryLayout<sockaddr_storage>.size)
        var peerLen = localLen
        let ok = withUnsafeMutablePointer(to: &local) { l in
            withUnsafeMutablePointer(to: &peer) { p in
                l.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &localLen) } == 0
                    && p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &peerLen) } == 0
            }
        }
        guard ok, localLen == peerLen else { return false }
        return withUnsafeBytes(of: &local) { l in
            withUnsafeBytes(of: &peer) { p in l.prefix(Int(localLen)).elementsEqual(p.prefix(Int(peerLen))) }
        }
    }

    var socketFD: Int32 { amqp_get_sockfd(conn) }

    /// Whether frames are already buffered, so a read won't block.
    var hasBufferedInput: Bool { amqp_frames_enqueued(conn) != 0 || amqp_data_in_buffer(conn) != 0 }

    /// Declares `topology`: exchanges, queues, then bindings.
    ///
    /// With `onlyMissing` (a reconnect after a connection that declared the whole topology:
    /// `ConnectionOwner.connect` decides), each exchange and queue is looked up first (a passive declare) and only a missing one is
    /// declared, with its bindings (every binding, when an exchange was missing). A lookup reads
    /// the broker's metadata; a declare of a new object or any bind writes it, in a transaction
    /// across the cluster's nodes, and that transaction waits while a node is cut off but not yet
    /// counted down (RabbitMQ's `net_ticktime`, 60 s by default). Without this, every process
    /// reconnecting during a partition waited out its 10 s operation timeout on `queue.bind` at
    /// each node in turn (issue 25, cluster scenario C2).
    func declare(_ topology: AMQPTopology, onlyMissing: Bool = false) throws(AMQPError) {
        // The arena owns the C strings and tables: keep it alive until the last C call returns
        // (without this, an optimized build may free it before the call reads them).
        let arena = CArena()
        try withExtendedLifetime(arena) { () throws(AMQPError) in
            var bindAll = !onlyMissing
            var bindQueues = Set<String>()
            for e in topology.exchanges {
                if onlyMissing && !e.passive {
                    let found = try exists("exchange.declare (passive) \(e.name)") {
                        amqp_exchange_declare(
                            conn, channel, arena.bytes(e.name), arena.bytes(e.type), 1, 1, 0, 0,
                            amqp_table_t(num_entries: 0, entries: nil))
                    }
                    if found { continue }
                    bindAll = true
                }
                amqp_exchange_declare(
                    conn, channel, arena.bytes(e.name), arena.bytes(e.type), e.passive ? 1 : 0, 1, 0, 0,
                    amqp_table_t(num_entries: 0, entries: nil))
                try Self.check(amqp_get_rpc_reply(conn), "exchange.declare \(e.name)")
            }
            for q in topology.queues {
                if onlyMissing && !q.passive {
                    let found = try exists("queue.declare (passive) \(q.name)") {
                        amqp_queue_declare(
                            conn, channel, arena.bytes(q.name), 1, q.durable ? 1 : 0, 0, 0,
                            amqp_table_t(num_entries: 0, entries: nil))
                    }
                    if found { continue }
                    bindQueues.insert(q.name)
                }
                amqp_queue_declare(
                    conn, channel, arena.bytes(q.name), q.passive ? 1 : 0, q.durable ? 1 : 0, 0, 0,
                    arena.table(q.arguments))
                try Self.check(amqp_get_rpc_reply(conn), "queue.declare \(q.name)")
            }
            for b in topology.bindings where bindAll || bindQueues.contains(b.queue) {
                amqp_queue_bind(
                    conn, channel, arena.bytes(b.queue), arena.bytes(b.exchange), arena.bytes(b.routingKey),
                    amqp_table_t(num_entries: 0, entries: nil))
                try Self.check(amqp_get_rpc_reply(conn), "queue.bind \(b.queue)")
            }
        }
    }

    /// Sends a passive declare and reads its answer: whether the object exists. A 404 closes the
    /// channel; it is acknowledged and opened again under the same number.
    private func exists(_ what: String, _ send: () -> Void) throws(AMQPError) -> Bool {
        send()
        let reply = amqp_get_rpc_reply(conn)
        if reply.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION, reply.reply.id == CRabbitMQ_CHANNEL_CLOSE_METHOD,
            let close = reply.reply.decoded?.assumingMemoryBound(to: amqp_channel_close_t.self),
            close.pointee.reply_code == 404
        {
            var closeOK = amqp_channel_close_ok_t(dummy: 0)
            _ = amqp_send_method(conn, channel, CRabbitMQ_CHANNEL_CLOSE_OK_METHOD, &closeOK)
            amqp_channel_open(conn, channel)
            try Self.check(amqp_get_rpc_reply(conn), "channel.open")
            return false
        }
        try Self.check(reply, what)
        return true
    }

    func close() {
        guard open else { return }
        open = false
        _ = amqp_channel_close(conn, channel, AMQP_REPLY_SUCCESS)
        _ = amqp_connection_close(conn, AMQP_REPLY_SUCCESS)
        _ = amqp_destroy_connection(conn)
    }

    /// Abandons the connection without the closing handshake (it is already broken).
    func abandon() {
        guard open else { return }
        open = false
        _ = amqp_destroy_connection(conn)
    }

    static func check(_ reply: amqp_rpc_reply_t, _ what: String) throws(AMQPError) {
        switch reply.reply_type {
        case AMQP_RESPONSE_NORMAL:
            return
        case AMQP_RESPONSE_LIBRARY_EXCEPTION:
            let code: AMQPError.Code = reply.library_error == AMQP_STATUS_TIMEOUT.rawValue ? .timeout : .connection
            throw AMQPError(code: code, message: "\(what): \(String(cString: amqp_error_string2(reply.library_error)))")
        case AMQP_RESPONSE_SERVER_EXCEPTION:
            throw closeError(id: reply.reply.id, decoded: reply.reply.decoded, what: what)
        default:
            throw AMQPError(code: .protocolError, message: "\(what): no reply")
        }
    }

    static func closeError(id: amqp_method_number_t, decoded: UnsafeMutableRawPointer?, what: String) -> AMQPError {
        if id == CRabbitMQ_CONNECTION_CLOSE_METHOD,
            let d = decoded?.assumingMemoryBound(to: amqp_connection_close_t.self)
        {
            return AMQPError(
                code: .closedByBroker, message: "\(what): connection closed by broker: \(d.pointee.reply_text.string)",
                replyCode: Int(d.pointee.reply_code))
        }
        if id == CRabbitMQ_CHANNEL_CLOSE_METHOD, let d = decoded?.assumingMemoryBound(to: amqp_channel_close_t.self) {
            return AMQPError(
                code: .closedByBroker, message: "\(what): channel closed by broker: \(d.pointee.reply_text.string)",
                replyCode: Int(d.pointee.reply_code))
        }
        return AMQPError(code: .protocolError, message: "\(what): unexpected method \(id)")
    }

    /// Publishes one message (no waiting). Returns rabbitmq-c's status.
    func publish(_ m: AMQPOutgoingMessage, mandatory: Bool) -> Int32 {
        let arena = CArena()
        var props = amqp_basic_properties_t()
        var flags: amqp_flags_t = 0
        if let v = m.properties.contentType {
            props.content_type = arena.bytes(v)
            flags |= CRabbitMQ_BASIC_CONTENT_TYPE_FLAG
        }
        if let v = m.properties.messageID {
            props.message_id = arena.bytes(v)
            flags |= CRabbitMQ_BASIC_MESSAGE_ID_FLAG
        }
        if let v = m.properties.type {
            props.type = arena.bytes(v)
            flags |= CRabbitMQ_BASIC_TYPE_FLAG
        }
        if let v = m.properties.timestamp {
            props.timestamp = v
            flags |= CRabbitMQ_BASIC_TIMESTAMP_FLAG
        }
        if let v = m.properties.expiration {
            props.expiration = arena.bytes(v)
            flags |= CRabbitMQ_BASIC_EXPIRATION_FLAG
        }
        props.delivery_mode = m.properties.persistent ? 2 : 1
        flags |= CRabbitMQ_BASIC_DELIVERY_MODE_FLAG
        if !m.properties.headers.isEmpty {
            props.headers = arena.table(m.properties.headers)
            flags |= CRabbitMQ_BASIC_HEADERS_FLAG
        }
        props._flags = flags
        let body = arena.bytes(m.body)
        return withExtendedLifetime(arena) {
            amqp_basic_publish(
                conn, channel, arena.bytes(m.exchange), arena.bytes(m.routingKey), mandatory ? 1 : 0, 0, &props, body)
        }
    }

    static func properties(_ p: amqp_basic_properties_t) -> AMQPProperties {
        let f = p._flags
        return AMQPProperties(
            contentType: f & CRabbitMQ_BASIC_CONTENT_TYPE_FLAG != 0 ? p.content_type.string : nil,
            messageID: f & CRabbitMQ_BASIC_MESSAGE_ID_FLAG != 0 ? p.message_id.string : nil,
            type: f & CRabbitMQ_BASIC_TYPE_FLAG != 0 ? p.type.string : nil,
            timestamp: f & CRabbitMQ_BASIC_TIMESTAMP_FLAG != 0 ? p.timestamp : nil,
            expiration: f & CRabbitMQ_BASIC_EXPIRATION_FLAG != 0 ? p.expiration.string : nil,
            persistent: f & CRabbitMQ_BASIC_DELIVERY_MODE_FLAG != 0 && p.delivery_mode == 2,
            headers: f & CRabbitMQ_BASIC_HEADERS_FLAG != 0 ? CTableReader.table(p.headers) : [:])
    }
}

/// A self-pipe that wakes an owner thread out of `poll()`.
final class WakePipe: Sendable {
    let readFD: Int32
    let writeFD: Int32

    init() {
        var fds: [Int32] = [0, 0]
        precondition(pipe(&fds) == 0, "pipe() failed")
        readFD = fds[0]
        writeFD = fds[1]
        for fd in fds { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
    }

    deinit {
        close(readFD)
        close(writeFD)
    }

    func wake() {
        var b: UInt8 = 1
        _ = write(writeFD, &b, 1)
    }

    func drain() {
        var buf = [UInt8](repeating: 0, count: 64)
        while read(readFD, &buf, 64) > 0 {}
    }

    /// Waits until `fd` is readable, the pipe is woken, or `timeoutMS` passes. Returns whether `fd` is readable.
    @discardableResult
    func wait(on fd: Int32?, timeoutMS: Int32) -> Bool {
        var fds = [pollfd(fd: readFD, events: Int16(POLLIN), revents: 0)]
        if let fd { fds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0)) }
        _ = poll(&fds, nfds_t(fds.count), timeoutMS)
        drain()
        return fds.count > 1 && fds[1].revents != 0
    }
}
