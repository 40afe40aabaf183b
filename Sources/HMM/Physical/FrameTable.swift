import Synchronization

/// Bits of a frame's flags word (the kernel's `page->flags` and the folio fields we need).
struct FrameFlags: OptionSet, Sendable {
    let rawValue: UInt64
    /// `PG_locked`: held across migration and while a folio's metadata is rewritten.
    static let locked = FrameFlags(rawValue: 1 << 0)
    /// `PG_dirty`: transferred from page-table entries when they are torn down.
    static let dirty = FrameFlags(rawValue: 1 << 1)
    /// `PG_referenced`.
    static let young = FrameFlags(rawValue: 1 << 2)
    /// An anonymous folio (`PAGE_MAPPING_ANON`).
    static let anon = FrameFlags(rawValue: 1 << 3)
    /// `PageAnonExclusive`, per subpage: mapped by exactly one process and may be mapped writable.
    static let anonExclusive = FrameFlags(rawValue: 1 << 4)
    /// First frame of a large folio.
    static let head = FrameFlags(rawValue: 1 << 5)
    /// Any other frame of a large folio.
    static let tail = FrameFlags(rawValue: 1 << 6)
    /// `PageBuddy`: the first frame of a free block in the buddy allocator.
    static let buddy = FrameFlags(rawValue: 1 << 7)
    /// The shared zero page or a frame of the huge zero page.
    static let zero = FrameFlags(rawValue: 1 << 8)
    /// `PG_hwpoison`.
    static let hwpoison = FrameFlags(rawValue: 1 << 9)
    /// A hugetlb folio: freed back to the hugetlb pool, never to the buddy allocator.
    static let hugetlb = FrameFlags(rawValue: 1 << 10)
    /// A page-cache page of a ``MemoryFile``.
    static let pageCache = FrameFlags(rawValue: 1 << 11)
    /// Reserved at boot (zero pages): never freed.
    static let reserved = FrameFlags(rawValue: 1 << 12)
    /// `MADV_FREE`d: clean, may be discarded by reclaim.
    static let lazyFree = FrameFlags(rawValue: 1 << 13)

    static let orderShift: UInt64 = 16
    static let orderMask: UInt64 = 0xF << orderShift
    /// Bits 24…31: the frame's pagemap slot (0 for system RAM). Set at registration, never changed.
    static let pagemapShift: UInt64 = 24
    static let pagemapMask: UInt64 = 0xFF << pagemapShift
}

/// Per-frame metadata, one 40-byte record per PFN (the kernel spends 64 bytes on `struct page`).
///
/// Every field is atomic so that lockless readers (the invariant checker, GUP-fast, rmap try-gets) are
/// well defined. For a large folio the head record carries the refcount; the first tail record's
/// `refcount` carries the folio's pin count and the second tail's the *entire* (PMD) mapcount, as the
/// kernel keeps `_pincount` and `_entire_mapcount` in tail pages.
@usableFromInline
struct FrameRecord: ~Copyable {
    /// `_refcount`: references to the folio (head only).
    let refcount: Atomic<Int32>
    /// `_mapcount` of this page: page-table entries mapping this very page (PTE level).
    let mapcount: Atomic<Int32>
    /// ``FrameFlags`` plus the folio order in bits 16…19.
    let flags: Atomic<UInt64>
    /// rmap identity: an ``AnonVMA`` or ``MemoryFile`` handle from the mapping registry; free-list
    /// link while the frame is free.
    let mapping: Atomic<UInt64>
    /// rmap offset: the linear page index in the anon VMA or the file; free-list link while free.
    let index: Atomic<UInt64>
    /// `zone_device_data`: a driver-owned word.
    let driverData: Atomic<UInt64>

    init() {
        refcount = Atomic(0)
        mapcount = Atomic(0)
        flags = Atomic(0)
        mapping = Atomic(0)
        index = Atomic(0)
        driverData = Atomic(0)
    }
}

/// The flat per-PFN metadata arena: RAM frames first, device pagemaps above.
final class FrameTable: @unchecked Sendable {
    private let arena: Arena
    let records: UnsafeMutablePointer<FrameRecord>
    /// Number of PFNs the table can describe.
    let capacity: Int

    init(capacity: Int) throws(HMMError) {
        self.capacity = capacity
        arena = try Arena(byteCount: capacity * MemoryLayout<FrameRecord>.stride, what: "the frame table")
        records = arena.base.bindMemory(to: FrameRecord.self, capacity: capacity)
        // The arena is zero-filled, which is exactly the all-zero record; initialize formally anyway
        // for the frames in use, lazily, by `initialize(range:)`.
    }

    func initialize(_ range: Range<Int>, pagemapSlot: Int = 0) {
        for i in range {
            (records + i).initialize(to: FrameRecord())
            records[i].flags.store(UInt64(pagemapSlot) << FrameFlags.pagemapShift, ordering: .relaxed)
        }
    }

    @inline(__always) func record(_ pfn: PFN) -> UnsafeMutablePointer<FrameRecord> {
        records + Int(truncatingIfNeeded: pfn.rawValue)
    }

    @inline(__always) func flags(_ pfn: PFN) -> FrameFlags {
        FrameFlags(rawValue: record(pfn).pointee.flags.load(ordering: .acquiring))
    }

    @inline(__always) func setFlags(_ pfn: PFN, _ f: FrameFlags) {
        record(pfn).pointee.flags.bitwiseOr(f.rawValue, ordering: .acquiringAndReleasing)
    }

    @inline(__always) func clearFlags(_ pfn: PFN, _ f: FrameFlags) {
        record(pfn).pointee.flags.bitwiseAnd(~f.rawValue, ordering: .acquiringAndReleasing)
    }

    @inline(__always) func order(_ pfn: PFN) -> Int {
        Int((record(pfn).pointee.flags.load(ordering: .relaxed) & FrameFlags.orderMask) >> FrameFlags.orderShift)
    }

    /// The pagemap slot of a frame: 0 for system RAM, 1…255 for device memory.
    @inline(__always) func pagemapSlot(_ pfn: PFN) -> Int {
        Int((record(pfn).pointee.flags.load(ordering: .relaxed) & FrameFlags.pagemapMask) >> FrameFlags.pagemapShift)
    }

    /// The head of the folio containing `pfn` (folios are naturally aligned).
    @inline(__always) func head(of pfn: PFN) -> PFN {
        let f = flags(pfn)
        guard f.contains(.tail) else { return pfn }
        let order = self.order(pfn)
        return PFN(pfn.rawValue & ~((1 << UInt64(order)) - 1))
    }

    // MARK: folio lock (PG_locked)

    /// `folio_trylock`.
    func tryLock(_ head: PFN) -> Bool {
        let old = record(head).pointee.flags.bitwiseOr(FrameFlags.locked.rawValue, ordering: .acquiring).oldValue
        return old & FrameFlags.locked.rawValue == 0
    }

    /// `folio_lock`: waits (spinning, then yielding) until the lock is free.
    func lock(_ head: PFN) {
        var spins = 0
        while !tryLock(head) {
            spins += 1
            if spins >= 16 {
                sched_yieldShim()
                spins = 0
            }
        }
    }

    /// `folio_unlock`.
    func unlock(_ head: PFN) {
        record(head).pointee.flags.bitwiseAnd(~FrameFlags.locked.rawValue, ordering: .releasing)
    }
}

#if canImport(Glibc)
import Glibc
/// `sched_yield()`, its result discarded: what every spin-wait of the library (and of an engine) calls.
@_spi(Engine) @inlinable @inline(__always) public func sched_yieldShim() { sched_yield() }
#endif
