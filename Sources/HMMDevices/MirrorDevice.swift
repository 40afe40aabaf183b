import HMM
import Synchronization

/// The port of the kernel's `dmirror` test driver (`lib/test_hmm.c`): a device that mirrors a process's
/// address space through `HMMRange` faults and interval notifiers, migrates pages to and from its own
/// memory, and takes device-exclusive access. It is both a reference driver written against the public
/// driver API and the oracle of the selftest port.
///
/// One `MirrorDevice` is one `/dev/hmm_dmirrorN`. Its memory comes in chunks, each a `Pagemap` of the
/// device's kind owned by the device (so two devices never match each other's owner). Free device pages
/// sit on a free list at refcount 0.
///
/// Locking: the allocator lock is a leaf (taken by `folioFree`, which may run under page-table locks);
/// each open file's table lock is taken inside notifier callbacks and never held while calling into
/// the core.
public final class MirrorDevice: PagemapOperations, @unchecked Sendable, CustomStringConvertible {
    public let machine: Machine
    /// The device's minor number (0…3 in the kernel module).
    public let minor: Int
    /// `.devicePrivate` or `.deviceCoherent`.
    public let kind: PagemapKind
    /// Pages per chunk (`DEVMEM_CHUNK_SIZE` / page size).
    public let chunkPages: Int

    private struct Allocator {
        var chunks: [Pagemap] = []
        /// Free order-0 pages (`free_pages`) and free 2 MiB folios (`free_folios`).
        var free: [PFN] = []
        var freeFolios: [PFN] = []
        /// Pages handed out and given back (`calloc`, `cfree`).
        var allocated = 0
        var freed = 0
    }
    private let allocator = Locked(Allocator())
    private let openFiles = Locked<[Weak<MirrorFile>]>([])
    private let removed = Atomic<Bool>(false)
    /// The identity the next open file gets; a device page's driver word holds the identity of the file
    /// that migrated it there (`rpage->zone_device_data = dmirror`).
    private let nextFileID = Atomic<UInt64>(1)

    /// Creates the device with its first chunk of `chunkSize` bytes (default 256 MiB, the kernel's
    /// `DEVMEM_CHUNK_SIZE`).
    /// - Throws: `.invalidArgument` (kind other than device-private or device-coherent, chunk size not a
    ///   positive multiple of 2 MiB), `.outOfMemory`.
    public init(machine: Machine, minor: Int, kind: PagemapKind, chunkSize: Int = 256 << 20) throws(HMMError) {
        guard kind == .devicePrivate || kind == .deviceCoherent else {
            throw HMMError(.invalidArgument, "a mirror device is device-private or device-coherent, not \(kind)")
        }
        guard chunkSize > 0, chunkSize % PageSize.pmd == 0 else {
            throw HMMError(.invalidArgument, "chunk size \(chunkSize) is not a positive multiple of 2 MiB")
        }
        self.machine = machine
        self.minor = minor
        self.kind = kind
        chunkPages = chunkSize / PageSize.base
        try allocator.withLock { (a: inout Allocator) throws(HMMError) in try addChunk(&a) }
    }

    public var description: String { "hmm_dmirror\(minor) (\(kind))" }

    /// Whether ``remove()`` ran.
    public var isRemoved: Bool { removed.load(ordering: .acquiring) }

    /// Device pages in use (allocated and not yet freed).
    public var pagesInUse: Int { allocator.withLock { $0.allocated - $0.freed } }

    /// Chunks currently registered.
    public var chunkCount: Int { allocator.withLock { $0.chunks.count } }

    /// Opens the device for `space` (`open("/dev/hmm_dmirrorN")`): a new mirror with its own device page
    /// table and an interval notifier over the whole address space.
    /// The space may be simulated (`AddressSpace`) or native (`NativeSpace`).
    /// - Throws: `.noDevice` after ``remove()``, `.noProcess` if the space has exited.
    public func open(_ space: any MirroredAddressSpace) throws(HMMError) -> MirrorFile {
        guard !isRemoved else { throw HMMError(.noDevice, "\(self) was removed") }
        let file = try MirrorFile(device: self, space: space,
                                  id: nextFileID.wrappingAdd(1, ordering: .relaxed).oldValue)
        openFiles.withLock { list in
            list.removeAll { $0.object == nil }
            list.append(Weak(file))
        }
        return file
    }

