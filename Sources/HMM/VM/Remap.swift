/// `mremap` flags.
public struct RemapFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// `MREMAP_MAYMOVE`: the mapping may move if it cannot grow in place.
    public static let mayMove = RemapFlags(rawValue: 1)
    /// `MREMAP_FIXED`: move to exactly the given address (requires `mayMove`).
    public static let fixed = RemapFlags(rawValue: 2)
    /// `MREMAP_DONTUNMAP`: move the pages but leave the old range mapped and empty (requires `mayMove`
    /// and equal lengths).
    public static let dontUnmap = RemapFlags(rawValue: 4)
}

/// `mremap` (`mm/mremap.c`).
extension AddressSpace {
    /// Resizes and/or moves a mapping (`mremap`). Page-table entries of every kind move as they are —
    /// present, huge, and non-present (migration, device) — so no data is copied and no reference
    /// changes. A huge PMD moves whole when source and target are both PMD-aligned; otherwise it is
    /// split first.
    /// - Parameters:
    ///   - address: start of the old range (page-aligned), inside one VMA.
    ///   - length: bytes of the old range.
    ///   - newLength: bytes of the new range (nonzero).
    ///   - flags: `.mayMove`, `.fixed` (with `.mayMove`), `.dontUnmap` (with `.mayMove` and equal lengths).
    ///   - target: with `.fixed`, the new address.
    /// - Returns: the new start address.
    /// - Throws: `.invalidArgument` (unaligned, zero new length, contradictory flags, overlapping fixed
    ///   target, resizing hugetlb by a non-2 MiB amount, a fixed target that cuts a hugetlb page), `.fault`
    ///   (old range not within one mapping),
    ///   `.outOfMemory` (cannot grow in place without `.mayMove`, no room), `.noProcess`.
    ///   On error nothing changes.
    /// Takes `mmapLock` for writing.
    public func remap(
        _ address: UInt64, length: Int, newLength: Int, flags: RemapFlags = [], to target: UInt64? = nil
    ) throws(HMMError) -> UInt64 {
        guard flags.rawValue & ~7 == 0 else { throw .invalid("unknown mremap flags") }
        guard !flags.contains(.fixed) || flags.contains(.mayMove) else { throw .invalid("MREMAP_FIXED needs MREMAP_MAYMOVE") }
        guard !flags.contains(.dontUnmap) || (flags.contains(.mayMove) && length == newLength) else {
            throw .invalid("MREMAP_DONTUNMAP needs MREMAP_MAYMOVE and equal lengths")
        }
        guard flags.contains(.fixed) == (target != nil) else { throw .invalid("a target address goes with MREMAP_FIXED") }
        let (oldLo, oldHi) = try validateRange(address, length, "mremap")
        let (newLo, newHi) = try validateRange(target ?? 0x10000, newLength, "mremap")
        let newLen = newHi - newLo
        let oldLen = oldHi - oldLo
        if flags.contains(.fixed), newLo < oldHi, oldLo < newHi { throw .invalid("mremap target overlaps the source") }
        mmapLock.writeLock()
        defer { mmapLock.unlock() }
        try checkAlive()
        // MREMAP_FIXED unmaps the target first: like munmap, it may not cut a hugetlb page in two.
        if flags.contains(.fixed) { try checkHugetlbBoundaries(newLo, newHi) }
        guard let vi = vmaIndex(containing: oldLo), vmas[vi].end >= oldHi else {
            throw HMMError(.fault, "mremap: \(hex(oldLo))+\(oldLen) is not inside one mapping")
        }
        let vma = vmas[vi]
        if vma.isHugetlb {
            guard (oldLo | oldLen | newLen) & PageSize.pmdMask == 0, (target ?? 0) & PageSize.pmdMask == 0 else {
                throw .invalid("mremap of hugetlb memory must use 2 MiB multiples")
            }
            guard newLen <= oldLen else { throw .invalid("hugetlb mappings cannot grow") }
        }
        if flags.contains(.fixed), let target, target < Self.mmapMin {
            throw .invalid("mremap target \(hex(target)) below the minimum mapping address")
        }
        // Shrink in place.
        if !flags.contains(.fixed) && !flags.contains(.dontUnmap) && newLen <= oldLen {
            if newLen < oldLen { rmapLock.withWriteLock { unmapLocked(oldLo + newLen, oldHi) } }
            return oldLo
        }
        // Grow in place when the old range ends the VMA and the space after it is free.
        if !flags.contains(.fixed) && !flags.contains(.dontUnmap) && oldHi == vma.end {
            let next = vi + 1 < vmas.count ? vmas[vi + 1].start : Self.mmapTop
            if oldLo + newLen <= next && oldLo + newLen <= PageTableIndex.userTop {
                rmapLock.withWriteLock {
                    vmas[vi].end = oldLo + newLen
                    mergeVMAs(around: oldLo, oldLo + newLen)  // `vma_merge_extend`
                }
                return oldLo
            }
        }
        guard flags.contains(.mayMove) else {
            throw HMMError(.outOfMemory, "mremap: cannot grow \(hex(oldLo)) in place without MREMAP_MAYMOVE")
        }
        let dest: UInt64
        if let target {
            dest = target
        } else {
            let align = vma.isHugetlb || (oldLo & PageSize.pmdMask == 0 && newLen >= UInt64(PageSize.pmd))
                ? UInt64(PageSize.pmd) : UInt64(PageSize.base)
            guard let a = findFreeRange(length: newLen, alignment: align) else {
                throw HMMError(.outOfMemory, "mremap: no free range of \(newLen) bytes")
            }
            dest = a
        }
        let moved = min(oldLen, newLen)
        let started = notifiers.start(NotifierRange(space: self, start: oldLo, end: oldHi, event: .unmap, owner: nil, blockable: true))
        defer { notifiers.end(started) }
        try rmapLock.withWriteLock { () throws(HMMError) in
            if flags.contains(.fixed) { unmapLocked(dest, dest + newLen) }
            if newLen < oldLen { unmapLocked(oldLo + newLen, oldHi) }
            // The table walk for the destination may allocate; do it before touching anything.
            try preallocateTables(dest, dest + moved)
            splitVMA(at: oldLo)
            splitVMA(at: oldLo + moved)
            let src = vmas[vmaIndex(containing: oldLo)!]
            moveEntries(from: oldLo, to: dest, length: moved)
            var newVMA = src
            newVMA.start = dest
            newVMA.end = dest + newLen
            if src.isAnonymous, let anon = src.anonVMA, !anon.isAttached {
                // `copy_vma`: a never-faulted anonymous VMA takes the new address as its pgoff, so it can
                // merge where it lands; one with pages keeps its pgoff (its pages' indices).
                newVMA.pgoff = dest >> UInt64(PageSize.shift)
            }
            if flags.contains(.dontUnmap) {
                mergeVMAs(around: oldLo, oldLo + moved)
            } else {
                vmas.remove(at: vmaIndex(containing: oldLo)!)
                freeEmptyTables(oldLo, oldLo + moved)
            }
            freeEmptyTables(dest, dest + newLen)
            insertVMA(newVMA)
            mergeVMAs(around: dest, dest + newLen)
        }
        return dest
    }

