import HMM
import HMMDevices
import HMMNative
import ManagedMemory
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Thrashing: UVM's detection (3 migrations within 500 µs), throttling, pinning after 10 throttles, and
/// the diagnosis no anchor has — all from a real CPU/device ping-pong on one page.
@Suite("managed memory: thrashing", .serialized, .timeLimit(.minutes(10)))
struct ThrashingTests {
    @Test("the rule: 3 alternating migrations within 500 µs detect; 2 do not; a gap resets; 10 throttles pin for 150 ms")
    func rule() {
        let p = ThrashingPolicy()
        var t = PageThrashing()
        // device at 0, CPU at 400 µs, device at 800 µs: two events within the lapse.
        let r1 = t.record(.deviceWrite, at: 1_000, p)
        #expect(!r1)
        let r2 = t.record(.cpuWrite, at: 401_000, p)
        #expect(!r2)
        let r3 = t.record(.deviceWrite, at: 801_000, p)
        #expect(!r3, "2 events: below the threshold")
        let r4 = t.record(.cpuWrite, at: 1_201_000, p)
        #expect(r4, "the 3rd event within the lapse detects")
        #expect(t.hint == .accessedBy)
        // Throttled 10 times, then pinned for 150 ms.
        for k in 0..<10 {
            let d = t.decide(at: 1_300_000 + UInt64(k), p)
            #expect(d == .throttle)
        }
        let r5 = t.decide(at: 2_000_000, p)
        #expect(r5 == .pin)
        #expect(t.pinnedUntil == 152_000_000)
        let r6 = t.decide(at: 100_000_000, p)
        #expect(r6 == .pin, "still pinned")
        var slow = PageThrashing()
        let r7 = slow.record(.deviceRead, at: 1_000, p)
        #expect(!r7)
        let r8 = slow.record(.cpuWrite, at: 502_000, p)
        #expect(!r8, "501 µs later: outside the lapse, no event")
        let r9 = slow.record(.deviceRead, at: 1_003_000, p)
        #expect(!r9)
        let r10 = slow.record(.cpuWrite, at: 1_504_000, p)
        #expect(!r10)
        #expect(!slow.thrashing)
        var reads = PageThrashing()
        for k in 0..<4 { _ = reads.record(k % 2 == 0 ? .deviceRead : .cpuWrite, at: UInt64(1_000 + k * 100_000), p) }
        #expect(reads.thrashing && reads.hint == .readMostly)
    }

