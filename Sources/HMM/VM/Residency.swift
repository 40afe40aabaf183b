extension AddressSpace {
    /// Where each of the `pages` pages from `start` is (a residency snapshot: what `/proc/PID/pagemap`
    /// and the page flags tell, in one word a page). Takes `mmapLock` for reading per page.
    /// - Throws: `.invalidArgument` for a range outside user space or a negative count, `.noProcess`
    ///   after exit.
    public func residency(_ start: UInt64, pages: Int) throws(HMMError) -> [PageResidency] {
        guard pages >= 0, pages <= 1 << 20, start < PageTableIndex.userTop,
            UInt64(pages) << UInt64(PageSize.shift) <= PageTableIndex.userTop - start
        else { throw .invalid("residency of \(pages) pages at \(hex(start)) is outside user space") }
        var out: [PageResidency] = []
        out.reserveCapacity(pages)
        for i in 0..<pages {
            let a = (start & ~PageSize.baseMask) + UInt64(i) << UInt64(PageSize.shift)
            let e = try pagemap(at: a)
            guard let pfn = e.pfn else {
                switch e.kind {
                case .devicePrivateRead, .devicePrivateWrite: out.append(e.level == .pmd ? .devicePrivateHuge : .devicePrivate)
                case .deviceExclusive: out.append(.deviceExclusive)
                case .hwpoison: out.append(.revoked)
                default: out.append(mapping(containing: a) == nil ? .absent : .none)
                }
                continue
            }
            let info = mapping(containing: a)
            switch machine.pagemap(of: pfn)?.kind {
            case .deviceCoherent: out.append(.deviceCoherent)
            case .pciP2PDMA: out.append(.peerMemory)
            default:
                if pfn == machine.zeroPFN { out.append(.zeroPage) }
                else if e.level == .pmd && machine.folioHead(pfn) == machine.hugeZeroPFN { out.append(.hugeZeroPage) }
                else if info?.hugetlb == true { out.append(.hugetlb) }
                else if e.level == .pmd { out.append(.transparentHuge) }
                else if e.fileOrSharedAnon { out.append(.file) }
                else if info?.protection.contains(.write) == false { out.append(.readOnly) }
                else { out.append(e.exclusivelyMapped ? .anonExclusive : .anonShared) }
            }
        }
        return out
    }

    private func mapping(containing a: UInt64) -> MappingInfo? { mappings.first { $0.start <= a && a < $0.end } }
}
