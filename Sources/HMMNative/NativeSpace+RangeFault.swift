import CUserfaultfd
import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// `hmm_range_fault` and `make_device_exclusive` on host memory.
extension NativeSpace {
    /// Fills `range.pfns` from `PAGEMAP_SCAN`, the state words and the region's protection, faulting
    /// pages in where requested with `MADV_POPULATE_READ`/`WRITE` from the caller's thread (a
    /// device-resident page then comes back through the fault thread and its driver). A CPU-resident
    /// page is reported as its host-window frame — a driver reads and writes it through
    /// `Machine.framePointer(_:)` like any frame — the zero page as `Machine.zeroPFN` (the huge
    /// one as `Machine.hugeZeroPFN`), a THP with map order 9, a device page of
    /// `devicePrivateOwner` as its device frame (never faulted). Requires `mmapLock` held for reading.
    ///
    /// The write bit comes from the region's protection and the zero page (`PAGEMAP_SCAN` has no
    /// writable category). A page shared with a child after a fork (``ForkPolicy/share``) is reported
    /// writable too: a device write goes through the host window, a store of this process, so the host
    /// copies the page first.
    /// - Throws: `.busy` (invalidated since `notifierSeq`), `.fault` (no region, not readable, a revoked
    ///   page, or a fault that failed), `.permission` (write requested on a read-only region),
    ///   `.invalidArgument` (malformed range, notifier of another space), `.noProcess` after close.
    public func rangeFault(_ range: inout HMMRange) throws(HMMError) {
        try range.validate(for: self)
        try checkOpen()
        var from = range.start
        var rounds = 0
        while true {
            if range.notifier.checkRetry(range.notifierSeq) { throw HMMError(.busy, "hmm_range invalidated; retry") }
            let request = RangeRequest(start: range.start, end: range.end, mask: range.pfnFlagsMask,
                                       defaultFlags: range.defaultFlags, owner: range.devicePrivateOwner)
            let need = try range.pfns.withUnsafeMutableBufferPointer { (words) throws(HMMError) -> (UInt64, Bool)? in
                try walk(request, from: from, words.baseAddress!)
            }
            guard let (a, write) = need else { return }
            rounds += 1
            if rounds > 64 { throw HMMError(.fault, "hmm_range_fault: \(a) would not stay faulted in") }
            let rc = faultIn(a, write: write)
            if rc != 0 && rc != -EAGAIN && rc != -EINTR {
                throw rc == -ENOMEM ? HMMError(.fault, "hmm_range_fault: nothing mapped at \(a)")
                    : HMMError.system(rc, "hmm_range_fault: faulting \(a)")
            }
            from = a
        }
    }

