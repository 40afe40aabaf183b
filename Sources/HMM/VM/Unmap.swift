/// `munmap` and the zap machinery shared by unmap, `MADV_DONTNEED` and exit (`mm/memory.c` zap_*).
extension AddressSpace {
    /// Removes mappings in `[address, address + length)` (`munmap`). Unmapped parts of the range are
    /// fine. Every page the range held loses its mapping reference; frames whose last reference goes
    /// return to the allocator.
    /// - Throws: `.invalidArgument` (unaligned address, zero or overflowing length, a boundary inside a
    ///   hugetlb page), `.noProcess` after exit. On error nothing changes.
    /// Takes `mmapLock` for writing.
    public func unmap(_ address: UInt64, length: Int) throws(HMMError) {
        let (lo, hi) = try validateRange(address, length, "munmap")
        mmapLock.writeLock()
        defer { mmapLock.unlock() }
        try checkAlive()
        try checkHugetlbBoundaries(lo, hi)
        rmapLock.withWriteLock { unmapLocked(lo, hi) }
        // What this retired comes back now unless a lockless walker is inside (then a later collect).
        machine.epoch.collect()
    }

    /// Checks alignment and overflow of a user range; returns `[lo, hi)` with `hi` page-rounded.
    func validateRange(_ address: UInt64, _ length: Int, _ what: String) throws(HMMError) -> (UInt64, UInt64) {
        guard address & PageSize.baseMask == 0 else { throw .invalid("\(what): address \(hex(address)) is not page-aligned") }
        guard length > 0 else { throw .invalid("\(what): length \(length) must be positive") }
        let len = (UInt64(length) + PageSize.baseMask) & ~PageSize.baseMask
        guard address < PageTableIndex.userTop, len <= PageTableIndex.userTop - address else {
            throw .invalid("\(what): range \(hex(address))+\(length) overflows user space")
        }
        return (address, address + len)
    }

    /// hugetlb VMAs may only be cut at 2 MiB boundaries.
    func checkHugetlbBoundaries(_ lo: UInt64, _ hi: UInt64) throws(HMMError) {
        for b in [lo, hi] {
            if let i = vmaIndex(containing: b), vmas[i].isHugetlb, vmas[i].start < b, b & PageSize.pmdMask != 0 {
                throw .invalid("\(hex(b)) splits a hugetlb page")
            }
        }
    }

    /// Requires `mmapLock` and `rmapLock` held for writing.
    func unmapLocked(_ lo: UInt64, _ hi: UInt64) {
        let started = notifiers.start(NotifierRange(space: self, start: lo, end: hi, event: .unmap, owner: nil, blockable: true))
        defer { notifiers.end(started) }
        splitVMA(at: lo)
        splitVMA(at: hi)
        let i = firstVMA(endingAfter: lo)
        while i < vmas.count && vmas[i].start < hi {
            let v = vmas[i]
            zapVMA(v, v.start, v.end)
            releaseReservations(v, v.start, v.end)
            closeVMA(v)
            vmas.remove(at: i)
        }
        freeEmptyTables(lo, hi)
    }

    /// Clears every entry of `vma` in `[lo, hi)` and drops what the entries held (`unmap_page_range`).
    /// A huge PMD only partly inside is split first. Requires `mmapLock` held for writing (or exit).
    func zapVMA(_ vma: VMA, _ lo: UInt64, _ hi: UInt64) {
        guard root != 0 else { return }
        forEachPMDStep(lo, hi) { a, pmdEnd, pmdN in
            let pmd = PageTableEntry(rawValue: pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
            if pmd.isNone { return true }
            if pmd.isTable {
                zapPTEs(pmd.node, a, pmdEnd)
                return true
            }
            if a & PageSize.pmdMask == 0 && pmdEnd - a == UInt64(PageSize.pmd) {
                zapHugePMD(pmdN, a)
                return true
            }
            splitHugePMD(pmdN, a)
            return false
        }
    }

    /// `zap_huge_pmd`.
    func zapHugePMD(_ pmdN: UInt32, _ address: UInt64) {
        let slot = pmdSlot(pmdN, address)
        let lock = pool.lock(pmdN)
        lock.lock()
        let e = PageTableEntry(rawValue: slot.pointee.exchange(0, ordering: .acquiringAndReleasing))
        lock.unlock()
        if e.isNonPresent && e.isHuge {
            // A device-private PMD is a mapping (rmap + reference); a PMD migration entry holds nothing.
            pool.releaseDeposit()
            if e.isDevicePrivate {
                machine.addEntireMapcount(e.pfn, -1)
                machine.putFolio(e.pfn)
            }
            return
        }
        guard e.isLeaf else { return }
        let hugetlb = frames.flags(e.pfn).contains(.hugetlb)
        if !hugetlb { pool.releaseDeposit() }
        if e.isSpecial { return }
        if e.isDirty { frames.setFlags(e.pfn, .dirty) }
        machine.addEntireMapcount(e.pfn, -1)
        machine.putFolio(e.pfn)
    }

    /// `zap_pte_range`. Large folios that lose some of their mappings are split when this table holds
    /// all that is left of them (the kernel queues them for deferred split instead).
    func zapPTEs(_ pteN: UInt32, _ lo: UInt64, _ hi: UInt64) {
        let lock = pool.lock(pteN)
        let ptes = pool.entries(pteN)
        var partial: [PFN] = []
        lock.lock()
        var a = lo
        while a < hi {
            let i = PageTableIndex.pte(a)
            a += UInt64(PageSize.base)
            let e = PageTableEntry(rawValue: ptes[i].load(ordering: .relaxed))
            if e.isNone { continue }
            ptes[i].store(0, ordering: .releasing)
            if e.isDevicePrivate || e.kind == .deviceExclusive {
                // The entry is a mapping: drop its rmap and reference (the last one frees a device page
                // through `folioFree`). A large device folio losing part of its mappings is split below.
                let head = frames.head(of: e.pfn)
                if frames.order(head) > 0, !partial.contains(head), partial.count < 8 {
                    machine.getFolio(head)
                    partial.append(head)
                }
                machine.addPageMapcount(e.pfn, -1)
                machine.putFolio(head)
                continue
            }
            guard e.isPresent, !e.isSpecial else { continue }
            let head = frames.head(of: e.pfn)
            if e.isDirty { frames.setFlags(head, .dirty) }
            if head != e.pfn || frames.order(head) > 0, !partial.contains(head), partial.count < 8 {
                machine.getFolio(head)
                partial.append(head)
            }
            machine.addPageMapcount(e.pfn, -1)
            machine.putFolio(head)
        }
        for head in partial {
            _ = trySplitFolio(head, inTable: pteN, extra: 1)
            machine.putFolio(head)
        }
        lock.unlock()
    }
}
