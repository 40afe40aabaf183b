#if canImport(Glibc)
import Glibc
#endif

/// A value guarded by a pthread mutex, with a condition variable to wait on it: what the accelerator's
/// fault buffer needs (workers wait for a replay, the fault thread for faults). pthread-based, so
/// ThreadSanitizer sees its edges.
final class Monitor<Value>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private let value: UnsafeMutablePointer<Value>

    init(_ value: Value) {
        self.value = .allocate(capacity: 1)
        self.value.initialize(to: value)
        mutex = .allocate(capacity: 1)
        condition = .allocate(capacity: 1)
        precondition(pthread_mutex_init(mutex, nil) == 0 && pthread_cond_init(condition, nil) == 0)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
        value.deinitialize(count: 1)
        value.deallocate()
    }

    /// Runs `body` with the mutex held.
    func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }

    /// With the mutex held, waits until `ready` holds (re-checked after every wake-up), then runs `body`.
    func wait<R>(until ready: (inout Value) -> Bool, then body: (inout Value) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while !ready(&value.pointee) { pthread_cond_wait(condition, mutex) }
        return try body(&value.pointee)
    }

    /// Wakes every waiter (call with or without the mutex held, after changing the value under it).
    func broadcast() { pthread_cond_broadcast(condition) }
}
