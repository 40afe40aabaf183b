/// `ftruncate` (`mm/truncate.c`): changing a file's size under its mappings.
extension MemoryFile {
    /// Sets the file's size (`ftruncate`). Growing adds a hole that reads as zero. Shrinking first
    /// publishes the new size — so a fault past it raises SIGBUS (`.bus`) from then on — then unmaps
    /// every page past the new end from every mapping of the file, shared pages and private
    /// copy-on-write copies alike (`unmap_mapping_range` with `even_cows`), drops those pages from the
    /// page cache and zeroes the rest of the page the file now ends in (`truncate_pagecache`).
    /// - Throws: `.invalidArgument` for a negative size or one over the 1 TiB file-size limit; nothing
    ///   changes then.
    /// Takes each mapping space's `mmapLock` for writing in turn, then the page-cache lock; call it
    /// with none of them held.
    public func truncate(to size: Int) throws(HMMError) {
        guard size >= 0, size <= 1 << 40 else { throw .invalid("ftruncate size \(size) is out of range") }
        let old = setSize(size)
        guard size < old else { return }
        let first = UInt64((size + PageSize.base - 1) >> PageSize.shift)
        for space in mappingSpaces where !space.hasExited {
            space.unmapMappingRange(of: self, fromIndex: first)
        }
        truncatePages(from: size)
    }
}

extension AddressSpace {
    /// `unmap_mapping_range` in this space: zaps every entry of every VMA of `file` at file page `first`
    /// and beyond, private copies included. Takes `mmapLock` for writing.
    func unmapMappingRange(of file: MemoryFile, fromIndex first: UInt64) {
        mmapLock.writeLock()
        defer { mmapLock.unlock() }
        guard !hasExited else { return }
        for v in vmas where v.file === file {
            let lo: UInt64
            if first <= v.pgoff {
                lo = v.start
            } else {
                guard first - v.pgoff < v.length >> UInt64(PageSize.shift) else { continue }
                lo = v.start + (first - v.pgoff) << UInt64(PageSize.shift)
            }
            invalidating(lo, v.end, .clear) { zapVMA(v, lo, v.end) }
        }
    }
}
