import HMM
import HMMDevices

/// `hmm bench migration`: the shape of the kernel's `hmm.benchmark_thp_migration` (T38) — sizes thp/4 …
/// 128·thp, with and without THP, system→device and device→system, average over timed runs after a
/// warm-up — plus the ratio to a memcpy of the same bytes measured in the same run.
extension Bench {
    func migrationTable(reps: Int, quick: Bool) throws {
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
        print("benchmark_thp_migration (average of \(reps) timed runs after a warm-up; memcpy of the same bytes in the same run)")
        print(pad("size", 12) + pad("THP", 6) + pad("direction", 18) + pad("avg ms", 10) + pad("GB/s", 9) + "vs memcpy")
        var gbps: [String: Double] = [:]
        for size in sizes {
            let base = bulkCopyBaseline(bytes: size, reps: reps)
            for useTHP in [true, false] {
                let p = try s.map(length: size, protection: [.read, .write], flags: [.private, .anonymous])
                try s.advise(p, length: size, useTHP ? .hugePage : .noHugePage)
                let ints = (0..<(size / 4)).map { Int32($0 & 0xFF) }
                try ints.withUnsafeBytes { b in try s.write(b, at: p) }
                let pages = size / 4096
                _ = try fd.migrateToDevice(p, pages: pages, into: nil)
                _ = try fd.migrateToSystem(p, pages: pages)
                var there = 0.0
                var back = 0.0
                for _ in 0..<reps {
                    var t = now()
                    _ = try fd.migrateToDevice(p, pages: pages, into: nil)
                    there += Double(now() - t)
                    t = now()
                    _ = try fd.migrateToSystem(p, pages: pages)
                    back += Double(now() - t)
                }
                for (name, total) in [("system -> device", there), ("device -> system", back)] {
                    let ns = total / Double(reps)
                    let rate = Double(size) / ns
                    gbps["\(size) \(useTHP) \(name)"] = rate
                    print(pad(label(size), 12) + pad(useTHP ? "yes" : "no", 6) + pad(name, 18)
                          + pad(fixed(ns / 1e6, 3), 10) + pad(fixed(rate), 9) + "\(fixed(base / ns)) x")
                }
                try s.unmap(p, length: size)
            }
        }
        let at = quick ? 4 * thp : 8 * thp
        for dir in ["system -> device", "device -> system"] {
            if let a = gbps["\(at) true \(dir)"], let b = gbps["\(at) false \(dir)"] {
                print("THP vs 4 KiB at \(label(at)), \(dir): \(fixed(a / b)) x")
            }
        }
        try m.checkInvariants()
    }

    private func label(_ size: Int) -> String {
        size >= 1 << 20 ? "\(size >> 20) MiB" : "\(size >> 10) KiB"
    }
}
