import Synchronization

/// The words of ``HMMRange/pfns`` (`HMM_PFN_*` in `include/linux/hmm.h`, 64-bit values): low bits the frame,
/// high bits flags.
public enum HMMPFN {
    /// `HMM_PFN_VALID` (out) / `HMM_PFN_REQ_FAULT` (in).
    public static let valid: UInt64 = 1 << 63
    /// `HMM_PFN_WRITE` (out) / `HMM_PFN_REQ_WRITE` (in).
    public static let write: UInt64 = 1 << 62
    /// `HMM_PFN_ERROR`: no VMA, no read permission, or a special mapping.
    public static let error: UInt64 = 1 << 61
    /// `HMM_PFN_DMA_MAPPED` (sticky).
    public static let dmaMapped: UInt64 = 1 << 60
    /// `HMM_PFN_P2PDMA` (sticky).
    public static let p2pdma: UInt64 = 1 << 59
    /// `HMM_PFN_P2PDMA_BUS` (sticky).
    public static let p2pdmaBus: UInt64 = 1 << 58
    /// `HMM_PFN_ORDER_SHIFT`: a 5-bit map-order field.
    public static let orderShift: UInt64 = 53
    /// `HMM_PFN_REQ_FAULT`.
    public static let requestFault: UInt64 = valid
    /// `HMM_PFN_REQ_WRITE`.
    public static let requestWrite: UInt64 = write
    /// `HMM_PFN_FLAGS`: every flag bit.
    public static let flagsMask: UInt64 = ~((1 << orderShift) - 1)
    /// Flags kept from input to output (`HMM_PFN_INOUT_FLAGS`).
    @_spi(Engine) public static let inOut: UInt64 = dmaMapped | p2pdma | p2pdmaBus

    /// The frame of a word (`hmm_pfn_to_page`).
    public static func pfn(_ word: UInt64) -> PFN { PFN(word & ~flagsMask) }
    /// The CPU mapping order (`hmm_pfn_to_map_order`): 0 or 9.
    public static func mapOrder(_ word: UInt64) -> Int { Int((word >> orderShift) & 0x1F) }
}

/// What an engine's `hmm_range_fault` walk shares: the request of a page, the decision to fault
/// (`hmm_pte_need_fault`), and the output word (`pte_to_hmm_pfn_flags` with the frame).
@_spi(Engine)
extension HMMPFN {
    /// The request for a page whose input word is `word` (`pfn_req_flags & pfn_flags_mask |
    /// default_flags`); 0 when the range asks no page to be faulted at all (`mayFault` false).
    @inline(__always)
    public static func request(_ word: UInt64, mask: UInt64, defaultFlags: UInt64, mayFault: Bool) -> UInt64 {
        mayFault ? (word & mask) | defaultFlags : 0
    }

    /// Whether a range's flags may ask for any fault (`(mask | default) & HMM_PFN_REQ_FAULT`).
    @inline(__always)
    public static func mayFault(mask: UInt64, defaultFlags: UInt64) -> Bool {
        (mask | defaultFlags) & requestFault != 0
    }

    /// `hmm_pte_need_fault`: what the walk must do for a page requested `request` whose CPU mapping
    /// gives the flags of `cpu` (a word of ``word(_:writable:order:)``, or 0 for none): nothing when no
    /// fault is requested; a write fault when a write is requested and the mapping is not writable; a
    /// read fault when the mapping is not valid.
    @inline(__always)
    public static func needFault(_ request: UInt64, _ cpu: UInt64) -> NeedFault {
        if _fastPath(request & requestFault == 0) { return .none }
        if request & requestWrite != 0 && cpu & write == 0 { return .write }
        return cpu & valid == 0 ? .read : .none
    }

    /// `hmm_pte_need_fault`'s answer.
    public enum NeedFault {
        case none, read, write
    }

