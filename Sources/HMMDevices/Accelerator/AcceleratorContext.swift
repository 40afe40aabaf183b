import HMM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An accelerator working on one address space (a GPU context / `uvm_va_space`): a device page table
/// over the ranges registered with it, kept coherent with the CPU's page tables by an interval
/// notifier; workers that run kernels through it (``launch(items:workers:_:)``); a replayable fault
/// buffer and the thread that services it in batches through ``servicer``.
///
/// The device page table is one 64-bit word per page of each registered range: the host address of the
/// page's bytes (device memory, or host memory for a remote mapping) and flag bits. Workers read it
/// without a lock. Whoever clears entries (an invalidation, an eviction, a CPU fault taking a page
/// back) then waits until every worker has left the work item it was in (``synchronizeWorkers()``), so
/// no access through a cleared entry is still in flight when the page moves — the TLB shootdown.
///
/// Locking: `mapLock` (a leaf, taken inside notifier callbacks) serializes changes of the table and the
/// sequence check of remote mappings; the fault buffer's monitor is taken by workers and the fault
/// thread only. Migrations run under the space's `mmapLock` for reading, taken by the context itself —
/// never with `mapLock` held.
public final class AcceleratorContext: @unchecked Sendable {
    public let accelerator: Accelerator
    public let space: any MirroredAddressSpace
    public let machine: Machine
    /// What services device faults. Set it before launching; default ``DemandPaging``.
    public var servicer: any DeviceFaultServicer {
        get { servicerBox.withLock { $0 } }
        set { servicerBox.withLock { $0 = newValue } }
    }
    private let servicerBox: Locked<any DeviceFaultServicer>
    /// Faults the fault thread takes per batch (UVM's default 256).
    public let batchSize: Int

    /// Set once in `init`.
    @exclusivity(unchecked) private(set) var notifier: IntervalNotifier!
    let mapLock = Locked(())

    // MARK: the device page table

    static let valid: UInt64 = 1
    static let writable: UInt64 = 2
    /// The page is in this accelerator's memory (else the entry maps host memory remotely).
    static let local: UInt64 = 4
    static let accessed: UInt64 = 8
    static let flagMask: UInt64 = 0xFFF

    /// A registered range and its entries.
    struct Range: @unchecked Sendable {
        let start: UInt64
        let end: UInt64
        let entries: UnsafeMutablePointer<Atomic<UInt64>>
        func slot(_ a: UInt64) -> UnsafeMutablePointer<Atomic<UInt64>> { entries + Int((a - start) >> UInt64(PageSize.shift)) }
    }
    /// Changed only while no kernel runs (under `mapLock`); read by workers from their launch's copy.
    @exclusivity(unchecked) private(set) var ranges: [Range] = []

    // MARK: workers

    /// The most workers a launch may have.
    public static let maximumWorkers = 64
    /// Per worker: even = outside a work item (or waiting on a fault), odd = inside one.
    let workerStates: UnsafeMutablePointer<Atomic<UInt64>>
    private let running = Atomic<Bool>(false)

    // MARK: the fault buffer

    struct FaultState {
        var pending: [DeviceFaultRecord] = []
        /// What `pending` holds, so a replayed fault already waiting is not queued twice (UVM flushes
        /// duplicates before replaying; without this a worker woken by someone else's batch re-queues
        /// its fault each time, and the buffer grows faster than small batches drain it).
        var queued: Set<DeviceFaultRecord> = []
        var serviced = 0
        var failure: HMMError?
        var stopping = false
        /// Pages whose access a worker has replayed ``AcceleratorContext/starvationReplays`` times without
        /// getting a usable mapping: `satisfy` maps them where they are (see there).
        var starved: Set<UInt64> = []
    }

