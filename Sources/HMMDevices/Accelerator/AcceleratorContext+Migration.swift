import HMM

/// The moves a fault servicer makes: system → device with the new pages mapped on the device, device →
/// system (eviction, release, a CPU touch) with the device's entries shot down first, and remote
/// mappings of host memory. Each takes the space's `mmapLock` for reading itself.
extension AcceleratorContext {
    /// Migrates the system pages (and never-touched holes) of `runs` to device memory and maps them on the
    /// device; pages already there, or that cannot move (pinned, shared, another device's), are left
    /// as they are. Returns the pages migrated; the addresses of pages the migration could not collect
    /// (pinned, shared, another device's — not a page the CPU took back meanwhile) are appended to
    /// `refused` when given.
    /// - Throws: `.outOfMemory` when device memory has fewer free pages than a run needs (nothing of that
    ///   run moves; earlier runs stay moved) — a servicer evicts first; `.invalidArgument` for a run
    ///   outside the space's mappings.
    public func migrateToDevice(_ runs: [Swift.Range<UInt64>], cause: MigrationCause,
                                refused: UnsafeMutablePointer<[UInt64]>? = nil) throws(HMMError) -> Int {
        var total = 0
        try space.withMmapReadLock { () throws(HMMError) in
            for run in runs where !run.isEmpty {
                let m = try MigrateVMA(space: space, start: run.lowerBound, end: run.upperBound, select: .system,
                                       owner: accelerator)
                m.cause = cause
                try m.setup()
                // A hole of a writable mapping becomes a writable page (the migration entry of a hole
                // carries no write bit).
                let holesWritable = space.mappingHoldingLock(containing: run.lowerBound)?.protection.contains(.write) ?? false
                var entries: [(UInt64, UInt64)] = []
                do throws(HMMError) {
                    let want = (0..<m.npages).filter { m.src[$0].isMigrating }
                    if let refused {
                        for i in 0..<m.npages where !m.src[i].isMigrating {
                            let a = m.start + UInt64(i) << UInt64(PageSize.shift)
                            // Already this device's: nothing to refuse.
                            if !mapping(at: a).local { refused.pointee.append(a) }
                        }
                    }
                    guard !want.isEmpty else {
                        m.finalize()
                        continue
                    }
                    // A page the device maps remotely (host memory) is about to be copied: the device
                    // stops writing it first (this migration's own invalidation is not acted on).
                    var shot = false
                    mapLock.withLock { _ in
                        for i in want {
                            let a = m.start + UInt64(i) << UInt64(PageSize.shift)
                            if let slot = range(containing: a)?.slot(a), slot.pointee.load(ordering: .relaxed) != 0 {
                                slot.pointee.store(0, ordering: .relaxed)
                                shot = true
                            }
                        }
                    }
                    if shot { synchronizeWorkers() }
                    var pages = accelerator.allocatePages(want.count)
                    guard pages.count == want.count else {
                        accelerator.giveBack(pages)
                        throw HMMError(.outOfMemory, "\(accelerator) has \(pages.count) free pages, \(want.count) needed")
                    }
                    pages.sort(by: >)
                    for i in want {
                        let d = pages.removeLast()
                        let writable = m.src[i].isWritable || (m.src[i].pfn == nil && holesWritable)
                        m.dst[i] = MigratePFN(d, flags: writable ? MigratePFN.write : 0)
                        if let s = m.src[i].pfn { try machine.copyPage(from: s, to: d) } else { try machine.zeroPage(d) }
                        let bytes = UInt64(UInt(bitPattern: try machine.framePointer(d)))
                        entries.append((m.start + UInt64(i) << UInt64(PageSize.shift),
                                        bytes | Self.valid | Self.local | (writable ? Self.writable : 0)))
                    }
                    try m.pages()
                } catch {
                    m.finalize()
                    throw error
                }
                // Entries whose page moved (pages() may have refused some) are mapped before finalize
                // makes the CPU side point at the device pages.
                mapLock.withLock { _ in
                    for (a, value) in entries {
                        let i = Int((a - m.start) >> UInt64(PageSize.shift))
                        guard m.src[i].isMigrating, let r = range(containing: a) else { continue }
                        r.slot(a).pointee.store(value, ordering: .releasing)
                        total += 1
                    }
                }
                m.finalize()
            }
        }
        count { $0.pagesToDevice += total }
        return total
    }