    /// The word for frame `pfn` mapped by the CPU through a PTE (`pte_to_hmm_pfn_flags`): valid, and
    /// writable if the mapping is.
    @inline(__always)
    public static func word(_ pfn: PFN, writable: Bool) -> UInt64 {
        valid | (writable ? write : 0) | pfn.rawValue
    }

    /// The word for frame `pfn` mapped with map order `order` (`pmd_to_hmm_pfn_flags`: 9 for a PMD; 0
    /// is a PTE's word).
    @inline(__always)
    public static func word(_ pfn: PFN, writable: Bool, order: Int) -> UInt64 {
        word(pfn, writable: writable) | UInt64(truncatingIfNeeded: order) << orderShift
    }

    /// Stores the walk's output `out` for a page, keeping the input's sticky flags (``inOut``).
    @inline(__always)
    public static func store(_ out: UInt64, _ words: UnsafeMutablePointer<UInt64>, _ k: Int) {
        words[k] = words[k] & inOut | out
    }
}

/// `struct hmm_range`: what a device wants to mirror and how.
extension HMMRange {
    /// The checks `hmm_range_fault` makes of its arguments on every engine: page-aligned and non-empty,
    /// below the top of user space, one word per page, and a notifier of `space`.
    /// - Throws: `.invalidArgument`.
    @_spi(Engine) public func validate(for space: any MirroredAddressSpace) throws(HMMError) {
        guard start & PageSize.baseMask == 0, end & PageSize.baseMask == 0, start < end, end <= PageTableIndex.userTop,
            pfns.count == Int((end - start) >> UInt64(PageSize.shift))
        else { throw .invalid("hmm_range \(hex(start))..<\(hex(end)) is malformed") }
        guard notifier.space === space else { throw .invalid("hmm_range notifier belongs to another space") }
    }
}

public struct HMMRange: Sendable {
    /// The interval notifier covering the range; its space is the one walked.
    public let notifier: IntervalNotifier
    /// The value ``IntervalNotifier/readBegin()`` returned for this attempt.
    public var notifierSeq: UInt64
    public let start: UInt64
    /// Exclusive.
    public let end: UInt64
    /// One word per page: request flags in, ``HMMPFN`` words out.
    public var pfns: [UInt64]
    /// Flags requested for every page (`default_flags`).
    public var defaultFlags: UInt64
    /// Which bits of each input word count as per-page requests (`pfn_flags_mask`).
    public var pfnFlagsMask: UInt64
    /// Device-private pages of this owner are reported (never faulted) instead of migrated back.
    public var devicePrivateOwner: (any AnyObject & Sendable)?

    /// The most pages one range may cover (its `pfns` take 8 bytes a page): larger mirrors fault in
    /// pieces, as drivers do.
    public static let maximumPages = 1 << 20

    /// A range over `[start, end)` with zeroed words.
    /// - Throws: `.invalidArgument` for an unaligned or empty range, one outside user space, or one longer
    ///   than ``maximumPages``.
    public init(
        notifier: IntervalNotifier, start: UInt64, end: UInt64, defaultFlags: UInt64 = 0, pfnFlagsMask: UInt64 = 0,
        devicePrivateOwner: (any AnyObject & Sendable)? = nil
    ) throws(HMMError) {
        guard start & PageSize.baseMask == 0, end & PageSize.baseMask == 0, start < end, end <= PageTableIndex.userTop else {
            throw .invalid("hmm_range \(hex(start))..<\(hex(end)) is unaligned, empty or outside user space")
        }
        guard (end - start) >> UInt64(PageSize.shift) <= UInt64(Self.maximumPages) else {
            throw .invalid("hmm_range \(hex(start))..<\(hex(end)) is longer than \(Self.maximumPages) pages")
        }
        self.notifier = notifier
        notifierSeq = 0
        self.start = start
        self.end = end
        pfns = Array(repeating: 0, count: Int((end - start) >> UInt64(PageSize.shift)))
        self.defaultFlags = defaultFlags
        self.pfnFlagsMask = pfnFlagsMask
        self.devicePrivateOwner = devicePrivateOwner
    }
}

