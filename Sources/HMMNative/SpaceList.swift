import HMM
@_spi(Engine) import HMM

/// A list of native spaces held weakly, under one lock: the process-wide registries (``ForkRegistry``,
/// ``InThreadFaults``) find the live spaces through it without keeping them alive.
final class SpaceList: @unchecked Sendable {
    /// Guards `entries`. A registry may hold it across a call it cannot express as a closure (a
    /// `fork`), so it is a lock with explicit lock and unlock.
    let lock = ReadWriteLock()
    private var entries: [Weak] = []

    private final class Weak {
        weak var space: NativeSpace?
        init(_ space: NativeSpace) { self.space = space }
    }

    func add(_ space: NativeSpace) {
        lock.withWriteLock {
            entries.removeAll { $0.space == nil }
            entries.append(Weak(space))
        }
    }

    func remove(_ space: NativeSpace) {
        lock.withWriteLock { entries.removeAll { $0.space == nil || $0.space === space } }
    }

    /// The live spaces. Requires `lock` held.
    var liveHoldingLock: [NativeSpace] { entries.compactMap(\.space) }

    /// The live spaces, under the lock.
    var live: [NativeSpace] { lock.withReadLock { liveHoldingLock } }

    /// The first live space satisfying `predicate`, found under the lock without copying the list (a
    /// fault path's lookup). `predicate` may take only leaf locks.
    func first(where predicate: (NativeSpace) -> Bool) -> NativeSpace? {
        lock.withReadLock {
            for e in entries {
                if let s = e.space, predicate(s) { return s }
            }
            return nil
        }
    }
}
