import Synchronization
import Testing
@_spi(Engine) @testable import HMM

#if canImport(Glibc)
import Glibc
#endif

/// Two devices below one PCIe switch: `provider` (16 MiB memory BAR) and `client`, plus an I/O BAR on
/// the provider for bad-input checks.
struct SwitchRig {
    let topology: PCITopology
    let provider: PCIFunction
    let client: PCIFunction

    init(cpuSupportsP2PDMA: Bool = false, acsRedirect: Bool = false) throws {
        topology = PCITopology(cpuSupportsP2PDMA: cpuSupportsP2PDMA)
        let hb = topology.addHostBridge()
        let rp = topology.addRootPort(on: hb)
        let ports = try topology.addSwitch(under: rp, downstreamPorts: 2, acsRedirect: acsRedirect)
        provider = try topology.addDevice(
            under: ports[0],
            bars: [PCIBAR(size: 16 << 20, busAddress: 0x8_0000_0000), PCIBAR(size: 256, isMemory: false)])[0]
        client = try topology.addDevice(under: ports[1], bars: [PCIBAR(size: 1 << 20)])[0]
    }

    func addMemory(_ machine: Machine, size: Int = 0) throws -> P2PProvider {
        try P2PProvider.addResource(machine: machine, function: provider, bar: 0, size: size)
    }
}

/// The page frame mapped at `address` (taken and released through GUP-fast with the P2PDMA flag).
func mappedPFN(_ space: AddressSpace, _ address: UInt64) throws -> PFN {
    let held = try space.getUserPages(address, count: 1, flags: [.fast, .pciP2PDMA])
    defer { held.release() }
    return held.pfns[0]
}

/// Waits (bounded) until `condition` holds.
func waitUntil(_ seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    var waited = 0.0
    while !condition() {
        if waited > seconds { return false }
        usleep(200)
        waited += 0.0002
    }
    return true
}

/// A GUP-fast call on its own thread, parked by the `gupFastAfterReadEntry` hook right after it read
/// the entry (inside its epoch critical section, holding no reference) until ``resume()``.
final class ParkedGUPFast: @unchecked Sendable {
    private let arrived = Atomic<Int>(0)
    private let go = Atomic<Bool>(false)
    private let result = Locked<String>("")
    private var thread: TestThread?

    /// Starts `space.getUserPages(address, 1, flags)` and waits until it is parked; false on timeout.
    init(_ m: Machine, _ space: AddressSpace, _ address: UInt64, flags: GUPFlags) {
        m.hooks.set(.gupFastAfterReadEntry) { [self] in
            arrived.wrappingAdd(1, ordering: .acquiringAndReleasing)
            while !go.load(ordering: .acquiring) { usleep(100) }
        }
        thread = TestThread { [self] in
            do throws(HMMError) {
                let got = try space.getUserPages(address, count: 1, flags: flags)
                result.withLock { $0 = "got \(got.pfns[0])" }
                got.release()
            } catch {
                result.withLock { $0 = "\(error.code)" }
            }
        }
        parked = waitUntil { arrived.load(ordering: .acquiring) == 1 }
        m.hooks.set(.gupFastAfterReadEntry, nil)
    }

    /// Whether the walker reached the hook.
    private(set) var parked = false

    /// Lets the walker go on and waits for it; returns what it got ("got pfn …" or an error code).
    func resume() -> String {
        go.store(true, ordering: .releasing)
        thread?.join()
        return result.withLock { $0 }
    }
}

