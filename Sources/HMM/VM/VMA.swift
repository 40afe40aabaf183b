/// Page protection (`PROT_*`).
public struct Protection: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let read = Protection(rawValue: 1)
    public static let write = Protection(rawValue: 2)
    public static let execute = Protection(rawValue: 4)
    /// `PROT_NONE`.
    public static let none: Protection = []
    public var description: String {
        (contains(.read) ? "r" : "-") + (contains(.write) ? "w" : "-") + (contains(.execute) ? "x" : "-")
    }
}

/// `mmap` flags.
public struct MapFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `MAP_SHARED`.
    public static let shared = MapFlags(rawValue: 1 << 0)
    /// `MAP_PRIVATE`.
    public static let `private` = MapFlags(rawValue: 1 << 1)
    /// `MAP_ANONYMOUS`.
    public static let anonymous = MapFlags(rawValue: 1 << 2)
    /// `MAP_FIXED`: place the mapping exactly at the given address, replacing what is there.
    public static let fixed = MapFlags(rawValue: 1 << 3)
    /// `MAP_HUGETLB`: back the mapping with 2 MiB pages from the hugetlb pool.
    public static let hugetlb = MapFlags(rawValue: 1 << 4)
    /// `MAP_POPULATE`: fault every page in at map time.
    public static let populate = MapFlags(rawValue: 1 << 5)
    /// `MAP_FIXED_NOREPLACE`: place the mapping exactly at the given address, failing with `.exists`
    /// (`EEXIST`) instead of replacing what is there.
    public static let fixedNoReplace = MapFlags(rawValue: 1 << 6)
}

/// `madvise` advice.
public enum Advice: Sendable {
    /// `MADV_DONTNEED`: drop the pages; anonymous memory reads as zero afterwards.
    case dontNeed
    /// `MADV_FREE`: the pages may be discarded lazily (marked clean; without memory pressure they stay).
    case free
    /// `MADV_HUGEPAGE`: back the range with transparent huge pages when possible.
    case hugePage
    /// `MADV_NOHUGEPAGE`.
    case noHugePage
    /// `MADV_COLLAPSE`: replace small pages by PMD-mapped huge pages now.
    case collapse
    /// `MADV_DONTFORK`: a child created by ``AddressSpace/fork()`` does not get the range (`VM_DONTCOPY`).
    case dontFork
    /// `MADV_DOFORK`: undoes `.dontFork`.
    case doFork
    /// `MADV_WIPEONFORK`: a child gets the range empty — it reads zero — instead of a copy-on-write
    /// copy (private anonymous memory only).
    case wipeOnFork
    /// `MADV_KEEPONFORK`: undoes `.wipeOnFork`.
    case keepOnFork
    /// `MADV_POPULATE_READ`: fault every page in readable now, as reading it would (the zero page for
    /// untouched anonymous memory), without touching the data.
    case populateRead
    /// `MADV_POPULATE_WRITE`: fault every page in writable now, as writing it would (copy-on-write
    /// broken), without changing the data.
    case populateWrite
}

/// Flags of a VMA beyond its protection (`vm_flags`).
struct VMAFlags: OptionSet, Hashable, Sendable {
    let rawValue: UInt16
    static let shared = VMAFlags(rawValue: 1 << 0)
    static let hugetlb = VMAFlags(rawValue: 1 << 1)
    static let hugePage = VMAFlags(rawValue: 1 << 2)
    static let noHugePage = VMAFlags(rawValue: 1 << 3)
    /// `VM_MIXEDMAP`: pages inserted by a driver (`vm_insert_page`), not faulted by core MM.
    static let mixedMap = VMAFlags(rawValue: 1 << 4)
    /// `VM_DONTCOPY`: not inherited by fork.
    static let dontCopy = VMAFlags(rawValue: 1 << 5)
    /// `VM_WIPEONFORK`: inherited by fork empty.
    static let wipeOnFork = VMAFlags(rawValue: 1 << 6)
    /// `VM_SOFTDIRTY`: every page counts as soft-dirty (new VMAs, until `clear_refs` 4); not compared
    /// when merging.
    static let softDirty = VMAFlags(rawValue: 1 << 7)
}

