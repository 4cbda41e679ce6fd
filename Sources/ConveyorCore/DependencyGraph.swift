/// Tasks and the upstream tasks each depends on: the checks a workflow's shape must pass,
/// as pure functions (the store loads the edges, this decides).
package struct DependencyGraph<Node: Hashable>: Sendable where Node: Sendable {
    /// Each node's upstreams, in the order they were declared.
    package var upstreams: [Node: [Node]]

    package init(upstreams: [Node: [Node]] = [:]) { self.upstreams = upstreams }

    package mutating func add(_ node: Node, dependsOn upstream: Node) {
        upstreams[node, default: []].append(upstream)
    }

    /// A cycle reachable from `start` through upstream edges, as the path walked: it begins and
    /// ends at the same node (`[a, b, a]` when `a` depends on `b` and `b` on `a`). `nil` if none.
    package func cycle(from start: Node) -> [Node]? {
        var path: [Node] = []
        var onPath: Set<Node> = []
        var done: Set<Node> = []
        func visit(_ n: Node) -> [Node]? {
            if onPath.contains(n), let i = path.firstIndex(of: n) { return Array(path[i...]) + [n] }
            if done.contains(n) { return nil }
            path.append(n)
            onPath.insert(n)
            for u in upstreams[n] ?? [] {
                if let c = visit(u) { return c }
            }
            path.removeLast()
            onPath.remove(n)
            done.insert(n)
            return nil
        }
        return visit(start)
    }

    /// The nodes with no upstream that `node` descends from (itself when it has none). Call
    /// only on a graph without cycles (`cycle(from:)` first).
    package func roots(of node: Node) -> Set<Node> {
        var roots: Set<Node> = []
        var seen: Set<Node> = []
        var stack = [node]
        while let n = stack.popLast() {
            guard seen.insert(n).inserted else { continue }
            let ups = upstreams[n] ?? []
            if ups.isEmpty { roots.insert(n) } else { stack.append(contentsOf: ups) }
        }
        return roots
    }
}
