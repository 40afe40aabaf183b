import Synchronization

/// What a fault asks for (`FAULT_FLAG_WRITE`, `FAULT_FLAG_UNSHARE`).
enum FaultAccess {
    case read
    case write
    /// Break sharing of an anonymous page without asking for write access (before a read-only pin).
    case unshare
}

extension AddressSpace {
    /// `handle_mm_fault`: makes `address` accessible for `access`, or throws what the CPU would get.
    /// Requires `mmapLock` held (read or write). Takes PMD and PTE locks itself.
    /// - Throws: `.segmentationFault` (no VMA, or the VMA forbids the access), `.bus` (past the end of a
    ///   file, poison, exhausted hugetlb pool), `.outOfMemory`.
    @inline(__always)
    func handleFault(_ address: UInt64, _ access: FaultAccess) throws(HMMError) {
        if _slowPath(machine.events.isObserving) { return try handleFaultObserved(address, access) }
        try resolveFault(address, access)
    }

    /// `handle_mm_fault` itself (``handleFault(_:_:)`` less the events).
    func resolveFault(_ address: UInt64, _ access: FaultAccess) throws(HMMError) {
        guard let vi = vmaIndex(containing: address) else {
            throw HMMError(.segmentationFault, "no mapping at \(hex(address))")
        }
        let vma = vmas[vi]
        if access == .write ? !vma.writable : vma.protection == .none {
            throw HMMError(.segmentationFault, "\(access) access to \(hex(address)) not allowed by \(vma.protection)")
        }
        let pmdN = try pmdNode(address, allocate: true)
        if vma.isHugetlb { return try hugetlbFault(vma, pmdN, address, access) }
        while true {
            let slot = pmdSlot(pmdN, address)
            let pmd = PageTableEntry(rawValue: slot.pointee.load(ordering: .acquiring))
            if pmd.isNone, vma.thpEligible(address) {
                if try thpFault(vma, pmdN, address, access) { return }
            } else if pmd.isLeaf {
                if try hugePMDFault(vma, pmdN, address, access) { return }
                continue
            } else if pmd.isNonPresent {
                if pmd.isDevicePrivate {
                    // `do_huge_pmd_device_private`: the whole 2 MiB device folio goes back.
                    let lock = pool.lock(pmdN)
                    lock.lock()
                    guard slot.pointee.load(ordering: .relaxed) == pmd.rawValue else {
                        lock.unlock()
                        continue
                    }
                    _ = try devicePrivateFault(lock, pmd, address, access)
                    continue
                }
                waitForChange(slot, pmd)
                continue
            }
            guard let pteN = try pteNode(pmdN, address, allocate: true) else { continue }
            if try pteFault(vma, pteN, address, access) { return }
        }
    }

    /// `migration_entry_wait`: sleeps until the entry changes.
    func waitForChange(_ slot: UnsafeMutablePointer<Atomic<UInt64>>, _ seen: PageTableEntry) {
        machine.statistics.count(.faultMigrationWait)
        var spins = 0
        while slot.pointee.load(ordering: .acquiring) == seen.rawValue {
            spins += 1
            if spins > 16 {
                sched_yieldShim()
                spins = 0
            }
        }
    }

    /// The PTE-level fault; true when done, false to retry from the top.
    private func pteFault(_ vma: VMA, _ pteN: UInt32, _ address: UInt64, _ access: FaultAccess) throws(HMMError) -> Bool {
        let lock = pool.lock(pteN)
        let slot = pteSlot(pteN, address)
        lock.lock()
        let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        switch e.kind {
        case .none:
            lock.unlock()
            return try faultNone(vma, pteN, address, access)
        case .present:
            if !e.isUser {
                // A PROT_NONE entry in a VMA that now allows access cannot exist: protect rewrites
                // entries under the write lock. Treat it as a spurious fault and retry.
                lock.unlock()
                return false
            }
            if access == .read || (access == .write && e.isWritable) {
                slot.pointee.store(e.young(true).dirty(e.isDirty || access == .write).rawValue, ordering: .relaxed)
                lock.unlock()
                return true
            }
            return try writeProtectFault(vma, pteN, slot, e, address, access)
        case .migrationRead, .migrationReadExclusive, .migrationWrite:
            lock.unlock()
            waitForChange(slot, e)
            return false
        case .hwpoison:
            lock.unlock()
            throw HMMError(.bus, "hardware poison at \(hex(address))")
        case .devicePrivateRead, .devicePrivateWrite:
            return try devicePrivateFault(lock, e, address, access)
        case .deviceExclusive:
            lock.unlock()
            try restoreDeviceExclusive(vma, pteN, address, e)
            return false
        case .table:
            lock.unlock()
            preconditionFailure("table entry at PTE level")
        }
    }

