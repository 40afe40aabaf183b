#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// PCI peer-to-peer memory of one device (`struct pci_p2pdma` with its providers): BAR regions added as
/// `MEMORY_DEVICE_PCI_P2PDMA` pagemaps, a page pool over them, the `p2pmem` attributes (`size`,
/// `available`, `published`), in-kernel allocation, and the `allocate` file that user space maps
/// (``AddressSpace/mapP2PMemory(_:length:protection:flags:offset:)``).
///
/// Page lifecycle (`drivers/pci/p2pdma.c`): a pool page sits at refcount 0; mapping it sets refcount 1 (the
/// page-table entry's reference) and takes a pagemap reference; fork and GUP add references; when the
/// last one drops, the page is *retired* through the machine's ``Epoch`` and goes back to the pool only
/// after every lockless walker that could still see the old entry has left — so GUP-fast can never
/// return a page that was handed to someone else meanwhile, and nobody waits for a grace period.
///
/// ``unbind(timeout:progress:)`` stops new mappings and allocations, revokes every user mapping —
/// simulated spaces' and real processes' (`P2PHostMemory`) — then waits (bounded, with progress
/// reports) for pins and in-kernel allocations to be released.
///
/// Locking: the provider's state lock is a leaf (pool, flags, cache); the host-mapping lock
/// (`P2PHostMappings`) is taken before it; unbind takes each mapper's `mmapLock` with no other lock
/// held, then the host-mapping lock.
public final class P2PProvider: PagemapOperations, @unchecked Sendable, CustomStringConvertible {
    /// The device whose BARs back the memory.
    public let function: PCIFunction
    public let machine: Machine
    let file = DeviceFile()
    private struct State {
        var pool = P2PPool()
        /// False once unbind started (`percpu_ref_kill`): no new mappings or allocations.
        var live = true
        var published = false
        /// True once unbind completed.
        var removed = false
        var kernelPages = 0
        var mapTypes: [Int: (P2PDMAMapType, Int)] = [:]
    }
    private let state = Locked(State())
    /// Serializes unbinds (a second caller waits for the first, then finds the provider removed).
    private let unbindLock = Locked(())
    /// Pages real processes map (the native engine's `p2pmem` mappings).
    let hostMappings = P2PHostMappings()

    init(function: PCIFunction, machine: Machine) {
        self.function = function
        self.machine = machine
        machine.addReferenceHolder(hostMappings)
    }

    public var description: String { "p2pmem of \(function)" }

    // MARK: sysfs `p2pmem/`

    /// Bytes in the pool (`p2pmem/size`).
    public var size: Int { state.withLock { $0.pool.totalPages } << PageSize.shift }
    /// Free bytes in the pool (`p2pmem/available`); retired pages count once their grace period ended.
    public var available: Int { state.withLock { $0.pool.freePages } << PageSize.shift }
    /// Whether other drivers may find this memory (`p2pmem/published`).
    public var isPublished: Bool { state.withLock { $0.published && $0.live } }
    /// Whether ``unbind(timeout:progress:)`` has completed.
    public var isRemoved: Bool { state.withLock { $0.removed } }
    /// The pagemaps backing the pool, one per added BAR region.
    public var pagemaps: [Pagemap] { state.withLock { $0.pool.chunks.map(\.pagemap) } }

    /// `pci_p2pmem_publish`.
    public func publish(_ on: Bool = true) { state.withLock { $0.published = on } }

    /// Whether `pfn` is a free page of this pool.
    public func isFree(_ pfn: PFN) -> Bool { state.withLock { $0.pool.isFree(pfn) } }

    // MARK: adding memory