@Suite("P2PDMA")
struct P2PDMATests {
    @Test("distance and map type follow calc_map_type_and_dist for a handful of topologies")
    func distances() throws {
        // One switch: same function 0, functions of one device 2, devices on two ports 4.
        let t = PCITopology()
        let hb = t.addHostBridge()
        let rp = t.addRootPort(on: hb)
        let ports = try t.addSwitch(under: rp, downstreamPorts: 3)
        let a = try t.addDevice(under: ports[0], bars: [PCIBAR(size: 2 << 20)])[0]
        let fns = try t.addDevice(under: ports[1], functions: 2, bars: [PCIBAR(size: 2 << 20)])
        let c = try t.addDevice(under: ports[2], bars: [PCIBAR(size: 2 << 20)])[0]
        #expect(t.mapType(provider: a, client: a) == (.busAddress, 0))
        #expect(t.mapType(provider: fns[0], client: fns[1]) == (.busAddress, 2))
        #expect(t.mapType(provider: a, client: c) == (.busAddress, 4))
        #expect(t.distance(provider: a, clients: [c, fns[0], a]) == 8)
        #expect(a.name == "0000:03:00.0" && fns[1].name == "0000:04:00.1" && ports[2].name == "0000:02:02.0")

        // Two root ports of one host bridge: no common bridge, through the host bridge only if the
        // CPU is known good or the root complex whitelisted.
        for (cpu, white, expected) in [(false, false, P2PDMAMapType.notSupported), (true, false, .throughHostBridge),
                                       (false, true, .throughHostBridge)] {
            let t2 = PCITopology(cpuSupportsP2PDMA: cpu)
            let hb2 = t2.addHostBridge(whitelisted: white)
            let x = try t2.addDevice(under: t2.addRootPort(on: hb2), bars: [PCIBAR(size: 2 << 20)])[0]
            let y = try t2.addDevice(under: t2.addRootPort(on: hb2), bars: [PCIBAR(size: 2 << 20)])[0]
            #expect(t2.mapType(provider: x, client: y) == (expected, 4), "cpu \(cpu) whitelist \(white)")
            #expect(t2.distance(provider: x, clients: [y]) == (expected == .notSupported ? -1 : 4))
        }

        // ACS redirect on the switch: the traffic goes up to the root complex.
        let acs = try SwitchRig(acsRedirect: true)
        #expect(acs.topology.mapType(provider: acs.provider, client: acs.client) == (.notSupported, 4))
        let acsAMD = try SwitchRig(cpuSupportsP2PDMA: true, acsRedirect: true)
        #expect(acsAMD.topology.mapType(provider: acsAMD.provider, client: acsAMD.client) == (.throughHostBridge, 4))

        // Two host bridges: both whitelisted works unless an entry requires one shared host bridge.
        for (requireSame, expected) in [(false, P2PDMAMapType.throughHostBridge), (true, .notSupported)] {
            let t3 = PCITopology()
            let h1 = t3.addHostBridge(whitelisted: true, requiresSameHostBridge: requireSame)
            let h2 = t3.addHostBridge(whitelisted: true)
            let x = try t3.addDevice(under: t3.addRootPort(on: h1), bars: [PCIBAR(size: 2 << 20)])[0]
            let y = try t3.addDevice(under: t3.addRootPort(on: h2), bars: [PCIBAR(size: 2 << 20)])[0]
            #expect(t3.mapType(provider: x, client: y).type == expected)
            #expect(y.name.hasPrefix("0001:"))
        }
    }

    @Test("find-by-clients picks the closest published provider")
    func findMemory() throws {
        let t = PCITopology()
        let hb = t.addHostBridge()
        let rp = t.addRootPort(on: hb)
        let ports = try t.addSwitch(under: rp, downstreamPorts: 2)
        let near = try t.addDevice(under: ports[0], functions: 2, bars: [PCIBAR(size: 2 << 20)])
        let far = try t.addDevice(under: ports[1], bars: [PCIBAR(size: 2 << 20)])[0]
        let lonely = try t.addDevice(under: t.addRootPort(on: hb), bars: [PCIBAR(size: 2 << 20)])[0]
        try withMachine { m in
            let pNear = try P2PProvider.addResource(machine: m, function: near[1], bar: 0)
            let pFar = try P2PProvider.addResource(machine: m, function: far, bar: 0)
            let pLonely = try P2PProvider.addResource(machine: m, function: lonely, bar: 0)
            #expect(t.findMemory(for: [near[0]]) == nil, "nothing published yet")
            pFar.publish()
            pLonely.publish()
            #expect(t.findMemory(for: [near[0]]) === pFar, "the unreachable one is never chosen")
            pNear.publish()
            #expect(t.findMemory(for: [near[0]]) === pNear)
            #expect(t.distance(provider: near[1], clients: [near[0], far]) == 2 + 4)
            pNear.publish(false)
            #expect(t.findMemory(for: [near[0]]) === pFar)
            for p in [pNear, pFar, pLonely] { try p.unbind() }
        }
    }

