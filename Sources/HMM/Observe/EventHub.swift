import Synchronization

/// Where a machine's events go: the subscribers' rings and the counters by phase. Every ``Machine`` has
/// one (``Machine/events``); both engines publish to it — a native space to its machine's.
///
/// The hot paths pay one relaxed load when nobody listens (``isObserving``). Observing means a
/// subscriber exists or ``countersEnabled`` is on: then events are built, timed, counted in
/// ``counters`` and copied into each subscriber's ring that wants their kind. A full ring drops
/// (counted per kind); publishing never waits: a subscriber being added or removed at that instant
/// (the hub's lock held for writing) loses the event for every ring (``lostToReconfiguration``).
///
/// Locking: a hub's ring list is guarded by its read-write lock (publishers try-lock it for reading);
/// the process-wide list of hubs and taps (``subscribeToAll(capacity:kinds:)``) by a lock taken before
/// any hub's.
public final class EventHub: @unchecked Sendable {
    /// Which hub an event came from (``HMMEventRecord/source``); unique in the process.
    public let id: Int
    /// Counters by phase and size class, kept while observing.
    public let counters = PhaseCounters()

    /// Bit 0: some ring is attached. Bit 1: counters were asked for.
    private let state = Atomic<Int>(0)
    private let lock = ReadWriteLock()
    /// Attached rings; read under `lock` for reading, changed under it for writing.
    private var rings: [EventRing] = []
    private let lost = Atomic<Int>(0)

    init() {
        id = Self.nextID.wrappingAdd(1, ordering: .relaxed).oldValue
        Self.global.withLock { g in
            g.hubs.removeAll { $0.object == nil }
            g.hubs.append(WeakBox(self))
            for tap in g.taps { attach(tap) }
        }
    }

    /// Whether events and counters are being recorded: one relaxed load, what every hot path checks first.
    @inline(__always) public var isObserving: Bool { state.load(ordering: .relaxed) != 0 }

    /// Whether counters are kept even with no subscriber (timing every fault and migration costs two clock
    /// reads each).
    public var countersEnabled: Bool {
        get { state.load(ordering: .relaxed) & 2 != 0 }
        set {
            lock.withWriteLock {
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
        attach(ring)
        return EventSubscription(ring: ring) { [weak self] r in self?.detach(r) }
    }

    /// A subscription to every hub of the process, today's and those machines made later create: what a
    /// tracer (`hmm trace`) uses. Records carry their hub's ``id``.
    /// - Throws: `.invalidArgument` for a capacity outside 2…2^24 or an empty set of kinds.
    public static func subscribeToAll(capacity: Int = 1 << 16, kinds: HMMEventKinds = .all) throws(HMMError) -> EventSubscription {
        let ring = try makeRing(capacity: capacity, kinds: kinds)
        global.withLock { g in
            g.taps.append(ring)
            g.hubs.removeAll { $0.object == nil }
            for hub in g.hubs { hub.object?.attach(ring) }
        }
        return EventSubscription(ring: ring) { r in
            global.withLock { g in
                g.taps.removeAll { $0 === r }
                for hub in g.hubs { hub.object?.detach(r) }
            }
        }
    }

    /// Delivers `event` to every ring that wants its kind (and counts it in ``counters``). Drivers and
    /// policies publish their own events (evictions, policy decisions) through this. Never blocks.
    public func publish(_ event: HMMEvent) {
        guard isObserving else { return }
        counters.record(event)
        guard lock.tryReadLock() else {
            lost.wrappingAdd(1, ordering: .relaxed)
            return
        }
        let record = HMMEventRecord(source: id, event: event)
        for ring in rings where ring.kinds.contains(event.kind) { ring.push(record) }
        lock.unlock()
    }

    private static func makeRing(capacity: Int, kinds: HMMEventKinds) throws(HMMError) -> EventRing {
        guard capacity >= 2, capacity <= 1 << 24 else { throw .invalid("event ring capacity \(capacity) is outside 2…16777216") }
        guard !kinds.isEmpty else { throw .invalid("a subscription needs at least one event kind") }
        return EventRing(capacity: capacity, kinds: kinds)
    }

    private func attach(_ ring: EventRing) {
        lock.withWriteLock {
            rings.append(ring)
            _ = state.bitwiseOr(1, ordering: .relaxed)
        }
    }

    private func detach(_ ring: EventRing) {
        lock.withWriteLock {
            rings.removeAll { $0 === ring }
            if rings.isEmpty { _ = state.bitwiseAnd(~1, ordering: .relaxed) }
        }
    }

    private struct Global {
        var hubs: [WeakBox<EventHub>] = []
        var taps: [EventRing] = []
    }
    private static let global = Locked(Global())
    /// Process-wide subscriptions alive (tests use it: while one is, every hub observes).
    static var processWideSubscriptions: Int { global.withLock { $0.taps.count } }
    private static let nextID = Atomic<Int>(1)
}
