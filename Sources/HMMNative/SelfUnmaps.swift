import Synchronization

/// The unmap events the engine causes itself, expected so the event thread does not take them for the
/// user's `munmap`.
///
/// Mapping a device-coherent frame into a region (`mmap(MAP_FIXED)`) and putting a hole back
/// (`mremap(MREMAP_FIXED)`) both replace a registered range, and the host reports that as an UNMAP event
/// of exactly the replaced range. The engine names the range here before the call and the event thread
/// consumes the name when the event arrives. Lock-free and allocation-free (fixed slots), since a
/// zap can be applied in any thread, an in-thread fault's signal handler included.
final class SelfUnmaps: Sendable {
    /// Expectations outstanding at once: each lives from the remapping call until the event thread
    /// handles its event, so this bounds how far the event thread may lag behind remappings. When all
    /// are taken a remapping is not attempted (the page stays where it is) — never waited for, since the
    /// event thread may itself be waiting on a page the remapping thread holds.
    static let capacity = 1024
    private let starts: [AtomicWord]
    private let ends: [AtomicWord]
    /// A slot claimed but not yet filled in.
    private static let claimed: UInt64 = 1
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

    /// Whether the UNMAP of `[lo, hi)` was expected (it is then consumed).
    func consume(_ lo: UInt64, _ hi: UInt64) -> Bool {
        for k in 0..<used.load(ordering: .acquiring) where starts[k].value.load(ordering: .acquiring) == lo && ends[k].value.load(ordering: .relaxed) == hi {
            if starts[k].value.compareExchange(expected: lo, desired: 0, ordering: .acquiringAndReleasing).exchanged { return true }
        }
        return false
    }
}

/// An atomic word on the heap, so that a fixed set of them can sit in an array.
private final class AtomicWord: Sendable {
    let value = Atomic<UInt64>(0)
}
