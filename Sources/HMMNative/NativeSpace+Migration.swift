import CUserfaultfd
import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// What a native migration keeps between its phases: the region, which pages it locked, and the
/// device folio a CPU fault locked for it.
final class NativeMigration {
    let region: NativeRegion
    /// Index of the migration's first page in the region.
    let first: Int
    /// Pages whose state word this migration locked (compound units: all 512).
    var locked: [Bool]
    /// The head of the fault page's folio (locked by the fault, not by the migration).
    let faultHead: PFN?
    /// Staging RAM folios (2 MiB) whose pages were expanded to small entries: released once, at the end.
    var expandedStaging: [PFN] = []
    /// Device folios this migration locked (several pages of a split unit share one).
    var lockedHeads: Set<PFN> = []
    /// Collected pages whose address the host says is no longer the region's (the program unmapped
    /// it while they were collected): they end unmapped, whatever their unmap event says.
    var gone: [Int] = []

    init(region: NativeRegion, first: Int, count: Int, faultHead: PFN?) {
        self.region = region
        self.first = first
        locked = Array(repeating: false, count: count)
        self.faultHead = faultHead
    }
}

/// `migrate_vma` on host memory (the machine's RAM arena is the staging pool): the three phases of
/// ``MigrateVMA`` carried out with `UFFDIO_MOVE` into staging RAM frames (out) and `UFFDIO_COPY`/`MOVE`
/// back into the holes (in), the page-state lock bits standing in for migration entries.
@_spi(Engine)
extension NativeSpace: MigrationEngine {
    /// `migrate_vma_setup`: the notifiers hear `migrate` (owner), then each page of the range is locked
    /// and collected — a system page by moving it into a staging frame (its VA becomes a hole, and a
    /// touch waits), a 2 MiB THP as one compound entry when `.compound` is selected, a hole or zero page
    /// as a bare `migrate` entry, a device page of the owner as its device frame.
    /// Memory the engine does not manage (shared or file mappings of the process) collects nothing, as
    /// the kernel collects no page of a VMA that is not private anonymous.
    /// A CPU fault's migration and a device's eviction bring pages home whatever the program's
    /// `mprotect` says, as the kernel's `migrate_vma_setup` does; system pages leave only a readable range.
    /// - Throws: `.invalidArgument` (an unmapped range, the range leaves its region, system pages selected
    ///   in a range that is not all readable), `.noProcess` after close.
    public func migrateSetup(_ m: MigrateVMA) throws(HMMError) {
        try checkOpen()
        guard let region = region(containing: m.start) else {
            guard Sys.isMapped(m.start, m.end) else {
                throw HMMError(.invalidArgument, "migrate_vma: \(m.start)..<\(m.end) is not mapped")
            }
            invalidating(m.start, m.end, .migrate, owner: m.owner) {}
            return
        }
        guard m.end <= region.end else {
            throw HMMError(.invalidArgument, "migrate_vma: \(m.start)..<\(m.end) leaves its native region")
        }
        // System pages leave only a readable range. The kernel does not ask this (drivers check VM_READ
        // themselves), but moving host pages of an inaccessible range out lost bytes in the churn suite
        // (device-coherent, in-thread) — not yet understood, so the engine keeps refusing it.
        if m.select.contains(.system), !region.allow(.read, region.index(m.start)..<region.index(m.end + PageSize.baseMask)) {
            throw HMMError(.invalidArgument, "migrate_vma: \(m.start)..<\(m.end) is not all readable")
        }
        let n = m.engineSource.count
        let context = NativeMigration(region: region, first: region.index(m.start), count: n,
                                      faultHead: m.faultPage.map { machine.folioHead($0) })
        m.engineContext = context
        invalidating(m.start, m.end, .migrate, owner: m.owner) {
            collect(m, context)
        }
    }

