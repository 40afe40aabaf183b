import Synchronization

/// The kind of a device-memory region (`enum memory_type`, `include/linux/memremap.h`).
public enum PagemapKind: Int, Sendable, CustomStringConvertible {
    /// `MEMORY_DEVICE_PRIVATE`: the CPU cannot address it. Mapped only by non-present device-private
    /// entries; a CPU touch faults and the driver's ``PagemapOperations/migrateToRAM(_:)`` moves the page
    /// back.
    case devicePrivate = 1
    /// `MEMORY_DEVICE_COHERENT`: CPU-addressable (CXL-like); mapped by ordinary present entries but never
    /// long-term pinned (a long-term pin moves the page to RAM first).
    case deviceCoherent = 2
    /// `MEMORY_DEVICE_GENERIC`: device-dax memory; at refcount 0 the count is simply reset to 1.
    case generic = 4
    /// `MEMORY_DEVICE_PCI_P2PDMA`: a PCI BAR mapped for peer-to-peer DMA.
    case pciP2PDMA = 5
    /// Not a kernel memory type: PFNs that name host pages where they are — a native region's own
    /// memory — so that a mirror reads and writes CPU-resident pages through the same
    /// ``Machine/framePointer(_:)`` as any frame. Its frames are never allocated or referenced; a driver
    /// sees them as system RAM.
    case hostWindow = 64

    public var description: String {
        switch self {
        case .devicePrivate: return "device-private"
        case .deviceCoherent: return "device-coherent"
        case .generic: return "generic"
        case .pciP2PDMA: return "p2pdma"
        case .hostWindow: return "host window"
        }
    }
}

/// A CPU fault on a device-private entry, handed to ``PagemapOperations/migrateToRAM(_:)`` (the kernel's
/// `struct vm_fault` as `migrate_to_ram` sees it).
///
/// When the callback runs, the faulting space's `mmapLock` is held for reading, `page` is locked and
/// referenced by the core (pass it as `faultPage` to ``MigrateVMA``), and no page-table lock is held.
public struct DeviceFault: Sendable {
    /// The space that faulted (after fork it may differ from the one that migrated the page), on
    /// either engine.
    public let space: any MirroredAddressSpace
    /// The faulting address, page-aligned.
    public let address: UInt64
    /// The device-private page the entry named.
    public let page: PFN
    /// True when the fault came through a PMD entry (the whole folio should move); false for a PTE.
    public let huge: Bool
    /// Whether the CPU wanted to write.
    public let write: Bool
    /// The span the engine asks the driver to migrate with this fault; it contains the faulting unit.
    /// The simulated engine asks for the faulting unit only (the page, or the 2 MiB folio when
    /// ``huge``), as the kernel's `vmf` does; the native engine asks for a fault-around window, since
    /// each CPU fault there costs a userfaultfd round trip. A driver may migrate less, never more.
    public let range: Range<UInt64>

    /// A fault to hand to ``PagemapOperations/migrateToRAM(_:)``.
    @_spi(Engine)
    public init(space: any MirroredAddressSpace, address: UInt64, page: PFN, huge: Bool, write: Bool,
                range: Range<UInt64>) {
        self.space = space
        self.address = address
        self.page = page
        self.huge = huge
        self.write = write
        self.range = range
    }
}

/// The callbacks a driver supplies with a ``Pagemap`` (`struct dev_pagemap_ops`).
///
/// Callbacks run on the thread that triggered them. `folioFree` may run with page-table locks and the
/// driver's own notifier lock held (the last reference can drop anywhere): it must not sleep, fault, or
/// take an address space's `mmapLock`.
public protocol PagemapOperations: AnyObject, Sendable {
    /// The folio's refcount reached 0 (`folio_free`); give it back to the driver's allocator.
    /// `order` is the folio's order.
    func folioFree(_ head: PFN, order: Int)
    /// Move the faulting device-private page (and optionally neighbours) back to system RAM
    /// (`migrate_to_ram`). Throw `.bus` or `.outOfMemory` to fail the CPU access; returning lets the CPU
    /// retry the access.
    func migrateToRAM(_ fault: DeviceFault) throws(HMMError)
    /// A large device folio was split (`folio_split`): `tail` is a new folio, nil for the final call on
    /// the head. Default: nothing to do.
    func folioSplit(head: PFN, tail: PFN?)
}

