/// Mappings a driver fills itself (`VM_MIXEDMAP` + `vm_insert_page`), such as `mmap` of a device file.
extension AddressSpace {
    /// Maps `length` bytes and inserts a fresh zero-filled system page at every page, as a driver's
    /// `mmap` handler does with `vm_insert_page`; the mapping holds the only reference to each page.
    /// A private mapping maps the pages read-only so that a write copies (the driver's page is never
    /// written through it); a shared one maps them writable when `protection` allows.
    /// - Returns: the start address.
    /// - Throws: `.invalidArgument` (zero length, both or neither of shared/private), `.outOfMemory`
    ///   (no range or no frames; nothing stays mapped), `.noProcess`.
    /// Takes `mmapLock` for writing.
    public func mapDriverPages(length: Int, protection: Protection, shared: Bool) throws(HMMError) -> UInt64 {
        let start = try map(length: length, protection: protection, flags: [shared ? .shared : .private, .anonymous])
        let end = start + UInt64((length + PageSize.base - 1) & ~(PageSize.base - 1))
        do {
            try mmapLock.withWriteLock { () throws(HMMError) in
                try checkAlive()
                guard let vi = vmaIndex(containing: start) else { throw HMMError(.noEntry, "driver mapping vanished") }
                rmapLock.withWriteLock { _ = vmas[vi].flags.insert(.mixedMap) }
                var a = start
                while a < end {
                    guard let page = machine.allocateFolio(order: 0, zeroed: true) else {
                        throw HMMError(.outOfMemory, "no frame for a driver page at \(hex(a))")
                    }
                    let pmdN = try pmdNode(a, allocate: true)
                    guard let pteN = try pteNode(pmdN, a, allocate: true), pteN != 0 else {
                        preconditionFailure("fresh driver mapping has a huge PMD")
                    }
                    // `vm_insert_page`: the mapping's reference replaces the allocation's.
                    machine.addPageMapcount(page, 1)
                    let e = PageTableEntry.present(page, writable: shared && protection.contains(.write),
                                                   user: protection != .none, dirty: false)
                    pteSlot(pteN, a).pointee.store(e.rawValue, ordering: .releasing)
                    a += UInt64(PageSize.base)
                }
            }
        } catch {
            try? unmap(start, length: length)
            throw error
        }
        return start
    }
}
