import Synchronization

/// The 2 MiB side of `migrate_vma` (`MIGRATE_VMA_SELECT_COMPOUND`, kernel-spec §4 and §12): a PMD-mapped
/// THP, device THP, empty PMD or huge zero page moves as one `compound` entry; a driver that answers
/// with small pages gets the source split (`migrate_vma_split_unmapped_folio`) or the hole filled page
/// by page.
extension MigrateVMA {
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
        if e.isPresent && machine.deviceKind(head) != nil {
            guard select.contains(.deviceCoherent), machine.pagemap(of: head)?.owner === owner else { return false }
        }
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

extension Machine {
    /// `remove_migration_pmd`: the PMD migration entry of `old` at `a` becomes a PMD mapping of `new` (a
    /// device THP entry or a present huge PMD), with its rmap, reference and exclusivity, and the VMA's
    /// `protection` as it is now.
    func restoreHugeMigrationEntry(_ space: AddressSpace, _ protection: Protection, _ pmdN: UInt32, _ a: UInt64, _ old: PFN, to new: PFN) {
        let slot = space.pmdSlot(pmdN, a)
        let lock = space.pool.lock(pmdN)
        lock.lock()
        defer { lock.unlock() }
        let m = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        guard m.isMigration, m.isHuge, m.pfn == old else { return }
        let write = m.kind == .migrationWrite && protection.contains(.write)
        if m.kind == .migrationWrite || m.kind == .migrationReadExclusive {
            for j in 0..<PageSize.pagesPerPMD { frames.setFlags(new + j, .anonExclusive) }
        }
        addEntireMapcount(new, 1)
        getFolio(new)
        let user = protection != .none
        let e: PageTableEntry = isDevicePrivate(new)
            ? .nonPresent(write ? .devicePrivateWrite : .devicePrivateRead, new, huge: true)
            : .present(new, writable: write && user, user: user, young: m.isYoung, dirty: m.isDirty, huge: true)
        slot.pointee.store(e.rawValue, ordering: .releasing)
    }

    /// `try_to_migrate` for a PMD-mapped folio: every other space's PMD mapping of `head` (a THP or a
    /// device THP shared after fork) becomes a PMD migration entry. Requires the folio locked and
    /// referenced by the caller. Returns whether no mapping is left.
    func tryToMigrateHuge(_ head: PFN) -> Bool {
        forEachCandidate(of: head) { space, _, a in
            guard a & PageSize.pmdMask == 0, let pmdN = try? space.pmdNode(a, allocate: false), pmdN != 0 else { return }
            // The space's notifiers hear `clear` first, as in `try_to_migrate_one`.
            space.invalidating(a, a + UInt64(PageSize.pmd), .clear) {
                let slot = space.pmdSlot(pmdN, a)
                let lock = space.pool.lock(pmdN)
                lock.lock()
                defer { lock.unlock() }
                let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
                guard e.pfn == head, (e.isLeaf && e.isHuge && !e.isSpecial) || (e.isDevicePrivate && e.isHuge) else { return }
                let writable = e.isPresent ? e.isWritable : e.kind == .devicePrivateWrite
                let kind: PageTableEntry.Kind = writable ? .migrationWrite : .migrationRead
                slot.pointee.store(PageTableEntry.nonPresent(kind, head, young: e.isPresent && e.isYoung,
                                                             dirty: e.isPresent && e.isDirty, huge: true).rawValue,
                                   ordering: .releasing)
                if e.isPresent && e.isDirty { frames.setFlags(head, .dirty) }
                addEntireMapcount(head, -1)
                putFolio(head)
            }
        }
        return totalMapcount(head) == 0
    }

    /// `remove_migration_ptes` for a PMD-mapped folio, in every space.
    func removeHugeMigrationEntries(_ old: PFN, _ new: PFN) {
        forEachCandidate(of: new) { space, vma, a in
            guard a & PageSize.pmdMask == 0, let pmdN = try? space.pmdNode(a, allocate: false), pmdN != 0 else { return }
            restoreHugeMigrationEntry(space, vma.protection, pmdN, a, old, to: new)
        }
    }

    /// Splits every other space's PMD migration entry of `head` into 512 PTE migration entries (the
    /// folio was split while it was unmapped: `migrate_vma_split_unmapped_folio` on a folio shared after
    /// fork). Requires the folio locked and no page-table lock held.
    func splitHugeMigrationEntries(_ head: PFN) {
        forEachCandidate(of: head) { space, _, a in
            guard a & PageSize.pmdMask == 0, let pmdN = try? space.pmdNode(a, allocate: false), pmdN != 0 else { return }
            let pmd = PageTableEntry(rawValue: space.pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
            if pmd.isMigration && pmd.isHuge && pmd.pfn == head { space.splitHugePMD(pmdN, a) }
        }
    }
}
