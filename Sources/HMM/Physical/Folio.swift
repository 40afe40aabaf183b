import Synchronization

/// Folio-level reference counting and allocation on top of the frame table (`include/linux/mm.h`,
/// `mm/swap.c`). A folio is named by its head PFN.
extension Machine {
    /// `GUP_PIN_COUNTING_BIAS`: what a `FOLL_PIN` adds to a small folio's refcount.
    static let pinBias: Int32 = 1024

    /// Sets up freshly allocated frames as a folio with `refcount` references.
    func prepareFolio(_ head: PFN, order: Int, flags: FrameFlags, refcount: Int32 = 1) {
        let orderBits = UInt64(order) << FrameFlags.orderShift | frames.record(head).pointee.flags.load(ordering: .relaxed) & FrameFlags.pagemapMask
        let r = frames.record(head)
        r.pointee.flags.store(flags.rawValue | orderBits | (order > 0 ? FrameFlags.head.rawValue : 0), ordering: .relaxed)
        r.pointee.refcount.store(refcount, ordering: .relaxed)
        r.pointee.mapcount.store(0, ordering: .relaxed)
        if order > 0 {
            for i in 1..<(1 << order) {
                let t = frames.record(head + i)
                t.pointee.flags.store(flags.rawValue | orderBits | FrameFlags.tail.rawValue, ordering: .relaxed)
                t.pointee.refcount.store(0, ordering: .relaxed)
                t.pointee.mapcount.store(0, ordering: .relaxed)
                t.pointee.mapping.store(0, ordering: .relaxed)
                t.pointee.index.store(0, ordering: .relaxed)
            }
        }
        // The release below publishes the metadata to other threads that later find the folio.
        r.pointee.flags.bitwiseOr(0, ordering: .releasing)
    }

    /// Allocates a folio of `order` with one reference, zero-filled when `zeroed` (every frame handed to
    /// a user mapping is zeroed so no byte of another space can leak through reuse).
    func allocateFolio(order: Int, zeroed: Bool) -> PFN? {
        guard let pfn = allocator.allocate(order: order) else { return nil }
        prepareFolio(pfn, order: order, flags: [])
        if zeroed {
            pointer(pfn).initializeMemory(as: UInt8.self, repeating: 0, count: PageSize.base << order)
        }
        return pfn
    }

    @inline(__always) func refcount(_ head: PFN) -> Int32 {
        frames.record(head).pointee.refcount.load(ordering: .acquiring)
    }

    /// `folio_ref_add`.
    @inline(__always) func getFolio(_ head: PFN, _ n: Int32 = 1) {
        frames.record(head).pointee.refcount.wrappingAdd(n, ordering: .relaxed)
    }

    /// `folio_try_get`: a reference unless the folio is free or frozen (refcount 0).
    func tryGetFolio(_ head: PFN) -> Bool {
        let r = frames.record(head)
        var old = r.pointee.refcount.load(ordering: .relaxed)
        while old > 0 {
            let (ok, cur) = r.pointee.refcount.compareExchange(expected: old, desired: old + 1, ordering: .acquiringAndReleasing)
            if ok { return true }
            old = cur
        }
        return false
    }

    /// `folio_put_refs`: drops references and frees the folio when the last one goes.
    @inline(__always) func putFolio(_ head: PFN, _ n: Int32 = 1) {
        let new = frames.record(head).pointee.refcount.wrappingSubtract(n, ordering: .acquiringAndReleasing).newValue
        precondition(new >= 0, "refcount underflow on \(head)")
        if new == 0 { freeFolio(head) }
    }