    /// `do_swap_page()` (`mm/memory.c`) on a device-private entry, entered with the PTE lock held. Takes
    /// the page lock by try-lock and a reference while the lock is still held — so a racing migration or
    /// unmap cannot free the page under `migrateToRAM` (CVE-2022-3523) — then calls the driver. A contended
    /// page lock means another thread is already moving the page: wait for it to be unlocked and retry,
    /// which keeps many threads faulting one page live (retrying at once livelocked the kernel until
    /// 2025). Returns false: the access is retried.
    /// Entered with the lock of the table holding `e` (a PTE, or a huge PMD entry) held; releases it.
    private func devicePrivateFault(
        _ lock: SpinLockWord, _ e: PageTableEntry, _ address: UInt64, _ access: FaultAccess
    ) throws(HMMError) -> Bool {
        let huge = e.isHuge
        let page = e.pfn
        let head = frames.head(of: page)
        guard let pm = machine.pagemap(of: page) else {
            lock.unlock()
            preconditionFailure("device-private entry \(e) names no pagemap")
        }
        guard machine.deviceFaultTryLock(page) else {
            lock.unlock()
            machine.statistics.count(.faultDevicePrivateWait)
            while frames.flags(head).contains(.locked) { sched_yieldShim() }
            return false
        }
        lock.unlock()
        machine.statistics.count(.faultDevicePrivate)
        let mask = huge ? PageSize.pmdMask : PageSize.baseMask
        let unit = address & ~mask
        try machine.deviceFaultMigrateToRAM(pm, DeviceFault(space: self, address: unit, page: page, huge: huge,
                                                            write: access == .write, range: unit..<(unit + mask + 1)))
        return false
    }

    /// Fault on an empty PTE (`do_anonymous_page`, `do_read_fault`, `do_cow_fault`, `do_shared_fault`).
    private func faultNone(_ vma: VMA, _ pteN: UInt32, _ address: UInt64, _ access: FaultAccess) throws(HMMError) -> Bool {
        let lock = pool.lock(pteN)
        let slot = pteSlot(pteN, address)
        if vma.flags.contains(.mixedMap) {
            throw HMMError(.bus, "no page inserted at \(hex(address)) in a driver mapping")
        }
        guard let file = vma.file else {
            if access != .write {
                lock.lock()
                if slot.pointee.load(ordering: .relaxed) == 0 {
                    let zero = PageTableEntry.present(machine.zeroPFN, writable: false, special: true)
                    slot.pointee.store(zero.rawValue, ordering: .releasing)
                    machine.statistics.count(.faultAnonZeroPage)
                }
                lock.unlock()
                return true
            }
            guard let page = machine.allocateFolio(order: 0, zeroed: true) else {
                throw HMMError(.outOfMemory, "no free frame for \(hex(address))")
            }
            lock.lock()
            guard slot.pointee.load(ordering: .relaxed) == 0 else {
                lock.unlock()
                machine.putFolio(page)
                return false
            }
            machine.setAnonRmap(page, anonVMA: vma.anonVMA!, index: vma.linearIndex(address), exclusive: true)
            machine.addPageMapcount(page, 1)
            let entry = PageTableEntry.present(page, writable: true, dirty: true)
            slot.pointee.store(entry.rawValue, ordering: .releasing)
            lock.unlock()
            machine.statistics.count(.faultAnonNew)
            return true
        }
        guard let page = try file.getPage(vma.linearIndex(address)) else {
            throw HMMError(.bus, "\(hex(address)) lies past the end of the mapped file")
        }
        if vma.isShared || access != .write {
            lock.lock()
            guard slot.pointee.load(ordering: .relaxed) == 0 else {
                lock.unlock()
                machine.putFolio(page)
                return false
            }
            machine.addPageMapcount(page, 1)
            let writable = vma.isShared && vma.writable
            let entry = PageTableEntry.present(page, writable: writable, dirty: access == .write)
            slot.pointee.store(entry.rawValue, ordering: .releasing)
            lock.unlock()
            machine.statistics.count(vma.isShared ? .faultShared : .faultFile)
            return true
        }
        // Write fault on a private file mapping: copy the page-cache page into a new anonymous page.
        defer { machine.putFolio(page) }
        guard let copy = machine.allocateFolio(order: 0, zeroed: false) else {
            throw HMMError(.outOfMemory, "no free frame for a private copy at \(hex(address))")
        }
        machine.pointer(copy).copyMemory(from: machine.pointer(page), byteCount: PageSize.base)
        lock.lock()
        guard slot.pointee.load(ordering: .relaxed) == 0 else {
            lock.unlock()
            machine.putFolio(copy)
            return false
        }
        machine.setAnonRmap(copy, anonVMA: vma.anonVMA!, index: vma.linearIndex(address), exclusive: true)
        machine.addPageMapcount(copy, 1)
        slot.pointee.store(PageTableEntry.present(copy, writable: true, dirty: true).rawValue, ordering: .releasing)
        lock.unlock()
        machine.statistics.count(.faultCOWCopy)
        return true
    }