    @Test("mapping lifecycle: zeroed pages, fork shares them, the pool is full again after the last reference")
    func lifecycle() throws {
        let rig = try SwitchRig()
        try withMachine { m in
            let p2p = try rig.addMemory(m)
            #expect(p2p.size == 16 << 20 && p2p.available == 16 << 20)
            let parent = try m.makeAddressSpace()
            let a = try parent.mapP2PMemory(p2p, length: 1 << 20)
            #expect(p2p.available == 15 << 20)
            #expect(try parent.load(UInt64.self, at: a + 8 * page) == 0)
            try parent.store(UInt64(0xA11CE), at: a + 8 * page)
            let pfn = try mappedPFN(parent, a + 8 * page)
            #expect(m.deviceKind(pfn) == .pciP2PDMA)
            #expect(p2p.pagemaps[0].framesInUse == 256)
            try m.checkInvariants()

            let child = try parent.fork()
            #expect(try child.load(UInt64.self, at: a + 8 * page) == 0xA11CE)
            try child.store(UInt64(0xB0B), at: a + 8 * page)
            #expect(try parent.load(UInt64.self, at: a + 8 * page) == 0xB0B, "shared, never copied")
            #expect(try mappedPFN(child, a + 8 * page) == pfn)
            try m.checkInvariants()

            try parent.unmap(a, length: 1 << 20)
            m.epoch.collect()
            #expect(p2p.available == 15 << 20, "the child still maps every page")
            child.exit()
            m.epoch.collect()
            #expect(p2p.available == 16 << 20)
            #expect(p2p.pagemaps[0].framesInUse == 0)
            #expect(p2p.isFree(pfn))
            try m.checkInvariants()
            try p2p.unbind()
        }
    }

    @Test("bad input gets the kernel's errors and changes nothing")
    func badInput() throws {
        let rig = try SwitchRig()
        try withMachine { m in
            expectError(.invalidArgument) { try P2PProvider.addResource(machine: m, function: rig.provider, bar: 2) }
            expectError(.invalidArgument) { try P2PProvider.addResource(machine: m, function: rig.provider, bar: 1) }
            expectError(.invalidArgument) {
                try P2PProvider.addResource(machine: m, function: rig.provider, bar: 0, offset: 16 << 20)
            }
            expectError(.invalidArgument) {
                try P2PProvider.addResource(machine: m, function: rig.provider, bar: 0, size: 16 << 20, offset: 2 << 20)
            }
            expectError(.invalidArgument) {
                try P2PProvider.addResource(machine: m, function: rig.provider, bar: 0, size: 1 << 20)
            }
            #expect(rig.provider.p2pProvider == nil)
            let p2p = try rig.addMemory(m, size: 4 << 20)
            let s = try m.makeAddressSpace()
            expectError(.invalidArgument) { try s.mapP2PMemory(p2p, length: 0) }
            expectError(.invalidArgument) { try s.mapP2PMemory(p2p, length: 4096, flags: .private) }
            expectError(.invalidArgument) { try s.mapP2PMemory(p2p, length: 4096, flags: [.shared, .private]) }
            expectError(.invalidArgument) { try s.mapP2PMemory(p2p, length: 4096, flags: [.shared, .anonymous]) }
            expectError(.invalidArgument) { try s.mapP2PMemory(p2p, length: 4096, offset: 4096) }
            expectError(.outOfMemory) { try s.mapP2PMemory(p2p, length: 5 << 20) }
            expectError(.invalidArgument) { try p2p.allocate(0) }
            #expect(s.mappings.isEmpty && p2p.available == 4 << 20)
            let k = try p2p.allocate(5000)
            #expect(k.pages == 2 && k.busAddress == 0x8_0000_0000 && p2p.available == (4 << 20) - 8192)
            try k.withBytes { $0.storeBytes(of: 7, as: UInt8.self) }
            try p2p.free(k)
            expectError(.invalidArgument) { try p2p.free(k) }
            try p2p.unbind()
            expectError(.noDevice) { try s.mapP2PMemory(p2p, length: 4096) }
            expectError(.noDevice) { try p2p.allocate(4096) }
            expectError(.noDevice) { try p2p.unbind() }
            #expect(rig.provider.p2pProvider == nil)
            // A new provider can be added to the unbound device.
            let again = try rig.addMemory(m, size: 2 << 20)
            #expect(again !== p2p && again.available == 2 << 20)
            try again.unbind()
        }
    }

