import CUserfaultfd
#if canImport(Glibc)
import Glibc
#endif

/// A blocking FIFO of userfaultfd messages between the service thread (which reads the descriptor and
/// must never block on anything else) and a worker thread. Its mutex is a leaf: held only to push or
/// pop, never across a call out.
final class MessageQueue: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>
    private var items: [cu_message] = []
    private var head = 0
    private var closed = false
    /// Messages pushed and not yet finished by the worker (``finish()``).
    private var outstanding = 0
    /// Messages pushed, and finished, since the queue was made (monotonic).
    private var pushedTotal: UInt64 = 0
    private var finishedTotal: UInt64 = 0

    init() {
        mutex = .allocate(capacity: 1)
        cond = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
        items.reserveCapacity(64)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        cond.deallocate()
    }

    /// Appends `m`; returns how many messages were pushed so far, this one included.
    @discardableResult
    func push(_ m: cu_message) -> UInt64 {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        items.append(m)
        outstanding += 1
        pushedTotal += 1
        pthread_cond_broadcast(cond)
        return pushedTotal
    }

    /// How many messages were pushed so far.
    var pushed: UInt64 {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return pushedTotal
    }

    /// Waits until the first `count` messages ever pushed are finished (or the queue closes).
    func waitFinished(_ count: UInt64) {
        pthread_mutex_lock(mutex)
        while finishedTotal < count && !closed { pthread_cond_wait(cond, mutex) }
        pthread_mutex_unlock(mutex)
    }

    /// The next message, waiting for one; nil once closed and drained.
    func pop() -> cu_message? {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while head == items.count && !closed { pthread_cond_wait(cond, mutex) }
        guard head < items.count else { return nil }
        let m = items[head]
        head += 1
        if head == items.count {
            items.removeAll(keepingCapacity: true)
            head = 0
        }
        return m
    }

    /// The worker finished one popped message.
    func finish() {
        pthread_mutex_lock(mutex)
        outstanding -= 1
        finishedTotal += 1
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(mutex)
    }

    /// Waits until every message pushed so far is finished (or the queue closes).
    func drain() {
        pthread_mutex_lock(mutex)
        while outstanding > 0 && !closed { pthread_cond_wait(cond, mutex) }
        pthread_mutex_unlock(mutex)
    }

    func close() {
        pthread_mutex_lock(mutex)
        closed = true
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(mutex)
    }
}
