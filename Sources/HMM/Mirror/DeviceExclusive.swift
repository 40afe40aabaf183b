import Synchronization

/// Device-exclusive entries (`make_device_exclusive()` in `mm/rmap.c`, `remove_device_exclusive_entry()` in
/// `mm/memory.c`): a device doing atomics owns a system page until the CPU touches it again.
extension AddressSpace {
    /// Makes the page at `address` device-exclusive: faults it in writable (breaking copy-on-write,
    /// splitting a huge mapping), replaces its PTE by a device-exclusive entry (which keeps the rmap and
    /// the reference), and calls `program(pfn)` with the folio locked and referenced, so the driver can
    /// program its MMU before any CPU access can revoke it. The first CPU access afterwards restores the
    /// PTE and sends a `clear` invalidation.
    ///
    /// Requires `mmapLock` held for reading (``MirroredAddressSpace/withMmapReadLock(_:)``).
    /// `owner` is passed on in the `exclusive` invalidation so the caller can recognise (and ignore) its
    /// own event.
    /// - Throws: `.invalidArgument` (address outside user space), `.unsupported` (not private
    ///   anonymous memory, hugetlb), `.fault` (no writable mapping), `.outOfMemory`.
    public func makeDeviceExclusive(
        _ address: UInt64, owner: (any AnyObject & Sendable)?, _ program: (PFN) -> Void
    ) throws(HMMError) {
        let a = address & ~PageSize.baseMask
        guard a < PageTableIndex.userTop else { throw .invalid("\(hex(address)) is outside user space") }
        try checkAlive()
        guard let vi = vmaIndex(containing: a) else { throw HMMError(.fault, "no mapping at \(hex(a))") }
        let vma = vmas[vi]
        guard vma.isAnonymous, !vma.isShared, !vma.isHugetlb else {
            throw HMMError(.unsupported, "device-exclusive access needs private anonymous memory at \(hex(a))")
        }
        guard vma.writable else { throw HMMError(.fault, "\(hex(a)) is not writable") }
        while true {
            guard let pfn = try grabWritablePage(a) else { continue }
            let head = frames.head(of: pfn)
            frames.lock(head)
            var done = false
            invalidating(a, a + UInt64(PageSize.base), .exclusive, owner: owner) {
                withLockedPTE(a) { slot, e in
                    guard e.isPresent, e.isWritable, e.pfn == pfn else { return }
                    if e.isDirty { frames.setFlags(head, .dirty) }
                    slot.pointee.store(PageTableEntry.nonPresent(.deviceExclusive, pfn).rawValue, ordering: .releasing)
                    done = true
                }
            }
            if done { program(pfn) }
            frames.unlock(head)
            machine.putFolio(head)
            if done {
                publishExclusive(.grant, a, owner: owner)
                return
            }
        }
    }

    /// A writable, present small mapping at `a` with a reference taken under the page-table lock
    /// (`FOLL_GET | FOLL_WRITE | FOLL_SPLIT_PMD`); nil to retry after a fault or split.
    private func grabWritablePage(_ a: UInt64) throws(HMMError) -> PFN? {
        let pmdN = try pmdNode(a, allocate: false)
        if pmdN != 0 {
            let pmd = PageTableEntry(rawValue: pmdSlot(pmdN, a).pointee.load(ordering: .acquiring))
            if pmd.isLeaf {
                splitHugePMD(pmdN, a)
                return nil
            }
            var found: PFN?
            if pmd.isTable {
                withLockedPTE(a) { _, e in
                    guard e.isPresent, e.isWritable, e.isUser, !e.isSpecial else { return }
                    machine.getFolio(frames.head(of: e.pfn))
                    found = e.pfn
                }
            }
            if let found {
                guard frames.flags(found).contains(.anon) else {
                    machine.putFolio(frames.head(of: found))
                    throw HMMError(.unsupported, "\(hex(a)) is not an anonymous page")
                }
                return found
            }
        }
        do { try handleFault(a, .write) } catch {
            throw error.code == .segmentationFault || error.code == .bus ? HMMError(.fault, error.message) : error
        }
        return nil
    }

    /// `remove_device_exclusive_entry`: the CPU touched a device-exclusive page. Revokes the device's
    /// access (`clear` invalidation of the page, no owner) and restores a present entry — writable when
    /// the VMA is and the page is still anon-exclusive, dirty if the folio is. Requires `mmapLock` held.
    func restoreDeviceExclusive(_ vma: VMA, _ pteN: UInt32, _ address: UInt64, _ e: PageTableEntry) throws(HMMError) {
        let pfn = e.pfn
        let head = frames.head(of: pfn)
        guard machine.tryGetFolio(head) else { return }
        defer { machine.putFolio(head) }
        guard frames.tryLock(head) else {
            while frames.flags(head).contains(.locked) { sched_yieldShim() }
            return
        }
        defer { frames.unlock(head) }
        let a = address & ~PageSize.baseMask
        var restored = false
        defer { if restored { publishExclusive(.restore, a, owner: nil) } }
        invalidating(a, a + UInt64(PageSize.base), .clear) {
            let lock = pool.lock(pteN)
            let slot = pteSlot(pteN, a)
            lock.lock()
            defer { lock.unlock() }
            guard slot.pointee.load(ordering: .relaxed) == e.rawValue else { return }
            // The protection is the VMA's as it is now (mprotect leaves device-exclusive entries alone).
            let user = vma.accessible
            let writable = vma.writable && user && frames.flags(pfn).contains(.anonExclusive)
            let dirty = writable && frames.flags(head).contains(.dirty)
            slot.pointee.store(PageTableEntry.present(pfn, writable: writable, user: user, young: false, dirty: dirty).rawValue,
                               ordering: .releasing)
            machine.statistics.count(.faultDeviceExclusive)
            restored = true
        }
    }

    private func publishExclusive(_ action: ExclusiveEvent.Action, _ a: UInt64, owner: (any AnyObject & Sendable)?) {
        guard machine.events.isObserving else { return }
        machine.events.publish(.exclusive(ExclusiveEvent(
            action: action, space: id, address: a, pages: 1, owner: owner.map { UInt(bitPattern: ObjectIdentifier($0)) } ?? 0,
            thread: currentThreadID(), timestamp: monotonicNanoseconds())))
    }
}