    /// Adds `size` bytes of BAR `bar` at `offset` as peer-to-peer memory (`pci_p2pdma_add_resource`);
    /// the first call creates the function's provider. `size` 0 means the rest of the BAR.
    /// - Throws: `.invalidArgument` (no such BAR, an I/O BAR, `offset` not below the BAR size,
    ///   `size + offset` past it, a region that is not a positive multiple of 2 MiB — the pagemap's
    ///   granularity — or not page-aligned), `.noDevice` (the provider is being unbound),
    ///   `.outOfMemory` (no PFN space).
    public static func addResource(
        machine: Machine, function: PCIFunction, bar: Int, size: Int = 0, offset: Int = 0
    ) throws(HMMError) -> P2PProvider {
        guard bar >= 0, bar < function.bars.count else { throw .invalid("\(function) has no BAR \(bar)") }
        let b = function.bars[bar]
        guard b.isMemory else { throw .invalid("BAR \(bar) of \(function) is not a memory BAR") }
        guard offset >= 0, offset < b.size else { throw .invalid("offset \(offset) is past BAR \(bar) (\(b.size) bytes)") }
        guard size >= 0 else { throw .invalid("size \(size) is negative") }
        let length = size == 0 ? b.size - offset : size
        guard length <= b.size - offset else {
            throw .invalid("size \(size) + offset \(offset) is past BAR \(bar) (\(b.size) bytes)")
        }
        guard offset % PageSize.base == 0, length > 0, length % PageSize.pmd == 0 else {
            throw .invalid("P2P region \(offset)+\(length) must be page-aligned and a multiple of 2 MiB")
        }
        let provider = function.p2pdma.withLock { p -> P2PProvider in
            if let p { return p }
            let fresh = P2PProvider(function: function, machine: machine)
            p = fresh
            return fresh
        }
        guard provider.machine === machine else { throw .invalid("\(function) already provides memory to another machine") }
        guard provider.state.withLock({ $0.live }) else { throw HMMError(.noDevice, "\(provider) is being unbound") }
        let pm = try machine.registerPagemap(kind: .pciP2PDMA, count: length >> PageSize.shift, owner: provider,
                                             operations: provider)
        provider.state.withLock { $0.pool.add(pm, busAddress: b.busAddress + UInt64(offset)) }
        return provider
    }

    // MARK: routing

    /// `pci_p2pdma_map_type` for this provider and `client`, computed once and cached (`map_types`).
    func cachedMapType(_ topology: PCITopology, client: PCIFunction) -> (type: P2PDMAMapType, distance: Int) {
        if let hit = state.withLock({ $0.mapTypes[client.mapTypeIndex] }) { return hit }
        let r = topology.mapType(provider: function, client: client)
        state.withLock { $0.mapTypes[client.mapTypeIndex] = r }
        return r
    }

    // MARK: in-kernel allocation

    /// `pci_alloc_p2pmem`: `bytes` (rounded up to pages) of contiguous peer memory for a driver.
    /// - Throws: `.invalidArgument` (size 0 or negative), `.outOfMemory` (no contiguous room),
    ///   `.noDevice` (unbinding or removed).
    public func allocate(_ bytes: Int) throws(HMMError) -> P2PAllocation {
        guard bytes > 0, bytes <= 1 << 40 else { throw .invalid("p2pmem allocation of \(bytes) bytes") }
        let pages = (bytes + PageSize.base - 1) >> PageSize.shift
        let first = try takePages(pages, forKernel: true)
        return P2PAllocation(provider: self, first: first, pages: pages, busAddress: busAddress(first))
    }

    /// `pci_free_p2pmem`. Kernel allocations were never mapped, so they go back at once.
    /// - Throws: `.invalidArgument` for an allocation of another provider or one freed already.
    public func free(_ allocation: P2PAllocation) throws(HMMError) {
        guard allocation.provider === self, allocation.markFreed() else {
            throw .invalid("allocation \(allocation.first) is not live in \(self)")
        }
        state.withLock { s in
            s.pool.free(allocation.first, allocation.pages)
            s.kernelPages -= allocation.pages
        }
    }

    /// `pci_p2pmem_virt_to_bus`: the bus address of a pool page.
    func busAddress(_ pfn: PFN) -> UInt64 {
        state.withLock { s in
            guard let c = s.pool.chunkIndex(pfn) else { return 0 }
            let chunk = s.pool.chunks[c]
            return chunk.busAddress + (pfn.rawValue - chunk.pagemap.firstPFN.rawValue) << UInt64(PageSize.shift)
        }
    }