    /// Write (or unshare) fault on a present read-only entry (`do_wp_page`). Called with the PTE lock
    /// held; returns with it released.
    private func writeProtectFault(
        _ vma: VMA, _ pteN: UInt32, _ slot: UnsafeMutablePointer<Atomic<UInt64>>, _ e: PageTableEntry,
        _ address: UInt64, _ access: FaultAccess
    ) throws(HMMError) -> Bool {
        let lock = pool.lock(pteN)
        let pfn = e.pfn
        if e.isSpecial {
            // The zero page: a write gets a fresh zeroed page; so does an unshare, which only a
            // long-term read-only pin asks for (`gup_must_unshare`), so later writes reach the pin.
            lock.unlock()
            return try replacePage(vma, pteN, slot, e, address, source: nil, access)
        }
        let head = frames.head(of: pfn)
        let flags = frames.flags(pfn)
        if flags.contains(.anon) {
            var reuse = flags.contains(.anonExclusive)
            if !reuse, frames.order(head) == 0, machine.refcount(head) == 1 {
                // `wp_can_reuse_anon_folio`: our mapping holds the only reference.
                frames.setFlags(pfn, .anonExclusive)
                reuse = true
            }
            if reuse {
                if access == .write {
                    slot.pointee.store(e.writable(true).dirty(true).young(true).rawValue, ordering: .relaxed)
                    machine.statistics.count(.faultCOWReuse)
                }
                lock.unlock()
                return true
            }
        } else if vma.isShared {
            // A shared page mapped read-only (after mprotect upgraded the VMA): just make it writable.
            if access == .write {
                slot.pointee.store(e.writable(true).dirty(true).young(true).rawValue, ordering: .relaxed)
            }
            lock.unlock()
            return true
        }
        machine.getFolio(head)
        lock.unlock()
        defer { machine.putFolio(head) }
        return try replacePage(vma, pteN, slot, e, address, source: pfn, access)
    }

    /// `wp_page_copy`: maps a private copy of `source` (or a zeroed page) in place of `old`.
    private func replacePage(
        _ vma: VMA, _ pteN: UInt32, _ slot: UnsafeMutablePointer<Atomic<UInt64>>, _ old: PageTableEntry,
        _ address: UInt64, source: PFN?, _ access: FaultAccess
    ) throws(HMMError) -> Bool {
        guard let copy = machine.allocateFolio(order: 0, zeroed: source == nil) else {
            throw HMMError(.outOfMemory, "no free frame to copy \(hex(address))")
        }
        if let source {
            machine.pointer(copy).copyMemory(from: machine.pointer(source), byteCount: PageSize.base)
        }
        // Mirrors of the old page must let go of it (`wp_page_copy` sends a clear invalidation).
        let page = address & ~PageSize.baseMask
        let started = notifiers.start(NotifierRange(space: self, start: page, end: page + UInt64(PageSize.base),
                                                    event: .clear, owner: nil, blockable: true))
        defer { notifiers.end(started) }
        let lock = pool.lock(pteN)
        lock.lock()
        let now = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        guard now.isPresent, now.pfn == old.pfn, now.isWritable == old.isWritable else {
            lock.unlock()
            machine.putFolio(copy)
            return false
        }
        if !now.isSpecial {
            let oldHead = frames.head(of: now.pfn)
            if now.isDirty { frames.setFlags(oldHead, .dirty) }
            machine.addPageMapcount(now.pfn, -1)
            machine.putFolio(oldHead)
        }
        machine.setAnonRmap(copy, anonVMA: vma.anonVMA!, index: vma.linearIndex(address), exclusive: true)
        machine.addPageMapcount(copy, 1)
        let writable = access == .write
        slot.pointee.store(PageTableEntry.present(copy, writable: writable, dirty: writable).rawValue, ordering: .releasing)
        lock.unlock()
        machine.statistics.count(
            source == nil ? .faultAnonNew : access == .unshare ? .faultUnshare : .faultCOWCopy)
        return true
    }
}
