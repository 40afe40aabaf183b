import HMM
import HMMDevices

/// What a prefetch policy sees of one 2 MiB block when its faults are serviced.
public struct BlockState: Sendable {
    /// The block's first address.
    public let start: UInt64
    /// Pages of the block inside the allocation (the last block of an allocation may be short).
    public let pages: Int
    /// Pages already in device memory.
    public let local: PageBitmap
    /// Pages the faults of this batch want (not local, or local but mapped without the access).
    public let faulted: PageBitmap
    /// Whether any processor holds any page of the block (device memory, or the CPU's populated pages).
    public let touched: Bool

    public init(start: UInt64, pages: Int, local: PageBitmap, faulted: PageBitmap, touched: Bool) {
        self.start = start
        self.pages = pages
        self.local = local
        self.faulted = faulted
        self.touched = touched
    }
}

/// Decides which extra pages of a block migrate with its faults (UVM's `uvm_perf_prefetch`).
public protocol PrefetchPolicy: Sendable {
    /// A short name for reports (`none`, `density`, …).
    var name: String { get }
    /// Pages to migrate besides the faulted ones (page indexes in the block; may include faulted or
    /// local pages, which are ignored).
    func prefetch(_ block: BlockState) -> PageBitmap
    /// Whether the policy also asks for pages of the *next* block (crossing the 2 MiB boundary): the
    /// number of pages from the next block's start, or 0.
    func ahead(_ block: BlockState) -> Int
}

extension PrefetchPolicy {
    public func ahead(_ block: BlockState) -> Int { 0 }
}

/// No prefetching: demand paging.
public struct NoPrefetch: PrefetchPolicy {
    public init() {}
    public var name: String { "none" }
    public func prefetch(_ block: BlockState) -> PageBitmap { PageBitmap() }
}

/// NVIDIA UVM's density prefetcher (`uvm_perf_prefetch.c`): within the 2 MiB block, faults are first
/// rounded up to their 64 KiB big page; then for each faulted page the largest aligned subtree of the
/// block (64 KiB, 128 KiB, … 2 MiB) whose populated leaves — local pages and faulted big pages — are
/// more than `threshold` % of it is prefetched. A block no processor has touched comes whole (first
/// touch at the preferred location).
public struct DensityPrefetch: PrefetchPolicy {
    /// Percent, 1…100 (UVM's `uvm_perf_prefetch_threshold`, default 51): a subtree qualifies when
    /// `count × 100 > size × threshold`.
    public let threshold: Int
    /// Pages of the big page faults are rounded up to (64 KiB).
    public let bigPage: Int

    public init(threshold: Int = 51, bigPage: Int = 16) {
        self.threshold = min(100, max(1, threshold))
        self.bigPage = bigPage
    }

    public var name: String { "density" }

    public func prefetch(_ block: BlockState) -> PageBitmap {
        let n = block.pages
        if !block.touched { return PageBitmap(0..<n) }
        // Leaves: local pages, and every big page that holds a fault.
        var leaves = block.local
        for i in block.faulted.indexes {
            let lo = i / bigPage * bigPage
            for j in lo..<min(n, lo + bigPage) { leaves.insert(j) }
        }
        var out = PageBitmap()
        for i in block.faulted.indexes {
            var size = bigPage
            var chosen: Range<Int>? = nil
            while size <= PageSize.pagesPerPMD {
                let lo = i / size * size
                let subtree = lo..<min(n, lo + size)
                // A subtree past the allocation's end counts its missing leaves as empty (UVM's ghost leaves).
                if leaves.count(in: subtree) * 100 > size * threshold { chosen = subtree }
                size *= 2
            }
            if let chosen { for j in chosen { out.insert(j) } } else {
                let lo = i / bigPage * bigPage
                for j in lo..<min(n, lo + bigPage) { out.insert(j) }
            }
        }
        return out
    }
}

/// Sequential-local (accel-sim's SL-64K): each fault brings the next `window` pages of its block.
public struct SequentialPrefetch: PrefetchPolicy {
    public let window: Int
    public init(window: Int = 16) { self.window = max(1, window) }
    public var name: String { "sequential" }
    public func prefetch(_ block: BlockState) -> PageBitmap {
        var out = PageBitmap()
        for i in block.faulted.indexes { for j in i..<min(block.pages, i + window) { out.insert(j) } }
        return out
    }
}

/// Sequential across blocks (gpu_ext's roadmap "cross-VA-block proactive prefetch"): as
/// ``SequentialPrefetch``, and a fault in the last `window` pages of a block also brings the first
/// `window` pages of the next block.
public struct CrossBlockPrefetch: PrefetchPolicy {
    public let window: Int
    public init(window: Int = 64) { self.window = max(1, window) }
    public var name: String { "cross-block" }
    public func prefetch(_ block: BlockState) -> PageBitmap { SequentialPrefetch(window: window).prefetch(block) }
    public func ahead(_ block: BlockState) -> Int {
        guard let last = block.faulted.indexes.last, last + window > block.pages else { return 0 }
        return last + window - block.pages
    }
}
