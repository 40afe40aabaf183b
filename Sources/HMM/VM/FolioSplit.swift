import Synchronization

/// Splitting a large folio that is mapped by PTEs in several page tables (or spaces): the way the
/// device-private THP series settled it (seed 003) — unmap every mapping to a migration entry, freeze the
/// refcount, split the metadata (telling the driver through `folioSplit`), restore the entries. No path
/// splits a folio while anything can still reach it through a mapping.
extension Machine {
    /// Rewrites the metadata of a large folio whose refcount is frozen (or that nothing can reach) as
    /// order-0 folios: each page keeps its anon, anon-exclusive, dirty and young bits and its pagemap slot,
    /// gets `refs(page)` references and the lock where `locked(page)`; the driver of a device folio hears
    /// of every new folio (`folioSplit`). Pages left with no reference are the caller's to free.
    func splitFrozenFolio(_ head: PFN, order: Int, refs: (PFN) -> Int32, locked: (PFN) -> Bool) {
        for i in 0..<(1 << order) {
            let p = head + i
            let r = frames.record(p)
            let old = r.pointee.flags.load(ordering: .relaxed)
            var keep = FrameFlags(rawValue: old).intersection([.anon, .anonExclusive, .dirty, .young])
            if locked(p) { keep.insert(.locked) }
            let n = refs(p)
            r.pointee.flags.store((n > 0 ? keep.rawValue : 0) | old & FrameFlags.pagemapMask, ordering: .relaxed)
            if n == 0 {
                r.pointee.mapping.store(0, ordering: .relaxed)
                r.pointee.index.store(0, ordering: .relaxed)
            }
            r.pointee.refcount.store(n, ordering: .releasing)
        }
        if let ops = pagemap(of: head)?.ops {
            for i in 1..<(1 << order) { ops.folioSplit(head: head, tail: head + i) }
            ops.folioSplit(head: head, tail: nil)
        }
        statistics.count(.thpSplitFolio)
    }

    /// Gives back an order-0 page a split left without references (device pages through `folioFree`).
    func freeSplitPage(_ p: PFN) {
        if let pm = pagemap(of: p) {
            releaseDeviceFrame(p, pm)
        } else {
            frames.record(p).pointee.flags.store(0, ordering: .relaxed)
            allocator.free(p, order: 0)
        }
    }

    /// Splits the large anonymous folio `head` into order-0 folios. The caller holds the folio lock and
    /// `extra` references; afterwards both sit on `keep` (default: the head), and the caller still owns
    /// and drops them. Requires no page-table lock held (it walks the reverse map). PMD mappings are split
    /// into PTEs first. Returns false — every mapping restored, nothing split — if an unexplained
    /// reference (a pin) shows up.
    func splitFolioEverywhere(_ head: PFN, extra: Int32, keep: PFN? = nil) -> Bool {
        let order = frames.order(head)
        guard order > 0, frames.flags(head).contains(.anon), !frames.flags(head).contains(.hugetlb) else { return false }
        let n = 1 << order
        let holder = keep.map { $0 >= head && $0 < head + n ? $0 : head } ?? head
        // 1. PMD mappings become PTE mappings; every PTE mapping becomes a migration entry.
        forEachCandidate(of: head) { space, _, a in
            guard a & PageSize.pmdMask == 0, let pmdN = try? space.pmdNode(a, allocate: false), pmdN != 0 else { return }
            let pmd = PageTableEntry(rawValue: space.pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
            if pmd.pfn == head && pmd.isHuge && (pmd.isLeaf || pmd.isDevicePrivate) { space.splitHugePMD(pmdN, a) }
        }
        // Each space's notifiers hear `clear` first. Device-private pages are never pinned; a pinned RAM
        // page keeps its mapping (and fails the freeze below).
        for i in 0..<n { _ = tryToMigrate(head + i) }
        // 2. Freeze: only the caller's references may be left.
        let frozen = totalMapcount(head) == 0
            && frames.record(head).pointee.refcount.compareExchange(
                expected: extra, desired: 0, ordering: .acquiringAndReleasing).exchanged
        if !frozen {
            for i in 0..<n { removeMigrationEntries(head + i, head + i) }
            return false
        }
        // 3. Split the metadata: the caller's lock and references on `holder`, and one hold on every page
        //    while its entries come back, so none is freed half-way.
        let locked = frames.flags(head).contains(.locked)
        splitFrozenFolio(head, order: order, refs: { 1 + ($0 == holder ? extra : 0) }, locked: { locked && $0 == holder })
        // 4. Restore every entry as a mapping of its own small folio, then drop the holds.
        for i in 0..<n { removeMigrationEntries(head + i, head + i) }
        for i in 0..<n {
            let p = head + i
            let left = frames.record(p).pointee.refcount.wrappingSubtract(1, ordering: .acquiringAndReleasing).newValue
            if left == 0 {
                frames.record(p).pointee.mapping.store(0, ordering: .relaxed)
                frames.record(p).pointee.index.store(0, ordering: .relaxed)
                freeSplitPage(p)
            }
        }
        return true
    }
}
