import ArgumentParser
import HMM
import HMMDevices
import HMMNative
import ManagedMemory

/// `hmm workload NAME`: a managed-memory workload on the simulated accelerator, with its policies, on
/// either engine; `hmm workload sweep` runs policies × oversubscription and plots them.
struct WorkloadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "workload",
        abstract: "Run a managed-memory workload (stream, random, stencil, bfs, gemm, pingpong) on the simulated accelerator, or sweep policies × oversubscription.",
        discussion: "Example: hmm workload stream --oversubscription 150 --prefetch density; hmm workload sweep --svg sweep.svg")

    @Argument(help: "stream, random, stencil, bfs, gemm, pingpong, or sweep.")
    var name: String

    @Argument(help: "With sweep: the workload to sweep (default stream).")
    var swept: String?

    @Flag(help: "Run on this process's real memory (the native engine).")
    var native = false

    @Option(help: "Device memory of the accelerator, MiB (a multiple of 2).")
    var deviceMemory = 32

    @Option(help: "Working set as a percentage of device memory (50 = fits twice; 200 = twice too big).")
    var oversubscription = 50

    @Option(help: "Prefetch policy: none, density (UVM's tree, default), sequential, cross-block.")
    var prefetch = "density"

    @Option(help: "Eviction policy: uvm (allocation order, default), lru, fifo.")
    var eviction = "uvm"

    @Option(help: "When device memory runs out: evict (default) or fail.")
    var onExhaustion = "evict"

    @Option(help: "Device worker threads.")
    var workers = 2

    @Option(help: "Faults per batch.")
    var batch = 256

    @Flag(help: "Print JSON.")
    var json = false

    @Option(help: "With sweep: write an SVG plot of time against oversubscription per policy.")
    var svg: String?

    func validate() throws {
        guard name == "sweep" || Workload(rawValue: name) != nil else {
            throw ValidationError("unknown workload \(name): \(Workload.allCases.map(\.rawValue).joined(separator: ", ")) or sweep")
        }
        if let swept, Workload(rawValue: swept) == nil { throw ValidationError("unknown workload \(swept)") }
        guard deviceMemory >= 2, deviceMemory % 2 == 0, deviceMemory <= 4096 else { throw ValidationError("--device-memory must be an even number of MiB, 2…4096") }
        guard (10...400).contains(oversubscription) else { throw ValidationError("--oversubscription is a percentage, 10…400") }
        guard (1...AcceleratorContext.maximumWorkers).contains(workers) else { throw ValidationError("--workers 1…64") }
        _ = try policies(prefetch, eviction)
        guard ["evict", "fail"].contains(onExhaustion) else { throw ValidationError("--on-exhaustion is evict or fail") }
        if svg != nil && name != "sweep" { throw ValidationError("--svg goes with sweep") }
    }

    func policies(_ p: String, _ e: String) throws -> (any PrefetchPolicy, any EvictionPolicy) {
        let prefetch: any PrefetchPolicy
        switch p {
        case "none": prefetch = NoPrefetch()
        case "density": prefetch = DensityPrefetch()
        case "sequential": prefetch = SequentialPrefetch()
        case "cross-block": prefetch = CrossBlockPrefetch()
        default: throw ValidationError("unknown prefetch policy \(p): none, density, sequential, cross-block")
        }
        let eviction: any EvictionPolicy
        switch e {
        case "uvm": eviction = AllocationOrderEviction()
        case "lru": eviction = LRUEviction()
        case "fifo": eviction = FIFOEviction()
        default: throw ValidationError("unknown eviction policy \(e): uvm, lru, fifo")
        }
        return (prefetch, eviction)
    }

    func run() throws {
        if native, let reason = NativeSpace.unsupportedReason() {
            print("native engine unavailable: \(reason)")
            return
        }
        if let svg { try TextFile.checkWritable(svg) }
        if name == "sweep" { return try sweep(Workload(rawValue: swept ?? "stream")!) }
        let result = try once(Workload(rawValue: name)!, prefetch: prefetch, eviction: eviction, oversubscription: oversubscription)
        if json { return try printJSON(result) }
        print("hmm workload \(name) on the \(native ? "native" : "simulated") engine: \(deviceMemory) MiB device memory, "
              + "working set \(result.workingSetBytes >> 20) MiB (\(oversubscription) %), prefetch \(result.prefetch), eviction \(result.eviction), \(workers) workers")
        print(table([result]))
        let bytes = result.migratedBytesByCause.sorted { $0.key < $1.key }.map { "\($0.key) \(fixed(Double($0.value) / 1048576, 1))" }
        print("MiB migrated by cause: \(bytes.isEmpty ? "none" : bytes.joined(separator: ", "))")
        print("remote-mapped pages \(result.remoteMappedPages); thrashing: \(result.thrashingDetected) pages detected, \(result.throttles) throttles, \(result.pins) pins")
        print("data check: \(result.dataCheck ? "ok" : "FAILED")")
        if !result.dataCheck { throw ExitCode.failure }
    }

    func once(_ w: Workload, prefetch: String, eviction: String, oversubscription: Int) throws -> Workload.Result {
        let machine = try Machine(.init(systemMemory: max(512, deviceMemory * oversubscription / 100 * 3 + 256) << 20))
        let gpu = try Accelerator(machine: machine, memory: deviceMemory << 20)
        var options = ManagedMemory.Options()
        (options.prefetch, options.eviction) = try policies(prefetch, eviction)
        options.onExhaustion = onExhaustion == "fail" ? .fail : .evict
        options.batchSize = batch
        let workingSet = (deviceMemory << 20) * oversubscription / 100
        if native {
            let space = try NativeSpace(machine: machine)
            defer { try? space.close() }
            let mm = try ManagedMemory(accelerator: gpu, space: .native(space), options: options)
            defer { mm.close() }
            return try w.run(on: mm, workingSet: workingSet, workers: workers)
        }
        let s = try machine.makeAddressSpace()
        defer { s.exit() }
        let mm = try ManagedMemory(accelerator: gpu, space: .simulated(s), options: options)
        defer { mm.close() }
        return try w.run(on: mm, workingSet: workingSet, workers: workers)
    }

    func sweep(_ w: Workload) throws {
        let levels = [50, 100, 150, 200]
        let configs = [("none", "uvm"), ("density", "uvm"), ("density", "lru"), ("sequential", "uvm")]
        var results: [Workload.Result] = []
        var plot = LinePlot(title: "hmm workload \(w): time against oversubscription (\(deviceMemory) MiB device memory, \(native ? "native" : "simulated"))",
                            xLabel: "working set, % of device memory", yLabel: "milliseconds",
                            xTickLabel: { "\(Int($0)) %" })
        for (p, e) in configs {
            var points: [LinePlot.Point] = []
            for level in levels {
                let r = try once(w, prefetch: p, eviction: e, oversubscription: level)
                results.append(r)
                points.append(.init(x: Double(level), y: Double(r.nanoseconds) / 1e6))
            }
            plot.add("prefetch \(p), eviction \(e)", points: points)
        }
        if let svg { try plot.write(to: svg) }
        if json { return try printJSON(results) }
        print("hmm workload sweep \(w) on the \(native ? "native" : "simulated") engine, \(deviceMemory) MiB device memory, \(workers) workers")
        print(table(results))
        if let svg { print("plot: \(svg)") }
        if results.contains(where: { !$0.dataCheck }) { throw ExitCode.failure }
    }

    func table(_ results: [Workload.Result]) -> String {
        var lines = [pad("policy", 20) + pad("set", 7) + pad("ms", 9) + pad("dev faults", 12) + pad("batches", 9)
                     + pad("CPU faults", 11) + pad("to device", 11) + pad("prefetched", 12) + pad("evicted", 9) + pad("MiB moved", 10) + "check"]
        for r in results {
            let moved = r.migratedBytesByCause.values.reduce(0, +)
            lines.append(pad("\(r.prefetch)/\(r.eviction)", 20) + pad("\(r.workingSetBytes * 100 / r.budgetBytes) %", 7)
                         + pad(fixed(Double(r.nanoseconds) / 1e6, 1), 9) + pad("\(r.deviceFaults)", 12) + pad("\(r.faultBatches)", 9)
                         + pad("\(r.cpuFaultBacks)", 11) + pad("\(r.pagesToDevice)", 11) + pad("\(r.prefetchedPages)", 12)
                         + pad("\(r.evictedPages)", 9) + pad(fixed(Double(moved) / 1048576, 1), 10) + (r.dataCheck ? "ok" : "FAILED"))
        }
        return lines.joined(separator: "\n")
    }
}
