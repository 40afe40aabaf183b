import Synchronization

/// The simulated engine's side of ``MigrateVMA``: the three phases on the core's page tables
/// (`migrate_vma_collect`, `migrate_device_unmap`, `__migrate_device_pages`, `__migrate_device_finalize`
/// with `remove_migration_ptes`). ``MigrateVMA`` checks the protocol and keeps the arrays; the rules both
/// engines share (which pages a migration selects, which destinations it refuses, where an entry ends)
/// are ``MigrationRules``.
@_spi(Engine)
extension AddressSpace: MigrationEngine {
    /// `migrate_vma_setup` on the simulated page tables: validates the VMA, tells the notifiers
    /// (`migrate`, with the owner), collects every page of the range (locking it and replacing its
    /// mapping by a migration entry) and unmaps it from other spaces.
    /// - Throws: `.invalidArgument` (no VMA at `start`, range past the VMA, hugetlb or driver VMA, a fault
    ///   page that is not a locked device-private page, `mmapLock` not held), `.noProcess` after exit.
    ///   Nothing is collected on error.
    public func migrateSetup(_ m: MigrateVMA) throws(HMMError) {
        try checkMmapLockHeld("migrate_vma_setup")
        try checkAlive()
        guard let vi = vmaIndex(containing: m.start) else { throw .invalid("migrate_vma: no VMA at \(hex(m.start))") }
        let vma = vmas[vi]
        guard m.end <= vma.end else { throw .invalid("migrate_vma: \(hex(m.end)) is past the VMA end \(hex(vma.end))") }
        guard !vma.isHugetlb, !vma.flags.contains(.mixedMap) else {
            throw .invalid("migrate_vma: hugetlb and driver VMAs cannot migrate")
        }
        if let fp = m.faultPage {
            guard machine.isDevicePrivate(fp), machine.frames.flags(machine.frames.head(of: fp)).contains(.locked) else {
                throw .invalid("migrate_vma: fault page \(fp) is not a locked device-private page")
            }
        }
        let c = SimulatedMigration(m, self, vma)
        m.engineContext = c
        c.withArrays {
            invalidating(m.start, m.end, .migrate, owner: m.owner) { c.collect() }
            c.unmapAndCheck()
        }
    }

    /// `migrate_vma_pages` on the simulated page tables: for every entry still migrating with a
    /// destination, moves the page state to the destination (or, for a hole, maps the destination now).
    /// Entries that cannot move (no destination, a destination ``MigrationRules`` refuses, an extra
    /// reference, a hole a concurrent fault filled) lose `migrate`.
    /// - Throws: `.invalidArgument` without `mmapLock` held. Nothing changes on error.
    public func migratePages(_ m: MigrateVMA) throws(HMMError) {
        try checkMmapLockHeld("migrate_vma_pages")
        let c = SimulatedMigration.of(m)
        c.withArrays { c.pages() }
    }

    /// `migrate_vma_finalize` on the simulated page tables: every migration entry becomes a mapping of
    /// the destination (or of the source again), in this space and every other that mapped the page;
    /// sources and destinations are unlocked and the migration's references dropped. Should the caller
    /// not hold `mmapLock` (a broken contract), finalize takes it for writing itself.
    public func migrateFinalize(_ m: MigrateVMA, accepted: Bool) {
        let tookLock = mmapLock.tryWriteLock()
        defer { if tookLock { mmapLock.unlock() } }
        let c = SimulatedMigration.of(m)
        c.withArrays { c.finalize(accepted: accepted) }
        m.engineContext = nil
    }

    /// The migration protocol runs under the caller's `mmapLock` (read is enough): a phase called
    /// without it throws instead of racing `munmap`. (Whether *this* thread is the holder cannot be told
    /// from a pthread rwlock; a lock nobody holds can.)
    private func checkMmapLockHeld(_ what: String) throws(HMMError) {
        if mmapLock.tryWriteLock() {
            mmapLock.unlock()
            throw .invalid("\(what) needs the space's mmapLock held (withMmapReadLock)")
        }
    }
}

