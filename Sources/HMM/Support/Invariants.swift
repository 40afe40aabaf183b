/// What ``Machine/checkInvariants()`` found wrong.
public struct InvariantViolation: Error, CustomStringConvertible {
    public let problems: [String]
    public var description: String {
        "\(problems.count) invariant violation(s):\n" + problems.prefix(20).joined(separator: "\n")
    }
}

extension Machine {
    /// Walks every frame, page table and page cache and checks that they agree (every test ends with it;
    /// <doc:TestingWithRaces>):
    /// - each frame is exactly one of free (in a buddy block or the hugetlb pool), reserved, or in use
    ///   with a positive refcount — no frame both free and mapped, none leaked;
    /// - every page's mapcount equals the entries that map it, every folio's refcount equals its
    ///   mappings plus page-cache references, and the surplus over all folios equals the GUP references
    ///   outstanding;
    /// - writable entries of anonymous pages are anon-exclusive and allowed by their VMA, accessible ones
    ///   only in VMAs that allow access; the zero pages are never writable; no migration entry is left
    ///   behind; hugetlb VMAs cover whole 2 MiB pages;
    /// - no folio lock or page-table lock is held; page-table nodes and deposits are all accounted for.
    ///
    /// Call it when no other thread is changing the machine (takes each space's `mmapLock` for reading).
    /// - Throws: ``InvariantViolation`` listing every problem found.
    public func checkInvariants() throws(InvariantViolation) {
        var problems: [String] = []
        func problem(_ s: String) { if problems.count < 200 { problems.append(s) } }
        let n = ramFrames
        let (pagemaps, total) = pagemapRegistry.withLock { r in (r.slots.compactMap { $0 }, r.nextPFN) }
        var expectedRef = [Int32](repeating: 0, count: total)
        var expectedMap = [Int32](repeating: 0, count: total)
        var expectedEntire = [Int32](repeating: 0, count: total)
        var nodes = 0
        var hugeDeposits = 0

        for space in liveSpaces {
            space.mmapLock.readLock()
            defer { space.mmapLock.unlock() }
            guard space.root != 0 else { continue }
            for v in space.vmas where v.isHugetlb && (v.start | v.end) & PageSize.pmdMask != 0 {
                problem("space \(space.id): hugetlb VMA \(hex(v.start))-\(hex(v.end)) is not 2 MiB aligned")
            }
            func visit(_ node: UInt32, _ level: Int, _ base: UInt64) {
                nodes += 1
                if pageTables.lock(node).isLocked { problem("page-table lock of node \(node) held at rest") }
                let e = pageTables.entries(node)
                let shift = UInt64(39 - 9 * level)
                for i in 0..<512 {
                    let entry = PageTableEntry(rawValue: e[i].load(ordering: .acquiring))
                    if entry.isNone { continue }
                    let a = base + UInt64(i) << shift
                    if entry.isTable {
                        if level == 3 { problem("table entry at PTE level, \(hex(a))") } else { visit(entry.node, level + 1, a) }
                        continue
                    }
                    guard level >= 2 else {
                        problem("leaf at level \(level), \(hex(a))")
                        continue
                    }
                    leaf(space, entry, a, huge: level == 2)
                }
            }
            func leaf(_ space: AddressSpace, _ e: PageTableEntry, _ a: UInt64, huge: Bool) {
                let where_ = "space \(space.id) \(hex(a))"
                guard let vi = space.vmaIndex(containing: a) else { return problem("\(where_): entry \(e) outside any VMA") }
                let vma = space.vmas[vi]
                guard e.isPresent else { return nonPresent(e, vma, where_, huge: huge) }
                if e.isWritable && !vma.writable { problem("\(where_): writable entry in a \(vma.protection) VMA") }
                if e.isUser != vma.accessible { problem("\(where_): user bit disagrees with \(vma.protection)") }
                if huge && !vma.isHugetlb { hugeDeposits += 1 }
                if e.isSpecial {
                    if e.pfn != (huge ? hugeZeroPFN : zeroPFN) { problem("\(where_): special entry \(e) is not a zero page") }
                    if e.isWritable { problem("\(where_): writable zero page") }
                    return
                }
                guard e.pfn.rawValue < UInt64(total) else { return problem("\(where_): \(e.pfn) is no frame") }
                if e.pfn.rawValue >= UInt64(n) {
                    guard let kind = deviceKind(e.pfn) else { return problem("\(where_): \(e.pfn) in no pagemap") }
                    if kind == .devicePrivate { return problem("\(where_): present entry maps device-private \(e.pfn)") }
                }
                let head = frames.head(of: e.pfn)
                let f = frames.flags(e.pfn)
                if f.contains(.buddy) { problem("\(where_): maps free frame \(e.pfn)") }
                expectedRef[Int(head.rawValue)] += 1
                if huge {
                    guard head == e.pfn, frames.order(head) == PageSize.pmdOrder else {
                        return problem("\(where_): huge entry on \(e.pfn), not a PMD-order head")
                    }
                    expectedEntire[Int(head.rawValue)] += 1
                } else {
                    expectedMap[Int(e.pfn.rawValue)] += 1
                }
                if e.isWritable && f.contains(.anon) {
                    let hf = frames.flags(head)
                    let exclusive = hf.contains(.hugetlb) ? hf.contains(.anonExclusive) : f.contains(.anonExclusive)
                    if !exclusive { problem("\(where_): writable anonymous page \(e.pfn) is not anon-exclusive") }
                }
            }
            /// Device-private and device-exclusive entries are mappings (rmap and a reference each);
            /// migration entries must not outlive a migration.
            func nonPresent(_ e: PageTableEntry, _ vma: VMA, _ where_: String, huge: Bool) {
                switch e.kind {
                case .devicePrivateRead, .devicePrivateWrite:
                    guard e.pfn.rawValue < UInt64(total), deviceKind(e.pfn) == .devicePrivate else {
                        return problem("\(where_): device-private entry names \(e.pfn), not device-private memory")
                    }
                    if e.kind == .devicePrivateWrite && !vma.writable { problem("\(where_): writable device entry in a \(vma.protection) VMA") }
                    if e.kind == .devicePrivateWrite && !frames.flags(e.pfn).contains(.anonExclusive) {
                        problem("\(where_): writable device-private \(e.pfn) is not anon-exclusive")
                    }
                case .deviceExclusive:
                    // Any anonymous page the CPU can address: RAM or device-coherent memory (the kernel's
                    // `make_device_exclusive` refuses only non-anonymous and hugetlb folios).
                    let addressable = e.pfn.rawValue < UInt64(n)
                        || e.pfn.rawValue < UInt64(total) && deviceKind(e.pfn) == .deviceCoherent
                    guard addressable, frames.flags(e.pfn).contains(.anon) else {
                        return problem("\(where_): device-exclusive entry names \(e.pfn), not anonymous CPU-addressable memory")
                    }
                case .hwpoison:
                    return
                default:
                    return problem("\(where_): \(e) left behind at rest")
                }
                if vma.isShared { problem("\(where_): device entry \(e) in a shared mapping") }
                expectedRef[Int(frames.head(of: e.pfn).rawValue)] += 1
                if huge {
                    guard e.isDevicePrivate, frames.head(of: e.pfn) == e.pfn, frames.order(e.pfn) == PageSize.pmdOrder else {
                        return problem("\(where_): huge \(e) is not a device-private PMD-order head")
                    }
                    expectedEntire[Int(e.pfn.rawValue)] += 1
                    hugeDeposits += 1
                } else {
                    expectedMap[Int(e.pfn.rawValue)] += 1
                }
            }
            visit(space.root, 0, 0)
        }
        for holder in liveReferenceHolders {
            holder.forEachHeldReference { pfn in
                guard pfn.rawValue < UInt64(total) else { return problem("an engine holds \(pfn), which is no frame") }
                expectedRef[Int(frames.head(of: pfn).rawValue)] += 1
            }
        }
        for file in liveFiles {
            for pfn in file.cachedPFNs {
                expectedRef[Int(pfn.rawValue)] += 1
                if !frames.flags(pfn).contains(.pageCache) { problem("\(pfn) cached but not marked page cache") }
            }
        }

        // Free memory: buddy blocks and the hugetlb pool.
        var free = [Bool](repeating: false, count: n)
        var freeCount = 0
        allocator.forEachFreeBlock { pfn, order in
            for i in 0..<(1 << order) {
                if free[Int(pfn) + i] { problem("\(PFN(pfn + UInt64(i))) in two free blocks") }
                free[Int(pfn) + i] = true
            }
            freeCount += 1 << order
        }
        if freeCount != allocator.freeFrames { problem("free lists hold \(freeCount) frames, counter says \(allocator.freeFrames)") }
        var poolFree = Set<UInt64>()
        for i in 0..<n where frames.flags(PFN(UInt64(i))).contains(.hugetlb) && frames.flags(PFN(UInt64(i))).contains(.head) {
            if hugetlb.contains(free: PFN(UInt64(i))) { poolFree.insert(UInt64(i)) }
        }

        var surplus = 0
        var i = 0
        while i < n {
            let pfn = PFN(UInt64(i))
            if free[i] {
                if expectedRef[i] != 0 || expectedMap[i] != 0 { problem("free frame \(pfn) is mapped or cached") }
                i += 1
                continue
            }
            let f = frames.flags(pfn)
            let r = frames.record(pfn)
            if f.contains(.locked) { problem("folio \(pfn) locked at rest") }
            let order = f.contains(.head) ? frames.order(pfn) : 0
            if f.contains(.tail) {
                problem("\(pfn) is a tail outside any folio")
                i += 1
                continue
            }
            if poolFree.contains(pfn.rawValue) {
                if r.pointee.refcount.load(ordering: .relaxed) != 0 { problem("free hugetlb page \(pfn) has references") }
                for k in 0..<(1 << order) where expectedRef[i + k] != 0 || expectedMap[i + k] != 0 {
                    problem("free hugetlb page \(pfn + k) is mapped")
                }
                i += 1 << order
                continue
            }
            let rc = Int(r.pointee.refcount.load(ordering: .relaxed))
            if f.contains(.reserved) {
                i += 1 << order
                continue
            }
            if rc <= 0 { problem("\(pfn) is neither free nor referenced (leaked)") }
            let diff = rc - Int(expectedRef[i])
            if diff < 0 { problem("\(pfn): refcount \(rc) below its \(expectedRef[i]) mappings and cache references") }
            surplus += diff
            for k in 0..<(1 << order) {
                let mc = frames.record(pfn + k).pointee.mapcount.load(ordering: .relaxed)
                if mc != expectedMap[i + k] { problem("\(pfn + k): mapcount \(mc), mapped by \(expectedMap[i + k]) entries") }
                if k > 0 && !frames.flags(pfn + k).contains(.tail) { problem("\(pfn + k) should be a tail of \(pfn)") }
            }
            if order > 0 && entireMapcount(pfn) != expectedEntire[i] {
                problem("\(pfn): entire mapcount \(entireMapcount(pfn)), mapped by \(expectedEntire[i]) PMDs")
            }
            i += 1 << order
        }
        // Device frames: free at refcount 0 (and then unmapped), otherwise accounted like RAM.
        var inUse = [Int](repeating: 0, count: 256)
        for pm in pagemaps {
            var j = Int(pm.firstPFN.rawValue)
            let last = Int(pm.endPFN.rawValue)
            while j < last {
                let pfn = PFN(UInt64(j))
                let f = frames.flags(pfn)
                let rc = Int(frames.record(pfn).pointee.refcount.load(ordering: .relaxed))
                if f.contains(.locked) { problem("device folio \(pfn) locked at rest") }
                if f.contains(.tail) {
                    problem("device \(pfn) is a tail outside any folio")
                    j += 1
                    continue
                }
                let order = f.contains(.head) ? frames.order(pfn) : 0
                if rc == 0 {
                    if expectedRef[j] != 0 || expectedMap[j] != 0 { problem("free device frame \(pfn) is mapped") }
                    j += 1
                    continue
                }
                inUse[pm.slot] += 1 << order
                let diff = rc - Int(expectedRef[j])
                if diff < 0 && pm.kind != .generic { problem("\(pfn): refcount \(rc) below its \(expectedRef[j]) mappings") }
                if pm.kind != .generic { surplus += diff }
                for k in 0..<(1 << order) {
                    let mc = frames.record(pfn + k).pointee.mapcount.load(ordering: .relaxed)
                    if mc != expectedMap[j + k] { problem("\(pfn + k): mapcount \(mc), mapped by \(expectedMap[j + k]) entries") }
                }
                if order > 0 && entireMapcount(pfn) != expectedEntire[j] {
                    problem("\(pfn): entire mapcount \(entireMapcount(pfn)), mapped by \(expectedEntire[j]) PMDs")
                }
                j += 1 << order
            }
            if pm.kind != .generic && inUse[pm.slot] != pm.framesInUse {
                problem("\(pm): \(inUse[pm.slot]) frames referenced, pagemap counts \(pm.framesInUse)")
            }
        }
        // P2PDMA pools: the pool's books agree with the frames and the epoch's queue.
        var providers: [ObjectIdentifier: P2PProvider] = [:]
        for pm in pagemaps where pm.kind == .pciP2PDMA {
            if let p = pm.ops as? P2PProvider { providers[ObjectIdentifier(p)] = p }
        }
        for p in providers.values { for message in p.accountingProblems() { problem(message) } }
        let external = externalReferences.load(ordering: .relaxed)
        if surplus != external { problem("references beyond mappings total \(surplus), GUP holds \(external)") }
        if nodes != pageTables.nodesInUse { problem("\(nodes) page-table nodes reachable, \(pageTables.nodesInUse) in use") }
        if hugeDeposits != pageTables.depositedNodes {
            problem("\(hugeDeposits) huge PMD mappings, \(pageTables.depositedNodes) page tables deposited")
        }
        if !problems.isEmpty { throw InvariantViolation(problems: problems) }
    }
}
