import CUserfaultfd
#if canImport(Glibc)
import Glibc
#endif

/// A blocking FIFO of userfaultfd messages between the service thread (which reads the descriptor and
/// must never block on anything else) and a worker thread. Its mutex is a leaf: held only to push or
/// pop, never across a call out.
///
/// A fixed ring, allocated once: pushing never allocates. The service thread must not call `malloc`
/// at all — glibc holds its allocator locks across the `fork` system call, and a `fork` of a process
/// with a region under ``ForkPolicy/share`` waits until the service thread has read its FORK event
/// (seen as a deadlock when a push grew the queue). The service thread reads only as many messages
/// as the rings have ``room`` for; the host keeps the rest, and their senders wait.
final class MessageQueue: @unchecked Sendable {
    /// Messages the ring holds; far above any backlog seen (each sender waits until its message is read).
    static let capacity = 4096

    fileprivate let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>
    private let ring: UnsafeMutablePointer<cu_message>
    private var head = 0
    fileprivate var count = 0
    private var closed = false
    /// Messages pushed and not yet finished by the worker (``finish()``).
    private var outstanding = 0
    /// Messages pushed, and finished, since the queue was made (monotonic).
    fileprivate var pushedTotal: UInt64 = 0
    fileprivate var finishedTotal: UInt64 = 0

    init() {
        mutex = .allocate(capacity: 1)
        cond = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
        ring = .allocate(capacity: Self.capacity)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        cond.deallocate()
        ring.deallocate()
    }

    /// How many more messages fit.
    var room: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return Self.capacity - count
    }

    /// Appends `m`, which must fit (``room``); returns how many messages were pushed so far, this one
    /// included.
    @discardableResult
    func push(_ m: cu_message) -> UInt64 {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        precondition(count < Self.capacity, "message ring overflow: the reader must respect room")
        ring[(head + count) % Self.capacity] = m
        count += 1
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
        while count == 0 && !closed { pthread_cond_wait(cond, mutex) }
        guard count > 0 else { return nil }
        let m = ring[head]
        head = (head + 1) % Self.capacity
        count -= 1
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

extension MessageQueue {
    /// Pushed, finished and queued counts, for a watchdog's dump.
    var counts: (pushed: UInt64, finished: UInt64, queued: Int) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return (pushedTotal, finishedTotal, count)
    }
}
