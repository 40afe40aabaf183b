/// `madvise` (`mm/madvise.c`).
extension AddressSpace {
    /// Gives advice about `[address, address + length)` (`madvise`).
    ///
    /// - `.dontNeed` zaps the range: private anonymous memory reads as zero afterwards, file memory
    ///   refaults from the page cache. On hugetlb memory the range must start on a huge page; its end
    ///   is rounded down to a huge page (Linux >= 6.1), and a range that rounds to nothing is a no-op.
    /// - `.free` marks exclusively owned anonymous pages clean and lazily freeable; without memory
    ///   pressure (no reclaim is modelled) their contents stay. Not for hugetlb memory
    ///   (`madvise_dontneed_free_valid_vma`).
    /// - `.hugePage` / `.noHugePage` set or clear THP eligibility (splitting VMAs); a hugetlb VMA can
    ///   only be split at a huge-page boundary (`hugetlb_vm_op_split`).
    /// - `.dontFork` / `.doFork` and `.wipeOnFork` / `.keepOnFork` set or clear what ``fork()`` does
    ///   with the range (`VM_DONTCOPY`, `VM_WIPEONFORK`), splitting VMAs like `.hugePage`; wipe-on-fork
    ///   is for private anonymous memory only.
    /// - `.populateRead` / `.populateWrite` fault the range in now, as reading or writing each page would.
    /// - `.collapse` turns every fully covered PMD-aligned block into a PMD-mapped THP; not for hugetlb.
    ///   A block already PMD-mapped counts as done; an empty block, one with a non-present entry or one
    ///   whose entries are all read-only (`SCAN_PAGE_RO`) fails with `.invalidArgument`.
    /// - Throws: `.invalidArgument` (unaligned, zero or overflowing length, advice the mapping cannot
    ///   take — `.free` or `.collapse` on hugetlb memory, a range that cuts a hugetlb page (for `.dontNeed`,
    ///   one that starts inside one); then nothing
    ///   changes), `.outOfMemory` if part of the range is unmapped (the mapped parts are still advised,
    ///   as the kernel does), for `.collapse` the last block's failure (`.invalidArgument`, `.tryAgain`
    ///   for a pinned page, `.outOfMemory`), for `.populateRead`/`.populateWrite` what `populate` throws
    ///   (`.outOfMemory`, `.invalidArgument`, `.fault`), `.noProcess`.
    /// Takes `mmapLock` for writing.
    public func advise(_ address: UInt64, length: Int, _ advice: Advice) throws(HMMError) {
        let (lo, hi) = try validateRange(address, length, "madvise")
        mmapLock.writeLock()
        defer { mmapLock.unlock() }
        try checkAlive()
        if advice == .populateRead || advice == .populateWrite {
            return try populate(lo, hi, write: advice == .populateWrite)
        }
        var firstError: HMMError?
        do { try checkFullyMapped(lo, hi, "madvise") } catch { firstError = error }
        let pieces = vmas.filter { $0.end > lo && $0.start < hi }.map { $0.slice(lo, hi) }
        switch advice {
        case .dontNeed:
            var zaps: [VMA] = []
            for var v in pieces {
                if v.flags.contains(.mixedMap) { throw .invalid("MADV_DONTNEED on a driver mapping") }
                if v.isHugetlb {
                    // `madvise_dontneed_free_valid_vma` (Linux >= 6.1): the start must be huge-page
                    // aligned; the end is rounded down, so a page-rounded length never frees a huge page
                    // the caller did not name whole, and a range that rounds to nothing does nothing.
                    guard v.start & PageSize.pmdMask == 0 else {
                        throw .invalid("MADV_DONTNEED of hugetlb memory must start on a huge page")
                    }
                    v.end &= ~PageSize.pmdMask
                    if v.end <= v.start { continue }
                }
                zaps.append(v)
            }
            for v in zaps { invalidating(v.start, v.end, .clear) { zapVMA(v, v.start, v.end) } }
        case .free:
            for v in pieces where !v.isAnonymous || v.isShared || v.isHugetlb {
                throw .invalid("MADV_FREE applies to private anonymous memory only, not shared, file or hugetlb")
            }
            for v in pieces { lazyFree(v) }
        case .populateRead, .populateWrite:
            break  // handled above
        case .hugePage, .noHugePage, .dontFork, .doFork, .wipeOnFork, .keepOnFork:
            if advice == .wipeOnFork {
                // `vma->vm_file || VM_SHARED`: hugetlb memory has a hugetlbfs file behind it.
                for v in pieces where !v.isAnonymous || v.isShared || v.isHugetlb {
                    throw .invalid("MADV_WIPEONFORK applies to private anonymous (not hugetlb) memory only")
                }
            }
            let (set, clear): (VMAFlags, VMAFlags) = switch advice {
            case .hugePage: (.hugePage, .noHugePage)
            case .noHugePage: (.noHugePage, .hugePage)
            case .dontFork: (.dontCopy, [])
            case .doFork: ([], .dontCopy)
            case .wipeOnFork: (.wipeOnFork, [])
            default: ([], .wipeOnFork)
            }
            try checkHugetlbBoundaries(lo, hi)
            rmapLock.withWriteLock {
                splitVMA(at: lo)
                splitVMA(at: hi)
                var i = firstVMA(endingAfter: lo)
                while i < vmas.count && vmas[i].start < hi {
                    vmas[i].flags.formUnion(set)
                    vmas[i].flags.subtract(clear)
                    i += 1
                }
                mergeVMAs(around: lo, hi)
            }
        case .collapse:
            for v in pieces where !v.isAnonymous || v.isShared || v.isHugetlb || v.flags.contains(.noHugePage) {
                throw .invalid("MADV_COLLAPSE needs private anonymous memory without MADV_NOHUGEPAGE")
            }
            // `madvise_collapse`: every block is tried; the last failure is reported, ahead of ENOMEM
            // for an unmapped gap (as `madvise_walk_vmas` reports a VMA's error first).
            var lastFailure: HMMError?
            for v in pieces {
                var base = (v.start + PageSize.pmdMask) & ~PageSize.pmdMask
                while base + UInt64(PageSize.pmd) <= v.end {
                    do {
                        try invalidating(base, base + UInt64(PageSize.pmd), .clear) { () throws(HMMError) in try collapse(v, base) }
                    } catch { lastFailure = error }
                    base += UInt64(PageSize.pmd)
                }
            }
            if let lastFailure { throw lastFailure }
        }
        if let firstError { throw firstError }
    }