extension PagemapOperations {
    public func folioSplit(head: PFN, tail: PFN?) {}
}

/// A registered device-memory region (`struct dev_pagemap`): a PFN range above system RAM with its
/// own bytes (a host arena), page metadata in the machine's frame table, an owner identity and the
/// driver's operations.
///
/// Frame lifecycle (the kernel's rules since v6.1, `mm/memremap.c`): a free device frame sits at refcount 0;
/// ``initFolio(_:order:)`` (`zone_device_folio_init`) makes it a folio with refcount 1, locked, and takes
/// one pagemap reference per frame; when the last reference drops the core clears its anonymous
/// state, calls ``PagemapOperations/folioFree(_:order:)`` and drops the pagemap references.
public final class Pagemap: @unchecked Sendable, CustomStringConvertible {
    /// The most frames one pagemap holds (2^24: 64 GiB of 4 KiB pages).
    public static let maximumFrames = 1 << 24
    public let kind: PagemapKind
    /// The managing driver's identity: compared with ``MigrateVMA``'s `owner` and ``HMMRange``'s
    /// `devicePrivateOwner`.
    public let owner: any AnyObject & Sendable
    /// `owner`'s identity as a number (``MemoryLocation/device``), kept so events need not touch `owner`.
    let ownerIdentity: UInt
    /// First frame of the region.
    public let firstPFN: PFN
    /// Frames in the region.
    public let count: Int
    /// Slot in the machine's pagemap table (1…255), stored in every frame's flags.
    let slot: Int
    let arena: Arena
    unowned let machine: Machine
    private weak var operations: (any PagemapOperations)?
    /// Frames handed out by `initFolio` and not yet freed (the kernel's percpu `ref`).
    let references = Atomic<Int>(0)
    private let unregistered = Atomic<Bool>(false)

    init(machine: Machine, kind: PagemapKind, owner: any AnyObject & Sendable, firstPFN: PFN, count: Int, slot: Int,
         operations: any PagemapOperations, window: UnsafeMutableRawPointer? = nil) throws(HMMError) {
        self.machine = machine
        self.kind = kind
        self.owner = owner
        ownerIdentity = UInt(bitPattern: ObjectIdentifier(owner))
        self.firstPFN = firstPFN
        self.count = count
        self.slot = slot
        self.operations = operations
        if let window {
            arena = Arena(borrowing: window, byteCount: count << PageSize.shift)
        } else if kind == .deviceCoherent {
            // CPU-addressable memory: a native engine maps its frames into processes (in place).
            arena = try Arena(sharedByteCount: count << PageSize.shift, what: "\(kind) pagemap")
        } else {
            arena = try Arena(byteCount: count << PageSize.shift, what: "\(kind) pagemap")
        }
    }

    /// Where frame `pfn`'s bytes live in a file the engine may map elsewhere: the descriptor of the
    /// pagemap's shared-memory object and the byte offset of the frame in it. Nil for a pagemap without
    /// one (only device-coherent pagemaps have one) or a frame outside it.
    @_spi(Engine)
    public func backingFile(of pfn: PFN) -> (descriptor: Int32, offset: Int)? {
        guard arena.file >= 0, contains(pfn) else { return nil }
        return (arena.file, Int(pfn.rawValue - firstPFN.rawValue) << PageSize.shift)
    }

    /// The driver's callbacks; nil once the driver object is gone.
    var ops: (any PagemapOperations)? { operations }

    /// One past the last frame.
    public var endPFN: PFN { firstPFN + count }

    /// Whether `pfn` belongs to this region.
    public func contains(_ pfn: PFN) -> Bool { pfn >= firstPFN && pfn < endPFN }

    /// Frames currently allocated (refcount above 0).
    public var framesInUse: Int { references.load(ordering: .relaxed) }

    /// Whether ``Machine/unregisterPagemap(_:)`` has completed.
    public var isUnregistered: Bool { unregistered.load(ordering: .acquiring) }