    /// Takes `pages` contiguous pages (`gen_pool_alloc` + `percpu_ref_tryget_live`).
    func takePages(_ pages: Int, forKernel: Bool) throws(HMMError) -> PFN {
        for attempt in 0..<2 {
            let r: Result<PFN?, HMMError> = state.withLock { s in
                guard s.live, !s.removed else { return .failure(HMMError(.noDevice, "\(self) is unbound")) }
                guard let first = s.pool.allocate(pages) else { return .success(nil) }
                if forKernel { s.kernelPages += pages }
                return .success(first)
            }
            if let first = try r.get() { return first }
            // Retired pages may be waiting only for walkers that already left.
            if attempt == 0 { machine.epoch.collect() }
        }
        throw HMMError(.outOfMemory, "\(self) has no \(pages) contiguous free pages")
    }

    /// Gives back pages taken by ``takePages(_:forKernel:)`` that were never handed out.
    func returnPages(_ first: PFN, _ pages: Int) {
        guard pages > 0 else { return }
        state.withLock { $0.pool.free(first, pages) }
    }

    // MARK: PagemapOperations

    /// `p2pdma_folio_free`: the last reference went; retire the page (never straight back to the pool).
    public func folioFree(_ head: PFN, order: Int) {
        for i in 0..<(1 << order) { machine.epoch.retire(.deviceFrame(head + i)) }
    }

    /// P2PDMA memory is CPU-addressable; it never holds device-private entries.
    public func migrateToRAM(_ fault: DeviceFault) throws(HMMError) {
        throw HMMError(.bus, "P2PDMA memory is never device-private")
    }

    /// A retired page's grace period is over: back to the pool.
    func reclaimFrame(_ pfn: PFN) {
        state.withLock { $0.pool.free(pfn, 1) }
    }

    /// The pool's books against the frames (for the invariant checker): every allocated page is mapped
    /// or pinned (refcount above 0), retiring, or held by a driver allocation; every free page is at
    /// refcount 0.
    func accountingProblems() -> [String] {
        state.withLock { s in
            var problems: [String] = []
            var referenced = 0
            var retiring = 0
            for chunk in s.pool.chunks {
                let pm = chunk.pagemap
                retiring += machine.epoch.pendingFrames(in: pm.firstPFN..<pm.endPFN)
                for i in 0..<pm.count {
                    let pfn = pm.firstPFN + i
                    let busy = chunk.used[i >> 6] & (1 << UInt64(i & 63)) != 0
                    let rc = machine.refcount(pfn)
                    if rc > 0 { referenced += 1 }
                    if rc > 0 && !busy { problems.append("\(self): \(pfn) is referenced but free in the pool") }
                }
            }
            let used = s.pool.totalPages - s.pool.freePages
            if used != referenced + retiring + s.kernelPages {
                problems.append("\(self): \(used) pages taken from the pool, \(referenced) referenced + \(retiring) retiring + \(s.kernelPages) in driver allocations")
            }
            return problems
        }
    }

    // MARK: unbind

    /// Removes the provider (device unbind): stops new mappings and allocations, revokes every user
    /// mapping of the `allocate` file (`unmap_mapping_range`; a later touch gets `SIGBUS`) in simulated
    /// spaces and real processes (`P2PHostMemory`: a system call there fails with `EFAULT`), then waits
    /// until every page is back in the pool — mappings' pages after their grace period, pinned pages
    /// after unpin, in-kernel allocations after free — and unregisters the pagemaps.
    ///
    /// The kernel waits forever (`memunmap_pages`); this waits at most `timeout` and calls `progress`
    /// about once a millisecond. On timeout the provider stays dead for new users and a later call
    /// resumes the wait.
    /// - Returns: the final progress report.
    /// - Throws: `.busy` (the timeout passed with pages still referenced), `.noDevice` (already removed).
    /// Takes the provider's unbind lock, then each mapper's `mmapLock` for writing; call it with no
    /// locks held and no pin of its pages held by the calling thread's own work.
    @discardableResult
    public func unbind(
        timeout: Duration = .seconds(10), progress: ((P2PUnbindProgress) -> Void)? = nil
    ) throws(HMMError) -> P2PUnbindProgress {
        try unbindLock.withLock { (_: inout Void) throws(HMMError) -> P2PUnbindProgress in
            try unbindLocked(timeout: timeout, progress: progress)
        }
    }

