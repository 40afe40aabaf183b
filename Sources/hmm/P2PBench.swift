import HMM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// P2PDMA benchmarks of `hmm bench p2p`: the per-page cost of mapping peer memory, unbind time with N
/// mappings, and exit time with deferred retirement against a grace-period wait per mapping close —
/// each with a baseline from the same run.
extension Bench {
    func p2pBenchmarks(reps: Int, scale: Int) throws {
        print("swift-hmm P2PDMA benchmarks (median of \(reps); ratios against baselines from this same run)")
        print(pad("figure", 46) + pad("value", 22) + "baseline / ratio")
        try p2pFaultIn(pages: 16384 / scale, reps: reps)
        for n in [10, 100, 1000] { try p2pUnbind(mappings: n, reps: reps) }
        try p2pExit(mappings: 1000, reps: min(reps, 3))
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
    func p2pFaultIn(pages: Int, reps: Int) throws {
        let m = try Machine(.init(systemMemory: 256 << 20))
        let p2p = try p2pRig(m, bytes: pages * 4096)
        let s = try m.makeAddressSpace()
        var p2pNs: [Double] = []
        var anonNs: [Double] = []
        for r in 0...reps {
            var t = now()
            let a = try s.mapP2PMemory(p2p, length: pages * 4096)
            let d = Double(now() - t) / Double(pages)
            try s.unmap(a, length: pages * 4096)
            m.epoch.collect()
            t = now()
            let b = try s.map(length: pages * 4096, protection: [.read, .write],
                              flags: [.private, .anonymous, .populate])
            let e = Double(now() - t) / Double(pages)
            try s.unmap(b, length: pages * 4096)
            if r > 0 {
                p2pNs.append(d)
                anonNs.append(e)
            }
        }
        let (p, a) = (median(p2pNs), median(anonNs))
        row("p2pmem mmap, \(pages) pages, per page", "\(fixed(p)) ns",
            "anon populate \(fixed(a)) ns; ratio \(fixed(p / a)) x")
        s.exit()
        try p2p.unbind()
        try m.checkInvariants()
    }

    /// Unbind with `mappings` one-page mappings spread over four spaces, against munmap of the same
    /// mappings one by one.
    func p2pUnbind(mappings: Int, reps: Int) throws {
        var unbindNs: [Double] = []
        var unmapNs: [Double] = []
        for r in 0...reps {
            let m = try Machine(.init(systemMemory: 64 << 20))
            let p2p = try p2pRig(m, bytes: 8 << 20)
            let spaces = try (0..<4).map { _ in try m.makeAddressSpace() }
            var addrs: [(AddressSpace, UInt64)] = []
            for i in 0..<(2 * mappings) {
                let s = spaces[i % 4]
                addrs.append((s, try s.mapP2PMemory(p2p, length: 4096)))
            }
            var t = now()
            for (s, a) in addrs[mappings...] { try s.unmap(a, length: 4096) }
            let u = Double(now() - t)
            t = now()
            let report = try p2p.unbind()
            let d = Double(now() - t)
            precondition(report.mappingsRevoked == mappings, "revoked \(report.mappingsRevoked) of \(mappings)")
            if r > 0 {
                unbindNs.append(d)
                unmapNs.append(u)
            }
            for s in spaces { s.exit() }
        }
        let (d, u) = (median(unbindNs), median(unmapNs))
        row("unbind with \(mappings) mappings", "\(fixed(d / 1000)) us",
            "munmap each \(fixed(u / 1000)) us; ratio \(fixed(d / u)) x")
    }

    /// Exit of a space holding `mappings` one-page peer mappings while other threads — twice as many as
    /// CPUs — keep pinning an 8 MiB buffer with GUP-fast (a loaded machine; DMA registrations of that
    /// size are routine):
    /// deferred retirement against a grace-period wait at every close. A grace period here lasts only
    /// until the walkers inside leave — far shorter than the kernel's, which waits for every CPU to
    /// pass a quiescent state — so the ratio understates what the kernel would pay.
    func p2pExit(mappings: Int, reps: Int) throws {
        let walkPages = 2048
        // Twice as many walkers as CPUs: some are always preempted inside a walk, as on a loaded machine.
        let walkerCount = 2 * max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        var results: [Epoch.RetirePolicy: Double] = [:]
        var walkNs = 0.0
        for policy in [Epoch.RetirePolicy.deferred, .synchronousPerClose] {
            let m = try Machine(.init(systemMemory: 64 << 20, retirePolicy: policy))
            let p2p = try p2pRig(m, bytes: 8 << 20)
            let busy = try m.makeAddressSpace()
            let buf = try busy.map(length: walkPages * 4096, protection: [.read, .write],
                                   flags: [.private, .anonymous, .populate])
            let stop = Atomic<Bool>(false)
            let walks = Atomic<Int>(0)
            let walkTime = Atomic<Int>(0)
            let started = Atomic<Int>(0)
            let walkers = (0..<walkerCount).map { _ in
                HostThread {
                    var first = true
                    while !stop.load(ordering: .relaxed) {
                        let t = now()
                        guard let got = try? busy.getUserPages(buf, count: walkPages, flags: .fast) else { continue }
                        walkTime.wrappingAdd(Int(now() - t), ordering: .relaxed)
                        walks.wrappingAdd(1, ordering: .relaxed)
                        got.release()
                        if first { started.wrappingAdd(1, ordering: .relaxed) }
                        first = false
                    }
                }
            }
            // The load is on once every walker has been scheduled and finished a walk (the scheduler
            // may take a few time slices to get to all of them).
            let deadline = now() + 2_000_000_000
            while started.load(ordering: .relaxed) < walkerCount && now() < deadline { usleep(1000) }
            var samples: [Double] = []
            for r in 0...reps {
                let s = try m.makeAddressSpace()
                for _ in 0..<mappings { _ = try s.mapP2PMemory(p2p, length: 4096) }
                let t = now()
                s.exit()
                let d = Double(now() - t)
                if r > 0 { samples.append(d) }
                while p2p.available != 8 << 20 { m.epoch.collect() }
            }
            stop.store(true, ordering: .relaxed)
            for w in walkers { w.join() }
            walkNs = Double(walkTime.load(ordering: .relaxed)) / Double(max(1, walks.load(ordering: .relaxed)))
            results[policy] = median(samples)
            busy.exit()
            try p2p.unbind()
            try m.checkInvariants()
        }
        let (d, s) = (results[.deferred]!, results[.synchronousPerClose]!)
        row("exit, \(mappings) mappings, deferred", "\(fixed(d / 1e6, 3)) ms",
            "\(walkerCount) threads GUP-fast \(walkPages) pages, \(fixed(walkNs / 1000, 1)) us each")
        row("exit, \(mappings) mappings, grace period per close", "\(fixed(s / 1e6, 3)) ms",
            "deferred is \(fixed(s / d, 1)) x faster")
    }
}
