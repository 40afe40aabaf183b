import Synchronization

/// The 2 MiB side of the simulated engine's ``MigrateVMA`` phases (`MIGRATE_VMA_SELECT_COMPOUND`): a
/// PMD-mapped THP, device THP, empty PMD or huge zero page moves as one `compound` entry; a driver that
/// answers with small pages gets the source split (`migrate_vma_split_unmapped_folio`) or the hole
/// filled page by page.
extension SimulatedMigration {
    /// An empty (or huge-zero) PMD-aligned 2 MiB step: one compound hole.
    func collectCompoundHole(_ a: UInt64) {
        src[Int((a - start) >> UInt64(PageSize.shift))] = MigratePFN(rawValue: MigratePFN.migrate | MigratePFN.compound)
    }

    /// Collects the huge mapping `e` at `a` as one compound entry: reference, try-lock, PMD migration entry
    /// (carrying young/dirty and exclusivity), rmap and the mapping's reference dropped. False — nothing
    /// changed — when the folio is contended, mapped elsewhere too, or may be pinned; the caller splits.
    func collectHugePMD(_ pmdN: UInt32, _ a: UInt64, _ e: PageTableEntry) -> Bool {
        let frames = machine.frames
        let head = e.pfn
        let slot = mm.pmdSlot(pmdN, a)
        let lock = mm.pool.lock(pmdN)
        lock.lock()
        defer { lock.unlock() }
        guard slot.pointee.load(ordering: .relaxed) == e.rawValue, frames.order(head) == PageSize.pmdOrder,
            machine.entireMapcount(head) == machine.totalMapcount(head), frames.flags(head).contains(.anon)
        else { return false }
        if machine.deviceKind(head) != nil && !machine.migrationCollects(head, select, owner: owner) { return false }
        let exclusive = frames.flags(head).contains(.anonExclusive)
        if exclusive && machine.maybeDMAPinned(head) { return false }
        machine.getFolio(head)
        let isFault = head == faultPage
        if !isFault && !frames.tryLock(head) {
            machine.putFolio(head)
            return false
        }
        let writable = e.isPresent ? e.isWritable : e.kind == .devicePrivateWrite
        let kind: PageTableEntry.Kind = writable ? .migrationWrite : exclusive ? .migrationReadExclusive : .migrationRead
        slot.pointee.store(PageTableEntry.nonPresent(kind, head, young: e.isPresent && e.isYoung,
                                                     dirty: e.isPresent && e.isDirty, huge: true).rawValue,
                           ordering: .releasing)
        for i in 0..<PageSize.pagesPerPMD { frames.clearFlags(head + i, .anonExclusive) }
        if e.isPresent && e.isDirty { frames.setFlags(head, .dirty) }
        machine.addEntireMapcount(head, -1)
        machine.putFolio(head)
        src[Int((a - start) >> UInt64(PageSize.shift))] = MigratePFN(
            head, flags: MigratePFN.migrate | MigratePFN.compound | (writable ? MigratePFN.write : 0))
        return true
    }

    /// `migrate_vma_insert_huge_pmd_page`: maps the 2 MiB destination `d` at the hole `a` with one PMD —
    /// a device-private PMD entry (writable iff the VMA is) or a present huge PMD — replacing an empty
    /// PMD or the huge zero page.
    func insertHugePage(_ vma: VMA, _ a: UInt64, _ d: PFN) -> Bool {
        guard vma.isAnonymous, !vma.isShared, let anon = vma.anonVMA, a & PageSize.pmdMask == 0,
            a >= vma.start, a + UInt64(PageSize.pmd) <= vma.end,
            let pmdN = try? mm.pmdNode(a, allocate: true)
        else { return false }
        let slot = mm.pmdSlot(pmdN, a)
        let lock = mm.pool.lock(pmdN)
        guard mm.pool.deposit() else { return false }
        lock.lock()
        let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        guard e.isNone || (e.isLeaf && e.isSpecial) else {
            lock.unlock()
            mm.pool.releaseDeposit()
            return false
        }
        if !e.isNone { mm.pool.releaseDeposit() }  // the huge zero page brought its own deposit
        let index = vma.linearIndex(a)
        for j in 0..<PageSize.pagesPerPMD {
            machine.setAnonRmap(d + j, anonVMA: anon, index: index + UInt64(j), exclusive: true)
        }
        machine.addEntireMapcount(d, 1)
        machine.getFolio(d)
        let entry: PageTableEntry = machine.isDevicePrivate(d)
            ? .nonPresent(vma.writable ? .devicePrivateWrite : .devicePrivateRead, d, huge: true)
            : .present(d, writable: vma.writable, user: vma.accessible, dirty: vma.writable, huge: true)
        slot.pointee.store(entry.rawValue, ordering: .releasing)
        lock.unlock()
        return true
    }

    /// `migrate_vma_split_unmapped_folio`: the driver gave small destinations for a compound source.
    /// Freezes the (unmapped) folio at the references the migration holds, splits it into 512 locked
    /// order-0 folios holding one reference each (the fault page keeps the fault's too), turns the PMD
    /// migration entry into 512 PTE migration entries and expands the entry into 512. False — nothing
    /// changed — if someone else holds a reference.
    func splitUnmappedFolio(_ i: Int) -> Bool {
        let frames = machine.frames
        guard let head = src[i].pfn, frames.order(head) == PageSize.pmdOrder else { return false }
        let fault: Int32 = faultPage.map { $0 >= head && $0 < head + PageSize.pagesPerPMD ? 1 : 0 } ?? 0
        guard frames.record(head).pointee.refcount.compareExchange(
            expected: 1 + fault, desired: 0, ordering: .acquiringAndReleasing
        ).exchanged else { return false }
        machine.splitFrozenFolio(head, order: PageSize.pmdOrder, refs: { 1 + ($0 == self.faultPage ? fault : 0) },
                                 locked: { _ in true })
        if let pmdN = try? mm.pmdNode(address(i), allocate: false), pmdN != 0 {
            mm.splitHugePMD(pmdN, address(i))
        }
        // A folio shared after fork has PMD migration entries in other spaces too: they become PTE
        // migration entries of the small pages, restored page by page at finalize.
        if remote[i] { machine.splitHugeMigrationEntries(head) }
        let flags = src[i].rawValue & MigratePFN.write | MigratePFN.migrate
        for j in 0..<PageSize.pagesPerPMD {
            src[i + j] = MigratePFN(head + j, flags: flags)
            remote[i + j] = remote[i]
        }
        return true
    }

    /// `remove_migration_pmd` for this space's own PMD.
    func restoreHuge(_ pmdN: UInt32, _ a: UInt64, _ old: PFN, to new: PFN) {
        machine.restoreHugeMigrationEntry(mm, vma.protection, pmdN, a, old, to: new)
    }
}
