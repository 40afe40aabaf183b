/// The size of the mapping that serves an address.
public enum MappingLevel: Hashable, Sendable {
    /// A 4 KiB page-table entry.
    case pte
    /// A 2 MiB PMD entry (THP, huge zero page, hugetlb, device THP).
    case pmd
}

/// One `/proc/self/pagemap` word, plus the entry it came from.
public struct PagemapEntry: Hashable, Sendable, CustomStringConvertible {
    /// The 64-bit word exactly as the kernel formats it: bit 63 `PM_PRESENT`, 62 `PM_SWAP`, 61
    /// `PM_FILE`, 56 `PM_MMAP_EXCLUSIVE`, 55 `PM_SOFT_DIRTY`; bits 0…54 the PFN when present, else the
    /// swap type (bits 0…4) and offset (bits 5…54).
    public let rawValue: UInt64
    /// The level of the entry, nil when nothing maps the address.
    public let level: MappingLevel?
    /// The page-table entry's kind.
    public let kind: PageTableEntry.Kind

    public var present: Bool { rawValue >> 63 & 1 == 1 }
    public var swapped: Bool { rawValue >> 62 & 1 == 1 }
    public var fileOrSharedAnon: Bool { rawValue >> 61 & 1 == 1 }
    public var exclusivelyMapped: Bool { rawValue >> 56 & 1 == 1 }
    public var softDirty: Bool { rawValue >> 55 & 1 == 1 }
    /// The frame, when present.
    public var pfn: PFN? { present ? PFN(rawValue & ((1 << 55) - 1)) : nil }

    public var description: String {
        guard let level else { return "none" }
        return (present ? "present \(pfn!)" : swapped ? "swap(\(kind))" : "none") + " [\(level)]"
            + (exclusivelyMapped ? " exclusive" : "") + (fileOrSharedAnon ? " file" : "")
    }
}

/// `/proc/self/pagemap` (`fs/proc/task_mmu.c`).
extension AddressSpace {
    /// What maps `address`, without faulting.
    /// - Throws: `.noProcess` after exit.
    /// Takes `mmapLock` for reading.
    public func pagemap(at address: UInt64) throws(HMMError) -> PagemapEntry {
        try mmapLock.withReadLock { () throws(HMMError) -> PagemapEntry in
            try checkAlive()
            let a = address & ~PageSize.baseMask
            // `VM_SOFTDIRTY`: every page of the VMA reads soft-dirty, holes included (`pagemap_pte_hole`).
            let vmaSoftDirty: UInt64 = vmaIndex(containing: a).map { vmas[$0].flags.contains(.softDirty) ? 1 << 55 : 0 } ?? 0
            guard a < PageTableIndex.userTop, let (e, level, sub) = leafEntry(a) else {
                return PagemapEntry(rawValue: vmaSoftDirty, level: nil, kind: .none)
            }
            let found = entry(e, sub: sub, level: level)
            return PagemapEntry(rawValue: found.rawValue | vmaSoftDirty, level: found.level, kind: found.kind)
        }
    }

    private func entry(_ e: PageTableEntry, sub: Int, level: MappingLevel) -> PagemapEntry {
        var v: UInt64 = 0
        switch e.kind {
        case .none:
            return PagemapEntry(rawValue: 0, level: nil, kind: .none)
        case .present:
            let pfn = e.pfn + sub
            v = 1 << 63 | pfn.rawValue
            if !e.isSpecial {
                let f = frames.flags(pfn)
                if !f.contains(.anon) { v |= 1 << 61 }
                let head = frames.head(of: pfn)
                let mapped = level == .pmd ? machine.entireMapcount(head) : machine.pageMapcount(pfn)
                if mapped == 1 { v |= 1 << 56 }
            }
        case .table:
            preconditionFailure("table at leaf level")
        default:
            v = 1 << 62 | (e.kind.rawValue & 0x1F) | ((e.pfn + sub).rawValue << 5)
        }
        if e.isSoftDirty { v |= 1 << 55 }
        return PagemapEntry(rawValue: v, level: level, kind: e.kind)
    }
}

extension AddressSpace {
    /// Counts pages of `[address, address + length)` mapped by present entries (`mincore`, or RSS over
    /// a range): one walk of the page tables, no faults, no page-table locks (entries are read atomically).
    /// - Throws: `.invalidArgument` for an unaligned or overflowing range, `.noProcess`.
    /// Takes `mmapLock` for reading.
    public func residentPages(_ address: UInt64, length: Int) throws(HMMError) -> Int {
        let (lo, hi) = try validateRange(address, length, "mincore")
        return try mmapLock.withReadLock { () throws(HMMError) -> Int in
            try checkAlive()
            var count = 0
            forEachPMDStep(lo, hi) { a, pmdEnd, pmdN in
                let pmd = PageTableEntry(rawValue: pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
                if pmd.isLeaf {
                    count += Int((pmdEnd - a) >> UInt64(PageSize.shift))
                } else if pmd.isTable {
                    let ptes = pool.entries(pmd.node)
                    let first = PageTableIndex.pte(a)
                    let last = first + Int((pmdEnd - a) >> UInt64(PageSize.shift))
                    for i in first..<last where ptes[i].load(ordering: .relaxed) & 1 != 0 { count += 1 }
                }
                return true
            }
            return count
        }
    }
}
