import HMM

/// One device fault as the fault buffer records it (UVM's `GpuFault`: address and access type).
public struct DeviceFaultRecord: Hashable, Sendable {
    /// The page's address.
    public let address: UInt64
    public let access: DeviceAccess

    public init(address: UInt64, access: DeviceAccess) {
        self.address = address
        self.access = access
    }
}

/// What a device access wants.
public enum DeviceAccess: UInt8, Sendable, Comparable {
    case read, write, atomic
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    /// Whether the access needs a writable mapping.
    public var writes: Bool { self != .read }
}

/// A batch of faults as a ``DeviceFaultServicer`` gets it: deduplicated (one record per page, with the
/// strongest access), sorted by address and grouped per 2 MiB block — UVM's batch preprocessing.
public struct DeviceFaultBatch: Sendable {
    /// The faults of one 2 MiB virtual block.
    public struct Block: Sendable {
        /// The block's first address (2 MiB-aligned).
        public let start: UInt64
        /// Page indexes in the block (0…511) that faulted, ascending, with their access.
        public var pages: [(index: Int, access: DeviceAccess)]

        public init(start: UInt64, pages: [(index: Int, access: DeviceAccess)]) {
            self.start = start
            self.pages = pages
        }
    }
    /// A number per batch, from 1.
    public let id: Int
    public let blocks: [Block]
    /// Faults taken from the buffer, before deduplication.
    public let rawFaults: Int

    /// Builds a batch from raw records.
    public init(id: Int, records: [DeviceFaultRecord]) {
        self.id = id
        rawFaults = records.count
        var strongest: [UInt64: DeviceAccess] = [:]
        for r in records { strongest[r.address] = max(strongest[r.address] ?? .read, r.access) }
        var blocks: [Block] = []
        for (address, access) in strongest.sorted(by: { $0.key < $1.key }) {
            let start = address & ~blockMask
            let index = Int((address - start) >> UInt64(PageSize.shift))
            if blocks.last?.start == start {
                blocks[blocks.count - 1].pages.append((index, access))
            } else {
                blocks.append(Block(start: start, pages: [(index, access)]))
            }
        }
        self.blocks = blocks
    }

    /// Pages after deduplication.
    public var uniqueFaults: Int { blocks.reduce(0) { $0 + $1.pages.count } }
}

/// Decides what a batch of device faults does — migrate, prefetch, evict, map remotely — and does it
/// through the context's primitives (``AcceleratorContext/migrateToDevice(_:cause:refused:)``,
/// ``AcceleratorContext/evict(_:cause:)``, ``AcceleratorContext/mapRemote(_:write:)``). Called on the
/// context's fault thread, one batch at a time, with no lock held.
public protocol DeviceFaultServicer: AnyObject, Sendable {
    /// Services `batch`; a thrown error fails the kernel (every worker waiting on a fault gets it).
    func service(_ batch: DeviceFaultBatch, in context: AcceleratorContext) throws(HMMError)
    /// A CPU touch brought `pages` (addresses) back from the device (`write`: a store). Called on the
    /// faulting thread after the move, with no lock held; for bookkeeping (thrashing), not for moving.
    func cpuFaultedBack(_ pages: [UInt64], write: Bool, in context: AcceleratorContext)
}

extension DeviceFaultServicer {
    public func cpuFaultedBack(_ pages: [UInt64], write: Bool, in context: AcceleratorContext) {}
}

/// Plain demand paging: each faulting page, and nothing else, migrates to the device; when device
/// memory is exhausted the batch fails with `.outOfMemory`. The baseline every policy is measured
/// against.
public final class DemandPaging: DeviceFaultServicer {
    public init() {}

    public func service(_ batch: DeviceFaultBatch, in context: AcceleratorContext) throws(HMMError) {
        for block in batch.blocks {
            let runs = Self.runs(block.start, block.pages.map(\.index))
            var refused: [UInt64] = []
            _ = try context.migrateToDevice(runs, cause: .deviceFault, refused: &refused)
            try context.satisfy(block, refused: refused)
        }
    }

    /// Consecutive page indexes of a block as address ranges.
    public static func runs(_ blockStart: UInt64, _ indexes: [Int]) -> [Range<UInt64>] {
        var runs: [Range<UInt64>] = []
        for index in indexes.sorted() {
            let a = blockStart + UInt64(index) << UInt64(PageSize.shift)
            if let last = runs.last, last.upperBound == a {
                runs[runs.count - 1] = last.lowerBound..<(a + UInt64(PageSize.base))
            } else {
                runs.append(a..<(a + UInt64(PageSize.base)))
            }
        }
        return runs
    }
}

extension AcceleratorContext {
    /// Makes faulted pages of `block` usable where migration cannot: pages in `refused` (they could not
    /// move: pinned, shared, another device's) are mapped where they are, and a device page mapped
    /// read-only that a write wants gets its CPU mapping upgraded (breaking copy-on-write) and its
    /// entry made writable — both through `hmm_range_fault`. Without this a worker would fault on them
    /// forever. A page the CPU took back while it migrated is left alone: its access faults again —
    /// until it has starved (``AcceleratorContext/starvationReplays`` replays without progress), when it
    /// too is mapped where it is, so no access depends on a timing rule to finish.
    public func satisfy(_ block: DeviceFaultBatch.Block, refused: [UInt64] = []) throws(HMMError) {
        let starved = faults.withLock { s -> [UInt64] in
            guard !s.starved.isEmpty else { return [] }
            return block.pages.compactMap { p in
                let a = block.start + UInt64(p.index) << UInt64(PageSize.shift)
                return s.starved.remove(a)
            }
        }
        for (index, access) in block.pages {
            let a = block.start + UInt64(index) << UInt64(PageSize.shift)
            let m = mapping(at: a)
            if m.mapped && (m.writable || !access.writes) { continue }
            let starving = starved.contains(a)
            guard (m.mapped && m.local) || refused.contains(a) || starving else { continue }
            let n = try mapRemote(a..<(a + UInt64(PageSize.base)), write: access.writes)
            if starving { count { $0.starvedPages += n } }
        }
    }
}

/// Offset bits of a 4 KiB page, and of a 2 MiB block.
let pageMask = UInt64(PageSize.base - 1)
let blockMask = UInt64(PageSize.pmd - 1)
