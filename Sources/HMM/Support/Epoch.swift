#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Something whose reuse must wait until no lockless walker can still see it.
public enum RetiredItem: Hashable, Sendable {
    /// A page-table node unlinked from its parent (the kernel's RCU page-table freeing).
    case pageTableNode(UInt32)
    /// A device frame whose last reference dropped (a P2PDMA page on its way back to the pool).
    case deviceFrame(PFN)
    /// The PFN range of an unregistered pagemap, named by its first frame: reusable for a new pagemap
    /// once no walker that might have read one of its PFNs is inside. Reclaiming it does nothing; its
    /// leaving the queue is the signal (`Epoch.isPending(_:)`).
    case pagemapRange(PFN)
}

/// Where reclaimed items go (the machine: node pool, provider pools).
protocol EpochReclaimer: AnyObject, Sendable {
    func reclaim(_ item: RetiredItem)
}

/// Epoch-based reclamation — the part of RCU that lockless page-table walkers need (`call_rcu`-style
/// deferred freeing, with no synchronous wait per close).
///
/// A walker (`getUserPages(…, .fast)`) runs inside ``withCriticalSection(_:)``: it publishes the global
/// epoch it saw in a slot, walks, and clears the slot. A writer that unlinks something a walker may
/// still hold (a page-table node, a P2PDMA frame) calls `retire(_:)` *after* unlinking it: the item is
/// tagged with the current epoch, and the epoch advances. The item is reclaimed once every slot is
/// either empty or shows a later epoch — every walker that could have seen the item has left.
///
/// Why that is enough (all slot and epoch accesses are sequentially consistent): a walker that
/// publishes epoch `g > t` loaded `g` after the retirer advanced past `t`, hence after the unlink, so
/// its walk cannot find the item. A walker whose slot store the reclaimer's scan did not see stored it
/// after the scan, hence after the unlink. Only walkers with `g ≤ t` visible to the scan can hold the
/// item, and the scan waits for them.
///
/// Retirement never waits: items queue and are reclaimed by a later ``collect()`` (run by retirers
/// once the queue grows, by allocators that run short, and by P2PDMA unbind while it waits).
/// ``synchronize()`` is the blocking grace period (`synchronize_rcu`), kept for callers that must
/// know a walker-free point and for the benchmark that shows what a wait per close would cost.
///
/// Locking: the pending queue has its own lock, a leaf; reclamation runs after it is dropped and takes
/// only leaf locks (the node pool's, a provider pool's). Any thread may retire or collect, holding any
/// locks.
public final class Epoch: @unchecked Sendable {
    /// What closing a mapping does with the frames it retires.
    public enum RetirePolicy: Sendable {
        /// Queue them; nobody waits (the default, and what the kernel does with `call_rcu`-style freeing).
        case deferred
        /// Wait for a grace period at every mapping close before the frames go back (a
        /// `synchronize_rcu()` in `vm_close`, which reviewers of the 2021 userspace-P2PDMA series rejected).
        /// For comparison.
        case synchronousPerClose
    }

    /// Walker slots; a walker takes the first free one from a per-thread starting point.
    static let slotCount = 128
    private static let slotStride = 64 / MemoryLayout<Atomic<UInt64>>.stride

    public let policy: RetirePolicy
    private let global = Atomic<UInt64>(1)
    private let slots: UnsafeMutablePointer<Atomic<UInt64>>
    private let pending = Locked<[(tag: UInt64, item: RetiredItem)]>([])
    private let pendingCount = Atomic<Int>(0)
    private let reclaimedCount = Atomic<Int>(0)
    weak var reclaimer: (any EpochReclaimer)?

    init(policy: RetirePolicy) {
        self.policy = policy
        slots = .allocate(capacity: Self.slotCount * Self.slotStride)
        for i in 0..<(Self.slotCount * Self.slotStride) { (slots + i).initialize(to: Atomic(0)) }
    }

    deinit { slots.deallocate() }

    /// Items waiting for walkers to leave.
    public var pendingItems: Int { pendingCount.load(ordering: .relaxed) }

    /// Whether `item` still waits for walkers to leave.
    func isPending(_ item: RetiredItem) -> Bool {
        pending.withLock { p in p.contains { $0.item == item } }
    }

