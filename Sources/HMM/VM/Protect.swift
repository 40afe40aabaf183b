/// `mprotect` (`mm/mprotect.c`).
extension AddressSpace {
    /// Changes the protection of `[address, address + length)` (`mprotect`). VMAs are split at the
    /// boundaries; present entries lose write permission (or all access for `PROT_NONE`) at once, and
    /// regain write permission only where that is safe without a fault (anon-exclusive or shared pages).
    /// A huge PMD only partly inside is split.
    /// - Throws: `.invalidArgument` (unaligned, zero length, unknown bits, a cut inside a hugetlb page),
    ///   `.outOfMemory` if part of the range is not mapped, `.noProcess` after exit. On error nothing
    ///   changes.
    /// Takes `mmapLock` for writing.
    public func protect(_ address: UInt64, length: Int, _ protection: Protection) throws(HMMError) {
        let (lo, hi) = try validateRange(address, length, "mprotect")
        guard protection.rawValue & ~7 == 0 else { throw .invalid("unknown protection bits \(protection.rawValue)") }
        mmapLock.writeLock()
        defer { mmapLock.unlock() }
        try checkAlive()
        try checkFullyMapped(lo, hi, "mprotect")
        try checkHugetlbBoundaries(lo, hi)
        invalidating(lo, hi, .protectionVMA) { rmapLock.withWriteLock {
            splitVMA(at: lo)
            splitVMA(at: hi)
            var i = firstVMA(endingAfter: lo)
            while i < vmas.count && vmas[i].start < hi {
                vmas[i].protection = protection
                changeProtection(vmas[i])
                i += 1
            }
            mergeVMAs(around: lo, hi)
        } }
    }

    /// `.outOfMemory` if some page of `[lo, hi)` has no VMA (what mprotect and madvise return).
    func checkFullyMapped(_ lo: UInt64, _ hi: UInt64, _ what: String) throws(HMMError) {
        var a = lo
        var i = firstVMA(endingAfter: lo)
        while a < hi {
            guard i < vmas.count, vmas[i].start <= a else {
                throw HMMError(.outOfMemory, "\(what): \(hex(a)) is not mapped")
            }
            a = vmas[i].end
            i += 1
        }
    }

    /// `change_protection` over a whole VMA whose `protection` was just set.
    func changeProtection(_ vma: VMA) {
        let user = vma.accessible
        forEachPMDStep(vma.start, vma.end) { a, pmdEnd, pmdN in
            let slot = pmdSlot(pmdN, a)
            let pmd = PageTableEntry(rawValue: slot.pointee.load(ordering: .acquiring))
            if pmd.isLeaf || (pmd.isNonPresent && pmd.isHuge) {
                if a & PageSize.pmdMask != 0 || pmdEnd - a != UInt64(PageSize.pmd) {
                    splitHugePMD(pmdN, a)
                    return false
                }
                let lock = pool.lock(pmdN)
                lock.lock()
                let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
                slot.pointee.store(newProtection(e, vma, user).rawValue, ordering: .relaxed)
                lock.unlock()
            } else if pmd.isTable {
                forEachPTE(pmd.node, a, pmdEnd) { slot, e in
                    if !e.isNone { slot.pointee.store(newProtection(e, vma, user).rawValue, ordering: .relaxed) }
                }
            }
            return true
        }
    }

    /// One entry under a new protection (`change_pte_range`, `change_softleaf_pte`).
    private func newProtection(_ e: PageTableEntry, _ vma: VMA, _ user: Bool) -> PageTableEntry {
        switch e.kind {
        case .present:
            var writable = false
            // `can_change_pte_writable`: not while soft-dirty tracking must see the next write.
            let tracking = !vma.flags.contains(.softDirty) && !e.isSoftDirty
            if vma.writable && user && !e.isSpecial && !tracking {
                let f = frames.flags(e.pfn)
                let head = frames.head(of: e.pfn)
                // `can_change_pte_writable`: only where no write fault would do more than set the bit.
                writable = f.contains(.anon)
                    ? (f.contains(.anonExclusive) || frames.flags(head).contains(.hugetlb) && frames.flags(head).contains(.anonExclusive))
                    : vma.isShared
            }
            return e.user(user).writable(writable && user)
        case .migrationWrite where !vma.writable:
            let anon = frames.flags(e.pfn).contains(.anon)
            return .nonPresent(anon ? .migrationReadExclusive : .migrationRead, e.pfn, young: e.isYoung,
                               dirty: e.isDirty, huge: e.isHuge)
        case .devicePrivateWrite where !vma.writable:
            return .nonPresent(.devicePrivateRead, e.pfn, huge: e.isHuge)
        default:
            return e
        }
    }
}
