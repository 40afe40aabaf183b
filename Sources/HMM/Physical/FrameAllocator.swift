import Synchronization

/// The buddy allocator for system RAM (`mm/page_alloc.c`): free blocks of order 0…9 on per-order lists
/// linked through the free frames' own records, merged with their buddy on free.
///
/// Thread-safe: one `Locked` pthread mutex guards the lists (about 11 ns uncontended here). The
/// allocator hands out frames with undefined contents; callers that map them into a process zero them.
final class FrameAllocator: @unchecked Sendable {
    static let maxOrder = PageSize.pmdOrder
    private static let nilLink = UInt64.max

    private struct FreeLists {
        var heads: [UInt64]
        var freeFrames: Int
    }

    private let table: FrameTable
    let firstPFN: UInt64
    let frameCount: Int
    private let lists: Locked<FreeLists>

    init(table: FrameTable, first: UInt64, count: Int) {
        self.table = table
        self.firstPFN = first
        self.frameCount = count
        lists = Locked(FreeLists(heads: Array(repeating: Self.nilLink, count: Self.maxOrder + 1), freeFrames: 0))
        // Carve the range into the largest naturally aligned blocks.
        var pfn = first
        let end = first + UInt64(count)
        lists.withLock { state in
            while pfn < end {
                var order = Self.maxOrder
                while order > 0 && (pfn & ((1 << UInt64(order)) - 1) != 0 || pfn + (1 << UInt64(order)) > end) {
                    order -= 1
                }
                push(&state, pfn, order)
                state.freeFrames += 1 << order
                pfn += 1 << UInt64(order)
            }
        }
    }

    /// Frames currently free.
    var freeFrames: Int { lists.withLock { $0.freeFrames } }

    /// Allocates a naturally aligned block of `1 << order` frames, or `nil` when none is free.
    func allocate(order: Int) -> PFN? {
        precondition(order >= 0 && order <= Self.maxOrder, "order \(order) out of range")
        return lists.withLock { state -> PFN? in
            var k = order
            while k <= Self.maxOrder && state.heads[k] == Self.nilLink { k += 1 }
            guard k <= Self.maxOrder else { return nil }
            let pfn = state.heads[k]
            remove(&state, pfn, k)
            // Split down, returning the upper halves.
            while k > order {
                k -= 1
                push(&state, pfn + (1 << UInt64(k)), k)
            }
            state.freeFrames -= 1 << order
            let r = table.record(PFN(pfn))
            r.pointee.flags.store(UInt64(order) << FrameFlags.orderShift, ordering: .relaxed)
            r.pointee.mapping.store(0, ordering: .relaxed)
            r.pointee.index.store(0, ordering: .relaxed)
            return PFN(pfn)
        }
    }

    /// Returns a block to the allocator and merges it with free buddies.
    /// - Precondition: the block is allocated, its refcount and mapcounts are zero.
    func free(_ block: PFN, order: Int) {
        lists.withLock { state in
            var pfn = block.rawValue
            var order = order
            state.freeFrames += 1 << order
            while order < Self.maxOrder {
                let buddy = ((pfn - firstPFN) ^ (1 << UInt64(order))) + firstPFN
                guard buddy + (1 << UInt64(order)) <= firstPFN + UInt64(frameCount) else { break }
                let bf = table.record(PFN(buddy)).pointee.flags.load(ordering: .relaxed)
                guard bf & FrameFlags.buddy.rawValue != 0,
                    Int((bf & FrameFlags.orderMask) >> FrameFlags.orderShift) == order
                else { break }
                remove(&state, buddy, order)
                table.record(PFN(buddy)).pointee.flags.store(0, ordering: .relaxed)
                pfn = min(pfn, buddy)
                order += 1
            }
            push(&state, pfn, order)
        }
    }

    /// Visits every free block (for the invariant checker). Holds the allocator lock while visiting.
    func forEachFreeBlock(_ body: (UInt64, Int) -> Void) {
        lists.withLock { state in
            for order in 0...Self.maxOrder {
                var p = state.heads[order]
                while p != Self.nilLink {
                    body(p, order)
                    p = table.record(PFN(p)).pointee.mapping.load(ordering: .relaxed)
                }
            }
        }
    }

    private func push(_ state: inout FreeLists, _ pfn: UInt64, _ order: Int) {
        let r = table.record(PFN(pfn))
        r.pointee.flags.store(FrameFlags.buddy.rawValue | UInt64(order) << FrameFlags.orderShift, ordering: .relaxed)
        r.pointee.refcount.store(0, ordering: .relaxed)
        r.pointee.mapping.store(state.heads[order], ordering: .relaxed)
        r.pointee.index.store(Self.nilLink, ordering: .relaxed)
        if state.heads[order] != Self.nilLink {
            table.record(PFN(state.heads[order])).pointee.index.store(pfn, ordering: .relaxed)
        }
        state.heads[order] = pfn
    }

    private func remove(_ state: inout FreeLists, _ pfn: UInt64, _ order: Int) {
        let r = table.record(PFN(pfn))
        let next = r.pointee.mapping.load(ordering: .relaxed)
        let prev = r.pointee.index.load(ordering: .relaxed)
        if prev == Self.nilLink {
            state.heads[order] = next
        } else {
            table.record(PFN(prev)).pointee.mapping.store(next, ordering: .relaxed)
        }
        if next != Self.nilLink {
            table.record(PFN(next)).pointee.index.store(prev, ordering: .relaxed)
        }
        r.pointee.flags.store(0, ordering: .relaxed)
    }
}
