import HMM
import HMMDevices
import HMMNative
import ManagedMemory
import Testing

/// End to end on both engines: managed allocations, a streaming kernel with data checks, prefetch,
/// oversubscription that evicts or fails as configured and loses nothing.
@Suite("managed memory", .serialized, .timeLimit(.minutes(10)))
struct ManagedMemoryTests {
    enum Engine: String, CaseIterable, CustomStringConvertible {
        case simulated, native
        var description: String { rawValue }
    }

    func withManager(_ engine: Engine, deviceMemory: Int, options: ManagedMemory.Options = .init(),
                     _ body: (ManagedMemory) throws -> Void) throws {
        let machine = try Machine(.init(systemMemory: 256 << 20))
        let gpu = try Accelerator(machine: machine, memory: deviceMemory)
        switch engine {
        case .simulated:
            let s = try machine.makeAddressSpace()
            let mm = try ManagedMemory(accelerator: gpu, space: .simulated(s), options: options)
            try body(mm)
            mm.close()
            s.exit()
        case .native:
            guard NativeSpace.unsupportedReason() == nil else { return }
            let space = try NativeSpace(machine: machine)
            let mm = try ManagedMemory(accelerator: gpu, space: .native(space), options: options)
            do { try body(mm) } catch {
                mm.close()
                try? space.close()
                throw error
            }
            mm.close()
            try space.close()
        }
        #expect(gpu.freePages == gpu.memoryPages)
        try machine.checkInvariants()
    }

    /// b[i] = 3 a[i] + 1 on the device, 512 words per item; returns the report.
    func stream(_ mm: ManagedMemory, words: Int) throws -> AcceleratorContext.KernelReport {
        let a = try mm.allocate(words * 8, owner: "a")
        let b = try mm.allocate(words * 8, owner: "b")
        try a.cpuStore((0..<words).map { UInt64($0) }, at: 0)
        let report = try mm.launch(items: words / 512, workers: 2) { (lane, item) throws(HMMError) in
            for j in 0..<512 {
                let i = item * 512 + j
                try lane.store(3 &* (try lane.load(UInt64.self, at: a.word(i))) &+ 1, at: b.word(i))
            }
        }
        let out = try b.cpuLoad(0, count: words)
        #expect(out.enumerated().allSatisfy { $0.element == 3 &* UInt64($0.offset) &+ 1 }, "every word computed")
        try mm.free(a)
        try mm.free(b)
        return report
    }

    @Test("stream: density prefetch takes far fewer faults than demand paging", arguments: Engine.allCases)
    func streamPrefetch(engine: Engine) throws {
        var demand = ManagedMemory.Options()
        demand.prefetch = NoPrefetch()
        var faultsDemand = 0
        var faultsDensity = 0
        try withManager(engine, deviceMemory: 32 << 20, options: demand) { mm in faultsDemand = try stream(mm, words: 1 << 20).faults }
        try withManager(engine, deviceMemory: 32 << 20) { mm in faultsDensity = try stream(mm, words: 1 << 20).faults }
        #expect(faultsDemand >= 4096, "demand paging faults every page of 16 MiB")
        #expect(faultsDensity * 20 < faultsDemand, "first touch of a block brings it whole: \(faultsDensity) vs \(faultsDemand)")
    }

    @Test("oversubscribed 2×: blocks are evicted and every word survives", arguments: Engine.allCases)
    func oversubscriptionEvicts(engine: Engine) throws {
        for eviction in [AllocationOrderEviction() as any EvictionPolicy, LRUEviction(), FIFOEviction()] {
            var o = ManagedMemory.Options()
            o.eviction = eviction
            try withManager(engine, deviceMemory: 8 << 20, options: o) { mm in
                _ = try stream(mm, words: 1 << 20)
                #expect(mm.statistics.evictions > 0, "\(eviction.name) evicted")
                #expect(mm.devicePagesInUse <= mm.budgetPages)
            }
        }
    }