    var files: [MirrorFile] { openFiles.withLock { $0.compactMap { $0.object } } }

    /// The open file whose migration put `page` on the device (`BACKING_PAGE(page)->zone_device_data`),
    /// if it is still open.
    func file(owning page: PFN) -> MirrorFile? {
        guard let id = machine.pagemap(of: page)?.driverData(page), id != 0 else { return nil }
        return openFiles.withLock { list in list.first { $0.object?.id == id }?.object }
    }

    // MARK: device memory allocator

    /// `dmirror_allocate_chunk`: a chunk added for a large request goes on the folio list in 2 MiB
    /// blocks; otherwise (and for the first chunk) it is all small pages.
    private func addChunk(_ a: inout Allocator, large: Bool = false) throws(HMMError) {
        // A coherent device has one fixed window of special-purpose memory: it cannot grow.
        if kind == .deviceCoherent && !a.chunks.isEmpty {
            throw HMMError(.outOfMemory, "\(self) has no second coherent chunk")
        }
        let pm = try machine.registerPagemap(kind: kind, count: chunkPages, owner: self, operations: self)
        a.chunks.append(pm)
        if large {
            for i in stride(from: chunkPages - PageSize.pagesPerPMD, through: 0, by: -PageSize.pagesPerPMD) {
                a.freeFolios.append(pm.firstPFN + i)
            }
        } else {
            a.free.reserveCapacity(a.free.count + chunkPages)
            for i in stride(from: chunkPages - 1, through: 0, by: -1) { a.free.append(pm.firstPFN + i) }
        }
    }

    /// A locked 2 MiB device folio with one reference, its pages marked as `owner`'s, or nil.
    func allocateFolio(for owner: UInt64) -> PFN? {
        allocator.withLock { a -> PFN? in
            if a.freeFolios.isEmpty { try? addChunk(&a, large: true) }
            guard let p = a.freeFolios.popLast(), let pm = a.chunks.last(where: { $0.contains(p) }),
                (try? pm.initFolio(p, order: PageSize.pmdOrder)) != nil
            else { return nil }
            for i in 0..<PageSize.pagesPerPMD { pm.setDriverData(p + i, owner) }
            a.allocated += PageSize.pagesPerPMD
            return p
        }
    }

    /// `dmirror_devmem_alloc_page`: a locked device page with one reference, marked as `owner`'s, or nil.
    func allocatePage(for owner: UInt64) -> PFN? {
        (try? allocatePages(1, for: owner))?.first
    }

    /// Up to `n` locked device pages with one reference each, under one lock (fewer if memory runs out),
    /// each page's driver word set to `owner` (the file that migrates into them).
    /// - Throws: `.outOfMemory` when not one page could be had and no chunk could be added (the PFN space
    ///   or the host is exhausted): running out is an error, never an empty migration.
    func allocatePages(_ n: Int, for owner: UInt64) throws(HMMError) -> [PFN] {
        try allocator.withLock { (a: inout Allocator) throws(HMMError) -> [PFN] in
            var out: [PFN] = []
            out.reserveCapacity(n)
            var failure: HMMError?
            while out.count < n {
                if a.free.isEmpty {
                    do throws(HMMError) { try addChunk(&a) } catch { failure = error }
                }
                guard let p = a.free.popLast() else { break }
                guard let pm = a.chunks.last(where: { $0.contains(p) }), (try? pm.initFolio(p, order: 0)) != nil else { continue }
                pm.setDriverData(p, owner)
                a.allocated += 1
                out.append(p)
            }
            if out.isEmpty && n > 0, let failure {
                throw HMMError(.outOfMemory, "\(self) has no free page and cannot grow: \(failure.message)")
            }
            return out
        }
    }

    /// Returns pages from ``allocatePages(_:)`` that were not used (still locked, one reference).
    func giveBack(_ pages: [PFN]) {
        for p in pages {
            guard let pm = machine.pagemap(of: p) else { continue }
            pm.unlockAndPut(p)
        }
    }

