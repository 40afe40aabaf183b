import HMM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// P2PDMA benchmarks of `hmm bench p2p`: the per-page cost of mapping peer memory, unbind time with N
/// mappings, and exit time with deferred retirement against a grace-period wait per mapping close —
/// each with a baseline from the same run.
extension Bench {
    func p2pBenchmarks(_ report: BenchReport, reps: Int, scale: Int) throws {
        report.section("swift-hmm P2PDMA benchmarks (\(reps) timed rounds after a warm-up round)")
        try p2pFaultIn(report, pages: 16384 / scale, reps: reps)
        for n in [10, 100, 1000] { try p2pUnbind(report, mappings: n, reps: reps) }
        try p2pExit(report, mappings: 1000, reps: min(reps, 3))
    }

    /// Two devices below one switch; the provider has `bytes` of BAR memory.
    private func p2pRig(_ m: Machine, bytes: Int) throws -> P2PProvider {
        let t = PCITopology()
        let ports = try t.addSwitch(under: t.addRootPort(on: t.addHostBridge()), downstreamPorts: 2)
        let dev = try t.addDevice(under: ports[0], bars: [PCIBAR(size: bytes)])[0]
        _ = try t.addDevice(under: ports[1], bars: [PCIBAR(size: 2 << 20)])
        return try P2PProvider.addResource(machine: m, function: dev, bar: 0)
    }

    /// Mapping peer memory inserts (and zeroes) every page at mmap time: per-page cost against a
    /// populated anonymous mapping of the same size, which zeroes and maps the same number of pages.
    func p2pFaultIn(_ report: BenchReport, pages: Int, reps: Int) throws {
        let m = try Machine(.init(systemMemory: 256 << 20))
        let p2p = try p2pRig(m, bytes: pages * 4096)
        let s = try m.makeAddressSpace()
        try report.pair(name: "p2pmem mmap, \(pages) pages, per page", unit: "ns", baseline: "anon populate",
                        reps: reps, baselineBody: {
            let t = now()
            let b = try s.map(length: pages * 4096, protection: [.read, .write], flags: [.private, .anonymous, .populate])
            let ns = Double(now() - t) / Double(pages)
            try s.unmap(b, length: pages * 4096)
            return ns
        }, measuredBody: {
            let t = now()
            let a = try s.mapP2PMemory(p2p, length: pages * 4096)
            let ns = Double(now() - t) / Double(pages)
            try s.unmap(a, length: pages * 4096)
            m.epoch.collect()
            return ns
        })
        s.exit()
        try p2p.unbind()
        try m.checkInvariants()
    }

    /// Unbind with `mappings` one-page mappings spread over four spaces, against munmap of the same
    /// mappings one by one (one round: a fresh machine, munmap of half the mappings, unbind of the rest).
    func p2pUnbind(_ report: BenchReport, mappings: Int, reps: Int) throws {
        let samples = try BenchReport.rounds(reps: reps) {
            let m = try Machine(.init(systemMemory: 64 << 20))
            let p2p = try p2pRig(m, bytes: 8 << 20)
            let spaces = try (0..<4).map { _ in try m.makeAddressSpace() }
            defer { for s in spaces { s.exit() } }
            var addrs: [(AddressSpace, UInt64)] = []
            for i in 0..<(2 * mappings) {
                let s = spaces[i % 4]
                addrs.append((s, try s.mapP2PMemory(p2p, length: 4096)))
            }
            var t = now()
            for (s, a) in addrs[mappings...] { try s.unmap(a, length: 4096) }
            let u = Double(now() - t)
            t = now()
            let revoked = try p2p.unbind()
            let d = Double(now() - t)
            precondition(revoked.mappingsRevoked == mappings, "revoked \(revoked.mappingsRevoked) of \(mappings)")
            return [u / 1000, d / 1000]
        }
        report.add(name: "unbind with \(mappings) mappings", unit: "us", baseline: "munmap each",
                   measured: samples.map { $0[1] }, baselineSamples: samples.map { $0[0] })
    }