    private func collect(_ m: MigrateVMA, _ c: NativeMigration) {
        let region = c.region
        let n = c.locked.count
        let toDevice = m.select.contains(.system)
        let compound = m.select.contains(.compound)
        var hostPages = 0
        // Small coherent pages collected: their in-place mappings are replaced by holes in runs, below.
        var coherent: [Int] = []
        var k = 0
        var waited = 0
        while k < n {
            let i = c.first + k
            let s = region.state(i)
            if s.isMigrating {
                // Held for a moment by a fault resolution (or an event): wait a little, then skip it,
                // as `migrate_vma_collect` skips a page whose lock it cannot take.
                if waited < 64 {
                    waited += 1
                    sched_yieldShim()
                    continue
                }
                waited = 0
                k += 1
                continue
            }
            waited = 0
            switch s.kind {
            case .host where toDevice:
                if region.tryLock(i, s) {
                    c.locked[k] = true
                    m.engineSource[k] = MigratePFN(rawValue: MigratePFN.migrate)
                    hostPages += 1
                }
                k += 1
            case .device:
                guard let pm = machine.pagemap(of: s.pfn),
                    MigrationRules.collects(m.select, pm.kind, pagemapOwner: pm.owner, owner: m.owner)
                else {
                    k += 1
                    continue
                }
                if s.isCompound {
                    let unitStart = region.unitStart(i)
                    if compound && unitStart == i && k + PageSize.pagesPerPMD <= n {
                        if collectDeviceUnit(m, c, k, s) {
                            k += PageSize.pagesPerPMD
                        } else {
                            k += 1
                        }
                        continue
                    }
                    splitUnit(region, unitStart)
                    continue  // look at the page again, now small
                }
                let head = machine.folioHead(s.pfn)
                guard region.tryLock(i, s) else {
                    k += 1
                    continue
                }
                if head != c.faultHead && !c.lockedHeads.contains(head) {
                    guard machine.folioTryLock(head) else {
                        region.setState(i, s)
                        k += 1
                        continue
                    }
                    c.lockedHeads.insert(head)
                }
                if isCoherent(s) { coherent.append(k) }
                c.locked[k] = true
                m.engineSource[k] = MigratePFN(s.pfn, flags: MigratePFN.migrate | (s.isWritable ? MigratePFN.write : 0))
                k += 1
            default:
                k += 1
            }
        }
        if !coherent.isEmpty { unmapCoherent(m, c, coherent) }
        if hostPages > 0 { moveOut(m, c, compound: compound) }
    }

    /// Puts holes in place of the collected coherent pages `ks` (ascending), one host call per run of
    /// adjacent pages, so CPU touches wait for the copy as for any page on the move. A run the host
    /// refuses is not collected: its words are unlocked as they were (their folios stay locked with the
    /// migration's others and are unlocked at finalize).
    private func unmapCoherent(_ m: MigrateVMA, _ c: NativeMigration, _ ks: [Int]) {
        var start = 0
        while start < ks.count {
            var end = start + 1
            let protection = c.region.protection(page: c.first + ks[start])
            while end < ks.count && ks[end] == ks[end - 1] + 1 && c.region.protection(page: c.first + ks[end]) == protection {
                end += 1
            }
            let run = ks[start..<end]
            let outcome = replaceWithHole(c.region, at: m.start + UInt64(run.first!) << UInt64(PageSize.shift), pages: run.count)
            if outcome == .gone && run.count > 1 {
                // Some page of the run is no longer the region's: page by page.
                for k in run { collectCoherent(m, c, k) }
            } else {
                settleCollection(m, c, run, outcome)
            }
            start = end
        }
    }

    /// One collected coherent page `k`: a hole in place of its mapping, or gone, or not collected.
    private func collectCoherent(_ m: MigrateVMA, _ c: NativeMigration, _ k: Int) {
        settleCollection(m, c, k..<(k + 1), replaceWithHole(c.region, at: m.start + UInt64(k) << UInt64(PageSize.shift), pages: 1))
    }

    /// What a hole replacement means for the collected coherent pages `ks`: collected (replaced), gone
    /// (they end unmapped at finalize), or not collected (refused).
    private func settleCollection<C: Collection<Int>>(_ m: MigrateVMA, _ c: NativeMigration, _ ks: C, _ outcome: HoleReplacement) {
        switch outcome {
        case .replaced: break
        case .gone: c.gone.append(contentsOf: ks)
        case .refused: uncollect(m, c, ks)
        }
    }

