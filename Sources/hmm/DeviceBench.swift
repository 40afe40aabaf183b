import HMM
import HMMDevices
#if canImport(Glibc)
import Glibc
#endif

/// Device-memory benchmarks of `hmm bench`: migration bandwidth in 4 KiB pages each way, CPU fault-back
/// latency, and `RangeFault` snapshot throughput, each against a baseline measured in the same run.
extension Bench {
    func deviceBenchmarks(_ report: BenchReport, reps: Int, scale: Int) throws {
        let m = try Machine(.init(systemMemory: (1 << 30) + (256 << 20) / scale))
        // Touch all of RAM once, so that no figure below pays the host's first-touch faults (which the
        // memcpy baselines never pay).
        let warm = try m.makeAddressSpace()
        _ = try warm.map(length: (m.freeFrames - 512) * 4096, protection: [.read, .write], flags: [.private, .anonymous, .populate])
        warm.exit()
        try snapshot(report, m, bytes: (1 << 30) / scale, reps: reps)
        try migration(report, m, bytes: (64 << 20) / scale, reps: reps * (ProcessInfoShim.profiling ? 20 : 1))
        try faultBack(report, m, pages: 4096 / scale, reps: reps)
        try m.checkInvariants()
    }

    /// Migration of `bytes` in 4 KiB pages each way, against a memcpy of the same bytes there and back
    /// between two buffers of their own (one round: copy there, copy back, migrate there, migrate back).
    func migration(_ report: BenchReport, _ m: Machine, bytes: Int, reps: Int) throws {
        let dev = try MirrorDevice(machine: m, minor: 0, kind: .devicePrivate, chunkSize: bytes)
        let s = try m.makeAddressSpace()
        let fd = try dev.open(s)
        defer {
            fd.close()
            s.exit()
        }
        let pages = bytes / 4096
        let p = try s.map(length: bytes, protection: [.read, .write], flags: [.private, .anonymous, .populate])
        let copy = CopyBuffers(bytes: bytes)
        let gbps = { (ns: Double) in Double(bytes) / ns }
        // The warm-up round first-touches the device memory behind the mirror.
        let samples = try BenchReport.rounds(reps: reps) {
            let copyThere = copy.copy(chunk: 4096)
            let copyBack = copy.copy(chunk: 4096, reverse: true)
            var t = now()
            let there = try fd.migrateToDevice(p, pages: pages, into: nil)
            let d = Double(now() - t)
            t = now()
            let back = try fd.migrateToSystem(p, pages: pages)
            let b = Double(now() - t)
            precondition(there.cpages == pages && back.cpages == pages, "migrated \(there.cpages)/\(back.cpages) of \(pages)")
            return [gbps(copyThere), gbps(copyBack), gbps(d), gbps(b)]
        }
        for (name, k) in [("system -> device", 0), ("device -> system", 1)] {
            report.add(name: "migrate \(bytes >> 20) MiB \(name), 4 KiB pages", unit: "GB/s", baseline: "memcpy",
                       measured: samples.map { $0[k + 2] }, baselineSamples: samples.map { $0[k] })
        }
    }

    /// CPU fault-back of device-private pages, one at a time; a round is a memcpy of as many 4 KiB pages
    /// and a fault-back of every page, and gives the median fault latency of the round.
    func faultBack(_ report: BenchReport, _ m: Machine, pages: Int, reps: Int) throws {
        let dev = try MirrorDevice(machine: m, minor: 1, kind: .devicePrivate, chunkSize: max(2 << 20, pages * 4096))
        let s = try m.makeAddressSpace()
        let fd = try dev.open(s)
        defer {
            fd.close()
            s.exit()
        }
        let p = try s.map(length: pages * 4096, protection: [.read, .write], flags: [.private, .anonymous, .populate])
        let copy = CopyBuffers(bytes: pages * 4096, sourceBytes: 4096)
        var all: [Double] = []
        all.reserveCapacity(pages * (reps + 1))
        var round = [Double](repeating: 0, count: pages)
        var first = true
        let samples = try BenchReport.rounds(reps: reps) {
            let base = copy.copy(chunk: 4096) / Double(pages) / 1000
            _ = try fd.migrateToDevice(p, pages: pages, into: nil)
            for i in 0..<pages {
                let t = now()
                let v: UInt8 = try s.load(at: p + UInt64(i) * 4096)
                round[i] = Double(now() - t)
                blackHole(UInt64(v))
            }
            if !first { all.append(contentsOf: round) }
            first = false
            return [base, median(round) / 1000]
        }
        all.sort()
        report.add(name: "CPU fault-back of a device-private 4 KiB page", unit: "us", baseline: "memcpy 4 KiB",
                   note: "median over rounds; p99 of all faults \(fixed(all[all.count * 99 / 100] / 1000)) us",
                   measured: samples.map { $0[1] }, baselineSamples: samples.map { $0[0] })
    }

    /// `RangeFault` snapshot of present pages against a page walk of the same range, alternately.
    func snapshot(_ report: BenchReport, _ m: Machine, bytes: Int, reps: Int) throws {
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
        let samples = try BenchReport.rounds(reps: reps) {
            var t = now()
            let n = try s.residentPages(p, length: bytes)
            let walk = Double(now() - t) / Double(pages)
            precondition(n == pages)
            range.notifierSeq = notifier.readBegin()
            t = now()
            try s.withMmapReadLock { () throws(HMMError) in try s.rangeFault(&range) }
            let snap = Double(now() - t) / Double(pages)
            precondition(range.pfns[pages - 1] & HMMPFN.valid != 0, "snapshot missed the last page")
            return [walk, snap]
        }
        let snap = samples.map { $0[1] }
        report.add(name: "RangeFault snapshot, \(bytes >> 20) MiB present", unit: "ns/page", baseline: "page walk",
                   note: "\(fixed(1e3 / median(snap), 1)) M pages/s",
                   measured: snap, baselineSamples: samples.map { $0[0] })
    }
}

/// `HMM_BENCH_PROFILE=1` repeats the migration figure many times (for `perf record`).
enum ProcessInfoShim {
    static var profiling: Bool { getenv("HMM_BENCH_PROFILE") != nil }
}
