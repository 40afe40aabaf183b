import HMM
import Synchronization

/// What a mirror command reports (`cpages`, `faults` of `struct hmm_dmirror_cmd`).
public struct MirrorResult: Hashable, Sendable {
    /// Pages copied or processed.
    public var cpages = 0
    /// Device page-fault rounds (`hmm_range_fault` calls that had to fault).
    public var faults = 0
    public init(cpages: Int = 0, faults: Int = 0) {
        self.cpages = cpages
        self.faults = faults
    }
}

/// `HMM_DMIRROR_FLAGS` values.
public struct MirrorFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// `HMM_DMIRROR_FLAG_FAIL_ALLOC`, one-shot per open file: the next migrating entry of either
    /// direction finds no destination page. A 2 MiB entry falls back to 512 small pages (the core
    /// splits the source); an order-0 entry to the device is skipped (MIGRATE_TO_DEV then reports
    /// `.noEntry`), one back to system fails (`VM_FAULT_OOM`, `.outOfMemory`).
    public static let failAllocation = MirrorFlags(rawValue: 1 << 0)
}

/// The bytes ``MirrorFile/snapshot(_:pages:into:)-(_,_,UnsafeMutableRawBufferPointer)`` writes, one per page
/// (`HMM_DMIRROR_PROT_*`).
public enum MirrorProtection {
    public static let error: UInt8 = 0xFF
    public static let none: UInt8 = 0x00
    public static let read: UInt8 = 0x01
    public static let write: UInt8 = 0x02
    public static let pmd: UInt8 = 0x04
    public static let pud: UInt8 = 0x08
    public static let zero: UInt8 = 0x10
    public static let devicePrivateLocal: UInt8 = 0x20
    public static let devicePrivateRemote: UInt8 = 0x30
    public static let deviceCoherentLocal: UInt8 = 0x40
    public static let deviceCoherentRemote: UInt8 = 0x50
}

/// One open of a ``MirrorDevice`` (the kernel's `struct dmirror`): a device page table mirroring one
/// address space, kept coherent by an interval notifier over the whole space, and the driver's
/// commands. Every command validates like the kernel's ioctl entry (`addr` page-aligned, a non-empty,
/// non-overflowing range) and reports the kernel's errno as a typed error; `cpages`/`faults` are
/// returned only on success.
///
/// Locking: `table` is the driver lock of the notifier protocol; it is never held while calling the
/// core (faults, migration) — only to program or read the device page table.
public final class MirrorFile: @unchecked Sendable {
    public let device: MirrorDevice
    /// The mirrored space: a simulated `AddressSpace` or a native one — the file is the same code.
    public let space: any MirroredAddressSpace
    /// Set once in `init`; the notifier calls back through a ``WeakForwarder`` so that the file is
    /// released (and closed) when its user drops it, and the space with it.
    private var notifier: IntervalNotifier!

    private struct State {
        /// Device page table: virtual page number → `pfn << 2 | tag`.
        let table = SparsePageIndex()
    }
    private let state = Locked(State())
    /// `dmirror->flags`: read and consumed per migrating entry, so an atomic rather than the table lock.
    private let flagWord = Atomic<UInt64>(0)
    /// This open's identity, written into the driver word of the device pages it migrates.
    let id: UInt64
    private let closed = Atomic<Bool>(false)

    static let tagRead: UInt64 = 0
    static let tagAtomic: UInt64 = 1
    static let tagWrite: UInt64 = 3
    /// Pages per `hmm_range_fault` call of the fault and snapshot paths.
    static let faultChunk = 32
    /// Pages per migration piece (`PTRS_PER_PTE`).
    static let migrateChunk = 512

    /// The device's machine, stored so per-page paths load it once.
    let machine: Machine

    init(device: MirrorDevice, space: any MirroredAddressSpace, id: UInt64) throws(HMMError) {
        self.device = device
        self.id = id
        self.space = space
        machine = device.machine
        let forwarder = WeakForwarder<MirrorFile>()
        forwarder.target = self
        notifier = try space.insertIntervalNotifier(start: 0, length: 0x8000_0000_0000, forwarder)
    }

