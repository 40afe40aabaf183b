import CUserfaultfd
import HMM
@_spi(Engine) import HMM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Memory the engine does not manage, seen by a device: shared anonymous memory, file mappings (shared
/// or private), hugetlb memory, private anonymous memory that is no region. The kernel's
/// `hmm_range_fault` walks any VMA; a driver reads, writes and snapshots such memory through the page
/// table like anonymous memory, and only migration is refused. The engine does the same:
/// ``rangeFault(_:)`` names such a mapping's pages in a *foreign window* — a host-window pagemap over
/// the host mapping, found in `/proc/self/maps` — reports present pages from `PAGEMAP_SCAN` with the
/// mapping's protection (a private file page not yet copied is read-only, a hugetlb page has map order
/// 9), and faults absent pages in with `MADV_POPULATE_READ`/`WRITE` from the caller's thread, as the
/// kernel's walk faults them. A driver's copies through a window are the kernel's user copies: an
/// address unmapped meanwhile fails the copy, it never crashes the process.
///
/// The host sends no event when such memory is unmapped (it is not registered). ``unmap(address:length:)``
/// tells the notifiers (`unmap`) before the host unmaps, so devices drop what they mapped there; a raw
/// `munmap` is seen only by the next walk, which finds the mapping changed and names it afresh.
///
/// A window names a bounded span of the mapping (``foreignWindowSpan``); windows are kept until their
/// mapping changes or is unmapped through the engine, the space closes, or more than
/// ``foreignWindowLimit`` are open (each takes one of the machine's pagemap slots). Devices are told
/// (`clear`) before a window goes. Guarded by their own lock, a leaf.
extension NativeSpace {
    /// A span of a host mapping named for devices: `[start, end)` of the mapping `[mappingStart,
    /// mappingEnd)`.
    struct ForeignWindow {
        let start: UInt64
        let end: UInt64
        let mappingStart: UInt64
        let mappingEnd: UInt64
        let window: Pagemap
    }

    /// The most a window names (each names its frames in the machine's PFN space, and each takes a
    /// pagemap slot): 64 MiB, and at most 32 windows per space, the oldest dropped first.
    static let foreignWindowSpan: UInt64 = 64 << 20
    static let foreignWindowLimit = 32

    /// A readable host mapping outside every region containing `a`, with a window naming its pages
    /// from `a` (made now — from `a`'s 2 MiB boundary up to the range's end rounded up to 2 MiB, at most
    /// ``foreignWindowSpan`` — if none does, or if the mapping has changed), its protection and whether it
    /// is private file memory; nil where nothing readable is mapped. Requires `mmapLock` held for
    /// reading.
    func foreignMapping(containing a: UInt64, upTo limit: UInt64) throws(HMMError) -> (ForeignWindow, HostMaps.Entry)? {
        guard let e = HostMaps.entries(overlapping: a, a + 1).first, e.start <= a, e.protection.contains(.read) else {
            return nil
        }
        let existing = foreignWindows.withLock { list -> ForeignWindow? in
            list.first { $0.mappingStart == e.start && $0.mappingEnd == e.end && $0.start <= a && a < $0.end }
        }
        if let existing { return (existing, e) }
        let start = max(e.start, a & ~PageSize.pmdMask)
        let wanted = (min(limit, UInt64.max - PageSize.pmdMask) + PageSize.pmdMask) & ~PageSize.pmdMask
        let end = min(e.end, wanted, start + Self.foreignWindowSpan)
        let pages = Int((end - start) >> UInt64(PageSize.shift))
        let frames = (pages + PageSize.pagesPerPMD - 1) / PageSize.pagesPerPMD * PageSize.pagesPerPMD
        let window = try machine.registerHostWindow(base: UnsafeMutableRawPointer(bitPattern: UInt(start))!,
                                                    count: frames, owner: self, operations: windowOperations)
        let fresh = ForeignWindow(start: start, end: end, mappingStart: e.start, mappingEnd: e.end, window: window)
        // Windows over the same addresses whose mapping has changed are stale, and the oldest go past the limit.
        let dropped = foreignWindows.withLock { list -> [ForeignWindow] in
            var old = list.filter { $0.start < e.end && e.start < $0.end && ($0.mappingStart != e.start || $0.mappingEnd != e.end) }
            list.removeAll { w in old.contains { $0.window === w.window } }
            while list.count >= Self.foreignWindowLimit { old.append(list.removeFirst()) }
            list.append(fresh)
            return old
        }
        for w in dropped { retire(w) }
        return (fresh, e)
    }

    /// Drops a window: devices forget what they mapped through it first (`clear`), so no device page
    /// table keeps a frame number of it once the numbers can be reused.
    private func retire(_ w: ForeignWindow) {
        invalidating(w.start, w.end, .clear, owner: nil) {}
        try? machine.unregisterPagemap(w.window)
    }

    /// One walk over `[a, stop)` of a foreign mapping (``RangeRequest`` semantics of ``rangeFault(_:)``):
    /// fills the words; returns the first page that must be faulted in.
    func walkForeign(
        _ foreign: ForeignWindow, _ mapping: HostMaps.Entry, from a: UInt64, to stop: UInt64, rangeStart: UInt64,
        mask: UInt64, defaultFlags: UInt64, _ words: UnsafeMutablePointer<UInt64>
    ) throws(HMMError) -> (UInt64, Bool)? {
        let mayFault = HMMPFN.mayFault(mask: mask, defaultFlags: defaultFlags)
        let writableVMA = mapping.protection.contains(.write)
        let privateFile = !mapping.shared && !mapping.noInode
        var need: (UInt64, Bool)?
        try scan(a, stop, also: UInt64(CU_PAGE_IS_FILE)) { (b, cat) throws(HMMError) in
            guard need == nil else { return }
            let k = Int((b - rangeStart) >> UInt64(PageSize.shift))
            let req = HMMPFN.request(words[k], mask: mask, defaultFlags: defaultFlags, mayFault: mayFault)
            let wantWrite = req & HMMPFN.requestWrite != 0
            if wantWrite && !writableVMA { throw HMMError(.permission, "hmm_range_fault: write to read-only \(b)") }
            var out: UInt64 = 0
            if cat & UInt64(CU_PAGE_IS_PRESENT) != 0 {
                let isZero = cat & UInt64(CU_PAGE_IS_PFNZERO) != 0
                let isHuge = cat & UInt64(CU_PAGE_IS_HUGE) != 0
                // A private file page not yet copied is mapped read-only, as the zero page is.
                let readOnly = isZero || (privateFile && cat & UInt64(CU_PAGE_IS_FILE) != 0)
                if wantWrite && readOnly {
                    need = (b, true)
                    return
                }
                let pfn: PFN
                if isZero {
                    pfn = isHuge ? machine.hugeZeroPFN + Int((b & PageSize.pmdMask) >> UInt64(PageSize.shift)) : machine.zeroPFN
                } else {
                    pfn = foreign.window.firstPFN + Int((b - foreign.start) >> UInt64(PageSize.shift))
                }
                out = HMMPFN.word(pfn, writable: writableVMA && !readOnly, order: isHuge ? PageSize.pmdOrder : 0)
            } else if HMMPFN.needFault(req, 0) != .none {
                need = (b, wantWrite)
                return
            }
            HMMPFN.store(out, words, k)
        }
        return need
    }

    /// ``unmap(address:length:)``'s part for foreign windows: if `[lo, hi)` touches one, the notifiers
    /// hear `unmap` for the range (devices drop what they mapped there) and the windows it touches are
    /// dropped. Requires `mmapLock` held for writing, before the host unmaps.
    func forgetForeignWindows(_ lo: UInt64, _ hi: UInt64) {
        let touched = foreignWindows.withLock { list -> [ForeignWindow] in
            let hit = list.filter { $0.mappingStart < hi && lo < $0.mappingEnd }
            list.removeAll { $0.mappingStart < hi && lo < $0.mappingEnd }
            return hit
        }
        guard !touched.isEmpty else { return }
        invalidating(lo, hi, .unmap, owner: nil) {}
        for w in touched { retire(w) }
    }

    /// Every foreign window goes (at close).
    func dropForeignWindows() {
        let all = foreignWindows.withLock { list -> [ForeignWindow] in
            defer { list = [] }
            return list
        }
        for w in all { try? machine.unregisterPagemap(w.window) }
    }
}