    func pingPong(deviceWrites: Bool, native: Bool = false) throws -> (ManagedMemory.Statistics, [PolicyEvent.Hint], [PolicyEvent.Kind])? {
        let machine = try Machine(.init(systemMemory: 64 << 20))
        let gpu = try Accelerator(machine: machine, memory: 4 << 20)
        if native && NativeSpace.unsupportedReason() != nil { return nil }
        let nativeSpace = native ? try NativeSpace(machine: machine) : nil
        defer { try? nativeSpace?.close() }
        let s = try machine.makeAddressSpace()
        // A wide lapse: the ping-pong below takes a kernel launch per round, and a loaded test machine
        // can stretch a round past UVM's 500 µs (the rule at 500 µs is tested above with exact times).
        var o = ManagedMemory.Options()
        o.thrashing?.lapse = 200_000_000
        o.thrashing?.pinDuration = 10_000_000_000
        o.thrashing?.epoch = 60_000_000_000
        o.thrashing?.pinAfterThrottles = 3
        let mm = try ManagedMemory(accelerator: gpu, space: nativeSpace.map { .native($0) } ?? .simulated(s), options: o)
        let events = try machine.events.subscribe(capacity: 1 << 16, kinds: HMMEventKinds(.policy))
        let a = try mm.allocate(4 << 12)
        // Rounds of: the device touches the page (it migrates there), the CPU writes it (it comes back).
        let rounds = 12
        for r in 0..<rounds {
            _ = try mm.launch(items: 1, workers: 1) { (lane, _) throws(HMMError) in
                if deviceWrites { _ = try lane.atomicAdd(1, at: a.address) } else { _ = try lane.load(UInt64.self, at: a.address + 16) }
            }
            // A plain CPU store: through the software MMU, or natively a real store into the page.
            if native { a.pointer.storeBytes(of: UInt64(r), toByteOffset: 8, as: UInt64.self) } else { try s.store(UInt64(r), at: a.address + 8) }
        }
        if deviceWrites { #expect(try a.cpuLoad(0, count: 1) == [UInt64(rounds)], "every device increment landed") }
        var kinds: [PolicyEvent.Kind] = []
        var hints: [PolicyEvent.Hint] = []
        events.drain { r in
            if case .policy(let e) = r.event {
                kinds.append(e.kind)
                if e.kind == .diagnosis { hints.append(e.hint) }
            }
        }
        let stats = mm.statistics
        mm.close()
        s.exit()
        #expect(gpu.freePages == gpu.memoryPages)
        try machine.checkInvariants()
        return (stats, hints, kinds)
    }

    @Test("a CPU store loop and device atomics on one page: detected, throttled, pinned, diagnosed accessed-by", arguments: [false, true])
    func writePingPong(native: Bool) throws {
        guard let (stats, hints, kinds) = try pingPong(deviceWrites: true, native: native) else { return }
        #expect(stats.thrashingDetected >= 1)
        #expect(stats.throttles >= 3)
        #expect(kinds.contains(.thrashingDetected) && kinds.contains(.throttleStart) && kinds.contains(.throttleEnd))
        #expect(hints.first == .accessedBy, "both sides write: a remote mapping stops it")
        #expect(stats.pins == 1 && kinds.contains(.pin) && stats.remoteMappedPages >= 1, "pinned after 3 throttles")
    }

    @Test("a CPU store loop and device reads on one page: diagnosed read-mostly", arguments: [false, true])
    func readPingPong(native: Bool) throws {
        guard let (stats, hints, _) = try pingPong(deviceWrites: false, native: native) else { return }
        #expect(stats.thrashingDetected >= 1)
        #expect(hints.first == .readMostly, "the device only reads: read duplication would serve both")
    }

    /// Issue 22 item 8: device kernels on a native region while a CPU thread keeps storing into other
    /// words of the same pages. Each round trip (device fault → migration → CPU fault-back) takes longer
    /// than UVM's 500 µs lapse here, so the timing rule never sees thrashing; forward progress must not
    /// depend on it. A fault the device replays without progress is pinned by round count and mapped
    /// remotely, and every kernel finishes with every increment landed.
    @Test("device atomics racing a CPU store loop on the same pages finish with every increment (end to end; the round-count rule itself: AcceleratorTests)",
          arguments: [FaultMode.handlerThread, .inThread])
    func starvationPinsByRoundCount(mode: FaultMode) throws {
        if NativeSpace.unsupportedReason() != nil { return }
        let machine = try Machine(.init(systemMemory: 64 << 20))
        let gpu = try Accelerator(machine: machine, memory: 4 << 20)
        var spaceOptions = NativeSpace.Options()
        spaceOptions.faultMode = mode
        let space = try NativeSpace(machine: machine, options: spaceOptions)
        defer { try? space.close() }
        let mm = try ManagedMemory(accelerator: gpu, space: .native(space), options: .init())  // UVM's 500 µs lapse
        let pages = 4
        let a = try mm.allocate(pages << 12)
        let stop = Atomic<Bool>(false)
        let cpu = HostThread {
            var k: UInt64 = 0
            while !stop.load(ordering: .relaxed) {
                k &+= 1
                // Words 64… of each page: never the device's counters (word 0 of each page).
                a.pointer.storeBytes(of: k, toByteOffset: Int(k % UInt64(pages)) << 12 + 512, as: UInt64.self)
            }
        }
        var joined = false
        defer {
            if !joined {
                stop.store(true, ordering: .relaxed)
                cpu.join()
            }
        }
        let rounds = 6
        let adds = 200
        for _ in 0..<rounds {
            _ = try mm.launch(items: pages, workers: 2) { (lane, item) throws(HMMError) in
                for _ in 0..<adds { _ = try lane.atomicAdd(1, at: a.address + UInt64(item) << 12) }
            }
        }
        // The CPU thread stops before the check: a store of it still faulting a page back while `close`
        // evicts would keep that page's device frame a moment longer (seen once under TSan).
        stop.store(true, ordering: .relaxed)
        cpu.join()
        joined = true
        for p in 0..<pages {
            #expect(try a.cpuLoad(p << 9, count: 1) == [UInt64(rounds * adds)], "page \(p): every device increment landed")
        }
        mm.close()
        // A fault message of the CPU thread can still be in the fault thread's hands: its toucher was
        // woken by an earlier install and went on, and the late message brings the fault-around window
        // back from the device now (seen once: 4 frames still taken). Let the engine finish first.
        space.waitUntilIdle()
        #expect(gpu.freePages == gpu.memoryPages)
        try machine.checkInvariants()
    }
}
