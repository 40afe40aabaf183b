import Synchronization

/// `FOLL_*` flags for ``AddressSpace/getUserPages(_:count:flags:)``.
public struct GUPFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `FOLL_WRITE`: the caller will write; copy-on-write is broken first.
    public static let write = GUPFlags(rawValue: 0x01)
    /// `FOLL_PIN` (`pin_user_pages`): a DMA pin, counted with the pin bias.
    public static let pin = GUPFlags(rawValue: 0x40000)
    /// `FOLL_LONGTERM`: the pin may last indefinitely (requires `.pin`).
    public static let longTerm = GUPFlags(rawValue: 0x100)
    /// `FOLL_PCI_P2PDMA`: the caller can handle PCI peer-to-peer memory; without it such pages fail
    /// with `.remoteIO`.
    public static let pciP2PDMA = GUPFlags(rawValue: 0x10_0000)
    /// `get_user_pages_fast`: first a lockless walk that never faults and takes no `mmapLock`; the
    /// pages it cannot take go through the slow path.
    public static let fast = GUPFlags(rawValue: 0x8000_0000)
}

/// Pages held by a GUP call (`get_user_pages` / `pin_user_pages`). The references are dropped by
/// ``release()`` or when the handle is deallocated.
public final class PinnedPages: @unchecked Sendable {
    public let machine: Machine
    /// The page frame of each requested page, in order.
    public let pfns: [PFN]
    public let flags: GUPFlags
    private let released = Atomic<Bool>(false)

    init(machine: Machine, pfns: [PFN], flags: GUPFlags) {
        self.machine = machine
        self.pfns = pfns
        self.flags = flags
    }

    deinit { release() }

    /// Drops every reference (`put_page` / `unpin_user_pages`). Idempotent.
    public func release() {
        guard !released.exchange(true, ordering: .acquiringAndReleasing) else { return }
        for pfn in pfns { machine.dropGUPReference(pfn, pin: flags.contains(.pin)) }
    }

    /// Direct access to a held page's bytes (what a device would DMA to or from).
    /// - Throws: `.invalidArgument` for an index out of range or after ``release()``.
    public func withBytes<R>(ofPage index: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> R) throws -> R {
        guard index >= 0, index < pfns.count, !released.load(ordering: .acquiring) else {
            throw HMMError(.invalidArgument, "page \(index) is not held")
        }
        return try body(UnsafeMutableRawBufferPointer(start: machine.pointer(pfns[index]), count: PageSize.base))
    }
}

extension AddressSpace {
    /// `gup_must_unshare` for a read-only pin of the page `pfn` that entry `e` maps: an anonymous page
    /// others may share would go stale (the next write fault copies it away from the pin); and, for a
    /// long-term pin in a private mapping (`is_cow_mapping`, Linux >= 6.2), so would any page that is not
    /// anonymous — the shared zero page, the huge zero page, a page-cache page — since the first write
    /// replaces it with an anonymous copy. Such a page is first replaced by an exclusive anonymous copy
    /// (an unshare fault). `vma` nil means GUP-fast, which cannot tell and must fall back. Driver
    /// (`VM_MIXEDMAP`) and peer-to-peer pages are left as they are.
    func mustUnshare(_ e: PageTableEntry, _ pfn: PFN, _ vma: VMA?, longTerm: Bool) -> Bool {
        if e.isWritable { return false }
        let head = frames.head(of: pfn)
        let headFlags = frames.flags(head)
        let f = frames.flags(pfn)
        if f.contains(.anon) {
            return !(f.contains(.anonExclusive) || (headFlags.contains(.hugetlb) && headFlags.contains(.anonExclusive)))
        }
        guard longTerm else { return false }
        guard let vma else { return true }
        guard vma.isCOW, !vma.flags.contains(.mixedMap) else { return false }
        return headFlags.contains(.zero) || (!e.isSpecial && vma.file != nil && machine.deviceKind(pfn) == nil)
    }
}

