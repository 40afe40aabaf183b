import Testing
@testable import HMM

@Suite("mprotect, munmap and mremap")
struct ProtectRemapTests {
    @Test("a store after protect(.read) throws as SIGSEGV and changes nothing")
    func storeAfterReadOnly() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.write([UInt8](repeating: 3, count: 4 * Int(page)), at: p)
            try s.protect(p + page, length: 2 * Int(page), [.read])
            #expect(s.mappings.count == 3)
            expectError(.segmentationFault) { try s.store(UInt8(9), at: p + page + 10) }
            // A write spanning a writable and a read-only page writes the first, not the second.
            expectError(.segmentationFault) { try s.write([UInt8](repeating: 7, count: 8), at: p + page - 4) }
            #expect(try s.read(count: 4, at: p + page - 4) == [7, 7, 7, 7])
            #expect(try s.read(count: 4, at: p + page) == [3, 3, 3, 3])
            #expect(try s.load(UInt8.self, at: p + page + 10) == 3)
            try s.protect(p + page, length: 2 * Int(page), [.read, .write])
            #expect(s.mappings.count == 1, "VMAs merge back")
            try s.store(UInt8(9), at: p + page + 10)
            #expect(try s.load(UInt8.self, at: p + page + 10) == 9)
            try s.protect(p, length: Int(page), .none)
            expectError(.segmentationFault) { _ = try s.load(UInt8.self, at: p) }
            #expect(try s.pagemap(at: p).present, "PROT_NONE keeps the page, as a protnone entry")
            s.exit()
        }
    }

    @Test("munmap of part of a range removes exactly that part")
    func partialUnmap() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 6 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.write([UInt8](repeating: 1, count: 6 * Int(page)), at: p)
            try s.unmap(p + 2 * page, length: 2 * Int(page))
            expectError(.segmentationFault) { _ = try s.load(UInt8.self, at: p + 2 * page) }
            #expect(try s.load(UInt8.self, at: p + page) == 1)
            #expect(try s.load(UInt8.self, at: p + 4 * page) == 1)
            #expect(s.mappings.count == 2)
            try s.unmap(p, length: 6 * Int(page))  // holes inside are fine
            #expect(s.mappings.isEmpty)
            s.exit()
        }
    }

    @Test("remap moves the pages (not the bytes) and grows or shrinks")
    func remapMoveGrowShrink() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            for i in 0..<4 { try s.store(UInt64(i + 10), at: p + UInt64(i) * page) }
            let frame = try s.pagemap(at: p).pfn
            // Block the space after the mapping so growing must move.
            let blocker = try s.map(at: p + 4 * page, length: Int(page), protection: [.read], flags: [.private, .anonymous, .fixed])
            expectError(.outOfMemory) { try s.remap(p, length: 4 * Int(page), newLength: 8 * Int(page)) }
            let q = try s.remap(p, length: 4 * Int(page), newLength: 8 * Int(page), flags: .mayMove)
            #expect(q != p)
            #expect(try s.pagemap(at: q).pfn == frame, "entries moved, nothing copied")
            for i in 0..<4 { #expect(try s.load(UInt64.self, at: q + UInt64(i) * page) == UInt64(i + 10)) }
            #expect(try s.load(UInt64.self, at: q + 6 * page) == 0)
            expectError(.segmentationFault) { _ = try s.load(UInt8.self, at: p) }
            let r = try s.remap(q, length: 8 * Int(page), newLength: 2 * Int(page))
            #expect(r == q)
            expectError(.segmentationFault) { _ = try s.load(UInt8.self, at: q + 3 * page) }
            try s.unmap(blocker, length: Int(page))
            s.exit()
        }
    }

    @Test("remap with dontUnmap leaves the old range mapped but empty")
    func dontUnmap() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.write([UInt8](repeating: 0x5A, count: 4 * Int(page)), at: p)
            let q = try s.remap(p, length: 4 * Int(page), newLength: 4 * Int(page), flags: [.mayMove, .dontUnmap])
            #expect(q != p)
            #expect(try s.read(count: 4 * Int(page), at: q).allSatisfy { $0 == 0x5A })
            #expect(try s.pagemap(at: p).level == nil, "old range is empty")
            #expect(try s.load(UInt8.self, at: p) == 0, "old range is still mapped and reads zero")
            try m.checkInvariants()
            s.exit()
        }
    }

    @Test("remap with fixed moves to the target, replacing what was there")
    func remapFixed() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 2 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            let t = try s.map(length: 2 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt32(1), at: p)
            try s.store(UInt32(2), at: t)
            let q = try s.remap(p, length: 2 * Int(page), newLength: 2 * Int(page), flags: [.mayMove, .fixed], to: t)
            #expect(q == t)
            #expect(try s.load(UInt32.self, at: t) == 1)
            expectError(.invalidArgument) {
                try s.remap(t, length: 2 * Int(page), newLength: 2 * Int(page), flags: [.mayMove, .fixed], to: t + page)
            }
            s.exit()
        }
    }
}
