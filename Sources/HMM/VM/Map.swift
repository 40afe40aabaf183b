/// `mmap` (`mm/mmap.c`).
extension AddressSpace {
    /// Creates a mapping (`mmap`).
    ///
    /// - Parameters:
    ///   - address: with `.fixed` or `.fixedNoReplace`, the exact (page-aligned) address; otherwise ignored.
    ///   - length: bytes; rounded up to 4 KiB (2 MiB for `.hugetlb`).
    ///   - protection: `PROT_*`.
    ///   - flags: exactly one of `.shared` / `.private`; `.anonymous` unless `file` is given.
    ///   - file: the file to map, at byte `offset` (page-aligned).
    ///   - offset: the byte offset into `file` (page-aligned); 0 for anonymous memory.
    /// - Returns: the start address.
    /// - Throws: `.invalidArgument` (zero length, unaligned address or offset, contradictory flags,
    ///   anonymous with a file, a `.fixed` range that cuts a hugetlb page of an existing mapping),
    ///   `.outOfMemory` (no room, a length that overflows, an empty hugetlb pool), `.unsupported` (shared
    ///   hugetlb), `.exists` (`.fixedNoReplace` over an existing mapping), `.noProcess` after `exit`.
    ///   On error nothing changes.
    ///
    /// `.populate` (`MAP_POPULATE`) faults the pages in before returning, as `mm_populate` does, and like
    /// it never fails the call: population stops at the first page that cannot be had (RAM or the
    /// page-table pool exhausted) and what was populated stays mapped and accounted; a `PROT_NONE`
    /// mapping is not populated at all. The rest faults in on first touch.
    /// Takes `mmapLock` for writing.
    @discardableResult
    public func map(
        at address: UInt64 = 0, length: Int, protection: Protection, flags: MapFlags,
        file: MemoryFile? = nil, offset: Int = 0
    ) throws(HMMError) -> UInt64 {
        guard length > 0 else { throw .invalid("mmap length \(length) must be positive") }
        guard flags.contains(.shared) != flags.contains(.private) else {
            throw .invalid("mmap needs exactly one of MAP_SHARED and MAP_PRIVATE")
        }
        guard flags.contains(.anonymous) == (file == nil) else {
            throw .invalid(file == nil ? "mmap without MAP_ANONYMOUS needs a file" : "MAP_ANONYMOUS with a file")
        }
        guard protection.rawValue & ~7 == 0 else { throw .invalid("unknown protection bits \(protection.rawValue)") }
        let hugetlb = flags.contains(.hugetlb)
        if hugetlb && file != nil { throw .invalid("MAP_HUGETLB of a non-hugetlbfs file") }
        if hugetlb && flags.contains(.shared) {
            throw HMMError(.unsupported, "shared hugetlb mappings need hugetlbfs, which is not modelled")
        }
        let granule = UInt64(hugetlb ? PageSize.pmd : PageSize.base)
        guard UInt64(length) <= PageTableIndex.userTop, offset >= 0, offset <= 1 << 40 else {
            throw HMMError(.outOfMemory, "mmap length \(length) or offset \(offset) too large")
        }
        let len = (UInt64(length) + granule - 1) & ~(granule - 1)
        guard UInt64(offset) & PageSize.baseMask == 0 else { throw .invalid("mmap offset \(offset) is not page-aligned") }
        let fixed = flags.contains(.fixed) || flags.contains(.fixedNoReplace)
        if fixed {
            guard address & (granule - 1) == 0 else { throw .invalid("MAP_FIXED address \(hex(address)) is unaligned") }
            guard address >= Self.mmapMin, address <= PageTableIndex.userTop - len else {
                throw HMMError(.outOfMemory, "MAP_FIXED range \(hex(address))+\(len) is outside user space")
            }
        }
        mmapLock.writeLock()
        defer { mmapLock.unlock() }
        try checkAlive()
        if flags.contains(.fixed) && !flags.contains(.fixedNoReplace) { try checkHugetlbBoundaries(address, address + len) }
        if flags.contains(.fixedNoReplace) {
            let i = firstVMA(endingAfter: address)
            if i < vmas.count && vmas[i].start < address + len {
                throw HMMError(.exists, "MAP_FIXED_NOREPLACE: \(hex(address))+\(len) overlaps \(hex(vmas[i].start))")
            }
        }
        let hugePages = Int(len >> UInt64(PageSize.pmdShift))
        if hugetlb && !machine.hugetlb.reserve(hugePages) {
            throw HMMError(.outOfMemory, "hugetlb pool has fewer than \(hugePages) free pages")
        }
        let start: UInt64
        if fixed {
            start = address
            rmapLock.withWriteLock { unmapLocked(start, start + len) }
        } else {
            let align = hugetlb || (len >= UInt64(PageSize.pmd) && file == nil) ? UInt64(PageSize.pmd) : UInt64(PageSize.base)
            guard let a = findFreeRange(length: len, alignment: align) ?? findFreeRange(length: len, alignment: 4096)
            else {
                if hugetlb { machine.hugetlb.unreserve(hugePages) }
                throw HMMError(.outOfMemory, "no free range of \(len) bytes")
            }
            start = a
        }
        var vma = VMA(
            start: start, end: start + len, protection: protection, flags: .softDirty, file: file,
            pgoff: UInt64(offset) >> UInt64(PageSize.shift), anonVMA: nil, reservation: nil)
        if flags.contains(.shared) { vma.flags.insert(.shared) }
        if hugetlb {
            vma.flags.insert(.hugetlb)
            vma.reservation = HugetlbReservation()
        }
        if file == nil && flags.contains(.shared) {
            // Shared anonymous memory is shmem: a private tmpfs file backs it.
            let shmem = MemoryFile(machine: machine, size: Int(len), shmem: true)
            machine.registerShmem(shmem)
            vma.file = shmem
            vma.pgoff = 0
        }
        if !flags.contains(.shared) {
            vma.anonVMA = AnonVMA(registry: machine.registry)
            if file == nil { vma.pgoff = start >> UInt64(PageSize.shift) }
        }
        rmapLock.withWriteLock {
            insertVMA(vma)
            mergeVMAs(around: start, start + len)  // `vma_merge_new_range`
        }
        if flags.contains(.populate), let vi = vmaIndex(containing: start) { populate(start, start + len, vmas[vi]) }
        return start
    }

    /// `populate_vma_page_range` as `mmap` uses it (`mm_populate` with errors ignored): faults in
    /// `[lo, hi)` of the new `vma` up to the first page that cannot be had. Nothing for `PROT_NONE`.
    /// Requires `mmapLock` held for writing.
    private func populate(_ lo: UInt64, _ hi: UInt64, _ vma: VMA) {
        guard vma.accessible else { return }
        // `populate_vma_page_range`: write faults only for private writable memory (to break COW up
        // front); shared memory is read-faulted, so populating does not dirty it.
        let access: FaultAccess = vma.writable && !vma.isShared ? .write : .read
        let step = UInt64(vma.isHugetlb ? PageSize.pmd : PageSize.base)
        var a = lo
        while a < hi {
            do { try handleFault(a, access) } catch { return }
            a += step
        }
    }
}
