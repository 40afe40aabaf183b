import Synchronization

/// Migration of a virtual range between system RAM and device memory in three phases
/// (`struct migrate_vma`, `migrate_vma_setup/pages/finalize`, kernel-spec §4).
///
/// ```
/// try space.withMmapReadLock { () throws(HMMError) in
///     let m = try MigrateVMA(space: space, start: a, end: b, select: .system, owner: me)
///     try m.setup()                       // collect + unmap: src[], cpages, npages
///     for i in 0..<m.npages where m.src[i].isMigrating { allocate, lock, copy or zero; m.dst[i] = … }
///     m.pages()                           // move the metadata, insert holes
///     …update device page tables for entries still migrating…
///     m.finalize()                        // remove migration entries, unlock, drop references
/// }
/// ```
///
/// Locking: the caller holds the space's `mmapLock` (read is enough) from `setup` through `finalize`.
/// Source and destination folios stay locked in between. Page-table locks are taken inside; folios
/// are only try-locked under them (a contended page is simply not collected).
///
/// The same class serves both engines: on a simulated ``AddressSpace`` the phases below run the core's
/// page-table code; on another engine (the native `NativeSpace`) they check the protocol's order and
/// destinations and hand the page work to its `MigrationEngine`. A driver's code is the same.
public final class MigrateVMA: @unchecked Sendable {
    /// The space migrated, on either engine.
    public let space: any MirroredAddressSpace
    /// The simulated space, or nil when ``engine`` migrates.
    let mm: AddressSpace!
    /// The engine that carries out the phases on memory that is not the simulated core's.
    let engine: (any MigrationEngine)?
    public let start: UInt64
    /// Exclusive; shrinks if collection stopped early.
    public private(set) var end: UInt64
    public let select: MigrateSelect
    /// The driver identity matched against pagemap owners (`pgmap_owner`); also the owner of the
    /// `migrate` notifier event.
    public let owner: (any AnyObject & Sendable)?
    /// The locked device-private page whose CPU fault started this migration (`fault_page`).
    public let faultPage: PFN?
    /// Source entries, one per page (read-only for the driver).
    public internal(set) var src: [MigratePFN]
    /// Destination entries, filled by the driver between ``setup()`` and ``pages()``.
    public var dst: [MigratePFN]
    /// Entries still migrating after ``setup()`` (holes included).
    public private(set) var cpages = 0
    /// Page slots walked.
    public private(set) var npages = 0
    /// Entries whose page was also mapped elsewhere (restored through the reverse map).
    var remote: [Bool]
    /// Device THPs a split was refused for (pinned): not retried.
    private var unsplittable: Set<PFN> = []
    private var phase = 0
    /// Why it migrates, for its ``MigrationEvent``: `.cpuFault` when a fault page is given, else
    /// `.explicit` unless the driver says otherwise (prefetch, eviction, device fault…). Set it before
    /// ``setup()``, from the thread that runs the phases.
    @exclusivity(unchecked) public var cause: MigrationCause
    /// (Unchecked: touched only by the thread running the phases, and a dynamic exclusivity check per
    /// phase was measurable on 4 KiB migrations.)
    @exclusivity(unchecked) private var observation = MigrationObservation()
    /// The VMA as ``setup()`` found it (stable while the caller holds `mmapLock`).
    var vma = VMA(start: 0, end: 0, protection: .none, flags: [], file: nil, pgoff: 0, anonVMA: nil, reservation: nil)

    /// The most pages one migration may cover: its `src`/`dst` arrays take 17 bytes a page, so larger
    /// ranges go in pieces (drivers migrate 512 pages at a time).
    public static let maximumPages = 1 << 20

