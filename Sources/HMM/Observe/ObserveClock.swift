#if canImport(Glibc)
import Glibc
#endif

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of every event and counter (a vDSO call, about 20 ns).
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// The calling thread's kernel id (`gettid`), cached per thread: a thread-specific value lookup after the
/// first call instead of a system call.
public func currentThreadID() -> Int32 {
    let key = ThreadIDKey.key
    if let cached = pthread_getspecific(key) { return Int32(truncatingIfNeeded: Int(bitPattern: cached)) }
    let tid = kernelThreadID()
    pthread_setspecific(key, UnsafeRawPointer(bitPattern: Int(tid)))
    return tid
}

private enum ThreadIDKey {
    /// Created once; thread ids are never 0, so a nil value means "not cached yet".
    static let key: pthread_key_t = {
        var k = pthread_key_t()
        precondition(pthread_key_create(&k, nil) == 0, "pthread_key_create failed")
        return k
    }()
}

/// `gettid()` without a variadic `syscall`: `/proc/thread-self` links to `PID/task/TID`. Read once per
/// thread; 0 if `/proc` is not mounted.
private func kernelThreadID() -> Int32 {
    var buffer = [CChar](repeating: 0, count: 64)
    let n = readlink("/proc/thread-self", &buffer, 63)
    guard n > 0 else { return 0 }
    let link = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard let slash = link.lastIndex(of: "/"), let tid = Int32(link[link.index(after: slash)...]) else { return 0 }
    return tid
}
