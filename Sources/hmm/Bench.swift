import ArgumentParser
import HMM

#if canImport(Glibc)
import Glibc
#endif

/// `hmm bench`: the core's benchmarks, each printed with its ratio to a baseline measured alternately with
/// it in the same run (see `BenchReport` for the method).
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmark faults, software-MMU accesses, fork, page walks, migration, device fault-back and snapshots against same-run baselines.")

    @Flag(help: "Small sizes and one timed round (a smoke run for CI).")
    var quick = false

    @Option(help: "Timed rounds per figure (after a discarded warm-up round); each round measures the baseline and the figure once, and the median of the per-round ratios is reported.")
    var repetitions = 5

    @Flag(help: "Print one JSON document with every figure (value, unit, baseline, ratio and its spread) instead of the table.")
    var json = false

    @Option(help: "With the migration group: write an SVG plot of GB/s against buffer size to this file.")
    var svg: String?

    @Argument(help: "What to run: core, device, migration (the kernel's benchmark_thp_migration table), p2p (peer memory: mapping, unbind, exit with deferred vs synchronous retirement), native (the native engine on this process's memory through userfaultfd), events (what the event stream costs: no subscriber vs one), managed (fault batching, worker scaling, prefetch per workload), c-abi (a libhmm call against the same Swift call, and a process start under hmm dmirror; needs c/build), or all of core and device (default).")
    var group: String?

    func validate() throws {
        guard group == nil || ["core", "device", "migration", "p2p", "native", "events", "managed", "c-abi"].contains(group!) else {
            throw ValidationError("unknown benchmark group \(group!): use core, device, migration, p2p, native, events, managed or c-abi")
        }
        if svg != nil && group != "migration" {
            throw ValidationError("--svg plots the migration table: use it with `hmm bench migration`")
        }
    }

    func run() throws {
        let reps = quick ? 1 : max(1, repetitions)
        let scale = quick ? 16 : 1
        if let svg { try TextFile.checkWritable(svg) }
        let report = BenchReport(json: json)
        switch group {
        case "native":
            try nativeBenchmarks(report, reps: reps, quick: quick)
        case "migration":
            // Short figures at small sizes: more rounds than the other groups for the same stability.
            try migrationTable(report, reps: quick ? 1 : max(reps, 15), quick: quick, svg: svg)
        case "p2p":
            try p2pBenchmarks(report, reps: reps, scale: scale)
        case "events":
            try eventBenchmarks(report, reps: reps, quick: quick)
        case "managed":
            try managedBenchmarks(report, reps: reps, quick: quick)
        case "c-abi":
            try cABIBenchmarks(report, reps: reps, quick: quick)
        default:
            if group == nil || group == "core" {
                let m = try Machine(.init(systemMemory: 1 << 30, hugetlbPages: 0))
                report.section("swift-hmm core benchmarks (\(reps) timed rounds after a warm-up round)")
                try firstTouch(report, m, pages: 32768 / scale, reps: reps)
                try access(report, m, chunk: 4096, bytes: (64 << 20) / scale, reps: reps)
                try access(report, m, chunk: 2 << 20, bytes: (64 << 20) / scale, reps: reps)
                try forkAndWalk(report, m, bytes: (256 << 20) / scale, reps: reps)
                try m.checkInvariants()
            }
            if group == nil || group == "device" {
                report.section("swift-hmm device-memory benchmarks (\(reps) timed rounds after a warm-up round)")
                try deviceBenchmarks(report, reps: reps, scale: scale)
            }
        }
        try report.finish()
    }

    func median(_ xs: [Double]) -> Double { BenchReport.quantile(xs, 0.5) ?? .nan }

    func firstTouch(_ report: BenchReport, _ m: Machine, pages: Int, reps: Int) throws {
        let s = try m.makeAddressSpace()
        defer { s.exit() }
        let copy = CopyBuffers(bytes: pages * 4096, sourceBytes: 4096)
        // The warm-up round also warms the host memory behind the arena (which the memcpy never pays).
        try report.pair(name: "first-touch anon write fault, 4 KiB", unit: "ns/page", baseline: "memcpy 4 KiB",
                        baselineUnit: "ns", digits: 0, reps: reps,
                        baselineBody: { copy.copy(chunk: 4096) / Double(pages) },
                        measuredBody: {
            let p = try s.map(length: pages * 4096, protection: [.read, .write], flags: [.private, .anonymous])
            let t = now()
            for i in 0..<pages { try s.store(UInt8(1), at: p + UInt64(i) * 4096) }
            let ns = Double(now() - t) / Double(pages)
            try s.unmap(p, length: pages * 4096)
            return ns
        })
    }

    func access(_ report: BenchReport, _ m: Machine, chunk: Int, bytes: Int, reps: Int) throws {
        let s = try m.makeAddressSpace()
        defer { s.exit() }
        let raw = try s.map(length: bytes + (2 << 20), protection: [.read, .write], flags: [.private, .anonymous])
        let p = (raw + 0x1F_FFFF) & ~0x1F_FFFF
        try s.advise(p, length: bytes, chunk >= 2 << 20 ? .hugePage : .noHugePage)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buf.deallocate() }
        memset(buf.baseAddress!, 3, chunk)
        let blocks = bytes / chunk
        for i in 0..<blocks { try s.write(UnsafeRawBufferPointer(buf), at: p + UInt64(i * chunk)) }
        let copy = CopyBuffers(bytes: bytes, sourceBytes: chunk)
        let samples = try BenchReport.rounds(reps: reps) {
            let base = Double(bytes) / copy.copy(chunk: chunk)
            var t = now()
            for i in 0..<blocks { try s.write(UnsafeRawBufferPointer(buf), at: p + UInt64(i * chunk)) }
            let w = Double(bytes) / Double(now() - t)
            t = now()
            for i in 0..<blocks { try s.read(into: buf, at: p + UInt64(i * chunk)) }
            let r = Double(bytes) / Double(now() - t)
            return [base, w, r]
        }
        let label = chunk >= 2 << 20 ? "2 MiB" : "4 KiB"
        let level = try s.pagemap(at: p).level.map { "\($0)" } ?? "none"
        for (name, k) in [("store", 1), ("load", 2)] {
            report.add(name: "software-MMU \(name), \(label) accesses (\(level))", unit: "GB/s", baseline: "memcpy",
                       measured: samples.map { $0[k] }, baselineSamples: samples.map { $0[0] })
        }
    }

    func forkAndWalk(_ report: BenchReport, _ m: Machine, bytes: Int, reps: Int) throws {
        let s = try m.makeAddressSpace()
        defer { s.exit() }
        let p = try s.map(length: bytes, protection: [.read, .write], flags: [.private, .anonymous, .populate])
        let pages = bytes / 4096
        // Bare baseline: scan an array of as many 64-bit entries for the present bit.
        let entries = UnsafeMutablePointer<UInt64>.allocate(capacity: pages)
        defer { entries.deallocate() }
        for i in 0..<pages { entries[i] = UInt64(i) << 12 | 1 }
        // One round: entry scan, page walk, fork, exit of the child.
        let samples = try BenchReport.rounds(reps: reps) {
            var t = now()
            var found = 0
            for i in 0..<pages where entries[i] & 1 != 0 { found += 1 }
            blackHole(found)
            let scan = Double(now() - t)
            t = now()
            let n = try s.residentPages(p, length: bytes)
            let walk = Double(now() - t)
            precondition(n == pages, "walk found \(n) of \(pages) pages")
            t = now()
            let child = try s.fork()
            let fork = Double(now() - t)
            let inherited = try child.residentPages(p, length: bytes)
            precondition(inherited == pages, "child inherited \(inherited) of \(pages) pages")
            t = now()
            child.exit()
            let exit = Double(now() - t)
            return [scan, walk, fork, exit]
        }
        let column = { (k: Int, scale: Double) in samples.map { $0[k] / scale } }
        report.add(name: "page walk (present pages), \(bytes >> 20) MiB", unit: "ns/page", baseline: "bare entry scan",
                   baselineUnit: "ns/entry", measured: column(1, Double(pages)), baselineSamples: column(0, Double(pages)))
        report.add(name: "fork of a \(bytes >> 20) MiB populated space", unit: "ms", baseline: "page walk",
                   measured: column(2, 1e6), baselineSamples: column(1, 1e6))
        report.add(name: "exit of the forked child", unit: "ms", baseline: "fork (ratio = fork / exit)",
                   ratio: .baselineOverMeasured, measured: column(3, 1e6), baselineSamples: column(2, 1e6))
    }
}

