/// Read-only looks at page-table entries and page metadata, for tests and tools: what
/// `/proc/self/pagemap` cannot say (a non-present entry's frame, young and dirty bits, a page's flags).
/// Nothing here faults, allocates page-table nodes or changes state.

/// One page-table entry as it maps one 4 KiB page.
public struct PageTableEntryInfo: Hashable, Sendable, CustomStringConvertible {
    /// The level of the entry; nil when nothing maps the address.
    public let level: MappingLevel?
    /// The entry itself (the PMD entry when `level` is `.pmd`).
    public let entry: PageTableEntry
    /// The frame this 4 KiB page names — present or not (migration, device-private, device-exclusive,
    /// hwpoison) — offset into a huge entry; nil for no entry.
    public let pfn: PFN?

    /// The entry's kind.
    public var kind: PageTableEntry.Kind { entry.kind }
    /// A present entry the CPU may write through.
    public var isWritable: Bool { entry.isPresent && entry.isWritable }
    /// A present entry the CPU may access at all (false for `PROT_NONE`).
    public var isAccessible: Bool { entry.isPresent && entry.isUser }
    /// The accessed bit (present entries; migration entries carry it too).
    public var isYoung: Bool { entry.isYoung }
    /// The dirty bit (present entries; migration entries carry it too).
    public var isDirty: Bool { entry.isDirty }

    public var description: String {
        guard let level else { return "none" }
        return "\(entry) [\(level)]"
    }
}

/// A frame's metadata at one instant (`struct page` / folio fields).
public struct PageInfo: Hashable, Sendable, CustomStringConvertible {
    /// The head of the folio the frame belongs to.
    public let head: PFN
    /// The folio's order (0 for 4 KiB, 9 for 2 MiB).
    public let order: Int
    /// The folio's reference count (kept on the head).
    public let refcount: Int
    /// PTE-level mappings of this page plus PMD mappings of its folio.
    public let mapcount: Int
    /// `PG_dirty` of the folio.
    public let isDirty: Bool
    /// An anonymous folio.
    public let isAnonymous: Bool
    /// `PageAnonExclusive` of this page.
    public let isAnonExclusive: Bool
    /// `PG_locked` of the folio.
    public let isLocked: Bool
    /// The device memory the frame belongs to, nil for system RAM.
    public let memory: PagemapKind?

    public var description: String {
        "head \(head) order \(order) ref \(refcount) map \(mapcount)" + (isDirty ? " dirty" : "")
            + (isAnonymous ? " anon" : "") + (isAnonExclusive ? " exclusive" : "") + (isLocked ? " locked" : "")
            + (memory.map { " \($0)" } ?? "")
    }
}

extension AddressSpace {
    /// The entry that maps `address`, read under its page-table lock, without faulting.
    /// - Throws: `.invalidArgument` for an address outside user space, `.noProcess` after exit.
    /// Takes `mmapLock` for reading.
    public func pageTableEntry(at address: UInt64) throws(HMMError) -> PageTableEntryInfo {
        guard address < PageTableIndex.userTop else { throw .invalid("\(hex(address)) is outside user space") }
        return try mmapLock.withReadLock { () throws(HMMError) -> PageTableEntryInfo in
            try checkAlive()
            guard let (e, level, sub) = leafEntry(address & ~PageSize.baseMask) else {
                return PageTableEntryInfo(level: nil, entry: .none, pfn: nil)
            }
            return PageTableEntryInfo(level: level, entry: e, pfn: e.pfn + sub)
        }
    }

    /// The leaf entry for the page at `a` (nil when none), its level and the page's index inside a huge
    /// entry, read under the page-table lock (what `/proc/self/pagemap`, the reverse map and the inspection
    /// API share). Requires `mmapLock` or `rmapLock` held, so the tables cannot be freed.
    func leafEntry(_ a: UInt64) -> (PageTableEntry, MappingLevel, Int)? {
        guard let pmdN = try? pmdNode(a, allocate: false), pmdN != 0 else { return nil }
        let pmdLock = pool.lock(pmdN)
        pmdLock.lock()
        let pmd = PageTableEntry(rawValue: pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
        pmdLock.unlock()
        if pmd.isTable {
            var out: PageTableEntry = .none
            withLockedPTE(a) { _, e in out = e }
            return out.isNone ? nil : (out, .pte, 0)
        }
        return pmd.isNone ? nil : (pmd, .pmd, PageTableIndex.pte(a))
    }
}

extension Machine {
    /// The metadata of frame `pfn` (RAM or a registered pagemap).
    /// - Throws: `.invalidArgument` for a frame that is neither.
    public func pageInfo(_ pfn: PFN) throws(HMMError) -> PageInfo {
        try checkFrame(pfn)
        let head = frames.head(of: pfn)
        let order = frames.order(head)
        let f = frames.flags(pfn)
        let hf = frames.flags(head)
        let mapcount = Int(pageMapcount(pfn)) + (order > 0 ? Int(entireMapcount(head)) : 0)
        return PageInfo(head: head, order: order, refcount: Int(refcount(head)), mapcount: mapcount,
                        isDirty: hf.contains(.dirty), isAnonymous: hf.contains(.anon),
                        isAnonExclusive: f.contains(.anonExclusive), isLocked: hf.contains(.locked),
                        memory: deviceKind(pfn))
    }
}
