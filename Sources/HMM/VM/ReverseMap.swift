/// One place a page is mapped.
public struct ReverseMapping: Hashable, Sendable, CustomStringConvertible {
    public let space: AddressSpace
    /// The virtual address of the page (not of the huge mapping's start).
    public let address: UInt64
    public let level: MappingLevel
    public let entry: PageTableEntry

    public static func == (a: ReverseMapping, b: ReverseMapping) -> Bool {
        a.space === b.space && a.address == b.address && a.level == b.level && a.entry == b.entry
    }
    public func hash(into h: inout Hasher) {
        h.combine(ObjectIdentifier(space))
        h.combine(address)
    }
    public var description: String { "space \(space.id) @ \(hex(address)) [\(level)] \(entry)" }
}

/// The reverse map (`mm/rmap.c` `rmap_walk`): from a page to every page-table entry that maps it.
///
/// A page records its owner (an ``AnonVMA`` or a ``MemoryFile``) and its linear index; the walk visits
/// every space that joined that owner, finds the VMAs backed by it, computes the address from the
/// VMA's `pgoff`, and keeps the candidates whose entry really names the page — present, huge, or
/// non-present (migration, device-private, device-exclusive). Correct across fork (shared owner) and
/// mremap (the VMA keeps its `pgoff`).
///
/// Locking: takes each candidate space's `rmapLock` for reading and the page-table locks; needs no
/// `mmapLock`, so migration may call it with folio locks held.
extension Machine {
    /// Every mapping of the page `pfn`.
    public func reverseMap(_ pfn: PFN) -> [ReverseMapping] {
        var out: [ReverseMapping] = []
        forEachCandidate(of: pfn) { space, _, a in
            if let m = space.lookupEntry(a, mapping: pfn) { out.append(m) }
        }
        return out
    }

    /// `rmap_walk`: calls `body(space, vma, address)` for every place `pfn` may be mapped (its owner's
    /// VMAs at the page's index), with that space's `rmapLock` held for reading so its page tables and
    /// VMA list stay put. The body checks the entry itself.
    func forEachCandidate(of pfn: PFN, _ body: (AddressSpace, VMA, UInt64) -> Void) {
        guard pfn.rawValue < UInt64(frames.capacity) else { return }
        let r = frames.record(pfn)
        let word = r.pointee.mapping.load(ordering: .acquiring)
        let index = r.pointee.index.load(ordering: .relaxed)
        guard word != 0, let owner = registry.lookup(word) else { return }
        let spaces: [AddressSpace]
        if let anon = owner as? AnonVMA {
            spaces = anon.spaces
        } else if let file = owner as? MemoryFile {
            spaces = file.mappingSpaces
        } else {
            return
        }
        for space in spaces where !space.hasExited {
            space.rmapLock.withReadLock {
                guard space.root != 0 else { return }
                for vma in space.vmas where vma.anonVMA === owner || vma.file === owner {
                    if let a = vma.address(ofIndex: index) { body(space, vma, a) }
                }
            }
        }
    }
}

extension AddressSpace {
    /// The entry at `a` if it maps `pfn`. Requires `rmapLock` or `mmapLock` held.
    func lookupEntry(_ a: UInt64, mapping pfn: PFN) -> ReverseMapping? {
        guard let (e, level, sub) = leafEntry(a), !e.isSpecial, e.pfn + sub == pfn else { return nil }
        return ReverseMapping(space: self, address: a, level: level, entry: e)
    }
}
