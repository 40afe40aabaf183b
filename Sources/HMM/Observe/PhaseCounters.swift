import Synchronization

/// Counters by phase and page size (Intel Xe's `xe_gt_stats` shape) and the CPU fault latency of each
/// thread (QEMU's postcopy blocktime shape: a total and a log2 histogram per thread). Kept by an
/// ``EventHub`` from the events it publishes, so they agree with what subscribers see (less drops);
/// updated with relaxed atomics, read any time.
public final class PhaseCounters: @unchecked Sendable {
    /// A counter kept per ``PageSizeClass``.
    public enum Sized: Int, CaseIterable, Sendable, CustomStringConvertible {
        /// CPU faults, and their nanoseconds from entry to resolution.
        case faults, faultNanoseconds
        /// Migrations (one per `migrate_vma` or `migrate_device_range` that moved something), the 4 KiB
        /// pages moved and those that did not, and nanoseconds per phase.
        case migrations, migratedPages, failedPages
        case collectNanoseconds, copyNanoseconds, finalizeNanoseconds

        public var description: String {
            ["fault_count", "fault_ns", "migrate_count", "migrate_pages", "migrate_failed_pages",
             "migrate_collect_ns", "migrate_copy_ns", "migrate_finalize_ns"][rawValue]
        }
    }

    /// A counter without a size class.
    public enum Plain: Int, CaseIterable, Sendable, CustomStringConvertible {
        /// The device copy engine (``Machine/copyPage(from:to:)``, ``Machine/copyPages(from:to:count:)``):
        /// bytes and nanoseconds.
        case deviceCopyBytes, deviceCopyNanoseconds
        /// Invalidations some notifier heard, and the nanoseconds their callbacks took.
        case invalidations, invalidationNanoseconds
        case exclusiveGrants, exclusiveRestores
        case evictions, evictedPages
        case revokedPages
        /// Host (userfaultfd) events, and the nanoseconds spent handling them.
        case hostEvents, hostEventNanoseconds
        case policyEvents

        public var description: String {
            ["device_copy_bytes", "device_copy_ns", "invalidation_count", "invalidation_ns", "exclusive_grant_count",
             "exclusive_restore_count", "eviction_count", "evicted_pages", "revoked_pages", "host_event_count",
             "host_event_ns", "policy_event_count"][rawValue]
        }
    }

    /// log2 buckets of nanoseconds: bucket k holds latencies in [2^k, 2^(k+1)) (bucket 0 also holds 0).
    public static let latencyBuckets = 40
    /// Threads tracked one by one; later threads share the last slot (thread id -1).
    public static let threadSlots = 64

    private let sized: UnsafeMutablePointer<Atomic<Int>>
    private let plain: UnsafeMutablePointer<Atomic<Int>>
    private let bytesByCause: UnsafeMutablePointer<Atomic<Int>>
    /// Per thread slot: the thread id (0 = free), blocked nanoseconds, faults, then the histogram.
    private let threads: UnsafeMutablePointer<Atomic<Int>>
    private static let slotWidth = 3 + latencyBuckets
    /// `PageSizeClass.allCases.count`, as a constant (`allCases` builds an array each time).
    private static let sizeClasses = 2

    init() {
        sized = Self.zeroed(Sized.allCases.count * Self.sizeClasses)
        plain = Self.zeroed(Plain.allCases.count)
        bytesByCause = Self.zeroed(MigrationCause.allCases.count)
        threads = Self.zeroed(Self.threadSlots * Self.slotWidth)
    }

    deinit {
        sized.deallocate()
        plain.deallocate()
        bytesByCause.deallocate()
        threads.deallocate()
    }

    private static func zeroed(_ n: Int) -> UnsafeMutablePointer<Atomic<Int>> {
        let p = UnsafeMutablePointer<Atomic<Int>>.allocate(capacity: n)
        for i in 0..<n { (p + i).initialize(to: Atomic(0)) }
        return p
    }

    public subscript(_ c: Sized, _ size: PageSizeClass) -> Int {
        sized[c.rawValue &* Self.sizeClasses &+ size.rawValue].load(ordering: .relaxed)
    }

    public subscript(_ c: Plain) -> Int { plain[c.rawValue].load(ordering: .relaxed) }

    /// Bytes migrated for `cause`.
    public func migratedBytes(cause: MigrationCause) -> Int { bytesByCause[Int(cause.rawValue)].load(ordering: .relaxed) }

    /// (Zero adds are skipped: a locked add costs about 10 ns here, and most events leave most fields 0.)
    @inline(__always) private func add(_ c: Sized, _ size: PageSizeClass, _ n: Int) {
        guard n != 0 else { return }
        sized[c.rawValue &* Self.sizeClasses &+ size.rawValue].wrappingAdd(n, ordering: .relaxed)
    }

