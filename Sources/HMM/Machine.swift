import Synchronization

/// The simulated machine: system RAM (a real byte arena with per-frame metadata), the buddy allocator,
/// the hugetlb pool, the shared zero pages, the page-table node pool and every address space and file.
///
/// A `Machine` is thread-safe. Address spaces, files and (later) devices hold a strong reference to it.
public final class Machine: @unchecked Sendable {
    /// How big the machine is.
    public struct Configuration: Sendable {
        /// Bytes of system RAM (a multiple of 2 MiB, at least 8 MiB). Default 512 MiB.
        public var systemMemory: Int
        /// 2 MiB pages set aside for `MAP_HUGETLB` mappings (`nr_hugepages`). Default 0.
        public var hugetlbPages: Int
        /// Page-table nodes (4 KiB each) the machine can hand out. Default 262,144 (1 GiB, reserved lazily).
        public var pageTableNodes: Int
        /// What closing a P2PDMA mapping does with its retired frames. Default `.deferred`;
        /// `.synchronousPerClose` exists to measure what the alternative costs.
        public var retirePolicy: Epoch.RetirePolicy

        public init(systemMemory: Int = 512 << 20, hugetlbPages: Int = 0, pageTableNodes: Int = 1 << 18,
                    retirePolicy: Epoch.RetirePolicy = .deferred) {
            self.systemMemory = systemMemory
            self.hugetlbPages = hugetlbPages
            self.pageTableNodes = pageTableNodes
            self.retirePolicy = retirePolicy
        }
    }

    public let configuration: Configuration
    /// Event counters.
    public let statistics = Statistics()
    /// Events and counters by phase, of both engines (a native space publishes to its machine's hub).
    public let events = EventHub()
    /// Test hook points (fire in debug builds only).
    public let hooks = Hooks()
    /// Deferred reclamation for lockless walkers (GUP-fast): retired page-table nodes and P2PDMA frames.
    public let epoch: Epoch

    let frames: FrameTable
    let ram: Arena
    let ramFrames: Int
    let allocator: FrameAllocator
    let hugetlb: HugetlbPool
    let pageTables: PageTablePool
    let registry = MappingRegistry()
    /// The shared zero page (`ZERO_PAGE(0)`).
    public let zeroPFN: PFN
    /// Head of the huge zero folio (`huge_zero_folio`).
    public let hugeZeroPFN: PFN
    /// References held outside page tables and page caches (GUP gets and pins), in refcount units.
    let externalReferences = Atomic<Int>(0)
    /// Registered pagemaps; also hands out PFN ranges above RAM.
    let pagemapRegistry: Locked<PagemapRegistryState>
    /// Slot → pagemap, read without a lock (a slot is written before any frame names it).
    let pagemapTable: UnsafeMutablePointer<Unmanaged<Pagemap>?>
    /// Slot → `arena base - firstPFN << 12`, so a device frame's bytes are one add away.
    let pagemapBias: UnsafeMutablePointer<Atomic<Int>>
    /// Slot → `PagemapKind` raw value (0 = none): the kind without touching the pagemap object.
    let pagemapKinds: UnsafeMutablePointer<Atomic<Int>>
    private let spaceList = Locked<[WeakBox<AddressSpace>]>([])
    /// Engines' references outside the page tables (``FrameReferenceHolder``).
    let referenceHolders = Locked<[WeakHolder]>([])
    private let fileList = Locked<[WeakBox<MemoryFile>]>([])
    private let nextSpaceID = Atomic<Int>(1)

    /// Boots a machine.
    /// - Throws: `.invalidArgument` for a size that is not a multiple of 2 MiB, below 8 MiB, or too small
    ///   for the hugetlb pool; `.outOfMemory` if the host cannot reserve the arenas.
    public init(_ configuration: Configuration = .init()) throws(HMMError) {
        let c = configuration
        guard c.systemMemory >= 8 << 20, c.systemMemory % PageSize.pmd == 0, c.systemMemory <= 1 << 40 else {
            throw .invalid("system memory must be a multiple of 2 MiB between 8 MiB and 1 TiB, got \(c.systemMemory)")
        }
        guard c.hugetlbPages >= 0, (c.hugetlbPages + 2) * PageSize.pmd <= c.systemMemory else {
            throw .invalid("\(c.hugetlbPages) hugetlb pages do not fit in \(c.systemMemory >> 20) MiB")
        }
        guard c.pageTableNodes >= 16, c.pageTableNodes <= 1 << 24 else {
            throw .invalid("page-table node count \(c.pageTableNodes) out of range 16…16777216")
        }
        self.configuration = c
        ramFrames = c.systemMemory / PageSize.base
        ram = try Arena(byteCount: c.systemMemory, what: "system RAM")
        frames = try FrameTable(capacity: 1 << 24)
        frames.initialize(0..<ramFrames)
        pagemapRegistry = Locked(PagemapRegistryState(nextPFN: ramFrames))
        pagemapTable = .allocate(capacity: 256)
        pagemapTable.initialize(repeating: nil, count: 256)
        pagemapBias = .allocate(capacity: 256)
        for i in 0..<256 { (pagemapBias + i).initialize(to: Atomic(0)) }
        pagemapKinds = .allocate(capacity: 256)
        for i in 0..<256 { (pagemapKinds + i).initialize(to: Atomic(0)) }
        epoch = Epoch(policy: c.retirePolicy)
        pageTables = try PageTablePool(capacity: c.pageTableNodes, epoch: epoch)
        allocator = FrameAllocator(table: frames, first: 0, count: ramFrames)

        // The zero pages are ordinary frames marked reserved; their contents are zero forever.
        guard let zero = allocator.allocate(order: 0), let hugeZero = allocator.allocate(order: PageSize.pmdOrder)
        else { throw HMMError(.outOfMemory, "cannot allocate the zero pages") }
        zeroPFN = zero
        hugeZeroPFN = hugeZero
        var pool: [PFN] = []
        for _ in 0..<c.hugetlbPages {
            guard let p = allocator.allocate(order: PageSize.pmdOrder) else {
                throw HMMError(.outOfMemory, "cannot set aside \(c.hugetlbPages) hugetlb pages")
            }
            pool.append(p)
        }
        hugetlb = HugetlbPool(pages: pool)
        prepareFolio(zero, order: 0, flags: [.zero, .reserved])
        prepareFolio(hugeZero, order: PageSize.pmdOrder, flags: [.zero, .reserved])
        pointer(zero).initializeMemory(as: UInt8.self, repeating: 0, count: PageSize.base)
        pointer(hugeZero).initializeMemory(as: UInt8.self, repeating: 0, count: PageSize.pmd)
        for p in pool { prepareFolio(p, order: PageSize.pmdOrder, flags: .hugetlb, refcount: 0) }
        epoch.reclaimer = self
    }