    /// Replays of one access after which its page is *starved*: each time it was migrated to the device,
    /// the CPU took it back before the worker ran again (a ping-pong slower than any timing rule sees).
    /// ``satisfy(_:refused:)`` then maps it remotely where it is, so every access makes progress after a
    /// bounded number of rounds whatever the policy's clocks say — the forward-progress guarantee UVM's
    /// thrashing pinning gives only when round trips are faster than its lapse.
    public static let starvationReplays = 8
    let faults = Monitor(FaultState())

    /// What the context did, cumulative.
    public struct Statistics: Sendable, Equatable {
        /// Faults recorded by workers (a miss already waiting in the buffer is not recorded again).
        public var faults = 0
        /// Batches serviced, and the faults they held after deduplication.
        public var batches = 0
        public var uniqueFaults = 0
        /// Pages migrated to the device and back, and pages mapped remotely.
        public var pagesToDevice = 0
        public var pagesToSystem = 0
        public var pagesMappedRemotely = 0
        /// Of those, pages mapped remotely because their access starved (``starvationReplays``).
        public var starvedPages = 0
        /// Device accesses that hit (loads, stores, atomics).
        public var accesses = 0
        /// Nanoseconds the fault thread spent servicing.
        public var serviceNanoseconds = 0
    }
    private let stats = Locked(Statistics())
    private let accessCount = Atomic<Int>(0)

    /// A context of `accelerator` on `space`, with `servicer` handling its faults.
    /// - Throws: `.invalidArgument` for a batch size outside 1…65536, `.busy` if the accelerator already
    ///   has a context on the space, what inserting the notifier throws.
    public init(accelerator: Accelerator, space: any MirroredAddressSpace, servicer: any DeviceFaultServicer = DemandPaging(),
                batchSize: Int = 256) throws(HMMError) {
        guard batchSize >= 1, batchSize <= 1 << 16 else { throw HMMError(.invalidArgument, "batch size \(batchSize) is outside 1…65536") }
        guard accelerator.context(for: space) == nil else {
            throw HMMError(.busy, "\(accelerator) already has a context on this address space")
        }
        self.accelerator = accelerator
        self.space = space
        machine = accelerator.machine
        servicerBox = Locked(servicer)
        self.batchSize = batchSize
        workerStates = .allocate(capacity: Self.maximumWorkers)
        for i in 0..<Self.maximumWorkers { (workerStates + i).initialize(to: Atomic(0)) }
        let forwarder = WeakForwarder<AcceleratorContext>()
        forwarder.target = self
        notifier = try space.insertIntervalNotifier(start: 0, length: 0x8000_0000_0000, forwarder)
        accelerator.add(self)
    }

    deinit {
        close()
        workerStates.deallocate()
    }

    private let closed = Atomic<Bool>(false)

