import Synchronization

/// The lockless GUP walk (`gup_fast`, `mm/gup.c`).
///
/// It holds no `mmapLock` and no page-table lock. What keeps it safe:
/// - it runs inside an ``Epoch`` critical section, and every page-table node that was reachable is
///   retired through that epoch rather than freed, so each node it reads stays a node of this space's
///   tree (or an emptied one) until it leaves; P2PDMA frames go back to their pool the same way;
/// - it takes a *speculative* reference (`folio_try_get`: only if the refcount is not 0, so a frame
///   being freed is never resurrected), then re-reads the PMD and PTE and gives the reference back if
///   either changed — a page that was unmapped, migrated or split meanwhile is never returned;
/// - the checks that need the reference held (P2PDMA without the flag — as in `try_grab_folio()` in
///   `mm/gup.c`, so GUP-fast cannot race an unbind that frees the pagemap; pins that must unshare;
///   long-term pins of coherent memory) run after it is taken.
extension AddressSpace {
    /// Takes as many pages from `address` on as it can without locks, appending them to `pfns`; stops at
    /// the first page it cannot take. Never faults, never sleeps.
    func gupFast(_ address: UInt64, count: Int, flags: GUPFlags, into pfns: inout [PFN]) {
        machine.epoch.withCriticalSection {
            guard !hasExitedForWalker else { return }
            var a = address
            while pfns.count < count, let pfn = grabFast(a, flags: flags) {
                pfns.append(pfn)
                a += UInt64(PageSize.base)
            }
        }
    }

    /// One page: the walk, the speculative reference and the re-check.
    @inline(__always)
    private func grabFast(_ a: UInt64, flags: GUPFlags) -> PFN? {
        let pgd = PageTableEntry(rawValue: (pool.entries(pgdNode) + PageTableIndex.pgd(a)).pointee.load(ordering: .acquiring))
        guard pgd.isTable else { return nil }
        let pud = PageTableEntry(rawValue: (pool.entries(pgd.node) + PageTableIndex.pud(a)).pointee.load(ordering: .acquiring))
        guard pud.isTable else { return nil }
        let pmdSlot = pool.entries(pud.node) + PageTableIndex.pmd(a)
        let pmd = PageTableEntry(rawValue: pmdSlot.pointee.load(ordering: .acquiring))
        let leafSlot: UnsafeMutablePointer<Atomic<UInt64>>
        let pfn: PFN
        let e: PageTableEntry
        if pmd.isTable {
            leafSlot = pool.entries(pmd.node) + PageTableIndex.pte(a)
            e = PageTableEntry(rawValue: leafSlot.pointee.load(ordering: .acquiring))
            guard e.isLeaf, !e.isHuge else { return nil }
            pfn = e.pfn
        } else if pmd.isLeaf {
            leafSlot = pmdSlot
            e = pmd
            pfn = e.pfn + PageTableIndex.pte(a)
        } else {
            return nil
        }
        guard e.isUser, !e.isSpecial, !flags.contains(.write) || e.isWritable else { return nil }
        #if DEBUG
        machine.hooks.fire(.gupFastAfterReadEntry)
        #endif
        let head = frames.head(of: pfn)
        guard machine.tryGetFolio(head) else { return nil }
        // From here the folio cannot be freed under us; everything else is re-validated.
        let headFlags = frames.flags(head)
        let kind = machine.deviceKind(pfn)
        var ok = frames.head(of: pfn) == head && !headFlags.contains(.zero)
        ok = ok && (kind != .pciP2PDMA || flags.contains(.pciP2PDMA))
        ok = ok && (kind != .deviceCoherent || !flags.contains(.longTerm))
        if ok && flags.contains(.pin) && !flags.contains(.write) {
            // `gup_must_unshare` without the VMA: a long-term pin of a non-anonymous page falls back.
            ok = !mustUnshare(e, pfn, nil, longTerm: flags.contains(.longTerm))
        }
        ok = ok && pmdSlot.pointee.load(ordering: .acquiring) == pmd.rawValue
        ok = ok && leafSlot.pointee.load(ordering: .acquiring) == e.rawValue
        guard ok else {
            machine.putFolio(head)
            return nil
        }
        // Turn the speculative reference into what the caller asked for.
        var units: Int32 = 1
        if flags.contains(.pin) {
            if frames.order(head) > 0 {
                frames.record(head + 1).pointee.refcount.wrappingAdd(1, ordering: .relaxed)
            } else {
                machine.getFolio(head, Machine.pinBias - 1)
                units = Machine.pinBias
            }
        }
        machine.externalReferences.wrappingAdd(Int(units), ordering: .relaxed)
        return pfn
    }
}