    @Test("a budget below the device's memory is kept; with the fail policy the kernel fails clearly and loses nothing", arguments: Engine.allCases)
    func budgetFails(engine: Engine) throws {
        var o = ManagedMemory.Options()
        o.budget = 4 << 20
        o.onExhaustion = .fail
        try withManager(engine, deviceMemory: 16 << 20, options: o) { mm in
            let a = try mm.allocate(8 << 20)
            try a.cpuStore((0..<(1 << 20)).map { UInt64($0) &* 7 }, at: 0)
            do {
                _ = try mm.launch(items: 2048, workers: 2) { (lane, p) throws(HMMError) in
                    _ = try lane.load(UInt64.self, at: a.address + UInt64(p) << 12)
                }
                Issue.record("the kernel should have failed")
            } catch let error as HMMError {
                #expect(error.code == .outOfMemory)
                #expect(error.message.contains("budget of 4 MiB"))
            }
            #expect(mm.devicePagesInUse <= 1024)
            let words = try a.cpuLoad(0, count: 1 << 20)
            #expect(words.enumerated().allSatisfy { $0.element == UInt64($0.offset) &* 7 })
            try mm.free(a)
        }
    }

    @Test("accessed-by: the device maps host memory remotely and nothing migrates", arguments: Engine.allCases)
    func accessedBy(engine: Engine) throws {
        try withManager(engine, deviceMemory: 8 << 20) { mm in
            let a = try mm.allocate(1 << 20, advice: .accessedBy)
            try a.cpuStore((0..<(1 << 17)).map { UInt64($0) }, at: 0)
            let r = try mm.launch(items: 256, workers: 2) { (lane, p) throws(HMMError) in
                let at = a.address + UInt64(p) << 12
                try lane.store(try lane.load(UInt64.self, at: at) + 1000, at: at)
            }
            #expect(r.pagesToDevice == 0 && r.pagesMappedRemotely >= 256, "each page mapped in place (natively a read may map it read-only first, then the write again)")
            #expect(try a.cpuLoad(512, count: 1) == [1512])
            try mm.free(a)
        }
    }

    @Test("preferred location CPU: device accesses map system memory, nothing migrates", arguments: Engine.allCases)
    func preferredCPU(engine: Engine) throws {
        try withManager(engine, deviceMemory: 8 << 20) { mm in
            let a = try mm.allocate(64 << 12, advice: .init(preferredLocation: .cpu))
            try a.cpuStore((0..<(64 * 512)).map { UInt64($0) }, at: 0)
            let r = try mm.launch(items: 64, workers: 2) { (lane, p) throws(HMMError) in
                _ = try lane.load(UInt64.self, at: a.address + UInt64(p) << 12)
            }
            #expect(r.pagesToDevice == 0 && r.pagesMappedRemotely >= 64, "every page mapped where it is (a page faulted twice in one batch window maps twice)")
            try mm.free(a)
        }
    }

    @Test("read-mostly: reads are served in place, a write migrates the page", arguments: Engine.allCases)
    func readMostly(engine: Engine) throws {
        try withManager(engine, deviceMemory: 8 << 20) { mm in
            let a = try mm.allocate(16 << 12, advice: .readMostly)
            try a.cpuStore((0..<(16 * 512)).map { UInt64($0) }, at: 0)
            let reads = try mm.launch(items: 16, workers: 2) { (lane, p) throws(HMMError) in
                _ = try lane.load(UInt64.self, at: a.address + UInt64(p) << 12)
            }
            #expect(reads.pagesToDevice == 0 && reads.pagesMappedRemotely >= 16)
            let write = try mm.launch(items: 1, workers: 1) { (lane, _) throws(HMMError) in
                try lane.store(UInt64(99), at: a.address + 8)
            }
            #expect(try a.cpuLoad(1, count: 1) == [99])
            #expect(write.faults >= 1)
            try mm.free(a)
        }
    }

    @Test("read duplication (a device copy beside a read-only CPU copy) is not available on HMM",
          .disabled("HMM gives a driver no way to write-protect the CPU's mapping of a page it copies; UVM's HMM mode does not duplicate either (anchors B5). read-mostly serves reads in place instead (issue 13)"))
    func readDuplication() throws {}

    @Test("granularity: one fault moves its aligned 64 KiB, or its whole 2 MiB block")
    func granularity() throws {
        for (g, expected) in [(ManagedMemory.Advice.Granularity.bigPage, 16), (.block, 512)] {
            var o = ManagedMemory.Options()
            o.prefetch = NoPrefetch()
            try withManager(.simulated, deviceMemory: 8 << 20, options: o) { mm in
                let a = try mm.allocate(2 << 20, advice: .init(granularity: g))
                try a.cpuStore([1], at: 0)
                let r = try mm.launch(items: 1, workers: 1) { (lane, _) throws(HMMError) in
                    _ = try lane.load(UInt64.self, at: a.address + 5 << 12)
                }
                #expect(r.pagesToDevice == expected)
                try mm.free(a)
            }
        }
    }