    /// Evicts every device-resident page of every range back to system memory (cause `.release`),
    /// unregisters the ranges and the notifier. Idempotent.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        for r in ranges { _ = try? evict(r.start..<r.end, cause: .release) }
        notifier.remove()
        mapLock.withLock { _ in
            for r in ranges { r.entries.deallocate() }
            ranges = []
        }
        accelerator.remove(self)
    }

    public var statistics: Statistics {
        var s = stats.withLock { $0 }
        s.accesses = accessCount.load(ordering: .relaxed)
        return s
    }

    func count(_ body: (inout Statistics) -> Void) { stats.withLock { body(&$0) } }

    // MARK: ranges

    /// Lets the device reach `[start, start + length)` (page-aligned): what a managed allocation
    /// registers. Accesses outside every registered range fail the kernel with `.fault`.
    /// - Throws: `.invalidArgument` (unaligned, empty, overlapping), `.busy` while a kernel runs.
    public func register(_ start: UInt64, length: Int) throws(HMMError) {
        guard start & pageMask == 0, length > 0, length % PageSize.base == 0, start < 0x8000_0000_0000 else {
            throw HMMError(.invalidArgument, "device range \(start)+\(length) is not page-aligned and non-empty")
        }
        guard !running.load(ordering: .acquiring) else { throw HMMError(.busy, "a kernel is running") }
        let end = start + UInt64(length)
        try mapLock.withLock { (_: inout Void) throws(HMMError) in
            guard !ranges.contains(where: { $0.start < end && start < $0.end }) else {
                throw HMMError(.invalidArgument, "device range \(start)+\(length) overlaps a registered one")
            }
            let n = length / PageSize.base
            let entries = UnsafeMutablePointer<Atomic<UInt64>>.allocate(capacity: n)
            for i in 0..<n { (entries + i).initialize(to: Atomic(0)) }
            ranges.append(Range(start: start, end: end, entries: entries))
        }
    }

    /// Evicts the range's device pages (cause `.release`) and forgets it.
    /// - Throws: `.invalidArgument` if no range starts at `start`, `.busy` while a kernel runs.
    public func unregister(_ start: UInt64) throws(HMMError) {
        guard !running.load(ordering: .acquiring) else { throw HMMError(.busy, "a kernel is running") }
        guard let r = mapLock.withLock({ _ in ranges.first { $0.start == start } }) else {
            throw HMMError(.invalidArgument, "no device range starts at \(start)")
        }
        _ = try evict(r.start..<r.end, cause: .release)
        mapLock.withLock { _ in
            ranges.removeAll { $0.start == start }
            r.entries.deallocate()
        }
    }

    func range(containing a: UInt64) -> Range? { ranges.first { $0.start <= a && a < $0.end } }

    /// Whether the device maps the page at `a`, and how.
    public func mapping(at a: UInt64) -> (mapped: Bool, local: Bool, writable: Bool, accessed: Bool) {
        guard let r = range(containing: a) else { return (false, false, false, false) }
        let v = r.slot(a & ~pageMask).pointee.load(ordering: .acquiring)
        return (v & Self.valid != 0, v & Self.local != 0, v & Self.writable != 0, v & Self.accessed != 0)
    }

    /// Reads and clears the accessed bits of `[lo, hi)`; returns whether any page was accessed since the
    /// last call (what an LRU policy samples).
    public func testAndClearAccessed(_ lo: UInt64, _ hi: UInt64) -> Bool {
        guard let r = range(containing: lo) else { return false }
        var any = false
        var a = lo
        while a < min(hi, r.end) {
            let slot = r.slot(a)
            if slot.pointee.load(ordering: .relaxed) & Self.accessed != 0 {
                slot.pointee.bitwiseAnd(~Self.accessed, ordering: .relaxed)
                any = true
            }
            a += UInt64(PageSize.base)
        }
        return any
    }

    /// Device-resident pages of the 512-page block at `blockStart`, as a bit per page.
    public func localPages(block blockStart: UInt64) -> PageBitmap {
        var bits = PageBitmap()
        guard let r = range(containing: blockStart) else { return bits }
        for i in 0..<PageSize.pagesPerPMD {
            let a = blockStart + UInt64(i) << UInt64(PageSize.shift)
            guard a < r.end else { break }
            if r.slot(a).pointee.load(ordering: .relaxed) & (Self.valid | Self.local) == Self.valid | Self.local { bits.insert(i) }
        }
        return bits
    }

    private func program(_ a: UInt64, _ value: UInt64) {
        range(containing: a)?.slot(a).pointee.store(value, ordering: .releasing)
    }

    /// Clears the entries of `[lo, hi)` and waits until no worker can still be using one.
    func unmapFromDevice(_ lo: UInt64, _ hi: UInt64) {
        mapLock.withLock { _ in
            for r in ranges where r.start < hi && lo < r.end {
                var a = max(lo, r.start)
                while a < min(hi, r.end) {
                    r.slot(a).pointee.store(0, ordering: .relaxed)
                    a += UInt64(PageSize.base)
                }
            }
        }
        synchronizeWorkers()
    }

    /// Drops the device's mappings of `[lo, hi)` (a shootdown): the next device access faults. What a
    /// policy does to end a pin, so the page migrates again.
    public func dropMappings(_ lo: UInt64, _ hi: UInt64) { unmapFromDevice(lo, hi) }

    /// Waits until every worker inside a work item when this was called has left it (or is waiting on
    /// a fault): a TLB shootdown. Never waits for a worker that entered after the call began.
    public func synchronizeWorkers() {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        for i in 0..<Self.maximumWorkers {
            let seen = workerStates[i].load(ordering: .sequentiallyConsistent)
            guard seen & 1 == 1 else { continue }
            while workerStates[i].load(ordering: .acquiring) == seen { sched_yield() }
        }
    }

    // MARK: notifier

    func invalidate(_ n: IntervalNotifier, range r: NotifierRange, sequence: UInt64) -> Bool {
        // The context's own migrations update the table themselves (at the right moment for each).
        if !r.isMigration(by: accelerator) { unmapFromDevice(r.start, r.end) }
        mapLock.withLock { _ in n.setSequence(sequence) }
        return true
    }

    // MARK: launching kernels

    /// What a launch did.
    public struct KernelReport: Sendable {
        public var nanoseconds: UInt64
        public var items: Int
        public var workers: Int
        /// Statistics over the launch (the difference of ``AcceleratorContext/statistics`` before and after).
        public var faults: Int
        public var batches: Int
        public var uniqueFaults: Int
        public var pagesToDevice: Int
        public var pagesToSystem: Int
        public var pagesMappedRemotely: Int
        public var accesses: Int
    }

    /// Runs `body` for items `0..<items` on `workers` threads (each takes the next item) with the
    /// device's view of memory (``DeviceLane``); a miss faults, the fault thread services it in batches,
    /// and the access replays. Returns when every item ran, or throws the first error (a worker's, or a
    /// batch the servicer failed: `.outOfMemory`…), after every worker has stopped.
    /// - Throws: `.invalidArgument` (no items, workers outside 1…64), `.busy` (a kernel is already
    ///   running on this context), `.badDescriptor` after close, and what the kernel or servicer throws.
    public func launch(items: Int, workers: Int, _ body: @escaping @Sendable (DeviceLane, Int) throws(HMMError) -> Void) throws(HMMError) -> KernelReport {
        guard items > 0, workers >= 1, workers <= Self.maximumWorkers else {
            throw HMMError(.invalidArgument, "a launch needs items and 1…\(Self.maximumWorkers) workers")
        }
        guard !closed.load(ordering: .acquiring) else { throw HMMError(.badDescriptor, "the accelerator context is closed") }
        guard !running.exchange(true, ordering: .acquiringAndReleasing) else { throw HMMError(.busy, "a kernel is already running") }
        defer { running.store(false, ordering: .releasing) }
        let before = statistics
        faults.withLock { $0 = FaultState() }
        let start = monotonicNanoseconds()
        let faultThread = HostThread { [self] in serviceFaults() }
        let next = Atomic<Int>(0)
        let firstError = Locked<HMMError?>(nil)
        let stop = Atomic<Bool>(false)
        let table = mapLock.withLock { _ in ranges }
        let threads = (0..<workers).map { w in
            HostThread { [self] in
                let lane = DeviceLane(context: self, worker: w, ranges: table)
                while !stop.load(ordering: .relaxed) {
                    let item = next.wrappingAdd(1, ordering: .relaxed).oldValue
                    guard item < items else { break }
                    lane.enter()
                    do throws(HMMError) {
                        try body(lane, item)
                    } catch {
                        firstError.withLock { if $0 == nil { $0 = error } }
                        stop.store(true, ordering: .relaxed)
                    }
                    lane.leave()
                }
                accessCount.wrappingAdd(lane.accesses, ordering: .relaxed)
            }
        }
        for t in threads { t.join() }
        faults.withLock { $0.stopping = true }
        faults.broadcast()
        faultThread.join()
        let elapsed = monotonicNanoseconds() - start
        if let error = firstError.withLock({ $0 }) { throw error }
        let after = statistics
        return KernelReport(nanoseconds: elapsed, items: items, workers: workers, faults: after.faults - before.faults,
                            batches: after.batches - before.batches, uniqueFaults: after.uniqueFaults - before.uniqueFaults,
                            pagesToDevice: after.pagesToDevice - before.pagesToDevice,
                            pagesToSystem: after.pagesToSystem - before.pagesToSystem,
                            pagesMappedRemotely: after.pagesMappedRemotely - before.pagesMappedRemotely,
                            accesses: after.accesses - before.accesses)
    }

    /// A worker's miss: record it, wait outside the work item for the batch that services it.
    /// `replays`: how many times this access already faulted without progress.
    func fault(_ address: UInt64, _ access: DeviceAccess, replays: Int) throws(HMMError) {
        let (seen, added) = faults.withLock { s -> (Int, Bool) in
            let record = DeviceFaultRecord(address: address & ~pageMask, access: access)
            if replays >= Self.starvationReplays { s.starved.insert(record.address) }
            guard s.queued.insert(record).inserted else { return (s.serviced, false) }
            s.pending.append(record)
            return (s.serviced, true)
        }
        if added { count { $0.faults += 1 } }
        faults.broadcast()
        let failure = faults.wait(until: { $0.serviced > seen || $0.failure != nil }) { $0.failure }
        if let failure { throw failure }
    }

    /// The fault thread: takes up to ``batchSize`` faults at a time, builds the batch, services it, and
    /// replays (wakes every waiting worker).
    private func serviceFaults() {
        var id = 0
        while true {
            let records: [DeviceFaultRecord]? = faults.wait(until: { !$0.pending.isEmpty || $0.stopping }) { s in
                if s.pending.isEmpty { return nil }
                let k = min(batchSize, s.pending.count)
                let taken = Array(s.pending.prefix(k))
                s.pending.removeFirst(k)
                for r in taken { s.queued.remove(r) }
                return taken
            }
            guard let records else { return }
            id += 1
            let batch = DeviceFaultBatch(id: id, records: records)
            let t = monotonicNanoseconds()
            var failure: HMMError?
            do throws(HMMError) { try servicer.service(batch, in: self) } catch { failure = error }
            let ns = Int(monotonicNanoseconds() - t)
            count { s in
                s.batches += 1
                s.uniqueFaults += batch.uniqueFaults
                s.serviceNanoseconds += ns
            }
            faults.withLock { s in
                s.serviced += 1
                if let failure, s.failure == nil { s.failure = failure }
            }
            faults.broadcast()
        }
    }
}

