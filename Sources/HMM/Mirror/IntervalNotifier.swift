import Synchronization

/// Why an address range is being invalidated (`enum mmu_notifier_event`, with the kernel's values).
public enum NotifierEvent: Int, Sendable, CustomStringConvertible {
    /// munmap / mremap.
    case unmap = 0
    /// zap (`MADV_DONTNEED`, collapse), restoring a device-exclusive entry, rmap migration.
    case clear = 1
    /// mprotect.
    case protectionVMA = 2
    /// write-protecting copy-on-write pages at fork.
    case protectionPage = 3
    /// soft-dirty clearing.
    case softDirty = 4
    /// the address space is being torn down (`exit_mmap`), over the whole address space.
    case release = 5
    /// `migrate_vma` collection and hole insertion; `owner` is the migrating driver.
    case migrate = 6
    /// `make_device_exclusive`; `owner` is the caller's.
    case exclusive = 7

    public var description: String {
        ["unmap", "clear", "protection_vma", "protection_page", "soft_dirty", "release", "migrate", "exclusive"][rawValue]
    }
}

/// One invalidation (`struct mmu_notifier_range`): `[start, end)` of `space` is about to change.
public struct NotifierRange: Sendable {
    public let space: any MirroredAddressSpace
    public let start: UInt64
    /// Exclusive.
    public let end: UInt64
    public let event: NotifierEvent
    /// The driver on whose behalf the change happens (migrate, exclusive), else nil.
    public let owner: (any AnyObject & Sendable)?
    /// `MMU_NOTIFIER_RANGE_BLOCKABLE`: the callback may sleep (always true here).
    public let blockable: Bool

    /// An invalidation of `[start, end)`: how an engine describes a change before it tells the notifiers.
    @_spi(Engine)
    public init(space: any MirroredAddressSpace, start: UInt64, end: UInt64, event: NotifierEvent,
                owner: (any AnyObject & Sendable)?, blockable: Bool = true) {
        self.space = space
        self.start = start
        self.end = end
        self.event = event
        self.owner = owner
        self.blockable = blockable
    }

    /// Whether this is the migrate event of `owner` itself. A driver may keep its device mappings then
    /// (the migration protocol tells it what moves), but it must still call
    /// ``IntervalNotifier/setSequence(_:)``: a device fault that walked the range before the migration
    /// began must see the retry, or it may map a frame the migration is about to free — and read
    /// another page's bytes once that frame is reused. (`lib/test_hmm.c` returns early here without
    /// setting the sequence; swift-hmm's `MirrorFile` does not.)
    public func isMigration(by owner: any AnyObject & Sendable) -> Bool { event == .migrate && self.owner === owner }
}

/// What a driver supplies with an ``IntervalNotifier`` (`struct mmu_interval_notifier_ops`).
public protocol IntervalNotifierOperations: AnyObject, Sendable {
    /// `[range.start, range.end)` overlaps the interval and is about to change. Under the same driver
    /// lock that guards ``IntervalNotifier/readRetry(_:)``: call ``IntervalNotifier/setSequence(_:)``
    /// with `sequence`, stop using device mappings of the range, and return true. Runs with the space's
    /// `mmapLock` held (read or write) and possibly its `rmapLock`; must not take either, nor fault.
    func invalidate(_ notifier: IntervalNotifier, range: NotifierRange, sequence: UInt64) -> Bool
}

/// A driver's subscription to changes of one virtual range of an address space
/// (`struct mmu_interval_notifier`), with the kernel's sequence-count protocol (`mm/mmu_notifier.c`):
///
/// ```
/// let seq = notifier.readBegin()
/// … walk (RangeFault) under mmapLock …
/// driverLock { if notifier.readRetry(seq) { retry } else { program the device } }
/// ```
///
/// Lifetime: the subscription lasts until ``remove()`` or until the notifier is released, whichever
/// comes first — the space holds its notifiers weakly, so a driver keeps the notifier it was given (as a
/// Swift subscription token is kept). The notifier keeps its `operations` and its space alive. A driver
/// object that owns its notifier and is also its `operations` forms a cycle: break it with
/// ``remove()`` on close, or pass an operations object that refers back to the driver weakly (as
/// `MirrorFile` does), so that dropping the driver — and then the space — returns the space's memory.
public final class IntervalNotifier: @unchecked Sendable {
    public let space: any MirroredAddressSpace
    public let start: UInt64
    /// Exclusive.
    public let end: UInt64
    let operations: any IntervalNotifierOperations
    /// The space's subscription list (its `mmu_notifier_subscriptions`).
    let subscriptions: NotifierSubscriptions
    let sequence = Atomic<UInt64>(0)
    let removed = Atomic<Bool>(false)

    /// A notifier of `space` over `[start, end)`, not yet subscribed: engines create it and pass it to
    /// their ``NotifierSubscriptions/insert(_:)``.
    @_spi(Engine)
    public init(space: any MirroredAddressSpace, subscriptions: NotifierSubscriptions, start: UInt64, end: UInt64,
                operations: any IntervalNotifierOperations) {
        self.space = space
        self.subscriptions = subscriptions
        self.start = start
        self.end = end
        self.operations = operations
    }

    deinit {
        // Nothing can be running a callback on us (an invalidation holds a strong reference while it
        // does); forget the dead entry.
        if !removed.load(ordering: .acquiring) { subscriptions.pruneReleased() }
    }

    /// `mmu_interval_read_begin`: the sequence to validate a walk against. If an invalidation of this
    /// interval is running right now, waits until it ends. Call without the driver lock held.
    public func readBegin() -> UInt64 {
        subscriptions.readBegin(self)
    }