    @Test("GUP returns P2PDMA pages only with FOLL_PCI_P2PDMA; long-term pins are allowed")
    func gupRules() throws {
        let rig = try SwitchRig()
        try withMachine { m in
            let p2p = try rig.addMemory(m)
            let s = try m.makeAddressSpace()
            let a = try s.mapP2PMemory(p2p, length: 8 * Int(page))
            expectError(.remoteIO) { try s.getUserPages(a, count: 2, flags: []) }
            expectError(.remoteIO) { try s.getUserPages(a, count: 2, flags: [.fast, .pin]) }
            let before = m.statistics[.gupFastPages]
            let pinned = try s.getUserPages(a, count: 8, flags: [.fast, .pin, .longTerm, .pciP2PDMA])
            #expect(m.statistics[.gupFastPages] == before + 8, "taken without mmapLock")
            #expect(pinned.pfns.allSatisfy { m.deviceKind($0) == .pciP2PDMA })
            #expect(p2p.pagemaps[0].refcount(pinned.pfns[0]) == 1 + Int(Machine.pinBias))
            let slow = try s.getUserPages(a, count: 8, flags: [.write, .pciP2PDMA])
            #expect(slow.pfns == pinned.pfns)
            try m.checkInvariants()
            slow.release()
            pinned.release()
            s.exit()
            try p2p.unbind()
        }
    }

    @Test("unbind revokes every mapping; a later touch is SIGBUS, never old or new data")
    func unbindRevokes() throws {
        let rig = try SwitchRig()
        try withMachine { m in
            let p2p = try rig.addMemory(m)
            let s = try m.makeAddressSpace()
            let a = try s.mapP2PMemory(p2p, length: 64 * Int(page))
            try s.store(UInt64(0x5EC2E7), at: a)
            let child = try s.fork()
            let b = try child.mapP2PMemory(p2p, length: 4 * Int(page))
            let report = try p2p.unbind()
            #expect(report.mappingsRevoked == 3 && report.outstandingPages == 0)
            #expect(p2p.isRemoved && p2p.pagemaps.isEmpty)
            for (space, addr) in [(s, a), (child, a), (child, b)] {
                expectError(.bus) { try space.load(UInt64.self, at: addr) }
                expectError(.bus) { try space.store(UInt64(1), at: addr) }
                expectError(.fault) { try space.getUserPages(addr, count: 1, flags: [.fast, .pciP2PDMA]) }
            }
            #expect(s.mappings.count == 1, "the VMA stays; only its pages are gone")
            // A new provider on the same BAR reuses the memory; the revoked mappings still see nothing.
            let again = try rig.addMemory(m)
            let other = try m.makeAddressSpace()
            let c = try other.mapP2PMemory(again, length: 64 * Int(page))
            try other.store(UInt64(0xBEEF), at: c)
            expectError(.bus) { try s.load(UInt64.self, at: a) }
            try m.checkInvariants()
            other.exit()
            try again.unbind()
        }
    }

    @Test("two unbinds at once: one removes the provider, the other is told it is gone")
    func concurrentUnbind() throws {
        let rig = try SwitchRig()
        try withMachine { m in
            let p2p = try rig.addMemory(m)
            let s = try m.makeAddressSpace()
            for _ in 0..<16 { _ = try s.mapP2PMemory(p2p, length: 4 * Int(page)) }
            let outcomes = Locked<[String]>([])
            runThreads(2) { _ in
                do throws(HMMError) {
                    let r = try p2p.unbind()
                    outcomes.withLock { $0.append("removed \(r.mappingsRevoked)") }
                } catch {
                    outcomes.withLock { $0.append("\(error.code)") }
                }
            }
            #expect(outcomes.withLock { $0.sorted() } == ["noDevice", "removed 16"])
            #expect(p2p.isRemoved && rig.provider.p2pProvider == nil)
        }
    }

