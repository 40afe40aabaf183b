/// `fork` (`kernel/fork.c` dup_mmap, `mm/memory.c` copy_page_range).
extension AddressSpace {
    /// Creates a child address space (`fork`). Ranges advised `.dontFork` are left out and ranges
    /// advised `.wipeOnFork` come to the child empty. Shared mappings stay shared (the child faults their
    /// pages from the same file); private mappings become copy-on-write: both sides lose write access
    /// and anon-exclusivity, except that a page that may be DMA-pinned is copied for the child at once
    /// so the pin stays coherent with the parent (`page_needs_cow_for_dma`) — a 4 KiB page, or a whole
    /// hugetlb page taken from the pool (`copy_hugetlb_page_range`); a possibly pinned THP is split and
    /// copied page by page.
    /// - Returns: the child.
    /// - Throws: `.outOfMemory` — including no free hugetlb page to copy a pinned one into — (the child
    ///   is torn down; the parent is unchanged apart from entries
    ///   already write-protected, which the next write fault restores), `.noProcess`.
    /// Takes this space's `mmapLock` for writing.
    public func fork() throws(HMMError) -> AddressSpace {
        mmapLock.writeLock()
        defer { mmapLock.unlock() }
        try checkAlive()
        let child = try machine.makeAddressSpace()
        do {
            try child.mmapLock.withWriteLock { () throws(HMMError) in
                for vma in vmas where !vma.flags.contains(.dontCopy) {
                    var copy = vma
                    copy.reservation = nil
                    if vma.flags.contains(.wipeOnFork) {
                        // `dup_mmap`: the child gets the VMA with no pages and an anon_vma of its own.
                        copy.anonVMA = AnonVMA(registry: machine.registry)
                        copy.hadUncowedParents = false
                        child.rmapLock.withWriteLock { child.insertVMA(copy) }
                        continue
                    }
                    // `anon_vma_fork`: a child of a VMA with an anon_vma gets a chain of two.
                    if vma.anonVMA?.isAttached == true { copy.hadUncowedParents = true }
                    child.rmapLock.withWriteLock { child.insertVMA(copy) }
                    if vma.anonVMA != nil || vma.flags.contains(.mixedMap) {
                        try invalidating(vma.start, vma.end, .protectionPage) { () throws(HMMError) in
                            try copyPageRange(vma, into: child)
                        }
                    }
                }
            }
        } catch {
            child.exit()
            throw error
        }
        machine.statistics.count(.forks)
        return child
    }