/// What the simulated engine keeps about one ``MigrateVMA`` between its phases (its
/// ``MigrateVMA/engineContext``): the VMA as setup found it, which entries were also mapped in other
/// spaces, the device THPs a split was refused for. The phases' page-table work is written here.
final class SimulatedMigration {
    /// The migration; it owns this context (through `engineContext`) and outlives every call into it.
    unowned(unsafe) let m: MigrateVMA
    let mm: AddressSpace
    let machine: Machine
    let start: UInt64
    let end: UInt64
    let select: MigrateSelect
    let owner: (any AnyObject & Sendable)?
    let faultPage: PFN?
    /// The VMA as setup found it (stable while the caller holds `mmapLock`).
    let vma: VMA
    /// The migration's source entries while a phase runs here (``withArrays(_:)``), else empty.
    /// (Unchecked, as `MigrateVMA`'s observation: only the thread running the phases touches them,
    /// and a dynamic exclusivity check per page was measurable on 4 KiB migrations.)
    @exclusivity(unchecked) var src: [MigratePFN] = []
    /// The driver's destinations while a phase runs here, read-only.
    @exclusivity(unchecked) var dst: [MigratePFN] = []
    /// Entries whose page was also mapped elsewhere (restored through the reverse map).
    @exclusivity(unchecked) var remote: [Bool]
    /// Device THPs a split was refused for (pinned): not retried.
    var unsplittable: Set<PFN> = []

    init(_ m: MigrateVMA, _ mm: AddressSpace, _ vma: VMA) {
        self.m = m
        self.mm = mm
        machine = mm.machine
        start = m.start
        end = m.end
        select = m.select
        owner = m.owner
        faultPage = m.faultPage
        self.vma = vma
        remote = Array(repeating: false, count: m.src.count)
    }

    /// The context ``AddressSpace/migrateSetup(_:)`` left on `m` (``MigrateVMA`` calls the later phases
    /// only after a setup that succeeded).
    static func of(_ m: MigrateVMA) -> SimulatedMigration {
        unsafeDowncast(m.engineContext!, to: SimulatedMigration.self)
    }

    @inline(__always) func address(_ i: Int) -> UInt64 { start + UInt64(i) << UInt64(PageSize.shift) }

    /// Runs a phase with the migration's arrays moved here (a swap, no copy) and back after: the page
    /// loops then index arrays of this object rather than reaching into ``MigrateVMA``'s, which cost a
    /// retain, a release and an exclusivity check per access.
    @inline(__always) func withArrays<R>(_ body: () -> R) -> R {
        swap(&src, &m.src)
        dst = m.dst
        defer {
            swap(&src, &m.src)
            dst = []
        }
        return body()
    }