    @Test("a per-owner quota holds an owner's device pages under it; other owners keep their room")
    func quota() throws {
        var o = ManagedMemory.Options()
        o.quotas = ["small": 4 << 20, "tiny": 1 << 20]
        o.prefetch = NoPrefetch()
        try withManager(.simulated, deviceMemory: 16 << 20, options: o) { mm in
            let small = try mm.allocate(8 << 20, owner: "small")
            let big = try mm.allocate(2 << 20, owner: "big")
            try small.cpuStore((0..<(1 << 20)).map { UInt64($0) }, at: 0)
            _ = try mm.launch(items: 2048, workers: 2) { (lane, p) throws(HMMError) in
                _ = try lane.load(UInt64.self, at: small.address + UInt64(p) << 12)
            }
            #expect(mm.statistics.evictions > 0, "the owner evicted its own blocks to stay under 4 MiB")
            #expect(mm.devicePagesInUse <= 1024)
            _ = try mm.launch(items: 512, workers: 2) { (lane, p) throws(HMMError) in
                try lane.store(UInt64(p), at: big.address + UInt64(p) << 12)
            }
            #expect(mm.devicePagesInUse >= 512, "the other owner got its 2 MiB")
            // A quota below two blocks cannot be kept by evicting whole blocks: a clear error.
            let tiny = try mm.allocate(4 << 20, owner: "tiny")
            do {
                _ = try mm.launch(items: 1024, workers: 1) { (lane, p) throws(HMMError) in
                    _ = try lane.load(UInt64.self, at: tiny.address + UInt64(p) << 12)
                }
                Issue.record("the tiny quota should have failed the kernel")
            } catch let error as HMMError {
                #expect(error.code == .outOfMemory && error.message.contains("quota of 1 MiB for owner 'tiny'"))
            }
            try mm.free(tiny)
            let words = try small.cpuLoad(0, count: 1 << 20)
            #expect(words.enumerated().allSatisfy { $0.element == UInt64($0.offset) })
            try mm.free(small)
            try mm.free(big)
        }
    }

    @Test("watermarks: above the high mark after a batch, blocks are evicted down to the low mark")
    func watermarks() throws {
        var o = ManagedMemory.Options()
        o.watermarks = (high: 0.75, low: 0.5)
        try withManager(.simulated, deviceMemory: 8 << 20, options: o) { mm in
            let a = try mm.allocate(8 << 20)
            _ = try mm.launch(items: 2048, workers: 2) { (lane, p) throws(HMMError) in
                try lane.store(UInt64(p), at: a.address + UInt64(p) << 12)
            }
            #expect(mm.devicePagesInUse <= 2048 * 3 / 4 + 512, "never far above the high mark")
            #expect(mm.statistics.evictions > 0)
            #expect(try a.cpuLoad(2047 * 512, count: 1) == [2047])
            try mm.free(a)
        }
    }

    @Test("bad input: budgets, watermarks, quotas and allocations are checked")
    func badInput() throws {
        let machine = try Machine(.init(systemMemory: 64 << 20))
        let gpu = try Accelerator(machine: machine, memory: 4 << 20)
        let s = try machine.makeAddressSpace()
        var o = ManagedMemory.Options()
        o.budget = 8 << 20
        #expect(throws: HMMError.self) { _ = try ManagedMemory(accelerator: gpu, space: .simulated(s), options: o) }
        o.budget = nil
        o.watermarks = (high: 0.5, low: 0.9)
        #expect(throws: HMMError.self) { _ = try ManagedMemory(accelerator: gpu, space: .simulated(s), options: o) }
        let mm = try ManagedMemory(accelerator: gpu, space: .simulated(s))
        #expect(throws: HMMError.self) { _ = try mm.allocate(0) }
        let a = try mm.allocate(4096)
        #expect(throws: HMMError.self) { _ = try a.cpuLoad(511, count: 2) }
        try mm.free(a)
        #expect(throws: HMMError.self) { try mm.free(a) }
        #expect(throws: HMMError.self) { _ = try AcceleratorContext(accelerator: gpu, space: s) }
        mm.close()
        s.exit()
    }
}
