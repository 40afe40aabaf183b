import HMM
import HMMDevices
import Synchronization

/// The workloads of `hmm workload`: the access shapes the field reports on (streaming, random gathers,
/// stencils, graph traversal, dense linear algebra, CPU/device ping-pong), each computing something
/// checkable and checked against the CPU at the end.
public enum Workload: String, CaseIterable, Sendable, CustomStringConvertible {
    /// b[i] = 3 a[i] + 1 over two arrays.
    case stream
    /// Sums of pseudo-random gathers from one array.
    case random
    /// A 5-point stencil over a square grid.
    case stencil
    /// Breadth-first search on an R-MAT graph (level-synchronous, one launch per level).
    case bfs
    /// C = A × B, 16 × 16 tiles per item (the matrices are capped at 320 × 320 words: it is the access
    /// pattern that matters, not the flops).
    case gemm
    /// The device and the CPU take turns writing the same pages.
    case pingpong

    public var description: String { rawValue }

    /// What one run did.
    public struct Result: Sendable, Codable {
        public var workload: String
        public var workingSetBytes: Int
        public var budgetBytes: Int
        public var prefetch: String
        public var eviction: String
        public var nanoseconds: UInt64
        public var deviceFaults: Int
        public var faultBatches: Int
        public var cpuFaultBacks: Int
        public var pagesToDevice: Int
        public var pagesToSystem: Int
        public var prefetchedPages: Int
        public var evictions: Int
        public var evictedPages: Int
        public var remoteMappedPages: Int
        /// Pages found thrashing, throttles and pins (UVM's `num_thrashing` / `num_throttle` / `num_pin`).
        public var thrashingDetected: Int
        public var throttles: Int
        public var pins: Int
        public var migratedBytesByCause: [String: Int]
        public var dataCheck: Bool
    }

    /// Runs the workload with about `workingSet` bytes of managed memory on `workers` device workers, and
    /// checks the result on the CPU. Counters are kept on the machine's hub for the run.
    /// - Throws: `.invalidArgument` for a working set under 64 KiB, what the kernels throw
    ///   (`.outOfMemory` under the fail policy…).
    public func run(on mm: ManagedMemory, workingSet: Int, workers: Int, rounds: Int = 4) throws(HMMError) -> Result {
        guard workingSet >= 64 << 10 else { throw HMMError(.invalidArgument, "a working set of at least 64 KiB") }
        let hub = mm.accelerator.machine.events
        let wasCounting = hub.countersEnabled
        hub.countersEnabled = true
        defer { hub.countersEnabled = wasCounting }
        let before = (stats: mm.statistics, context: mm.context.statistics, cpu: mm.space.cpuFaultBacks,
                      bytes: MigrationCause.allCases.map { hub.counters.migratedBytes(cause: $0) })
        let t = monotonicNanoseconds()
        var ok = false
        switch self {
        case .stream: ok = try Self.stream(mm, workingSet, workers)
        case .random: ok = try Self.random(mm, workingSet, workers)
        case .stencil: ok = try Self.stencil(mm, workingSet, workers)
        case .bfs: ok = try Self.bfs(mm, workingSet, workers)
        case .gemm: ok = try Self.gemm(mm, workingSet, workers)
        case .pingpong: ok = try Self.pingpong(mm, workingSet, workers, rounds: rounds)
        }
        let elapsed = monotonicNanoseconds() - t
        let s = mm.statistics
        let c = mm.context.statistics
        var bytes: [String: Int] = [:]
        for (k, cause) in MigrationCause.allCases.enumerated() {
            let n = hub.counters.migratedBytes(cause: cause) - before.bytes[k]
            if n > 0 { bytes["\(cause)"] = n }
        }
        return Result(workload: rawValue, workingSetBytes: workingSet, budgetBytes: mm.budgetPages << PageSize.shift,
                      prefetch: mm.options.prefetch.name, eviction: mm.options.eviction.name, nanoseconds: elapsed,
                      deviceFaults: c.faults - before.context.faults, faultBatches: c.batches - before.context.batches,
                      cpuFaultBacks: mm.space.cpuFaultBacks - before.cpu, pagesToDevice: c.pagesToDevice - before.context.pagesToDevice,
                      pagesToSystem: c.pagesToSystem - before.context.pagesToSystem,
                      prefetchedPages: s.prefetchedPages - before.stats.prefetchedPages,
                      evictions: s.evictions - before.stats.evictions, evictedPages: s.evictedPages - before.stats.evictedPages,
                      remoteMappedPages: c.pagesMappedRemotely - before.context.pagesMappedRemotely,
                      thrashingDetected: s.thrashingDetected - before.stats.thrashingDetected,
                      throttles: s.throttles - before.stats.throttles, pins: s.pins - before.stats.pins,
                      migratedBytesByCause: bytes, dataCheck: ok)
    }

    // MARK: the kernels