    /// Collected coherent pages the host would not unmap: unlocked as they were (their folios stay
    /// locked with the migration's others and are unlocked at finalize).
    private func uncollect<C: Collection<Int>>(_ m: MigrateVMA, _ c: NativeMigration, _ ks: C) {
        for k in ks {
            c.region.setState(c.first + k, c.region.state(c.first + k).unlocked)
            c.locked[k] = false
            m.engineSource[k] = .empty
        }
    }

    /// Locks the 512 words of the compound unit at `k` and its folio; one compound entry.
    private func collectDeviceUnit(_ m: MigrateVMA, _ c: NativeMigration, _ k: Int, _ s: PageState) -> Bool {
        let region = c.region
        let i = c.first + k
        var got = 0
        while got < PageSize.pagesPerPMD {
            let w = region.state(i + got)
            guard w.isCompound, w.kind == .device, region.tryLock(i + got, w) else { break }
            got += 1
        }
        let head = machine.folioHead(s.pfn)
        if got < PageSize.pagesPerPMD || (head != c.faultHead && !machine.folioTryLock(head)) {
            for j in 0..<got { region.setState(i + j, region.state(i + j).unlocked) }
            return false
        }
        if isCoherent(s) {
            switch replaceWithHole(region, at: region.pageAddress(i), pages: PageSize.pagesPerPMD) {
            case .replaced: break
            case .gone: c.gone.append(contentsOf: k..<(k + PageSize.pagesPerPMD))
            case .refused:
                if head != c.faultHead { machine.folioUnlock(head) }
                for j in 0..<got { region.setState(i + j, region.state(i + j).unlocked) }
                return false
            }
        }
        if head != c.faultHead { c.lockedHeads.insert(head) }
        for j in 0..<PageSize.pagesPerPMD { c.locked[k + j] = true }
        m.engineSource[k] = MigratePFN(head, flags: MigratePFN.migrate | MigratePFN.compound | (s.isWritable ? MigratePFN.write : 0))
        return true
    }

    /// Moves the locked host pages of the migration out of the process into staging RAM frames
    /// (`UFFDIO_MOVE` on the staging userfaultfd, so it never waits for events): a whole THP as one
    /// PMD into a 2 MiB folio, other present pages in runs of contiguous frames; holes and zero pages
    /// are bare `migrate` entries (a touch of a hole faults to us and waits). Pages shared after `fork` and
    /// read-only regions move too (``moveToStaging(_:from:to:_:)``); a page the host still refuses to
    /// move (pinned) is unlocked and not collected.
    private func moveOut(_ m: MigrateVMA, _ c: NativeMigration, compound: Bool) {
        let region = c.region
        let n = c.locked.count
        // Categories per page, from one PAGEMAP_SCAN.
        var categories = [UInt64](repeating: 0, count: n)
        try? scan(m.start, m.end) { (a, cat) in categories[Int((a - m.start) >> UInt64(PageSize.shift))] = cat }
        let present = UInt64(CU_PAGE_IS_PRESENT)
        let zero = UInt64(CU_PAGE_IS_PFNZERO)
        let huge = UInt64(CU_PAGE_IS_HUGE)
        // A present page whose host zap may still be to come stays (its bytes must not outlive the
        // zap); a hole's pending zap has nothing left to remove (the word is locked: nothing fills it).
        for k in 0..<n where c.locked[k] && m.engineSource[k].pfn == nil {
            let s = region.state(c.first + k)
            guard s.isZapPending else { continue }
            if categories[k] & present != 0 {
                m.engineSource[k] = .empty
                region.setState(c.first + k, s.unlocked)
                c.locked[k] = false
            } else {
                region.setState(c.first + k, s, zapDone: true)
            }
        }
        var batch = MoveBatch()
        var k = 0
        while k < n {
            guard c.locked[k], m.engineSource[k].isMigrating, m.engineSource[k].pfn == nil else {
                k += 1
                continue
            }
            let a = m.start + UInt64(k) << UInt64(PageSize.shift)
            let writeFlag = region.protection(page: c.first + k).contains(.write) ? MigratePFN.write : 0
            // A whole 2 MiB unit: one compound entry.
            if compound && a & PageSize.pmdMask == 0 && k + PageSize.pagesPerPMD <= n
                && (k..<(k + PageSize.pagesPerPMD)).allSatisfy({ c.locked[$0] && m.engineSource[$0].isMigrating })
            {
                let cats = categories[k..<(k + PageSize.pagesPerPMD)]
                // Only true holes: a (huge) zero page could be written, and COW'd, behind our back.
                if cats.allSatisfy({ $0 & present == 0 }) {
                    m.engineSource[k] = MigratePFN(rawValue: MigratePFN.migrate | MigratePFN.compound)
                    for j in 1..<PageSize.pagesPerPMD { m.engineSource[k + j] = .empty }
                    k += PageSize.pagesPerPMD
                    continue
                }
                if cats.allSatisfy({ $0 & present != 0 && $0 & huge != 0 && $0 & zero == 0 }),
                    let folio = machine.allocateMigrationFolio(zeroed: false)
                {
                    flush(&batch, m, c)
                    let frame = frameAddress(folio)
                    _ = Sys.madvise(frame, Sys.pmd, Sys.dontNeed)
                    let moved = moveToStaging(region, from: a, to: frame, Sys.pmd)
                    if moved == Sys.pmd {
                        m.engineSource[k] = MigratePFN(folio, flags: MigratePFN.migrate | MigratePFN.compound | writeFlag)
                        for j in 1..<PageSize.pagesPerPMD { m.engineSource[k + j] = .empty }
                        statistics.count(\.pagesMovedOut, PageSize.pagesPerPMD)
                        k += PageSize.pagesPerPMD
                        continue
                    }
                    // Part of it may have moved: put that back and collect page by page.
                    if moved > 0 { installFrame(folio, at: a, pages: Int(moved >> UInt64(PageSize.shift)), move: true, unlessZapped: (region, c.first + k)) }
                    try? machine.releaseMigrationPage(folio)
                }
            }
            let cat = categories[k]
            // A present page — the zero page too: a store to it is a copy-on-write the kernel does
            // without asking us, so it must leave the address like any page (it moves as the zero page).
            if cat & present != 0 {
                guard let frame = machine.allocateMigrationPage(zeroed: false) else {
                    // No staging frame: this page and the rest stay.
                    unlockHost(m, c, from: k)
                    break
                }
                if !batch.append(k, frame) {
                    flush(&batch, m, c)
                    _ = batch.append(k, frame)
                }
                m.engineSource[k] = MigratePFN(frame, flags: MigratePFN.migrate | writeFlag)
            }
            k += 1
        }
        flush(&batch, m, c)
    }

