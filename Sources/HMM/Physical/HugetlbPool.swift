import Synchronization

/// The hugetlb pool (`mm/hugetlb.c`): 2 MiB pages set aside at boot, handed out only to `MAP_HUGETLB`
/// mappings. A private mapping reserves its pages at `mmap` time so that a later fault cannot fail;
/// unreserved allocations (copy-on-write after fork) may.
final class HugetlbPool: @unchecked Sendable {
    private struct State {
        var free: [PFN]
        var reserved: Int
    }
    private let state: Locked<State>
    /// Pages in the pool.
    let totalPages: Int

    init(pages: [PFN]) {
        totalPages = pages.count
        state = Locked(State(free: pages, reserved: 0))
    }

    /// Free pages (`HugePages_Free`).
    var freePages: Int { state.withLock { $0.free.count } }
    /// Reserved, not yet faulted pages (`HugePages_Rsvd`).
    var reservedPages: Int { state.withLock { $0.reserved } }

    /// Reserves `count` pages; false if fewer than that are free and unreserved.
    func reserve(_ count: Int) -> Bool {
        state.withLock { s in
            guard s.free.count - s.reserved >= count else { return false }
            s.reserved += count
            return true
        }
    }

    func unreserve(_ count: Int) {
        state.withLock { s in
            precondition(s.reserved >= count, "hugetlb reservation underflow")
            s.reserved -= count
        }
    }

    /// Takes a page, consuming a reservation if `reserved`.
    func take(reserved: Bool) -> PFN? {
        state.withLock { s in
            if reserved {
                precondition(s.reserved > 0 && !s.free.isEmpty, "hugetlb reservation without a page")
                s.reserved -= 1
                return s.free.removeLast()
            }
            guard s.free.count > s.reserved else { return nil }
            return s.free.removeLast()
        }
    }

    func give(_ pfn: PFN) {
        state.withLock { $0.free.append(pfn) }
    }

    func contains(free pfn: PFN) -> Bool { state.withLock { $0.free.contains(pfn) } }
}
