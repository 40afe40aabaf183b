import Testing
@testable import HMM

/// Every public entry point rejects bad input with a typed error and leaves the machine unchanged.
@Suite("Bad input")
struct BadInputTests {
    @Test("machine and file construction")
    func construction() throws {
        expectError(.invalidArgument) { try Machine(.init(systemMemory: 3 << 20)) }
        expectError(.invalidArgument) { try Machine(.init(systemMemory: (8 << 20) + 4096)) }
        expectError(.invalidArgument) { try Machine(.init(systemMemory: 8 << 20, hugetlbPages: 4)) }
        expectError(.invalidArgument) { try Machine(.init(systemMemory: 8 << 20, hugetlbPages: -1)) }
        expectError(.invalidArgument) { try Machine(.init(pageTableNodes: 2)) }
        try withMachine { m in
            expectError(.invalidArgument) { try m.makeFile(size: -1) }
            let f = try m.makeFile(size: 10)
            expectError(.invalidArgument) { try f.write([1], at: -1) }
            expectError(.invalidArgument) { try f.write([1], at: Int.max) }
            var b = [UInt8](repeating: 0, count: 4)
            expectError(.invalidArgument) { try b.withUnsafeMutableBytes { try f.read(into: $0, at: -5) } }
            #expect(try b.withUnsafeMutableBytes { try f.read(into: $0, at: 100) } == 0)
            expectError(.invalidArgument) {
                try b.withUnsafeMutableBytes { try m.readFrame(PFN(UInt64(m.totalFrames)), into: $0) }
            }
        }
    }

    @Test("every address-space call, with state unchanged afterwards")
    func addressSpaceCalls() throws {
        try withMachine(.init(systemMemory: 64 << 20, hugetlbPages: 1)) { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 8 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.write([UInt8](repeating: 1, count: 8 * Int(page)), at: p)
            let h = try s.map(length: PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous, .hugetlb])
            let f = try m.makeFile(size: Int(page))
            let rw: Protection = [.read, .write]
            let anon: MapFlags = [.private, .anonymous]
            let before = (s.mappings, m.freeFrames, m.freeHugetlbPages, m.hugetlb.reservedPages)
            func unchanged(_ line: Int = #line) {
                #expect(s.mappings == before.0, "mappings changed (line \(line))")
                #expect(m.freeFrames == before.1 && m.freeHugetlbPages == before.2 && m.hugetlb.reservedPages == before.3,
                        "memory changed (line \(line))")
            }

            // map
            expectError(.invalidArgument) { try s.map(length: 0, protection: rw, flags: anon) }
            expectError(.invalidArgument) { try s.map(length: -4096, protection: rw, flags: anon) }
            expectError(.invalidArgument) { try s.map(length: 4096, protection: rw, flags: [.anonymous]) }
            expectError(.invalidArgument) { try s.map(length: 4096, protection: rw, flags: [.shared, .private, .anonymous]) }
            expectError(.invalidArgument) { try s.map(length: 4096, protection: rw, flags: [.private]) }
            expectError(.invalidArgument) { try s.map(length: 4096, protection: rw, flags: anon, file: f) }
            expectError(.invalidArgument) { try s.map(length: 4096, protection: Protection(rawValue: 8), flags: anon) }
            expectError(.invalidArgument) { try s.map(at: p + 1, length: 4096, protection: rw, flags: anon.union(.fixed)) }
            expectError(.outOfMemory) { try s.map(at: 1 << 47, length: 4096, protection: rw, flags: anon.union(.fixed)) }
            expectError(.outOfMemory) { try s.map(length: Int.max, protection: rw, flags: anon) }
            expectError(.invalidArgument) { try s.map(length: 4096, protection: rw, flags: [.shared], file: f, offset: 100) }
            expectError(.invalidArgument) { try s.map(length: 4096, protection: rw, flags: [.shared, .hugetlb], file: f) }
            expectError(.unsupported) { try s.map(length: PageSize.pmd, protection: rw, flags: [.shared, .anonymous, .hugetlb]) }
            expectError(.outOfMemory) { try s.map(length: PageSize.pmd, protection: rw, flags: anon.union(.hugetlb)) }
            unchanged()

            // unmap
            expectError(.invalidArgument) { try s.unmap(p + 1, length: 4096) }
            expectError(.invalidArgument) { try s.unmap(p, length: 0) }
            expectError(.invalidArgument) { try s.unmap(p, length: -1) }
            expectError(.invalidArgument) { try s.unmap(UInt64.max & ~4095, length: 8192) }
            expectError(.invalidArgument) { try s.unmap(h + page, length: Int(page)) }
            unchanged()

