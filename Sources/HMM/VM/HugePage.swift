import Synchronization

/// Transparent huge pages (`mm/huge_memory.c`, `mm/khugepaged.c`): PMD-mapped 2 MiB anonymous folios,
/// the huge zero page, PMD splitting, folio splitting and `MADV_COLLAPSE`.
///
/// Every huge PMD mapping that may later be split carries a deposited page-table node
/// (`pgtable_trans_huge_deposit`), so a split forced by a partial unmap can never fail.
extension AddressSpace {
    /// First touch of an empty PMD in a THP-eligible VMA (`do_huge_pmd_anonymous_page`). True when a
    /// huge mapping now serves the address; false to fall back to small pages (or retry).
    func thpFault(_ vma: VMA, _ pmdN: UInt32, _ address: UInt64, _ access: FaultAccess) throws(HMMError) -> Bool {
        let slot = pmdSlot(pmdN, address)
        let lock = pool.lock(pmdN)
        guard pool.deposit() else { return false }
        if access != .write {
            lock.lock()
            if slot.pointee.load(ordering: .relaxed) == 0 {
                let entry = PageTableEntry.present(machine.hugeZeroPFN, writable: false, huge: true, special: true)
                slot.pointee.store(entry.rawValue, ordering: .releasing)
                lock.unlock()
                machine.statistics.count(.faultHugeZero)
                return true
            }
            lock.unlock()
            pool.releaseDeposit()
            return false
        }
        guard let folio = machine.allocateFolio(order: PageSize.pmdOrder, zeroed: true) else {
            pool.releaseDeposit()
            return false
        }
        let base = address & ~PageSize.pmdMask
        lock.lock()
        guard slot.pointee.load(ordering: .relaxed) == 0 else {
            lock.unlock()
            pool.releaseDeposit()
            machine.putFolio(folio)
            return false
        }
        mapNewTHP(vma, folio, base)
        slot.pointee.store(
            PageTableEntry.present(folio, writable: vma.writable, dirty: true, huge: true).rawValue, ordering: .releasing)
        lock.unlock()
        machine.statistics.count(.faultTHP)
        return true
    }

    /// rmap for a freshly PMD-mapped anonymous folio (`folio_add_new_anon_rmap` with `RMAP_EXCLUSIVE`).
    private func mapNewTHP(_ vma: VMA, _ folio: PFN, _ base: UInt64) {
        let index = vma.linearIndex(base)
        for i in 0..<PageSize.pagesPerPMD {
            machine.setAnonRmap(folio + i, anonVMA: vma.anonVMA!, index: index + UInt64(i), exclusive: true)
        }
        machine.addEntireMapcount(folio, 1)
    }

    /// Access to a present huge PMD that the entry does not allow (`do_huge_pmd_wp_page`,
    /// `do_huge_zero_wp_pmd`). True when done; false when the PMD was split or changed (retry).
    func hugePMDFault(_ vma: VMA, _ pmdN: UInt32, _ address: UInt64, _ access: FaultAccess) throws(HMMError) -> Bool {
        let slot = pmdSlot(pmdN, address)
        let lock = pool.lock(pmdN)
        lock.lock()
        let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        guard e.isLeaf else {
            lock.unlock()
            return false
        }
        if e.isUser && (access == .read || (access == .write && e.isWritable)) {
            slot.pointee.store(e.young(true).dirty(e.isDirty || access == .write).rawValue, ordering: .relaxed)
            lock.unlock()
            return true
        }
        if e.isSpecial {
            lock.unlock()
            // Write to (or, for a long-term read-only pin, unshare of) the huge zero page
            // (`do_huge_zero_wp_pmd`): try a fresh THP, else split into small zero pages.
            if let folio = machine.allocateFolio(order: PageSize.pmdOrder, zeroed: true) {
                lock.lock()
                if slot.pointee.load(ordering: .relaxed) == e.rawValue {
                    mapNewTHP(vma, folio, address & ~PageSize.pmdMask)
                    let write = access == .write
                    slot.pointee.store(
                        PageTableEntry.present(folio, writable: write, dirty: write, huge: true).rawValue,
                        ordering: .releasing)
                    lock.unlock()
                    machine.statistics.count(.faultTHP)
                    return true
                }
                lock.unlock()
                machine.putFolio(folio)
                return false
            }
            splitHugePMD(pmdN, address)
            return false
        }
        let head = e.pfn
        if frames.flags(head).contains(.anonExclusive) || machine.refcount(head) == 1 {
            for i in 0..<PageSize.pagesPerPMD { frames.setFlags(head + i, .anonExclusive) }
            if access == .write {
                slot.pointee.store(e.writable(true).dirty(true).young(true).rawValue, ordering: .relaxed)
                machine.statistics.count(.faultCOWReuse)
            }
            lock.unlock()
            return true
        }
        lock.unlock()
        // Shared after fork: split the PMD; the PTE-level fault then copies only the touched page.
        splitHugePMD(pmdN, address)
        return false
    }

