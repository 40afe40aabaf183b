import Testing
@testable import HMM

/// Soft-dirty tracking and `clear_refs` 4 (``AddressSpace/clearSoftDirty()``).
@Suite("soft-dirty")
struct SoftDirtyTests {
    @Test("clear_refs 4 clears soft-dirty and write-protects; the next write marks the page again")
    func clearAndWrite() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 3 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt8(1), at: p)
            _ = try s.load(UInt8.self, at: p + page)
            // A new VMA is VM_SOFTDIRTY: every page reads soft-dirty, holes included.
            for i in 0..<3 { #expect(try s.pagemap(at: p + UInt64(i) * page).softDirty, "page \(i)") }
            try s.clearSoftDirty()
            for i in 0..<3 { #expect(try !s.pagemap(at: p + UInt64(i) * page).softDirty, "page \(i) after clear") }
            #expect(try !s.pageTableEntry(at: p).entry.isWritable, "write-protected")
            try s.store(UInt8(2), at: p)
            #expect(try s.pagemap(at: p).softDirty && s.pageTableEntry(at: p).entry.isWritable)
            #expect(try !s.pagemap(at: p + page).softDirty)
            #expect(try s.load(UInt8.self, at: p) == 2)
            try m.checkInvariants()
            s.exit()
        }
    }

    @Test("with tracking on, mprotect does not make a clean page writable without the write fault")
    func mprotectKeepsTracking() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt8(1), at: p)
            try s.protect(p, length: Int(page), [.read])
            try s.clearSoftDirty()
            try s.protect(p, length: Int(page), [.read, .write])
            #expect(try !s.pageTableEntry(at: p).entry.isWritable)
            try s.store(UInt8(2), at: p)
            #expect(try s.pagemap(at: p).softDirty)
            // Without tracking (a fresh VMA), mprotect maps an exclusive page writable at once.
            let q = try s.map(length: Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt8(1), at: q)
            try s.protect(q, length: Int(page), [.read])
            try s.protect(q, length: Int(page), [.read, .write])
            #expect(try s.pageTableEntry(at: q).entry.isWritable)
            s.exit()
        }
    }

    @Test("THP: clear_refs write-protects the huge PMD; the next write keeps the THP and marks it soft-dirty")
    func hugePMD() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let raw = try s.map(length: 2 * PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous])
            let w = (raw + pmdSize - 1) & ~(pmdSize - 1)
            try s.advise(w, length: PageSize.pmd, .hugePage)
            try s.store(UInt8(1), at: w)
            try s.clearSoftDirty()
            #expect(try !s.pagemap(at: w + 5 * page).softDirty)
            try s.store(UInt8(2), at: w + 5 * page)
            #expect(try s.pagemap(at: w).softDirty && s.pagemap(at: w).level == .pmd)
            s.exit()
        }
    }
}