/// Two buffers for memcpy baselines, allocated and first-touched once, outside every timed region (a
/// baseline that paid the host's first-touch faults would measure the kernel, not the copy).
///
/// Buffers of 2 MiB and more are 2 MiB-aligned and advised `MADV_HUGEPAGE`, as the machine's arenas are
/// (`Arena`): a copy through 4 KiB host pages would miss the TLB where the simulated migration does not,
/// and how much depends on what the host had free that run — the ratio would move with it.
final class CopyBuffers {
    let bytes: Int
    let sourceBytes: Int
    private let source: UnsafeMutableRawPointer
    private let destination: UnsafeMutableRawPointer

    /// A destination of `bytes` and a source of `sourceBytes` (`bytes` when nil: every block copied from its
    /// own place, as a migration copies distinct pages; one block's size: every block from the same
    /// place, as a store of one buffer does).
    init(bytes: Int, sourceBytes: Int? = nil) {
        self.bytes = bytes
        self.sourceBytes = sourceBytes ?? bytes
        source = Self.allocate(self.sourceBytes)
        destination = Self.allocate(bytes)
        memset(source, 7, self.sourceBytes)
        memset(destination, 0, bytes)
    }

    deinit {
        free(source)
        free(destination)
    }

    private static func allocate(_ bytes: Int) -> UnsafeMutableRawPointer {
        let huge = bytes >= 2 << 20
        var p: UnsafeMutableRawPointer?
        guard posix_memalign(&p, huge ? 2 << 20 : 4096, bytes) == 0, let p else {
            fatalError("cannot allocate \(bytes) bytes for a memcpy baseline")
        }
        if huge { _ = madvise(p, bytes, Int32(MADV_HUGEPAGE)) }
        return p
    }

    /// Nanoseconds to copy all `bytes` in `chunk`-byte blocks from the source to the destination, or back
    /// from the destination to the source with `reverse` (a migration's way back; needs a full-size source).
    func copy(chunk: Int, reverse: Bool = false) -> Double {
        precondition(!reverse || sourceBytes == bytes, "a copy back needs a source as large as the destination")
        let from = reverse ? destination : source
        let to = reverse ? source : destination
        let distinct = sourceBytes == bytes
        let t = now()
        var off = 0
        while off < bytes {
            (to + off).copyMemory(from: from + (distinct ? off : 0), byteCount: chunk)
            off += chunk
        }
        blackHole(to.load(fromByteOffset: bytes - 8, as: UInt64.self))
        return Double(now() - t)
    }
}