/// `hmm_range_fault` (`mm/hmm.c`).
extension AddressSpace {
    /// Fills `range.pfns` with what the CPU page table maps, faulting pages in where the request flags
    /// ask for it. Requires `mmapLock` held for reading (``MirroredAddressSpace/withMmapReadLock(_:)``).
    ///
    /// Device-private pages of `devicePrivateOwner` are reported, never faulted — even when a write is
    /// requested and the entry is read-only (after fork or mprotect): the word then lacks
    /// ``HMMPFN/write``, and retrying cannot change that. A driver that needs to write such a page
    /// migrates it back to system memory first (so the fault can break copy-on-write) or gives up.
    /// - Throws: `.busy` (the range was invalidated since `notifierSeq`: read-begin again and retry),
    ///   `.fault` (a page requested valid cannot be: no VMA, no read permission, poison),
    ///   `.permission` (write requested on a read-only VMA), `.invalidArgument` (unaligned or empty
    ///   range, wrong word count, notifier of another space), `.outOfMemory`, `.noProcess`.
    public func rangeFault(_ range: inout HMMRange) throws(HMMError) {
        try range.validate(for: self)
        try checkAlive()
        var last = range.start
        let seq = range.notifierSeq
        let owner = range.devicePrivateOwner
        let mask = range.pfnFlagsMask
        let dflt = range.defaultFlags
        let mayFault = HMMPFN.mayFault(mask: mask, defaultFlags: dflt)
        while true {
            if range.notifier.checkRetry(seq) { throw HMMError(.busy, "hmm_range invalidated; retry") }
            let stop = try range.pfns.withUnsafeMutableBufferPointer { (words) throws(HMMError) -> UInt64? in
                try walk(from: last, range.start, range.end, words.baseAddress!, mask, dflt, mayFault, owner)
            }
            guard let faultAt = stop else { break }
            last = faultAt
        }
        #if DEBUG
        machine.hooks.fire(.rangeFaultAfterWalk)
        #endif
    }

