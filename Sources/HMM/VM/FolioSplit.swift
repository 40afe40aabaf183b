import Synchronization

/// Splitting a large folio that is mapped by PTEs in several page tables (or spaces): the way the
/// device-private THP series settled it (seed 003) — unmap every mapping to a migration entry, freeze the
/// refcount, split the metadata (telling the driver through `folioSplit`), restore the entries. No path
/// splits a folio while anything can still reach it through a mapping.
extension Machine {
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
        forEachCandidate(of: head) { space, a in
            guard a & PageSize.pmdMask == 0, let pmdN = try? space.pmdNode(a, allocate: false), pmdN != 0 else { return }
            let pmd = PageTableEntry(rawValue: space.pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
            if pmd.pfn == head && pmd.isHuge && (pmd.isLeaf || pmd.isDevicePrivate) { space.splitHugePMD(pmdN, a) }
        }
        for i in 0..<n {
            let p = head + i
            forEachCandidate(of: p) { space, a in
                space.withLockedPTE(a) { slot, e in
                    let mapping = e.isPresent ? !e.isSpecial : e.isDevicePrivate || e.kind == .deviceExclusive
                    guard mapping, e.pfn == p else { return }
                    // Device-private pages are never pinned; a pinned RAM page keeps its mapping (and
                    // fails the freeze below).
                    _ = unmapForMigration(slot, e, p)
                }
            }
        }
        // 2. Freeze: only the caller's references may be left.
        let frozen = totalMapcount(head) == 0
            && frames.record(head).pointee.refcount.compareExchange(
                expected: extra, desired: 0, ordering: .acquiringAndReleasing).exchanged
        if !frozen {
            for i in 0..<n { removeMigrationEntries(head + i, head + i) }
            return false
        }
        // 3. Split the metadata: order-0 folios, the caller's lock and references on `holder`.
        let locked = frames.flags(head).contains(.locked)
        for i in 0..<n {
            let p = head + i
            let r = frames.record(p)
            let old = r.pointee.flags.load(ordering: .relaxed)
            var keepFlags = FrameFlags(rawValue: old).intersection([.anon, .anonExclusive, .dirty, .young])
            if p == holder && locked { keepFlags.insert(.locked) }
            r.pointee.flags.store(keepFlags.rawValue | old & FrameFlags.pagemapMask, ordering: .relaxed)
            // Hold each page while its entries come back, so none is freed half-way.
            r.pointee.refcount.store(1 + (p == holder ? extra : 0), ordering: .releasing)
        }
        let pm = pagemap(of: head)
        if let ops = pm?.ops {
            for i in 1..<n { ops.folioSplit(head: head, tail: head + i) }
            ops.folioSplit(head: head, tail: nil)
        }
        // 4. Restore every entry as a mapping of its own small folio, then drop the holds.
        for i in 0..<n { removeMigrationEntries(head + i, head + i) }
        for i in 0..<n {
            let p = head + i
            let left = frames.record(p).pointee.refcount.wrappingSubtract(1, ordering: .acquiringAndReleasing).newValue
            guard left == 0 else { continue }
            frames.record(p).pointee.mapping.store(0, ordering: .relaxed)
            frames.record(p).pointee.index.store(0, ordering: .relaxed)
            if let pm { releaseDeviceFrame(p, pm) } else {
                frames.record(p).pointee.flags.store(0, ordering: .relaxed)
                allocator.free(p, order: 0)
            }
        }
        statistics.count(.thpSplitFolio)
        return true
    }
}