    /// `migrate_vma_collect`: one PMD step at a time. With `.compound`, a whole PMD-aligned 2 MiB step
    /// that is empty, the huge zero page, a THP or a device THP becomes one `compound` entry followed by
    /// 511 empty ones; otherwise huge mappings are split and collected page by page.
    func collect() {
        let anonymousVMA = vma.isAnonymous && !vma.isShared
        var a = start
        while a < end {
            let stepEnd = min(end, (a | PageSize.pmdMask) + 1)
            let whole = a & PageSize.pmdMask == 0 && stepEnd - a == UInt64(PageSize.pmd) && select.contains(.compound)
            let pmdN = (try? mm.pmdNode(a, allocate: false)) ?? 0
            let pmd = pmdN == 0 ? PageTableEntry.none : PageTableEntry(rawValue: mm.pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
            if pmd.isNone {
                if anonymousVMA { whole ? collectCompoundHole(a) : collectHoles(a, stepEnd) }
            } else if pmd.isLeaf {
                if pmd.isSpecial && whole && anonymousVMA && select.contains(.system) {
                    collectCompoundHole(a)  // the huge zero page is a hole
                } else if !(whole && !pmd.isSpecial && select.contains(.system) && collectHugePMD(pmdN, a, pmd)) {
                    mm.splitHugePMD(pmdN, a)
                    continue
                }
            } else if pmd.isNonPresent {
                if pmd.isDevicePrivate {
                    guard machine.migrationCollects(pmd.pfn, select, owner: owner) else {
                        a = stepEnd
                        continue
                    }
                    if !(whole && collectHugePMD(pmdN, a, pmd)) {
                        mm.splitHugePMD(pmdN, a)
                        continue
                    }
                } else {
                    mm.waitForChange(mm.pmdSlot(pmdN, a), pmd)
                    continue
                }
            } else if let head = collectPTEs(pmd.node, a, stepEnd, anonymousVMA), !unsplittable.contains(head) {
                // A device THP whose PTEs span several tables: split it through migration entries, then
                // collect this step again.
                let faultRefs: Int32 = faultPage.map { machine.frames.head(of: $0) == head ? 1 : 0 } ?? 0
                if faultRefs == 1 {
                    if !machine.splitFolioEverywhere(head, extra: 1, keep: faultPage) { unsplittable.insert(head) }
                } else if machine.tryGetFolio(head) {
                    // Not the fault's folio: lock it ourselves for the split.
                    if machine.frames.tryLock(head) {
                        if !machine.splitFolioEverywhere(head, extra: 1) { unsplittable.insert(head) }
                        machine.frames.unlock(head)
                    } else {
                        unsplittable.insert(head)
                    }
                    machine.putFolio(head)
                } else {
                    unsplittable.insert(head)
                }
                continue
            }
            a = stepEnd
        }
    }

    func collectHoles(_ lo: UInt64, _ hi: UInt64) {
        var a = lo
        while a < hi {
            src[Int((a - start) >> UInt64(PageSize.shift))] = MigratePFN(rawValue: MigratePFN.migrate)
            a += UInt64(PageSize.base)
        }
    }

    /// `migrate_vma_collect_pmd` at PTE level: one table, under its lock. Returns the head of a device THP
    /// that could not be split from this table alone (the caller splits it and collects again).
    func collectPTEs(_ pteN: UInt32, _ lo: UInt64, _ hi: UInt64, _ anonymousVMA: Bool) -> PFN? {
        let lock = mm.pool.lock(pteN)
        let ptes = mm.pool.entries(pteN)
        let frames = machine.frames
        lock.lock()
        defer { lock.unlock() }
        var a = lo
        while a < hi {
            let i = Int((a - start) >> UInt64(PageSize.shift))
            let slot = ptes + PageTableIndex.pte(a)
            a += UInt64(PageSize.base)
            var e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
            var writable = false
            switch e.kind {
            case .none:
                if anonymousVMA { src[i] = MigratePFN(rawValue: MigratePFN.migrate) }
                continue
            case .present:
                if e.isSpecial {
                    if select.contains(.system) && e.pfn == machine.zeroPFN { src[i] = MigratePFN(rawValue: MigratePFN.migrate) }
                    continue
                }
                guard machine.migrationCollects(e.pfn, select, owner: owner) else { continue }
                let head = frames.head(of: e.pfn)
                if frames.order(head) > 0 {
                    guard mm.trySplitFolio(head, inTable: pteN, extra: 0) else { return head }
                    e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
                }
                writable = e.isWritable
            case .devicePrivateRead, .devicePrivateWrite:
                guard machine.migrationCollects(e.pfn, select, owner: owner) else { continue }
                let head = frames.head(of: e.pfn)
                if frames.order(head) > 0 {
                    // A device THP mapped by PTEs: split it, the fault's reference and lock staying on the
                    // faulting page.
                    let faultRefs: Int32 = faultPage.map { $0 >= head && $0 < head + (1 << frames.order(head)) ? 1 : 0 } ?? 0
                    guard mm.trySplitFolio(head, inTable: pteN, extra: faultRefs, keep: faultPage) else { return head }
                    e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
                }
                writable = e.kind == .devicePrivateWrite
            default:
                continue
            }
            let pfn = e.pfn
            guard frames.flags(pfn).contains(.anon) || frames.flags(pfn).contains(.pageCache) else { continue }
            machine.getFolio(pfn)
            let isFault = pfn == faultPage
            if !isFault && !frames.tryLock(pfn) {
                machine.putFolio(pfn)
                continue
            }
            guard machine.unmapForMigration(slot, e, pfn) else {
                if !isFault { frames.unlock(pfn) }
                machine.putFolio(pfn)
                continue
            }
            src[i] = MigratePFN(pfn, flags: MigratePFN.migrate | (writable ? MigratePFN.write : 0))
        }
        return nil
    }

    /// `migrate_device_unmap`: pages still mapped elsewhere are unmapped through the reverse map; a page
    /// with references nobody can explain (a GUP pin) is restored.
    func unmapAndCheck() {
        for i in 0..<src.count where src[i].isMigrating {
            guard let pfn = src[i].pfn else { continue }
            if machine.totalMapcount(pfn) > 0 {
                remote[i] = true
                _ = src[i].isCompound ? machine.tryToMigrateHuge(pfn) : machine.tryToMigrate(pfn)
            }
            if machine.totalMapcount(pfn) == 0 && machine.refcount(pfn) <= expectedReferences(pfn) { continue }
            // Restore: the page stays where it is.
            restore(i, pfn, to: pfn)
            release(pfn)
            src[i] = .empty
        }
    }

    /// References a collected page may carry: ours, the core's on the fault page, the page cache's.
    func expectedReferences(_ pfn: PFN) -> Int32 {
        (pfn == faultPage ? 2 : 1) + (machine.frames.flags(pfn).contains(.pageCache) ? 1 : 0)
    }

    func release(_ pfn: PFN) {
        if pfn != faultPage { machine.frames.unlock(pfn) }
        machine.putFolio(pfn)
    }

    /// Replaces the migration entries of `src` (this space's slot, and every other space's if the page
    /// was mapped there) by mappings of `new`.
    func restore(_ i: Int, _ old: PFN, to new: PFN) {
        if src[i].isCompound {
            if let pmdN = try? mm.pmdNode(address(i), allocate: false), pmdN != 0 { restoreHuge(pmdN, address(i), old, to: new) }
            if remote[i] { machine.removeHugeMigrationEntries(old, new) }
            return
        }
        mm.withLockedPTE(address(i)) { slot, e in
            guard e.isMigration, e.pfn == old else { return }
            slot.pointee.store(machine.entryAfterMigration(e, to: new, in: vma.protection).rawValue, ordering: .releasing)
        }
        if remote[i] { machine.removeMigrationEntries(old, new) }
    }

    // MARK: phase 2

    /// `__migrate_device_pages` for this space.
    func pages() {
        let vma = self.vma
        var started = false
        defer { mm.notifiers.end(started) }
        for i in 0..<src.count where src[i].isMigrating {
            guard let d = dst[i].pfn else {
                src[i].clearMigrate()
                continue
            }
            let dstCompound = dst[i].isCompound
            guard let s = src[i].pfn else {
                if !started {
                    started = mm.notifiers.start(NotifierRange(
                        space: mm, start: address(i), end: end, event: .migrate, owner: owner, blockable: true))
                }
                if src[i].isCompound && !dstCompound {
                    // The driver answered a 2 MiB hole with small pages: insert them one by one.
                    for j in 0..<PageSize.pagesPerPMD { src[i + j] = MigratePFN(rawValue: MigratePFN.migrate) }
                }
                let inserted = dstCompound
                    ? src[i].isCompound && insertHugePage(vma, address(i), d)
                    : insertPage(vma, address(i), d)
                if !inserted { src[i].clearMigrate() }
                continue
            }
            if src[i].isCompound && !dstCompound && !splitUnmappedFolio(i) {
                src[i].clearMigrate()
                continue
            }
            if dstCompound != src[i].isCompound {
                src[i].clearMigrate()
                continue
            }
            if !MigrationRules.destinationAccepts(machine.deviceKind(d), anonymousSource: machine.frames.flags(s).contains(.anon))
                || machine.refcount(s) != expectedReferences(s)
            {
                src[i].clearMigrate()
                continue
            }
            for j in 0..<(dstCompound ? PageSize.pagesPerPMD : 1) { machine.migrateMetadata(from: s + j, to: d + j) }
        }
    }

    /// `migrate_vma_insert_page`: maps the new page `d` at the hole `a`.
    func insertPage(_ vma: VMA, _ a: UInt64, _ d: PFN) -> Bool {
        guard vma.isAnonymous, !vma.isShared, let anon = vma.anonVMA else { return false }
        guard let pmdN = try? mm.pmdNode(a, allocate: true) else { return false }
        var pteN: UInt32? = nil
        while pteN == nil {
            let pmd = PageTableEntry(rawValue: mm.pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
            if pmd.isLeaf && pmd.isSpecial {
                mm.splitHugePMD(pmdN, a)
                continue
            }
            guard pmd.isNone || pmd.isTable, let n = try? mm.pteNode(pmdN, a, allocate: true), n != 0 else { return false }
            pteN = n
        }
        let lock = mm.pool.lock(pteN!)
        let slot = mm.pteSlot(pteN!, a)
        lock.lock()
        defer { lock.unlock() }
        let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        guard e.isNone || (e.isSpecial && e.pfn == machine.zeroPFN) else { return false }
        machine.setAnonRmap(d, anonVMA: anon, index: vma.linearIndex(a), exclusive: true)
        machine.addPageMapcount(d, 1)
        machine.getFolio(d)
        let entry: PageTableEntry = machine.isDevicePrivate(d)
            ? .nonPresent(vma.writable ? .devicePrivateWrite : .devicePrivateRead, d)
            : .present(d, writable: vma.writable, user: vma.accessible, dirty: vma.writable)
        slot.pointee.store(entry.rawValue, ordering: .releasing)
        return true
    }

    // MARK: phase 3

    /// `__migrate_device_finalize` for this space: restores every entry to its target, then unlocks and
    /// drops the migration's references.
    func finalize(accepted: Bool) {
        var target = [PFN?](repeating: nil, count: src.count)
        for i in 0..<src.count {
            let d = machine.finalizeDestination(dst[i], accepted: accepted)
            guard let s = src[i].pfn else {
                if let d { release(d) }
                continue
            }
            let new = MigrationRules.moves(src[i], to: d, accepted: accepted) ? d! : s
            machine.statistics.count(new == s ? .migrateFail : .migrateSuccess)
            if let d, d != new { release(d) }
            target[i] = new
        }
        restoreLocal(target)
        for i in 0..<src.count {
            guard let new = target[i], let s = src[i].pfn else { continue }
            if remote[i] {
                src[i].isCompound ? machine.removeHugeMigrationEntries(s, new) : machine.removeMigrationEntries(s, new)
            }
            release(s)
            if new != s { release(new) }
        }
    }

    /// `remove_migration_ptes` for this space's own slots, one page-table lock per PTE table.
    func restoreLocal(_ target: [PFN?]) {
        let protection = vma.protection
        var a = start
        while a < end {
            let stepEnd = min(end, (a | PageSize.pmdMask) + 1)
            defer { a = stepEnd }
            guard let pmdN = try? mm.pmdNode(a, allocate: false), pmdN != 0 else { continue }
            let pmd = PageTableEntry(rawValue: mm.pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
            if pmd.isNonPresent && pmd.isHuge {
                let i = Int((a - start) >> UInt64(PageSize.shift))
                if let new = target[i], let old = src[i].pfn { restoreHuge(pmdN, a, old, to: new) }
                continue
            }
            guard pmd.isTable else { continue }
            let lock = mm.pool.lock(pmd.node)
            let ptes = mm.pool.entries(pmd.node)
            lock.lock()
            var b = a
            while b < stepEnd {
                let i = Int((b - start) >> UInt64(PageSize.shift))
                if let new = target[i], let old = src[i].pfn {
                    let slot = ptes + PageTableIndex.pte(b)
                    let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
                    if e.isMigration && e.pfn == old {
                        slot.pointee.store(machine.entryAfterMigration(e, to: new, in: protection).rawValue, ordering: .releasing)
                    }
                }
                b += UInt64(PageSize.base)
            }
            lock.unlock()
        }
    }
}
