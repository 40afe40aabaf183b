import Synchronization

/// The pool page-table nodes come from: 512-entry arrays of `Atomic<UInt64>`, one spin-lock word per
/// node (the split page-table lock of a PTE table, or the PMD lock of a PMD table).
///
/// Nodes are only freed under the owning address space's `mmapLock` held for writing, so a walker
/// holding it for reading may follow table entries without further locking.
final class PageTablePool: @unchecked Sendable {
    static let entriesPerNode = 512
    private let nodes: Arena
    private let lockWords: Arena
    let capacity: Int
    private let freeList: Locked<(stack: [UInt32], highWater: UInt32, deposited: Int)>
    private let used = Atomic<Int>(0)

    init(capacity: Int) throws(HMMError) {
        self.capacity = capacity
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
        let node: UInt32? = freeList.withLock { f in
            guard used.load(ordering: .relaxed) + f.deposited < capacity - 1 else { return nil }
            if let n = f.stack.popLast() { return n }
            guard Int(f.highWater) < capacity else { return nil }
            defer { f.highWater += 1 }
            return f.highWater
        }
        guard let node else { throw HMMError(.outOfMemory, "page-table node pool exhausted") }
        used.wrappingAdd(1, ordering: .relaxed)
        return node
    }

    /// Sets one node aside for a future split of a huge PMD mapping (`pgtable_trans_huge_deposit`), so
    /// that splitting — which partial unmap must do — can never fail. False when the pool is exhausted.
    func deposit() -> Bool {
        freeList.withLock { f in
            guard used.load(ordering: .relaxed) + f.deposited < capacity - 1 else { return false }
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

    /// Returns a node; its entries must all be none.
    func free(_ node: UInt32) {
        let e = entries(node)
        for i in 0..<Self.entriesPerNode {
            precondition(e[i].load(ordering: .relaxed) == 0, "freeing page-table node \(node) with live entry \(i)")
        }
        used.wrappingSubtract(1, ordering: .relaxed)
        freeList.withLock { $0.stack.append(node) }
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
