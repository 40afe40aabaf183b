/// `/proc/<pid>/clear_refs` (`fs/proc/task_mmu.c`).
extension AddressSpace {
    /// Writing 4 to `clear_refs` (`CLEAR_REFS_SOFT_DIRTY`): every VMA loses `VM_SOFTDIRTY` and every
    /// entry its soft-dirty bit, and present entries are write-protected, so the next write to a page
    /// faults and marks it soft-dirty again (``pagemap(at:)`` bit 55) — and `mprotect` no longer makes an
    /// entry writable without that fault (`can_change_pte_writable`). Mirrors hear a `.softDirty`
    /// invalidation. hugetlb entries are left as they are, as the kernel's walk leaves them.
    /// - Throws: `.noProcess` after exit.
    /// Takes `mmapLock` for writing.
    public func clearSoftDirty() throws(HMMError) {
        mmapLock.writeLock()
        defer { mmapLock.unlock() }
        try checkAlive()
        invalidating(0, PageTableIndex.userTop, .softDirty) {
            rmapLock.withWriteLock {
                for i in vmas.indices { vmas[i].flags.remove(.softDirty) }
            }
            for v in vmas where !v.isHugetlb { clearSoftDirty(v) }
        }
    }

    /// `clear_soft_dirty` / `clear_soft_dirty_pmd` over one VMA.
    private func clearSoftDirty(_ vma: VMA) {
        func cleared(_ e: PageTableEntry) -> PageTableEntry {
            e.isPresent ? e.softDirty(false).writable(false) : e.softDirty(false)
        }
        forEachPMDStep(vma.start, vma.end) { a, pmdEnd, pmdN in
            let slot = pmdSlot(pmdN, a)
            let pmd = PageTableEntry(rawValue: slot.pointee.load(ordering: .acquiring))
            if pmd.isLeaf || (pmd.isNonPresent && pmd.isHuge) {
                let lock = pool.lock(pmdN)
                lock.lock()
                let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
                if !e.isTable && !e.isNone { slot.pointee.store(cleared(e).rawValue, ordering: .relaxed) }
                lock.unlock()
            } else if pmd.isTable {
                forEachPTE(pmd.node, a, pmdEnd) { slot, e in
                    if !e.isNone { slot.pointee.store(cleared(e).rawValue, ordering: .relaxed) }
                }
            }
            return true
        }
    }
}