    public var description: String {
        "\(kind) pagemap \(hex(firstPFN.rawValue))+\(count)"
    }

    /// `zone_device_folio_init`: turns the free frames at `head` into a folio of `order` with refcount 1,
    /// locked (the driver unlocks it, or migration does), and takes `1 << order` pagemap references.
    /// Requires the frames to be free (refcount 0), which only the driver's allocator knows.
    /// - Throws: `.invalidArgument` (outside the region, misaligned, order not 0 or 9), `.busy` (a frame
    ///   is still referenced), `.noProcess` (the pagemap was unregistered). Nothing changes on error.
    public func initFolio(_ head: PFN, order: Int) throws(HMMError) {
        guard !isUnregistered else { throw HMMError(.noProcess, "\(self) is unregistered") }
        guard order == 0 || order == PageSize.pmdOrder else { throw .invalid("device folio order \(order) is not 0 or 9") }
        let n = 1 << order
        guard contains(head), head.rawValue + UInt64(n) <= endPFN.rawValue, head.rawValue & UInt64(n - 1) == 0 else {
            throw .invalid("\(head) order \(order) is not an aligned folio of \(self)")
        }
        for i in 0..<n where machine.frames.record(head + i).pointee.refcount.load(ordering: .acquiring) != 0 {
            throw HMMError(.busy, "\(head + i) of \(self) is still referenced")
        }
        references.wrappingAdd(n, ordering: .relaxed)
        machine.prepareFolio(head, order: order, flags: .locked)
        for i in 0..<n { machine.frames.record(head + i).pointee.driverData.store(0, ordering: .relaxed) }
    }

    /// Unlocks a folio of this region and drops one reference (`folio_unlock` + `folio_put`): how a driver
    /// gives back a page it allocated but did not use. Nothing for a frame outside the region or free.
    public func unlockAndPut(_ head: PFN) {
        guard contains(head), machine.refcount(head) > 0 else { return }
        machine.frames.unlock(head)
        machine.putFolio(head)
    }

    /// The bytes of frame `pfn` of this region (what the device's DMA engine reads and writes).
    /// - Throws: `.invalidArgument` for a frame outside the region.
    public func bytes(of pfn: PFN) throws(HMMError) -> UnsafeMutableRawBufferPointer {
        guard contains(pfn) else { throw .invalid("\(pfn) is not in \(self)") }
        return UnsafeMutableRawBufferPointer(start: address(pfn), count: PageSize.base)
    }

    @inline(__always) func address(_ pfn: PFN) -> UnsafeMutableRawPointer {
        arena.base + Int(truncatingIfNeeded: pfn.rawValue - firstPFN.rawValue) << PageSize.shift
    }

    /// The driver word of a frame (`zone_device_data`).
    public func driverData(_ pfn: PFN) -> UInt64 {
        guard contains(pfn) else { return 0 }
        return machine.frames.record(pfn).pointee.driverData.load(ordering: .acquiring)
    }

    /// Sets the driver word of a frame (free-list link, back pointer, …).
    public func setDriverData(_ pfn: PFN, _ value: UInt64) {
        guard contains(pfn) else { return }
        machine.frames.record(pfn).pointee.driverData.store(value, ordering: .releasing)
    }

    /// The refcount of a frame's folio (0 = free).
    public func refcount(_ pfn: PFN) -> Int {
        guard contains(pfn) else { return 0 }
        return Int(machine.refcount(machine.frames.head(of: pfn)))
    }

    func markUnregistered() { unregistered.store(true, ordering: .releasing) }
}

extension Machine {
    /// Registers `count` frames of device memory of `kind` (`memremap_pages`), placed in the PFN space
    /// above RAM — the lowest free range that fits (`request_free_mem_region`), which may be one an
    /// unregistered pagemap gave back — with `owner` as its identity and `operations` as its callbacks.
    /// `operations` is held weakly: once the driver object is gone, freed frames are dropped and CPU
    /// faults on its device-private pages raise `SIGBUS`.
    /// - Throws: `.invalidArgument` (count not a positive multiple of 512, more than 16 Mi frames),
    ///   `.outOfMemory` (no free PFN range of `count` frames, all 255 slots in use, or host memory
    ///   exhausted). Nothing changes on error.
    public func registerPagemap(
        kind: PagemapKind, count: Int, owner: any AnyObject & Sendable, operations: any PagemapOperations
    ) throws(HMMError) -> Pagemap {
        guard kind != .hostWindow else { throw .invalid("a host window is registered by its engine") }
        return try register(kind: kind, count: count, owner: owner, operations: operations, window: nil)
    }