extension Machine {
    /// Takes a GUP reference on the page `pfn` (its folio). The zero pages are never counted.
    func takeGUPReference(_ pfn: PFN, pin: Bool) {
        if frames.flags(pfn).contains(.zero) { return }
        let head = frames.head(of: pfn)
        let units = pin ? pinFolio(head) : { getFolio(head); return Int32(1) }()
        externalReferences.wrappingAdd(Int(units), ordering: .relaxed)
    }

    func dropGUPReference(_ pfn: PFN, pin: Bool) {
        if frames.flags(pfn).contains(.zero) { return }
        let head = frames.head(of: pfn)
        let units: Int32 = pin && frames.order(head) == 0 ? Self.pinBias : 1
        externalReferences.wrappingSubtract(Int(units), ordering: .relaxed)
        if pin { unpinFolio(head) } else { putFolio(head) }
    }
}

/// GUP (`mm/gup.c`).
extension AddressSpace {
    /// Takes references on `count` pages starting at `address` (`get_user_pages`, `pin_user_pages`,
    /// their `_fast` variants). Pages are faulted in as needed: `.write` breaks copy-on-write; a pin of a
    /// shared anonymous page unshares it first, so the pinned page cannot later diverge from what the
    /// process sees, and so does a read-only long-term pin of the zero page, the huge zero page or a
    /// page-cache page in a private mapping (`gup_must_unshare`, Linux >= 6.2): it pins an exclusive
    /// anonymous copy, which later writes through the mapping reach. All or nothing: on error every
    /// reference taken so far is dropped.
    ///
    /// Device-private pages are faulted back to RAM (the driver's `migrateToRAM`); a long-term pin of a
    /// device-coherent page first moves it to a system page (`migrate_device_coherent_folio`). Long-term
    /// pins of system RAM need no migration (the machine has no movable zone or CMA). PCI P2PDMA pages
    /// need `.pciP2PDMA`; with it they may be pinned long-term too (the current kernel's rule — such a
    /// pin delays the provider's unbind until it is released).
    ///
    /// `.fast` first walks the page tables without `mmapLock`, inside an ``Epoch`` critical section
    /// (`gup_fast`): it takes a speculative reference, re-checks the entry, and stops at the first page
    /// it cannot take (not present, special, a P2PDMA page without the flag, a pin that must unshare);
    /// the rest goes through the slow path.
    /// - Throws: `.invalidArgument` (unaligned, zero or overflowing count, `.longTerm` without `.pin`),
    ///   `.fault` (no mapping, no permission, `PROT_NONE`, a driver mapping with no page there),
    ///   `.remoteIO` (a P2PDMA page without `.pciP2PDMA`), `.outOfMemory`, `.busy` (a coherent page
    ///   could not be moved for a long-term pin), `.noProcess`.
    /// The slow path takes `mmapLock` for reading.
    public func getUserPages(_ address: UInt64, count: Int, flags: GUPFlags) throws(HMMError) -> PinnedPages {
        guard address & PageSize.baseMask == 0 else { throw .invalid("GUP address \(hex(address)) is unaligned") }
        guard count > 0, count <= 1 << 27 else { throw .invalid("GUP count \(count) out of range") }
        guard !flags.contains(.longTerm) || flags.contains(.pin) else { throw .invalid("FOLL_LONGTERM needs FOLL_PIN") }
        let end = address &+ UInt64(count) << UInt64(PageSize.shift)
        guard end > address, end <= PageTableIndex.userTop else { throw .invalid("GUP range overflows") }
        var pfns: [PFN] = []
        pfns.reserveCapacity(min(count, 1 << 16))  // a bad range fails early; do not reserve 1 GiB for it
        if flags.contains(.fast) {
            gupFast(address, count: count, flags: flags, into: &pfns)
            machine.statistics.count(.gupFastPages, pfns.count)
            if pfns.count == count { return PinnedPages(machine: machine, pfns: pfns, flags: flags) }
            machine.statistics.count(.gupFastFallback)
        }
        mmapLock.readLock()
        defer { mmapLock.unlock() }
        let pin = flags.contains(.pin)
        do throws(HMMError) {
            try checkAlive()
            for i in pfns.count..<count {
                let a = address + UInt64(i) << UInt64(PageSize.shift)
                guard let vi = vmaIndex(containing: a) else { throw HMMError(.fault, "GUP: no mapping at \(hex(a))") }
                let vma = vmas[vi]
                if (flags.contains(.write) && !vma.writable) || !vma.readable {
                    throw HMMError(.fault, "GUP: \(hex(a)) does not allow \(flags.contains(.write) ? "write" : "read")")
                }
                while true {
                    if let pfn = try followPage(a, vma, flags: flags) {
                        if flags.contains(.longTerm), machine.deviceKind(pfn) == .deviceCoherent {
                            // Coherent memory must stay evictable: move it to RAM, then pin that page.
                            let head = frames.head(of: pfn)
                            machine.getFolio(head)
                            machine.dropGUPReference(pfn, pin: pin)
                            defer { machine.putFolio(head) }
                            try machine.migrateDeviceCoherentPage(head)
                            continue
                        }
                        pfns.append(pfn)
                        break
                    }
                    let mustUnshare = pin && !flags.contains(.write)
                    do {
                        try handleFault(a, flags.contains(.write) ? .write : (mustUnshare ? .unshare : .read))
                    } catch {
                        throw error.code == .segmentationFault || error.code == .bus ? HMMError(.fault, error.message) : error
                    }
                }
            }
        } catch {
            for pfn in pfns { machine.dropGUPReference(pfn, pin: pin) }
            throw error
        }
        return PinnedPages(machine: machine, pfns: pfns, flags: flags)
    }

