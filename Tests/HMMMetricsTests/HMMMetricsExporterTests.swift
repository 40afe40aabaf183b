import HMM
import HMMMetrics
import MetricsTestKit
import Testing

/// The swift-metrics bridge: counters reach a metrics backend as increments since the last publish.
@Suite("swift-metrics export", .timeLimit(.minutes(10)))
struct HMMMetricsExporterTests {
    @Test("publish reports vmstat, phase counters by page size, bytes by cause and the latency histogram; a second publish only the increase")
    func publishesDeltas() throws {
        let machine = try Machine(.init(systemMemory: 32 << 20))
        machine.events.countersEnabled = true
        let metrics = TestMetrics()
        let exporter = HMMMetricsExporter(machine: machine, dimensions: [("machine", "test")], factory: metrics)
        let s = try machine.makeAddressSpace()
        let a = try s.map(length: 8 << 12, protection: [.read, .write], flags: [.private, .anonymous])
        try s.advise(a, length: 8 << 12, .noHugePage)
        for p in 0..<4 { try s.store(UInt8(1), at: a + UInt64(p) << 12) }
        exporter.publish()
        let newPages = try metrics.expectCounter("hmm_vmstat", [("machine", "test"), ("event", "fault.anon.new_page")])
        #expect(newPages.totalValue == 4)
        let faults = try metrics.expectCounter("hmm_fault_count", [("machine", "test"), ("page_size", "4K")])
        #expect(faults.totalValue == 4)
        let buckets = metrics.counters.filter { $0.label == "hmm_fault_blocked" }
        #expect(buckets.reduce(0) { $0 + $1.totalValue } == 4, "every fault lands in one latency bucket")
        for p in 4..<6 { try s.store(UInt8(1), at: a + UInt64(p) << 12) }
        exporter.publish()
        #expect(newPages.totalValue == 6, "the second publish added only the increase")
        #expect(faults.totalValue == 6)
        #expect(try metrics.expectGauge("hmm_free_frames", [("machine", "test")]).lastValue == Double(machine.freeFrames))
        s.exit()
    }

    @Test("periodic export: start publishes from a thread until stop; a second start or a tiny interval throws")
    func periodic() throws {
        let machine = try Machine(.init(systemMemory: 32 << 20))
        let metrics = TestMetrics()
        let exporter = HMMMetricsExporter(machine: machine, factory: metrics)
        try exporter.start(every: .milliseconds(5))
        #expect(throws: HMMError.self) { try exporter.start(every: .milliseconds(5)) }
        let s = try machine.makeAddressSpace()
        let a = try s.map(length: 1 << 12, protection: [.read, .write], flags: [.private, .anonymous])
        try s.store(UInt8(1), at: a)
        exporter.stop()
        exporter.stop()
        #expect(try metrics.expectCounter("hmm_vmstat", [("event", "fault.anon.new_page")]).totalValue == 1)
        #expect(throws: HMMError.self) { try exporter.start(every: .microseconds(10)) }
        s.exit()
    }
}
