#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A spin lock stored as one `Atomic<UInt32>` word inside an arena (page-table locks, the folio lock bit).
///
/// Uncontended it costs one compare-exchange to take and one store to release; contended it spins
/// briefly and then yields the CPU, so a holder that is copying 2 MiB is not starved by its waiters.
/// The acquire/release orderings give the happens-before edges that ThreadSanitizer checks.
@usableFromInline
struct SpinLockWord {
    @usableFromInline let word: UnsafeMutablePointer<Atomic<UInt32>>

    @inlinable init(_ word: UnsafeMutablePointer<Atomic<UInt32>>) { self.word = word }

    @inlinable func lock() {
        if word.pointee.compareExchange(expected: 0, desired: 1, ordering: .acquiring).exchanged { return }
        lockSlow()
    }

    @usableFromInline func lockSlow() {
        var spins = 0
        while true {
            if word.pointee.load(ordering: .relaxed) == 0,
                word.pointee.compareExchange(expected: 0, desired: 1, ordering: .acquiring).exchanged
            {
                return
            }
            spins += 1
            if spins >= 32 {
                sched_yield()
                spins = 0
            }
        }
    }

    @inlinable func tryLock() -> Bool {
        word.pointee.compareExchange(expected: 0, desired: 1, ordering: .acquiring).exchanged
    }

    @inlinable func unlock() { word.pointee.store(0, ordering: .releasing) }

    @inlinable var isLocked: Bool { word.pointee.load(ordering: .relaxed) != 0 }
}

/// A reader–writer lock (the kernel's `mmap_lock` is an rw-semaphore). Writers are preferred so that a
/// stream of faults cannot starve `munmap`, `fork` or `mprotect`.
@_spi(Engine)
public final class ReadWriteLock: @unchecked Sendable {
    private let handle: UnsafeMutablePointer<pthread_rwlock_t>

    public init() {
        handle = .allocate(capacity: 1)
        initialize()
    }

    private func initialize() {
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        let rc = pthread_rwlock_init(handle, &attr)
        precondition(rc == 0, "pthread_rwlock_init failed: \(rc)")
        pthread_rwlockattr_destroy(&attr)
    }

    /// In the child of a `fork` whose `prepare` hook write-locked this lock: makes the child's copy a
    /// fresh, unlocked lock. (`unlock` cannot: glibc tells a writer's unlock by the thread id that
    /// locked, and the child's thread has another.) Only the forking thread exists then.
    public func reinitializeInForkedChild() { initialize() }

    deinit {
        pthread_rwlock_destroy(handle)
        handle.deallocate()
    }

    public func readLock() { precondition(pthread_rwlock_rdlock(handle) == 0) }
    public func writeLock() { precondition(pthread_rwlock_wrlock(handle) == 0) }
    public func unlock() { precondition(pthread_rwlock_unlock(handle) == 0) }
    /// Takes the lock for writing if nobody holds it; false otherwise (held for reading or writing).
    public func tryWriteLock() -> Bool { pthread_rwlock_trywrlock(handle) == 0 }

    @inline(__always) public func withReadLock<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        readLock()
        defer { unlock() }
        return try body()
    }

    @inline(__always) public func withWriteLock<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        writeLock()
        defer { unlock() }
        return try body()
    }
}
