/// A sparse map from page numbers to 63-bit values — the kernel's `xarray` as the page cache
/// (`i_pages`) and drivers (`dmirror`'s page table) use it. Stored as 512-entry leaves (one per 2 MiB of
/// pages) found through a dictionary, with the last leaf cached, so sequential walks cost one hash lookup
/// per 512 pages; memory follows the entries stored, never the width of the index space. Not
/// thread-safe: its owner's lock guards it.
public final class SparsePageIndex {
    private static let leafShift: UInt64 = 9
    private static let leafSize = 1 << 9
    /// Marks an occupied slot (entries may legitimately be 0).
    private static let present: UInt64 = 1 << 63

    private var leaves: [UInt64: UnsafeMutablePointer<UInt64>] = [:]
    private var lastKey = UInt64.max
    private var lastLeaf: UnsafeMutablePointer<UInt64>?
    /// Entries stored.
    public private(set) var count = 0

    public init() {}

    deinit { removeAll() }

    @inline(__always) private func leaf(_ vpfn: UInt64, create: Bool) -> UnsafeMutablePointer<UInt64>? {
        let key = vpfn >> Self.leafShift
        if key == lastKey { return lastLeaf }
        var l = leaves[key]
        if l == nil {
            guard create else { return nil }
            let new = UnsafeMutablePointer<UInt64>.allocate(capacity: Self.leafSize)
            new.initialize(repeating: 0, count: Self.leafSize)
            leaves[key] = new
            l = new
        }
        lastKey = key
        lastLeaf = l
        return l
    }

    /// The entry for `vpfn`, nil if none. Values must fit in 63 bits.
    public subscript(vpfn: UInt64) -> UInt64? {
        get {
            guard let l = leaf(vpfn, create: false) else { return nil }
            let v = l[Int(vpfn & UInt64(Self.leafSize - 1))]
            return v & Self.present != 0 ? v & ~Self.present : nil
        }
        set {
            if let newValue {
                let l = leaf(vpfn, create: true)!
                let slot = l + Int(vpfn & UInt64(Self.leafSize - 1))
                if slot.pointee & Self.present == 0 { count += 1 }
                slot.pointee = newValue | Self.present
            } else {
                guard let l = leaf(vpfn, create: false) else { return }
                let slot = l + Int(vpfn & UInt64(Self.leafSize - 1))
                if slot.pointee & Self.present != 0 { count -= 1 }
                slot.pointee = 0
            }
        }
    }

    /// Removes every entry with `first <= vpfn <= last`.
    public func removeAll(from first: UInt64, through last: UInt64) {
        forEachLeaf(from: first, through: last) { l, lo, hi in
            for i in lo...hi where l[i] & Self.present != 0 {
                l[i] = 0
                count -= 1
            }
            return false
        }
    }

    /// Whether some entry with `first <= vpfn <= last` satisfies `predicate`. Costs follow the entries
    /// (like `xa_for_each_range`), never the width of the range.
    public func contains(from first: UInt64, through last: UInt64, where predicate: (UInt64) -> Bool) -> Bool {
        var found = false
        forEachLeaf(from: first, through: last) { l, lo, hi in
            for i in lo...hi where l[i] & Self.present != 0 && predicate(l[i] & ~Self.present) {
                found = true
                return true
            }
            return false
        }
        return found
    }

    /// Calls `body(leaf, lo, hi)` for each existing leaf overlapping `[first, last]` with the slot
    /// indices inside it, until `body` returns true. A range wider than the table visits the leaves that
    /// exist instead of every leaf-sized step (exit, a whole-space invalidation, a huge check).
    private func forEachLeaf(
        from first: UInt64, through last: UInt64, _ body: (UnsafeMutablePointer<UInt64>, Int, Int) -> Bool
    ) {
        guard count > 0, first <= last else { return }
        @inline(__always) func visit(_ l: UnsafeMutablePointer<UInt64>, _ base: UInt64) -> Bool {
            let lo = Int(max(first, base) - base)
            let hi = Int(min(last, base + UInt64(Self.leafSize) - 1) - base)
            return body(l, lo, hi)
        }
        if (last - first) >> Self.leafShift > UInt64(leaves.count) {
            for (key, l) in leaves {
                let base = key << Self.leafShift
                guard base + UInt64(Self.leafSize) > first, base <= last else { continue }
                if visit(l, base) { return }
            }
            return
        }
        var v = first
        while v <= last {
            let base = v & ~UInt64(Self.leafSize - 1)
            if let l = leaf(v, create: false), visit(l, base) { return }
            guard base <= UInt64.max - UInt64(Self.leafSize) else { break }
            v = base + UInt64(Self.leafSize)
        }
    }

    /// Calls `body(index, value)` for every entry, in index order (`xa_for_each`).
    public func forEach(_ body: (UInt64, UInt64) -> Void) {
        for key in leaves.keys.sorted() {
            let l = leaves[key]!
            for i in 0..<Self.leafSize where l[i] & Self.present != 0 {
                body(key << Self.leafShift | UInt64(i), l[i] & ~Self.present)
            }
        }
    }

    /// Drops every entry and leaf.
    public func removeAll() {
        for (_, l) in leaves { l.deallocate() }
        leaves.removeAll()
        lastKey = .max
        lastLeaf = nil
        count = 0
    }
}