    // No deinit: releasing the file releases its notifier, whose own deinit unsubscribes it without
    // waiting — a file can be released inside an invalidation callback (the forwarder's temporary
    // reference was the last), where waiting for the invalidation to end would deadlock.

    /// Closes the file (`dmirror_fops_release`): the notifier is removed, the device page table dropped,
    /// and — as the driver does since device THPs — every page of every chunk of the device is evicted
    /// back to system memory (the chunks stay registered for later use). Pages that cannot move (system
    /// memory exhausted, where the kernel's allocation cannot fail, or a pinned page) stay on the device.
    /// Idempotent. Takes no lock of the caller's; must not be called with a space's locks held.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        notifier.remove()
        state.withLock { $0.table.removeAll() }
        device.evictPages()
    }

    // MARK: notifier

    /// `dmirror_interval_invalidate`: drop every device mapping in the range (the end page inclusive, as
    /// the driver does) — except for our own device's migration, whose pages the migration commands
    /// update themselves. The sequence is set either way, so a device fault that walked the range
    /// before the invalidation retries instead of mapping a frame that may be freed and reused
    /// (`lib/test_hmm.c` returns early for its own migration without setting it).
    func invalidate(_ notifier: IntervalNotifier, range: NotifierRange, sequence: UInt64) -> Bool {
        state.withLock { s in
            notifier.setSequence(sequence)
            if range.isMigration(by: device) { return }
            s.table.removeAll(from: range.start >> UInt64(PageSize.shift), through: range.end >> UInt64(PageSize.shift))
        }
        return true
    }

    /// Drops the entry of each `(address, pfn)` that still maps that page (the pages left the device).
    func forget(_ pages: [(UInt64, PFN)]) {
        state.withLock { s in
            for (address, pfn) in pages {
                let k = address >> UInt64(PageSize.shift)
                if let v = s.table[k], v >> 2 == pfn.rawValue { s.table[k] = nil }
            }
        }
    }

    // MARK: entry checks

    /// The check `dmirror_fops_unlocked_ioctl` makes for every command before it looks at the command:
    /// `address` page-aligned and `address + pages` pages a non-empty range that does not wrap. RELEASE
    /// and FLAGS carry an address too, and FLAGS passes its value as `pages` — so `FLAGS(0)` through the
    /// ioctl is EINVAL (use ``setFlags(_:)`` with `[]` to clear the flags).
    /// - Throws: `.invalidArgument`, `.badDescriptor` (closed), `.noDevice` (removed).
    public func checkCommand(_ address: UInt64, pages: Int) throws(HMMError) {
        _ = try check(address, pages)
    }

    private func check(_ address: UInt64, _ pages: Int) throws(HMMError) -> UInt64 {
        guard !closed.load(ordering: .acquiring) else { throw HMMError(.badDescriptor, "the mirror file is closed") }
        guard !device.isRemoved else { throw HMMError(.noDevice, "\(device) was removed") }
        guard address & UInt64(PageSize.base - 1) == 0 else {
            throw HMMError(.invalidArgument, "address \(address) is not page-aligned")
        }
        guard pages > 0, pages <= 1 << 35 else { throw HMMError(.invalidArgument, "\(pages) pages") }
        let (end, overflow) = address.addingReportingOverflow(UInt64(pages) << UInt64(PageSize.shift))
        guard !overflow, end > address else { throw HMMError(.invalidArgument, "range overflows") }
        return end
    }

    private func checkBuffer(_ count: Int, _ needed: Int) throws(HMMError) {
        guard count >= needed else { throw HMMError(.fault, "buffer of \(count) bytes, \(needed) needed") }
    }

    // MARK: READ / WRITE

    /// `HMM_DMIRROR_READ`: the device reads `pages` pages at `address` into `mirror`, faulting through
    /// `AddressSpace.rangeFault(_:)` where it has no mapping yet.
    /// - Throws: `.fault` (no readable mapping, short buffer), `.invalidArgument`, `.busy` (the range kept
    ///   changing for 1000 ms), `.badDescriptor`, `.noDevice`. `mirror` is untouched on error.
    public func read(_ address: UInt64, pages: Int, into mirror: UnsafeMutableRawBufferPointer) throws(HMMError) -> MirrorResult {
        let end = try check(address, pages)
        try checkBuffer(mirror.count, pages << PageSize.shift)
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: pages << PageSize.shift, alignment: 16)
        defer { bounce.deallocate() }
        var r = MirrorResult()
        while true {
            let copied = try copyFromTable(address, pages, from: r.cpages, into: bounce, needWrite: false)
            r.cpages = copied
            if copied == pages { break }
            try fault(address + UInt64(copied) << UInt64(PageSize.shift), end, write: false)
            r.faults += 1
        }
        mirror.baseAddress!.copyMemory(from: bounce.baseAddress!, byteCount: pages << PageSize.shift)
        return r
    }

    /// `HMM_DMIRROR_WRITE`: the device writes `data` to `pages` pages at `address`, write-faulting where
    /// it has no writable mapping. A page of this device mapped read-only (shared after fork, or under
    /// mprotect) is migrated back to system memory first: `AddressSpace.rangeFault(_:)` reports the
    /// device's own pages and never faults them, so retrying the fault alone would never make progress
    /// (`lib/test_hmm.c` loops forever there).
    /// - Throws: `.permission` (read-only mapping), `.fault` (including a write that made no progress in
    ///   64 fault rounds), `.invalidArgument`, `.busy`, `.badDescriptor`, `.noDevice`.
    public func write(_ address: UInt64, pages: Int, from data: UnsafeRawBufferPointer) throws(HMMError) -> MirrorResult {
        let end = try check(address, pages)
        try checkBuffer(data.count, pages << PageSize.shift)
        var r = MirrorResult()
        var stalled = 0
        while true {
            let (done, readOnly) = try state.withLock { (s: inout State) throws(HMMError) -> (Int, Bool) in
                var i = r.cpages
                while i < pages {
                    let k = (address >> UInt64(PageSize.shift)) + UInt64(i)
                    guard let v = s.table[k] else { return (i, false) }
                    guard v & 3 == Self.tagWrite else { return (i, true) }
                    try machine.writeFrame(PFN(v >> 2), from: data.baseAddress! + i << PageSize.shift)
                    i += 1
                }
                return (i, false)
            }
            stalled = done > r.cpages ? 0 : stalled + 1
            r.cpages = done
            if done == pages { break }
            let at = address + UInt64(done) << UInt64(PageSize.shift)
            if readOnly && stalled > 0 {
                // A write fault left the page read-only: it is this device's own page mapped read-only (shared
                // after fork, or after mprotect), which hmm_range_fault reports and never faults. Bring it back
                // to system memory so the next fault breaks copy-on-write (or reports the protection).
                _ = try migrateToSystem(at, pages: 1)
            }
            if stalled > Self.maximumStalledFaults {
                throw HMMError(.fault, "device write to \(at) made no progress in \(stalled) fault rounds")
            }
            try fault(at, end, write: true)
            r.faults += 1
        }
        return r
    }

    /// Fault rounds in a row that may leave a device write without progress before it gives up.
    static let maximumStalledFaults = 64

    /// Copies table-mapped pages `from…` into `out`; returns how many pages in a row were present.
    private func copyFromTable(
        _ address: UInt64, _ pages: Int, from: Int, into out: UnsafeMutableRawBufferPointer, needWrite: Bool
    ) throws(HMMError) -> Int {
        try state.withLock { (s: inout State) throws(HMMError) -> Int in
            var i = from
            while i < pages {
                let k = (address >> UInt64(PageSize.shift)) + UInt64(i)
                guard let v = s.table[k] else { break }
                try machine.readFrame(PFN(v >> 2), into: out.baseAddress! + i << PageSize.shift)
                i += 1
            }
            return i
        }
    }

    /// `dmirror_fault`: mirror `[start, end)` with faults, 32 pages per `hmm_range_fault`.
    private func fault(_ start: UInt64, _ end: UInt64, write: Bool) throws(HMMError) {
        var a = start
        while a < end {
            let next = min(end, a + UInt64(Self.faultChunk) << UInt64(PageSize.shift))
            var range = try HMMRange(notifier: notifier, start: a, end: next,
                                 defaultFlags: HMMPFN.requestFault | (write ? HMMPFN.requestWrite : 0),
                                 devicePrivateOwner: device)
            try rangeFaultLoop(&range) { (s: inout State, range: HMMRange) in
                for (i, w) in range.pfns.enumerated() where w & HMMPFN.valid != 0 {
                    let tag = w & HMMPFN.write != 0 ? Self.tagWrite : Self.tagRead
                    s.table[(range.start >> UInt64(PageSize.shift)) + UInt64(i)] = HMMPFN.pfn(w).rawValue << 2 | tag
                }
            }
            a = next
        }
    }

    /// The driver loop (``IntervalNotifier/mirror(_:timeout:program:)``), programming the device table
    /// under its lock.
    private func rangeFaultLoop(_ range: inout HMMRange, program: (inout State, HMMRange) -> Void) throws(HMMError) {
        try range.notifier.mirror(&range) { r in
            state.withLock { s -> Bool in
                if r.notifier.readRetry(r.notifierSeq) { return false }
                program(&s, r)
                return true
            }
        }
    }

    // MARK: migration

    /// `HMM_DMIRROR_MIGRATE_TO_DEV`: migrates the range's system pages (and holes) to device memory, then
    /// reads the whole range back from the device page table into `mirror`. With a nil `mirror` the
    /// read-back is skipped and `cpages` counts the pages migrated by this call (for benchmarks).
    /// - Throws: `.invalidArgument` (a piece has no readable VMA — earlier pieces stay migrated; the space
    ///   exited), `.noEntry` (a page is not mapped by the device afterwards: not migratable, e.g.
    ///   shared memory, on another device, or device memory ran short), `.outOfMemory` (the device has no
    ///   free page and cannot add a chunk; the piece's pages stay where they were), `.fault`,
    ///   `.badDescriptor`, `.noDevice`.
    public func migrateToDevice(_ address: UInt64, pages: Int, into mirror: UnsafeMutableRawBufferPointer?) throws(HMMError) -> MirrorResult {
        let end = try check(address, pages)
        if let mirror { try checkBuffer(mirror.count, pages << PageSize.shift) }
        var migrated = 0
        guard !space.hasExited else { throw HMMError(.invalidArgument, "the address space has exited") }
        try space.withMmapReadLock { () throws(HMMError) in
            try forEachPiece(address, end) { (a, next) throws(HMMError) in
                let m = try MigrateVMA(space: space, start: a, end: next, select: [.system, .compound], owner: device)
                try m.setup()
                do throws(HMMError) {
                    // Every error after setup finalizes: the sources go back where they were.
                    // Small pages for the small entries only: a compound entry takes a folio, or its own
                    // 512 pages, so a device with exactly enough memory is not short by the pool.
                    var small = 0
                    for i in 0..<m.npages where m.src[i].isMigrating && !m.src[i].isCompound { small += 1 }
                    // Handed out from the end, in descending order: adjacent pages get ascending frames,
                    // adjacent where the free list allows (an engine that maps device memory in place
                    // then maps a run at once).
                    var pool: [PFN] = small > 0 ? try device.allocatePages(small, for: id).sorted(by: >) : []
                    defer { device.giveBack(pool) }
                    for i in 0..<m.npages where m.src[i].isMigrating {
                        if let s = m.src[i].pfn, machine.deviceKind(s) != nil { continue }
                        let write = m.src[i].isWritable ? MigratePFN.write : 0
                        // `dmirror_migrate_alloc_and_copy`: FAIL_ALLOC goes to the first migrating entry.
                        let fail = consumeFailAllocation()
                        if m.src[i].isCompound {
                            try fillCompound(m, i, write, largeFails: fail)
                            continue
                        }
                        if fail { continue }
                        guard let d = pool.popLast() ?? device.allocatePage(for: id) else { continue }
                        m.dst[i] = MigratePFN(d, flags: write)
                        if let s = m.src[i].pfn { try machine.copyPage(from: s, to: d) } else { try machine.zeroPage(d) }
                    }
                    try m.pages()
                } catch {
                    m.finalize()
                    throw error
                }
                state.withLock { s in
                    for i in 0..<m.npages where m.src[i].isMigrating {
                        guard let d = m.dst[i].pfn else { continue }
                        let tag = m.dst[i].isWritable ? Self.tagWrite : Self.tagRead
                        for j in 0..<(m.dst[i].isCompound ? PageSize.pagesPerPMD : 1) {
                            s.table[(a >> UInt64(PageSize.shift)) + UInt64(i + j)] = (d + j).rawValue << 2 | tag
                            migrated += 1
                        }
                    }
                }
                m.finalize()
            }
        }
        guard let mirror else { return MirrorResult(cpages: migrated) }
        let n = try copyFromTable(address, pages, from: 0, into: mirror, needWrite: false)
        guard n == pages else { throw HMMError(.noEntry, "page \(n) of the range is not on the device") }
        return MirrorResult(cpages: n)
    }

    /// A compound source: one 2 MiB device folio, or — when none can be had (or `largeFails`) — 512
    /// small device pages, which makes the core split the source.
    private func fillCompound(_ m: MigrateVMA, _ i: Int, _ write: UInt64, largeFails: Bool) throws(HMMError) {
        let s = m.src[i].pfn
        if !largeFails, let folio = device.allocateFolio(for: id) {
            m.dst[i] = MigratePFN(folio, flags: write | MigratePFN.compound)
            if let s {
                try machine.copyPages(from: s, to: folio, count: PageSize.pagesPerPMD)
            } else {
                for j in 0..<PageSize.pagesPerPMD { try machine.zeroPage(folio + j) }
            }
            return
        }
        // Ascending, as the small pool: adjacent frames where the free list allows.
        let pages = (try? device.allocatePages(PageSize.pagesPerPMD, for: id))?.sorted() ?? []
        guard pages.count == PageSize.pagesPerPMD else {
            device.giveBack(pages)
            return
        }
        for (j, d) in pages.enumerated() {
            m.dst[i + j] = MigratePFN(d, flags: write)
            if let s { try machine.copyPage(from: s + j, to: d) } else { try machine.zeroPage(d) }
        }
    }

    /// `HMM_DMIRROR_MIGRATE_TO_SYS`: migrates this device's pages in the range back to system memory.
    /// `cpages` counts the pages moved (0 if none were on the device).
    /// - Throws: `.invalidArgument` (a piece without a readable VMA), `.outOfMemory`, `.badDescriptor`,
    ///   `.noDevice`.
    public func migrateToSystem(_ address: UInt64, pages: Int) throws(HMMError) -> MirrorResult {
        let end = try check(address, pages)
        guard !space.hasExited else { throw HMMError(.invalidArgument, "the address space has exited") }
        var r = MirrorResult()
        let select: MigrateSelect = [device.kind == .devicePrivate ? .devicePrivate : .deviceCoherent, .compound]
        try space.withMmapReadLock { () throws(HMMError) in
            try forEachPiece(address, end) { (a, next) throws(HMMError) in
                let m = try MigrateVMA(space: space, start: a, end: next, select: select, owner: device)
                try m.setup()
                do throws(HMMError) {
                    try device.copyToSystem(m, for: self)
                    try m.pages()
                } catch {
                    m.finalize()
                    throw error
                }
                // A compound entry counts once, as the driver counts it.
                for i in 0..<m.npages where m.src[i].isMigrating && m.src[i].pfn != nil { r.cpages += 1 }
                m.finalize()
            }
        }
        return r
    }

    /// Splits `[address, end)` at VMA boundaries and every 512 pages; each piece must lie in a readable
    /// VMA. Requires `mmapLock` held.
    private func forEachPiece(_ address: UInt64, _ end: UInt64, _ body: (UInt64, UInt64) throws(HMMError) -> Void) throws(HMMError) {
        var a = address
        while a < end {
            guard let vma = space.mappingHoldingLock(containing: a), vma.protection.contains(.read) else {
                throw HMMError(.invalidArgument, "no readable mapping at \(a)")
            }
            let next = min(end, vma.end, a + UInt64(Self.migrateChunk) << UInt64(PageSize.shift))
            try body(a, next)
            a = next
        }
    }

    // MARK: snapshot

    /// `HMM_DMIRROR_SNAPSHOT`: one ``MirrorProtection`` byte per page, from a non-faulting
    /// `AddressSpace.rangeFault(_:)` with a temporary notifier per 32 pages.
    /// - Throws: `.invalidArgument` (the space exited), `.fault` (short buffer), `.busy`, `.badDescriptor`,
    ///   `.noDevice`.
    public func snapshot(_ address: UInt64, pages: Int, into out: UnsafeMutableRawBufferPointer) throws(HMMError) -> MirrorResult {
        let end = try check(address, pages)
        try checkBuffer(out.count, pages)
        guard !space.hasExited else { throw HMMError(.invalidArgument, "the address space has exited") }
        var r = MirrorResult()
        var a = address
        while a < end {
            let next = min(end, a + UInt64(Self.faultChunk) << UInt64(PageSize.shift))
            let seqOnly = SequenceOnlyNotifier()
            let n = try space.insertIntervalNotifier(start: a, length: next - a, seqOnly)
            defer { n.remove() }
            var range = try HMMRange(notifier: n, start: a, end: next, devicePrivateOwner: device)
            try n.mirror(&range) { r in seqOnly.lock.withLock { _ in !n.readRetry(r.notifierSeq) } }
            for (i, w) in range.pfns.enumerated() {
                out[r.cpages + i] = protectionByte(w)
            }
            r.cpages += range.pfns.count
            a = next
        }
        return r
    }

    /// `dmirror_mkentry`.
    private func protectionByte(_ w: UInt64) -> UInt8 {
        if w & HMMPFN.error != 0 { return MirrorProtection.error }
        if w & HMMPFN.valid == 0 { return MirrorProtection.none }
        let pfn = HMMPFN.pfn(w)
        var b: UInt8 = 0
        if let pm = machine.pagemap(of: pfn) {
            let local = pm.owner === device
            switch pm.kind {
            case .devicePrivate: b = local ? MirrorProtection.devicePrivateLocal : MirrorProtection.devicePrivateRemote
            case .deviceCoherent: b = local ? MirrorProtection.deviceCoherentLocal : MirrorProtection.deviceCoherentRemote
            default: b = 0
            }
        } else if pfn == machine.zeroPFN {
            // `is_zero_pfn`: only the 4 KiB zero page; the huge zero page reads as plain READ | PMD.
            b = MirrorProtection.zero
        }
        b |= w & HMMPFN.write != 0 ? MirrorProtection.write : MirrorProtection.read
        switch HMMPFN.mapOrder(w) {
        case PageSize.pmdOrder: b |= MirrorProtection.pmd
        case 18: b |= MirrorProtection.pud
        default: break
        }
        return b
    }

    // MARK: exclusive

    /// `HMM_DMIRROR_EXCLUSIVE`: makes every page device-exclusive (device atomics), then reads the range
    /// back into `mirror`.
    /// - Throws: `.unsupported` (not private anonymous memory), `.fault`, `.noEntry` (an entry was
    ///   revoked before the read-back), `.invalidArgument`, `.badDescriptor`, `.noDevice`.
    public func makeExclusive(_ address: UInt64, pages: Int, into mirror: UnsafeMutableRawBufferPointer) throws(HMMError) -> MirrorResult {
        let end = try check(address, pages)
        try checkBuffer(mirror.count, pages << PageSize.shift)
        guard !space.hasExited else { throw HMMError(.invalidArgument, "the address space has exited") }
        try space.withMmapReadLock { () throws(HMMError) in
            var a = address
            while a < end {
                try space.makeDeviceExclusive(a, owner: nil) { pfn in
                    state.withLock { s in s.table[a >> UInt64(PageSize.shift)] = pfn.rawValue << 2 | Self.tagAtomic }
                }
                a += UInt64(PageSize.base)
            }
        }
        let n = try copyFromTable(address, pages, from: 0, into: mirror, needWrite: false)
        guard n == pages else { throw HMMError(.noEntry, "page \(n) lost its exclusive entry") }
        return MirrorResult(cpages: n)
    }

    /// `HMM_DMIRROR_CHECK_EXCLUSIVE`: `.permission` if any page is still held exclusively.
    /// - Throws: `.permission`, `.invalidArgument`, `.badDescriptor`, `.noDevice`.
    public func checkExclusive(_ address: UInt64, pages: Int) throws(HMMError) {
        _ = try check(address, pages)
        let held = state.withLock { s -> Bool in
            let first = address >> UInt64(PageSize.shift)
            return s.table.contains(from: first, through: first + UInt64(pages) - 1) { $0 & 3 == Self.tagAtomic }
        }
        if held { throw HMMError(.permission, "a page is still device-exclusive") }
    }

    // MARK: release, flags, mmap

    /// `HMM_DMIRROR_RELEASE`: evicts and destroys all of the device's memory (``MirrorDevice/release()``).
    public func release() throws(HMMError) {
        guard !closed.load(ordering: .acquiring) else { throw HMMError(.badDescriptor, "the mirror file is closed") }
        try device.release()
    }

    /// `HMM_DMIRROR_FLAGS`: replaces this file's flags (`dmirror->flags = npages`), so `[]` cancels a
    /// pending ``MirrorFlags/failAllocation``.
    /// - Throws: `.badDescriptor`.
    public func setFlags(_ flags: MirrorFlags) throws(HMMError) {
        guard !closed.load(ordering: .acquiring) else { throw HMMError(.badDescriptor, "the mirror file is closed") }
        flagWord.store(flags.rawValue, ordering: .releasing)
    }

    /// The flags set by ``setFlags(_:)``, less a fail-allocation already consumed.
    public var flags: MirrorFlags { MirrorFlags(rawValue: flagWord.load(ordering: .acquiring)) }

    /// Clears a pending ``MirrorFlags/failAllocation`` and says whether there was one: the migrating
    /// entry that calls this gets no destination page.
    func consumeFailAllocation() -> Bool {
        var current = flagWord.load(ordering: .relaxed)
        while current & MirrorFlags.failAllocation.rawValue != 0 {
            let (done, seen) = flagWord.compareExchange(
                expected: current, desired: current & ~MirrorFlags.failAllocation.rawValue, ordering: .acquiringAndReleasing)
            if done { return true }
            current = seen
        }
        return false
    }

    /// `mmap` of the device file: every page a fresh zeroed page inserted by the driver.
    /// - Throws: as `MirroredAddressSpace.mapDriverPages(length:protection:shared:)` (`.unsupported` on
    ///   a native space), `.badDescriptor`.
    public func mmap(length: Int, protection: Protection, shared: Bool) throws(HMMError) -> UInt64 {
        guard !closed.load(ordering: .acquiring) else { throw HMMError(.badDescriptor, "the mirror file is closed") }
        return try space.mapDriverPages(length: length, protection: protection, shared: shared)
    }

    /// Pages the device page table maps (for tests and the demo).
    public var mappedPages: Int { state.withLock { $0.table.count } }
}

