import Synchronization

/// Where a machine's events go: the subscribers' rings and the counters by phase. Every ``Machine`` has
/// one (``Machine/events``); both engines publish to it — a native space to its machine's.
///
/// The hot paths pay one relaxed load when nobody listens (``isObserving``). Observing means a
/// subscriber exists or ``countersEnabled`` is on: then events are built, timed, counted in
/// ``counters`` and copied into each subscriber's ring that wants their kind. A full ring drops
/// (counted per kind); publishing never waits: an event published while a subscriber is being added
/// or removed (the gate closed for the change) is lost for every ring (``lostToReconfiguration``).
///
/// Locking: publishers enter a hub's ring list through a gate, an atomic count of publishers inside
/// plus a writer bit; a publisher that finds the bit set leaves at once (the event is lost, counted).
/// Adding or removing a ring takes the hub's configuration lock, sets the bit, waits for the publishers
/// inside to leave, changes the list and clears the bit. The process-wide list of hubs and taps
/// (``subscribeToAll(capacity:kinds:)``) has a lock taken before any hub's configuration lock.
public final class EventHub: @unchecked Sendable {
    /// Which hub an event came from (``HMMEventRecord/source``); unique in the process.
    public let id: Int
    /// Counters by phase and size class, kept while observing.
    public let counters = PhaseCounters()

    /// Bit 0: some ring is attached. Bit 1: counters were asked for.
    private let state = Atomic<Int>(0)
    /// Publishers inside (low bits) and ``writerBit``.
    private let gate = Atomic<Int>(0)
    private static let writerBit = 1 << 62
    /// Serializes ring-list changes and the counters switch.
    private let configuration = Locked(())
    /// The most rings one hub delivers to (subscriptions of its own and process-wide ones together).
    public static let maximumSubscriptions = 64
    /// Attached rings, each retained, in a fixed buffer so a publisher walks them without retaining
    /// anything or checking exclusive access: read inside the gate, changed by ``changingRings(_:)``.
    private let rings: UnsafeMutablePointer<Unmanaged<EventRing>>
    private let ringCount = Atomic<Int>(0)
    private let lost = Atomic<Int>(0)

    init() {
        id = Self.nextID.wrappingAdd(1, ordering: .relaxed).oldValue
        rings = .allocate(capacity: Self.maximumSubscriptions)
        Self.global.withLock { g in
            g.hubs.append(Unmanaged.passUnretained(self))
            for tap in g.taps { _ = attach(tap) }
        }
    }

    deinit {
        // Leaves the process-wide list before its memory goes (a tap being added meanwhile waits for the
        // list's lock, so it never reaches this hub).
        Self.global.withLock { g in g.hubs.removeAll { $0.toOpaque() == Unmanaged.passUnretained(self).toOpaque() } }
        for i in 0..<ringCount.load(ordering: .relaxed) { rings[i].release() }
        rings.deallocate()
    }

    /// Whether events and counters are being recorded: one relaxed load, what every hot path checks first.
    @inline(__always) public var isObserving: Bool { state.load(ordering: .relaxed) != 0 }

    /// Whether counters are kept even with no subscriber (timing every fault and migration costs two clock
    /// reads each).
    public var countersEnabled: Bool {
        get { state.load(ordering: .relaxed) & 2 != 0 }
        set {
            CycleClock.prepare()
            configuration.withLock { _ in
                if newValue { _ = state.bitwiseOr(2, ordering: .relaxed) } else { _ = state.bitwiseAnd(~2, ordering: .relaxed) }
            }
        }
    }

    /// Events lost because a subscription was being added or removed as they were published.
    public var lostToReconfiguration: Int { lost.load(ordering: .relaxed) }

    /// A new subscription to this hub's events of `kinds`, with a ring of `capacity` slots (rounded up to
    /// a power of two).
    /// - Throws: `.invalidArgument` for a capacity outside 2…2^24 or an empty set of kinds.
    public func subscribe(capacity: Int = 1 << 14, kinds: HMMEventKinds = .all) throws(HMMError) -> EventSubscription {
        let ring = try Self.makeRing(capacity: capacity, kinds: kinds)
        CycleClock.prepare()
        guard attach(ring) else {
            throw HMMError(.busy, "a hub delivers to at most \(Self.maximumSubscriptions) subscriptions")
        }
        // The subscription keeps the hub (whose events it reads) alive; no weak reference, so the hub's
        // reference count stays on the fast path.
        return EventSubscription(ring: ring) { r in self.detach(r) }
    }