/// A virtual memory area (`struct vm_area_struct`). Stored by value in the address space's sorted VMA
/// list; modified only with `mmapLock` and `rmapLock` held for writing.
struct VMA {
    var start: UInt64
    var end: UInt64
    var protection: Protection
    var flags: VMAFlags
    /// The backing file for file and shared-anonymous (shmem) mappings.
    var file: MemoryFile?
    /// `vm_pgoff`: file page offset, or for anonymous memory the page index of `start` at creation.
    var pgoff: UInt64
    /// Owner of the mapping's anonymous pages (private mappings only).
    var anonVMA: AnonVMA?
    var reservation: HugetlbReservation?
    /// The device file a driver mapping came from (P2PDMA's `allocate`), so the device can revoke it.
    var deviceFile: DeviceFile? = nil
    /// `vma_had_uncowed_parents`: the VMA came through fork from a parent whose VMA had an anon_vma (its
    /// `anon_vma_chain` is not singular), so it may not lend its anon_vma to a neighbour in a merge.
    var hadUncowedParents = false

    var length: UInt64 { end - start }
    var isAnonymous: Bool { file == nil }
    var isShared: Bool { flags.contains(.shared) }
    var isHugetlb: Bool { flags.contains(.hugetlb) }
    /// Private mappings copy on write (`is_cow_mapping`).
    var isCOW: Bool { !flags.contains(.shared) }
    var readable: Bool { protection.contains(.read) }
    var writable: Bool { protection.contains(.write) }
    /// Whether present entries may carry the user bit (`vm_page_prot` is not `PAGE_NONE`).
    var accessible: Bool { protection != .none }

    /// `linear_page_index`.
    @inline(__always) func linearIndex(_ address: UInt64) -> UInt64 {
        pgoff + (address - start) >> UInt64(PageSize.shift)
    }

    /// Inverse of `linearIndex`, or nil if the index falls outside the VMA.
    func address(ofIndex index: UInt64) -> UInt64? {
        guard index >= pgoff else { return nil }
        let a = start + (index - pgoff) << UInt64(PageSize.shift)
        return a >= start && a < end ? a : nil
    }

    /// The part of `self` inside `[lo, hi)`, with `pgoff` adjusted.
    func slice(_ lo: UInt64, _ hi: UInt64) -> VMA {
        var v = self
        v.start = max(lo, start)
        v.end = min(hi, end)
        v.pgoff = pgoff + (v.start - start) >> UInt64(PageSize.shift)
        return v
    }

    /// Whether a PMD-aligned 2 MiB block at `address` may get a transparent huge page.
    func thpEligible(_ address: UInt64) -> Bool {
        guard isAnonymous, !isShared, !isHugetlb, flags.contains(.hugePage), !flags.contains(.noHugePage),
            !flags.contains(.mixedMap)
        else { return false }
        let base = address & ~PageSize.pmdMask
        return base >= start && base + UInt64(PageSize.pmd) <= end
    }
}

/// A read-only description of one mapping, as `/proc/self/maps` shows it.
public struct MappingInfo: Hashable, Sendable, CustomStringConvertible {
    public let start: UInt64
    public let end: UInt64
    public let protection: Protection
    public let shared: Bool
    public let anonymous: Bool
    public let hugetlb: Bool
    public let hugePageAdvice: Bool

    /// A mapping as an engine describes it.
    @_spi(Engine)
    public init(start: UInt64, end: UInt64, protection: Protection, shared: Bool, anonymous: Bool, hugetlb: Bool,
                hugePageAdvice: Bool) {
        self.start = start
        self.end = end
        self.protection = protection
        self.shared = shared
        self.anonymous = anonymous
        self.hugetlb = hugetlb
        self.hugePageAdvice = hugePageAdvice
    }

    public var description: String {
        "\(hex(start))-\(hex(end)) \(protection)\(shared ? "s" : "p")"
            + (anonymous ? " [anon]" : " [file]") + (hugetlb ? " [hugetlb]" : "") + (hugePageAdvice ? " [thp]" : "")
    }
}