    /// Moves this accelerator's pages in `range` back to system memory (an eviction, a release): the
    /// device's entries are shot down first, so the copy sees every device write. Returns the pages moved.
    /// - Throws: `.outOfMemory` (no system page: the rest stay on the device), `.invalidArgument`.
    public func evict(_ range: Swift.Range<UInt64>, cause: MigrationCause) throws(HMMError) -> Int {
        var total = 0
        try space.withMmapReadLock { () throws(HMMError) in
            var a = range.lowerBound
            while a < range.upperBound {
                guard let vma = space.mappingHoldingLock(containing: a) else {
                    // Nothing mapped here (unmapped by the process): nothing of ours can be here either.
                    a = (a | blockMask) + 1
                    continue
                }
                let next = min(range.upperBound, vma.end, (a | blockMask) + 1)
                var moved: [UInt64] = []
                total += try moveToSystem(a..<next, cause: cause, faultPage: nil, moved: &moved)
                a = next
            }
        }
        count { $0.pagesToSystem += total }
        return total
    }

    /// A CPU touched a device page: its fault window comes back (cause `.cpuFault`).
    func migrateToRAM(_ fault: DeviceFault) throws(HMMError) {
        var moved: [UInt64] = []
        let n = try moveToSystem(fault.range, cause: .cpuFault, faultPage: fault.page, moved: &moved)
        count { $0.pagesToSystem += n }
        if !moved.isEmpty { servicer.cpuFaultedBack(moved, write: fault.write, in: self) }
    }

    /// One piece (within a VMA) back to system memory. Requires `mmapLock` held.
    private func moveToSystem(_ piece: Swift.Range<UInt64>, cause: MigrationCause, faultPage: PFN?,
                              moved addresses: inout [UInt64]) throws(HMMError) -> Int {
        let m = try MigrateVMA(space: space, start: piece.lowerBound, end: piece.upperBound, select: .devicePrivate,
                               owner: accelerator, faultPage: faultPage)
        m.cause = cause
        do { try m.setup() } catch { throw faultPage == nil ? error : HMMError(.bus, "migrate_to_ram setup failed: \(error.message)") }
        var moved = 0
        do throws(HMMError) {
            // The device stops using the pages before their bytes are copied.
            for i in 0..<m.npages where m.src[i].isMigrating && m.src[i].pfn != nil {
                let a = m.start + UInt64(i) << UInt64(PageSize.shift)
                mapLock.withLock { _ in range(containing: a)?.slot(a).pointee.store(0, ordering: .relaxed) }
            }
            synchronizeWorkers()
            for i in 0..<m.npages where m.src[i].isMigrating {
                guard let s = m.src[i].pfn else { continue }
                guard let page = machine.allocateMigrationPage(zeroed: false) else {
                    throw HMMError(.outOfMemory, "no system page to move \(s) back")
                }
                m.dst[i] = MigratePFN(page, flags: m.src[i].isWritable ? MigratePFN.write : 0)
                try machine.copyPage(from: s, to: page)
                moved += 1
                addresses.append(m.start + UInt64(i) << UInt64(PageSize.shift))
            }
            try m.pages()
        } catch {
            m.finalize()
            throw error
        }
        m.finalize()
        return moved
    }

    /// Maps `range`'s pages on the device where they are — host memory, through `hmm_range_fault` —
    /// instead of migrating them (an accessed-by hint, or a page that cannot move); writable only when
    /// `write` asks for it (a read maps read-only, so a later write faults). Returns the pages mapped.
    /// - Throws: `.fault` (no mapping there), `.permission` (a write to a read-only mapping), `.busy`.
    public func mapRemote(_ range: Swift.Range<UInt64>, write: Bool) throws(HMMError) -> Int {
        var mapped = 0
        var a = range.lowerBound
        while a < range.upperBound {
            let next = min(range.upperBound, a + 32 << UInt64(PageSize.shift))
            var r = try HMMRange(notifier: notifier, start: a, end: next,
                                 defaultFlags: HMMPFN.requestFault | (write ? HMMPFN.requestWrite : 0),
                                 devicePrivateOwner: accelerator)
            try notifier.mirror(&r) { (snapshot) throws(HMMError) -> Bool in
                try mapLock.withLock { (_: inout Void) throws(HMMError) -> Bool in
                    if snapshot.notifier.readRetry(snapshot.notifierSeq) { return false }
                    for (i, w) in snapshot.pfns.enumerated() where w & HMMPFN.valid != 0 {
                        let page = snapshot.start + UInt64(i) << UInt64(PageSize.shift)
                        let pfn = HMMPFN.pfn(w)
                        let local = machine.pagemap(of: pfn)?.owner === accelerator
                        let bytes = UInt64(UInt(bitPattern: try machine.framePointer(pfn)))
                        self.range(containing: page)?.slot(page).pointee.store(
                            bytes | Self.valid | (local ? Self.local : 0) | (write && w & HMMPFN.write != 0 ? Self.writable : 0),
                            ordering: .releasing)
                        if !local { mapped += 1 }
                    }
                    return true
                }
            }
            a = next
        }
        count { $0.pagesMappedRemotely += mapped }
        return mapped
    }
}
