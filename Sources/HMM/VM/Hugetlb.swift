/// hugetlb faults (`mm/hugetlb.c`): 2 MiB pages from the boot-time pool, always PMD-mapped.
extension AddressSpace {
    /// `hugetlb_fault`. Requires `mmapLock` held.
    /// - Throws: `.bus` if no huge page can be had (the kernel's `VM_FAULT_SIGBUS` for an exhausted pool).
    func hugetlbFault(_ vma: VMA, _ pmdN: UInt32, _ address: UInt64, _ access: FaultAccess) throws(HMMError) {
        let slot = pmdSlot(pmdN, address)
        let lock = pool.lock(pmdN)
        let base = address & ~PageSize.pmdMask
        let slotIndex = vma.linearIndex(base) >> UInt64(PageSize.pmdOrder)
        while true {
            lock.lock()
            let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
            if e.isLeaf {
                if access == .read || access == .unshare && frames.flags(e.pfn).contains(.anonExclusive)
                    || e.isWritable
                {
                    slot.pointee.store(e.young(true).dirty(e.isDirty || access == .write).rawValue, ordering: .relaxed)
                    lock.unlock()
                    return
                }
                let head = e.pfn
                if frames.flags(head).contains(.anonExclusive) || machine.refcount(head) == 1 {
                    frames.setFlags(head, .anonExclusive)
                    let newEntry = access == .write ? e.writable(true).dirty(true) : e
                    slot.pointee.store(newEntry.rawValue, ordering: .relaxed)
                    lock.unlock()
                    machine.statistics.count(.faultCOWReuse)
                    return
                }
                // Copy on write from the pool, unreserved (the child of a fork has no reservation).
                machine.getFolio(head)
                lock.unlock()
                defer { machine.putFolio(head) }
                guard let copy = machine.hugetlb.take(reserved: false) else {
                    throw HMMError(.bus, "hugetlb pool exhausted copying \(hex(base))")
                }
                prepareHugetlb(copy)
                machine.pointer(copy).copyMemory(from: machine.pointer(head), byteCount: PageSize.pmd)
                lock.lock()
                guard slot.pointee.load(ordering: .relaxed) == e.rawValue else {
                    lock.unlock()
                    machine.putFolio(copy)
                    continue
                }
                machine.addEntireMapcount(head, -1)
                machine.putFolio(head)
                mapHugetlb(vma, copy, base)
                slot.pointee.store(
                    PageTableEntry.present(copy, writable: access == .write, dirty: access == .write, huge: true).rawValue,
                    ordering: .releasing)
                lock.unlock()
                machine.statistics.count(.faultCOWCopy)
                return
            }
            guard e.isNone else {
                lock.unlock()
                waitForChange(slot, e)
                continue
            }
            lock.unlock()
            let reserved = vma.reservation?.consume(slotIndex) ?? false
            guard let page = machine.hugetlb.take(reserved: reserved) else {
                throw HMMError(.bus, "hugetlb pool exhausted at \(hex(base))")
            }
            prepareHugetlb(page)
            machine.pointer(page).initializeMemory(as: UInt8.self, repeating: 0, count: PageSize.pmd)
            lock.lock()
            guard slot.pointee.load(ordering: .relaxed) == 0 else {
                lock.unlock()
                machine.putFolio(page)
                continue
            }
            mapHugetlb(vma, page, base)
            let writable = access == .write || (vma.isShared && vma.writable)
            slot.pointee.store(
                PageTableEntry.present(page, writable: writable, dirty: access == .write, huge: true).rawValue,
                ordering: .releasing)
            lock.unlock()
            machine.statistics.count(.faultHugetlb)
            return
        }
    }

    /// `copy_hugetlb_page_range` for an anonymous huge page that may be DMA-pinned, which
    /// `hugetlb_try_dup_anon_rmap` refuses to share: the child gets its own copy from the pool (never from
    /// a reservation, which is the parent's), mapped exclusively, while the parent keeps the pinned page
    /// as it was, so writes through the parent's mapping stay visible through the pin. `vma` is the
    /// parent's VMA (the child's has the same anon_vma). Returns the child's entry; requires the parent's
    /// `mmapLock` held for writing.
    /// - Throws: `.outOfMemory` if the pool has no free page (`alloc_hugetlb_folio` failing fails fork).
    func copyPinnedHugetlbPage(_ vma: VMA, _ source: PFN, _ base: UInt64) throws(HMMError) -> PageTableEntry {
        guard let copy = machine.hugetlb.take(reserved: false) else {
            throw HMMError(.outOfMemory, "fork: no free hugetlb page to copy the pinned page at \(hex(base))")
        }
        prepareHugetlb(copy)
        machine.pointer(copy).copyMemory(from: machine.pointer(source), byteCount: PageSize.pmd)
        mapHugetlb(vma, copy, base)
        return .present(copy, writable: vma.writable, dirty: true, huge: true)
    }

    private func prepareHugetlb(_ page: PFN) {
        machine.prepareFolio(page, order: PageSize.pmdOrder, flags: .hugetlb, refcount: 1)
    }

    private func mapHugetlb(_ vma: VMA, _ page: PFN, _ base: UInt64) {
        let index = vma.linearIndex(base)
        for i in 0..<PageSize.pagesPerPMD {
            machine.setAnonRmap(page + i, anonVMA: vma.anonVMA!, index: index + UInt64(i), exclusive: i == 0)
        }
        machine.addEntireMapcount(page, 1)
    }

    /// Gives back the reservations of never-faulted slots of a private hugetlb VMA in `[lo, hi)`.
    func releaseReservations(_ vma: VMA, _ lo: UInt64, _ hi: UInt64) {
        guard let r = vma.reservation else { return }
        var a = lo
        while a < hi {
            if r.consume(vma.linearIndex(a) >> UInt64(PageSize.pmdOrder)) { machine.hugetlb.unreserve(1) }
            a += UInt64(PageSize.pmd)
        }
    }
}
