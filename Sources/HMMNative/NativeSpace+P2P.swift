import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// PCI peer-to-peer memory mapped into this process (`mmap` of a provider's `p2pmem/allocate` file,
/// `p2pmem_alloc_mmap()` in `drivers/pci/p2pdma.c`): loads, stores and system calls such as
/// `pread(O_DIRECT)` reach the provider's frames directly, and the provider's unbind revokes the
/// mapping — a touch is then `SIGBUS` and a system call `EFAULT`.
///
/// The mapping is an ordinary shared mapping of the pages' own file (``P2PHostMemory``), outside every
/// region: the engine never migrates it (P2PDMA memory is not migratable), and the userfaultfd never
/// sees it. `fork` shares it with the child, as the kernel shares a `p2pmem` VMA; the pages then stay
/// the provider's until it unbinds, which revokes the child's mapping as well.
///
/// Unmap it with ``unmap(address:length:)``: that gives the frames back to the pool (after their grace
/// period). A raw `munmap` is not seen; the frames then stay taken until the space closes and the
/// provider unbinds, never reused while a process might reach them.
extension NativeSpace {
    /// One mapping, or what is left of it after partial unmaps. Guarded by `mmapLock`.
    struct P2PMappingRecord {
        var address: UInt64
        /// The first page of ``memory`` mapped at ``address``.
        var firstPage: Int
        var pages: Int
        let memory: P2PHostMemory
        var end: UInt64 { address + UInt64(pages) << UInt64(PageSize.shift) }
    }

    /// Maps `length` bytes of `provider`'s peer memory into this process (`mmap` of its `allocate`
    /// file): the whole length is allocated contiguously from the pool now, zeroed, and every page
    /// mapped (`vm_insert_page` of each, as `p2pmem_alloc_mmap()` does).
    /// - Parameters:
    ///   - provider: the provider whose pool backs the mapping; it must belong to this space's machine.
    ///   - length: bytes to map (rounded up to pages), all allocated now.
    ///   - protection: `PROT_*`.
    ///   - flags: must contain `.shared` (peer memory is never copied on write); `.populate` is accepted
    ///     and changes nothing.
    ///   - offset: must be 0: every mapping is a fresh allocation.
    /// - Returns: the start address.
    /// - Throws: `.invalidArgument` (zero or oversized length, a private mapping, a nonzero offset,
    ///   other flags or protection bits, another machine's provider), `.noDevice` (the provider is
    ///   unbinding or removed), `.outOfMemory` (no contiguous room in the pool, or the host refused the
    ///   mapping — nothing is taken then), `.noProcess` after ``close()``.
    /// Takes `mmapLock` for writing, then the provider's host-mapping lock.
    public func mapP2PMemory(
        _ provider: P2PProvider, length: Int, protection: Protection = [.read, .write], flags: MapFlags = .shared,
        offset: Int = 0
    ) throws(HMMError) -> UInt64 {
        let pages = try provider.checkMapping(length: length, protection: protection, flags: flags, offset: offset,
                                              machine: machine)
        let bytes = pages << PageSize.shift
        try checkOpen()
        return try mmapLock.withWriteLock { () throws(HMMError) -> UInt64 in
            try checkOpen()
            let memory = try provider.mapIntoHost(pages: pages, space: eventSpaceID)
            let p = mmap(nil, bytes, protection.hostFlags, MAP_SHARED | MAP_POPULATE, memory.descriptor, 0)
            guard let p, p != MAP_FAILED else {
                let e = errno
                provider.releaseHostPages(memory, 0..<pages)
                throw HMMError(.outOfMemory, "cannot map \(bytes) bytes of \(provider): \(String(cString: strerror(e)))")
            }
            let address = UInt64(UInt(bitPattern: p))
            p2pMappings.append(P2PMappingRecord(address: address, firstPage: 0, pages: pages, memory: memory))
            return address
        }
    }

    /// The P2PDMA mappings' share of ``unmap(address:length:)`` (the host range is already unmapped):
    /// their pages in `[lo, hi)` give their frames back. Requires `mmapLock` held for writing.
    func forgetP2PMappings(_ lo: UInt64, _ hi: UInt64) {
        var kept: [P2PMappingRecord] = []
        for r in p2pMappings {
            guard r.address < hi, lo < r.end else {
                kept.append(r)
                continue
            }
            let from = Int((max(lo, r.address) - r.address) >> UInt64(PageSize.shift))
            let to = Int((min(hi, r.end) - r.address) >> UInt64(PageSize.shift))
            r.memory.provider.releaseHostPages(r.memory, r.firstPage + from..<r.firstPage + to)
            if from > 0 { kept.append(P2PMappingRecord(address: r.address, firstPage: r.firstPage, pages: from, memory: r.memory)) }
            if to < r.pages {
                kept.append(P2PMappingRecord(address: r.address + UInt64(to) << UInt64(PageSize.shift),
                                             firstPage: r.firstPage + to, pages: r.pages - to, memory: r.memory))
            }
        }
        p2pMappings = kept
    }

    /// The mappings may now be reached where this space cannot see their unmap (a `fork`'s child, or
    /// after ``close()``): their frames stay taken until the provider unbinds. Requires `mmapLock`
    /// held for writing; `forget` also drops the records (at close).
    func detachP2PMappings(forget: Bool) {
        for r in p2pMappings { r.memory.provider.detachHostMemory(r.memory) }
        if forget { p2pMappings = [] }
    }
}