    /// One walk from `from`; returns the first page that must be faulted in (and whether for write).
    private func walk(_ range: RangeRequest, from: UInt64, _ words: UnsafeMutablePointer<UInt64>) throws(HMMError) -> (UInt64, Bool)? {
        let mask = range.mask
        let dflt = range.defaultFlags
        let mayFault = HMMPFN.mayFault(mask: mask, defaultFlags: dflt)
        let owner = range.owner
        let present = UInt64(CU_PAGE_IS_PRESENT)
        let zero = UInt64(CU_PAGE_IS_PFNZERO)
        let huge = UInt64(CU_PAGE_IS_HUGE)
        let zeroPFN = machine.zeroPFN
        let hugeZero = machine.hugeZeroPFN
        var a = from
        while a < range.end {
            let found = region(containing: a)
            // The pages from `a` with its protection stand for the rest of its VMA in the walk.
            let run = found.map { r in
                r.protectionRun(from: r.index(a), limit: min(r.pages, r.index(range.end + PageSize.baseMask)))
            }
            if found == nil, let (foreign, mapping) = try foreignMapping(containing: a, upTo: range.end) {
                let stop = min(foreign.end, nextRegionStart(after: a, before: range.end))
                if let need = try walkForeign(foreign, mapping, from: a, to: stop, rangeStart: range.start, mask: mask,
                                              defaultFlags: dflt, words) {
                    return need
                }
                a = stop
                continue
            }
            guard let region = found, let run, run.protection.contains(.read) else {
                let stop = found.flatMap { r in run.map { min(r.pageAddress($0.end), range.end) } }
                    ?? nextRegionStart(after: a, before: range.end)
                var b = a
                while b < stop {
                    let k = Int((b - range.start) >> UInt64(PageSize.shift))
                    let req = HMMPFN.request(words[k], mask: mask, defaultFlags: dflt, mayFault: mayFault)
                    if HMMPFN.needFault(req, 0) != .none { throw HMMError(.fault, "hmm_range_fault: \(b) has no readable mapping") }
                    HMMPFN.store(HMMPFN.error, words, k)
                    b += Sys.page
                }
                a = stop
                continue
            }
            let stop = min(range.end, region.pageAddress(run.end))
            let writableVMA = run.protection.contains(.write)
            var need: (UInt64, Bool)?
            try scan(a, stop) { (b, cat) throws(HMMError) in
                guard need == nil else { return }
                let k = Int((b - range.start) >> UInt64(PageSize.shift))
                let req = HMMPFN.request(words[k], mask: mask, defaultFlags: dflt, mayFault: mayFault)
                let wantWrite = req & HMMPFN.requestWrite != 0
                if wantWrite && !writableVMA { throw HMMError(.permission, "hmm_range_fault: write to read-only \(b)") }
                var s = region.state(region.index(b))
                while s.isMigrating {
                    // On the move (a fault resolving, a migration): it settles in microseconds.
                    sched_yield()
                    s = region.state(region.index(b))
                }
                var out: UInt64 = 0
                switch s.kind {
                case .device where isCoherent(s):
                    // CPU-addressable and mapped in place: reported like any present page, whoever owns it.
                    out = HMMPFN.word(s.pfn, writable: writableVMA, order: s.isCompound ? PageSize.pmdOrder : 0)
                case .device:
                    if let owner, let pm = machine.pagemap(of: s.pfn), pm.owner === owner {
                        out = HMMPFN.word(s.pfn, writable: s.isWritable && writableVMA,
                                          order: s.isCompound ? PageSize.pmdOrder : 0)
                    } else if HMMPFN.needFault(req, 0) != .none {
                        need = (b, wantWrite)
                        return
                    }
                case .revoked:
                    if HMMPFN.needFault(req, 0) != .none { throw HMMError(.fault, "hmm_range_fault: \(b) is poisoned") }
                    out = HMMPFN.error
                case .host where cat & present != 0:
                    let isZero = cat & zero != 0
                    let isHuge = cat & huge != 0
                    if wantWrite && isZero {
                        need = (b, true)
                        return
                    }
                    let pfn: PFN
                    if isZero {
                        pfn = isHuge ? hugeZero + Int((b & PageSize.pmdMask) >> UInt64(PageSize.shift)) : zeroPFN
                    } else {
                        pfn = region.window.firstPFN + region.index(b)
                    }
                    out = HMMPFN.word(pfn, writable: writableVMA && !isZero, order: isHuge ? PageSize.pmdOrder : 0)
                default:
                    // A hole, a page on the move, exclusive or on a foreign device: only a fault helps.
                    if HMMPFN.needFault(req, 0) != .none {
                        need = (b, wantWrite)
                        return
                    }
                }
                HMMPFN.store(out, words, k)
            }
            if let need { return need }
            a = stop
        }
        return nil
    }

    /// The start of the first region at or after `a`, or `limit`.
    private func nextRegionStart(after a: UInt64, before limit: UInt64) -> UInt64 {
        let next = regions.map(\.address).filter { $0 > a }.min() ?? limit
        return min(next, limit)
    }

