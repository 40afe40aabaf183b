import HMM
import HMMDevices
import ManagedMemory

/// `hmm bench managed`: the managed-memory layer's costs and policies, each against a baseline measured
/// alternately in the same rounds — fault servicing in batches against one fault per batch, servicing
/// with more device workers against one, and each workload with the default policies (density
/// prefetch, UVM eviction) against no prefetch.
extension Bench {
    func managedBenchmarks(_ report: BenchReport, reps: Int, quick: Bool) throws {
        let device = quick ? 8 : 32
        let rounds = quick ? 1 : max(3, reps)
        report.section("managed memory on the simulated accelerator (\(device) MiB device memory; \(rounds) timed rounds after a warm-up round)")
        func run(_ w: Workload, prefetch: any PrefetchPolicy, batch: Int = 256, workers: Int = 2, set: Int = 50) throws -> Workload.Result {
            let machine = try Machine(.init(systemMemory: max(256, device * 4) << 20))
            let gpu = try Accelerator(machine: machine, memory: device << 20)
            let s = try machine.makeAddressSpace()
            defer { s.exit() }
            var o = ManagedMemory.Options()
            o.prefetch = prefetch
            o.batchSize = batch
            let mm = try ManagedMemory(accelerator: gpu, space: .simulated(s), options: o)
            defer { mm.close() }
            let r = try w.run(on: mm, workingSet: (device << 20) * set / 100, workers: workers, rounds: 2)
            precondition(r.dataCheck, "\(w) computed a wrong result")
            return r
        }
        let ms = { (r: Workload.Result) in Double(r.nanoseconds) / 1e6 }
        var faults = (0, 0)
        try report.pair(name: "stream, demand paging: faults in batches of 256", unit: "ms", baseline: "1 fault per batch",
                        ratio: .measuredOverBaseline, reps: rounds,
                        baselineBody: { let r = try run(.stream, prefetch: NoPrefetch(), batch: 1); faults.0 = r.faultBatches; return ms(r) },
                        measuredBody: { let r = try run(.stream, prefetch: NoPrefetch()); faults.1 = r.faultBatches; return ms(r) })
        report.note("    (fault batches: \(faults.0) one at a time, \(faults.1) batched)")
        for workers in [2, 4] {
            try report.pair(name: "stream, demand paging, \(workers) device workers", unit: "ms", baseline: "1 worker", reps: rounds,
                            baselineBody: { ms(try run(.stream, prefetch: NoPrefetch(), workers: 1)) },
                            measuredBody: { ms(try run(.stream, prefetch: NoPrefetch(), workers: workers)) })
        }
        for w in [Workload.stream, .random, .stencil, .bfs, .pingpong] {
            for set in quick ? [50] : [50, 150] {
                var last: (Workload.Result?, Workload.Result?) = (nil, nil)
                try report.pair(name: "\(w) at \(set) %: density prefetch", unit: "ms", baseline: "no prefetch", reps: rounds,
                                baselineBody: { let r = try run(w, prefetch: NoPrefetch(), set: set); last.0 = r; return ms(r) },
                                measuredBody: { let r = try run(w, prefetch: DensityPrefetch(), set: set); last.1 = r; return ms(r) })
                if let a = last.0, let b = last.1 {
                    let mib = { (r: Workload.Result) in fixed(Double(r.migratedBytesByCause.values.reduce(0, +)) / 1048576, 1) }
                    report.note("    (device faults \(a.deviceFaults) → \(b.deviceFaults), MiB moved \(mib(a)) → \(mib(b)), evicted pages \(a.evictedPages) → \(b.evictedPages))")
                }
            }
        }
    }
}
