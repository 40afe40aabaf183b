import Synchronization

/// Turns the rmap owners of a page — an ``AnonVMA`` or a ``MemoryFile`` — into a 64-bit word that fits
/// in a frame record (the kernel stores a tagged pointer in `page->mapping`).
///
/// A word is `slot << 25 | generation << 1 | anon`. Slots hold weak references and are reused with a
/// new generation, so a stale word left in a frame (a page still pinned after its mapping is gone)
/// resolves to `nil` instead of to an unrelated owner.
final class MappingRegistry: @unchecked Sendable {
    private struct Slot {
        weak var object: AnyObject?
        var generation: UInt64
    }
    private let state = Locked<(slots: [Slot], free: [Int])>((slots: [], free: []))

    func register(_ object: AnyObject, anon: Bool) -> UInt64 {
        state.withLock { s in
            let index: Int
            if let f = s.free.popLast() {
                index = f
                s.slots[index].generation = (s.slots[index].generation + 1) & 0xFF_FFFF
                s.slots[index].object = object
            } else {
                index = s.slots.count
                s.slots.append(Slot(object: object, generation: 1))
            }
            return UInt64(index + 1) << 25 | s.slots[index].generation << 1 | (anon ? 1 : 0)
        }
    }

    func unregister(_ word: UInt64) {
        state.withLock { s in
            let index = Int(word >> 25) - 1
            guard index >= 0, index < s.slots.count, s.slots[index].generation == (word >> 1) & 0xFF_FFFF else { return }
            s.slots[index].object = nil
            s.free.append(index)
        }
    }

    func lookup(_ word: UInt64) -> AnyObject? {
        // The owners are thread-safe classes; the lock only guards the slot table.
        nonisolated(unsafe) var found: AnyObject?
        state.withLock { s in
            let index = Int(word >> 25) - 1
            guard index >= 0, index < s.slots.count, s.slots[index].generation == (word >> 1) & 0xFF_FFFF else {
                return
            }
            found = s.slots[index].object
        }
        return found
    }
}

/// The anonymous rmap root (`struct anon_vma`): every VMA whose anonymous pages it owns, across fork
/// (parent and child share it) and mremap (the VMA keeps its `pgoff`, so a page's linear index still
/// locates it). Simplified from the kernel's anon_vma chains: a child's new pages are attributed to the
/// shared root, which costs an rmap walk a few extra candidate VMAs but never a wrong answer, because
/// every candidate is verified against the page table.
final class AnonVMA: @unchecked Sendable {
    private(set) var handle: UInt64 = 0
    private let registry: MappingRegistry
    private let members = SpaceSet()
    /// Whether a page was ever attached (the kernel allocates the `anon_vma` on a VMA's first
    /// anonymous page, `anon_vma_prepare`; until then the VMA has none, and merges more freely).
    private let attachedFlag = Atomic<Bool>(false)

    /// True once a page has been attached (``Machine/setAnonRmap(_:anonVMA:index:exclusive:)``).
    var isAttached: Bool { attachedFlag.load(ordering: .relaxed) }

    /// Records that a page was attached; cheap when already set.
    @inline(__always) func attach() {
        if !attachedFlag.load(ordering: .relaxed) { attachedFlag.store(true, ordering: .relaxed) }
    }

    init(registry: MappingRegistry) {
        self.registry = registry
        handle = registry.register(self, anon: true)
    }

    deinit { registry.unregister(handle) }

    func addMember(_ space: AddressSpace) { members.insert(space) }

    var spaces: [AddressSpace] { members.spaces }
}

/// Reservation state of a private hugetlb mapping (the kernel's `resv_map`): which 2 MiB slots, by
/// linear index, have consumed their reservation. Shared by the pieces of a split VMA.
final class HugetlbReservation: @unchecked Sendable {
    private let consumed = Locked<Set<UInt64>>([])

    /// Marks `slot` consumed; true if it still held its reservation.
    func consume(_ slot: UInt64) -> Bool { consumed.withLock { $0.insert(slot).inserted } }
}

/// The address spaces that joined an rmap owner, held weakly (an exited or freed space drops out).
final class SpaceSet: @unchecked Sendable {
    private let members = Locked<[WeakBox<AddressSpace>]>([])

    func insert(_ space: AddressSpace) {
        members.withLock { m in
            if m.contains(where: { $0.object === space }) { return }
            m.removeAll { $0.object == nil }
            m.append(WeakBox(space))
        }
    }

    var spaces: [AddressSpace] { members.withLock { $0.compactMap { $0.object } } }
}
