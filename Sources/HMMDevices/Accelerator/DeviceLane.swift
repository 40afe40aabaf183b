import HMM
import Synchronization

/// One worker's view of memory through the device page table: loads, stores and atomics on virtual
/// addresses of the registered ranges. A miss (no entry, or a read-only entry for a write) records a
/// fault and waits for its batch to be serviced, then replays. Not thread-safe: one per worker.
public final class DeviceLane: @unchecked Sendable {
    unowned let context: AcceleratorContext
    /// This worker's index (its quiescence slot).
    public let worker: Int
    private let ranges: [AcceleratorContext.Range]
    private var last = 0
    private let state: UnsafeMutablePointer<Atomic<UInt64>>
    /// Accesses that hit (counted locally, summed at the end of the launch).
    var accesses = 0
    /// Fault rounds one access may take before the kernel fails (a page the CPU keeps taking back is
    /// throttled, then pinned, well before this).
    static let maximumFaultRounds = 1000

    init(context: AcceleratorContext, worker: Int, ranges: [AcceleratorContext.Range]) {
        self.context = context
        self.worker = worker
        self.ranges = ranges
        state = context.workerStates + worker
    }

    /// Enters a work item: entries read from now on may be in use until ``leave()``.
    @inline(__always) func enter() { state.pointee.wrappingAdd(1, ordering: .sequentiallyConsistent) }
    /// Leaves it: nothing read since ``enter()`` is in use any more.
    @inline(__always) func leave() { state.pointee.wrappingAdd(1, ordering: .releasing) }

    /// The host address of `a`'s byte for `access`, faulting until the device maps it.
    @inline(__always)
    private func translate(_ a: UInt64, _ access: DeviceAccess) throws(HMMError) -> UnsafeMutableRawPointer {
        var rounds = 0
        while true {
            var r = ranges[last]
            if a < r.start || a >= r.end {
                guard let k = ranges.firstIndex(where: { $0.start <= a && a < $0.end }) else {
                    throw HMMError(.fault, "device access to \(a), outside every registered range")
                }
                last = k
                r = ranges[k]
            }
            let slot = r.slot(a & ~pageMask)
            let v = slot.pointee.load(ordering: .acquiring)
            if v & AcceleratorContext.valid != 0 && (!access.writes || v & AcceleratorContext.writable != 0) {
                if v & AcceleratorContext.accessed == 0 { slot.pointee.bitwiseOr(AcceleratorContext.accessed, ordering: .relaxed) }
                accesses += 1
                return UnsafeMutableRawPointer(bitPattern: UInt(v & ~AcceleratorContext.flagMask))! + Int(a & pageMask)
            }
            // Bounded, as the mirror driver's write is: a servicer that never makes the page usable
            // fails the kernel instead of wedging it.
            rounds += 1
            if rounds > Self.maximumFaultRounds {
                throw HMMError(.fault, "device access to \(a) made no progress in \(Self.maximumFaultRounds) fault rounds")
            }
            leave()
            defer { enter() }
            try context.fault(a, access, replays: rounds - 1)
        }
    }

    /// Loads a value at `address` (which must not cross a page).
    /// - Throws: `.fault` outside the registered ranges, what servicing the fault throws.
    public func load<T: FixedWidthInteger>(_: T.Type = T.self, at address: UInt64) throws(HMMError) -> T {
        try check(address, MemoryLayout<T>.size)
        return try translate(address, .read).loadUnaligned(as: T.self)
    }

    /// Stores `value` at `address` (which must not cross a page).
    /// - Throws: as ``load(_:at:)``, and `.permission` where the mapping is read-only for good.
    public func store<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws(HMMError) {
        try check(address, MemoryLayout<T>.size)
        try translate(address, .write).storeBytes(of: value, as: T.self)
    }

    /// Atomically adds `value` to the 64-bit word at `address` (8-byte aligned); returns the old value.
    /// Atomic with respect to the other lanes' atomics (a striped lock, as the device's L2 serializes).
    public func atomicAdd(_ value: UInt64, at address: UInt64) throws(HMMError) -> UInt64 {
        guard address & 7 == 0 else { throw HMMError(.invalidArgument, "atomic at \(address) is not 8-byte aligned") }
        let p = try translate(address, .atomic)
        return AtomicStripes.shared.withLock(address) {
            let old = p.load(as: UInt64.self)
            p.storeBytes(of: old &+ value, as: UInt64.self)
            return old
        }
    }

    /// Atomically lowers the 64-bit word at `address` to `value` if it is larger; returns the old value.
    public func atomicMin(_ value: UInt64, at address: UInt64) throws(HMMError) -> UInt64 {
        guard address & 7 == 0 else { throw HMMError(.invalidArgument, "atomic at \(address) is not 8-byte aligned") }
        let p = try translate(address, .atomic)
        return AtomicStripes.shared.withLock(address) {
            let old = p.load(as: UInt64.self)
            if value < old { p.storeBytes(of: value, as: UInt64.self) }
            return old
        }
    }

    /// Atomically reads the 64-bit word at `address` (ordered with the lanes' atomics on it).
    public func atomicLoad(at address: UInt64) throws(HMMError) -> UInt64 {
        guard address & 7 == 0 else { throw HMMError(.invalidArgument, "atomic at \(address) is not 8-byte aligned") }
        let p = try translate(address, .read)
        return AtomicStripes.shared.withLock(address) { p.load(as: UInt64.self) }
    }

    @inline(__always) private func check(_ address: UInt64, _ size: Int) throws(HMMError) {
        guard (address & pageMask) + UInt64(size) <= UInt64(PageSize.base) else {
            throw HMMError(.invalidArgument, "device access at \(address) of \(size) bytes crosses a page")
        }
    }
}

/// Locks for device atomics, striped by address.
final class AtomicStripes: @unchecked Sendable {
    static let shared = AtomicStripes()
    private let locks: UnsafeMutablePointer<Atomic<Bool>>
    private static let count = 256

    init() {
        locks = .allocate(capacity: Self.count)
        for i in 0..<Self.count { (locks + i).initialize(to: Atomic(false)) }
    }

    func withLock<R>(_ address: UInt64, _ body: () -> R) -> R {
        let l = locks + Int((address >> 3) % UInt64(Self.count))
        while l.pointee.exchange(true, ordering: .acquiring) { }
        defer { l.pointee.store(false, ordering: .releasing) }
        return body()
    }
}