    /// Registers `count` frames whose bytes are the host memory at `base` (a ``PagemapKind/hostWindow``):
    /// how the native engine names its regions' CPU-resident pages. Unregister it like any pagemap.
    /// - Throws: as ``registerPagemap(kind:count:owner:operations:)``.
    @_spi(Engine)
    public func registerHostWindow(
        base: UnsafeMutableRawPointer, count: Int, owner: any AnyObject & Sendable, operations: any PagemapOperations
    ) throws(HMMError) -> Pagemap {
        try register(kind: .hostWindow, count: count, owner: owner, operations: operations, window: base)
    }

    private func register(
        kind: PagemapKind, count: Int, owner: any AnyObject & Sendable, operations: any PagemapOperations,
        window: UnsafeMutableRawPointer?
    ) throws(HMMError) -> Pagemap {
        guard count > 0, count % PageSize.pagesPerPMD == 0, count <= Pagemap.maximumFrames else {
            throw .invalid("pagemap of \(count) frames: must be a positive multiple of 512 up to \(Pagemap.maximumFrames)")
        }
        // Ranges that unregistered pagemaps gave back become free once the walkers that might have read
        // one of their PFNs have left; let the epoch reclaim what it can before looking.
        epoch.collect()
        return try pagemapRegistry.withLock { (r: inout PagemapRegistryState) throws(HMMError) -> Pagemap in
            r.reclaimRetired(epoch)
            guard let slot = (1..<256).first(where: { r.slots[$0] == nil }) else {
                throw HMMError(.outOfMemory, "all 255 pagemap slots are in use")
            }
            guard let first = r.firstFit(count, capacity: frames.capacity) else {
                throw HMMError(.outOfMemory, "no free range of \(count) frames in the device PFN space: \(r.spaceReport(capacity: frames.capacity))")
            }
            let pm = try Pagemap(machine: self, kind: kind, owner: owner, firstPFN: PFN(UInt64(first)),
                                 count: count, slot: slot, operations: operations, window: window)
            r.take(first..<(first + count))
            frames.initialize(first..<(first + count), pagemapSlot: slot)
            r.slots[slot] = pm
            pagemapTable[slot] = Unmanaged.passUnretained(pm)
            pagemapKinds[slot].store(kind.rawValue, ordering: .releasing)
            pagemapBias[slot].store(Int(bitPattern: pm.arena.base) &- Int(pm.firstPFN.rawValue) << PageSize.shift,
                                    ordering: .releasing)
            return pm
        }
    }

    /// Removes a pagemap (`memunmap_pages`). The kernel waits until every frame is free; we refuse instead
    /// of hanging, so the driver can evict (``MigrateDevice``) and try again. Its PFN range goes back to
    /// the PFN space (`release_mem_region`) for a later ``registerPagemap(kind:count:owner:operations:)``,
    /// once no lockless walker that might still hold one of its PFNs is inside.
    /// - Throws: `.busy` naming how many frames are still in use (nothing changes), `.invalidArgument`
    ///   for a pagemap of another machine or one already removed.
    public func unregisterPagemap(_ pagemap: Pagemap) throws(HMMError) {
        try pagemapRegistry.withLock { (r: inout PagemapRegistryState) throws(HMMError) in
            guard pagemap.machine === self, r.slots[pagemap.slot] === pagemap else {
                throw .invalid("\(pagemap) is not registered with this machine")
            }
            let inUse = pagemap.framesInUse
            guard inUse == 0 else {
                throw HMMError(.busy, "\(pagemap) still has \(inUse) frame(s) in use; migrate them out first")
            }
            pagemap.markUnregistered()
            // Every frame is free (refcount 0), so nothing can reach them: make them name no pagemap, so
            // a stale PFN can never resolve to whichever pagemap reuses the slot.
            frames.initialize(Int(pagemap.firstPFN.rawValue)..<Int(pagemap.endPFN.rawValue), pagemapSlot: 0)
            pagemapKinds[pagemap.slot].store(0, ordering: .releasing)
            pagemapBias[pagemap.slot].store(0, ordering: .releasing)
            pagemapTable[pagemap.slot] = nil
            r.slots[pagemap.slot] = nil
            r.retire(Int(pagemap.firstPFN.rawValue)..<Int(pagemap.endPFN.rawValue), epoch)
        }
    }