extension AcceleratorContext: InvalidationTarget {}

/// A set of page indexes of one 2 MiB block (512 bits).
public struct PageBitmap: Equatable, Sendable {
    private var words = [UInt64](repeating: 0, count: PageSize.pagesPerPMD / 64)
    public init() {}
    public init<S: Sequence>(_ indexes: S) where S.Element == Int { for i in indexes { insert(i) } }
    public mutating func insert(_ i: Int) { words[i >> 6] |= 1 << UInt64(i & 63) }
    public mutating func remove(_ i: Int) { words[i >> 6] &= ~(1 << UInt64(i & 63)) }
    public func contains(_ i: Int) -> Bool { words[i >> 6] & (1 << UInt64(i & 63)) != 0 }
    /// Set pages in `range`.
    public func count(in range: Swift.Range<Int>) -> Int {
        var n = 0
        for i in range where contains(i) { n += 1 }
        return n
    }
    public var count: Int { words.reduce(0) { $0 + $1.nonzeroBitCount } }
    public var isEmpty: Bool { words.allSatisfy { $0 == 0 } }
    public var indexes: [Int] { (0..<PageSize.pagesPerPMD).filter { contains($0) } }
    public func subtracting(_ b: Self) -> Self {
        var c = self
        for k in c.words.indices { c.words[k] &= ~b.words[k] }
        return c
    }
}
