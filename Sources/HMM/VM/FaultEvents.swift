extension FaultAccess {
    var memoryAccess: MemoryAccess {
        switch self {
        case .read: return .read
        case .write: return .write
        case .unshare: return .unshare
        }
    }
}

extension AddressSpace {
    /// A CPU fault while the machine's hub observes: what the fault will meet is read first (without
    /// locks: a racing change makes the label stale, never the fault wrong), then the fault runs and
    /// its ``CPUFaultEvent`` is published, failures included.
    func handleFaultObserved(_ address: UInt64, _ access: FaultAccess) throws(HMMError) {
        let (hit, size) = faultHit(address, access)
        let start = monotonicNanoseconds()
        var failure: HMMError?
        do throws(HMMError) { try resolveFault(address, access) } catch { failure = error }
        let duration = monotonicNanoseconds() &- start
        machine.events.publish(.cpuFault(CPUFaultEvent(
            space: id, address: address & ~PageSize.baseMask, access: access.memoryAccess,
            hit: failure?.code == .bus && hit != .hugetlb ? .poisoned : hit, size: size, thread: currentThreadID(),
            start: start, duration: duration, blocked: duration, succeeded: failure == nil)))
        if let failure { throw failure }
    }

    /// What a fault at `address` finds: the entry at the PMD, else at the PTE, read without locks.
    func faultHit(_ address: UInt64, _ access: FaultAccess) -> (CPUFaultEvent.Hit, PageSizeClass) {
        guard let vi = vmaIndex(containing: address) else { return (.spurious, .base) }
        let vma = vmas[vi]
        if vma.isHugetlb { return (.hugetlb, .huge) }
        guard let pmdN = try? pmdNode(address, allocate: false), pmdN != 0 else { return emptyHit(vma, address, access) }
        let pmd = PageTableEntry(rawValue: pmdSlot(pmdN, address).pointee.load(ordering: .acquiring))
        if pmd.isNone { return emptyHit(vma, address, access) }
        if pmd.isLeaf {
            if pmd.pfn == machine.hugeZeroPFN { return (access == .read ? .spurious : .transparentHuge, .huge) }
            return (access == .read || pmd.isWritable ? .spurious : .copyOnWrite, .huge)
        }
        if pmd.isNonPresent { return (entryHit(pmd, access), .huge) }
        guard let pteN = try? pteNode(pmdN, address, allocate: false), pteN != 0 else { return emptyHit(vma, address, access) }
        let pte = PageTableEntry(rawValue: pteSlot(pteN, address).pointee.load(ordering: .acquiring))
        if pte.isNone { return (vma.file != nil ? .file : (access == .read ? .zeroPage : .newPage), .base) }
        return (entryHit(pte, access), .base)
    }

    private func emptyHit(_ vma: VMA, _ address: UInt64, _ access: FaultAccess) -> (CPUFaultEvent.Hit, PageSizeClass) {
        if vma.file != nil { return (.file, .base) }
        if vma.thpEligible(address) { return (access == .read ? .hugeZeroPage : .transparentHuge, .huge) }
        return (access == .read ? .zeroPage : .newPage, .base)
    }

    private func entryHit(_ e: PageTableEntry, _ access: FaultAccess) -> CPUFaultEvent.Hit {
        switch e.kind {
        case .none: return access == .read ? .zeroPage : .newPage
        case .present, .table:
            if access == .read || e.isWritable { return .spurious }
            if e.pfn == machine.zeroPFN { return .newPage }
            return machine.pageMapcount(e.pfn) > 1 ? .copyOnWrite : .reuse
        case .migrationRead, .migrationReadExclusive, .migrationWrite: return .migrationWait
        case .devicePrivateRead, .devicePrivateWrite: return .devicePrivate
        case .deviceExclusive: return .deviceExclusive
        case .hwpoison: return .poisoned
        }
    }
}