    /// The pagemap a frame belongs to, nil for system RAM.
    public func pagemap(of pfn: PFN) -> Pagemap? {
        guard pfn.rawValue >= UInt64(ramFrames), pfn.rawValue < UInt64(frames.capacity) else { return nil }
        let slot = frames.pagemapSlot(pfn)
        guard slot != 0, let pm = pagemapTable[slot]?.takeUnretainedValue(), pm.contains(pfn) else { return nil }
        return pm
    }

    /// The pagemap slot of a device frame (0 for RAM): a name for its pagemap that costs no reference.
    @inline(__always) func pagemapSlot(of pfn: PFN) -> Int {
        guard pfn.rawValue >= UInt64(ramFrames), pfn.rawValue < UInt64(frames.capacity) else { return 0 }
        return frames.pagemapSlot(pfn)
    }

    /// The memory of pagemap `slot`, read without taking a reference: call it while holding a frame of
    /// the pagemap (which keeps it registered).
    func memory(ofPagemapSlot slot: Int) -> MemoryLocation {
        guard slot != 0, let pm = pagemapTable[slot] else { return .system }
        return pm._withUnsafeGuaranteedRef { p in MemoryLocation(device: p.ownerIdentity, kind: p.kind) }
    }

    /// The kind of device memory behind a frame; nil for system RAM (or no frame at all).
    @inline(__always) public func deviceKind(_ pfn: PFN) -> PagemapKind? {
        guard pfn.rawValue >= UInt64(ramFrames), pfn.rawValue < UInt64(frames.capacity) else { return nil }
        return PagemapKind(rawValue: pagemapKinds[frames.pagemapSlot(pfn)].load(ordering: .acquiring))
    }

    @inline(__always) func isDevicePrivate(_ pfn: PFN) -> Bool { deviceKind(pfn) == .devicePrivate }

    /// Host address of a device frame.
    @inline(__always) func devicePointer(_ pfn: PFN) -> UnsafeMutableRawPointer {
        let bias = pagemapBias[frames.pagemapSlot(pfn)].load(ordering: .acquiring)
        return UnsafeMutableRawPointer(bitPattern: bias &+ Int(truncatingIfNeeded: pfn.rawValue) << PageSize.shift)!
    }

    /// A device frame that a folio split left unreferenced: free it as an order-0 folio.
    func releaseDeviceFrame(_ pfn: PFN, _ pm: Pagemap) {
        frames.record(pfn).pointee.flags.store(UInt64(pm.slot) << FrameFlags.pagemapShift, ordering: .releasing)
        pm.ops?.folioFree(pfn, order: 0)
        pm.references.wrappingSubtract(1, ordering: .relaxed)
    }

    /// `free_zone_device_folio`: the last reference to a device folio dropped.
    func freeDeviceFolio(_ head: PFN, order: Int) {
        guard let pm = pagemap(of: head) else { preconditionFailure("device frame \(head) without a pagemap") }
        for i in 0..<(1 << order) { frames.clearFlags(head + i, [.anon, .anonExclusive, .dirty, .young]) }
        if pm.kind == .generic {
            frames.record(head).pointee.refcount.store(1, ordering: .releasing)
            return
        }
        frames.record(head).pointee.flags.bitwiseAnd(FrameFlags.pagemapMask, ordering: .releasing)
        pm.ops?.folioFree(head, order: order)
        pm.references.wrappingSubtract(1 << order, ordering: .relaxed)
    }
}

