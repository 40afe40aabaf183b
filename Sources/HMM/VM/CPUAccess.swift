/// The software MMU: every CPU load and store walks the page table, takes the page-table lock of the
/// entry it uses (which stands in for the TLB: once a collector has cleared an entry under that lock
/// and released it, no access through the old entry is still in flight), sets young/dirty bits, copies
/// the bytes, and on anything the entry does not allow calls ``handleFault`` and retries.
extension AddressSpace {
    /// Loads a value at `address` (any alignment, may cross pages).
    /// - Throws: `.segmentationFault` (no mapping, no access), `.bus`, `.outOfMemory` (a fault failing
    ///   with it twice in a row: the first is retried, as `pagefault_out_of_memory` retries), `.noProcess`.
    /// Takes `mmapLock` for reading.
    @inlinable
    public func load<T: BitwiseCopyable>(_ type: T.Type = T.self, at address: UInt64) throws(HMMError) -> T {
        var storage: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
        guard MemoryLayout<T>.size <= MemoryLayout.size(ofValue: storage) else {
            throw HMMError(.invalidArgument, "load of \(MemoryLayout<T>.size) bytes; use read(into:at:)")
        }
        try withUnsafeMutableBytes(of: &storage) { (b: UnsafeMutableRawBufferPointer) throws(HMMError) in
            try read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<MemoryLayout<T>.size]), at: address)
        }
        return withUnsafeBytes(of: &storage) { $0.loadUnaligned(as: T.self) }
    }

    /// Stores a value at `address` (any alignment, may cross pages).
    /// - Throws: `.segmentationFault` (no mapping, read-only, `PROT_NONE`) with nothing written,
    ///   `.bus`, `.outOfMemory`, `.noProcess`.
    /// Takes `mmapLock` for reading.
    @inlinable
    public func store<T: BitwiseCopyable>(_ value: T, at address: UInt64) throws(HMMError) {
        var v = value
        try withUnsafeBytes(of: &v) { (b: UnsafeRawBufferPointer) throws(HMMError) in try write(b, at: address) }
    }

    /// Copies `buffer.count` bytes from `address` into `buffer`, faulting pages in as needed.
    /// - Throws: as ``load(_:at:)``; bytes before the failing page are already copied.
    /// Takes `mmapLock` for reading.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at address: UInt64) throws(HMMError) {
        guard buffer.count > 0 else { return }
        guard let base = buffer.baseAddress else { throw .invalid("read into a buffer without storage") }
        try access(address, buffer.count, write: false) { page, offset, n in
            (base + offset).copyMemory(from: page, byteCount: n)
        }
    }

    /// Copies `bytes` to `address`, faulting pages in (and breaking copy-on-write) as needed.
    /// - Throws: as ``store(_:at:)``. The access is checked page by page: bytes before the failing page
    ///   are written, nothing from the failing page on.
    /// Takes `mmapLock` for reading.
    public func write(_ bytes: UnsafeRawBufferPointer, at address: UInt64) throws(HMMError) {
        guard bytes.count > 0 else { return }
        guard let base = bytes.baseAddress else { throw .invalid("write from a buffer without storage") }
        try access(address, bytes.count, write: true) { page, offset, n in
            page.copyMemory(from: base + offset, byteCount: n)
        }
    }

    /// Writes an array of bytes at `address`.
    public func write(_ bytes: [UInt8], at address: UInt64) throws(HMMError) {
        try bytes.withUnsafeBytes { b in Result { () throws(HMMError) in try write(b, at: address) } }.get()
    }

    /// Reads `count` bytes at `address` into a new array.
    public func read(count: Int, at address: UInt64) throws(HMMError) -> [UInt8] {
        guard count >= 0 else { throw .invalid("negative read count \(count)") }
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { b in Result { () throws(HMMError) in try read(into: b, at: address) } }.get()
        return out
    }

    /// Runs `body(hostPointer, offsetInRequest, byteCount)` over `[address, address + length)`, one
    /// page-table lock at a time.
    @usableFromInline
    func access(
        _ address: UInt64, _ length: Int, write: Bool,
        _ body: (UnsafeMutableRawPointer, Int, Int) -> Void
    ) throws(HMMError) {
        guard address < PageTableIndex.userTop, UInt64(length) <= PageTableIndex.userTop - address else {
            throw HMMError(.segmentationFault, "access \(hex(address))+\(length) outside user space")
        }
        mmapLock.readLock()
        defer { mmapLock.unlock() }
        try checkAlive()
        var done = 0
        var retriedOOM = false
        while done < length {
            let a = address + UInt64(done)
            let base = done
            let n = try accessChunk(a, length - done, write) { p, chunkOffset, c in body(p, base + chunkOffset, c) }
            if n == 0 {
                do {
                    try handleFault(a, write ? .write : .read)
                } catch where error.code == .outOfMemory && !retriedOOM {
                    // `pagefault_out_of_memory`: a VM_FAULT_OOM reaching a user access retries the
                    // fault (a driver's transient failure clears); a second one in a row is reported.
                    retriedOOM = true
                }
            } else {
                retriedOOM = false
            }
            done += n
        }
    }

    /// Accesses as much as one locked table allows; 0 if the first page needs a fault.
    @inline(__always)
    private func accessChunk(
        _ a: UInt64, _ remaining: Int, _ write: Bool, _ body: (UnsafeMutableRawPointer, Int, Int) -> Void
    ) throws(HMMError) -> Int {
        let pmdN = try pmdNode(a, allocate: false)
        guard pmdN != 0 else { return 0 }
        let pSlot = pmdSlot(pmdN, a)
        let pmd = PageTableEntry(rawValue: pSlot.pointee.load(ordering: .acquiring))
        if pmd.isTable {
            let lock = pool.lock(pmd.node)
            let ptes = pool.entries(pmd.node)
            var handled = 0
            var i = PageTableIndex.pte(a)
            var inPage = Int(a & PageSize.baseMask)
            lock.lock()
            while handled < remaining && i < 512 {
                let e = PageTableEntry(rawValue: ptes[i].load(ordering: .relaxed))
                guard e.isUser, !write || e.isWritable else { break }
                if !e.isYoung || (write && !e.isDirty) {
                    ptes[i].store(e.young(true).dirty(e.isDirty || write).rawValue, ordering: .relaxed)
                }
                let n = min(remaining - handled, PageSize.base - inPage)
                body(machine.pointer(e.pfn) + inPage, handled, n)
                handled += n
                inPage = 0
                i += 1
            }
            lock.unlock()
            return handled
        }
        guard pmd.isLeaf else { return 0 }
        let lock = pool.lock(pmdN)
        lock.lock()
        defer { lock.unlock() }
        let e = PageTableEntry(rawValue: pSlot.pointee.load(ordering: .relaxed))
        guard e.isLeaf, e.isUser, !write || e.isWritable else { return 0 }
        if !e.isYoung || (write && !e.isDirty) {
            pSlot.pointee.store(e.young(true).dirty(e.isDirty || write).rawValue, ordering: .relaxed)
        }
        let off = Int(a & PageSize.pmdMask)
        let n = min(remaining, PageSize.pmd - off)
        body(machine.pointer(e.pfn) + off, 0, n)
        return n
    }
}
