import Synchronization

/// The unmap events the engine causes itself, expected so the event thread does not take them for the
/// user's `munmap` — and so the remapping thread learns whether its call replaced a mapping of the
/// region at all.
///
/// Mapping a device-coherent frame into a region (`mmap(MAP_FIXED)`) and putting a hole back
/// (`mremap(MREMAP_FIXED)`) both replace a registered range, and the host reports that as an UNMAP event
/// of exactly the replaced range — before the call returns, since the caller waits until the event is
/// read. The engine names the range here before the call; the service thread consumes the name as it
/// reads the event (and drops the event); after the call the remapping thread asks ``finish(_:)``
/// whether it was consumed. If not, the call replaced nothing registered: the program had unmapped the
/// address meanwhile, and the remapping is taken back. Lock-free and allocation-free (fixed slots), since
/// the service thread must never wait or allocate.
final class SelfUnmaps: Sendable {
    /// Expectations outstanding at once: each lives from the remapping call until its ``finish(_:)``.
    /// When all are taken a remapping is not attempted (the page stays where it is) — never waited for,
    /// since the event thread may itself be waiting on a page the remapping thread holds.
    static let capacity = 1024
    private let starts: [AtomicWord]
    private let ends: [AtomicWord]
    /// A slot claimed but not yet filled in.
    private static let claimed: UInt64 = 1
    /// A slot whose event the service thread read (no page-aligned range starts here).
    private static let consumed: UInt64 = 2
    /// One past the highest slot ever claimed: lookups scan no further.
    private let used = Atomic<Int>(0)

    init() {
        starts = (0..<Self.capacity).map { _ in AtomicWord() }
        ends = (0..<Self.capacity).map { _ in AtomicWord() }
    }

    /// Expects an UNMAP of exactly `[lo, hi)`; returns the slot, or nil when all are in use.
    func expect(_ lo: UInt64, _ hi: UInt64) -> Int? {
        for k in 0..<Self.capacity
        where starts[k].value.compareExchange(expected: 0, desired: Self.claimed, ordering: .acquiringAndReleasing).exchanged {
            ends[k].value.store(hi, ordering: .relaxed)
            starts[k].value.store(lo, ordering: .releasing)
            var seen = used.load(ordering: .relaxed)
            while seen <= k {
                let (done, now) = used.compareExchange(expected: seen, desired: k + 1, ordering: .acquiringAndReleasing)
                if done { break }
                seen = now
            }
            return k
        }
        return nil
    }

    /// The call failed and sent no event: forget the expectation.
    func cancel(_ slot: Int) { starts[slot].value.store(0, ordering: .releasing) }

    /// Ends the expectation of `slot`: whether its event was read (the call replaced the region's
    /// mapping). Call after the remapping returned and the service thread finished that read
    /// (`waitForReader`).
    func finish(_ slot: Int) -> Bool {
        let lo = starts[slot].value.load(ordering: .acquiring)
        if lo == Self.consumed {
            starts[slot].value.store(0, ordering: .releasing)
            return true
        }
        // Not read: forget it, unless the service thread consumes it this instant.
        if starts[slot].value.compareExchange(expected: lo, desired: 0, ordering: .acquiringAndReleasing).exchanged { return false }
        starts[slot].value.store(0, ordering: .releasing)
        return true
    }

    /// Whether the UNMAP of `[lo, hi)` was expected (the service thread, as it reads it: the slot is
    /// then marked consumed for its ``finish(_:)``).
    func consume(_ lo: UInt64, _ hi: UInt64) -> Bool {
        for k in 0..<used.load(ordering: .acquiring) where starts[k].value.load(ordering: .acquiring) == lo && ends[k].value.load(ordering: .relaxed) == hi {
            if starts[k].value.compareExchange(expected: lo, desired: Self.consumed, ordering: .acquiringAndReleasing).exchanged { return true }
        }
        return false
    }
}

/// An atomic word on the heap, so that a fixed set of them can sit in an array.
private final class AtomicWord: Sendable {
    let value = Atomic<UInt64>(0)
}
