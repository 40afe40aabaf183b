import Synchronization

/// One delivered event and the hub it came from (``EventHub/id``: which machine).
public struct HMMEventRecord: Sendable, Equatable {
    public let source: Int
    public let event: HMMEvent
}

/// A subscriber's bounded, lossy ring: many publishing threads, one reader at a time. A full ring drops
/// the new event and counts it under its kind (UVM's `dropped[event type]`); a publisher never waits.
///
/// The slots follow Vyukov's bounded queue: each slot's sequence number says whether it is free for the
/// producer whose ticket matches, or full for the reader whose ticket does. A producer claims a ticket
/// with one compare-and-swap, copies the event (plain values only) and publishes the slot with a release
/// store.
final class EventRing: @unchecked Sendable {
    let capacity: Int
    private let mask: Int
    private let sequences: UnsafeMutablePointer<Atomic<Int>>
    private let slots: UnsafeMutablePointer<HMMEventRecord>
    private let tail = Atomic<Int>(0)
    /// The reader's ticket; only the thread holding the subscription's reader lock touches it (so no
    /// dynamic exclusivity check is needed per event).
    @exclusivity(unchecked) private var head = 0
    private let drops: UnsafeMutablePointer<Atomic<Int>>
    let kinds: HMMEventKinds

    /// `capacity` is rounded up to a power of two.
    init(capacity: Int, kinds: HMMEventKinds) {
        var c = 1
        while c < capacity { c <<= 1 }
        self.capacity = c
        mask = c - 1
        self.kinds = kinds
        sequences = .allocate(capacity: c)
        for i in 0..<c { (sequences + i).initialize(to: Atomic(i)) }
        slots = .allocate(capacity: c)
        // Touched now, on the subscriber's thread: a publisher never takes the page fault of a first write.
        UnsafeMutableRawPointer(slots).initializeMemory(as: UInt8.self, repeating: 0, count: c * MemoryLayout<HMMEventRecord>.stride)
        drops = .allocate(capacity: HMMEventKind.allCases.count)
        for i in 0..<HMMEventKind.allCases.count { (drops + i).initialize(to: Atomic(0)) }
    }

    deinit {
        sequences.deallocate()
        slots.deallocate()  // records are plain values: nothing to deinitialize
        drops.deallocate()
    }

    /// Adds `record`, or counts it dropped if the ring is full. Never blocks.
    @inline(__always) func push(_ record: HMMEventRecord) {
        var ticket = tail.load(ordering: .relaxed)
        while true {
            let slot = ticket & mask
            let seq = sequences[slot].load(ordering: .acquiring)
            if seq == ticket {
                let (exchanged, original) = tail.compareExchange(
                    expected: ticket, desired: ticket &+ 1, ordering: .relaxed)
                if exchanged {
                    (slots + slot).initialize(to: record)
                    sequences[slot].store(ticket &+ 1, ordering: .releasing)
                    return
                }
                ticket = original
            } else if seq &- ticket < 0 {
                // The slot still holds an event from one lap ago: full.
                drops[record.event.kind.rawValue].wrappingAdd(1, ordering: .relaxed)
                return
            } else {
                ticket = tail.load(ordering: .relaxed)
            }
        }
    }

    /// The oldest event, or nil if none is ready. The caller is the only reader.
    func pop() -> HMMEventRecord? {
        let slot = head & mask
        guard sequences[slot].load(ordering: .acquiring) == head &+ 1 else { return nil }
        let record = slots[slot]
        sequences[slot].store(head &+ capacity, ordering: .releasing)
        head &+= 1
        return record
    }

    func dropped(_ kind: HMMEventKind) -> Int { drops[kind.rawValue].load(ordering: .relaxed) }
}

/// A subscription to one hub (``EventHub/subscribe(capacity:kinds:)``) or to every hub of the process
/// (``EventHub/subscribeToAll(capacity:kinds:)``): a ring of its own that publishers fill and this reads.
/// Cancelled by ``cancel()`` or when released.
///
/// Read it from one thread at a time (``next()`` and ``drain(_:)`` take a reader lock of their own); any
/// thread may cancel it.
public final class EventSubscription: @unchecked Sendable {
    let ring: EventRing
    private let reader = Locked(())
    private let detach: @Sendable (EventRing) -> Void
    private let cancelled = Atomic<Bool>(false)

    init(ring: EventRing, detach: @escaping @Sendable (EventRing) -> Void) {
        self.ring = ring
        self.detach = detach
    }

    deinit { cancel() }

    /// The kinds delivered.
    public var kinds: HMMEventKinds { ring.kinds }
    /// Slots in the ring.
    public var capacity: Int { ring.capacity }

    /// The oldest undelivered event, or nil (never waits).
    public func next() -> HMMEventRecord? { reader.withLock { _ in ring.pop() } }

    /// Hands every event now in the ring to `body`, oldest first; returns how many.
    @discardableResult
    public func drain(_ body: (HMMEventRecord) throws -> Void) rethrows -> Int {
        try reader.withLock { _ in
            var n = 0
            while let r = ring.pop() {
                try body(r)
                n += 1
            }
            return n
        }
    }

    /// Events of `kind` lost because the ring was full.
    public func dropped(_ kind: HMMEventKind) -> Int { ring.dropped(kind) }

    /// Events of every kind lost because the ring was full.
    public var droppedTotal: Int { HMMEventKind.allCases.reduce(0) { $0 + ring.dropped($1) } }

    /// Stops delivery (events already in the ring can still be read). Idempotent.
    public func cancel() {
        guard !cancelled.exchange(true, ordering: .acquiringAndReleasing) else { return }
        detach(ring)
    }
}