/// The machine's pagemap bookkeeping (guarded by `Machine.pagemapRegistry`), and the device PFN space
/// above RAM (the kernel's `iomem_resource` as `request_free_mem_region` searches it).
///
/// Every PFN in `[RAM end, capacity)` is in exactly one of: a registered pagemap; a retired range (its
/// pagemap was unregistered, and a lockless walker that read one of its PFNs before that may still be
/// inside — until the epoch says it has left, the range is not handed out, so a stale PFN can only
/// resolve to no pagemap); a free range below `nextPFN`; or the free space from `nextPFN` up. All
/// ranges are multiples of 512 frames, so device folios stay PMD-aligned.
struct PagemapRegistryState {
    var slots: [Pagemap?] = Array(repeating: nil, count: 256)
    /// One past the highest PFN a registered or retired pagemap uses (RAM's end when there is none): the
    /// invariant checker sizes its per-frame tables by it.
    var nextPFN: Int
    /// Free ranges below `nextPFN`, sorted and coalesced (none touches another or `nextPFN`).
    private var free: [Range<Int>] = []
    /// Unregistered ranges waiting for their grace period, each retired through the epoch as a
    /// `.pagemapRange` item: once the epoch has reclaimed it, every walker that might have seen the range
    /// has left.
    private var retired: [Range<Int>] = []

    init(nextPFN: Int) { self.nextPFN = nextPFN }

    /// The lowest start of a free range of `count` frames (`nextPFN` when no hole fits), or nil when the
    /// PFN space has no room.
    func firstFit(_ count: Int, capacity: Int) -> Int? {
        if let hole = free.first(where: { $0.count >= count }) { return hole.lowerBound }
        return nextPFN + count <= capacity ? nextPFN : nil
    }

    /// Takes `range`, which ``firstFit(_:capacity:)`` just returned the start of.
    mutating func take(_ range: Range<Int>) {
        if range.lowerBound == nextPFN {
            nextPFN = range.upperBound
            return
        }
        guard let i = free.firstIndex(where: { $0.lowerBound == range.lowerBound }), free[i].count >= range.count else {
            preconditionFailure("PFN range \(range) is not free")
        }
        if free[i].count == range.count { free.remove(at: i) } else { free[i] = range.upperBound..<free[i].upperBound }
    }

    /// Queues an unregistered pagemap's range until no walker can still hold one of its PFNs.
    mutating func retire(_ range: Range<Int>, _ epoch: Epoch) {
        retired.append(range)
        epoch.retire(.pagemapRange(PFN(UInt64(range.lowerBound))))
    }

    /// Frees every retired range whose marker the epoch has reclaimed.
    mutating func reclaimRetired(_ epoch: Epoch) {
        guard !retired.isEmpty else { return }
        var waiting: [Range<Int>] = []
        for range in retired {
            if epoch.isPending(.pagemapRange(PFN(UInt64(range.lowerBound)))) { waiting.append(range) } else { release(range) }
        }
        retired = waiting
    }

    /// Gives `range` back, merging it with free neighbours; free space that reaches `nextPFN` lowers it.
    private mutating func release(_ range: Range<Int>) {
        var merged = range
        let i = free.firstIndex(where: { $0.lowerBound > range.lowerBound }) ?? free.count
        var at = i
        if i < free.count, free[i].lowerBound == merged.upperBound {
            merged = merged.lowerBound..<free[i].upperBound
            free.remove(at: i)
        }
        if i > 0, free[i - 1].upperBound == merged.lowerBound {
            merged = free[i - 1].lowerBound..<merged.upperBound
            free.remove(at: i - 1)
            at = i - 1
        }
        if merged.upperBound == nextPFN {
            nextPFN = merged.lowerBound
        } else {
            free.insert(merged, at: at)
        }
    }

    /// What the PFN space holds, for an out-of-memory message.
    func spaceReport(capacity: Int) -> String {
        let holes = free.reduce(0) { $0 + $1.count }
        let largest = max(free.map(\.count).max() ?? 0, capacity - nextPFN)
        let waiting = retired.reduce(0) { $0 + $1.count }
        return "\(holes + capacity - nextPFN) frames free, the largest range \(largest)"
            + (waiting > 0 ? ", \(waiting) more waiting for lockless walkers to leave" : "")
    }
}