    /// `dmirror_devmem_free`: the core dropped the last reference.
    public func folioFree(_ head: PFN, order: Int) {
        allocator.withLock { a in
            a.freed += 1 << order
            // Pages of a chunk being released are not recycled.
            guard a.chunks.contains(where: { $0.contains(head) }) else { return }
            if order == PageSize.pmdOrder {
                a.freeFolios.append(head)
            } else {
                for i in 0..<(1 << order) { a.free.append(head + i) }
            }
        }
    }

    // MARK: CPU faults

    /// `dmirror_devmem_fault`: migrate the faulting page — the whole 2 MiB folio for a PMD fault — back to
    /// system memory, with whatever neighbours the engine's fault-around asks for (`DeviceFault.range`).
    public func migrateToRAM(_ fault: DeviceFault) throws(HMMError) {
        var select: MigrateSelect = kind == .devicePrivate ? .devicePrivate : .deviceCoherent
        if fault.huge { select.insert(.compound) }
        let m = try MigrateVMA(space: fault.space, start: fault.range.lowerBound, end: fault.range.upperBound,
                               select: select, owner: self, faultPage: fault.page)
        do { try m.setup() } catch { throw HMMError(.bus, "migrate_to_ram setup failed: \(error.message)") }
        do throws(HMMError) {
            try copyToSystem(m, for: file(owning: fault.page))
            try m.pages()
        } catch {
            m.finalize()
            throw error
        }
        m.finalize()
    }

    /// Device→RAM allocate-and-copy (`dmirror_devmem_fault_alloc_and_copy`), shared by the fault handler
    /// and `migrateToSystem`: a locked system page per migrating source, the data copied, and the
    /// device's own mappings of the addresses dropped. `file` is the mirror whose flags apply — the
    /// ioctl's file, or for a CPU fault the file that migrated the page: a pending
    /// `HMM_DMIRROR_FLAG_FAIL_ALLOC` is consumed by the first migrating entry, whatever its order; a
    /// compound entry then falls back to small pages, an order-0 one fails as `VM_FAULT_OOM`.
    /// - Throws: `.outOfMemory` (no system page, or the simulated allocation failure).
    func copyToSystem(_ m: MigrateVMA, for file: MirrorFile?) throws(HMMError) {
        var moved: [(UInt64, PFN)] = []
        moved.reserveCapacity(m.npages)
        for i in 0..<m.npages where m.src[i].isMigrating {
            guard let s = m.src[i].pfn else { continue }
            let write = m.src[i].isWritable ? MigratePFN.write : 0
            let fail = file?.consumeFailAllocation() ?? false
            var pages = 1
            if m.src[i].isCompound {
                pages = PageSize.pagesPerPMD
                if !fail, let folio = machine.allocateMigrationFolio(zeroed: false) {
                    m.dst[i] = MigratePFN(folio, flags: write | MigratePFN.compound)
                    try machine.copyPages(from: s, to: folio, count: pages)
                } else {
                    // No 2 MiB system folio: 512 small pages, and the core splits the device folio.
                    for j in 0..<pages {
                        guard let page = machine.allocateMigrationPage(zeroed: false) else {
                            throw HMMError(.outOfMemory, "no system page to migrate \(s + j) back")
                        }
                        m.dst[i + j] = MigratePFN(page, flags: write)
                        try machine.copyPage(from: s + j, to: page)
                    }
                }
            } else {
                if fail { throw HMMError(.outOfMemory, "HMM_DMIRROR_FLAG_FAIL_ALLOC: no system page for \(s)") }
                guard let page = machine.allocateMigrationPage(zeroed: false) else {
                    throw HMMError(.outOfMemory, "no system page to migrate \(s) back")
                }
                m.dst[i] = MigratePFN(page, flags: write)
                try machine.copyPage(from: s, to: page)
            }
            for j in 0..<pages { moved.append((m.start + UInt64(i + j) << UInt64(PageSize.shift), s + j)) }
        }
        for file in files { file.forget(moved) }
    }

    // MARK: release and removal

