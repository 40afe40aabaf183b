import HMM
import HMMDevices
import HMMNative
import ManagedMemory
import Testing

/// Every workload end to end, its result checked on the CPU, on both engines; and the shapes the field
/// reports (prefetching cuts a stream's faults; oversubscription evicts; ping-pong faults both ways).
@Suite("managed memory: workloads", .serialized, .timeLimit(.minutes(10)))
struct WorkloadTests {
    func run(_ w: Workload, native: Bool, deviceMemory: Int = 8 << 20, workingSet: Int = 4 << 20,
             options: ManagedMemory.Options = .init()) throws -> Workload.Result? {
        let machine = try Machine(.init(systemMemory: 128 << 20))
        let gpu = try Accelerator(machine: machine, memory: deviceMemory)
        if native {
            guard NativeSpace.unsupportedReason() == nil else { return nil }
            let space = try NativeSpace(machine: machine)
            defer { try? space.close() }
            let mm = try ManagedMemory(accelerator: gpu, space: .native(space), options: options)
            let r = try w.run(on: mm, workingSet: workingSet, workers: 2, rounds: 2)
            mm.close()
            #expect(gpu.freePages == gpu.memoryPages)
            try machine.checkInvariants()
            return r
        }
        let s = try machine.makeAddressSpace()
        let mm = try ManagedMemory(accelerator: gpu, space: .simulated(s), options: options)
        let r = try w.run(on: mm, workingSet: workingSet, workers: 2, rounds: 2)
        mm.close()
        s.exit()
        #expect(gpu.freePages == gpu.memoryPages)
        try machine.checkInvariants()
        return r
    }

    @Test("each workload computes the right answer", arguments: Workload.allCases.filter { $0 != .gemm }, [false, true])
    func dataCheck(workload: Workload, native: Bool) throws {
        guard let r = try run(workload, native: native) else { return }
        #expect(r.dataCheck, "\(workload) on \(native ? "native" : "simulated")")
        #expect(r.deviceFaults > 0 && r.pagesToDevice > 0)
    }

    @Test("gemm computes the right answer (a small matrix)", arguments: [false, true])
    func gemm(native: Bool) throws {
        guard let r = try run(.gemm, native: native, workingSet: 64 << 10) else { return }
        #expect(r.dataCheck)
    }

    @Test("oversubscribed 150 %: the stream evicts and still checks out, on both engines", arguments: [false, true])
    func oversubscribed(native: Bool) throws {
        guard let r = try run(.stream, native: native, deviceMemory: 4 << 20, workingSet: 6 << 20) else { return }
        #expect(r.dataCheck)
        #expect(r.evictedPages > 0)
        #expect((r.migratedBytesByCause["eviction"] ?? 0) == r.evictedPages << 12)
    }

    @Test("ping-pong: every round migrates the pages to the device and back")
    func pingpong() throws {
        let r = try run(.pingpong, native: false, workingSet: 64 << 12)
        #expect(r?.dataCheck == true)
        #expect((r?.cpuFaultBacks ?? 0) >= 64, "the CPU faulted pages back each round")
        #expect((r?.pagesToDevice ?? 0) >= 2 * 64)
    }
}