    private static func stream(_ mm: ManagedMemory, _ ws: Int, _ workers: Int) throws(HMMError) -> Bool {
        let words = max(512, ws / 16 / 512 * 512)
        let a = try mm.allocate(words * 8, owner: "a")
        let b = try mm.allocate(words * 8, owner: "b")
        defer { try? mm.free(a); try? mm.free(b) }
        try a.cpuStore((0..<words).map { UInt64($0) }, at: 0)
        _ = try mm.launch(items: words / 512, workers: workers) { (lane, item) throws(HMMError) in
            for j in 0..<512 {
                let i = item * 512 + j
                try lane.store(3 &* (try lane.load(UInt64.self, at: a.word(i))) &+ 1, at: b.word(i))
            }
        }
        return try b.cpuLoad(0, count: words).enumerated().allSatisfy { $0.element == 3 &* UInt64($0.offset) &+ 1 }
    }

    private static func lcg(_ x: UInt64) -> UInt64 { x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407 }

    private static func random(_ mm: ManagedMemory, _ ws: Int, _ workers: Int) throws(HMMError) -> Bool {
        let words = max(512, (ws - 8 * 4096) / 8 / 512 * 512)
        let items = 1024
        let gathers = 128
        let a = try mm.allocate(words * 8, owner: "table")
        let out = try mm.allocate(items * 8, owner: "out")
        defer { try? mm.free(a); try? mm.free(out) }
        let values = (0..<words).map { UInt64($0) &* 2_654_435_761 }
        try a.cpuStore(values, at: 0)
        _ = try mm.launch(items: items, workers: workers) { (lane, item) throws(HMMError) in
            var x = UInt64(item) &+ 1
            var sum: UInt64 = 0
            for _ in 0..<gathers {
                x = lcg(x)
                sum &+= try lane.load(UInt64.self, at: a.word(Int((x >> 17) % UInt64(words))))
            }
            try lane.store(sum, at: out.word(item))
        }
        let sums = try out.cpuLoad(0, count: items)
        for item in 0..<items {
            var x = UInt64(item) &+ 1
            var sum: UInt64 = 0
            for _ in 0..<gathers {
                x = lcg(x)
                sum &+= values[Int((x >> 17) % UInt64(words))]
            }
            if sums[item] != sum { return false }
        }
        return true
    }

    private static func stencil(_ mm: ManagedMemory, _ ws: Int, _ workers: Int) throws(HMMError) -> Bool {
        var side = 64
        while (side * 2) * (side * 2) * 16 <= ws { side *= 2 }
        let n = side
        let input = try mm.allocate(n * n * 8, owner: "in")
        let output = try mm.allocate(n * n * 8, owner: "out")
        defer { try? mm.free(input); try? mm.free(output) }
        let grid = (0..<(n * n)).map { UInt64($0 % 97) }
        try input.cpuStore(grid, at: 0)
        _ = try mm.launch(items: n, workers: workers) { (lane, r) throws(HMMError) in
            for c in 0..<n {
                var s = try lane.load(UInt64.self, at: input.word(r * n + c))
                if r > 0 { s &+= try lane.load(UInt64.self, at: input.word((r - 1) * n + c)) }
                if r < n - 1 { s &+= try lane.load(UInt64.self, at: input.word((r + 1) * n + c)) }
                if c > 0 { s &+= try lane.load(UInt64.self, at: input.word(r * n + c - 1)) }
                if c < n - 1 { s &+= try lane.load(UInt64.self, at: input.word(r * n + c + 1)) }
                try lane.store(s, at: output.word(r * n + c))
            }
        }
        let result = try output.cpuLoad(0, count: n * n)
        for r in 0..<n {
            for c in 0..<n {
                var s = grid[r * n + c]
                if r > 0 { s &+= grid[(r - 1) * n + c] }
                if r < n - 1 { s &+= grid[(r + 1) * n + c] }
                if c > 0 { s &+= grid[r * n + c - 1] }
                if c < n - 1 { s &+= grid[r * n + c + 1] }
                if result[r * n + c] != s { return false }
            }
        }
        return true
    }

    private static func gemm(_ mm: ManagedMemory, _ ws: Int, _ workers: Int) throws(HMMError) -> Bool {
        var side = 32
        while (side + 32) * (side + 32) * 24 <= ws && side + 32 <= 320 { side += 32 }
        let n = side
        let a = try mm.allocate(n * n * 8, owner: "A")
        let b = try mm.allocate(n * n * 8, owner: "B")
        let c = try mm.allocate(n * n * 8, owner: "C")
        defer { try? mm.free(a); try? mm.free(b); try? mm.free(c) }
        let av = (0..<(n * n)).map { UInt64($0 % 13) }
        let bv = (0..<(n * n)).map { UInt64($0 % 7) }
        try a.cpuStore(av, at: 0)
        try b.cpuStore(bv, at: 0)
        let tiles = n / 16
        _ = try mm.launch(items: tiles * tiles, workers: workers) { (lane, t) throws(HMMError) in
            let ti = t / tiles * 16
            let tj = t % tiles * 16
            for i in ti..<(ti + 16) {
                for j in tj..<(tj + 16) {
                    var s: UInt64 = 0
                    for k in 0..<n { s &+= (try lane.load(UInt64.self, at: a.word(i * n + k))) &* (try lane.load(UInt64.self, at: b.word(k * n + j))) }
                    try lane.store(s, at: c.word(i * n + j))
                }
            }
        }
        let cv = try c.cpuLoad(0, count: n * n)
        for i in stride(from: 0, to: n, by: 7) {
            for j in 0..<n {
                var s: UInt64 = 0
                for k in 0..<n { s &+= av[i * n + k] &* bv[k * n + j] }
                if cv[i * n + j] != s { return false }
            }
        }
        return true
    }