    /// `mmu_interval_read_retry`: true if an invalidation touched the interval since ``readBegin()``
    /// returned `seq`. Call under the driver lock the invalidate callback also takes.
    public func readRetry(_ seq: UInt64) -> Bool {
        sequence.load(ordering: .acquiring) != seq
    }

    /// `mmu_interval_check_retry`: the same test, as a lockless hint.
    public func checkRetry(_ seq: UInt64) -> Bool { readRetry(seq) }

    /// `mmu_interval_set_seq`: called by the invalidate callback, under the driver lock.
    public func setSequence(_ seq: UInt64) {
        sequence.store(seq, ordering: .releasing)
    }

    /// `mmu_interval_notifier_remove`: after it returns no callback runs or will run. Must not be called
    /// from a callback. Idempotent.
    public func remove() {
        guard !removed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        subscriptions.remove(self)
    }
}

/// The per-address-space notifier state (`struct mmu_notifier_subscriptions`): the mm-wide
/// `invalidate_seq` (even = idle, odd = an invalidation is running) and the intervals. One per space,
/// on either engine.
@_spi(Engine)
public final class NotifierSubscriptions: @unchecked Sendable {
    private struct State {
        var sequence: UInt64 = 2
        var active = 0
        /// Weak: a released notifier is unsubscribed (see ``IntervalNotifier``).
        var intervals: [WeakBox<IntervalNotifier>] = []
    }
    private let state = Locked(State())
    /// Number of intervals (released ones awaiting pruning included), written under the state lock; an
    /// invalidation skips the lock when it reads zero. Inserting takes the space's `mmapLock` for
    /// writing, so no invalidation can miss a notifier inserted before it began.
    private let count = Atomic<Int>(0)
    /// The hub invalidations are published to (the space's machine's), unowned: the space holds both.
    private unowned(unsafe) let events: EventHub?

    /// Subscriptions of a space on `machine`, whose hub hears the invalidations.
    public init(machine: Machine?) { events = machine?.events }

    /// Subscribes `n`. The caller excludes invalidations that must not miss it (the simulated engine
    /// holds `mmapLock` for writing).
    public func insert(_ n: IntervalNotifier) {
        state.withLock { s in
            n.sequence.store(s.active > 0 ? s.sequence : s.sequence &- 1, ordering: .releasing)
            s.intervals.append(WeakBox(n))
            count.store(s.intervals.count, ordering: .releasing)
        }
    }

    func remove(_ n: IntervalNotifier) {
        let waitFor: UInt64? = state.withLock { s in
            s.intervals.removeAll { $0.object === n || $0.object == nil }
            count.store(s.intervals.count, ordering: .releasing)
            return s.active > 0 ? s.sequence : nil
        }
        if let seq = waitFor { waitUntilSequence(moves: seq) }
    }

    /// Drops the entries of released notifiers.
    func pruneReleased() {
        state.withLock { s in
            s.intervals.removeAll { $0.object == nil }
            count.store(s.intervals.count, ordering: .releasing)
        }
    }

    func readBegin(_ n: IntervalNotifier) -> UInt64 {
        while true {
            let (mm, seq) = state.withLock { s in (s.sequence, n.sequence.load(ordering: .acquiring)) }
            if seq != mm || mm & 1 == 0 { return seq }
            waitUntilSequence(moves: mm)
        }
    }

    private func waitUntilSequence(moves seq: UInt64) {
        var spins = 0
        while state.withLock({ $0.sequence }) == seq {
            spins += 1
            if spins > 8 {
                sched_yieldShim()
                spins = 0
            }
        }
    }

    /// `mmu_notifier_invalidate_range_start`: every overlapping interval's callback runs, in this
    /// thread; returns whether ``end(_:)`` must be called.
    public func start(_ range: NotifierRange) -> Bool {
        guard count.load(ordering: .acquiring) > 0 else { return false }
        let (cur, list) = state.withLock { s in
            s.active += 1
            s.sequence |= 1
            return (s.sequence, s.intervals.compactMap { w -> IntervalNotifier? in
                guard let n = w.object, n.start < range.end, range.start < n.end else { return nil }
                return n
            })
        }
        guard !list.isEmpty, let events, _slowPath(events.isObserving) else {
            for n in list { _ = n.operations.invalidate(n, range: range, sequence: cur) }
            return true
        }
        let t = monotonicNanoseconds()
        for n in list { _ = n.operations.invalidate(n, range: range, sequence: cur) }
        events.publish(.invalidation(InvalidationEvent(
            event: range.event, space: range.space.eventSpaceID, start: range.start, end: range.end,
            owner: range.owner.map { UInt(bitPattern: ObjectIdentifier($0)) } ?? 0, notifiers: list.count,
            thread: currentThreadID(), startTime: t, duration: monotonicNanoseconds() &- t)))
        return true
    }

    /// Runs `body` between ``start(_:)`` and ``end(_:)`` of `range`: how either engine brackets a change.
    @inline(__always)
    public func invalidating<R, E: Error>(_ range: NotifierRange, _ body: () throws(E) -> R) throws(E) -> R {
        let started = start(range)
        defer { end(started) }
        return try body()
    }

    /// `mmu_notifier_invalidate_range_end`.
    public func end(_ started: Bool) {
        guard started else { return }
        state.withLock { s in
            s.active -= 1
            if s.active == 0 { s.sequence &+= 1 }
        }
    }
}

extension AddressSpace {
    /// Runs `body` between the start and the end of an invalidation of `[lo, hi)`.
    @inline(__always)
    func invalidating<R, E: Error>(
        _ lo: UInt64, _ hi: UInt64, _ event: NotifierEvent, owner: (any AnyObject & Sendable)? = nil, _ body: () throws(E) -> R
    ) throws(E) -> R {
        try notifiers.invalidating(NotifierRange(space: self, start: lo, end: hi, event: event, owner: owner), body)
    }
}
