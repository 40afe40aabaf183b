import Testing
@testable import HMM

/// `MADV_POPULATE_READ` / `MADV_POPULATE_WRITE` (`madvise_populate`) and `MAP_FIXED_NOREPLACE`.
@Suite("MADV_POPULATE and MAP_FIXED_NOREPLACE")
struct PopulateTests {
    @Test("POPULATE_READ maps the zero page, POPULATE_WRITE private pages, breaking COW; data unchanged")
    func populateAnonymous() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.advise(p, length: 2 * Int(page), .populateRead)
            #expect(try s.pagemap(at: p).pfn == m.zeroPFN && s.pagemap(at: p + page).pfn == m.zeroPFN)
            #expect(try !s.pagemap(at: p + 2 * page).present)
            try s.store(UInt8(3), at: p + 3 * page)
            let child = try s.fork()
            try s.advise(p, length: 4 * Int(page), .populateWrite)
            for i in 0..<4 {
                let e = try s.pagemap(at: p + UInt64(i) * page)
                #expect(e.present && e.pfn != m.zeroPFN && e.exclusivelyMapped, "page \(i): \(e)")
            }
            #expect(try s.load(UInt8.self, at: p + 3 * page) == 3 && child.load(UInt8.self, at: p + 3 * page) == 3)
            #expect(try s.pagemap(at: p + 3 * page).pfn != child.pagemap(at: p + 3 * page).pfn, "COW broken")
            child.exit()
            s.exit()
        }
    }

    @Test("POPULATE errors: unmapped is ENOMEM, PROT_NONE or a write to read-only memory EINVAL, SIGBUS EFAULT")
    func populateErrors() throws {
        try withMachine(.init(systemMemory: 64 << 20, hugetlbPages: 1)) { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 2 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.unmap(p + page, length: Int(page))
            expectError(.outOfMemory) { try s.advise(p, length: 2 * Int(page), .populateWrite) }
            #expect(try s.pagemap(at: p).present, "what came before the hole stays populated")
            let none = try s.map(length: Int(page), protection: .none, flags: [.private, .anonymous])
            expectError(.invalidArgument) { try s.advise(none, length: Int(page), .populateRead) }
            let ro = try s.map(length: Int(page), protection: [.read], flags: [.private, .anonymous])
            expectError(.invalidArgument) { try s.advise(ro, length: Int(page), .populateWrite) }
            try s.advise(ro, length: Int(page), .populateRead)
            let file = try m.makeFile(size: Int(page))
            let f = try s.map(length: 2 * Int(page), protection: [.read], flags: [.shared], file: file)
            expectError(.fault) { try s.advise(f, length: 2 * Int(page), .populateRead) }
            let h1 = try s.map(length: PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous, .hugetlb])
            try s.advise(h1, length: PageSize.pmd, .populateWrite)
            #expect(m.freeHugetlbPages == 0)
            let child = try s.fork()
            // The child's COW copy needs a second huge page: SIGBUS on access, EFAULT here.
            expectError(.fault) { try child.advise(h1, length: PageSize.pmd, .populateWrite) }
            child.exit()
            s.exit()
        }
    }

    @Test("MAP_FIXED_NOREPLACE maps a free range exactly and refuses an occupied one with EEXIST, changing nothing")
    func fixedNoReplace() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt8(9), at: p + page)
            try s.unmap(p + 2 * page, length: 2 * Int(page))
            let before = s.mappings
            expectError(.exists) {
                try s.map(at: p + page, length: 2 * Int(page), protection: [.read], flags: [.private, .anonymous, .fixedNoReplace])
            }
            #expect(s.mappings == before)
            #expect(try s.load(UInt8.self, at: p + page) == 9)
            let q = try s.map(at: p + 2 * page, length: 2 * Int(page), protection: [.read],
                              flags: [.private, .anonymous, .fixedNoReplace])
            #expect(q == p + 2 * page)
            expectError(.invalidArgument) {
                try s.map(at: p + 5, length: Int(page), protection: [.read], flags: [.private, .anonymous, .fixedNoReplace])
            }
            #expect(HMMError(.exists, "").errno == 17)
            s.exit()
        }
    }
}