    /// Moves one run of pages (consecutive in the region and in RAM) out.
    private func flush(_ batch: inout MoveBatch, _ m: MigrateVMA, _ c: NativeMigration) {
        guard batch.count > 0 else { return }
        defer { batch = MoveBatch() }
        let frame = frameAddress(batch.firstFrame)
        let a = m.start + UInt64(batch.first) << UInt64(PageSize.shift)
        let bytes = UInt64(batch.count) << UInt64(PageSize.shift)
        _ = Sys.madvise(frame, bytes, Sys.dontNeed)
        let done = Int(moveToStaging(c.region, from: a, to: frame, bytes) >> UInt64(PageSize.shift))
        statistics.count(\.pagesMovedOut, done)
        // The host refused the rest (a pinned page): not collected.
        for j in done..<batch.count {
            let k = batch.first + j
            try? machine.releaseMigrationPage(batch.firstFrame + j)
            m.engineSource[k] = .empty
            c.region.setState(c.first + k, .host)
            c.locked[k] = false
        }
    }

    private func unlockHost(_ m: MigrateVMA, _ c: NativeMigration, from: Int) {
        for k in from..<c.locked.count where c.locked[k] && m.engineSource[k].pfn == nil {
            m.engineSource[k] = .empty
            c.region.setState(c.first + k, .host)
            c.locked[k] = false
        }
    }

    @inline(__always) func frameAddress(_ pfn: PFN) -> UInt64 {
        UInt64(UInt(bitPattern: machine.ramBase)) + pfn.rawValue << UInt64(PageSize.shift)
    }

