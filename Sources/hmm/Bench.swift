import ArgumentParser
import HMM

#if canImport(Glibc)
import Glibc
#endif

/// `hmm bench`: the core's benchmarks, each printed with its ratio to a baseline measured in the same run.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmark faults, software-MMU accesses, fork, page walks, migration, device fault-back and snapshots against same-run baselines.")

    @Flag(help: "Small sizes and one repetition (a smoke run for CI).")
    var quick = false

    @Option(help: "Repetitions per figure; the median is reported.")
    var repetitions = 5

    @Argument(help: "What to run: core, device, migration (the kernel's benchmark_thp_migration table), p2p (peer memory: mapping, unbind, exit with deferred vs synchronous retirement), native (the native engine on this process's memory through userfaultfd), or all of core and device (default).")
    var group: String?

    func run() throws {
        let reps = quick ? 1 : max(1, repetitions)
        let scale = quick ? 16 : 1
        guard group == nil || ["core", "device", "migration", "p2p", "native"].contains(group!) else {
            throw ValidationError("unknown benchmark group \(group!): use core, device, migration, p2p or native")
        }
        if group == "native" { return try nativeBenchmarks(reps: reps, quick: quick) }
        let m = try Machine(.init(systemMemory: 1 << 30, hugetlbPages: 0))
        if group == "migration" { return try migrationTable(reps: quick ? 1 : 5, quick: quick) }
        if group == "p2p" { return try p2pBenchmarks(reps: reps, scale: scale) }
        if group == nil || group == "core" || group == "device" {
            print("swift-hmm core benchmarks (median of \(reps); ratios against baselines from this same run)")
            print(pad("figure", 46) + pad("value", 22) + "baseline / ratio")
        }
        if group == nil || group == "core" {
            try firstTouch(m, pages: 32768 / scale, reps: reps)
            try access(m, chunk: 4096, bytes: (64 << 20) / scale, reps: reps)
            try access(m, chunk: 2 << 20, bytes: (64 << 20) / scale, reps: reps)
            try forkAndWalk(m, bytes: (256 << 20) / scale, reps: reps)
            try m.checkInvariants()
        }
        if group == nil || group == "device" { try deviceBenchmarks(reps: reps, scale: scale) }
    }

    func median(_ xs: [Double]) -> Double { xs.sorted()[xs.count / 2] }

    func row(_ name: String, _ value: String, _ baseline: String) {
        print(pad(name, 46) + pad(value, 22) + baseline)
    }

    /// memcpy of `chunk`-byte blocks over `bytes`, nanoseconds per block. With `distinctSource` every block
    /// comes from its own place in a second buffer of `bytes` (a cache-cold copy of the same bytes, as a
    /// migration does); otherwise from one `chunk`-sized source (as a store of one buffer does).
    func memcpyBaseline(chunk: Int, bytes: Int, reps: Int, distinctSource: Bool = false) -> Double {
        let srcBytes = distinctSource ? bytes : chunk
        let src = UnsafeMutableRawPointer.allocate(byteCount: srcBytes, alignment: 4096)
        let dst = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096)
        defer { src.deallocate(); dst.deallocate() }
        memset(src, 7, srcBytes)
        memset(dst, 0, bytes)  // the warm-up: the host backs every page before timing
        var samples: [Double] = []
        for _ in 0...reps {
            let t = now()
            var off = 0
            while off < bytes {
                (dst + off).copyMemory(from: src + (distinctSource ? off : 0), byteCount: chunk)
                off += chunk
            }
            blackHole(dst.load(fromByteOffset: bytes - 8, as: UInt64.self))
            samples.append(Double(now() - t) / Double(bytes / chunk))
        }
        return median(samples)
    }

    func firstTouch(_ m: Machine, pages: Int, reps: Int) throws {
        let s = try m.makeAddressSpace()
        defer { s.exit() }
        var samples: [Double] = []
        for r in 0...reps {
            let p = try s.map(length: pages * 4096, protection: [.read, .write], flags: [.private, .anonymous])
            let t = now()
            for i in 0..<pages { try s.store(UInt8(1), at: p + UInt64(i) * 4096) }
            let ns = Double(now() - t) / Double(pages)
            if r > 0 { samples.append(ns) }  // the first pass warms the host memory behind the arena
            try s.unmap(p, length: pages * 4096)
        }
        let ns = median(samples)
        let base = memcpyBaseline(chunk: 4096, bytes: pages * 4096, reps: reps)
        row("first-touch anon write fault, 4 KiB", "\(fixed(ns, 0)) ns/page",
            "memcpy 4 KiB \(fixed(base, 0)) ns; fault = \(fixed(ns / base)) x memcpy")
    }

    func access(_ m: Machine, chunk: Int, bytes: Int, reps: Int) throws {
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
        var w: [Double] = []
        var r: [Double] = []
        for _ in 0..<reps {
            var t = now()
            for i in 0..<blocks { try s.write(UnsafeRawBufferPointer(buf), at: p + UInt64(i * chunk)) }
            w.append(Double(now() - t) / Double(blocks))
            t = now()
            for i in 0..<blocks { try s.read(into: buf, at: p + UInt64(i * chunk)) }
            r.append(Double(now() - t) / Double(blocks))
        }
        let base = memcpyBaseline(chunk: chunk, bytes: bytes, reps: reps)
        let label = chunk >= 2 << 20 ? "2 MiB" : "4 KiB"
        let level = try s.pagemap(at: p).level.map { "\($0)" } ?? "none"
        for (name, ns) in [("store", median(w)), ("load", median(r))] {
            row("software-MMU \(name), \(label) accesses (\(level))",
                "\(fixed(Double(chunk) / ns)) GB/s",
                "memcpy \(fixed(Double(chunk) / base)) GB/s; ratio \(fixed(base / ns)) x memcpy")
        }
    }

    func forkAndWalk(_ m: Machine, bytes: Int, reps: Int) throws {
        let s = try m.makeAddressSpace()
        defer { s.exit() }
        let p = try s.map(length: bytes, protection: [.read, .write], flags: [.private, .anonymous, .populate])
        let pages = bytes / 4096
        var walk: [Double] = []
        for _ in 0..<reps {
            let t = now()
            let n = try s.residentPages(p, length: bytes)
            walk.append(Double(now() - t))
            precondition(n == pages, "walk found \(n) of \(pages) pages")
        }
        // Bare baseline: scan an array of as many 64-bit entries for the present bit.
        let entries = UnsafeMutablePointer<UInt64>.allocate(capacity: pages)
        defer { entries.deallocate() }
        for i in 0..<pages { entries[i] = UInt64(i) << 12 | 1 }
        var scan: [Double] = []
        for _ in 0..<reps {
            let t = now()
            var n = 0
            for i in 0..<pages where entries[i] & 1 != 0 { n += 1 }
            blackHole(n)
            scan.append(Double(now() - t))
        }
        var forks: [Double] = []
        var exits: [Double] = []
        for _ in 0..<reps {
            var t = now()
            let child = try s.fork()
            forks.append(Double(now() - t))
            let inherited = try child.residentPages(p, length: bytes)
            precondition(inherited == pages, "child inherited \(inherited) of \(pages) pages")
            t = now()
            child.exit()
            exits.append(Double(now() - t))
        }
        let walkNs = median(walk)
        row("page walk (present pages), \(bytes >> 20) MiB", "\(fixed(walkNs / Double(pages))) ns/page",
            "bare entry scan \(fixed(median(scan) / Double(pages))) ns/entry; ratio \(fixed(walkNs / median(scan))) x")
        row("fork of a \(bytes >> 20) MiB populated space", "\(fixed(median(forks) / 1e6)) ms",
            "page walk \(fixed(walkNs / 1e6)) ms; fork = \(fixed(median(forks) / walkNs, 1)) x walk")
        row("exit of the forked child", "\(fixed(median(exits) / 1e6)) ms",
            "fork = \(fixed(median(forks) / median(exits))) x exit")
    }
}