    /// `madvise_populate` (`faultin_page_range`): faults `[lo, hi)` in page by page (huge page by huge
    /// page for hugetlb), as a read or write access would, stopping at the first failure — what was
    /// populated stays. Requires `mmapLock` held.
    /// - Throws: `.outOfMemory` (an unmapped page, or no memory), `.invalidArgument` (a mapping whose
    ///   protection does not allow the access, e.g. `PROT_NONE`, or a write to a read-only mapping),
    ///   `.fault` (the access would raise SIGBUS or SIGSEGV: past the end of a file, an exhausted
    ///   hugetlb pool, poison).
    private func populate(_ lo: UInt64, _ hi: UInt64, write: Bool) throws(HMMError) {
        var a = lo
        while a < hi {
            guard let vi = vmaIndex(containing: a) else {
                throw HMMError(.outOfMemory, "MADV_POPULATE: \(hex(a)) is not mapped")
            }
            let vma = vmas[vi]
            if write ? !vma.writable : !vma.readable {
                throw .invalid("MADV_POPULATE_\(write ? "WRITE" : "READ"): \(hex(a)) is \(vma.protection)")
            }
            do {
                try handleFault(a, write ? .write : .read)
            } catch where error.code == .segmentationFault || error.code == .bus {
                throw HMMError(.fault, "MADV_POPULATE: \(error.message)")
            }
            a = vma.isHugetlb ? (a | PageSize.pmdMask) + 1 : a + UInt64(PageSize.base)
        }
    }

    /// `madvise_free_pte_range`: clean and old for pages only this mapping uses.
    private func lazyFree(_ vma: VMA) {
        forEachPMDStep(vma.start, vma.end) { a, pmdEnd, pmdN in
            let pmd = PageTableEntry(rawValue: pmdSlot(pmdN, a).pointee.load(ordering: .relaxed))
            if pmd.isLeaf, !pmd.isSpecial, a & PageSize.pmdMask != 0 || pmdEnd - a != UInt64(PageSize.pmd) {
                splitHugePMD(pmdN, a)
                return false
            }
            guard pmd.isTable else { return true }
            forEachPTE(pmd.node, a, pmdEnd) { slot, e in
                guard e.isPresent, !e.isSpecial, frames.order(e.pfn) == 0, machine.pageMapcount(e.pfn) == 1 else { return }
                slot.pointee.store(e.dirty(false).young(false).rawValue, ordering: .relaxed)
                frames.clearFlags(e.pfn, [.dirty, .young])
                frames.setFlags(e.pfn, .lazyFree)
            }
            return true
        }
    }
}