    /// `migrate_vma_pages`: an entry moves only with a destination of the right memory (device memory
    /// for a system page or hole, RAM for a device page); a compound source answered with small
    /// destinations is expanded into 512 small entries (a staging folio is released once at the end, a
    /// device unit is split so each page holds its own reference).
    public func migratePages(_ m: MigrateVMA) throws(HMMError) {
        guard let c = m.engineContext as? NativeMigration else { return }
        let n = c.locked.count
        var run = CoherentRun()
        var k = 0
        while k < n {
            let src = m.engineSource[k]
            guard src.isMigrating else {
                k += 1
                continue
            }
            guard let d = m.dst[k].pfn else {
                m.engineSource[k].rawValue &= ~MigratePFN.migrate
                k += 1
                continue
            }
            let srcIsDevice = src.pfn.map { machine.deviceKind($0) != nil } ?? false
            let dKind = machine.deviceKind(d)
            // Every page of a region is private anonymous memory. The engine moves pages between RAM and
            // device memory only: a device page goes to RAM, a system page (in its staging frame) to a
            // device; a hole takes either.
            let engineMoves = srcIsDevice ? dKind == nil : (src.pfn == nil || dKind != nil)
            if !MigrationRules.destinationAccepts(dKind, anonymousSource: true) || !engineMoves {
                m.engineSource[k].rawValue &= ~MigratePFN.migrate
                k += 1
                continue
            }
            if src.isCompound && !m.dst[k].isCompound {
                expand(m, c, k)
                continue  // look at the first small entry again
            }
            if !src.isCompound && m.dst[k].isCompound {
                m.engineSource[k].rawValue &= ~MigratePFN.migrate
            }
            let unit = src.isCompound ? PageSize.pagesPerPMD : 1
            if dKind == .deviceCoherent && !srcIsDevice && m.engineSource[k].isMigrating {
                let protection = c.region.protection(page: c.first + k)
                if !run.extend(k, d, unit, protection) {
                    mapRun(m, c, run)
                    run = CoherentRun(first: k, frame: d, pages: unit, protection: protection)
                }
            }
            k += unit
        }
        mapRun(m, c, run)
    }

    /// Entries going to coherent memory whose pages and frames are both adjacent, with one protection:
    /// one mapping.
    private struct CoherentRun {
        var first = 0
        var frame = PFN(0)
        var pages = 0
        var protection: Protection = []

        mutating func extend(_ k: Int, _ d: PFN, _ unit: Int, _ p: Protection) -> Bool {
            if pages == 0 {
                (first, frame, pages, protection) = (k, d, unit, p)
                return true
            }
            guard k == first + pages, d == frame + pages, p == protection else { return false }
            pages += unit
            return true
        }
    }

    /// Into coherent memory: the frames, which hold the bytes now, are mapped over the pages' holes here,
    /// so the entries move only if the host allows the mapping (else they stay in RAM).
    private func mapRun(_ m: MigrateVMA, _ c: NativeMigration, _ run: CoherentRun) {
        guard run.pages > 0 else { return }
        let at = m.start + UInt64(run.first) << UInt64(PageSize.shift)
        if !mapCoherent(c.region, at: at, frame: run.frame, pages: run.pages) {
            for k in run.first..<(run.first + run.pages) { m.engineSource[k].rawValue &= ~MigratePFN.migrate }
        }
    }

    /// A compound source at `k` the driver answered with small pages: 512 small entries.
    private func expand(_ m: MigrateVMA, _ c: NativeMigration, _ k: Int) {
        let src = m.engineSource[k]
        let flags = MigratePFN.migrate | (src.rawValue & MigratePFN.write)
        guard let s = src.pfn else {
            for j in 0..<PageSize.pagesPerPMD { m.engineSource[k + j] = MigratePFN(rawValue: flags) }
            return
        }
        if machine.deviceKind(s) != nil {
            // Each page now holds its own reference on the device folio (still locked once, at its head).
            for _ in 1..<PageSize.pagesPerPMD { machine.folioGet(s) }
            for j in 0..<PageSize.pagesPerPMD {
                let i = c.first + k + j
                c.region.setState(i, PageState(rawValue: c.region.state(i).rawValue & ~PageState.compoundBit))
            }
        } else {
            c.expandedStaging.append(s)
        }
        for j in 0..<PageSize.pagesPerPMD { m.engineSource[k + j] = MigratePFN(s + j, flags: flags) }
    }