    /// `make_device_exclusive`: the page at `address` moves into a staging RAM frame the device may use
    /// for atomics (`program` receives it, the page locked), and the next CPU or kernel touch moves it
    /// back and sends `clear` (`restoreExclusive(_:_:_:)`). The notifiers hear `exclusive` (owner)
    /// first. Requires `mmapLock` held for reading.
    /// - Throws: `.fault` (no region, not writable, revoked), `.outOfMemory` (no staging frame),
    ///   `.busy` (the host refused to move the page, or it is device-coherent memory mapped in place),
    ///   `.noProcess` after close.
    public func makeDeviceExclusive(
        _ address: UInt64, owner: (any AnyObject & Sendable)?, _ program: (PFN) -> Void
    ) throws(HMMError) {
        try checkOpen()
        let a = address & ~PageSize.baseMask
        guard let region = region(containing: a) else { throw HMMError(.fault, "no native region at \(a)") }
        guard region.protection(page: region.index(a)).contains(.write) else { throw HMMError(.fault, "\(a) is not writable") }
        let i = region.index(a)
        var rounds = 0
        while true {
            rounds += 1
            if rounds > 64 {
                if region.state(i).isZapPending {
                    throw HMMError(.busy, "make_device_exclusive: \(a) is being dropped (MADV_DONTNEED or MADV_FREE in progress)")
                }
                throw HMMError(.fault, "make_device_exclusive: \(a) would not stay faulted in")
            }
            let s = region.lock(i)
            switch s.kind {
            case .exclusive:
                program(s.pfn)
                region.setState(i, s)
                return
            case .revoked, .unmapped:
                region.setState(i, s)
                throw HMMError(.fault, "make_device_exclusive: \(a) is \(s.kind)")
            case .device where isCoherent(s):
                region.setState(i, s)
                throw HMMError(.busy, "make_device_exclusive: \(a) is in device-coherent memory (not supported natively)")
            case .device:
                region.setState(i, s)
            case .host:
                var cat: UInt64 = 0
                do throws(HMMError) {
                    try scan(a, a + Sys.page) { (_, c) throws(HMMError) in cat = c }
                } catch {
                    region.setState(i, s)
                    throw error
                }
                guard cat & UInt64(CU_PAGE_IS_PRESENT) != 0, cat & UInt64(CU_PAGE_IS_PFNZERO) == 0 else {
                    region.setState(i, s, zapDone: cat & UInt64(CU_PAGE_IS_PRESENT) == 0)
                    break
                }
                if s.isZapPending {
                    // The host's zap of a MADV_DONTNEED is still to come: the bytes must not move out
                    // ahead of it. Let it run, then fault the page in afresh.
                    region.setState(i, s)
                    sched_yieldShim()
                    continue
                }
                guard let frame = machine.allocateMigrationPage(zeroed: false) else {
                    region.setState(i, s)
                    throw HMMError(.outOfMemory, "no staging frame for an exclusive page")
                }
                var rc: Int32 = 0
                invalidating(a, a + Sys.page, .exclusive, owner: owner) {
                    let f = frameAddress(frame)
                    _ = Sys.madvise(f, Sys.page, Sys.dontNeed)
                    rc = moveToStaging(region, from: a, to: f, Sys.page) == Sys.page ? 0 : -EBUSY
                }
                guard rc == 0 else {
                    try? machine.releaseMigrationPage(frame)
                    region.setState(i, s)
                    throw HMMError.system(rc, "make_device_exclusive: moving \(a)")
                }
                statistics.count(\.pagesMovedOut)
                program(frame)
                machine.folioUnlock(frame)
                region.setState(i, PageState(.exclusive, pfn: frame, writable: true))
                publishExclusive(.grant, a, owner: owner.map { UInt(bitPattern: ObjectIdentifier($0)) } ?? 0)
                return
            }
            // Not present (or on a device): a write fault brings it in, writable, through the fault thread.
            let rc = faultIn(a, write: true)
            if rc != 0 && rc != -EAGAIN && rc != -EINTR { throw HMMError.system(rc, "make_device_exclusive: faulting \(a)") }
        }
    }
}

/// What one walk of ``NativeSpace/rangeFault(_:)`` reads of its ``HMMRange`` (the words are passed apart).
private struct RangeRequest {
    let start: UInt64
    let end: UInt64
    let mask: UInt64
    let defaultFlags: UInt64
    let owner: (any AnyObject & Sendable)?
}