    deinit {
        pagemapTable.deallocate()
        pagemapBias.deallocate()
        pagemapKinds.deallocate()
    }

    /// A new, empty address space (a process's `mm_struct`).
    /// - Throws: `.outOfMemory` if no page-table node is left for its root.
    public func makeAddressSpace() throws(HMMError) -> AddressSpace {
        let space = try AddressSpace(machine: self, id: nextSpaceID.wrappingAdd(1, ordering: .relaxed).oldValue)
        spaceList.withLock { list in
            list.removeAll { $0.object == nil }
            list.append(WeakBox(space))
        }
        return space
    }

    /// A new in-memory file of `size` bytes, like an `O_TMPFILE` on tmpfs after `ftruncate`.
    /// - Throws: `.invalidArgument` for a negative size.
    public func makeFile(size: Int) throws(HMMError) -> MemoryFile {
        guard size >= 0, size <= 1 << 40 else { throw .invalid("file size \(size) out of range") }
        let file = MemoryFile(machine: self, size: size, shmem: false)
        fileList.withLock { list in
            list.removeAll { $0.object == nil }
            list.append(WeakBox(file))
        }
        return file
    }

    func registerShmem(_ file: MemoryFile) {
        fileList.withLock { list in
            list.removeAll { $0.object == nil }
            list.append(WeakBox(file))
        }
    }

    /// Address spaces that have not exited.
    public var liveSpaces: [AddressSpace] {
        spaceList.withLock { $0.compactMap { $0.object } }.filter { !$0.hasExited }
    }

    var liveFiles: [MemoryFile] { fileList.withLock { $0.compactMap { $0.object } } }

    /// Frames of system RAM.
    public var totalFrames: Int { ramFrames }
    /// Frames free in the buddy allocator (the hugetlb pool is counted separately).
    public var freeFrames: Int { allocator.freeFrames }
    /// Free pages in the hugetlb pool.
    public var freeHugetlbPages: Int { hugetlb.freePages }

    /// The bytes of a frame: RAM, or the arena of the pagemap it belongs to.
    @inline(__always) func pointer(_ pfn: PFN) -> UnsafeMutableRawPointer {
        if _fastPath(pfn.rawValue < UInt64(ramFrames)) {
            return ram.base + Int(truncatingIfNeeded: pfn.rawValue) << PageSize.shift
        }
        return devicePointer(pfn)
    }

    /// Copies a frame's 4 KiB out, for tests and tools (`/dev/mem`, in effect).
    /// - Throws: `.invalidArgument` for a PFN outside RAM.
    public func readFrame(_ pfn: PFN, into buffer: UnsafeMutableRawBufferPointer) throws(HMMError) {
        guard pfn.rawValue < UInt64(ramFrames), buffer.count >= PageSize.base else {
            throw .invalid("\(pfn) is not a RAM frame or the buffer is short")
        }
        buffer.baseAddress!.copyMemory(from: pointer(pfn), byteCount: PageSize.base)
    }
}

extension Machine: EpochReclaimer {
    func reclaim(_ item: RetiredItem) {
        switch item {
        case .pageTableNode(let node):
            pageTables.reclaim(node)
        case .deviceFrame(let pfn):
            (pagemap(of: pfn)?.ops as? P2PProvider)?.reclaimFrame(pfn)
        case .pagemapRange:
            break  // the registry sees it has left the queue (`PagemapRegistryState.reclaimRetired`)
        }
    }
}

/// A weak reference that can sit in an array.
struct WeakBox<T: AnyObject>: @unchecked Sendable {
    weak var object: T?
    init(_ object: T) { self.object = object }
}