    /// `migrate_vma_finalize`: every collected page ends unlocked in its new or old place — a device page
    /// that moved to RAM is copied (4 KiB runs) or moved (2 MiB) into its hole and its device reference
    /// dropped; a system page that moved to a device becomes a device word holding the destination's
    /// reference; anything that did not move goes back where it was (a staging frame moves back into
    /// its hole). Destinations not used are released.
    public func migrateFinalize(_ m: MigrateVMA, accepted: Bool) {
        guard let c = m.engineContext as? NativeMigration else { return }
        let region = c.region
        let n = c.locked.count
        // 4 KiB device pages coming home are copied in runs; their words turn host and their RAM
        // destinations are released only once the bytes are in place.
        var copyBatch = MoveBatch()
        var copied: [Int] = []
        // Device references to drop, after every device folio this migration locked is unlocked (a put
        // may free the folio, and the driver may hand it out again at once).
        var puts: [PFN] = []
        func flushCopies() {
            guard copyBatch.count > 0 else { return }
            let at = m.start + UInt64(copyBatch.first) << UInt64(PageSize.shift)
            // The words say "home" (still locked) before the bytes land and wake the toucher.
            for k in copied { region.setState(c.first + k, PageState.host.locked) }
            if !installFrame(copyBatch.firstFrame, at: at, pages: copyBatch.count, move: false,
                             unlessZapped: (region, c.first + copyBatch.first)) {
                // A MADV_DONTNEED came while some were away: those get nothing back, the others their bytes.
                for (j, k) in copied.enumerated() {
                    installFrame(copyBatch.firstFrame + j, at: at + UInt64(j) << UInt64(PageSize.shift), pages: 1,
                                 move: false, unlessZapped: (region, c.first + k))
                }
            }
            for k in copied {
                region.setState(c.first + k, .host)
                if let d = m.dst[k].pfn { releaseDestination(d) }
            }
            copied.removeAll(keepingCapacity: true)
            copyBatch = MoveBatch()
        }
        // Pages a MADV_DONTNEED dropped while they were away get no bytes back (their zap is applied as
        // they unlock); the marks of every remove event read so far are set once the reader is past it.
        waitForReader()
        var k = 0
        while k < n {
            guard c.locked[k] else {
                if let d = m.dst[k].pfn { releaseDestination(d) }
                k += 1
                continue
            }
            let src = m.engineSource[k]
            let unit = src.isCompound ? PageSize.pagesPerPMD : 1
            let i = c.first + k
            let a = m.start + UInt64(k) << UInt64(PageSize.shift)
            let dst = m.dst[k].pfn
            let zapped = unit == 1 && region.state(i).isZapped
            let moved = MigrationRules.moves(src, to: dst, accepted: accepted)
            if zapped, let s = src.pfn {
                // Dropped while away: nothing comes back; the device copy or staging frame is freed —
                // a coherent destination already mapped in place (by `migratePages`) is unmapped first.
                if moved, let d = dst, machine.deviceKind(d) == .deviceCoherent, machine.deviceKind(s) == nil,
                    replaceWithHole(region, at: a, pages: unit) == .refused
                {
                    // The host would not unmap it: the page stays in the coherent frame.
                    machine.folioUnlock(d)
                    region.setState(i, PageState(.device, pfn: d, writable: src.isWritable))
                    try? machine.releaseMigrationPage(s)
                    statistics.count(\.coherentStranded)
                    k += 1
                    continue
                }
                if machine.deviceKind(s) != nil { puts.append(machine.folioHead(s)) } else { try? machine.releaseMigrationPage(s) }
                if let d = dst { releaseDestination(d) }
                region.setState(i, .host)
                k += 1
                continue
            }
            if let s = src.pfn, machine.deviceKind(s) != nil {
                // Device → RAM.
                if moved, let d = dst {
                    if unit == 1 {
                        if !copyBatch.append(k, d) {
                            flushCopies()
                            _ = copyBatch.append(k, d)
                        }
                        copied.append(k)
                    } else {
                        flushCopies()
                        for j in 0..<unit { region.setState(i + j, PageState.host.locked) }
                        installFrame(d, at: a, pages: unit, move: true, unlessZapped: (region, i))
                        for j in 0..<unit { region.setState(i + j, .host) }
                        releaseDestination(d)
                    }
                    puts.append(machine.folioHead(s))
                } else {
                    if let d = dst { releaseDestination(d) }
                    // Coherent memory stays: mapped in place again (collect put a hole there).
                    if machine.deviceKind(s) == .deviceCoherent {
                        flushCopies()
                        remapCoherent(region, i, s, unit: unit, &puts)
                        k += unit
                        continue
                    }
                    for j in 0..<unit { region.setState(i + j, region.state(i + j).unlocked) }
                }
            } else {
                // RAM (a staging frame or a hole) → device, or a hole → RAM.
                if moved, let d = dst {
                    if machine.deviceKind(d) == nil {
                        flushCopies()
                        for j in 0..<unit { region.setState(i + j, PageState.host.locked) }
                        installFrame(d, at: a, pages: unit, move: unit > 1, unlessZapped: (region, i))
                        for j in 0..<unit { region.setState(i + j, .host) }
                        releaseDestination(d)
                    } else {
                        // Writable as the page was (its migration entry's kind); a hole as its region allows
                        // (`migrate_vma_insert_page`).
                        let writable = src.pfn == nil ? region.protection(page: i).contains(.write) : src.isWritable
                        // Unlocked first: a zap applied as the word unlocks may free the folio at once.
                        machine.folioUnlock(d)
                        for j in 0..<unit {
                            region.setState(i + j, PageState(.device, pfn: d + j, writable: writable,
                                                             compound: m.dst[k].isCompound))
                        }

                    }
                } else {
                    if let s = src.pfn {
                        flushCopies()
                        for j in 0..<unit { region.setState(i + j, PageState.host.locked) }
                        installFrame(s, at: a, pages: unit, move: true, unlessZapped: (region, i))
                    }
                    for j in 0..<unit { region.setState(i + j, .host) }
                    if let d = dst { releaseDestination(d) }
                }
                if let s = src.pfn, machine.folioHead(s) == s, !c.expandedStaging.contains(s) {
                    try? machine.releaseMigrationPage(s)
                }
            }
            k += unit
        }
        flushCopies()
        // Pages whose address the program took back while they were collected: whatever was put back
        // missed them (every install asks the host first), and they end unmapped.
        if !c.gone.isEmpty { forgetUnmapped(region, c.gone.map { c.first + $0 }) }
        for s in c.expandedStaging { try? machine.releaseMigrationPage(s) }
        for head in c.lockedHeads where head != c.faultHead { machine.folioUnlock(head) }
        for head in puts { machine.folioPut(head) }
        m.engineContext = nil
    }

