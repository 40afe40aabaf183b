import Synchronization

// The frames of a migration, for the driver that fills its destinations: allocating and releasing
// destination pages, the device copy engine (`copyPage`, `copyPages`, `zeroPage`), frame addresses.
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