    /// `__split_huge_pmd`: replaces a huge PMD mapping by a PTE table mapping the same 512 pages.
    /// The folio stays large; only the mapping changes. A device-private PMD becomes 512 device-private
    /// PTEs (writable iff it was; young/dirty are not representable), a PMD migration entry 512 PTE
    /// migration entries of the same kind. Takes the PMD lock; a no-op if the PMD is no longer a
    /// splittable huge entry. Must not be used on hugetlb mappings.
    func splitHugePMD(_ pmdN: UInt32, _ address: UInt64) {
        let slot = pmdSlot(pmdN, address)
        let lock = pool.lock(pmdN)
        lock.lock()
        defer { lock.unlock() }
        let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        if e.isNonPresent && e.isHuge && (e.isDevicePrivate || e.isMigration) {
            let node = pool.withdrawDeposit()
            let ptes = pool.entries(node)
            let head = e.pfn
            for i in 0..<PageSize.pagesPerPMD {
                let pte = PageTableEntry.nonPresent(e.kind, head + i, young: e.isYoung, dirty: e.isDirty)
                ptes[i].store(pte.rawValue, ordering: .relaxed)
            }
            if e.isDevicePrivate {
                for i in 0..<PageSize.pagesPerPMD { machine.addPageMapcount(head + i, 1) }
                machine.getFolio(head, Int32(PageSize.pagesPerPMD - 1))
                machine.addEntireMapcount(head, -1)
            }
            slot.pointee.store(PageTableEntry.table(node).rawValue, ordering: .releasing)
            machine.statistics.count(.thpSplitPMD)
            return
        }
        guard e.isLeaf, e.isHuge else { return }
        precondition(!frames.flags(e.pfn).contains(.hugetlb), "splitting a hugetlb PMD")
        let node = pool.withdrawDeposit()
        let ptes = pool.entries(node)
        if e.isSpecial {
            let zero = PageTableEntry.present(machine.zeroPFN, writable: false, user: e.isUser, special: true)
            for i in 0..<PageSize.pagesPerPMD { ptes[i].store(zero.rawValue, ordering: .relaxed) }
        } else {
            let head = e.pfn
            for i in 0..<PageSize.pagesPerPMD {
                let pte = PageTableEntry.present(
                    head + i, writable: e.isWritable, user: e.isUser, young: e.isYoung, dirty: e.isDirty)
                ptes[i].store(pte.rawValue, ordering: .relaxed)
                machine.addPageMapcount(head + i, 1)
            }
            machine.getFolio(head, Int32(PageSize.pagesPerPMD - 1))
            machine.addEntireMapcount(head, -1)
        }
        slot.pointee.store(PageTableEntry.table(node).rawValue, ordering: .releasing)
        machine.statistics.count(.thpSplitPMD)
    }

    /// Splits a PTE-mapped anonymous large folio — system RAM or device-private — into 512 small folios
    /// when every reference to it comes from entries in the PTE table `pteN` (whose lock the caller
    /// holds) plus `extra` references the caller owns. The refcount is frozen to zero first
    /// (`folio_ref_freeze`), so a concurrent `tryGet` cannot slip in; no other table maps the folio, so no
    /// walker can reach it while its metadata is rewritten. Afterwards `keep` (default: the head) carries
    /// the caller's `extra` references and the folio lock if it was held; the caller still owns and drops
    /// them. Pages no longer mapped go back at once (device pages through `folioFree`), and the driver's
    /// `folioSplit` hears of every new folio. True if split.
    func trySplitFolio(_ head: PFN, inTable pteN: UInt32, extra: Int32, keep: PFN? = nil) -> Bool {
        let order = frames.order(head)
        let f = frames.flags(head)
        guard order > 0, f.contains(.anon), !f.contains(.hugetlb), machine.entireMapcount(head) == 0 else {
            return false
        }
        let total = machine.totalMapcount(head)
        let ptes = pool.entries(pteN)
        var inTable: Int32 = 0
        let last = head + (1 << order)
        for i in 0..<512 {
            let e = PageTableEntry(rawValue: ptes[i].load(ordering: .relaxed))
            if e.isPresent || e.isDevicePrivate, e.pfn >= head, e.pfn < last { inTable += 1 }
        }
        guard inTable == total,
            frames.record(head).pointee.refcount.compareExchange(
                expected: total + extra, desired: 0, ordering: .acquiringAndReleasing
            ).exchanged
        else { return false }
        let holder = keep.map { $0 >= head && $0 < last ? $0 : head } ?? head
        let locked = f.contains(.locked)
        machine.splitFrozenFolio(head, order: order,
                                 refs: { frames.record($0).pointee.mapcount.load(ordering: .relaxed) + ($0 == holder ? extra : 0) },
                                 locked: { locked && $0 == holder })
        // Split pages that nothing maps any more go back at once.
        for i in 0..<(1 << order) where frames.record(head + i).pointee.refcount.load(ordering: .relaxed) == 0 {
            machine.freeSplitPage(head + i)
        }
        return true
    }

