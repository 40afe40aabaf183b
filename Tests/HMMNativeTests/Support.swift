import CUserfaultfd
import HMM
import HMMDevices
import HMMNative
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Why the native tests cannot run here (nil: they can): userfaultfd with MOVE and POISON, PAGEMAP_SCAN.
///
/// Every native suite has a 10-minute time limit, there to turn a hang into a failure. It is counted
/// from when Swift Testing starts a test, which under the full suite includes waiting behind the long
/// simulated tests on 2 vCPUs (T38 alone runs ~110 s; every native test then reported ~113 s, against
/// about 2 s run alone).
let nativeUnavailable = NativeSpace.unsupportedReason()

/// Whether the tests run under ThreadSanitizer. Its runtime holds its own locks across `fork`, so the
/// service thread that must read a FORK event (``ForkPolicy/share``) blocks in it and the fork never
/// returns; see ``ForkPolicy/share``.
let underThreadSanitizer = dlsym(nil, "__tsan_init") != nil

/// A machine, a native space and a device-private mirror device; ends with the space closed (every
/// device page evicted) and the machine's invariants checked — with the space's references counted
/// while it is open, and none left after.
func withNativeSpace(
    systemMemory: Int = 256 << 20, options: NativeSpace.Options = .init(), kind: PagemapKind = .devicePrivate,
    _ body: (Machine, NativeSpace, MirrorDevice) throws -> Void
) throws {
    let machine = try Machine(.init(systemMemory: systemMemory))
    let space = try NativeSpace(machine: machine, options: options)
    let device = try MirrorDevice(machine: machine, minor: 0, kind: kind, chunkSize: 64 << 20)
    do {
        try body(machine, space, device)
        try machine.checkInvariants()
    } catch {
        try? space.close()
        throw error
    }
    try space.close()
    #expect(device.pagesInUse == 0, "closing the space evicts every device page")
    try machine.checkInvariants()
}

extension NativeSpace.Options {
    /// The default options with fault mode `mode`.
    init(faultMode mode: FaultMode) {
        self.init()
        faultMode = mode
    }
}

/// Fills a region with a per-page pattern: word `i` of the region is `seed &+ i`.
func fill(_ region: NativeRegion, seed: UInt32) {
    let words = region.pointer.bindMemory(to: UInt32.self, capacity: region.length / 4)
    for i in 0..<(region.length / 4) { words[i] = seed &+ UInt32(truncatingIfNeeded: i) }
}

/// The index of the first word that breaks the pattern of ``fill(_:seed:)``, or nil.
func firstMismatch(_ region: NativeRegion, seed: UInt32, from: Int = 0, to: Int? = nil) -> Int? {
    let words = region.pointer.bindMemory(to: UInt32.self, capacity: region.length / 4)
    for i in (from / 4)..<((to ?? region.length) / 4) where words[i] != seed &+ UInt32(truncatingIfNeeded: i) { return i }
    return nil
}

/// Waits (up to 5 s) until `condition` holds — for effects of events the service threads handle.
func eventually(_ condition: () -> Bool) -> Bool {
    let deadline = ContinuousClock.now + .seconds(5)
    while ContinuousClock.now < deadline {
        if condition() { return true }
        usleep(1000)
    }
    return condition()
}

/// Whether the host gives transparent huge pages to `MADV_HUGEPAGE` regions (THP not `never`).
let hostHasTHP: Bool = {
    guard let f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r") else { return false }
    defer { fclose(f) }
    var line = [UInt8](repeating: 0, count: 128)
    guard line.withUnsafeMutableBufferPointer({ b in b.withMemoryRebound(to: CChar.self) { fgets($0.baseAddress, 128, f) } }) != nil
    else { return false }
    return !String(decoding: line.prefix { $0 != 0 }, as: UTF8.self).contains("[never]")
}()

/// Waits for child `pid` to exit, for at most `seconds`: a child that hangs (say, on a fault nobody
/// resolves) is killed with SIGKILL and reaped, so a test fails instead of wedging the run. Returns the
/// wait status, or nil if the child had to be killed.
func waitChild(_ pid: pid_t, seconds: Int = 30) -> Int32? {
    var status: Int32 = 0
    let deadline = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < deadline {
        if waitpid(pid, &status, WNOHANG) == pid { return status }
        usleep(1000)
    }
    kill(pid, SIGKILL)
    _ = waitpid(pid, &status, 0)
    return nil
}


/// Asserts that `body` throws an ``HMMError`` with `code`.
func expectNativeError<R>(
    _ code: HMMError.Code, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> R
) {
    do {
        _ = try body()
        Issue.record("expected \(code), nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as HMMError {
        #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("expected HMMError.\(code), got \(error)", sourceLocation: sourceLocation)
    }
}
