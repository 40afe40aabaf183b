import Testing
@testable import HMM

@Suite("Files, GUP, reverse map and pagemap")
struct FileGUPRmapTests {
    @Test("a shared file mapping and pread/pwrite see the same page cache")
    func sharedFile() throws {
        try withMachine { m in
            let f = try m.makeFile(size: 4 * Int(page))
            let ints = (0..<(4 * Int(page) / 4)).map { Int32($0) }
            let bytes = ints.withUnsafeBytes { Array($0) }
            #expect(try f.write(bytes, at: 0) == bytes.count)
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.shared], file: f)
            #expect(try s.load(Int32.self, at: p + 4 * 1000) == 1000)
            try s.store(Int32(-5), at: p + 8)
            var out = [UInt8](repeating: 0, count: 4)
            #expect(try out.withUnsafeMutableBytes { try f.read(into: $0, at: 8) } == 4)
            #expect(out.withUnsafeBytes { $0.load(as: Int32.self) } == -5)
            #expect(try s.pagemap(at: p).fileOrSharedAnon)
            #expect(f.cachedPages == 4)
            s.exit()
        }
    }

    @Test("access past the end of a mapped file raises SIGBUS")
    func pastEOF() throws {
        try withMachine { m in
            let f = try m.makeFile(size: Int(page))
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 2 * Int(page), protection: [.read], flags: [.shared], file: f)
            #expect(try s.load(UInt8.self, at: p) == 0)
            expectError(.bus) { _ = try s.load(UInt8.self, at: p + page) }
            s.exit()
        }
    }

    @Test("a private file mapping copies on write and leaves the file alone")
    func privateFile() throws {
        try withMachine { m in
            let f = try m.makeFile(size: 2 * Int(page))
            try f.write([1, 2, 3, 4], at: 0)
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 2 * Int(page), protection: [.read, .write], flags: [.private], file: f)
            #expect(try s.load(UInt8.self, at: p + 2) == 3)
            #expect(try s.pagemap(at: p).fileOrSharedAnon)
            try s.store(UInt8(99), at: p + 2)
            #expect(try !s.pagemap(at: p).fileOrSharedAnon, "now an anonymous copy")
            var out = [UInt8](repeating: 0, count: 4)
            _ = try out.withUnsafeMutableBytes { try f.read(into: $0, at: 0) }
            #expect(out == [1, 2, 3, 4])
            #expect(try s.read(count: 4, at: p) == [1, 2, 99, 4])
            s.exit()
        }
    }

    @Test("GUP faults pages in, counts references, and pins with the bias")
    func gup() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            let got = try s.getUserPages(p, count: 4, flags: [.write])
            #expect(got.pfns.count == 4)
            #expect(m.refcount(got.pfns[0]) == 2)
            let pinned = try s.getUserPages(p, count: 1, flags: [.write, .pin, .longTerm])
            #expect(m.refcount(pinned.pfns[0]) == 2 + Machine.pinBias)
            #expect(m.maybeDMAPinned(pinned.pfns[0]))
            try m.checkInvariants()
            got.release()
            pinned.release()
            pinned.release()
            #expect(m.refcount(got.pfns[0]) == 1)
            expectError(.fault) { try s.getUserPages(p + 8 * page, count: 1, flags: []) }
            try s.protect(p, length: Int(page), [.read])
            expectError(.fault) { try s.getUserPages(p, count: 1, flags: [.write]) }
            expectError(.invalidArgument) { try s.getUserPages(p, count: 1, flags: [.longTerm]) }
            s.exit()
        }
    }

    @Test("a read-only pin of a page shared after fork unshares it first")
    func pinUnshares() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt8(4), at: p)
            let child = try s.fork()
            let shared = try s.pagemap(at: p).pfn!
            let pin = try s.getUserPages(p, count: 1, flags: [.pin])
            #expect(pin.pfns[0] != shared)
            #expect(try s.pagemap(at: p).pfn == pin.pfns[0])
            #expect(try child.pagemap(at: p).pfn == shared)
            #expect(m.statistics[.faultUnshare] == 1)
            try pin.withBytes(ofPage: 0) { #expect($0[0] == 4) }
            try m.checkInvariants()
            pin.release()
            child.exit()
            s.exit()
        }
    }

    @Test("the reverse map finds every mapping across fork and mremap")
    func reverseMap() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt8(1), at: p + page)
            let pfn = try s.pagemap(at: p + page).pfn!
            #expect(m.reverseMap(pfn).map { $0.address } == [p + page])
            let child = try s.fork()
            let q = try child.remap(p, length: 4 * Int(page), newLength: 4 * Int(page), flags: [.mayMove, .fixed],
                                    to: p + 64 * page)
            let found = Set(m.reverseMap(pfn).map { "\($0.space.id)@\($0.address)" })
            #expect(found == ["\(s.id)@\(p + page)", "\(child.id)@\(q + page)"])
            try s.unmap(p, length: 4 * Int(page))
            #expect(m.reverseMap(pfn).map { $0.space.id } == [child.id])
            // File pages too.
            let f = try m.makeFile(size: Int(page))
            let a = try s.map(length: Int(page), protection: [.read], flags: [.shared], file: f)
            let b = try child.map(length: Int(page), protection: [.read], flags: [.private], file: f)
            _ = try s.load(UInt8.self, at: a)
            _ = try child.load(UInt8.self, at: b)
            let fp = try s.pagemap(at: a).pfn!
            #expect(Set(m.reverseMap(fp).map { $0.address }) == [a, b])
            // A THP reports its PMD mapping for each subpage.
            let raw = try s.map(length: 4 << 20, protection: [.read, .write], flags: [.private, .anonymous])
            let h = (raw + pmdSize - 1) & ~(pmdSize - 1)
            try s.advise(h, length: PageSize.pmd, .hugePage)
            try s.store(UInt8(1), at: h)
            let sub = try s.pagemap(at: h + 7 * page).pfn!
            #expect(m.reverseMap(sub).map { $0.level } == [.pmd])
            #expect(m.reverseMap(sub).map { $0.address } == [h + 7 * page])
            child.exit()
            s.exit()
        }
    }
}