    /// Returns a folio whose refcount reached zero to its allocator.
    private func freeFolio(_ head: PFN) {
        let f = frames.flags(head)
        precondition(!f.contains(.reserved), "freeing reserved frame \(head)")
        precondition(!f.contains(.locked), "freeing locked folio \(head)")
        let order = frames.order(head)
        for i in 0..<(1 << order) {
            let r = frames.record(head + i)
            precondition(r.pointee.mapcount.load(ordering: .relaxed) == 0, "freeing \(head + i) while still mapped")
            r.pointee.mapping.store(0, ordering: .relaxed)
            r.pointee.index.store(0, ordering: .relaxed)
            r.pointee.driverData.store(0, ordering: .relaxed)
            if i > 0 { r.pointee.flags.bitwiseAnd(FrameFlags.pagemapMask, ordering: .relaxed) }
        }
        if order > 0 {
            precondition(entireMapcount(head) == 0, "freeing PMD-mapped \(head)")
            frames.record(head + 1).pointee.refcount.store(0, ordering: .relaxed)
            frames.record(head + 2).pointee.refcount.store(0, ordering: .relaxed)
        }
        if f.rawValue & FrameFlags.pagemapMask != 0 {
            freeDeviceFolio(head, order: order)
            return
        }
        if f.contains(.hugetlb) {
            prepareFolio(head, order: order, flags: .hugetlb, refcount: 0)
            hugetlb.give(head)
            return
        }
        allocator.free(head, order: order)
    }

    // MARK: mapcounts

    /// PTE-level mapcount of one page.
    @inline(__always) func pageMapcount(_ pfn: PFN) -> Int32 {
        frames.record(pfn).pointee.mapcount.load(ordering: .relaxed)
    }

    @inline(__always) func addPageMapcount(_ pfn: PFN, _ n: Int32) {
        frames.record(pfn).pointee.mapcount.wrappingAdd(n, ordering: .relaxed)
    }

    /// `folio_entire_mapcount`: PMD mappings of a large folio.
    /// Kept in the second tail's otherwise unused refcount field (large folios are order 9).
    @inline(__always) func entireMapcount(_ head: PFN) -> Int32 {
        frames.record(head + 2).pointee.refcount.load(ordering: .relaxed)
    }

    @inline(__always) func addEntireMapcount(_ head: PFN, _ n: Int32) {
        frames.record(head + 2).pointee.refcount.wrappingAdd(n, ordering: .relaxed)
    }

    /// Every mapping of a folio, PTE and PMD.
    func totalMapcount(_ head: PFN) -> Int32 {
        let order = frames.order(head)
        if order == 0 { return pageMapcount(head) }
        var n = entireMapcount(head)
        for i in 0..<(1 << order) { n += pageMapcount(head + i) }
        return n
    }

    // MARK: pins

    /// `folio_maybe_dma_pinned`.
    func maybeDMAPinned(_ head: PFN) -> Bool {
        if frames.order(head) > 0 { return frames.record(head + 1).pointee.refcount.load(ordering: .relaxed) > 0 }
        return refcount(head) >= Self.pinBias
    }

    /// Takes a `FOLL_PIN` reference; returns the refcount units taken.
    func pinFolio(_ head: PFN) -> Int32 {
        if frames.order(head) > 0 {
            getFolio(head)
            frames.record(head + 1).pointee.refcount.wrappingAdd(1, ordering: .relaxed)
            return 1
        }
        getFolio(head, Self.pinBias)
        return Self.pinBias
    }

    /// Drops a `FOLL_PIN` reference (`unpin_user_page`).
    func unpinFolio(_ head: PFN) {
        if frames.order(head) > 0 {
            frames.record(head + 1).pointee.refcount.wrappingSubtract(1, ordering: .relaxed)
            putFolio(head)
        } else {
            putFolio(head, Self.pinBias)
        }
    }

    /// Records that `pfn` (one page) is now mapped by an anonymous mapping at linear index `index`.
    func setAnonRmap(_ pfn: PFN, anonVMA: AnonVMA, index: UInt64, exclusive: Bool) {
        anonVMA.attach()
        let r = frames.record(pfn)
        r.pointee.mapping.store(anonVMA.handle, ordering: .relaxed)
        r.pointee.index.store(index, ordering: .relaxed)
        var f: FrameFlags = [.anon]
        if exclusive { f.insert(.anonExclusive) }
        frames.setFlags(pfn, f)
    }
}
