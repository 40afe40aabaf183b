import Synchronization

/// A process's address space (`struct mm_struct`): its VMAs, its four-level page table and its locks.
///
/// ## Locking
/// Lock order, outermost first — every path in the library keeps it:
/// 1. `mmapLock` (reader–writer): read for faults, CPU accesses and GUP; write for `map`, `unmap`,
///    `protect`, `remap`, `advise`, `fork` and `exit`.
/// 2. folio lock (`PG_locked`), taken by migration before it walks the reverse map.
/// 3. `rmapLock` (reader–writer; the kernel's anon_vma / i_mmap locks): write while the VMA list
///    changes, read by reverse-map walkers that hold no `mmapLock`.
/// 4. the PMD lock (one per PMD table), then 5. the PTE lock (one per PTE table).
/// Under a page-table lock a folio lock may only be try-locked.
/// GUP-fast (`getUserPages(…, .fast)`) takes none of these: it walks inside an ``Epoch`` critical section,
/// which is why every page-table node that was reachable is retired through the epoch, never freed.
///
/// Every public method takes the locks it needs itself; none may be called with them already held.
public final class AddressSpace: @unchecked Sendable {
    public let machine: Machine
    /// A small number naming the space in messages.
    public let id: Int
    let mmapLock = ReadWriteLock()
    let rmapLock = ReadWriteLock()
    /// Interval notifiers (`mmu_notifier_subscriptions`).
    let notifiers: NotifierSubscriptions
    /// Sorted, non-overlapping. Guarded by `mmapLock` + `rmapLock` (both write to modify).
    var vmas: [VMA] = []
    /// The PGD node; 0 after exit.
    var root: UInt32 = 0
    /// The PGD node as allocated, for the lockless walker (which checks ``hasExited`` inside its epoch
    /// critical section before using it, so the node cannot have been reused).
    let pgdNode: UInt32
    private let exited = Atomic<Bool>(false)

    static let mmapTop: UInt64 = 0x7F00_0000_0000
    static let mmapMin: UInt64 = 0x10000

    init(machine: Machine, id: Int) throws(HMMError) {
        self.machine = machine
        self.id = id
        notifiers = NotifierSubscriptions(machine: machine)
        root = try machine.pageTables.allocate()
        pgdNode = root
    }

    deinit {
        if !hasExited { teardown() }
    }

    /// Whether ``exit()`` has run.
    public var hasExited: Bool { exited.load(ordering: .acquiring) }

    /// ``hasExited`` as a lockless walker must read it: sequentially consistent with the epoch slots.
    var hasExitedForWalker: Bool { exited.load(ordering: .sequentiallyConsistent) }

    var pool: PageTablePool { machine.pageTables }
    var frames: FrameTable { machine.frames }

    @inline(__always) func checkAlive() throws(HMMError) {
        if hasExited { throw HMMError(.noProcess, "address space \(id) has exited") }
    }

    /// The mappings, in address order (`/proc/self/maps`).
    public var mappings: [MappingInfo] {
        mmapLock.withReadLock {
            vmas.map {
                MappingInfo(
                    start: $0.start, end: $0.end, protection: $0.protection, shared: $0.isShared,
                    anonymous: $0.file == nil || $0.file!.isShmem, hugetlb: $0.isHugetlb,
                    hugePageAdvice: $0.flags.contains(.hugePage))
            }
        }
    }

    // MARK: - exit

    /// Tears the address space down (`exit_mmap`): every mapping is removed, every frame it held is
    /// returned, every page-table node freed. Later calls on this space throw `.noProcess`.
    /// Takes `mmapLock` for writing. Calling it twice is harmless.
    public func exit() {
        guard !hasExited else { return }
        teardown()
    }

    private func teardown() {
        mmapLock.writeLock()
        defer { mmapLock.unlock() }
        if exited.exchange(true, ordering: .sequentiallyConsistent) { return }
        invalidating(0, UInt64.max, .release) { rmapLock.withWriteLock {
            for i in vmas.indices.reversed() {
                let v = vmas[i]
                zapVMA(v, v.start, v.end)
                releaseReservations(v, v.start, v.end)
                closeVMA(v)
            }
            vmas.removeAll()
            if root != 0 {
                var unlinked: [UInt32] = []
                unlinkTables(root, level: 0, into: &unlinked)
                pool.retire(unlinked)
                root = 0
            }
        } }
        machine.epoch.collect()
        machine.statistics.count(.exits)
    }

