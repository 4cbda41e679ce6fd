import ConveyorCore
import Testing

@Suite struct DependencyGraphTests {
    @Test func aCycleIsNamedAsThePathThatCloses() {
        var g = DependencyGraph<String>()
        g.add("load", dependsOn: "transform")
        g.add("transform", dependsOn: "extract")
        g.add("extract", dependsOn: "load")
        #expect(g.cycle(from: "load") == ["load", "transform", "extract", "load"])
        #expect(DependencyGraph<String>(upstreams: ["a": ["a"]]).cycle(from: "a") == ["a", "a"])
    }

    @Test func aDiamondHasNoCycleAndOneRoot() {
        var g = DependencyGraph<String>()
        g.add("b", dependsOn: "a")
        g.add("c", dependsOn: "a")
        g.add("d", dependsOn: "b")
        g.add("d", dependsOn: "c")
        #expect(g.cycle(from: "d") == nil)
        #expect(g.roots(of: "d") == ["a"])
        #expect(g.roots(of: "a") == ["a"])
    }

    @Test func twoRootsAreBothFound() {
        let g = DependencyGraph<Int>(upstreams: [3: [1, 2], 4: [3]])
        #expect(g.roots(of: 4) == [1, 2])
        #expect(g.cycle(from: 4) == nil)
    }
}
