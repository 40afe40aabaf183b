import CUserfaultfd
import HMM
@_spi(Engine) import HMM
import Synchronization

/// Memory of the host process that can migrate to device memory and back (the native engine's VMA):
/// anonymous private memory registered with its space's userfaultfd. ``pointer`` is an ordinary
/// pointer — plain loads and stores work, and a touch of a page that lives on a device faults and
/// migrates it back through the device's driver.
///
/// A region is made by ``NativeSpace/allocate(length:protection:hugePages:populate:)`` and lives until
/// ``free()``, until all of it is unmapped, or until its space closes (then it stays as ordinary memory).
///
/// Per page it keeps a `PageState` word (what the host page table cannot say) and names its pages in
/// a host-window pagemap, so a driver reads and writes CPU-resident pages through the same frame
/// pointers as any frame.
public final class NativeRegion: @unchecked Sendable, CustomStringConvertible {
    /// The largest region: 64 GiB. A region names its pages in a host-window pagemap, and a pagemap
    /// holds at most 2^24 frames.
    public static let maximumLength = Pagemap.maximumFrames << PageSize.shift
    /// ``maximumLength`` in words, for the errors that refuse more.
    static let maximumLengthDescription = "64 GiB (a region's host window names at most 2^24 pages)"

    /// The space the region belongs to.
    public let space: NativeSpace
    /// The first byte (2 MiB-aligned).
    public let address: UInt64
    /// Bytes, a multiple of 4 KiB.
    public let length: Int
    /// Whether the region asked the host for transparent huge pages (`MADV_HUGEPAGE`), asked it for
    /// none (`MADV_NOHUGEPAGE`), or left it to the host's default (nil).
    public let hugePages: Bool?
    let pages: Int
    let states: UnsafeMutablePointer<Atomic<UInt64>>
    /// The host window naming the region's pages: page `i` is `window.firstPFN + i`.
    let window: Pagemap
    /// Each page's VMA attributes: its protection (bits 0-2), as given at allocation and set by
    /// ``protect(_:_:)`` (a raw `mprotect` is invisible), and its huge-page advice (``hugeAdvised``,
    /// ``noHugeAdvised``), as given at allocation and set by ``advise(_:hugePages:)``. A partial
    /// change splits the region's runs as it splits the kernel's VMAs. Written under the space's
    /// `mmapLock` for writing; read by anyone.
    private let protections: UnsafeMutablePointer<Atomic<UInt8>>
    static let protectionMask: UInt8 = 7
    static let hugeAdvised: UInt8 = 1 << 4
    static let noHugeAdvised: UInt8 = 1 << 5
    /// Pages not yet unmapped; the region leaves its space when it reaches 0.
    let mappedPages: Atomic<Int>
    /// Set by ``free()``.
    let freed = Atomic<Bool>(false)

    init(space: NativeSpace, address: UInt64, length: Int, protection: Protection, hugePages: Bool?, window: Pagemap) {
        self.space = space
        self.address = address
        self.length = length
        self.hugePages = hugePages
        self.window = window
        pages = length >> PageSize.shift
        states = .allocate(capacity: pages)
        for i in 0..<pages { (states + i).initialize(to: Atomic(0)) }
        mappedPages = Atomic(pages)
        protections = .allocate(capacity: pages)
        let advice = hugePages.map { $0 ? Self.hugeAdvised : Self.noHugeAdvised } ?? 0
        for i in 0..<pages { (protections + i).initialize(to: Atomic(protection.rawValue | advice)) }
    }

    deinit {
        states.deallocate()
        protections.deallocate()
    }

