import Testing
@testable import HMM

/// The port of `tools/testing/selftests/mm/hugetlb-madvise.c` (NR_HUGE_PAGES = 3): MADV_DONTNEED of
/// private anonymous hugetlb memory, with the free-page counts the upstream test validates. The file
/// cases (MADV_DONTNEED and MADV_REMOVE on hugetlbfs files) need hugetlbfs, which the model does not
/// have.
@Suite("hugetlb-madvise.c")
struct HugetlbMadviseSelftests {
    static let nrHugePages = 3
    let hugePageSize = PageSize.pmd
    let basePageSize = PageSize.base
    let rw: Protection = [.read, .write]
    let flags: MapFlags = [.private, .anonymous, .hugetlb]

    /// `write_fault_pages`.
    func writeFaultPages(_ s: AddressSpace, _ addr: UInt64, _ n: Int) throws {
        for i in 0..<n { try s.store(UInt64(i) &+ 0xdead, at: addr + UInt64(i * hugePageSize)) }
    }

    @Test("MADV_DONTNEED addr and length validity: before or past the mapping fails")
    func dontneedValidity() throws {
        try withMachine(.init(systemMemory: 64 << 20, hugetlbPages: Self.nrHugePages + 2)) { m in
            let free = m.freeHugetlbPages
            let s = try m.makeAddressSpace()
            var addr = try s.map(length: (Self.nrHugePages + 2) * hugePageSize, protection: rw, flags: flags)
            try s.unmap(addr, length: hugePageSize)
            try s.unmap(addr + UInt64((Self.nrHugePages + 1) * hugePageSize), length: hugePageSize)
            addr += UInt64(hugePageSize)
            try writeFaultPages(s, addr, Self.nrHugePages)
            #expect(m.freeHugetlbPages == free - Self.nrHugePages)
            // addr before the mapping
            #expect(throws: HMMError.self) {
                try s.advise(addr - UInt64(basePageSize), length: Self.nrHugePages * hugePageSize, .dontNeed)
            }
            // addr + length after the mapping
            #expect(throws: HMMError.self) {
                try s.advise(addr, length: Self.nrHugePages * hugePageSize + basePageSize, .dontNeed)
            }
            try s.unmap(addr, length: Self.nrHugePages * hugePageSize)
            #expect(m.freeHugetlbPages == free)
            s.exit()
        }
    }

    @Test("MADV_DONTNEED alignment: an unaligned addr fails; addr + length is rounded down to a huge page")
    func dontneedAlignment() throws {
        try withMachine(.init(systemMemory: 64 << 20, hugetlbPages: Self.nrHugePages)) { m in
            let free = m.freeHugetlbPages
            let s = try m.makeAddressSpace()
            let addr = try s.map(length: Self.nrHugePages * hugePageSize, protection: rw, flags: flags)
            try writeFaultPages(s, addr, Self.nrHugePages)
            #expect(m.freeHugetlbPages == free - Self.nrHugePages)
            expectError(.invalidArgument) {
                try s.advise(addr + UInt64(basePageSize), length: Self.nrHugePages * hugePageSize - basePageSize, .dontNeed)
            }
            #expect(m.freeHugetlbPages == free - Self.nrHugePages)
            try s.advise(addr, length: (Self.nrHugePages - 1) * hugePageSize + basePageSize, .dontNeed)
            // should free all but the last page of the mapping
            #expect(m.freeHugetlbPages == free - 1)
            #expect(try s.load(UInt64.self, at: addr + UInt64((Self.nrHugePages - 1) * hugePageSize)) == 2 + 0xdead)
            #expect(try s.load(UInt64.self, at: addr) == 0)
            // A range that rounds down to nothing succeeds and frees nothing.
            try writeFaultPages(s, addr, 1)
            try s.advise(addr, length: basePageSize, .dontNeed)
            #expect(try s.load(UInt64.self, at: addr) == 0xdead)
            try s.unmap(addr, length: Self.nrHugePages * hugePageSize)
            #expect(m.freeHugetlbPages == free)
            s.exit()
        }
    }

    @Test("MADV_DONTNEED on an anonymous private mapping frees every page")
    func dontneedAnonymousPrivate() throws {
        try withMachine(.init(systemMemory: 64 << 20, hugetlbPages: Self.nrHugePages)) { m in
            let free = m.freeHugetlbPages
            let s = try m.makeAddressSpace()
            let addr = try s.map(length: Self.nrHugePages * hugePageSize, protection: rw, flags: flags)
            try writeFaultPages(s, addr, Self.nrHugePages)
            #expect(m.freeHugetlbPages == free - Self.nrHugePages)
            try s.advise(addr, length: Self.nrHugePages * hugePageSize, .dontNeed)
            #expect(m.freeHugetlbPages == free)
            try s.unmap(addr, length: Self.nrHugePages * hugePageSize)
            s.exit()
        }
    }

    @Test("MADV_DONTNEED / MADV_REMOVE on private and shared mappings of a hugetlb file",
          .disabled("needs hugetlbfs files (memfd MFD_HUGETLB) and MADV_REMOVE, which the model does not have"))
    func hugetlbFile() {}
}
