import CoreMetrics
import HMM
import Synchronization

/// Publishes a machine's counters through swift-metrics, so a runtime's existing metrics backend
/// (Prometheus, StatsD, OpenTelemetry…) sees them. The hot paths keep their relaxed atomics
/// (`Statistics`, `PhaseCounters`); ``publish()`` reads them and reports what changed since the
/// last call — per call a few dozen metric updates, never one per fault.
///
/// Metrics (labels; Prometheus-safe names):
/// - `hmm_vmstat{event}`: the `Statistics` counters (`fault.anon.new_page` …);
/// - `hmm_<counter>{page_size}`: the `PhaseCounters.Sized` counters by 4K / 2M (faults, fault ns,
///   migrations, pages, failed pages, collect / copy / finalize ns);
/// - `hmm_<counter>`: the `PhaseCounters.Plain` ones (device copy bytes and ns, invalidations…);
/// - `hmm_migrate_bytes{cause}`;
/// - `hmm_fault_blocked{le_ns}`: the fault-latency histogram, one counter per log2 bucket, and
///   `hmm_thread_fault_blocked_ns{thread}` per faulting thread;
/// - gauge `hmm_free_frames`.
///
/// Phase counters move only while the machine's hub observes (`EventHub.countersEnabled`, or a
/// subscriber); turn it on for an always-on export.
///
/// Thread-safe: ``publish()`` runs under a lock of its own; ``start(every:)`` publishes from a thread.
public final class HMMMetricsExporter: @unchecked Sendable {
    public let machine: Machine
    private let factory: any MetricsFactory
    private let dimensions: [(String, String)]
    private struct State {
        var last: [String: Int] = [:]
        var counters: [String: Counter] = [:]
    }
    private let state = Locked(State())
    private let freeFrames: Gauge
    private let running = Atomic<Bool>(false)
    private var thread: HostThread?
    private let threadLock = Locked(())

    /// An exporter of `machine`'s counters through `factory` (the bootstrapped `MetricsSystem` by
    /// default), every metric carrying `dimensions` too (to tell machines apart).
    public init(machine: Machine, dimensions: [(String, String)] = [], factory: any MetricsFactory = MetricsSystem.factory) {
        self.machine = machine
        self.factory = factory
        self.dimensions = dimensions
        freeFrames = Gauge(label: "hmm_free_frames", dimensions: dimensions, factory: factory)
    }

    deinit { stop() }

    /// Reports every counter's increase since the last call (all of it, the first time).
    public func publish() {
        state.withLock { s in
            func report(_ label: String, _ extra: [(String, String)], _ value: Int) {
                let key = label + extra.map { "|\($0.0)=\($0.1)" }.joined()
                let delta = value - s.last[key, default: 0]
                guard delta > 0 else { return }
                s.last[key] = value
                let counter = s.counters[key] ?? Counter(label: label, dimensions: dimensions + extra, factory: factory)
                s.counters[key] = counter
                counter.increment(by: Int64(delta))
            }
            for (c, v) in machine.statistics.snapshot { report("hmm_vmstat", [("event", c.description)], v) }
            let p = machine.events.counters
            for c in PhaseCounters.Sized.allCases {
                for size in PageSizeClass.allCases { report("hmm_\(c)", [("page_size", "\(size)")], p[c, size]) }
            }
            for c in PhaseCounters.Plain.allCases { report("hmm_\(c)", [], p[c]) }
            for cause in MigrationCause.allCases { report("hmm_migrate_bytes", [("cause", "\(cause)")], p.migratedBytes(cause: cause)) }
            for t in p.threadLatencies {
                report("hmm_thread_fault_blocked_ns", [("thread", "\(t.thread)")], t.blockedNanoseconds)
            }
            for (k, n) in p.latencyHistogram.enumerated() { report("hmm_fault_blocked", [("le_ns", "\(UInt64(1) << UInt64(k + 1))")], n) }
        }
        freeFrames.record(machine.freeFrames)
    }

    /// Publishes every `interval` from a thread of its own until ``stop()``.
    /// - Throws: `.invalidArgument` for an interval under 1 ms, `.busy` if already started.
    public func start(every interval: Duration) throws(HMMError) {
        guard interval >= .milliseconds(1) else { throw HMMError(.invalidArgument, "export interval \(interval) is under 1 ms") }
        try threadLock.withLock { (_: inout Void) throws(HMMError) in
            guard !running.exchange(true, ordering: .acquiringAndReleasing) else {
                throw HMMError(.busy, "the exporter is already publishing periodically")
            }
            let (seconds, attoseconds) = interval.components
            let micros = UInt32(clamping: seconds * 1_000_000 + attoseconds / 1_000_000_000_000)
            thread = HostThread { [self] in
                while running.load(ordering: .acquiring) {
                    publish()
                    var left = micros
                    while left > 0 && running.load(ordering: .acquiring) {
                        let nap = min(left, 10_000)
                        usleep(nap)
                        left -= nap
                    }
                }
                publish()
            }
        }
    }

    /// Stops the periodic thread (after a last publish). Idempotent.
    public func stop() {
        threadLock.withLock { _ in
            guard running.exchange(false, ordering: .acquiringAndReleasing) else { return }
            thread?.join()
            thread = nil
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