    /// The region's memory: ordinary loads and stores.
    public var pointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: UInt(address))! }
    /// One past the last byte.
    public var end: UInt64 { address + UInt64(length) }
    /// The protection of the region's first page (as set at allocation or by ``protect(_:_:)``); pages
    /// may differ after a partial ``protect(_:_:)`` (``protection(at:)``).
    public var protection: Protection { protection(page: 0) }

    /// The protection of the page at byte `offset`.
    public func protection(at offset: Int) -> Protection { protection(page: offset >> PageSize.shift) }

    @inline(__always) func protection(page i: Int) -> Protection {
        Protection(rawValue: protections[i].load(ordering: .acquiring) & Self.protectionMask)
    }

    /// Whether page `i` asked for transparent huge pages (`MADV_HUGEPAGE`).
    @inline(__always) func isHugeAdvised(page i: Int) -> Bool {
        protections[i].load(ordering: .acquiring) & Self.hugeAdvised != 0
    }

    /// Pages `pages` take protection `p` (under `mmapLock` for writing).
    func setProtection(_ p: Protection, pages: Range<Int>) {
        for i in pages {
            let advice = protections[i].load(ordering: .relaxed) & ~Self.protectionMask
            protections[i].store(p.rawValue | advice, ordering: .releasing)
        }
    }

    /// Pages `pages` take huge-page advice `huge` (under `mmapLock` for writing).
    func setHugeAdvice(_ huge: Bool, pages: Range<Int>) {
        for i in pages {
            let p = protections[i].load(ordering: .relaxed) & Self.protectionMask
            protections[i].store(p | (huge ? Self.hugeAdvised : Self.noHugeAdvised), ordering: .releasing)
        }
    }

    /// Copies page `from`'s attributes of `old` to page `to` of this region (an `mremap` moved it).
    func copyAttributes(of old: NativeRegion, page from: Int, to: Int) {
        protections[to].store(old.protections[from].load(ordering: .acquiring), ordering: .releasing)
    }

    /// The run of pages with page `i`'s attributes, as the VMA around it: its protection and its bounds,
    /// looked for no further than `reach` pages either side (a caller walking in pieces asks again).
    func protectionRun(around i: Int, reach: Int = Int.max) -> (protection: Protection, pages: Range<Int>) {
        let p = protections[i].load(ordering: .acquiring)
        let floor = i > reach ? i - reach : 0
        let ceiling = pages - i > reach ? i + reach : pages
        var lo = i
        while lo > floor && protections[lo - 1].load(ordering: .acquiring) == p { lo -= 1 }
        var hi = i + 1
        while hi < ceiling && protections[hi].load(ordering: .acquiring) == p { hi += 1 }
        return (Protection(rawValue: p & Self.protectionMask), lo..<hi)
    }

    /// The protection of page `i` and how far, up to page `limit`, the pages after it share its
    /// attributes: the rest of its VMA within a walk (no look behind, so a walk stays linear).
    func protectionRun(from i: Int, limit: Int) -> (protection: Protection, end: Int) {
        let p = protections[i].load(ordering: .acquiring)
        var hi = i + 1
        while hi < limit && protections[hi].load(ordering: .acquiring) == p { hi += 1 }
        return (Protection(rawValue: p & Self.protectionMask), hi)
    }

    /// Whether every page of `pages` allows `p`.
    func allow(_ p: Protection, _ pages: Range<Int>) -> Bool {
        for i in pages where !protection(page: i).isSuperset(of: p) { return false }
        return true
    }

    public var description: String { "native region 0x\(String(address, radix: 16))+\(length) \(protection)" }

    @inline(__always) func contains(_ a: UInt64) -> Bool { a >= address && a < end }
    @inline(__always) func index(_ a: UInt64) -> Int { Int((a - address) >> UInt64(PageSize.shift)) }
    @inline(__always) func pageAddress(_ i: Int) -> UInt64 { address + UInt64(i) << UInt64(PageSize.shift) }
    /// The index of the first page of the 2 MiB unit holding page `i`: negative when the unit starts
    /// before the region (a region need not be 2 MiB-aligned after an `mremap` or an adoption).
    @inline(__always) func unitStart(_ i: Int) -> Int { i - Int((pageAddress(i) & PageSize.pmdMask) >> UInt64(PageSize.shift)) }

    @inline(__always) func state(_ i: Int) -> PageState { PageState(rawValue: states[i].load(ordering: .acquiring)) }

    /// Sets page `i`'s word (the caller holds its lock, or owns the page otherwise). A `zapped` mark the
    /// service thread set meanwhile is kept; if the new word unlocks the page, the zap is applied now.
    /// A pending host zap (``PageState/isZapPending``) stays with a host word unless `zapDone` says it
    /// has run (the caller filled the page's hole, or found it a hole with the page locked).
    @inline(__always) func setState(_ i: Int, _ s: PageState, zapDone: Bool = false) {
        var old = states[i].load(ordering: .relaxed)
        let keep = s.kind == .host && !zapDone ? PageState.zappedBit | PageState.zapPendingBit : PageState.zappedBit
        while true {
            let new = s.rawValue & ~(zapDone ? PageState.zapPendingBit : 0) | (old & keep)
            let (done, seen) = states[i].compareExchange(expected: old, desired: new, ordering: .acquiringAndReleasing)
            if done { break }
            old = seen
        }
        if old & PageState.zappedBit != 0 && !s.isMigrating { settle(i) }
    }

    /// Marks page `i` zapped (the service thread, for a remove event: lock-free, never waits).
    @inline(__always) func markZapped(_ i: Int) {
        states[i].bitwiseOr(PageState.zappedBit, ordering: .acquiringAndReleasing)
    }

    /// Locks page `i` if its word is `expected` (unlocked, not zapped); false if it is locked, changed,
    /// or was zapped (the zap is applied then: look again).
    @inline(__always) func tryLock(_ i: Int, _ expected: PageState) -> Bool {
        if expected.isZapped {
            settle(i)
            return false
        }
        return states[i].compareExchange(expected: expected.rawValue, desired: expected.locked.rawValue,
                                         ordering: .acquiringAndReleasing).exchanged
    }

    /// Locks page `i` whatever its word, waiting while someone else holds it; returns the word (without
    /// the lock bit, whatever the path), with any pending zap already applied — or, with `unmapped`, only forgotten (the address is gone and may
    /// already belong to another mapping: nothing may be taken from it).
    func lock(_ i: Int, unmapped: Bool = false) -> PageState {
        var spins = 0
        while true {
            let s = state(i)
            if !s.isMigrating && states[i].compareExchange(expected: s.rawValue, desired: s.locked.rawValue,
                                                           ordering: .acquiringAndReleasing).exchanged {
                guard s.isZapped else { return s }
                if unmapped {
                    let clean = PageState(rawValue: s.rawValue & ~PageState.zappedBit)
                    states[i].store(clean.locked.rawValue, ordering: .releasing)
                    return clean
                }
                // Returned unlocked, as on every other path: callers unlock with `setState(i, s)`, and a
                // locked word handed back here left the page locked for good (the churn suite hung).
                return space.applyZap(self, i, s.locked).unlocked
            }
            spins += 1
            if spins > 16 {
                sched_yieldShim()
                spins = 0
            }
        }
    }

    /// Applies a pending zap of page `i` if it is unlocked (locks, drops, unlocks).
    func settle(_ i: Int) {
        let s = state(i)
        guard s.isZapped, !s.isMigrating else { return }
        let w = lock(i)
        // Unlocked keeping a mark a later remove event set meanwhile (it is applied in turn): remove
        // events drop only marked pages (``NativeSpace/dropRange(_:_:_:to:)``).
        setState(i, w.unlocked)
    }

    /// The page-aligned, in-region range `offsets` names, as addresses.
    /// - Throws: `.badDescriptor` once the region is freed (its address range may be anyone's now),
    ///   `.invalidArgument` for a bad range.
    func checkedRange(_ offsets: Range<Int>, _ what: String) throws(HMMError) -> (UInt64, UInt64) {
        guard !freed.load(ordering: .acquiring) else { throw HMMError(.badDescriptor, "\(what): \(self) was freed") }
        guard offsets.lowerBound >= 0, offsets.upperBound <= length, !offsets.isEmpty,
            offsets.lowerBound % PageSize.base == 0, offsets.upperBound % PageSize.base == 0
        else { throw HMMError(.invalidArgument, "\(what): \(offsets) is empty, unaligned or outside \(self)") }
        return (address + UInt64(offsets.lowerBound), address + UInt64(offsets.upperBound))
    }

    // MARK: public operations

    /// Where each page of `offsets` lives now (PAGEMAP_SCAN plus the state words).
    /// - Throws: `.invalidArgument` (unaligned, empty or outside the region), `.badDescriptor` after
    ///   ``free()``, `.noProcess` after close.
    public func residency(_ offsets: Range<Int>) throws(HMMError) -> [Residency] {
        let (lo, hi) = try checkedRange(offsets, "residency")
        try space.checkOpen()
        var out: [Residency] = []
        out.reserveCapacity(Int((hi - lo) >> UInt64(PageSize.shift)))
        try space.scan(lo, hi) { (a, categories) in
            let s = state(index(a))
            switch s.kind {
            case .device:
                let owner = space.machine.pagemap(of: s.pfn).map { ObjectIdentifier($0.owner) }
                if space.machine.deviceKind(s.pfn) == .deviceCoherent {
                    out.append(.coherent(owner: owner, huge: s.isCompound))
                } else {
                    out.append(.device(owner: owner, huge: s.isCompound))
                }
            case .exclusive: out.append(.exclusive)
            case .revoked: out.append(.revoked)
            case .unmapped: out.append(.unmapped)
            case .host:
                if categories & UInt64(CU_PAGE_IS_PRESENT) == 0 {
                    out.append(.untouched)
                } else {
                    out.append(.host(huge: categories & UInt64(CU_PAGE_IS_HUGE) != 0,
                                     zero: categories & UInt64(CU_PAGE_IS_PFNZERO) != 0))
                }
            }
        }
        return out
    }

    /// Pages of the region on a device (device-resident or device-exclusive).
    public var devicePages: Int {
        var n = 0
        for i in 0..<pages where [.device, .exclusive].contains(state(i).kind) { n += 1 }
        return n
    }

    /// `mprotect` of part of the region that the engine sees: the host protection changes and the
    /// region's notifiers hear `protectionVMA` first (a raw `mprotect` sends no event).
    /// - Throws: `.invalidArgument` (bad range), `.badDescriptor` after ``free()``, `.outOfMemory` where
    ///   the program unmapped part of the range (as `mprotect` over a hole), `.noProcess` after close,
    ///   what `mprotect` returns.
    public func protect(_ offsets: Range<Int>, _ protection: Protection) throws(HMMError) {
        let (lo, hi) = try checkedRange(offsets, "protect")
        try space.protect(self, lo, hi, protection)
    }

    /// `madvise(MADV_HUGEPAGE)` (or `MADV_NOHUGEPAGE`) of part of the region that the engine sees: a
    /// first write touch of a whole, empty, advised 2 MiB unit then gets a transparent huge page, as the
    /// kernel's `do_huge_pmd_anonymous_page` gives (a raw `madvise` leaves the engine filling 4 KiB
    /// pages).
    /// - Throws: `.invalidArgument` (bad range), `.badDescriptor` after ``free()``, `.outOfMemory` where
    ///   the program unmapped part of the range, `.noProcess` after close, what `madvise` returns.
    public func advise(_ offsets: Range<Int>, hugePages: Bool) throws(HMMError) {
        let (lo, hi) = try checkedRange(offsets, "advise")
        try space.adviseHugePages(self, lo, hi, hugePages)
    }

    /// Unmaps the region: its device pages are freed (drivers hear `unmap` first) and the memory
    /// returns to the host. Idempotent.
    /// - Throws: `.noProcess` after the space closed is not an error — the region is then plain memory
    ///   and is simply unmapped.
    public func free() {
        space.free(self)
    }

    /// Where a page of a native region lives.
    public enum Residency: Hashable, Sendable {
        /// Never touched, or dropped (`MADV_DONTNEED`): the next touch reads zeros.
        case untouched
        /// In host memory; `huge` if a THP maps it, `zero` if it is the shared zero page.
        case host(huge: Bool, zero: Bool)
        /// On a device-private page (its pagemap's owner), `huge` for a 2 MiB device folio: a CPU touch
        /// migrates it back.
        case device(owner: ObjectIdentifier?, huge: Bool)
        /// In device-coherent memory mapped in place (its pagemap's owner): the CPU reads and writes the
        /// device frame without a fault.
        case coherent(owner: ObjectIdentifier?, huge: Bool)
        /// Held device-exclusive: the next CPU touch restores it.
        case exclusive
        /// Revoked: a touch raises `SIGBUS`.
        case revoked
        /// Unmapped by the user.
        case unmapped
    }
}


extension NativeRegion.Residency {
    /// The state in the vocabulary both engines' residency pictures share.
    public var pageResidency: PageResidency {
        switch self {
        case .untouched: return .none
        case .host(let huge, let zero): return zero ? .zeroPage : huge ? .transparentHuge : .anonExclusive
        case .device(_, let huge): return huge ? .devicePrivateHuge : .devicePrivate
        case .coherent: return .deviceCoherent
        case .exclusive: return .deviceExclusive
        case .revoked: return .revoked
        case .unmapped: return .absent
        }
    }
}