    private func copyPageRange(_ vma: VMA, into child: AddressSpace) throws(HMMError) {
        try forEachPMDStep(vma.start, vma.end) { (a, pmdEnd, pmdN) throws(HMMError) -> Bool in
            let pmd = PageTableEntry(rawValue: pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
            if pmd.isLeaf { return try copyHugePMD(vma, pmdN, a, into: child) }
            if pmd.isNonPresent && pmd.isHuge {
                try copyHugeNonPresentPMD(pmdN, a, into: child)
                return true
            }
            if pmd.isTable {
                let childPMD = try child.pmdNode(a, allocate: true)
                guard let childPTE = try child.pteNode(childPMD, a, allocate: true) else {
                    preconditionFailure("fresh child PMD is not empty")
                }
                try copyPTEs(vma, pmd.node, childPTE, a, pmdEnd, into: child)
            }
            return true
        }
    }

    /// `copy_huge_pmd`; false when the PMD was split instead (copy it at PTE level).
    private func copyHugePMD(_ vma: VMA, _ pmdN: UInt32, _ a: UInt64, into child: AddressSpace) throws(HMMError) -> Bool {
        let slot = pmdSlot(pmdN, a)
        let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        let hugetlb = vma.isHugetlb
        if !e.isSpecial && !hugetlb && machine.maybeDMAPinned(e.pfn) {
            splitHugePMD(pmdN, a)
            return false
        }
        let childPMD = try child.pmdNode(a, allocate: true)
        if hugetlb && !e.isSpecial && frames.flags(e.pfn).contains(.anon) && machine.maybeDMAPinned(e.pfn) {
            let copy = try copyPinnedHugetlbPage(vma, e.pfn, a)
            child.pmdSlot(childPMD, a).pointee.store(copy.rawValue, ordering: .releasing)
            machine.statistics.count(.forkPinnedCopy)
            return true
        }
        if !hugetlb {
            guard pool.deposit() else { throw HMMError(.outOfMemory, "no page table to deposit for the child") }
        }
        var shared = e
        if !e.isSpecial {
            let head = e.pfn
            machine.getFolio(head)
            machine.addEntireMapcount(head, 1)
            if hugetlb {
                frames.clearFlags(head, .anonExclusive)
            } else {
                for i in 0..<PageSize.pagesPerPMD { frames.clearFlags(head + i, .anonExclusive) }
            }
            shared = e.writable(false)
            let lock = pool.lock(pmdN)
            lock.lock()
            slot.pointee.store(shared.rawValue, ordering: .relaxed)
            lock.unlock()
        }
        child.pmdSlot(childPMD, a).pointee.store(shared.young(false).rawValue, ordering: .releasing)
        return true
    }

    /// `copy_huge_non_present_pmd`: a device-private PMD is shared read-only (reference, entire
    /// mapcount, anon-exclusivity given up); a PMD migration entry is copied (downgraded to readable).
    /// The child gets a deposited page table like any huge mapping.
    private func copyHugeNonPresentPMD(_ pmdN: UInt32, _ a: UInt64, into child: AddressSpace) throws(HMMError) {
        let slot = pmdSlot(pmdN, a)
        let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        let childPMD = try child.pmdNode(a, allocate: true)
        guard pool.deposit() else { throw HMMError(.outOfMemory, "no page table to deposit for the child") }
        let down: PageTableEntry
        if e.isDevicePrivate {
            machine.getFolio(e.pfn)
            machine.addEntireMapcount(e.pfn, 1)
            for i in 0..<PageSize.pagesPerPMD { frames.clearFlags(e.pfn + i, .anonExclusive) }
            down = .nonPresent(.devicePrivateRead, e.pfn, huge: true)
        } else {
            down = .nonPresent(.migrationRead, e.pfn, young: e.isYoung, dirty: e.isDirty, huge: true)
        }
        let lock = pool.lock(pmdN)
        lock.lock()
        slot.pointee.store(down.rawValue, ordering: .relaxed)
        lock.unlock()
        child.pmdSlot(childPMD, a).pointee.store(down.rawValue, ordering: .releasing)
    }

    /// `copy_pte_range` for one PTE table.
    private func copyPTEs(
        _ vma: VMA, _ src: UInt32, _ dst: UInt32, _ lo: UInt64, _ hi: UInt64, into child: AddressSpace
    ) throws(HMMError) {
        let lock = pool.lock(src)
        let s = pool.entries(src)
        let d = pool.entries(dst)
        lock.lock()
        defer { lock.unlock() }
        var a = lo
        while a < hi {
            let i = PageTableIndex.pte(a)
            a += UInt64(PageSize.base)
            let e = PageTableEntry(rawValue: s[i].load(ordering: .relaxed))
            switch e.kind {
            case .none, .table:
                continue
            case .present:
                if e.isSpecial {
                    d[i].store(e.rawValue, ordering: .relaxed)
                    continue
                }
                let pfn = e.pfn
                let head = frames.head(of: pfn)
                let f = frames.flags(pfn)
                if f.contains(.anon) && f.contains(.anonExclusive) && machine.maybeDMAPinned(head) {
                    guard let copy = machine.allocateFolio(order: 0, zeroed: false) else {
                        throw HMMError(.outOfMemory, "no frame to copy a pinned page for the child")
                    }
                    machine.pointer(copy).copyMemory(from: machine.pointer(pfn), byteCount: PageSize.base)
                    machine.setAnonRmap(copy, anonVMA: vma.anonVMA!, index: vma.linearIndex(a - UInt64(PageSize.base)),
                                        exclusive: true)
                    machine.addPageMapcount(copy, 1)
                    d[i].store(PageTableEntry.present(copy, writable: e.isWritable, user: e.isUser, dirty: true).rawValue,
                               ordering: .relaxed)
                    machine.statistics.count(.forkPinnedCopy)
                    continue
                }
                machine.getFolio(head)
                machine.addPageMapcount(pfn, 1)
                var shared = e
                if f.contains(.anon) {
                    frames.clearFlags(pfn, .anonExclusive)
                    shared = e.writable(false)
                    s[i].store(shared.rawValue, ordering: .relaxed)
                }
                d[i].store(shared.young(false).rawValue, ordering: .relaxed)
            case .migrationWrite, .migrationReadExclusive:
                let down = PageTableEntry.nonPresent(.migrationRead, e.pfn, young: e.isYoung, dirty: e.isDirty)
                s[i].store(down.rawValue, ordering: .relaxed)
                d[i].store(down.rawValue, ordering: .relaxed)
            case .migrationRead, .hwpoison:
                d[i].store(e.rawValue, ordering: .relaxed)
            case .devicePrivateRead, .devicePrivateWrite:
                // Parent and child share the device page read-only; the next write in either faults it
                // back to RAM and copies (`copy_nonpresent_pte()` in `mm/memory.c`).
                machine.getFolio(frames.head(of: e.pfn))
                machine.addPageMapcount(e.pfn, 1)
                frames.clearFlags(e.pfn, .anonExclusive)
                let down = PageTableEntry.nonPresent(.devicePrivateRead, e.pfn)
                s[i].store(down.rawValue, ordering: .relaxed)
                d[i].store(down.rawValue, ordering: .relaxed)
            case .deviceExclusive:
                // Restore the parent's present entry (the fork's invalidation already revoked the device's
                // access), then share it copy-on-write like any anonymous page.
                let pfn = e.pfn
                let head = frames.head(of: pfn)
                guard frames.tryLock(head) else {
                    throw HMMError(.busy, "fork: device-exclusive page at \(hex(a - UInt64(PageSize.base))) is locked")
                }
                let dirty = frames.flags(head).contains(.dirty)
                let shared = PageTableEntry.present(pfn, writable: false, user: vma.accessible, young: false, dirty: dirty)
                frames.clearFlags(pfn, .anonExclusive)
                machine.getFolio(head)
                machine.addPageMapcount(pfn, 1)
                s[i].store(shared.rawValue, ordering: .relaxed)
                d[i].store(shared.rawValue, ordering: .relaxed)
                frames.unlock(head)
            }
        }
    }
}