    /// `follow_page_mask` + `try_grab_folio`: the page at `a` with a reference taken under the
    /// page-table lock, or nil if a fault is needed first.
    /// - Throws: `.remoteIO` for a P2PDMA page without `.pciP2PDMA`.
    private func followPage(_ a: UInt64, _ vma: VMA, flags: GUPFlags) throws(HMMError) -> PFN? {
        let write = flags.contains(.write)
        let pin = flags.contains(.pin)
        guard let pmdN = try? pmdNode(a, allocate: false), pmdN != 0 else { return nil }
        let pSlot = pmdSlot(pmdN, a)
        let pmd = PageTableEntry(rawValue: pSlot.pointee.load(ordering: .acquiring))
        let lock: SpinLockWord
        let slot: UnsafeMutablePointer<Atomic<UInt64>>
        var sub = 0
        if pmd.isTable {
            lock = pool.lock(pmd.node)
            slot = pteSlot(pmd.node, a)
        } else if pmd.isLeaf {
            lock = pool.lock(pmdN)
            slot = pSlot
            sub = PageTableIndex.pte(a)
        } else {
            return nil
        }
        lock.lock()
        defer { lock.unlock() }
        let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        guard e.isLeaf, e.isUser, !write || e.isWritable else { return nil }
        if pmd.isLeaf != e.isHuge { return nil }
        let pfn = e.pfn + sub
        if !flags.contains(.pciP2PDMA), machine.deviceKind(pfn) == .pciP2PDMA {
            throw HMMError(.remoteIO, "GUP: \(hex(a)) is PCI peer-to-peer memory and FOLL_PCI_P2PDMA is not set")
        }
        if pin && !write && mustUnshare(e, pfn, vma, longTerm: flags.contains(.longTerm)) { return nil }
        machine.takeGUPReference(pfn, pin: pin)
        if write && !e.isDirty { slot.pointee.store(e.dirty(true).rawValue, ordering: .relaxed) }
        return pfn
    }
}
