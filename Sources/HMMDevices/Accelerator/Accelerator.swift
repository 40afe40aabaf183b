import HMM
import Synchronization

/// A simulated accelerator: device-private memory of a fixed size, and for each address space it
/// works on an ``AcceleratorContext`` — its own page table, kept coherent with the CPU's through an
/// interval notifier, and workers that run "kernels" (access streams) through it. A device access that
/// misses goes to a replayable fault buffer, serviced in batches by a ``DeviceFaultServicer`` (the
/// memory manager's policy), then replayed, as on NVIDIA UVM and AMD SVM hardware.
///
/// It runs on either engine: on a simulated `AddressSpace` and on a native space, device accesses read
/// and write real bytes — device memory when resident, host memory through a remote mapping otherwise.
///
/// Locking: the free list has its own lock (a leaf). A CPU touch of a device page reaches
/// ``migrateToRAM(_:)`` with the core's locks as `do_swap_page` holds them.
public final class Accelerator: PagemapOperations, @unchecked Sendable, CustomStringConvertible {
    public let machine: Machine
    public let name: String
    /// Device memory, in 4 KiB pages.
    public let memoryPages: Int
    /// Set once at the end of `init` (registration needs `self` as owner and operations).
    @exclusivity(unchecked) private(set) var pagemap: Pagemap!
    private let free: Locked<[PFN]>
    private let contextList = Locked<[ObjectIdentifier: Unmanaged<AcceleratorContext>]>([:])

    /// An accelerator with `memory` bytes of device-private memory (a positive multiple of 2 MiB).
    /// - Throws: `.invalidArgument` for another size, `.outOfMemory` if the machine has no room for it.
    public init(machine: Machine, name: String = "gpu0", memory: Int) throws(HMMError) {
        guard memory > 0, memory % PageSize.pmd == 0, memory <= 1 << 40 else {
            throw HMMError(.invalidArgument, "accelerator memory must be a positive multiple of 2 MiB, got \(memory)")
        }
        self.machine = machine
        self.name = name
        memoryPages = memory / PageSize.base
        free = Locked([])
        pagemap = try machine.registerPagemap(kind: .devicePrivate, count: memoryPages, owner: self, operations: self)
        let first = pagemap.firstPFN
        free.withLock { f in
            f.reserveCapacity(memoryPages)
            for i in stride(from: memoryPages - 1, through: 0, by: -1) { f.append(first + i) }
        }
    }

    /// Gives the device memory back to the machine; every context must be closed first (they evict
    /// their pages), else the pagemap stays registered.
    deinit { try? machine.unregisterPagemap(pagemap) }

    public var description: String { "\(name) (\(memoryPages >> 8) MiB device-private)" }

    /// Device pages not in use.
    public var freePages: Int { free.withLock { $0.count } }

    /// Where device memory appears in events (`MemoryLocation`).
    public var location: MemoryLocation { MemoryLocation(pagemap) }

    /// `n` locked device pages with one reference each, or fewer if memory runs short.
    func allocatePages(_ n: Int) -> [PFN] {
        let pages: [PFN] = free.withLock { f in
            let k = min(n, f.count)
            let out = Array(f.suffix(k))
            f.removeLast(k)
            return out
        }
        var out: [PFN] = []
        out.reserveCapacity(pages.count)
        for p in pages {
            if (try? pagemap.initFolio(p, order: 0)) != nil { out.append(p) }
        }
        return out
    }

    /// Pages from ``allocatePages(_:)`` that were not used.
    func giveBack(_ pages: [PFN]) { for p in pages { pagemap.unlockAndPut(p) } }

    // MARK: PagemapOperations

    /// The core dropped a device page's last reference.
    public func folioFree(_ head: PFN, order: Int) {
        free.withLock { f in for i in 0..<(1 << order) { f.append(head + i) } }
    }

    /// A CPU touched a device page (`migrate_to_ram`): the context of the space moves the fault's window
    /// back to system memory.
    public func migrateToRAM(_ fault: DeviceFault) throws(HMMError) {
        guard let context = context(for: fault.space) else {
            throw HMMError(.bus, "\(self) has no context for the faulting space")
        }
        try context.migrateToRAM(fault)
    }

    // MARK: contexts

    func add(_ context: AcceleratorContext) {
        contextList.withLock { $0[ObjectIdentifier(context.space)] = Unmanaged.passUnretained(context) }
    }

    func remove(_ context: AcceleratorContext) {
        contextList.withLock { list in
            if list[ObjectIdentifier(context.space)]?.toOpaque() == Unmanaged.passUnretained(context).toOpaque() {
                list[ObjectIdentifier(context.space)] = nil
            }
        }
    }

    func context(for space: any MirroredAddressSpace) -> AcceleratorContext? {
        contextList.withLock { $0[ObjectIdentifier(space)]?.takeUnretainedValue() }
    }
}