extension MirrorFile {
    /// ``read(_:pages:into:)`` into an array.
    public func read(_ address: UInt64, pages: Int, into mirror: inout [UInt8]) throws(HMMError) -> MirrorResult {
        try mirror.withUnsafeMutableBytes { b in Result { () throws(HMMError) in try read(address, pages: pages, into: b) } }.get()
    }
    /// ``write(_:pages:from:)`` from an array.
    public func write(_ address: UInt64, pages: Int, from data: [UInt8]) throws(HMMError) -> MirrorResult {
        try data.withUnsafeBytes { b in Result { () throws(HMMError) in try write(address, pages: pages, from: b) } }.get()
    }
    /// ``migrateToDevice(_:pages:into:)`` into an array.
    public func migrateToDevice(_ address: UInt64, pages: Int, into mirror: inout [UInt8]) throws(HMMError) -> MirrorResult {
        try mirror.withUnsafeMutableBytes { b in Result { () throws(HMMError) in try migrateToDevice(address, pages: pages, into: b) } }.get()
    }
    /// ``snapshot(_:pages:into:)`` into an array.
    public func snapshot(_ address: UInt64, pages: Int, into out: inout [UInt8]) throws(HMMError) -> MirrorResult {
        try out.withUnsafeMutableBytes { b in Result { () throws(HMMError) in try snapshot(address, pages: pages, into: b) } }.get()
    }
    /// ``makeExclusive(_:pages:into:)`` into an array.
    public func makeExclusive(_ address: UInt64, pages: Int, into mirror: inout [UInt8]) throws(HMMError) -> MirrorResult {
        try mirror.withUnsafeMutableBytes { b in Result { () throws(HMMError) in try makeExclusive(address, pages: pages, into: b) } }.get()
    }
}
