import Synchronization

/// Installing and removing migration entries (`try_to_migrate_one`, `remove_migration_pte`), shared by
/// ``MigrateVMA`` and ``MigrateDevice``.
extension Machine {
    /// The migration entry that replaces mapping `e` of page `pfn` (present, device-private or
    /// device-exclusive). Writable sources give a writable entry (so the page comes back writable: no
    /// double fault, as `try_to_migrate_one()` caused before its 2021 fix); otherwise read-exclusive if the
    /// page was anon-exclusive. Young and dirty are carried from a present entry (as the kernel does since
    /// v6.1; before, migration lost them).
    func migrationEntry(replacing e: PageTableEntry, _ pfn: PFN) -> PageTableEntry {
        let writable = e.isPresent ? e.isWritable : e.kind == .devicePrivateWrite || e.kind == .deviceExclusive
        let exclusive = frames.flags(pfn).contains(.anonExclusive)
        let kind: PageTableEntry.Kind = writable ? .migrationWrite : exclusive ? .migrationReadExclusive : .migrationRead
        return .nonPresent(kind, pfn, young: e.isPresent && e.isYoung, dirty: e.isPresent && e.isDirty)
    }

    /// Replaces the mapping `e` of `pfn` at `slot` by a migration entry, with the slot's page-table lock
    /// held: transfers the dirty bit to the folio (the kernel's collect dropped it, losing data, until
    /// v6.0), gives up anon-exclusivity (refusing — and leaving the entry alone — when the page may be
    /// DMA-pinned), removes the rmap and drops the mapping's reference. The caller holds its own reference
    /// and the folio lock.
    /// - Returns: false if the page may be pinned.
    func unmapForMigration(_ slot: UnsafeMutablePointer<Atomic<UInt64>>, _ e: PageTableEntry, _ pfn: PFN) -> Bool {
        let head = frames.head(of: pfn)
        if frames.flags(pfn).contains(.anonExclusive) && maybeDMAPinned(head) { return false }
        let m = migrationEntry(replacing: e, pfn)
        slot.pointee.store(m.rawValue, ordering: .releasing)
        frames.clearFlags(pfn, .anonExclusive)
        if e.isPresent && e.isDirty { frames.setFlags(head, .dirty) }
        addPageMapcount(pfn, -1)
        putFolio(head)
        return true
    }

    /// The entry that replaces migration entry `m` in a VMA of `protection` once the page lives at `new`
    /// (which may be the old page, when migration failed), with the accounting of a new mapping:
    /// mapcount, reference and anon-exclusivity (restored from the entry's kind). Like
    /// `remove_migration_pte`, the protection comes from the VMA as it is now (`vm_page_prot`): a
    /// `PROT_NONE` VMA gets an inaccessible entry, a read-only one a read-only entry, whatever the page's
    /// mapping was when it was collected. (The protection, not the `VMA`, is passed: copying a VMA out of
    /// its list would retain its references once per page.)
    func entryAfterMigration(_ m: PageTableEntry, to new: PFN, in protection: Protection) -> PageTableEntry {
        let exclusive = m.kind == .migrationWrite || m.kind == .migrationReadExclusive
        let write = m.kind == .migrationWrite && protection.contains(.write)
        if exclusive { frames.setFlags(new, .anonExclusive) }
        addPageMapcount(new, 1)
        getFolio(frames.head(of: new))
        if isDevicePrivate(new) {
            return .nonPresent(write ? .devicePrivateWrite : .devicePrivateRead, new)
        }
        let user = protection != .none
        return .present(new, writable: write && user, user: user, young: m.isYoung, dirty: m.isDirty)
    }

    /// `try_to_migrate`: turns every remaining mapping of the small folio `pfn`, in every space, into a
    /// migration entry. Requires the folio locked and referenced by the caller.
    /// - Returns: whether no mapping is left.
    ///
    /// Like `try_to_migrate_one`, each space's interval notifiers hear a `clear` invalidation of the page
    /// before its entry changes: a device mirroring the page in another space (a fork child) must drop it
    /// before the frame can be freed and reused.
    func tryToMigrate(_ pfn: PFN) -> Bool {
        forEachCandidate(of: pfn) { space, _, a in
            space.invalidating(a, a + UInt64(PageSize.base), .clear) {
                space.withLockedPTE(a) { slot, e in
                    let mapping = e.isPresent ? !e.isSpecial : e.isDevicePrivate || e.kind == .deviceExclusive
                    guard mapping, e.pfn == pfn else { return }
                    _ = unmapForMigration(slot, e, pfn)
                }
            }
        }
        return pageMapcount(pfn) == 0
    }

    /// `remove_migration_ptes(src, new)` through the reverse map: every migration entry naming `src`
    /// becomes a mapping of `new`, with the protection of the VMA it is in. `new` must carry the rmap
    /// identity of `src` already.
    func removeMigrationEntries(_ src: PFN, _ new: PFN) {
        forEachCandidate(of: new) { space, vma, a in
            space.withLockedPTE(a) { slot, e in
                guard e.isMigration, e.pfn == src else { return }
                slot.pointee.store(entryAfterMigration(e, to: new, in: vma.protection).rawValue, ordering: .releasing)
            }
        }
    }

    /// Copies the page state a destination inherits (`folio_migrate_mapping` + `folio_migrate_flags`):
    /// rmap identity, anon, dirty, young.
    func migrateMetadata(from src: PFN, to dst: PFN) {
        let s = frames.record(src)
        let d = frames.record(dst)
        d.pointee.mapping.store(s.pointee.mapping.load(ordering: .relaxed), ordering: .relaxed)
        d.pointee.index.store(s.pointee.index.load(ordering: .relaxed), ordering: .relaxed)
        let carried = frames.flags(src).intersection([.anon, .dirty, .young])
        frames.setFlags(dst, carried)
    }
}

extension AddressSpace {
    /// Runs `body(slot, entry)` on the PTE for `a` with its page-table lock held; nothing if no PTE
    /// table maps `a`. Requires `mmapLock` or `rmapLock` held (the tables cannot be freed).
    func withLockedPTE(_ a: UInt64, _ body: (UnsafeMutablePointer<Atomic<UInt64>>, PageTableEntry) -> Void) {
        guard root != 0, let pmdN = try? pmdNode(a, allocate: false), pmdN != 0 else { return }
        let pmd = PageTableEntry(rawValue: pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
        guard pmd.isTable else { return }
        let lock = pool.lock(pmd.node)
        let slot = pteSlot(pmd.node, a)
        lock.lock()
        defer { lock.unlock() }
        body(slot, PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed)))
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