    /// `HMM_DMIRROR_RELEASE`: evicts every page of every chunk to system memory
    /// (`MigrateDevice`) and unregisters the chunks. Later allocations create fresh chunks.
    /// - Throws: `.outOfMemory` (RAM exhausted: the pages not yet moved stay on the device and so do
    ///   their chunks), `.busy` if a chunk still has pages in use after eviction, `.noDevice`.
    public func release() throws(HMMError) {
        guard !isRemoved else { throw HMMError(.noDevice, "\(self) was removed") }
        try evictAll()
    }

    /// Removes the device (module unload): evicts everything; afterwards every operation on the device
    /// or its files throws `.noDevice`.
    /// - Throws: what ``release()`` throws; the device is not removed then.
    public func remove() throws(HMMError) {
        guard !isRemoved else { return }
        try evictAll()
        removed.store(true, ordering: .releasing)
    }

    /// What closing a file does (`dmirror_fops_release`): every chunk's pages are evicted to system
    /// memory and the chunks kept. A chunk that cannot be emptied keeps what is left.
    func evictPages() {
        let chunks = allocator.withLock { $0.chunks }
        for chunk in chunks { try? evict(chunk) }
    }

    private func evictAll() throws(HMMError) {
        let chunks = allocator.withLock { a -> [Pagemap] in
            let c = a.chunks
            a.chunks = []
            a.free = []
            a.freeFolios = []
            return c
        }
        var firstError: HMMError?
        var kept: [Pagemap] = []
        for chunk in chunks {
            do throws(HMMError) {
                try evict(chunk)
                try machine.unregisterPagemap(chunk)
            } catch {
                firstError = firstError ?? error
                kept.append(chunk)
            }
        }
        if !kept.isEmpty {
            // Give the chunks that could not be emptied back, with their free pages.
            allocator.withLock { a in
                for pm in kept {
                    a.chunks.append(pm)
                    for i in 0..<pm.count where pm.refcount(pm.firstPFN + i) == 0 { a.free.append(pm.firstPFN + i) }
                }
            }
        }
        if let firstError { throw firstError }
    }

    /// `dmirror_device_evict_chunk`.
    private func evict(_ chunk: Pagemap) throws(HMMError) {
        let m = try MigrateDevice(machine: machine, range: chunk.firstPFN, count: chunk.count)
        var failure: HMMError?
        do throws(HMMError) {
            for i in m.src.indices where m.src[i].isMigrating {
                guard let s = m.src[i].pfn else { continue }
                guard let page = machine.allocateMigrationPage(zeroed: false) else {
                    failure = HMMError(.outOfMemory, "no system page to evict \(s) to")
                    break
                }
                m.dst[i] = MigratePFN(page)
                try machine.copyPage(from: s, to: page)
            }
            try m.pages()
        } catch {
            failure = error
        }
        m.finalize()
        if let failure { throw failure }
    }
}

/// A weak reference in an array.
struct Weak<T: AnyObject>: @unchecked Sendable {
    weak var object: T?
    init(_ object: T) { self.object = object }
}

/// The four devices of the kernel module: 0 and 1 device-private, 2 and 3 device-coherent (present only
/// when the module got `spm_addr_dev0/1`; here when `coherent` is true).
public final class MirrorDeviceSet: Sendable {
    public let devices: [MirrorDevice]

    /// - Throws: as ``MirrorDevice/init(machine:minor:kind:chunkSize:)``.
    public init(machine: Machine, chunkSize: Int = 256 << 20, coherent: Bool = true) throws(HMMError) {
        var d: [MirrorDevice] = []
        for minor in 0..<(coherent ? 4 : 2) {
            d.append(try MirrorDevice(machine: machine, minor: minor, kind: minor < 2 ? .devicePrivate : .deviceCoherent,
                                      chunkSize: chunkSize))
        }
        devices = d
    }

    /// Device `minor`, or `.noDevice` if it does not exist (`open` of a missing `/dev` node).
    public func device(_ minor: Int) throws(HMMError) -> MirrorDevice {
        guard devices.indices.contains(minor) else { throw HMMError(.noDevice, "no hmm_dmirror\(minor)") }
        return devices[minor]
    }
}