    // MARK: - VMA list

    /// Index of the VMA containing `address`.
    @inline(__always) func vmaIndex(containing address: UInt64) -> Int? {
        var lo = 0
        var hi = vmas.count
        while lo < hi {
            let mid = (lo + hi) >> 1
            if vmas[mid].end <= address { lo = mid + 1 } else { hi = mid }
        }
        return lo < vmas.count && vmas[lo].start <= address ? lo : nil
    }

    /// Index of the first VMA that ends after `address`.
    func firstVMA(endingAfter address: UInt64) -> Int {
        var lo = 0
        var hi = vmas.count
        while lo < hi {
            let mid = (lo + hi) >> 1
            if vmas[mid].end <= address { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// Splits the VMA containing `address` so that a VMA boundary falls there (`split_vma`).
    /// A huge PMD the new boundary cuts is split into PTEs first (`vma_adjust_trans_huge`): a huge entry
    /// never spans two VMAs, or fork, mprotect and zap — which all work per VMA — would each handle it
    /// whole. Requires `mmapLock` and `rmapLock` held for writing.
    func splitVMA(at address: UInt64) {
        guard let i = vmaIndex(containing: address), vmas[i].start < address else { return }
        let v = vmas[i]
        if address & PageSize.pmdMask != 0, !v.isHugetlb { splitHugePMD(at: address) }
        vmas[i] = v.slice(v.start, address)
        vmas.insert(v.slice(address, v.end), at: i + 1)
    }

    /// `split_huge_pmd_address`: splits the huge PMD (THP, huge zero page, device-private or migration
    /// entry) that maps `address`, if there is one. Requires `mmapLock` held for writing.
    func splitHugePMD(at address: UInt64) {
        guard root != 0, let pmdN = try? pmdNode(address, allocate: false), pmdN != 0 else { return }
        let e = PageTableEntry(rawValue: pmdSlot(pmdN, address).pointee.load(ordering: .acquiring))
        if e.isHuge && (e.isLeaf || e.isNonPresent) { splitHugePMD(pmdN, address) }
    }

    /// Merges neighbours around `[lo, hi)` that differ in nothing but their extent (`vma_merge`):
    /// same protection, flags, file (or reservation, device file) with contiguous `pgoff`, and compatible
    /// anon_vmas — the same one, or one side without any (no page ever attached, as before the kernel's
    /// first anonymous fault), provided the side that has one did not inherit it through fork
    /// (`is_mergeable_anon_vma`). The merged VMA keeps the anon_vma that has pages.
    /// Requires `mmapLock` and `rmapLock` held for writing.
    func mergeVMAs(around lo: UInt64, _ hi: UInt64) {
        var i = max(0, firstVMA(endingAfter: lo) - 1)
        while i + 1 < vmas.count && vmas[i].start <= hi {
            let a = vmas[i]
            let b = vmas[i + 1]
            if a.end == b.start, a.protection == b.protection,
                a.flags.subtracting(.softDirty) == b.flags.subtracting(.softDirty), a.file === b.file,
                a.reservation === b.reservation, a.deviceFile === b.deviceFile,
                a.pgoff + a.length >> UInt64(PageSize.shift) == b.pgoff,
                let keep = mergedAnonVMA(a, b)
            {
                vmas[i].end = b.end
                vmas[i].flags.formUnion(b.flags.intersection(.softDirty))
                vmas[i].anonVMA = keep.anonVMA
                vmas[i].hadUncowedParents = keep.hadUncowedParents
                vmas.remove(at: i + 1)
            } else {
                i += 1
            }
        }
    }

    /// `is_mergeable_anon_vma`: which of `a` and `b` lends the merged VMA its anon_vma, or nil if they
    /// cannot merge.
    private func mergedAnonVMA(_ a: VMA, _ b: VMA) -> VMA? {
        if a.anonVMA === b.anonVMA { return a.hadUncowedParents ? a : b }
        guard let x = a.anonVMA, let y = b.anonVMA else { return nil }
        switch (x.isAttached, y.isAttached) {
        case (false, false): return a
        case (true, false): return a.hadUncowedParents ? nil : a
        case (false, true): return b.hadUncowedParents ? nil : b
        case (true, true): return nil
        }
    }

    func insertVMA(_ v: VMA) {
        let i = firstVMA(endingAfter: v.start)
        precondition(i == vmas.count || vmas[i].start >= v.end, "inserting overlapping VMA")
        vmas.insert(v, at: i)
        v.anonVMA?.addMember(self)
        v.file?.addMapper(self)
        v.deviceFile?.addMapper(self)
    }

    /// Lowest-fit search from the top of the mmap area down (`get_unmapped_area`, top-down layout).
    func findFreeRange(length: UInt64, alignment: UInt64) -> UInt64? {
        var hi = Self.mmapTop
        func fit(_ lo: UInt64, _ hi: UInt64) -> UInt64? {
            guard hi >= length else { return nil }
            let a = (hi - length) & ~(alignment - 1)
            return a >= lo ? a : nil
        }
        for v in vmas.reversed() {
            if v.start >= hi { continue }
            if v.end < hi, let a = fit(v.end, hi) { return a }
            hi = min(hi, v.start)
        }
        return fit(Self.mmapMin, hi)
    }

    // MARK: - page-table walking

    /// The node holding the PMD entries that cover `address`, allocating upper levels if asked.
    /// Safe under `mmapLock` held for reading: upper-level entries are installed with a CAS and only
    /// freed under the write lock. Returns 0 when absent and `allocate` is false.
    @inline(__always) func pmdNode(_ address: UInt64, allocate: Bool) throws(HMMError) -> UInt32 {
        let pud = try nextLevel(root, PageTableIndex.pgd(address), allocate: allocate)
        guard pud != 0 else { return 0 }
        return try nextLevel(pud, PageTableIndex.pud(address), allocate: allocate)
    }

    /// The node an upper-level entry points at, installed with a CAS when absent and `allocate`.
    @inline(__always) private func nextLevel(_ node: UInt32, _ index: Int, allocate: Bool) throws(HMMError) -> UInt32 {
        let slot = pool.entries(node) + index
        let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .acquiring))
        if !e.isNone { return e.node }
        guard allocate else { return 0 }
        let n = try pool.allocate()
        let desired = PageTableEntry.table(n)
        let (ok, current) = slot.pointee.compareExchange(
            expected: 0, desired: desired.rawValue, ordering: .acquiringAndReleasing)
        if ok { return n }
        pool.free(n)
        return PageTableEntry(rawValue: current).node
    }

    /// Runs `body(slot, entry)` for every entry of PTE table `pteN` in `[lo, hi)` with its lock held.
    func forEachPTE(
        _ pteN: UInt32, _ lo: UInt64, _ hi: UInt64,
        _ body: (UnsafeMutablePointer<Atomic<UInt64>>, PageTableEntry) -> Void
    ) {
        let lock = pool.lock(pteN)
        let ptes = pool.entries(pteN)
        lock.lock()
        defer { lock.unlock() }
        var a = lo
        while a < hi {
            let slot = ptes + PageTableIndex.pte(a)
            body(slot, PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed)))
            a += UInt64(PageSize.base)
        }
    }

    @inline(__always) func pmdSlot(_ pmdNode: UInt32, _ address: UInt64) -> UnsafeMutablePointer<Atomic<UInt64>> {
        pool.entries(pmdNode) + PageTableIndex.pmd(address)
    }

    @inline(__always) func pteSlot(_ pteNode: UInt32, _ address: UInt64) -> UnsafeMutablePointer<Atomic<UInt64>> {
        pool.entries(pteNode) + PageTableIndex.pte(address)
    }

    /// Makes sure the PMD entry for `address` points at a PTE table and returns it; nil if the PMD is a
    /// huge leaf or a huge non-present entry (the caller handles those). Takes the PMD lock to install.
    func pteNode(_ pmdNode: UInt32, _ address: UInt64, allocate: Bool) throws(HMMError) -> UInt32? {
        let slot = pmdSlot(pmdNode, address)
        let e = PageTableEntry(rawValue: slot.pointee.load(ordering: .acquiring))
        if e.isTable { return e.node }
        guard e.isNone else { return nil }
        guard allocate else { return 0 }
        let n = try pool.allocate()
        let lock = pool.lock(pmdNode)
        lock.lock()
        let cur = PageTableEntry(rawValue: slot.pointee.load(ordering: .relaxed))
        if cur.isNone {
            slot.pointee.store(PageTableEntry.table(n).rawValue, ordering: .releasing)
            lock.unlock()
            return n
        }
        lock.unlock()
        pool.free(n)
        return cur.isTable ? cur.node : nil
    }

    /// Visits `[lo, hi)` one PMD-sized step at a time (`walk_page_range` at PMD granularity), skipping
    /// whole gigabytes where no PMD table exists. `body(address, stepEnd, pmdNode)` returns true to move
    /// on, false to visit the same address again (after it split a huge entry).
    /// Requires `mmapLock` held.
    func forEachPMDStep<E: Error>(
        _ lo: UInt64, _ hi: UInt64, _ body: (UInt64, UInt64, UInt32) throws(E) -> Bool
    ) throws(E) {
        var a = lo
        while a < hi {
            let pmdN = (try? pmdNode(a, allocate: false)) ?? 0
            if pmdN == 0 {
                a = min(hi, (a | ((1 << 30) - 1)) + 1)
                continue
            }
            let stepEnd = min(hi, (a | PageSize.pmdMask) + 1)
            if try body(a, stepEnd, pmdN) { a = stepEnd }
        }
    }

    /// Unlinks every table below `node` (whose leaf entries must all be none by now) and collects them
    /// and `node` itself in `unlinked`, for the caller to retire.
    func unlinkTables(_ node: UInt32, level: Int, into unlinked: inout [UInt32]) {
        let e = pool.entries(node)
        if level < 3 {
            for i in 0..<512 {
                let entry = PageTableEntry(rawValue: e[i].load(ordering: .relaxed))
                if entry.isTable {
                    e[i].store(0, ordering: .releasing)
                    unlinkTables(entry.node, level: level + 1, into: &unlinked)
                }
            }
        }
        unlinked.append(node)
    }

    /// Unlinks and retires PTE tables (and PMD/PUD tables) left entirely empty in `[lo, hi)`
    /// (`free_pgtables`). Requires `mmapLock` held for writing.
    func freeEmptyTables(_ lo: UInt64, _ hi: UInt64) {
        guard root != 0 else { return }
        var unlinked: [UInt32] = []
        var a = lo & ~UInt64((1 << 39) - 1)
        while a < hi {
            let pgdSlot = pool.entries(root) + PageTableIndex.pgd(a)
            let pgdE = PageTableEntry(rawValue: pgdSlot.pointee.load(ordering: .relaxed))
            if pgdE.isTable, pruneEmpty(pgdE.node, level: 1, base: a, lo: lo, hi: hi, into: &unlinked) {
                pgdSlot.pointee.store(0, ordering: .releasing)
                unlinked.append(pgdE.node)
            }
            a += 1 << 39
        }
        pool.retire(unlinked)
    }

    /// Recursively unlinks empty child tables of `node` inside `[lo, hi)` into `unlinked`; true if `node`
    /// is now empty.
    private func pruneEmpty(
        _ node: UInt32, level: Int, base: UInt64, lo: UInt64, hi: UInt64, into unlinked: inout [UInt32]
    ) -> Bool {
        let shift = UInt64(39 - 9 * level)
        let e = pool.entries(node)
        var empty = true
        for i in 0..<512 {
            let start = base + UInt64(i) << shift
            let end = start + (1 << shift)
            let entry = PageTableEntry(rawValue: e[i].load(ordering: .relaxed))
            if entry.isNone { continue }
            if entry.isTable, end > lo, start < hi, level < 3 {
                if pruneEmpty(entry.node, level: level + 1, base: start, lo: lo, hi: hi, into: &unlinked) {
                    e[i].store(0, ordering: .releasing)
                    unlinked.append(entry.node)
                    continue
                }
            }
            empty = false
        }
        return empty
    }
}
