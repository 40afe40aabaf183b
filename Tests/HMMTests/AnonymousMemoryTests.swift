import Testing
@testable import HMM

@Suite("Anonymous memory")
struct AnonymousMemoryTests {
    @Test("a read of untouched memory maps the zero page; a later write gets a private zero-filled frame")
    func zeroPageThenPrivateFrame() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            #expect(try s.pagemap(at: p).level == nil)
            let v: UInt64 = try s.load(at: p + 8)
            #expect(v == 0)
            let e = try s.pagemap(at: p)
            #expect(e.present && e.pfn == m.zeroPFN && e.level == .pte)
            #expect(m.statistics[.faultAnonZeroPage] == 1)
            try s.store(UInt32(0xDEAD_BEEF), at: p + 16)
            let after = try s.pagemap(at: p)
            #expect(after.present && after.pfn != m.zeroPFN && after.exclusivelyMapped)
            #expect(try s.load(UInt32.self, at: p + 16) == 0xDEAD_BEEF)
            #expect(try s.read(count: 16, at: p) == [UInt8](repeating: 0, count: 16))
            // The zero page itself is untouched.
            var z = [UInt8](repeating: 1, count: PageSize.base)
            try z.withUnsafeMutableBytes { try m.readFrame(m.zeroPFN, into: $0) }
            #expect(z.allSatisfy { $0 == 0 })
            s.exit()
        }
    }

    @Test("exit returns every frame: free frames after == before")
    func exitReturnsEveryFrame() throws {
        try withMachine { m in
            let before = m.freeFrames
            let nodesBefore = m.pageTables.nodesInUse
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 8 << 20, protection: [.read, .write], flags: [.private, .anonymous])
            try s.advise(p, length: 4 << 20, .hugePage)
            for off in stride(from: UInt64(0), to: 8 << 20, by: 4096) { try s.store(UInt8(1), at: p + off) }
            let child = try s.fork()
            try child.store(UInt8(2), at: p)
            #expect(m.freeFrames < before)
            try m.checkInvariants()
            child.exit()
            s.exit()
            #expect(m.freeFrames == before)
            #expect(m.pageTables.nodesInUse == nodesBefore)
            expectError(.noProcess) { try s.store(UInt8(1), at: p) }
        }
    }

    @Test("a frame freed by one space and reused by another reads as zeros")
    func reusedFrameIsZeroed() throws {
        try withMachine(.init(systemMemory: 8 << 20)) { m in
            let a = try m.makeAddressSpace()
            let n = m.freeFrames / 2
            let p = try a.map(length: n * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try a.write([UInt8](repeating: 0xAB, count: n * Int(page)), at: p)
            var used = Set<PFN>()
            for i in 0..<n { used.insert(try a.pagemap(at: p + UInt64(i) * page).pfn!) }
            a.exit()
            let b = try m.makeAddressSpace()
            let q = try b.map(length: n * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            var reused = 0
            for i in 0..<n {
                let addr = q + UInt64(i) * page
                try b.store(UInt8(0), at: addr)
                if used.contains(try b.pagemap(at: addr).pfn!) { reused += 1 }
                #expect(try b.read(count: Int(page), at: addr).allSatisfy { $0 == 0 })
            }
            #expect(reused > 0, "the test must actually reuse frames")
            b.exit()
        }
    }

    @Test("bulk writes and reads cross page boundaries")
    func crossPageAccess() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 3 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            let bytes = (0..<(2 * Int(page) + 100)).map { UInt8(truncatingIfNeeded: $0 * 7) }
            try s.write(bytes, at: p + 50)
            #expect(try s.read(count: bytes.count, at: p + 50) == bytes)
            try s.store(UInt64(0x0102_0304_0506_0708), at: p + page - 4)
            #expect(try s.load(UInt64.self, at: p + page - 4) == 0x0102_0304_0506_0708)
            s.exit()
        }
    }

    @Test("MAP_POPULATE faults every page in at map time")
    func populate() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 16 * Int(page), protection: [.read, .write], flags: [.private, .anonymous, .populate])
            for i in 0..<16 { #expect(try s.pagemap(at: p + UInt64(i) * page).present) }
            #expect(m.statistics[.faultAnonNew] == 16)
            s.exit()
        }
    }

    @Test("madvise(DONTNEED) drops pages; they read as zero again")
    func dontNeed() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 8 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.write([UInt8](repeating: 9, count: 8 * Int(page)), at: p)
            let free = m.freeFrames
            try s.advise(p + 2 * page, length: 4 * Int(page), .dontNeed)
            #expect(m.freeFrames == free + 4)
            #expect(try s.load(UInt8.self, at: p + 2 * page) == 0)
            #expect(try s.load(UInt8.self, at: p + 6 * page) == 9)
            s.exit()
        }
    }

    @Test("madvise(FREE) marks pages clean; without memory pressure the data stays")
    func lazyFree() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 2 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt8(5), at: p)
            let pfn = try s.pagemap(at: p).pfn!
            try s.advise(p, length: 2 * Int(page), .free)
            #expect(m.frames.flags(pfn).contains(.lazyFree))
            #expect(!m.frames.flags(pfn).contains(.dirty))
            #expect(try s.load(UInt8.self, at: p) == 5)
            s.exit()
        }
    }
}
