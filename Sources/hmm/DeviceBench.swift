import HMM
import HMMDevices
#if canImport(Glibc)
import Glibc
#endif

/// Device-memory benchmarks of `hmm bench`: migration bandwidth in 4 KiB pages each way, CPU fault-back
/// latency, and `RangeFault` snapshot throughput, each against a baseline measured in the same run.
extension Bench {
    func deviceBenchmarks(reps: Int, scale: Int) throws {
        let m = try Machine(.init(systemMemory: (1 << 30) + (256 << 20) / scale))
        // Touch all of RAM once, so that no figure below pays the host's first-touch faults (which the
        // memcpy baselines never pay).
        let warm = try m.makeAddressSpace()
        _ = try warm.map(length: (m.freeFrames - 512) * 4096, protection: [.read, .write], flags: [.private, .anonymous, .populate])
        warm.exit()
        // The snapshot populates (and so warms the host memory behind) most of RAM: run it first so the
        // migrations below do not pay the host's first-touch faults that the memcpy baseline never pays.
        try snapshot(m, bytes: (1 << 30) / scale, reps: reps)
        try migration(m, bytes: (64 << 20) / scale, reps: reps * (ProcessInfoShim.profiling ? 20 : 1))
        try faultBack(m, pages: 4096 / scale, reps: reps)
        try m.checkInvariants()
    }

    func migration(_ m: Machine, bytes: Int, reps: Int) throws {
        let dev = try MirrorDevice(machine: m, minor: 0, kind: .devicePrivate, chunkSize: bytes)
        let s = try m.makeAddressSpace()
        let fd = try dev.open(s)
        defer {
            fd.close()
            s.exit()
        }
        let pages = bytes / 4096
        let p = try s.map(length: bytes, protection: [.read, .write], flags: [.private, .anonymous, .populate])
        var toDevice: [Double] = []
        var toSystem: [Double] = []
        for r in 0...reps {
            var t = now()
            let there = try fd.migrateToDevice(p, pages: pages, into: nil)
            let d = Double(now() - t)
            t = now()
            let back = try fd.migrateToSystem(p, pages: pages)
            let b = Double(now() - t)
            precondition(there.cpages == pages && back.cpages == pages, "migrated \(there.cpages)/\(back.cpages) of \(pages)")
            if r > 0 {  // the first round warms the host memory behind both arenas
                toDevice.append(d)
                toSystem.append(b)
            }
        }
        let base = bulkCopyBaseline(bytes: bytes, reps: reps)
        for (name, ns) in [("system -> device", median(toDevice)), ("device -> system", median(toSystem))] {
            row("migrate \(bytes >> 20) MiB \(name), 4 KiB pages", "\(fixed(Double(bytes) / ns)) GB/s",
                "memcpy \(fixed(Double(bytes) / base)) GB/s; ratio \(fixed(base / ns)) x memcpy")
        }
    }

    /// memcpy of the same bytes a migration moves, cache-cold, 4 KiB at a time: nanoseconds for all of it.
    func bulkCopyBaseline(bytes: Int, reps: Int) -> Double {
        memcpyBaseline(chunk: 4096, bytes: bytes, reps: reps, distinctSource: true) * Double(bytes / 4096)
    }

    func faultBack(_ m: Machine, pages: Int, reps: Int) throws {
        let dev = try MirrorDevice(machine: m, minor: 1, kind: .devicePrivate, chunkSize: max(2 << 20, pages * 4096))
        let s = try m.makeAddressSpace()
        let fd = try dev.open(s)
        defer {
            fd.close()
            s.exit()
        }
        let p = try s.map(length: pages * 4096, protection: [.read, .write], flags: [.private, .anonymous, .populate])
        var samples: [Double] = []
        samples.reserveCapacity(pages * reps)
        for r in 0...reps {
            _ = try fd.migrateToDevice(p, pages: pages, into: nil)
            for i in 0..<pages {
                let t = now()
                let v: UInt8 = try s.load(at: p + UInt64(i) * 4096)
                let ns = Double(now() - t)
                blackHole(UInt64(v))
                if r > 0 { samples.append(ns) }
            }
        }
        samples.sort()
        let base = memcpyBaseline(chunk: 4096, bytes: pages * 4096, reps: reps)
        row("CPU fault-back of a device-private 4 KiB page",
            "median \(fixed(samples[samples.count / 2] / 1000, 2)) us",
            "p99 \(fixed(samples[samples.count * 99 / 100] / 1000, 2)) us; median = \(fixed(samples[samples.count / 2] / base, 1)) x memcpy 4 KiB")
    }

    func snapshot(_ m: Machine, bytes: Int, reps: Int) throws {
        let s = try m.makeAddressSpace()
        defer { s.exit() }
        let pages = bytes / 4096
        let p = try s.map(length: bytes, protection: [.read, .write], flags: [.private, .anonymous, .populate])
        final class Silent: IntervalNotifierOperations, @unchecked Sendable {
            func invalidate(_ n: IntervalNotifier, range: NotifierRange, sequence: UInt64) -> Bool {
                n.setSequence(sequence)
                return true
            }
        }
        let notifier = try s.insertIntervalNotifier(start: p, length: UInt64(bytes), Silent())
        defer { notifier.remove() }
        var range = try HMMRange(notifier: notifier, start: p, end: p + UInt64(bytes))
        var snap: [Double] = []
        var walk: [Double] = []
        for _ in 0...reps {
            range.notifierSeq = notifier.readBegin()
            var t = now()
            try s.withMmapReadLock { () throws(HMMError) in try s.rangeFault(&range) }
            snap.append(Double(now() - t))
            precondition(range.pfns[pages - 1] & HMMPFN.valid != 0, "snapshot missed the last page")
            t = now()
            let n = try s.residentPages(p, length: bytes)
            walk.append(Double(now() - t))
            precondition(n == pages)
        }
        let ns = median(snap) / Double(pages)
        let w = median(walk) / Double(pages)
        row("RangeFault snapshot, \(bytes >> 20) MiB present", "\(fixed(1e3 / ns, 0)) M pages/s",
            "\(fixed(ns, 2)) ns/page; page walk \(fixed(w, 2)) ns/page; ratio \(fixed(ns / w)) x walk")
    }
}

/// `HMM_BENCH_PROFILE=1` repeats the migration figure many times (for `perf record`).
enum ProcessInfoShim {
    static var profiling: Bool { getenv("HMM_BENCH_PROFILE") != nil }
}
