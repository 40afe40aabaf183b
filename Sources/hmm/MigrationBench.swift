import HMM
import HMMDevices

/// `hmm bench migration`: the shape of the kernel's `hmm.benchmark_thp_migration` (T38) — sizes thp/4 …
/// 128·thp, with and without THP, system→device and device→system — each against a memcpy of the same bytes
/// there and back, measured alternately with the migrations in the same rounds (see `BenchReport`).
///
/// Why the rounds: the 2 MiB rows used to swing 0.43–1.19× from run to run, because the memcpy was
/// measured once per size, before the migrations and in other buffers (other cache state), the
/// migrations were averaged over 5 runs of 50–100 µs each (a timer tick or a preemption is a
/// quarter of that), and at 8 MiB and up the copy and the migration sit on either side of the shared L3's
/// size. Now one round copies there and back, then migrates the THP region and the 4 KiB region there and
/// back, each step repeated until it has moved at least 16 MiB; the warm-up round pays the first touch of the device memory and the rows report the median
/// of the per-round ratios. What interleaving cannot remove is other work on the machine for the whole
/// run (a build on the other CPU): it slows the migration, which walks page tables and folios, more than
/// the copy — the table's header prints the load average, so that a reader can tell such a run.
extension Bench {
    func migrationTable(_ report: BenchReport, reps: Int, quick: Bool, svg: String?) throws {
        let thp = PageSize.pmd
        let sizes = quick ? [thp / 4, thp, 4 * thp] : [thp / 4, thp / 2, thp, 2 * thp, 4 * thp, 8 * thp, 128 * thp]
        let m = try Machine(.init(systemMemory: 1 << 30))
        let warm = try m.makeAddressSpace()
        _ = try warm.map(length: (m.freeFrames - 512) * 4096, protection: [.read, .write], flags: [.private, .anonymous, .populate])
        warm.exit()
        let dev = try MirrorDevice(machine: m, minor: 0, kind: .devicePrivate, chunkSize: 64 << 20)
        let s = try m.makeAddressSpace()
        let fd = try dev.open(s)
        defer {
            fd.close()
            s.exit()
        }
        report.section("benchmark_thp_migration (\(reps) rounds after a warm-up round; a round: memcpy of the same "
                       + "bytes there and back, then the THP and the 4 KiB region migrated there and back)")
        // Columns of a round: memcpy there, back; THP there, back; 4 KiB there, back — in GB/s.
        var columns: [Int: [[Double]]] = [:]
        for size in sizes {
            let pages = size / 4096
            let copy = CopyBuffers(bytes: size)
            var regions: [UInt64] = []
            for useTHP in [true, false] {
                let p = try s.map(length: size, protection: [.read, .write], flags: [.private, .anonymous])
                try s.advise(p, length: size, useTHP ? .hugePage : .noHugePage)
                let ints = (0..<(size / 4)).map { Int32($0 & 0xFF) }
                try ints.withUnsafeBytes { b in try s.write(b, at: p) }
                regions.append(p)
            }
            // Each step of a round moves at least 16 MiB, so that a sample lasts a millisecond or more.
            let repeats = quick ? 1 : max(1, (16 << 20) / size)
            let moved = Double(size * repeats)
            let samples = try BenchReport.rounds(reps: reps) {
                // GB/s: memcpy there, back; THP there, back; 4 KiB there, back. Each step repeats on its own
                // (the copy then finds its buffers as it left them, as the migration finds its frames:
                // the device and page allocators hand back the frames they were given last).
                var ns = [Double](repeating: 0, count: 6)
                for _ in 0..<repeats {
                    ns[0] += copy.copy(chunk: 4096)
                    ns[1] += copy.copy(chunk: 4096, reverse: true)
                }
                for (k, p) in regions.enumerated() {
                    for _ in 0..<repeats {
                        var t = now()
                        _ = try fd.migrateToDevice(p, pages: pages, into: nil)
                        ns[2 + 2 * k] += Double(now() - t)
                        t = now()
                        _ = try fd.migrateToSystem(p, pages: pages)
                        ns[3 + 2 * k] += Double(now() - t)
                    }
                }
                return ns.map { moved / $0 }
            }
            columns[size] = samples
            for (kind, offset) in [("yes", 2), ("no", 4)] {
                for (dir, k) in [("system -> device", 0), ("device -> system", 1)] {
                    let rates = samples.map { $0[offset + k] }
                    let ms = Double(size) / median(rates) / 1e6
                    report.add(name: "\(label(size)) THP \(kind), \(dir)", unit: "GB/s", baseline: "memcpy",
                               note: "\(fixed(ms, 3)) ms", measured: rates, baselineSamples: samples.map { $0[k] })
                }
            }
            for p in regions { try s.unmap(p, length: size) }
        }
        let at = quick ? 4 * thp : 8 * thp
        if let samples = columns[at] {
            for (dir, k) in [("system -> device", 0), ("device -> system", 1)] {
                report.add(name: "THP vs 4 KiB at \(label(at)), \(dir)", unit: "GB/s", baseline: "4 KiB pages",
                           measured: samples.map { $0[2 + k] }, baselineSamples: samples.map { $0[4 + k] })
            }
        }
        try m.checkInvariants()
        if let svg {
            var plot = LinePlot(title: "Migration bandwidth by buffer size (median of \(reps) rounds)",
                                xLabel: "buffer size", yLabel: "GB/s", xTickLabel: { label(Int($0)) })
            let series = { (k: Int) in sizes.map { LinePlot.Point(x: Double($0), y: median(columns[$0]!.map { $0[k] })) } }
            plot.add("2 MiB pages (THP), system -> device", points: series(2), color: "#1f77b4")
            plot.add("2 MiB pages (THP), device -> system", points: series(3), color: "#1f77b4", dashed: true)
            plot.add("4 KiB pages, system -> device", points: series(4), color: "#d62728")
            plot.add("4 KiB pages, device -> system", points: series(5), color: "#d62728", dashed: true)
            plot.add("memcpy, same bytes", points: series(0), color: "#555555", dashed: true)
            try plot.write(to: svg)
        }
    }
}

/// A buffer size as "512 KiB" or "2 MiB".
private func label(_ size: Int) -> String {
    size >= 1 << 20 ? "\(size >> 20) MiB" : "\(size >> 10) KiB"
}
