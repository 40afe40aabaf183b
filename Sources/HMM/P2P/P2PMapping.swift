/// User mappings of P2PDMA memory (`p2pmem_alloc_mmap`, the `mmap` of sysfs `p2pmem/allocate`).
extension AddressSpace {
    /// Maps `length` bytes of `provider`'s peer memory (`mmap` of its `allocate` file). The whole length
    /// is allocated contiguously from the pool now, zeroed, and every page inserted (`vm_insert_page` into a
    /// `VM_SHARED | VM_MIXEDMAP` VMA); the page-table entry holds each page's only reference. Fork
    /// shares the pages; unmap retires each page when its last reference drops; the provider's unbind
    /// revokes the mapping (a later touch gets `SIGBUS`).
    /// - Parameters:
    ///   - provider: the P2PDMA provider whose pool backs the mapping.
    ///   - length: bytes to map, all allocated now.
    ///   - protection: `PROT_*`.
    ///   - flags: must contain `.shared` (peer memory is never copied on write); `.populate` is accepted
    ///     and changes nothing (every page is inserted anyway).
    ///   - offset: must be 0: every mapping is a fresh allocation.
    /// - Returns: the start address.
    /// - Throws: `.invalidArgument` (zero length, a private mapping, a nonzero offset, other flags or
    ///   protection bits), `.noDevice` (the provider is unbinding or removed), `.outOfMemory` (no
    ///   contiguous room in the pool, no address range, no page-table node — the pages not yet inserted
    ///   go back to the pool and nothing stays mapped; the kernel's `p2pmem_alloc_mmap()` once leaked a
    ///   pagemap reference on this path, which hung device removal), `.noProcess`.
    /// Takes `mmapLock` for writing, then the provider's state lock.
    public func mapP2PMemory(
        _ provider: P2PProvider, length: Int, protection: Protection = [.read, .write], flags: MapFlags = .shared,
        offset: Int = 0
    ) throws(HMMError) -> UInt64 {
        let pages = try provider.checkMapping(length: length, protection: protection, flags: flags, offset: offset,
                                              machine: machine)
        let len = UInt64(pages) << UInt64(PageSize.shift)
        mmapLock.writeLock()
        defer { mmapLock.unlock() }
        try checkAlive()
        // Join the file's mappers before allocating, so an unbind that starts after the allocation
        // succeeded is sure to find (and, once this lock is dropped, revoke) this mapping.
        provider.file.addMapper(self)
        guard let start = findFreeRange(length: len, alignment: UInt64(PageSize.base)) else {
            throw HMMError(.outOfMemory, "no free range of \(len) bytes")
        }
        let first = try provider.takePages(pages, forKernel: false)
        guard let pm = machine.pagemap(of: first) else { preconditionFailure("pool page \(first) without a pagemap") }
        // Like every frame handed to a user mapping, the pages start zeroed: nothing an earlier user
        // (another process, a driver) left in the BAR can leak. One chunk, so the bytes are contiguous.
        machine.pointer(first).initializeMemory(as: UInt8.self, repeating: 0, count: pages << PageSize.shift)
        var vma = VMA(start: start, end: start + len, protection: protection, flags: [.shared, .mixedMap, .softDirty],
                      file: nil, pgoff: 0, anonVMA: nil, reservation: nil)
        vma.deviceFile = provider.file
        rmapLock.withWriteLock { insertVMA(vma) }
        var inserted = 0
        do throws(HMMError) {
            while inserted < pages {
                let a = start + UInt64(inserted) << UInt64(PageSize.shift)
                let pfn = first + inserted
                // Tables first: a failure leaves this page untouched (refcount 0, no pagemap reference).
                let pmdN = try pmdNode(a, allocate: true)
                guard let pteN = try pteNode(pmdN, a, allocate: true), pteN != 0 else {
                    preconditionFailure("fresh p2pmem mapping has a huge PMD")
                }
                do { try pm.initFolio(pfn, order: 0) } catch { preconditionFailure("pool page \(pfn) in use: \(error)") }
                frames.unlock(pfn)
                machine.addPageMapcount(pfn, 1)
                let e = PageTableEntry.present(pfn, writable: protection.contains(.write), user: protection != .none,
                                               dirty: false)
                pteSlot(pteN, a).pointee.store(e.rawValue, ordering: .releasing)
                inserted += 1
            }
        } catch {
            provider.returnPages(first + inserted, pages - inserted)
            rmapLock.withWriteLock { unmapLocked(start, start + len) }
            throw error
        }
        machine.statistics.count(.p2pPagesMapped, pages)
        return start
    }
}

extension P2PProvider {
    /// `p2pmem_alloc_mmap`'s checks of an `mmap` of the `allocate` file, for every engine: returns the
    /// number of pages to map.
    /// - Throws: `.invalidArgument` (zero or oversized length, a private mapping, a nonzero offset, other
    ///   flags or protection bits, a mapper of another machine).
    @_spi(Engine)
    public func checkMapping(
        length: Int, protection: Protection, flags: MapFlags, offset: Int, machine: Machine
    ) throws(HMMError) -> Int {
        guard length > 0, length <= 1 << 40 else { throw .invalid("p2pmem mmap length \(length) out of range") }
        guard !flags.contains(.private) else { throw .invalid("p2pmem: attempted private mapping") }
        guard flags.contains(.shared), flags.isSubset(of: [.shared, .populate]) else {
            throw .invalid("p2pmem mmap needs MAP_SHARED and no other flags except MAP_POPULATE")
        }
        guard offset == 0 else { throw .invalid("p2pmem mmap offset \(offset) must be 0") }
        guard protection.rawValue & ~7 == 0 else { throw .invalid("unknown protection bits \(protection.rawValue)") }
        guard self.machine === machine else { throw .invalid("\(self) belongs to another machine") }
        return (length + PageSize.base - 1) >> PageSize.shift
    }
}