    @Test("unbind with an outstanding pin waits, reports progress, times out, and completes after unpin")
    func unbindWaitsForPin() throws {
        let rig = try SwitchRig()
        try withMachine { m in
            let p2p = try rig.addMemory(m)
            let s = try m.makeAddressSpace()
            let a = try s.mapP2PMemory(p2p, length: 4 * Int(page))
            try s.store(UInt64(42), at: a + page)
            let pin = try s.getUserPages(a + page, count: 1, flags: [.pin, .longTerm, .pciP2PDMA])
            nonisolated(unsafe) var reports: [P2PUnbindProgress] = []
            do throws(HMMError) {
                try p2p.unbind(timeout: .milliseconds(30)) { reports.append($0) }
                Issue.record("unbind finished while a page was pinned")
            } catch {
                #expect(error.code == .busy)
            }
            #expect(!reports.isEmpty && reports.allSatisfy { $0.outstandingPages == 1 && $0.mappingsRevoked == 1 })
            expectError(.bus) { try s.load(UInt64.self, at: a + page) }
            expectError(.noDevice) { try s.mapP2PMemory(p2p, length: 4096) }
            // The pin holder still owns its page and its bytes.
            #expect(try pin.withBytes(ofPage: 0) { $0.load(as: UInt64.self) } == 42)

            let done = Atomic<Bool>(false)
            let unbinder = TestThread {
                do { try p2p.unbind(timeout: .seconds(20)) } catch { Issue.record("\(error)") }
                done.store(true, ordering: .releasing)
            }
            usleep(20_000)
            let waiting = !done.load(ordering: .acquiring)
            #expect(waiting, "unbind must wait for the pin")
            pin.release()
            unbinder.join()
            let doneNow = done.load(ordering: .acquiring)
            #expect(doneNow && p2p.isRemoved)
        }
    }

    /// A failed `vm_insert_page` in `p2pmem_alloc_mmap()` leaked a pagemap reference (device removal then
    /// hung) and left the page's refcount set, until the kernel's Dec 2025 fix.
    @Test("a mapping that fails part-way leaks no page and no pagemap reference")
    func mapErrorPath() throws {
        let rig = try SwitchRig()
        try withMachine(.init(systemMemory: 64 << 20, pageTableNodes: 16)) { m in
            let p2p = try rig.addMemory(m)
            var spaces: [AddressSpace] = []
            // Use up the node pool, then free three nodes: a 4 MiB mapping needs a PUD, a PMD and two
            // PTE tables, so it runs out after inserting the first table's 512 pages.
            while let s = try? m.makeAddressSpace() { spaces.append(s) }
            for s in spaces.suffix(3) { s.exit() }
            let s = spaces[0]
            expectError(.outOfMemory) { try s.mapP2PMemory(p2p, length: 4 << 20) }
            m.epoch.collect()
            #expect(s.mappings.isEmpty)
            #expect(p2p.available == 16 << 20 && p2p.pagemaps[0].framesInUse == 0)
            try m.checkInvariants()
            let report = try p2p.unbind(timeout: .seconds(1))
            #expect(report.outstandingPages == 0)
        }
    }

