import CCycleCounter
#if canImport(Glibc)
import Glibc
#endif

/// `CLOCK_MONOTONIC` nanoseconds: the clock of every event and counter. Where the CPU's cycle counter
/// runs at a constant rate whatever the power state (x86-64 `constant_tsc` and `nonstop_tsc`; always on
/// AArch64), it is read instead (about 10 ns against 23 for the vDSO call here) and converted with a
/// scale measured once against `CLOCK_MONOTONIC` over 5 ms (error about 2 µs per second elapsed);
/// elsewhere this is `clock_gettime` itself. All of swift-hmm's event times come from here, so they are
/// consistent with each other.
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    let c = CycleClock.calibration
    guard c.multiplier != 0 else { return systemMonotonicNanoseconds() }
    let (high, low) = (cc_cycles() &- c.baseCycles).multipliedFullWidth(by: c.multiplier)
    return c.baseNanoseconds &+ (high << 32 | low >> 32)
}

/// `clock_gettime(CLOCK_MONOTONIC)` in nanoseconds.
@inline(__always)
func systemMonotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// The cycle counter's scale: nanoseconds per cycle in 32.32 fixed point, and one point where both
/// clocks were read together. A multiplier of 0 means "use the system clock".
enum CycleClock {
    struct Calibration {
        var baseCycles: UInt64 = 0
        var baseNanoseconds: UInt64 = 0
        var multiplier: UInt64 = 0
    }

    static let calibration: Calibration = {
        guard usable else { return Calibration() }
        let c0 = cc_cycles()
        let n0 = systemMonotonicNanoseconds()
        var n1 = n0
        var c1 = c0
        while n1 &- n0 < 5_000_000 {
            c1 = cc_cycles()
            n1 = systemMonotonicNanoseconds()
        }
        guard c1 > c0 else { return Calibration() }
        let multiplier = UInt64((Double(n1 - n0) / Double(c1 - c0)) * 4_294_967_296.0)
        return Calibration(baseCycles: c1, baseNanoseconds: n1, multiplier: multiplier)
    }()

    /// Calibrates now (reading `/proc/cpuinfo`, spinning 5 ms) unless done: called where observing
    /// starts, so no hot path — least of all the native engine's service thread, which must not
    /// allocate — is the first to read the clock.
    static func prepare() { _ = calibration }

    /// Whether the counter ticks at a constant rate in every state (else its readings are not time).
    private static var usable: Bool {
        #if arch(x86_64)
        guard let f = fopen("/proc/cpuinfo", "r") else { return false }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 8192)
        while fgets(&line, Int32(line.count), f) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            guard text.hasPrefix("flags") else { continue }
            let flags = text.split(separator: " ")
            return flags.contains("constant_tsc") && flags.contains("nonstop_tsc")
        }
        return false
        #elseif arch(arm64)
        return true
        #else
        return false
        #endif
    }
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
