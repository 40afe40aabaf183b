/// The provider's page pool (the kernel's `genalloc` pool with page granularity): one chunk per BAR
/// region, a bitmap per chunk, first-fit contiguous allocation from a rotating hint. Guarded by the
/// provider's state lock (a leaf).
struct P2PPool {
    struct Chunk {
        let pagemap: Pagemap
        /// Bus address of the chunk's first byte.
        let busAddress: UInt64
        /// One bit per page, set while allocated (mapped, pinned, retiring or in kernel use).
        var used: [UInt64]
        var freePages: Int
        var hint = 0
    }

    var chunks: [Chunk] = []

    /// Pages in every chunk.
    var totalPages: Int { chunks.reduce(0) { $0 + $1.pagemap.count } }
    /// Pages free in every chunk.
    var freePages: Int { chunks.reduce(0) { $0 + $1.freePages } }

    mutating func add(_ pagemap: Pagemap, busAddress: UInt64) {
        chunks.append(Chunk(pagemap: pagemap, busAddress: busAddress,
                            used: [UInt64](repeating: 0, count: (pagemap.count + 63) / 64), freePages: pagemap.count))
    }

    /// `gen_pool_alloc`: `pages` contiguous pages in one chunk, or nil.
    mutating func allocate(_ pages: Int) -> PFN? {
        for c in chunks.indices where chunks[c].freePages >= pages {
            let n = chunks[c].pagemap.count
            var start = chunks[c].hint
            var wrapped = false
            while true {
                if start + pages > n {
                    if wrapped || chunks[c].hint == 0 { break }
                    wrapped = true
                    start = 0
                }
                if wrapped && start >= chunks[c].hint { break }
                if let busy = lastUsed(c, start, pages) {
                    start = busy + 1
                    continue
                }
                for i in start..<(start + pages) { chunks[c].used[i >> 6] |= 1 << UInt64(i & 63) }
                chunks[c].freePages -= pages
                chunks[c].hint = start + pages == n ? 0 : start + pages
                return chunks[c].pagemap.firstPFN + start
            }
        }
        return nil
    }

    /// `gen_pool_free`. The pages must be allocated.
    mutating func free(_ first: PFN, _ pages: Int) {
        guard let c = chunkIndex(first) else { preconditionFailure("\(first) is not in this pool") }
        let base = Int(first.rawValue - chunks[c].pagemap.firstPFN.rawValue)
        for i in base..<(base + pages) {
            precondition(chunks[c].used[i >> 6] & (1 << UInt64(i & 63)) != 0, "double free of P2P page \(first + (i - base))")
            chunks[c].used[i >> 6] &= ~(1 << UInt64(i & 63))
        }
        chunks[c].freePages += pages
    }

    func chunkIndex(_ pfn: PFN) -> Int? { chunks.firstIndex { $0.pagemap.contains(pfn) } }

    /// Whether `pfn` is free in the pool.
    func isFree(_ pfn: PFN) -> Bool {
        guard let c = chunkIndex(pfn) else { return false }
        let i = Int(pfn.rawValue - chunks[c].pagemap.firstPFN.rawValue)
        return chunks[c].used[i >> 6] & (1 << UInt64(i & 63)) == 0
    }

    /// Index of the last used page in `[start, start + pages)`, or nil if all are free.
    private func lastUsed(_ c: Int, _ start: Int, _ pages: Int) -> Int? {
        var i = start + pages - 1
        while i >= start {
            if chunks[c].used[i >> 6] & (1 << UInt64(i & 63)) != 0 { return i }
            i -= 1
        }
        return nil
    }
}
