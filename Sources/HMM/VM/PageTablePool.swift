import Synchronization

/// The pool page-table nodes come from: 512-entry arrays of `Atomic<UInt64>`, one spin-lock word per
/// node (the split page-table lock of a PTE table, or the PMD lock of a PMD table).
///
/// Nodes are only unlinked under the owning address space's `mmapLock` held for writing, so a walker
/// holding it for reading may follow table entries without further locking. A node that was reachable
/// is not freed but retired through the machine's ``Epoch`` (the kernel's RCU page-table freeing): the
/// lockless GUP-fast walker may still be reading it, and must never see it reused by another space.
final class PageTablePool: @unchecked Sendable {
    static let entriesPerNode = 512
    private let nodes: Arena
    private let lockWords: Arena
    let capacity: Int
    private let freeList: Locked<(stack: [UInt32], highWater: UInt32, deposited: Int)>
    private let used = Atomic<Int>(0)
    /// Nodes retired and not yet reclaimed.
    private let retiring = Atomic<Int>(0)
    private let epoch: Epoch

    init(capacity: Int, epoch: Epoch) throws(HMMError) {
        self.capacity = capacity
        self.epoch = epoch
        nodes = try Arena(byteCount: capacity * PageSize.base, what: "page-table nodes")
        lockWords = try Arena(byteCount: capacity * 4, what: "page-table locks")
        // Node 0 is never handed out: a table entry always names a node ≥ 1.
        freeList = Locked((stack: [], highWater: 1, deposited: 0))
    }

    /// Nodes in use.
    var nodesInUse: Int { used.load(ordering: .relaxed) }

    /// A zero-filled node.
    /// - Throws: `.outOfMemory` when every node is in use.
    func allocate() throws(HMMError) -> UInt32 {
        if let node = tryAllocate() { return node }
        // Retired nodes may be waiting for walkers that have long left.
        epoch.collect()
        guard let node = tryAllocate() else { throw HMMError(.outOfMemory, "page-table node pool exhausted") }
        return node
    }

    private func tryAllocate() -> UInt32? {
        let node: UInt32? = freeList.withLock { f in
            guard used.load(ordering: .relaxed) + retiring.load(ordering: .relaxed) + f.deposited < capacity - 1
            else { return nil }
            if let n = f.stack.popLast() { return n }
            guard Int(f.highWater) < capacity else { return nil }
            defer { f.highWater += 1 }
            return f.highWater
        }
        if node != nil { used.wrappingAdd(1, ordering: .relaxed) }
        return node
    }

    /// Sets one node aside for a future split of a huge PMD mapping (`pgtable_trans_huge_deposit`), so
    /// that splitting — which partial unmap must do — can never fail. False when the pool is exhausted.
    func deposit() -> Bool {
        freeList.withLock { f in
            guard used.load(ordering: .relaxed) + retiring.load(ordering: .relaxed) + f.deposited < capacity - 1
            else { return false }
            f.deposited += 1
            return true
        }
    }

    /// Gives a deposit back unused (the huge mapping was zapped).
    func releaseDeposit() { freeList.withLock { $0.deposited -= 1 } }

    /// Turns a deposit into a zero-filled node (`pgtable_trans_huge_withdraw`); cannot fail.
    func withdrawDeposit() -> UInt32 {
        let node: UInt32 = freeList.withLock { f in
            f.deposited -= 1
            if let n = f.stack.popLast() { return n }
            defer { f.highWater += 1 }
            return f.highWater
        }
        used.wrappingAdd(1, ordering: .relaxed)
        return node
    }

    /// Nodes set aside for huge-PMD splits.
    var depositedNodes: Int { freeList.withLock { $0.deposited } }

    /// Returns a node that no walker can have seen (it was never linked); its entries must all be none.
    func free(_ node: UInt32) {
        checkEmpty(node)
        used.wrappingSubtract(1, ordering: .relaxed)
        freeList.withLock { $0.stack.append(node) }
    }

    /// Retires nodes that were unlinked from their parents: they count as free at once and are reused
    /// after the walkers that may still be reading them have left.
    func retire(_ nodes: [UInt32]) {
        guard !nodes.isEmpty else { return }
        for node in nodes { checkEmpty(node) }
        used.wrappingSubtract(nodes.count, ordering: .relaxed)
        retiring.wrappingAdd(nodes.count, ordering: .relaxed)
        epoch.retire(nodes.map { .pageTableNode($0) })
    }

    /// A retired node's grace period is over.
    func reclaim(_ node: UInt32) {
        freeList.withLock { $0.stack.append(node) }
        retiring.wrappingSubtract(1, ordering: .relaxed)
    }

    private func checkEmpty(_ node: UInt32) {
        let e = entries(node)
        for i in 0..<Self.entriesPerNode {
            precondition(e[i].load(ordering: .relaxed) == 0, "freeing page-table node \(node) with live entry \(i)")
        }
    }

    @inline(__always) func entries(_ node: UInt32) -> UnsafeMutablePointer<Atomic<UInt64>> {
        (nodes.base + Int(node) * PageSize.base).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    @inline(__always) func lock(_ node: UInt32) -> SpinLockWord {
        SpinLockWord((lockWords.base + Int(node) * 4).assumingMemoryBound(to: Atomic<UInt32>.self))
    }
}

/// Index helpers for 4-level paging with 48-bit user addresses.
enum PageTableIndex {
    static let userTop: UInt64 = 1 << 47
    @inline(__always) static func pgd(_ a: UInt64) -> Int { Int((a >> 39) & 511) }
    @inline(__always) static func pud(_ a: UInt64) -> Int { Int((a >> 30) & 511) }
    @inline(__always) static func pmd(_ a: UInt64) -> Int { Int((a >> 21) & 511) }
    @inline(__always) static func pte(_ a: UInt64) -> Int { Int((a >> 12) & 511) }
}