    /// A subscription to every hub of the process, today's and those machines made later create: what a
    /// tracer (`hmm trace`) uses. Records carry their hub's ``id``.
    /// - Throws: `.invalidArgument` for a capacity outside 2…2^24 or an empty set of kinds.
    public static func subscribeToAll(capacity: Int = 1 << 16, kinds: HMMEventKinds = .all) throws(HMMError) -> EventSubscription {
        let ring = try makeRing(capacity: capacity, kinds: kinds)
        CycleClock.prepare()
        global.withLock { g in
            g.taps.append(ring)
            for hub in g.hubs { _ = hub._withUnsafeGuaranteedRef { $0.attach(ring) } }
        }
        return EventSubscription(ring: ring) { r in
            global.withLock { g in
                g.taps.removeAll { $0 === r }
                for hub in g.hubs { hub._withUnsafeGuaranteedRef { $0.detach(r) } }
            }
        }
    }

    /// Delivers `event` to every ring that wants its kind (and counts it in ``counters``). Drivers and
    /// policies publish their own events (evictions, policy decisions) through this. Never blocks.
    public func publish(_ event: HMMEvent) {
        guard isObserving else { return }
        counters.record(event)
        guard gate.wrappingAdd(1, ordering: .acquiring).newValue & Self.writerBit == 0 else {
            gate.wrappingSubtract(1, ordering: .releasing)
            lost.wrappingAdd(1, ordering: .relaxed)
            return
        }
        let record = HMMEventRecord(source: id, event: event)
        let kind = event.kind
        for i in 0..<ringCount.load(ordering: .relaxed) {
            rings[i]._withUnsafeGuaranteedRef { ring in if ring.kinds.contains(kind) { ring.push(record) } }
        }
        gate.wrappingSubtract(1, ordering: .releasing)
    }

    private static func makeRing(capacity: Int, kinds: HMMEventKinds) throws(HMMError) -> EventRing {
        guard capacity >= 2, capacity <= 1 << 24 else { throw .invalid("event ring capacity \(capacity) is outside 2…16777216") }
        guard !kinds.isEmpty else { throw .invalid("a subscription needs at least one event kind") }
        return EventRing(capacity: capacity, kinds: kinds)
    }

    /// Adds `ring`; false if the hub already delivers to ``maximumSubscriptions`` rings (a process-wide
    /// subscription then misses this hub).
    private func attach(_ ring: EventRing) -> Bool {
        changingRings {
            let n = ringCount.load(ordering: .relaxed)
            guard n < Self.maximumSubscriptions else { return false }
            rings[n] = Unmanaged.passRetained(ring)
            ringCount.store(n + 1, ordering: .relaxed)
            _ = state.bitwiseOr(1, ordering: .relaxed)
            return true
        }
    }

    private func detach(_ ring: EventRing) {
        let removed: Unmanaged<EventRing>? = changingRings {
            let n = ringCount.load(ordering: .relaxed)
            guard let k = (0..<n).first(where: { rings[$0].toOpaque() == Unmanaged.passUnretained(ring).toOpaque() }) else {
                return nil
            }
            let r = rings[k]
            rings[k] = rings[n - 1]
            ringCount.store(n - 1, ordering: .relaxed)
            if n == 1 { _ = state.bitwiseAnd(~1, ordering: .relaxed) }
            return r
        }
        removed?.release()
    }

    /// Runs `body` with no publisher inside the ring list and none able to enter.
    private func changingRings<R>(_ body: () -> R) -> R {
        configuration.withLock { _ in
            gate.bitwiseOr(Self.writerBit, ordering: .acquiringAndReleasing)
            while gate.load(ordering: .acquiring) & ~Self.writerBit != 0 { sched_yieldShim() }
            defer { gate.bitwiseAnd(~Self.writerBit, ordering: .releasing) }
            return body()
        }
    }

    private struct Global {
        /// Live hubs, unretained: a hub removes itself in its deinit.
        var hubs: [Unmanaged<EventHub>] = []
        var taps: [EventRing] = []
    }
    private static let global = Locked(Global())
    /// Process-wide subscriptions alive (tests use it: while one is, every hub observes).
    static var processWideSubscriptions: Int { global.withLock { $0.taps.count } }
    private static let nextID = Atomic<Int>(1)
}