            // protect
            expectError(.invalidArgument) { try s.protect(p + 3, length: 4096, [.read]) }
            expectError(.invalidArgument) { try s.protect(p, length: 0, [.read]) }
            expectError(.invalidArgument) { try s.protect(p, length: 4096, Protection(rawValue: 0x80)) }
            expectError(.outOfMemory) { try s.protect(p, length: 64 * Int(page), [.read]) }
            expectError(.invalidArgument) { try s.protect(h, length: Int(page), [.read]) }
            unchanged()

            // remap
            expectError(.invalidArgument) { try s.remap(p, length: 4096, newLength: 4096, flags: .fixed, to: p + 100 * page) }
            expectError(.invalidArgument) { try s.remap(p, length: 4096, newLength: 8192, flags: [.mayMove, .dontUnmap]) }
            expectError(.invalidArgument) { try s.remap(p, length: 4096, newLength: 4096, flags: .mayMove, to: p + 100 * page) }
            expectError(.invalidArgument) { try s.remap(p + 5, length: 4096, newLength: 4096) }
            expectError(.invalidArgument) { try s.remap(p, length: 4096, newLength: 0) }
            expectError(.fault) { try s.remap(p + 100 * page, length: 4096, newLength: 4096, flags: .mayMove) }
            expectError(.fault) { try s.remap(p, length: 16 * Int(page), newLength: 16 * Int(page), flags: .mayMove) }
            expectError(.invalidArgument) { try s.remap(h, length: PageSize.pmd, newLength: 2 * PageSize.pmd, flags: .mayMove) }
            expectError(.invalidArgument) { try s.remap(p, length: 4096, newLength: 4096, flags: RemapFlags(rawValue: 64)) }
            unchanged()

            // advise
            expectError(.invalidArgument) { try s.advise(p + 1, length: 4096, .dontNeed) }
            expectError(.invalidArgument) { try s.advise(p, length: 0, .hugePage) }
            expectError(.invalidArgument) { try s.advise(h + page, length: Int(page), .dontNeed) }
            try s.advise(h, length: Int(page), .dontNeed)  // rounds down to no huge page: a no-op (Linux >= 6.1)
            let shared = try m.makeAddressSpace()
            let sp = try shared.map(length: 4096, protection: rw, flags: [.shared, .anonymous])
            expectError(.invalidArgument) { try shared.advise(sp, length: 4096, .free) }
            expectError(.invalidArgument) { try shared.advise(sp, length: 4096, .collapse) }
            shared.exit()
            unchanged()

            // GUP and CPU access
            expectError(.invalidArgument) { try s.getUserPages(p + 1, count: 1, flags: []) }
            expectError(.invalidArgument) { try s.getUserPages(p, count: 0, flags: []) }
            expectError(.invalidArgument) { try s.getUserPages(UInt64.max & ~4095, count: 2, flags: []) }
            expectError(.invalidArgument) { try s.getUserPages(p, count: 1, flags: .longTerm) }
            expectError(.fault) { try s.getUserPages(p + 6 * page, count: 4, flags: []) }
            expectError(.segmentationFault) { _ = try s.load(UInt8.self, at: 0) }
            expectError(.segmentationFault) { try s.store(UInt8(0), at: UInt64.max - 1) }
            expectError(.invalidArgument) { _ = try s.read(count: -1, at: p) }
            let gup = try s.getUserPages(p, count: 1, flags: [])
            expectError(.invalidArgument) { try gup.withBytes(ofPage: 1) { _ in } }
            gup.release()
            expectError(.invalidArgument) { try gup.withBytes(ofPage: 0) { _ in } }
            unchanged()

            // use after exit
            let child = try s.fork()
            child.exit()
            expectError(.noProcess) { try child.map(length: 4096, protection: rw, flags: anon) }
            expectError(.noProcess) { try child.unmap(p, length: 4096) }
            expectError(.noProcess) { try child.protect(p, length: 4096, [.read]) }
            expectError(.noProcess) { try child.remap(p, length: 4096, newLength: 8192, flags: .mayMove) }
            expectError(.noProcess) { try child.advise(p, length: 4096, .dontNeed) }
            expectError(.noProcess) { try child.fork() }
            expectError(.noProcess) { try child.getUserPages(p, count: 1, flags: []) }
            expectError(.noProcess) { _ = try child.load(UInt8.self, at: p) }
            expectError(.noProcess) { try child.pagemap(at: p) }
            child.exit()
            unchanged()
            #expect(try s.read(count: 8 * Int(page), at: p).allSatisfy { $0 == 1 })
            s.exit()
        }
    }
}
