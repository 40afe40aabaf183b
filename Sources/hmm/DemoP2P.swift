import HMM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

extension Demo {
    /// The P2PDMA act: two devices under a switch, peer memory mapped into a process and its child,
    /// a long-term pin, an unbind that revokes the mappings and waits for the pin, a touch → SIGBUS.
    func p2pAct(_ m: Machine, _ parent: AddressSpace, _ say: (String, String?) -> Void) throws {
        let page: UInt64 = 4096
        let topology = PCITopology()
        let ports = try topology.addSwitch(under: topology.addRootPort(on: topology.addHostBridge()), downstreamPorts: 2)
        let nvme = try topology.addDevice(under: ports[0], bars: [PCIBAR(size: 16 << 20, busAddress: 0x80_0000_0000)])[0]
        let nic = try topology.addDevice(under: ports[1], bars: [PCIBAR(size: 1 << 20)])[0]
        let p2p = try P2PProvider.addResource(machine: m, function: nvme, bar: 0)
        p2p.publish()
        let route = topology.mapType(provider: nvme, client: nic)
        let found = topology.findMemory(for: [nic]) === p2p
        say("p2p act: \(nvme) (16 MiB BAR) and \(nic) below one switch: distance \(route.distance), \(route.type); "
            + "find-by-client picks \(found ? nvme.name : "nothing")", nil)

        let a = try parent.mapP2PMemory(p2p, length: 8 * Int(page))
        try parent.store(UInt64(0xC0FFEE), at: a + 2 * page)
        let child = try parent.fork()
        say("mmap 8 pages of its p2pmem (shared only; \(p2p.available >> 10) KiB left in the pool), write page 2, "
            + "fork: the child reads \(hexString(try child.load(UInt64.self, at: a + 2 * page)))", try pageMap(parent, a, 8))

        var plain = "no error"
        do { _ = try parent.getUserPages(a, count: 1, flags: [.fast]) } catch { plain = "\(error.code)" }
        let pin = try parent.getUserPages(a + 2 * page, count: 1, flags: [.fast, .pin, .longTerm, .pciP2PDMA])
        say("GUP without FOLL_PCI_P2PDMA: \(plain); with it, a long-term pin of page 2 (taken lockless)", nil)

        let last = Locked<P2PUnbindProgress?>(nil)
        let finished = Atomic<Bool>(false)
        let unbinder = HostThread {
            _ = try? p2p.unbind(timeout: .seconds(10)) { r in last.withLock { $0 = r } }
            finished.store(true, ordering: .releasing)
        }
        while last.withLock({ $0 }) == nil { usleep(500) }
        usleep(5000)
        let waiting = last.withLock { $0! }
        var touch = "no error"
        do { _ = try parent.load(UInt64.self, at: a + 2 * page) } catch { touch = "\(error.code)" }
        say("unbind: \(waiting.mappingsRevoked) mappings revoked (parent and child), still waiting after "
            + "\(milliseconds(waiting.elapsed)) ms for \(waiting.outstandingPages) page (the pin); a touch now: \(touch)",
            try pageMap(parent, a, 8))
        let pinned = try pin.withBytes(ofPage: 0) { $0.load(as: UInt64.self) }
        pin.release()
        unbinder.join()
        say("the pin holder still read \(hexString(pinned)), then unpinned: unbind completed "
            + "(\(finished.load(ordering: .acquiring) ? "removed" : "still running")), "
            + "\(m.epoch.reclaimedItems) retired items reclaimed after their grace period", nil)
        child.exit()
        try parent.unmap(a, length: 8 * Int(page))
    }
}

/// A duration in milliseconds with two decimals.
func milliseconds(_ d: Duration) -> String {
    let (sec, atto) = d.components
    return fixed(Double(sec) * 1e3 + Double(atto) / 1e15)
}
