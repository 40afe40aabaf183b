import Synchronization

/// An in-memory file with a page cache, like a tmpfs `O_TMPFILE` (`mm/shmem.c`). It can be read and
/// written at an offset (`pread`/`pwrite`) and mapped shared or private. Shared anonymous mappings are
/// backed by an internal one, as the kernel backs them with shmem.
///
/// Thread-safe: the page cache is guarded by one lock, which `read`/`write` hold while copying.
/// The page cache holds one reference on each cached page; pages return to the machine when the file
/// is deallocated (no mapping and no owner left). The cache is sparse, as the kernel's xarray is: a file
/// costs memory for the pages it caches, not for its size.
public final class MemoryFile: @unchecked Sendable {
    public let machine: Machine
    private(set) var handle: UInt64 = 0
    /// Backing of a `MAP_SHARED | MAP_ANONYMOUS` mapping (never migrated by `migrate_vma`).
    let isShmem: Bool
    private struct Cache {
        var size: Int
        /// Page index → PFN (`i_pages`).
        let pages = SparsePageIndex()
    }
    private let cache: Locked<Cache>
    private let mappers = SpaceSet()

    init(machine: Machine, size: Int, shmem: Bool) {
        self.machine = machine
        self.isShmem = shmem
        cache = Locked(Cache(size: size))
        handle = machine.registry.register(self, anon: false)
    }

    deinit {
        machine.registry.unregister(handle)
        let pages = cache.withLock { $0.pages }
        pages.forEach { _, p in
            machine.frames.clearFlags(PFN(p), .pageCache)
            machine.putFolio(PFN(p))
        }
    }

    /// The file size in bytes.
    public var size: Int { cache.withLock { $0.size } }

    /// Pages currently in the page cache.
    public var cachedPages: Int { cache.withLock { $0.pages.count } }

    /// `pwrite`: writes `bytes` at `offset`, extending the file if needed.
    /// - Returns: the number of bytes written (all of them).
    /// - Throws: `.invalidArgument` for a negative offset or one whose write would end past the 1 TiB
    ///   file-size limit (nothing is written); `.outOfMemory` if RAM runs out
    ///   (bytes before the failing page stay written, as a short write would leave them).
    @discardableResult
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(HMMError) -> Int {
        guard offset >= 0, offset <= (1 << 40) - bytes.count else {
            throw .invalid("pwrite offset \(offset) with \(bytes.count) bytes is out of range")
        }
        return try cache.withLock { (c: inout Cache) -> Result<Int, HMMError> in
            var done = 0
            while done < bytes.count {
                let pos = offset + done
                let index = pos >> PageSize.shift
                let inPage = pos & (PageSize.base - 1)
                let n = min(bytes.count - done, PageSize.base - inPage)
                let pfn: PFN
                do throws(HMMError) { pfn = try lookupOrCreate(&c, index) } catch { return .failure(error) }
                (machine.pointer(pfn) + inPage).copyMemory(from: bytes.baseAddress! + done, byteCount: n)
                machine.frames.setFlags(pfn, .dirty)
                done += n
                c.size = max(c.size, pos + n)
            }
            return .success(done)
        }.get()
    }

    /// `pwrite` of an array.
    @discardableResult
    public func write(_ bytes: [UInt8], at offset: Int) throws(HMMError) -> Int {
        try bytes.withUnsafeBytes { b in Result { () throws(HMMError) -> Int in try write(b, at: offset) } }.get()
    }

    /// `pread`: reads up to `buffer.count` bytes at `offset`; holes read as zero; stops at end of file.
    /// - Returns: the number of bytes read (0 at or past end of file).
    /// - Throws: `.invalidArgument` for a negative offset.
    @discardableResult
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(HMMError) -> Int {
        guard offset >= 0 else { throw .invalid("pread offset \(offset) is negative") }
        return cache.withLock { c in
            let total = max(0, min(buffer.count, c.size - offset))
            var done = 0
            while done < total {
                let pos = offset + done
                let index = pos >> PageSize.shift
                let inPage = pos & (PageSize.base - 1)
                let n = min(total - done, PageSize.base - inPage)
                if let pfn = c.pages[UInt64(index)] {
                    (buffer.baseAddress! + done).copyMemory(from: machine.pointer(PFN(pfn)) + inPage, byteCount: n)
                } else {
                    (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: n)
                }
                done += n
            }
            return total
        }
    }

    /// The page-cache page at `index` with one extra reference for the caller (`filemap_fault`),
    /// created zero-filled if absent. Returns nil past end of file.
    func getPage(_ index: UInt64) throws(HMMError) -> PFN? {
        try cache.withLock { (c: inout Cache) -> Result<PFN?, HMMError> in
            guard index < UInt64((c.size + PageSize.base - 1) >> PageSize.shift) else { return .success(nil) }
            do throws(HMMError) {
                let pfn = try lookupOrCreate(&c, Int(index))
                machine.getFolio(pfn)
                return .success(pfn)
            } catch {
                return .failure(error)
            }
        }.get()
    }

    /// Every cached page, in file order (for the invariant checker).
    var cachedPFNs: [PFN] {
        cache.withLock { c in
            var out: [PFN] = []
            out.reserveCapacity(c.pages.count)
            c.pages.forEach { _, pfn in out.append(PFN(pfn)) }
            return out
        }
    }

    private func lookupOrCreate(_ c: inout Cache, _ index: Int) throws(HMMError) -> PFN {
        if let pfn = c.pages[UInt64(index)] { return PFN(pfn) }
        guard let pfn = machine.allocateFolio(order: 0, zeroed: true) else {
            throw HMMError(.outOfMemory, "no free frame for page \(index) of a file")
        }
        machine.frames.setFlags(pfn, .pageCache)
        machine.frames.record(pfn).pointee.mapping.store(handle, ordering: .relaxed)
        machine.frames.record(pfn).pointee.index.store(UInt64(index), ordering: .relaxed)
        c.pages[UInt64(index)] = pfn.rawValue
        return pfn
    }

    /// Sets the size under the cache lock (`i_size_write`); returns the old size.
    func setSize(_ size: Int) -> Int {
        cache.withLock { c in
            let old = c.size
            c.size = size
            return old
        }
    }

    /// `truncate_inode_pages_range` from byte `size` on: drops every cached page wholly past it and
    /// zeroes the tail of the page it ends in, so a later extension reads zeros there. A dropped page
    /// still referenced elsewhere (a pin) is freed when that reference goes.
    func truncatePages(from size: Int) {
        let first = UInt64((size + PageSize.base - 1) >> PageSize.shift)
        cache.withLock { c in
            var dropped: [UInt64] = []
            c.pages.forEach { index, _ in if index >= first { dropped.append(index) } }
            for index in dropped {
                guard let p = c.pages[index] else { continue }
                c.pages[index] = nil
                machine.frames.clearFlags(PFN(p), .pageCache)
                machine.putFolio(PFN(p))
            }
            let inPage = size & (PageSize.base - 1)
            if inPage != 0, let p = c.pages[UInt64(size >> PageSize.shift)] {
                (machine.pointer(PFN(p)) + inPage).initializeMemory(as: UInt8.self, repeating: 0,
                                                                    count: PageSize.base - inPage)
            }
        }
    }

    func addMapper(_ space: AddressSpace) { mappers.insert(space) }

    var mappingSpaces: [AddressSpace] { mappers.spaces }
}