    private func unbindLocked(
        timeout: Duration, progress: ((P2PUnbindProgress) -> Void)?
    ) throws(HMMError) -> P2PUnbindProgress {
        let start = ContinuousClock.now
        let first = try state.withLock { (s: inout State) throws(HMMError) -> Bool in
            guard !s.removed else { throw HMMError(.noDevice, "\(self) is already removed") }
            defer { s.live = false; s.published = false }
            return s.live
        }
        var revoked = 0
        if first {
            for space in file.spaces {
                let n = space.revokeMappings(of: file)
                revoked += n
                if n > 0 && machine.events.isObserving {
                    machine.events.publish(.revoke(RevokeEvent(reason: .peerUnbind, space: space.id, address: 0, pages: 0,
                                                               mappings: n, timestamp: monotonicNanoseconds())))
                }
            }
            for (space, n) in revokeHostMappings().sorted(by: { $0.key < $1.key }) {
                revoked += n
                if machine.events.isObserving {
                    machine.events.publish(.revoke(RevokeEvent(reason: .peerUnbind, space: space, address: 0, pages: 0,
                                                               mappings: n, timestamp: monotonicNanoseconds())))
                }
            }
            machine.statistics.count(.p2pMappingsRevoked, revoked)
        }
        var report = P2PUnbindProgress(elapsed: .zero, outstandingPages: 0, mappingsRevoked: revoked)
        var nap: UInt32 = 10
        var lastReport = ContinuousClock.now - .seconds(1)
        while true {
            machine.epoch.collect()
            let outstanding = state.withLock { $0.pool.totalPages - $0.pool.freePages }
            let now = ContinuousClock.now
            report.elapsed = now - start
            report.outstandingPages = outstanding
            if outstanding == 0 { break }
            if now - lastReport >= .milliseconds(1) {
                progress?(report)
                lastReport = now
            }
            if report.elapsed >= timeout {
                throw HMMError(.busy, "\(self): \(outstanding) page(s) still referenced after \(report.elapsed); unbind again to keep waiting")
            }
            usleep(nap)
            nap = min(nap * 2, 1000)
        }
        let maps = state.withLock { $0.pool.chunks.map(\.pagemap) }
        for pm in maps { try machine.unregisterPagemap(pm) }
        state.withLock { s in
            s.removed = true
            s.pool.chunks.removeAll()
            s.mapTypes.removeAll()
        }
        function.p2pdma.withLock { if $0 === self { $0 = nil } }
        progress?(report)
        return report
    }
}

/// Where an unbind stands.
public struct P2PUnbindProgress: Sendable, Equatable {
    /// Time since the unbind started.
    public var elapsed: Duration
    /// Pages not yet back in the pool (mapped, pinned, retiring, or allocated by a driver).
    public var outstandingPages: Int
    /// User mappings (VMAs) revoked.
    public var mappingsRevoked: Int
}

/// Peer memory allocated by a driver (`pci_alloc_p2pmem`). Free it with ``P2PProvider/free(_:)``; an
/// unfreed allocation holds up unbind.
public final class P2PAllocation: @unchecked Sendable {
    public let provider: P2PProvider
    /// First page frame.
    public let first: PFN
    public let pages: Int
    /// The PCI bus address a peer uses to reach the memory (`pci_p2pmem_virt_to_bus`).
    public let busAddress: UInt64
    private let freed = Atomic<Bool>(false)

    init(provider: P2PProvider, first: PFN, pages: Int, busAddress: UInt64) {
        self.provider = provider
        self.first = first
        self.pages = pages
        self.busAddress = busAddress
    }

    func markFreed() -> Bool { !freed.exchange(true, ordering: .acquiringAndReleasing) }

    /// The bytes (the kernel's uncached `virt` mapping of the BAR).
    /// - Throws: `.invalidArgument` after the allocation was freed.
    public func withBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) throws -> R {
        guard !freed.load(ordering: .acquiring) else { throw HMMError.invalid("allocation was freed") }
        return try body(UnsafeMutableRawBufferPointer(start: provider.machine.pointer(first), count: pages << PageSize.shift))
    }
}