    @Test("hook-forced: GUP-fast paused on an entry while the page is unmapped and the pool reused never returns the recycled page")
    func gupFastVersusReuse() throws {
        let rig = try SwitchRig()
        try withMachine { m in
            let p2p = try rig.addMemory(m, size: 2 << 20)
            let a = try m.makeAddressSpace()
            let b = try m.makeAddressSpace()
            let va = try a.mapP2PMemory(p2p, length: Int(page))
            try a.store(UInt64(0xAAAA), at: va)
            let victim = try mappedPFN(a, va)

            let walker = ParkedGUPFast(m, a, va, flags: [.fast, .pciP2PDMA])
            #expect(walker.parked)
            // The walker holds the old entry and no reference. Unmap and hand the pool to B.
            try a.unmap(va, length: Int(page))
            m.epoch.collect()
            #expect(!p2p.isFree(victim), "the retired page must wait for the walker")
            #expect(m.epoch.pendingItems >= 1)
            let vb = try b.mapP2PMemory(p2p, length: (2 << 20) - Int(page))
            expectError(.outOfMemory) { try b.mapP2PMemory(p2p, length: Int(page)) }
            for i in 0..<511 { #expect(try mappedPFN(b, vb + UInt64(i) * page) != victim) }
            try b.store(UInt64(0xBBBB), at: vb)
            #expect(walker.resume() == "fault", "the walker must fall back and find nothing")
            m.epoch.collect()
            #expect(p2p.isFree(victim))
            let vb2 = try b.mapP2PMemory(p2p, length: Int(page))
            #expect(try mappedPFN(b, vb2) == victim, "reused only after the walker left")
            #expect(try b.load(UInt64.self, at: vb2) == 0)
            try m.checkInvariants()
            b.exit()
            try p2p.unbind()
        }
    }

    @Test("hook-forced: unbind cannot complete while a GUP-fast walker may hold a revoked entry")
    func gupFastVersusUnbind() throws {
        let rig = try SwitchRig()
        try withMachine { m in
            let p2p = try rig.addMemory(m, size: 2 << 20)
            let a = try m.makeAddressSpace()
            let va = try a.mapP2PMemory(p2p, length: 16 * Int(page))
            let walker = ParkedGUPFast(m, a, va + 3 * page, flags: [.fast, .pciP2PDMA])
            #expect(walker.parked)
            let progress = Locked<[Int]>([])
            let finished = Atomic<Bool>(false)
            let unbinder = TestThread {
                do {
                    try p2p.unbind(timeout: .seconds(20)) { r in progress.withLock { $0.append(r.outstandingPages) } }
                } catch { Issue.record("\(error)") }
                finished.store(true, ordering: .releasing)
            }
            #expect(waitUntil { progress.withLock { !$0.isEmpty } })
            usleep(10_000)
            let stillRunning = !finished.load(ordering: .acquiring)
            #expect(stillRunning, "the walker is still inside its epoch")
            #expect(progress.withLock { $0.allSatisfy { $0 > 0 } })
            let outcome = walker.resume()
            unbinder.join()
            let finishedNow = finished.load(ordering: .acquiring)
            #expect(finishedNow && p2p.isRemoved)
            #expect(outcome == "fault")
            // The BAR is re-added and handed to another space; the old mapping still sees nothing.
            let again = try rig.addMemory(m, size: 2 << 20)
            let b = try m.makeAddressSpace()
            let vb = try b.mapP2PMemory(again, length: 16 * Int(page))
            try b.store(UInt64(0xBBBB), at: vb + 3 * page)
            expectError(.bus) { try a.load(UInt64.self, at: va + 3 * page) }
            expectError(.fault) { try a.getUserPages(va + 3 * page, count: 1, flags: [.fast, .pciP2PDMA]) }
            try m.checkInvariants()
            b.exit()
            try again.unbind()
        }
    }

    @Test("exit never waits for a grace period: frames retire and come back once the walker leaves")
    func exitIsDeferred() throws {
        let rig = try SwitchRig()
        try withMachine { m in
            let p2p = try rig.addMemory(m, size: 2 << 20)
            let a = try m.makeAddressSpace()
            let other = try m.makeAddressSpace()
            var maps: [UInt64] = []
            for _ in 0..<8 { maps.append(try a.mapP2PMemory(p2p, length: 4 * Int(page))) }
            let om = try other.map(length: Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try other.store(UInt8(1), at: om)
            // A walker parks inside its critical section (on another space's page).
            let walker = ParkedGUPFast(m, other, om, flags: [.fast])
            #expect(walker.parked)
            let t0 = ContinuousClock.now
            a.exit()
            #expect(ContinuousClock.now - t0 < .seconds(1), "exit returned while the walker is inside")
            m.epoch.collect()
            #expect(p2p.available == 2 << 20 - 32 * Int(page), "32 pages retired, not yet reusable")
            #expect(walker.resume().hasPrefix("got"))
            m.epoch.collect()
            #expect(p2p.available == 2 << 20)
            #expect(m.epoch.pendingItems == 0)
            other.exit()
            try p2p.unbind()
        }
    }
    @Test("stress: GUP-fast against unmap, remap, fork, exit and pool reuse never returns another space's page")
    func gupFastStress() throws {
        let rig = try SwitchRig()
        try withMachine { m in
            let p2p = try rig.addMemory(m, size: 2 << 20)
            let a = try m.makeAddressSpace()
            let anonBase: UInt64 = 0x5000_0000_0000
            let current = Atomic<UInt64>(0)
            let stop = Atomic<Bool>(false)
            let taken = Atomic<Int>(0)
            let tagA: UInt64 = 0xA000_0000_0000_0000
            let tagB: UInt64 = 0xB000_0000_0000_0000
            let deadline = ContinuousClock.now + .milliseconds(1200)
            runThreads(5) { t in
                do {
                    switch t {
                    case 0:
                        // A's peer mapping comes and goes; every page carries A's tag.
                        while ContinuousClock.now < deadline {
                            guard let va = try? a.mapP2PMemory(p2p, length: 16 * Int(page)) else { continue }
                            for i in 0..<16 { try a.store(tagA | UInt64(i), at: va + UInt64(i) * page) }
                            current.store(va, ordering: .releasing)
                            usleep(50)
                            current.store(0, ordering: .releasing)
                            try a.unmap(va, length: 16 * Int(page))
                        }
                        stop.store(true, ordering: .releasing)
                    case 1:
                        // Other processes take the pool (and RAM) as soon as it is free, fork and exit.
                        while !stop.load(ordering: .acquiring) {
                            let b = try m.makeAddressSpace()
                            if let vb = try? b.mapP2PMemory(p2p, length: 64 * Int(page)) {
                                for i in 0..<64 { try b.store(tagB | UInt64(i), at: vb + UInt64(i) * page) }
                            }
                            let anon = try b.map(length: 64 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
                            for i in 0..<64 { try b.store(tagB | UInt64(i), at: anon + UInt64(i) * page) }
                            let child = try b.fork()
                            b.exit()
                            child.exit()
                        }
                    case 2:
                        // A's anonymous memory at a fixed place: mapped, written, unmapped (tables freed).
                        while !stop.load(ordering: .acquiring) {
                            try a.map(at: anonBase, length: 32 * Int(page), protection: [.read, .write], flags: [.private, .anonymous, .fixed])
                            for i in 0..<32 { try a.store(tagA | UInt64(i), at: anonBase + UInt64(i) * page) }
                            try a.unmap(anonBase, length: 32 * Int(page))
                        }
                    default:
                        // Lockless walkers: whatever they get must be A's (or still zero), never B's.
                        var i = UInt64(t)
                        while !stop.load(ordering: .acquiring) {
                            i &+= 1
                            let va = current.load(ordering: .acquiring)
                            let addr = (i & 1 == 0 || va == 0) ? anonBase + (i % 28) * page : va + (i % 12) * page
                            let flags: GUPFlags = i % 3 == 0 ? [.fast, .pin, .pciP2PDMA] : [.fast, .pciP2PDMA]
                            guard let got = try? a.getUserPages(addr, count: 4, flags: flags) else { continue }
                            for k in 0..<4 {
                                let v = try got.withBytes(ofPage: k) { $0.load(as: UInt64.self) }
                                if v != 0 && v & 0xF000_0000_0000_0000 != tagA {
                                    Issue.record("walker got a page holding \(hex(v)) at \(hex(addr)) + \(k)")
                                }
                            }
                            got.release()
                            taken.wrappingAdd(1, ordering: .relaxed)
                        }
                    }
                } catch {
                    Issue.record("thread \(t): \(error)")
                    stop.store(true, ordering: .releasing)
                }
            }
            #expect(taken.load(ordering: .relaxed) > 0)
            a.exit()
            m.epoch.collect()
            #expect(p2p.available == 2 << 20)
            try p2p.unbind(timeout: .seconds(5))
        }
    }
}