    /// Makes sure every table level for `[lo, hi)` exists, so moving entries cannot fail half-way
    /// (unused ones are pruned afterwards).
    private func preallocateTables(_ lo: UInt64, _ hi: UInt64) throws(HMMError) {
        var a = lo & ~PageSize.pmdMask
        while a < hi {
            let pmdN = try pmdNode(a, allocate: true)
            _ = try pteNode(pmdN, a, allocate: true)
            a += UInt64(PageSize.pmd)
        }
    }

    /// `move_page_tables`: moves every entry of `[from, from + length)` to `[to, to + length)`.
    /// Requires `mmapLock` and `rmapLock` held for writing, and an empty destination.
    private func moveEntries(from: UInt64, to: UInt64, length: UInt64) {
        var off: UInt64 = 0
        while off < length {
            let src = from + off
            let dst = to + off
            guard let srcPMD = try? pmdNode(src, allocate: false), srcPMD != 0 else {
                off += UInt64(PageSize.base)
                continue
            }
            let sSlot = pmdSlot(srcPMD, src)
            let pmd = PageTableEntry(rawValue: sSlot.pointee.load(ordering: .relaxed))
            if pmd.isNone {
                off = min(length, ((src | PageSize.pmdMask) + 1) - from)
                continue
            }
            if pmd.isLeaf || pmd.isNonPresent {
                if src & PageSize.pmdMask == 0, dst & PageSize.pmdMask == 0, length - off >= UInt64(PageSize.pmd),
                    let dstPMD = try? pmdNode(dst, allocate: true)
                {
                    let dSlot = pmdSlot(dstPMD, dst)
                    if PageTableEntry(rawValue: dSlot.pointee.load(ordering: .relaxed)).isTable {
                        // An empty table preallocated earlier: drop it for the huge entry.
                        let node = PageTableEntry(rawValue: dSlot.pointee.exchange(0, ordering: .releasing)).node
                        pool.retire([node])
                    }
                    dSlot.pointee.store(sSlot.pointee.exchange(0, ordering: .acquiringAndReleasing), ordering: .releasing)
                    off += UInt64(PageSize.pmd)
                    continue
                }
                splitHugePMD(srcPMD, src)
                continue
            }
            let sPTE = pteSlot(pmd.node, src)
            let e = sPTE.pointee.exchange(0, ordering: .acquiringAndReleasing)
            if e != 0 {
                // Tables were preallocated: neither call can fail or meet a huge entry here.
                let dstPMD = (try? pmdNode(dst, allocate: true)) ?? 0
                let dstPTE = (try? pteNode(dstPMD, dst, allocate: true)) ?? nil
                precondition(dstPTE != nil && dstPTE != 0, "mremap destination table missing")
                pteSlot(dstPTE!, dst).pointee.store(e, ordering: .releasing)
            }
            off += UInt64(PageSize.base)
        }
    }
}
