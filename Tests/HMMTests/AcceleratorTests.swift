import Synchronization
import Testing
@testable import HMM
import HMMDevices

/// The simulated accelerator on the simulated engine: device page table, replayable faults in batches,
/// migration on demand, eviction, remote mapping, CPU fault-back while kernels run.
@Suite("accelerator", .timeLimit(.minutes(10)))
struct AcceleratorTests {
    func withContext(memory: Int = 16 << 20, bytes: Int = 4 << 20,
                     _ body: (Machine, AddressSpace, AcceleratorContext, UInt64) throws -> Void) throws {
        try withMachine(.init(systemMemory: 128 << 20)) { m in
            let gpu = try Accelerator(machine: m, memory: memory)
            let s = try m.makeAddressSpace()
            let a = try s.map(length: bytes, protection: [.read, .write], flags: [.private, .anonymous])
            let ctx = try AcceleratorContext(accelerator: gpu, space: s)
            try ctx.register(a, length: bytes)
            try body(m, s, ctx, a)
            ctx.close()
            #expect(gpu.freePages == gpu.memoryPages, "closing the context evicts every device page")
            s.exit()
        }
    }

    @Test("a kernel reads what the CPU wrote and writes back through device memory; faults come in batches")
    func streamRoundTrip() throws {
        try withContext { m, s, ctx, a in
            let n = (4 << 20) >> 3
            for i in stride(from: 0, to: n, by: 512) { try s.store(UInt64(i), at: a + UInt64(i) * 8) }
            let report = try ctx.launch(items: n / 512, workers: 4) { (lane, item) throws(HMMError) in
                for j in 0..<512 {
                    let at = a + UInt64(item * 512 + j) * 8
                    let v: UInt64 = try lane.load(at: at)
                    try lane.store(v &+ 1, at: at)
                }
            }
            #expect(report.pagesToDevice == 1024, "demand paging moved every page once")
            #expect(report.faults >= 1024 && report.batches >= 4 && report.uniqueFaults >= 1024)
            #expect(report.accesses == 2 * n)
            #expect(ctx.accelerator.freePages == ctx.accelerator.memoryPages - 1024)
            // The CPU reads fault every page back.
            for i in stride(from: 0, to: n, by: 512) { #expect(try s.load(UInt64.self, at: a + UInt64(i) * 8) == UInt64(i) + 1) }
            #expect(try s.load(UInt64.self, at: a + 8) == 1)
            #expect(ctx.accelerator.freePages == ctx.accelerator.memoryPages)
            try m.checkInvariants()
        }
    }

    @Test("device memory exhausted under plain demand paging: the kernel fails with outOfMemory and no data is lost")
    func outOfMemory() throws {
        try withContext(memory: 2 << 20, bytes: 4 << 20) { _, s, ctx, a in
            for p in 0..<1024 { try s.store(UInt64(p), at: a + UInt64(p) << 12) }
            #expect(throws: HMMError.self) {
                _ = try ctx.launch(items: 1024, workers: 2) { (lane, p) throws(HMMError) in _ = try lane.load(UInt64.self, at: a + UInt64(p) << 12) }
            }
            for p in 0..<1024 { #expect(try s.load(UInt64.self, at: a + UInt64(p) << 12) == UInt64(p)) }
        }
    }

    @Test("remote mapping: the device reads and writes host memory in place, nothing migrates")
    func remote() throws {
        try withContext { _, s, ctx, a in
            for p in 0..<16 { try s.store(UInt64(p * 3), at: a + UInt64(p) << 12) }
            #expect(try ctx.mapRemote(a..<(a + 16 << 12), write: true) == 16)
            let r = try ctx.launch(items: 16, workers: 2) { (lane, p) throws(HMMError) in
                let at = a + UInt64(p) << 12
                try lane.store(try lane.load(UInt64.self, at: at) * 2, at: at)
            }
            #expect(r.faults == 0 && r.pagesToDevice == 0)
            for p in 0..<16 { #expect(try s.load(UInt64.self, at: a + UInt64(p) << 12) == UInt64(p * 6)) }
        }
    }

    @Test("munmap shoots the device's mappings down; a later access outside the mappings fails the kernel")
    func unmapInvalidates() throws {
        try withContext { _, s, ctx, a in
            _ = try ctx.launch(items: 8, workers: 1) { (lane, p) throws(HMMError) in try lane.store(UInt64(p), at: a + UInt64(p) << 12) }
            #expect(ctx.mapping(at: a).mapped)
            try s.unmap(a, length: 8 << 12)
            #expect(!ctx.mapping(at: a).mapped)
            #expect(ctx.accelerator.freePages == ctx.accelerator.memoryPages)
            #expect(throws: HMMError.self) { _ = try ctx.launch(items: 1, workers: 1) { (lane, _) throws(HMMError) in _ = try lane.load(UInt64.self, at: a) } }
        }
    }

    @Test("CPU threads and device workers on one allocation: every increment lands (atomics, fault-back, replay)")
    func cpuAndDeviceTogether() throws {
        try withContext(bytes: 64 << 12) { _, s, ctx, a in
            let stop = Atomic<Bool>(false)
            let cpu = TestThread {
                var k: UInt64 = 0
                while !stop.load(ordering: .relaxed) {
                    _ = try? s.load(UInt64.self, at: a + (k % 64) << 12 + 8)
                    k += 1
                }
            }
            let r = try ctx.launch(items: 64 * 50, workers: 4) { (lane, item) throws(HMMError) in
                _ = try lane.atomicAdd(1, at: a + UInt64(item % 64) << 12)
            }
            stop.store(true, ordering: .relaxed)
            cpu.join()
            #expect(r.items == 3200)
            for p in 0..<64 { #expect(try s.load(UInt64.self, at: a + UInt64(p) << 12) == 50) }
        }
    }

    /// A servicer that moves each faulting page to the device and has it taken back at once, as a CPU
    /// store loop on the same page does when its round trips outlast every timing rule (issue 22 item 8).
    final class Thief: DeviceFaultServicer {
        let stolen = Atomic<Int>(0)
        func service(_ batch: DeviceFaultBatch, in context: AcceleratorContext) throws(HMMError) {
            for block in batch.blocks {
                let runs = DemandPaging.runs(block.start, block.pages.map(\.index))
                var refused: [UInt64] = []
                _ = try context.migrateToDevice(runs, cause: .deviceFault, refused: &refused)
                for run in runs { stolen.add(try context.evict(run, cause: .cpuFault), ordering: .relaxed) }
                try context.satisfy(block, refused: refused)
            }
        }
    }

    @Test("a fault whose page is taken back every round is mapped remotely after a bounded number of replays")
    func starvedAccessMakesProgress() throws {
        try withContext { m, s, ctx, a in
            let thief = Thief()
            ctx.servicer = thief
            try s.store(UInt64(41), at: a)
            _ = try ctx.launch(items: 1, workers: 1) { (lane, _) throws(HMMError) in _ = try lane.atomicAdd(1, at: a) }
            #expect(try s.load(UInt64.self, at: a) == 42, "the device's increment landed in host memory")
            #expect(ctx.statistics.starvedPages == 1)
            #expect(thief.stolen.load(ordering: .relaxed) == AcceleratorContext.starvationReplays + 1,
                    "taken back once per round until the page starved, then mapped where it is")
            try m.checkInvariants()
        }
    }
}