    /// Describes a migration of `[start, end)`; nothing happens until ``setup()``.
    /// - Throws: `.invalidArgument` for an empty or overflowing range, one outside user space, or one
    ///   longer than ``maximumPages``.
    public init(
        space: any MirroredAddressSpace, start: UInt64, end: UInt64, select: MigrateSelect,
        owner: (any AnyObject & Sendable)?, faultPage: PFN? = nil
    ) throws(HMMError) {
        let lo = start & ~PageSize.baseMask
        let hi = end & ~PageSize.baseMask
        guard hi > lo, hi <= PageTableIndex.userTop else {
            throw .invalid("migrate_vma range \(hex(start))..<\(hex(end)) is empty or outside user space")
        }
        guard (hi - lo) >> UInt64(PageSize.shift) <= UInt64(Self.maximumPages) else {
            throw .invalid("migrate_vma range \(hex(start))..<\(hex(end)) is longer than \(Self.maximumPages) pages")
        }
        self.space = space
        if let simulated = space as? AddressSpace {
            mm = simulated
            engine = nil
        } else if let engine = space as? any MigrationEngine {
            mm = nil
            self.engine = engine
        } else {
            throw .invalid("migrate_vma: \(type(of: space)) is neither a simulated space nor a migration engine")
        }
        machine = space.machine
        self.start = lo
        self.end = hi
        self.select = select
        self.owner = owner
        self.faultPage = faultPage
        cause = faultPage == nil ? .explicit : .cpuFault
        let n = Int((hi - lo) >> UInt64(PageSize.shift))
        src = Array(repeating: .empty, count: n)
        dst = Array(repeating: .empty, count: n)
        remote = Array(repeating: false, count: n)
    }

    /// The space's machine, stored so per-page paths load it once.
    let machine: Machine

    @inline(__always) func address(_ i: Int) -> UInt64 { start + UInt64(i) << UInt64(PageSize.shift) }

    /// What the engine keeps about this migration between its phases (which pages it locked…).
    @_spi(Engine)
    public var engineContext: AnyObject?

    /// The source entries, writable by the engine that collects them (``MigrationEngine``).
    @_spi(Engine)
    public var engineSource: [MigratePFN] {
        get { src }
        _modify { yield &src }
    }

    // MARK: phase 1

    /// `migrate_vma_setup`: validates, collects every page of the range into ``src`` (locking it and
    /// replacing its mapping by a migration entry) and unmaps it from other spaces.
    /// - Throws: `.invalidArgument` (no VMA at `start`, range past the VMA, hugetlb or driver VMA, a fault
    ///   page that is not a locked device-private page, device memory selected without an `owner`,
    ///   `mmapLock` not held, called twice), `.noProcess` after exit. Nothing is
    ///   collected on error.
    public func setup() throws(HMMError) {
        guard phase == 0 else { throw .invalid("migrate_vma_setup called twice") }
        observation.start(machine)
        // Owners are identities compared with `===`, as the kernel compares `pgmap_owner` pointers: any
        // code in the process can name any driver, so the check catches mistakes, not impostors.
        if !select.isDisjoint(with: [.devicePrivate, .deviceCoherent]) && owner == nil {
            throw .invalid("migrate_vma: selecting device memory needs the owner its pagemaps were registered with")
        }
        if let engine {
            try engine.migrateSetup(self)
            phase = 1
            npages = src.count
            cpages = src.reduce(0) { $0 + ($1.isMigrating ? 1 : 0) }
            observation.collected(src)
            return
        }
        try checkMmapLockHeld("migrate_vma_setup")
        try mm.checkAlive()
        guard let vi = mm.vmaIndex(containing: start) else { throw .invalid("migrate_vma: no VMA at \(hex(start))") }
        let vma = mm.vmas[vi]
        guard end <= vma.end else { throw .invalid("migrate_vma: \(hex(end)) is past the VMA end \(hex(vma.end))") }
        guard !vma.isHugetlb, !vma.flags.contains(.mixedMap) else {
            throw .invalid("migrate_vma: hugetlb and driver VMAs cannot migrate")
        }
        if let fp = faultPage {
            guard machine.isDevicePrivate(fp), machine.frames.flags(machine.frames.head(of: fp)).contains(.locked) else {
                throw .invalid("migrate_vma: fault page \(fp) is not a locked device-private page")
            }
        }
        phase = 1
        self.vma = vma
        mm.invalidating(start, end, .migrate, owner: owner) { collect(vma) }
        npages = src.count
        cpages = unmapAndCheck()
        observation.collected(src)
        #if DEBUG
        machine.hooks.fire(.migrateAfterSetup)
        #endif
    }