    @inline(__always) func add(_ c: Plain, _ n: Int) {
        guard n != 0 else { return }
        plain[c.rawValue].wrappingAdd(n, ordering: .relaxed)
    }

    /// Counts what `event` says.
    func record(_ event: HMMEvent) {
        switch event {
        case .cpuFault(let e):
            add(.faults, e.size, 1)
            add(.faultNanoseconds, e.size, Int(truncatingIfNeeded: e.duration))
            recordBlocked(thread: e.thread, nanoseconds: e.blocked)
        case .migration(let e):
            add(.migrations, e.size, 1)
            add(.migratedPages, e.size, e.pages)
            add(.failedPages, e.size, e.failedPages)
            add(.collectNanoseconds, e.size, Int(truncatingIfNeeded: e.collect))
            add(.copyNanoseconds, e.size, Int(truncatingIfNeeded: e.copy))
            add(.finalizeNanoseconds, e.size, Int(truncatingIfNeeded: e.finalize))
            if e.pages != 0 { bytesByCause[Int(e.cause.rawValue)].wrappingAdd(e.bytes, ordering: .relaxed) }
        case .eviction(let e):
            add(.evictions, 1)
            add(.evictedPages, e.pages)
        case .invalidation(let e):
            add(.invalidations, 1)
            add(.invalidationNanoseconds, Int(truncatingIfNeeded: e.duration))
        case .exclusive(let e):
            add(e.action == .grant ? .exclusiveGrants : .exclusiveRestores, 1)
        case .revoke(let e):
            add(.revokedPages, e.pages)
        case .host(let e):
            add(.hostEvents, 1)
            add(.hostEventNanoseconds, Int(truncatingIfNeeded: e.duration))
        case .policy:
            add(.policyEvents, 1)
        }
    }

    /// The histogram bucket of `ns`.
    @inline(__always) static func bucket(_ ns: UInt64) -> Int {
        ns == 0 ? 0 : min(latencyBuckets - 1, 63 - ns.leadingZeroBitCount)
    }

    private func recordBlocked(thread: Int32, nanoseconds: UInt64) {
        let slot = threadSlot(Int(thread))
        slot[1].wrappingAdd(Int(truncatingIfNeeded: nanoseconds), ordering: .relaxed)
        slot[2].wrappingAdd(1, ordering: .relaxed)
        slot[3 + Self.bucket(nanoseconds)].wrappingAdd(1, ordering: .relaxed)
    }

    /// The slot of `tid`, claimed on first use (open addressing; the last slot takes the overflow).
    private func threadSlot(_ tid: Int) -> UnsafeMutablePointer<Atomic<Int>> {
        let n = Self.threadSlots - 1
        var i = ((tid &* 0x9E37_79B9) & Int.max) % n
        for _ in 0..<n {
            let slot = threads + i * Self.slotWidth
            let owner = slot[0].load(ordering: .relaxed)
            if owner == tid { return slot }
            if owner == 0 {
                let (won, seen) = slot[0].compareExchange(expected: 0, desired: tid, ordering: .relaxed)
                if won || seen == tid { return slot }
            }
            i = (i + 1) % n
        }
        let overflow = threads + n * Self.slotWidth
        overflow[0].store(-1, ordering: .relaxed)
        return overflow
    }

    /// How long one thread was stopped in CPU faults.
    public struct ThreadLatency: Sendable, Equatable {
        /// The kernel thread id, or -1 for the threads past ``PhaseCounters/threadSlots``.
        public let thread: Int32
        public let faults: Int
        public let blockedNanoseconds: Int
        /// `histogram[k]`: faults that blocked for [2^k, 2^(k+1)) ns.
        public let histogram: [Int]
    }

    /// Every thread that faulted while observing, by thread id.
    public var threadLatencies: [ThreadLatency] {
        (0..<Self.threadSlots).compactMap { k in
            let slot = threads + k * Self.slotWidth
            let tid = slot[0].load(ordering: .relaxed)
            guard tid != 0 else { return nil }
            return ThreadLatency(thread: Int32(truncatingIfNeeded: tid), faults: slot[2].load(ordering: .relaxed),
                                 blockedNanoseconds: slot[1].load(ordering: .relaxed),
                                 histogram: (0..<Self.latencyBuckets).map { slot[3 + $0].load(ordering: .relaxed) })
        }.sorted { $0.thread < $1.thread }
    }

    /// The fault latency histogram over all threads.
    public var latencyHistogram: [Int] {
        var h = [Int](repeating: 0, count: Self.latencyBuckets)
        for t in threadLatencies { for k in 0..<h.count { h[k] += t.histogram[k] } }
        return h
    }
}