    /// A coherent page whose migration to RAM did not happen: its frame is mapped in place again. If the
    /// host refuses, the bytes are copied into the hole and the page stays in RAM (its device
    /// reference is dropped after the unlock, with `puts`), so nothing is lost.
    private func remapCoherent(_ region: NativeRegion, _ i: Int, _ s: PFN, unit: Int, _ puts: inout [PFN]) {
        let a = region.pageAddress(i)
        if mapCoherent(region, at: a, frame: s, pages: unit) {
            for j in 0..<unit {
                region.setState(i + j, PageState(rawValue: region.state(i + j).rawValue & ~PageState.awayBit).unlocked)
            }
            return
        }
        for j in 0..<unit { region.setState(i + j, PageState.host.locked) }
        installFrame(s, at: a, pages: unit, move: false, unlessZapped: (region, i))
        for j in 0..<unit { region.setState(i + j, .host) }
        puts.append(machine.folioHead(s))
    }

    /// Gives back a destination the driver allocated (locked, one reference) that was not used, or a RAM
    /// destination whose bytes are now in the process.
    private func releaseDestination(_ d: PFN) {
        if let pm = machine.pagemap(of: d) { pm.unlockAndPut(d) } else { try? machine.releaseMigrationPage(d) }
    }
}

/// A run of pages consecutive both in a migration and in RAM: one ioctl moves or copies it.
struct MoveBatch {
    var first = 0
    var firstFrame = PFN(0)
    var count = 0

    /// Adds entry `k` with frame `frame` if it extends the run; false otherwise.
    mutating func append(_ k: Int, _ frame: PFN) -> Bool {
        if count == 0 {
            first = k
            firstFrame = frame
            count = 1
            return true
        }
        guard k == first + count, frame == firstFrame + count else { return false }
        count += 1
        return true
    }
}
