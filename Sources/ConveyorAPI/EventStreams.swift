import ConveyorCore
import ConveyorStore
import Synchronization

/// How many `/v1/events` streams each key holds open.
final class EventStreams: Sendable {
    let open = Mutex<[String: Int]>([:])

    /// A slot for one more stream of `key`, or nil when it holds `limit` already.
    func acquire(_ key: String, limit: Int) -> EventStreamSlot? {
        let taken = open.withLock { o -> Bool in
            guard o[key, default: 0] < limit else { return false }
            o[key, default: 0] += 1
            return true
        }
        return taken ? EventStreamSlot(streams: self, key: key) : nil
    }

    fileprivate func release(_ key: String) {
        open.withLock { o in
            let n = o[key, default: 0] - 1
            o[key] = n > 0 ? n : nil
        }
    }
}

/// One open stream's place. Given back when the stream ends (`release`), or when the response
/// is dropped without its body ever running (the client left first): whichever comes first, once.
final class EventStreamSlot: Sendable {
    let streams: EventStreams
    let key: String
    let released = Mutex(false)

    fileprivate init(streams: EventStreams, key: String) {
        self.streams = streams
        self.key = key
    }

    func release() {
        guard
            released.withLock({ r in
                defer { r = true }
                return !r
            })
        else { return }
        streams.release(key)
    }

    deinit { release() }
}

/// The overview per namespace (`nil`: every namespace) and when it was computed: however many
/// `/v1/events` streams watch a namespace, its five aggregate queries run once per interval.
/// Streams that ask while a computation is under way wait for that one.
///
/// The computation is a `Task` of its own, not a child of the first asker's: it is shared, so
/// the first stream's end must not cancel it for the others. It is bounded (five queries on the
/// pool, under the statement timeout) and holds nothing but its result.
final class OverviewCache: Sendable {
    struct Entry {
        var at: ContinuousClock.Instant
        var value: Task<JSONValue, any Error>
    }
    let entries = Mutex<[String?: Entry]>([:])
    /// Computations started (tests).
    let computed = Mutex(0)

    /// The namespace's overview, computed less than `maxAge` ago (or now).
    func overview(_ store: Store, namespace: String?, maxAge: Duration, now: ContinuousClock.Instant) async throws
        -> JSONValue
    {
        let (task, started) = entries.withLock { e -> (Task<JSONValue, any Error>, Bool) in
            if let hit = e[namespace], now - hit.at < maxAge { return (hit.value, false) }
            // Namespaces nobody watches any more leave (an admin key may name any namespace;
            // no stream asks less often than every 60 s).
            if e.count >= 1000 { e = e.filter { now - $0.value.at < .seconds(60) } }
            let task = Task { try await APIServer.overview(store, namespace: namespace) }
            e[namespace] = Entry(at: now, value: task)
            return (task, true)
        }
        if started { computed.withLock { $0 += 1 } }
        return try await task.value
    }
}