    /// Exit of a space holding `mappings` one-page peer mappings while other threads — twice as many as
    /// CPUs — keep pinning an 8 MiB buffer with GUP-fast (a loaded machine; DMA registrations of that
    /// size are routine): deferred retirement against a grace-period wait at every close. A grace period
    /// here lasts only until the walkers inside leave — far shorter than the kernel's, which waits for
    /// every CPU to pass a quiescent state — so the ratio understates what the kernel would pay.
    ///
    /// The two policies need a machine each; one pool of walkers serves both, switched to the machine
    /// whose exit is being timed, so that the rounds alternate deferred, per-close, deferred … under the
    /// same load.
    func p2pExit(_ report: BenchReport, mappings: Int, reps: Int) throws {
        let walkPages = 2048
        // Twice as many walkers as CPUs: some are always preempted inside a walk, as on a loaded machine.
        let walkerCount = 2 * max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        struct Rig {
            let machine: Machine
            let p2p: P2PProvider
            let busy: AddressSpace
            let buffer: UInt64
        }
        let rigs = try [Epoch.RetirePolicy.deferred, .synchronousPerClose].map { policy in
            let m = try Machine(.init(systemMemory: 64 << 20, retirePolicy: policy))
            let busy = try m.makeAddressSpace()
            return Rig(machine: m, p2p: try p2pRig(m, bytes: 8 << 20), busy: busy,
                       buffer: try busy.map(length: walkPages * 4096, protection: [.read, .write],
                                            flags: [.private, .anonymous, .populate]))
        }
        let targets = rigs.map { ($0.busy, $0.buffer) }
        let busyA = targets[0], busyB = targets[1]
        // phase: the rig the walkers pin in (0 or 1), -1 to stop; arrived: walkers that finished a walk in
        // the current phase.
        let phase = Atomic<Int>(0)
        let arrived = Atomic<Int>(0)
        let walks = Atomic<Int>(0)
        let walkTime = Atomic<Int>(0)
        let walkers = (0..<walkerCount).map { _ in
            HostThread {
                var last = -1
                while true {
                    let ph = phase.load(ordering: .acquiring)
                    if ph < 0 { break }
                    let (space, buffer) = ph == 0 ? busyA : busyB
                    let t = now()
                    guard let got = try? space.getUserPages(buffer, count: walkPages, flags: .fast) else { continue }
                    walkTime.wrappingAdd(Int(now() - t), ordering: .relaxed)
                    walks.wrappingAdd(1, ordering: .relaxed)
                    got.release()
                    if ph != last {
                        last = ph
                        arrived.wrappingAdd(1, ordering: .relaxed)
                    }
                }
            }
        }
        /// Moves the walkers to rig `k` and waits until every one of them has finished a walk there (the
        /// scheduler may take a few time slices to get to all of them).
        func switchLoad(to k: Int) {
            arrived.store(0, ordering: .relaxed)
            phase.store(k, ordering: .releasing)
            let deadline = now() + 2_000_000_000
            while arrived.load(ordering: .relaxed) < walkerCount && now() < deadline { usleep(1000) }
        }
        func exitTime(_ k: Int) throws -> Double {
            let rig = rigs[k]
            switchLoad(to: k)
            let s = try rig.machine.makeAddressSpace()
            for _ in 0..<mappings { _ = try s.mapP2PMemory(rig.p2p, length: 4096) }
            let t = now()
            s.exit()
            let d = Double(now() - t)
            while rig.p2p.available != 8 << 20 { rig.machine.epoch.collect() }
            return d / 1e6
        }
        let samples = try BenchReport.rounds(reps: reps) { [try exitTime(0), try exitTime(1)] }
        phase.store(-1, ordering: .releasing)
        for w in walkers { w.join() }
        let walkNs = Double(walkTime.load(ordering: .relaxed)) / Double(max(1, walks.load(ordering: .relaxed)))
        for rig in rigs {
            rig.busy.exit()
            try rig.p2p.unbind()
            try rig.machine.checkInvariants()
        }
        report.add(name: "exit, \(mappings) mappings, deferred", unit: "ms", digits: 3,
                   note: "\(walkerCount) threads GUP-fast \(walkPages) pages, \(fixed(walkNs / 1000, 1)) us each",
                   measured: samples.map { $0[0] })
        report.add(name: "exit, \(mappings) mappings, grace period per close", unit: "ms", baseline: "deferred",
                   digits: 3, note: "ratio = how many times faster deferred is",
                   measured: samples.map { $0[1] }, baselineSamples: samples.map { $0[0] })
    }
}