    /// `migrate_vma_collect`: one PMD step at a time. With `.compound`, a whole PMD-aligned 2 MiB step
    /// that is empty, the huge zero page, a THP or a device THP becomes one `compound` entry followed by
    /// 511 empty ones; otherwise huge mappings are split and collected page by page.
    private func collect(_ vma: VMA) {
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
                    guard select.contains(.devicePrivate), machine.pagemap(of: pmd.pfn)?.owner === owner else {
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
    private func collectPTEs(_ pteN: UInt32, _ lo: UInt64, _ hi: UInt64, _ anonymousVMA: Bool) -> PFN? {
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
                switch machine.deviceKind(e.pfn) {
                case nil:
                    guard select.contains(.system) else { continue }
                case .deviceCoherent?:
                    guard select.contains(.deviceCoherent), machine.pagemap(of: e.pfn)?.owner === owner else { continue }
                default:
                    continue
                }
                let head = frames.head(of: e.pfn)
                if frames.order(head) > 0 {
                    guard mm.trySplitFolio(head, inTable: pteN, extra: 0) else { return head }
                    e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
                }
                writable = e.isWritable
            case .devicePrivateRead, .devicePrivateWrite:
                guard select.contains(.devicePrivate), machine.pagemap(of: e.pfn)?.owner === owner else { continue }
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
    /// with references nobody can explain (a GUP pin) is restored. Returns the entries still migrating.
    private func unmapAndCheck() -> Int {
        var count = 0
        for i in 0..<src.count where src[i].isMigrating {
            guard let pfn = src[i].pfn else {
                count += 1
                continue
            }
            if machine.totalMapcount(pfn) > 0 {
                remote[i] = true
                _ = src[i].isCompound ? machine.tryToMigrateHuge(pfn) : machine.tryToMigrate(pfn)
            }
            if machine.totalMapcount(pfn) == 0 && machine.refcount(pfn) <= expectedReferences(pfn) {
                count += 1
                continue
            }
            // Restore: the page stays where it is.
            restore(i, pfn, to: pfn)
            release(pfn)
            src[i] = .empty
        }
        return count
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

    /// `migrate_vma_pages`: for every entry still migrating with a destination, moves the page state to
    /// the destination (or, for a hole, maps the destination now). Entries that cannot move (no
    /// destination, an extra reference appeared, a non-anonymous page bound for device memory, a hole
    /// a concurrent fault filled) lose `migrate`.
    /// - Throws: `.invalidArgument` if called out of order, without `mmapLock` held, or for a destination
    ///   that is not a locked folio with exactly the driver's reference. Nothing changes on error; a
    ///   ``finalize()`` afterwards restores every source.
    public func pages() throws(HMMError) {
        guard phase == 1 else { throw .invalid("migrate_vma_pages called out of order") }
        observation.pagesBegan()
        if let engine {
            try validateDestinations()
            try engine.migratePages(self)
            phase = 2
            return
        }
        try checkMmapLockHeld("migrate_vma_pages")
        try validateDestinations()
        phase = 2
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
                        space: space, start: address(i), end: end, event: .migrate, owner: owner, blockable: true))
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
            let dstKind = machine.deviceKind(d)
            let srcFlags = machine.frames.flags(s)
            if dstKind == .generic || dstKind == .pciP2PDMA
                || (dstKind != nil && !srcFlags.contains(.anon))
                || machine.refcount(s) != expectedReferences(s)
            {
                src[i].clearMigrate()
                continue
            }
            for j in 0..<(dstCompound ? PageSize.pagesPerPMD : 1) { machine.migrateMetadata(from: s + j, to: d + j) }
        }
    }

    /// The migration protocol runs under the caller's `mmapLock` (read is enough): a phase called
    /// without it throws instead of racing `munmap`. (Whether *this* thread is the holder cannot be told
    /// from a pthread rwlock; a lock nobody holds can.)
    private func checkMmapLockHeld(_ what: String) throws(HMMError) {
        if mm.mmapLock.tryWriteLock() {
            mm.mmapLock.unlock()
            throw .invalid("\(what) needs the space's mmapLock held (withMmapReadLock)")
        }
    }

    private func validateDestinations() throws(HMMError) {
        for i in 0..<dst.count {
            guard let d = dst[i].pfn else { continue }
            guard machine.isMigrationDestination(d, compound: dst[i].isCompound) else {
                throw .invalid("dst[\(i)] = \(d) is not a locked folio of the entry's size holding one reference")
            }
        }
    }

    /// `migrate_vma_insert_page`: maps the new page `d` at the hole `a`.
    private func insertPage(_ vma: VMA, _ a: UInt64, _ d: PFN) -> Bool {
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

    /// `migrate_vma_finalize`: every migration entry becomes a mapping of the destination (or of the
    /// source again where migration failed); sources and destinations are unlocked and the migration's
    /// references dropped, which frees each source that moved (device pages through `folioFree`).
    /// Calling it before ``pages()`` — or after a ``pages()`` that threw — abandons the migration: every
    /// source is restored, and the valid destinations are unlocked and released. Idempotent. Should the
    /// caller not hold `mmapLock` (a broken contract), finalize takes it for writing itself.
    public func finalize() {
        guard phase == 1 || phase == 2 else { return }
        let outcome = observation.observing
            ? observation.outcome(machine, src: src, dst: dst, accepted: phase == 2, faultPage: faultPage)
            : MigrationObservation.Outcome()
        defer {
            if observation.observing {
                observation.publish(machine, outcome, cause: cause, space: space.eventSpaceID, address: start)
            }
        }
        if let engine {
            let accepted = phase == 2
            phase = 3
            engine.migrateFinalize(self, accepted: accepted)
            return
        }
        let tookLock = mm.mmapLock.tryWriteLock()
        defer { if tookLock { mm.mmapLock.unlock() } }
        // Destinations were checked by `pages()`; if it never ran (or refused them) a destination the
        // driver got wrong is not ours to release, and no source moved: each is restored in place.
        let accepted = phase == 2
        phase = 3
        var target = [PFN?](repeating: nil, count: src.count)
        for i in 0..<src.count {
            let d = dst[i].pfn.flatMap { accepted || machine.isMigrationDestination($0, compound: dst[i].isCompound) ? $0 : nil }
            guard let s = src[i].pfn else {
                if let d { release(d) }
                continue
            }
            let new = accepted && src[i].isMigrating && d != nil ? d! : s
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
    private func restoreLocal(_ target: [PFN?]) {
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

extension AddressSpace {
    /// Runs `body` with `mmapLock` held for reading: what a driver wraps around ``MigrateVMA`` phases,
    /// ``AddressSpace/rangeFault(_:)`` and ``AddressSpace/makeDeviceExclusive(_:owner:_:)``.
    /// - Throws: what `body` throws, or `.noProcess` after exit.
    public func withMmapReadLock<R>(_ body: () throws(HMMError) -> R) throws(HMMError) -> R {
        try mmapLock.withReadLock { () throws(HMMError) -> R in
            try checkAlive()
            return try body()
        }
    }

    /// ``withMmapReadLock(_:)`` for a closure written without a thrown-type annotation. Swift infers
    /// `throws(any Error)` for such a closure, which the typed form cannot take; this form takes it, so
    /// `try mm.withMmapReadLock { try m.setup(); … }` compiles. Annotate the closure
    /// (`{ () throws(HMMError) in … }`) to keep the typed error.
    /// - Throws: what `body` throws, or `HMMError.noProcess` after exit.
    @_disfavoredOverload
    public func withMmapReadLock<R>(_ body: () throws -> R) throws -> R {
        try mmapLock.withReadLock { () throws -> R in
            try checkAlive()
            return try body()
        }
    }
}

extension AddressSpace {
    /// The mapping containing `address`, read without taking `mmapLock`: call it inside
    /// ``MirroredAddressSpace/withMmapReadLock(_:)``.
    public func mappingHoldingLock(containing address: UInt64) -> MappingInfo? {
        guard let i = vmaIndex(containing: address) else { return nil }
        let v = vmas[i]
        return MappingInfo(start: v.start, end: v.end, protection: v.protection, shared: v.isShared,
                           anonymous: v.file == nil || v.file!.isShmem, hugetlb: v.isHugetlb,
                           hugePageAdvice: v.flags.contains(.hugePage))
    }
}

extension Machine {
    /// Allocates a 2 MiB system folio for a compound migration destination, locked, with one reference
    /// (`vma_alloc_folio` of PMD order). Nil when no 2 MiB block is free.
    public func allocateMigrationFolio(zeroed: Bool = true) -> PFN? {
        guard let p = allocateFolio(order: PageSize.pmdOrder, zeroed: zeroed) else { return nil }
        frames.setFlags(p, .locked)
        return p
    }

    /// Allocates a system page for a migration destination, locked, with one reference
    /// (`alloc_page_vma` + `lock_page`). Nil when RAM is exhausted. Pass `zeroed: false` only when every
    /// byte will be overwritten (a copy) before the page is mapped.
    public func allocateMigrationPage(zeroed: Bool = true) -> PFN? {
        guard let p = allocateFolio(order: 0, zeroed: zeroed) else { return nil }
        frames.setFlags(p, .locked)
        return p
    }

    /// Gives back a page from ``allocateMigrationPage(zeroed:)`` or ``allocateMigrationFolio(zeroed:)``
    /// that the driver did not use (unlock and put: the counterpart of the allocation).
    /// - Throws: `.invalidArgument` if `pfn` is not such a page: a locked RAM folio head holding exactly
    ///   the allocation's reference, unmapped and not yet handed to a migration. Nothing changes then.
    public func releaseMigrationPage(_ pfn: PFN) throws(HMMError) {
        guard pfn.rawValue < UInt64(ramFrames),
            isMigrationDestination(pfn, compound: frames.order(pfn) == PageSize.pmdOrder),
            totalMapcount(pfn) == 0, frames.record(pfn).pointee.mapping.load(ordering: .acquiring) == 0,
            frames.flags(pfn).isDisjoint(with: [.reserved, .hugetlb, .pageCache])
        else { throw .invalid("\(pfn) is not an unused migration page (locked, one reference, unmapped)") }
        frames.unlock(pfn)
        putFolio(pfn)
    }

    /// Copies one page's bytes (RAM or any pagemap, CPU-addressable or not: this is the device's copy
    /// engine). The caller holds references on both.
    /// - Throws: `.invalidArgument` for a frame that is neither RAM nor in a registered pagemap.
    public func copyPage(from src: PFN, to dst: PFN) throws(HMMError) {
        try checkFrame(src)
        try checkFrame(dst)
        copyTimed(pointer(dst), pointer(src), PageSize.base)
    }

    /// Copies `count` consecutive frames (a folio) in one go; both runs must lie in RAM or in one pagemap.
    /// - Throws: `.invalidArgument` for a run that leaves its region.
    public func copyPages(from src: PFN, to dst: PFN, count: Int) throws(HMMError) {
        guard count > 0 else { return }
        for (p, what) in [(src, "source"), (dst, "destination")] {
            try checkFrame(p)
            try checkFrame(p + (count - 1))
            let sameRegion = p.rawValue < UInt64(ramFrames)
                ? (p + (count - 1)).rawValue < UInt64(ramFrames)
                : pagemap(of: p) === pagemap(of: p + (count - 1))
            guard sameRegion else { throw .invalid("\(what) run \(p)+\(count) crosses a region boundary") }
        }
        copyTimed(pointer(dst), pointer(src), count << PageSize.shift)
    }

    /// The device copy engine's copy, timed into ``EventHub/counters`` while observing.
    @inline(__always) private func copyTimed(_ dst: UnsafeMutableRawPointer, _ src: UnsafeMutableRawPointer, _ bytes: Int) {
        guard events.isObserving else { return dst.copyMemory(from: src, byteCount: bytes) }
        let t = monotonicNanoseconds()
        dst.copyMemory(from: src, byteCount: bytes)
        events.counters.add(.deviceCopyNanoseconds, Int(truncatingIfNeeded: monotonicNanoseconds() &- t))
        events.counters.add(.deviceCopyBytes, bytes)
    }

    /// Zero-fills a page the caller holds a reference on.
    /// - Throws: `.invalidArgument` for a frame that is neither RAM nor in a registered pagemap.
    public func zeroPage(_ pfn: PFN) throws(HMMError) {
        try checkFrame(pfn)
        pointer(pfn).initializeMemory(as: UInt8.self, repeating: 0, count: PageSize.base)
    }

    /// The host address of a frame's 4 KiB (RAM or any pagemap): what a device's DMA engine uses. Valid
    /// while the caller keeps the page from being freed (a reference, or a notifier-protected mapping).
    /// - Throws: `.invalidArgument` for a frame that is neither RAM nor in a registered pagemap.
    public func framePointer(_ pfn: PFN) throws(HMMError) -> UnsafeMutableRawPointer {
        try checkFrame(pfn)
        return pointer(pfn)
    }

    /// Whether `d` can be a migration destination: a frame of this machine, locked, order 0, holding
    /// exactly the allocation's reference.
    func isMigrationDestination(_ d: PFN, compound: Bool = false) -> Bool {
        (d.rawValue < UInt64(ramFrames) || pagemap(of: d)?.isUnregistered == false)
            && frames.flags(d).contains(.locked) && refcount(d) == 1
            && frames.order(d) == (compound ? PageSize.pmdOrder : 0) && !frames.flags(d).contains(.tail)
    }

    func checkFrame(_ pfn: PFN) throws(HMMError) {
        if pfn.rawValue < UInt64(ramFrames) { return }
        guard pagemap(of: pfn)?.isUnregistered == false else { throw .invalid("\(pfn) is not a frame of this machine") }
    }
}