    /// One walk from `from`; returns the address at which it faulted (walk again from there), or nil.
    private func walk(
        from: UInt64, _ start: UInt64, _ end: UInt64, _ words: UnsafeMutablePointer<UInt64>,
        _ mask: UInt64, _ dflt: UInt64, _ mayFault: Bool, _ owner: (any AnyObject & Sendable)?
    ) throws(HMMError) -> UInt64? {
        var a = from
        let shift = UInt64(PageSize.shift)
        @inline(__always) func request(_ i: Int) -> UInt64 {
            HMMPFN.request(words[i], mask: mask, defaultFlags: dflt, mayFault: mayFault)
        }
        while a < end {
            let vi = vmaIndex(containing: a)
            let next = firstVMA(endingAfter: a)
            let vmaEnd = vi.map { min(end, vmas[$0].end) } ?? (next < vmas.count ? min(end, vmas[next].start) : end)
            guard let vi, vmas[vi].readable else {
                var b = a
                while b < vmaEnd {
                    let i = Int((b - start) >> shift)
                    if HMMPFN.needFault(request(i), 0) != .none {
                        throw HMMError(.fault, "hmm_range_fault: \(hex(b)) has no readable mapping")
                    }
                    HMMPFN.store(HMMPFN.error, words, i)
                    b += UInt64(PageSize.base)
                }
                a = vmaEnd
                continue
            }
            let vma = vmas[vi]
            while a < vmaEnd {
                let stepEnd = min(vmaEnd, (a | PageSize.pmdMask) + 1)
                let pmdN = try pmdNode(a, allocate: false)
                let pmd = pmdN == 0 ? PageTableEntry.none : PageTableEntry(rawValue: pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
                if pmd.isTable {
                    if let (f, w) = walkPTEs(pmd.node, a, stepEnd, start, words, request, owner) {
                        try faultForRange(vma, f, write: w)
                        return f
                    }
                    a = stepEnd
                    continue
                }
                while a < stepEnd {
                    let i = Int((a - start) >> shift)
                    let req = request(i)
                    var out: UInt64 = 0
                    if pmd.isLeaf {
                        out = HMMPFN.word(pmd.pfn + PageTableIndex.pte(a), writable: pmd.isWritable, order: PageSize.pmdOrder)
                        if HMMPFN.needFault(req, out) == .write {
                            try faultForRange(vma, a, write: true)
                            return a
                        }
                    } else if pmd.isDevicePrivate, let owner, machine.pagemap(of: pmd.pfn)?.owner === owner {
                        // `hmm_vma_handle_absent_pmd`: this owner's device THP, reported, never faulted.
                        out = HMMPFN.word(pmd.pfn + PageTableIndex.pte(a), writable: pmd.kind == .devicePrivateWrite,
                                          order: PageSize.pmdOrder)
                    } else {
                        // None (or no table at all), a foreign device THP or a PMD migration entry: fault.
                        let need = HMMPFN.needFault(req, 0)
                        if need != .none {
                            try faultForRange(vma, a, write: need == .write)
                            return a
                        }
                        if pmd.isDevicePrivate { out = HMMPFN.error }  // a foreign device THP, no fault requested
                    }
                    HMMPFN.store(out, words, i)
                    a += UInt64(PageSize.base)
                }
            }
        }
        return nil
    }

    /// One PTE table under its lock; returns the first page that needs a fault (and whether for write).
    @inline(__always)
    private func walkPTEs(
        _ pteN: UInt32, _ lo: UInt64, _ hi: UInt64, _ start: UInt64, _ words: UnsafeMutablePointer<UInt64>,
        _ request: (Int) -> UInt64, _ owner: (any AnyObject & Sendable)?
    ) -> (UInt64, Bool)? {
        let lock = pool.lock(pteN)
        let ptes = pool.entries(pteN)
        let ramFrames = UInt64(machine.totalFrames)
        lock.lock()
        defer { lock.unlock() }
        var b = lo
        var idx = PageTableIndex.pte(lo)
        var i = Int((lo - start) >> UInt64(PageSize.shift))
        while b < hi {
            let e = PageTableEntry(rawValue: ptes[idx].load(ordering: .relaxed))
            let req = request(i)
            var out: UInt64 = 0
            if e.isPresent {
                if !e.isSpecial || e.pfn == machine.zeroPFN {
                    out = HMMPFN.word(e.pfn, writable: e.isWritable)
                    // (`req != 0` first: a snapshot asks for nothing, and the walk stays as tight as a
                    // bare entry scan.)
                    if req != 0 && HMMPFN.needFault(req, out) == .write { return (b, true) }
                } else {
                    let need = HMMPFN.needFault(req, 0)
                    if need != .none { return (b, need == .write) }
                    out = HMMPFN.error
                }
            } else if !e.isNone, e.isDevicePrivate, e.pfn.rawValue >= ramFrames, let owner,
                machine.pagemap(of: e.pfn)?.owner === owner
            {
                out = HMMPFN.word(e.pfn, writable: e.kind == .devicePrivateWrite)
            } else {
                let need = HMMPFN.needFault(req, 0)
                if need != .none { return (b, need == .write) }
            }
            HMMPFN.store(out, words, i)
            b += UInt64(PageSize.base)
            idx += 1
            i += 1
        }
        return nil
    }

    /// `hmm_vma_fault`: one page, as `handle_mm_fault(FAULT_FLAG_REMOTE)` would.
    private func faultForRange(_ vma: VMA, _ a: UInt64, write: Bool) throws(HMMError) {
        if write && !vma.writable { throw HMMError(.permission, "hmm_range_fault: write to read-only \(hex(a))") }
        // A migration entry: wait for it to go, then walk again.
        do {
            try handleFault(a, write ? .write : .read)
        } catch {
            throw error.code == .outOfMemory ? error : HMMError(.fault, "hmm_range_fault: \(error.message)")
        }
    }
}