    /// `MADV_COLLAPSE` of one PMD-aligned block (`hpage_collapse_scan_pmd` + `collapse_huge_page`):
    /// copies its small pages (none and zero entries read as zero) into a new THP and maps it with one
    /// PMD. A block a huge PMD already maps — a THP or the huge zero page — counts as done
    /// (`SCAN_PMD_MAPPED`). Requires `mmapLock` held for writing.
    /// - Throws: `.invalidArgument` — no page table (`SCAN_PMD_NULL`/`SCAN_PMD_NONE`, an empty range), a
    ///   non-present entry (`SCAN_PTE_NON_PRESENT`: migration, device), no writable entry at all
    ///   (`SCAN_PAGE_RO`, e.g. every page copy-on-write shared after fork); `.tryAgain` if a page may be
    ///   pinned (`SCAN_PAGE_COUNT`); `.outOfMemory` (`SCAN_ALLOC_HUGE_PAGE_FAIL`).
    func collapse(_ vma: VMA, _ base: UInt64) throws(HMMError) {
        let pmdN = try pmdNode(base, allocate: false)
        guard pmdN != 0 else { throw .invalid("MADV_COLLAPSE: no page table at \(hex(base)) (SCAN_PMD_NULL)") }
        let slot = pmdSlot(pmdN, base)
        let pmd = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        if pmd.isLeaf { return }
        guard pmd.isTable else {
            throw .invalid("MADV_COLLAPSE: the PMD at \(hex(base)) is \(pmd.isNone ? "empty" : "not present")")
        }
        var sources = [PFN?](repeating: nil, count: PageSize.pagesPerPMD)
        let pteNode = pmd.node
        var writable = false
        let ptes = pool.entries(pteNode)
        for i in 0..<PageSize.pagesPerPMD {
            let e = PageTableEntry(rawValue: ptes[i].load(ordering: .relaxed))
            if e.isNone { continue }
            guard e.isPresent else {
                throw .invalid("MADV_COLLAPSE: page at \(hex(base + UInt64(i << PageSize.shift))) is not present")
            }
            if e.isSpecial { continue }
            let head = frames.head(of: e.pfn)
            guard frames.flags(e.pfn).contains(.anon) else {
                throw .invalid("MADV_COLLAPSE: page at \(hex(base + UInt64(i << PageSize.shift))) is not anonymous")
            }
            guard !machine.maybeDMAPinned(head) else {
                throw HMMError(.tryAgain, "page at \(hex(base + UInt64(i << PageSize.shift))) is pinned")
            }
            if e.isWritable { writable = true }
            sources[i] = e.pfn
        }
        guard writable else {
            throw .invalid("MADV_COLLAPSE: no writable entry in \(hex(base))+2M (SCAN_PAGE_RO)")
        }
        guard pool.deposit() else { throw HMMError(.outOfMemory, "no page table left to deposit") }
        guard let folio = machine.allocateFolio(order: PageSize.pmdOrder, zeroed: false) else {
            pool.releaseDeposit()
            throw HMMError(.outOfMemory, "no free 2 MiB block to collapse \(hex(base))")
        }
        for i in 0..<PageSize.pagesPerPMD {
            let dst = machine.pointer(folio + i)
            if let s = sources[i] {
                dst.copyMemory(from: machine.pointer(s), byteCount: PageSize.base)
            } else {
                dst.initializeMemory(as: UInt8.self, repeating: 0, count: PageSize.base)
            }
        }
        let lock = pool.lock(pmdN)
        lock.lock()
        for i in 0..<PageSize.pagesPerPMD {
            let e = PageTableEntry(rawValue: ptes[i].exchange(0, ordering: .relaxed))
            guard e.isPresent, !e.isSpecial else { continue }
            let head = frames.head(of: e.pfn)
            machine.addPageMapcount(e.pfn, -1)
            machine.putFolio(head)
        }
        mapNewTHP(vma, folio, base)
        slot.pointee.store(
            PageTableEntry.present(folio, writable: vma.writable, dirty: true, huge: true).rawValue, ordering: .releasing)
        lock.unlock()
        pool.retire([pteNode])
        machine.statistics.count(.thpCollapse)
    }
}