    /// Queued device frames in `range` (for the invariant checker).
    func pendingFrames(in range: Range<PFN>) -> Int {
        pending.withLock { p in
            p.reduce(0) { n, e in
                if case .deviceFrame(let pfn) = e.item, range.contains(pfn) { return n + 1 }
                return n
            }
        }
    }

    /// Items reclaimed so far.
    public var reclaimedItems: Int { reclaimedCount.load(ordering: .relaxed) }

    /// The current global epoch (advances with every retirement).
    public var current: UInt64 { global.load(ordering: .sequentiallyConsistent) }

    // MARK: walkers

    /// Runs `body` as a lockless walker: nothing retired after the walker entered is reclaimed until it
    /// returns. Keep `body` short and non-blocking (it delays reclamation, never a retirer).
    @inline(__always)
    public func withCriticalSection<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        let slot = enter()
        defer { leave(slot) }
        return try body()
    }

    /// Publishes the current epoch in a free slot; returns the slot.
    func enter() -> Int {
        var i = Int(truncatingIfNeeded: UInt(pthread_self()) >> 12) % Self.slotCount
        var tries = 0
        while true {
            let g = global.load(ordering: .sequentiallyConsistent)
            let slot = slots + i * Self.slotStride
            if slot.pointee.load(ordering: .relaxed) == 0,
                slot.pointee.compareExchange(expected: 0, desired: g, ordering: .sequentiallyConsistent).exchanged
            {
                return i
            }
            i = (i + 1) % Self.slotCount
            tries += 1
            if tries % Self.slotCount == 0 { sched_yield() }
        }
    }

    func leave(_ slot: Int) {
        (slots + slot * Self.slotStride).pointee.store(0, ordering: .sequentiallyConsistent)
    }

    /// The oldest epoch a walker inside is using, or `UInt64.max` when none is inside.
    private func oldestActive() -> UInt64 {
        var oldest = UInt64.max
        for i in 0..<Self.slotCount {
            let v = (slots + i * Self.slotStride).pointee.load(ordering: .sequentiallyConsistent)
            if v != 0 && v < oldest { oldest = v }
        }
        return oldest
    }

    // MARK: retirement

    /// Queues `item`, which the caller has already made unreachable, for reclamation after the walkers
    /// that may have seen it leave. Never waits.
    func retire(_ item: RetiredItem) {
        let tag = global.wrappingAdd(1, ordering: .sequentiallyConsistent).oldValue
        let n = pending.withLock { p in
            p.append((tag, item))
            return p.count
        }
        pendingCount.store(n, ordering: .relaxed)
        if n >= 64 { collect() }
    }

    /// Queues several unreachable items under one epoch.
    func retire(_ items: [RetiredItem]) {
        guard !items.isEmpty else { return }
        let tag = global.wrappingAdd(1, ordering: .sequentiallyConsistent).oldValue
        let n = pending.withLock { p in
            for item in items { p.append((tag, item)) }
            return p.count
        }
        pendingCount.store(n, ordering: .relaxed)
        if n >= 64 { collect() }
    }

    /// Reclaims every queued item no walker can still hold; returns how many. Never waits.
    @discardableResult
    public func collect() -> Int {
        guard pendingCount.load(ordering: .relaxed) > 0 else { return 0 }
        let oldest = oldestActive()
        var ready: [RetiredItem] = []
        let left = pending.withLock { p in
            if oldest == UInt64.max {
                ready = p.map(\.item)
                p.removeAll(keepingCapacity: true)
            } else {
                for e in p where e.tag < oldest { ready.append(e.item) }
                p.removeAll { $0.tag < oldest }
            }
            return p.count
        }
        pendingCount.store(left, ordering: .relaxed)
        guard !ready.isEmpty else { return 0 }
        if let reclaimer {
            for item in ready { reclaimer.reclaim(item) }
        }
        reclaimedCount.wrappingAdd(ready.count, ordering: .relaxed)
        return ready.count
    }

    /// A full grace period (`synchronize_rcu`): returns once every walker that was inside when it was
    /// called has left, then reclaims what is ready. Spins briefly, then yields. Must not be called
    /// from inside a critical section.
    public func synchronize() {
        let tag = global.wrappingAdd(1, ordering: .sequentiallyConsistent).oldValue
        var spins = 0
        while oldestActive() <= tag {
            spins += 1
            if spins > 64 { sched_yield() }
        }
        collect()
    }
}
