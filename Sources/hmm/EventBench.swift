import HMM
import HMMDevices
import HMMNative

#if canImport(Glibc)
import Glibc
#endif

/// `hmm bench events`: what the event stream costs on the hot paths it instruments — CPU fault-back of a
/// device-private page and a 4 KiB migration, on both engines — with nobody listening (the baseline: one
/// relaxed load each) and with one subscriber, measured alternately in the same rounds. The subscriber's
/// ring is emptied between samples, outside the timed region: what is measured is the publishers' cost.
extension Bench {
    func eventBenchmarks(_ report: BenchReport, reps: Int, quick: Bool) throws {
        let pages = quick ? 64 : 1024
        let rounds = quick ? 1 : max(reps, 11)
        report.section("event stream overhead (\(rounds) timed rounds after a warm-up round; baseline: no subscriber)")
        let m = try Machine(.init(systemMemory: 256 << 20))
        let dev = try MirrorDevice(machine: m, minor: 0, kind: .devicePrivate, chunkSize: 16 << 20)
        let s = try m.makeAddressSpace()
        let fd = try dev.open(s)
        let p = try s.map(length: pages * 4096, protection: [.read, .write], flags: [.private, .anonymous, .populate])
        try observedPair(report, m, "simulated: CPU fault-back, 4 KiB", reps: rounds) {
            _ = try fd.migrateToDevice(p, pages: pages, into: nil)
            let t = now()
            for i in 0..<pages {
                let v: UInt8 = try s.load(at: p + UInt64(i) * 4096)
                blackHole(UInt64(v))
            }
            return Double(now() - t) / Double(pages)
        }
        try observedPair(report, m, "simulated: 4 KiB migrate there + back", reps: rounds) {
            let t = now()
            for i in 0..<pages {
                let a = p + UInt64(i) * 4096
                _ = try fd.migrateToDevice(a, pages: 1, into: nil)
                _ = try fd.migrateToSystem(a, pages: 1)
            }
            return Double(now() - t) / Double(pages)
        }
        fd.close()
        s.exit()
        try m.checkInvariants()

        if let reason = NativeSpace.unsupportedReason() {
            report.note("native rows skipped: \(reason)")
            return
        }
        let nm = try Machine(.init(systemMemory: 256 << 20))
        var options = NativeSpace.Options()
        options.faultAroundPages = 1
        let space = try NativeSpace(machine: nm, options: options)
        defer { try? space.close() }
        let gpu = try MirrorDevice(machine: nm, minor: 0, kind: .devicePrivate, chunkSize: 16 << 20)
        let file = try gpu.open(space)
        defer { file.close() }
        let region = try space.allocate(length: pages << 12, hugePages: false, populate: true)
        defer { region.free() }
        memset(region.pointer, 5, pages << 12)
        try observedPair(report, nm, "native: CPU fault-back, 4 KiB", reps: rounds) {
            _ = try file.migrateToDevice(region.address, pages: pages, into: nil)
            let t = now()
            var sum = 0
            for i in 0..<pages { sum &+= Int(region.pointer.load(fromByteOffset: i << 12, as: UInt8.self)) }
            blackHole(sum)
            return Double(now() - t) / Double(pages)
        }
        try observedPair(report, nm, "native: 4 KiB migrate there + back", reps: rounds) {
            let t = now()
            for i in 0..<pages {
                let a = region.address + UInt64(i) << 12
                _ = try file.migrateToDevice(a, pages: 1, into: nil)
                _ = try file.migrateToSystem(a, pages: 1)
            }
            return Double(now() - t) / Double(pages)
        }
    }

    /// One row: `body` (ns per operation) with nobody listening, then with one subscriber, alternately.
    private func observedPair(_ report: BenchReport, _ m: Machine, _ name: String, reps: Int,
                              _ body: () throws -> Double) throws {
        var delivered = 0
        // A subscriber per measured sample: its ring is made (and touched) before the timed work.
        var attached: EventSubscription?
        try report.pair(name: name, unit: "ns/op", baseline: "no subscriber", digits: 0,
                        note: nil, reps: reps,
                        baselineBody: {
            // The same ring made and dropped first, so both bodies start with the caches in the same state.
            try m.events.subscribe(capacity: 1 << 16).cancel()
            return try body()
        },
                        measuredBody: {
            attached = try m.events.subscribe(capacity: 1 << 16)
            let ns = try body()
            delivered += attached!.drain { _ in }
            if attached!.droppedTotal > 0 { report.note("    (\(attached!.droppedTotal) events dropped: the ring was too small)") }
            attached!.cancel()
            return ns
        })
        report.note("    (\(delivered) events delivered to the subscriber)")
    }
}