    /// An R-MAT graph (a = 0.57, b = c = 0.19) of 2^scale vertices and 8 edges per vertex, as CSR.
    static func rmat(scale: Int) -> (offsets: [UInt64], columns: [UInt64]) {
        let v = 1 << scale
        var x: UInt64 = 42
        var edges: [(Int, Int)] = []
        edges.reserveCapacity(8 * v)
        for _ in 0..<(8 * v) {
            var u = 0
            var w = 0
            for _ in 0..<scale {
                x = lcg(x)
                let r = Double(x >> 11) / Double(1 << 53)
                u <<= 1
                w <<= 1
                if r < 0.57 {} else if r < 0.76 { w |= 1 } else if r < 0.95 { u |= 1 } else { u |= 1; w |= 1 }
            }
            edges.append((u, w))
            edges.append((w, u))
        }
        edges.sort { $0 < $1 }
        var offsets = [UInt64](repeating: 0, count: v + 1)
        for (u, _) in edges { offsets[u + 1] += 1 }
        for i in 0..<v { offsets[i + 1] += offsets[i] }
        return (offsets, edges.map { UInt64($0.1) })
    }

    private static func bfs(_ mm: ManagedMemory, _ ws: Int, _ workers: Int) throws(HMMError) -> Bool {
        var scale = 10
        while (1 << (scale + 1)) * 8 * 19 <= ws && scale < 18 { scale += 1 }
        let (offsets, columns) = rmat(scale: scale)
        let v = 1 << scale
        let off = try mm.allocate(offsets.count * 8, owner: "offsets")
        let col = try mm.allocate(columns.count * 8, owner: "columns")
        let level = try mm.allocate(v * 8, owner: "level")
        defer { try? mm.free(off); try? mm.free(col); try? mm.free(level) }
        try off.cpuStore(offsets, at: 0)
        try col.cpuStore(columns, at: 0)
        let unvisited = UInt64.max
        var initial = [UInt64](repeating: unvisited, count: v)
        initial[0] = 0
        try level.cpuStore(initial, at: 0)
        var depth: UInt64 = 0
        while depth < UInt64(v) {
            let changed = Atomic<Bool>(false)
            let d = depth
            _ = try mm.launch(items: (v + 255) / 256, workers: workers) { (lane, item) throws(HMMError) in
                for u in (item * 256)..<min(v, item * 256 + 256) {
                    guard try lane.atomicLoad(at: level.word(u)) == d else { continue }
                    let lo = Int(try lane.load(UInt64.self, at: off.word(u)))
                    let hi = Int(try lane.load(UInt64.self, at: off.word(u + 1)))
                    for e in lo..<hi {
                        let w = Int(try lane.load(UInt64.self, at: col.word(e)))
                        if try lane.atomicMin(d + 1, at: level.word(w)) > d + 1 { changed.store(true, ordering: .relaxed) }
                    }
                }
            }
            if !changed.load(ordering: .relaxed) { break }
            depth += 1
        }
        // The CPU's BFS.
        var expected = [UInt64](repeating: unvisited, count: v)
        expected[0] = 0
        var frontier = [0]
        while !frontier.isEmpty {
            var next: [Int] = []
            for u in frontier {
                for e in Int(offsets[u])..<Int(offsets[u + 1]) where expected[Int(columns[e])] == unvisited {
                    expected[Int(columns[e])] = expected[u] + 1
                    next.append(Int(columns[e]))
                }
            }
            frontier = next
        }
        return try level.cpuLoad(0, count: v) == expected
    }

    private static func pingpong(_ mm: ManagedMemory, _ ws: Int, _ workers: Int, rounds: Int) throws(HMMError) -> Bool {
        let pages = max(16, min(ws / PageSize.base, 4096))
        let a = try mm.allocate(pages * PageSize.base, owner: "shared")
        defer { try? mm.free(a) }
        for _ in 0..<rounds {
            _ = try mm.launch(items: pages, workers: workers) { (lane, p) throws(HMMError) in
                let at = a.address + UInt64(p) << UInt64(PageSize.shift)
                try lane.store(try lane.load(UInt64.self, at: at) &+ 1, at: at)
            }
            for p in 0..<pages {
                let w = p * PageSize.base / 8
                try a.cpuStore([try a.cpuLoad(w, count: 1)[0] &+ 1], at: w)
            }
        }
        for p in 0..<pages where try a.cpuLoad(p * PageSize.base / 8, count: 1)[0] != UInt64(2 * rounds) { return false }
        return true
    }
}
