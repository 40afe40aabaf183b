/// What an eviction policy knows of a 2 MiB block with pages in device memory.
public struct ResidentBlock: Sendable {
    public let start: UInt64
    /// Pages of the block in device memory now.
    public let localPages: Int
    /// When it first got device memory, when it last got more, and when the device last used it (access
    /// bits sampled at every fault batch) — all in the manager's event sequence.
    public let firstResident: Int
    public let lastAllocated: Int
    public let lastUse: Int

    public init(start: UInt64, localPages: Int, firstResident: Int, lastAllocated: Int, lastUse: Int) {
        self.start = start
        self.localPages = localPages
        self.firstResident = firstResident
        self.lastAllocated = lastAllocated
        self.lastUse = lastUse
    }
}

/// Picks the block to evict when device memory (or a budget) runs out.
public protocol EvictionPolicy: Sendable {
    var name: String { get }
    /// The victim among `blocks` (each with local pages), or nil to evict nothing.
    func victim(among blocks: [ResidentBlock]) -> ResidentBlock?
}

/// NVIDIA UVM's order (`pick_root_chunk_to_evict`): the block whose device memory was allocated
/// longest ago — chunks move to the tail of the used list when they get pages, not on access, so the
/// order approximates allocation recency.
public struct AllocationOrderEviction: EvictionPolicy {
    public init() {}
    public var name: String { "uvm" }
    public func victim(among blocks: [ResidentBlock]) -> ResidentBlock? {
        blocks.min { ($0.lastAllocated, $0.start) < ($1.lastAllocated, $1.start) }
    }
}

/// Least recently used, from the device page table's accessed bits (sampled per fault batch).
public struct LRUEviction: EvictionPolicy {
    public init() {}
    public var name: String { "lru" }
    public func victim(among blocks: [ResidentBlock]) -> ResidentBlock? {
        blocks.min { ($0.lastUse, $0.lastAllocated, $0.start) < ($1.lastUse, $1.lastAllocated, $1.start) }
    }
}

/// First in, first out: the block that became resident first, whatever happened since.
public struct FIFOEviction: EvictionPolicy {
    public init() {}
    public var name: String { "fifo" }
    public func victim(among blocks: [ResidentBlock]) -> ResidentBlock? {
        blocks.min { ($0.firstResident, $0.start) < ($1.firstResident, $1.start) }
    }
}
