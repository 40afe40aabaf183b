import Testing
@testable import HMM

@Suite("fork and copy-on-write")
struct ForkTests {
    @Test("after fork, writes in the child are invisible to the parent and vice versa")
    func privateCOW() throws {
        try withMachine { m in
            let parent = try m.makeAddressSpace()
            let p = try parent.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            for i in 0..<4 { try parent.store(UInt32(i + 1), at: p + UInt64(i) * page) }
            let child = try parent.fork()
            // Both share the frames read-only until a write.
            #expect(try parent.pagemap(at: p).pfn == child.pagemap(at: p).pfn)
            #expect(try !parent.pagemap(at: p).exclusivelyMapped)
            try child.store(UInt32(100), at: p)
            try parent.store(UInt32(200), at: p + page)
            #expect(try parent.load(UInt32.self, at: p) == 1)
            #expect(try child.load(UInt32.self, at: p) == 100)
            #expect(try parent.load(UInt32.self, at: p + page) == 200)
            #expect(try child.load(UInt32.self, at: p + page) == 2)
            #expect(m.statistics[.faultCOWCopy] == 2)
            // Page 2 untouched by both: still shared.
            #expect(try parent.pagemap(at: p + 2 * page).pfn == child.pagemap(at: p + 2 * page).pfn)
            try m.checkInvariants()
            child.exit()
            // The parent is now the only user: its next write reuses the page instead of copying.
            try parent.store(UInt32(300), at: p + 2 * page)
            #expect(m.statistics[.faultCOWReuse] >= 1)
            #expect(m.statistics[.faultCOWCopy] == 2)
            parent.exit()
        }
    }

    @Test("MAP_SHARED anonymous memory stays shared across fork")
    func sharedAnonymous() throws {
        try withMachine { m in
            let parent = try m.makeAddressSpace()
            let p = try parent.map(length: 4 * Int(page), protection: [.read, .write], flags: [.shared, .anonymous])
            try parent.store(UInt32(1), at: p)
            let child = try parent.fork()
            try child.store(UInt32(42), at: p)
            try child.store(UInt32(43), at: p + 3 * page)
            #expect(try parent.load(UInt32.self, at: p) == 42)
            #expect(try parent.load(UInt32.self, at: p + 3 * page) == 43)
            try parent.store(UInt32(7), at: p + page)
            #expect(try child.load(UInt32.self, at: p + page) == 7)
            child.exit()
            parent.exit()
        }
    }

    @Test("a page pinned before fork stays the parent's frame; the child gets a copy")
    func pinnedPageStaysWithParent() throws {
        try withMachine { m in
            let parent = try m.makeAddressSpace()
            let p = try parent.map(length: 2 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try parent.store(UInt64(11), at: p)
            let pinned = try parent.getUserPages(p, count: 1, flags: [.write, .pin])
            let frame = pinned.pfns[0]
            let child = try parent.fork()
            #expect(m.statistics[.forkPinnedCopy] == 1)
            #expect(try parent.pagemap(at: p).pfn == frame)
            #expect(try child.pagemap(at: p).pfn != frame)
            // The parent keeps writing to the pinned frame without a fault; DMA through the pin sees it.
            let cow = m.statistics[.faultCOWCopy]
            try parent.store(UInt64(12), at: p)
            #expect(m.statistics[.faultCOWCopy] == cow)
            try pinned.withBytes(ofPage: 0) { #expect($0.load(as: UInt64.self) == 12) }
            #expect(try child.load(UInt64.self, at: p) == 11)
            try m.checkInvariants()
            pinned.release()
            child.exit()
            parent.exit()
        }
    }

    @Test("fork of a PMD-mapped THP shares it read-only; a write splits the PMD and copies one page")
    func thpFork() throws {
        try withMachine { m in
            let parent = try m.makeAddressSpace()
            let raw = try parent.map(length: 4 << 20, protection: [.read, .write], flags: [.private, .anonymous])
            let p = (raw + pmdSize - 1) & ~(pmdSize - 1)
            try parent.advise(p, length: PageSize.pmd, .hugePage)
            try parent.store(UInt8(1), at: p)
            #expect(try parent.pagemap(at: p).level == .pmd)
            let child = try parent.fork()
            #expect(try child.pagemap(at: p).level == .pmd)
            try child.store(UInt8(2), at: p + 5 * page)
            #expect(try child.pagemap(at: p).level == .pte)
            #expect(try parent.pagemap(at: p).level == .pmd)
            #expect(try parent.load(UInt8.self, at: p + 5 * page) == 0)
            #expect(try child.load(UInt8.self, at: p + 5 * page) == 2)
            #expect(try child.load(UInt8.self, at: p) == 1)
            try m.checkInvariants()
            child.exit()
            parent.exit()
        }
    }

    @Test("MADV_DONTFORK leaves a range out of the child, MADV_DOFORK brings it back; VMAs split and merge")
    func dontForkDoFork() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            for i in 0..<4 { try s.store(UInt8(i + 1), at: p + UInt64(i) * page) }
            try s.advise(p + page, length: 2 * Int(page), .dontFork)
            #expect(s.mappings.count == 3)
            let child = try s.fork()
            #expect(child.mappings.map { [$0.start, $0.end] } == [[p, p + page], [p + 3 * page, p + 4 * page]])
            expectError(.segmentationFault) { try child.load(UInt8.self, at: p + page) }
            #expect(try child.load(UInt8.self, at: p + 3 * page) == 4)
            child.exit()
            try s.advise(p, length: 4 * Int(page), .doFork)
            #expect(s.mappings.count == 1)
            let second = try s.fork()
            #expect(try second.load(UInt8.self, at: p + page) == 2)
            second.exit()
            s.exit()
        }
    }

    @Test("MADV_WIPEONFORK: the child gets the range empty (zero), the parent keeps its data; KEEPONFORK undoes it")
    func wipeOnFork() throws {
        try withMachine { m in
            let free = m.freeFrames
            let s = try m.makeAddressSpace()
            let p = try s.map(length: 2 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt8(7), at: p)
            try s.store(UInt8(8), at: p + page)
            try s.advise(p, length: Int(page), .wipeOnFork)
            let child = try s.fork()
            #expect(try child.load(UInt8.self, at: p) == 0)
            #expect(try child.load(UInt8.self, at: p + page) == 8)
            #expect(try s.load(UInt8.self, at: p) == 7)
            try child.store(UInt8(9), at: p)
            #expect(try s.load(UInt8.self, at: p) == 7)
            // The flag is inherited: the child's own child gets the range empty too.
            let grandchild = try child.fork()
            #expect(try grandchild.load(UInt8.self, at: p) == 0)
            grandchild.exit()
            child.exit()
            try s.advise(p, length: Int(page), .keepOnFork)
            let again = try s.fork()
            #expect(try again.load(UInt8.self, at: p) == 7)
            again.exit()
            let shared = try s.map(length: Int(page), protection: [.read, .write], flags: [.shared, .anonymous])
            expectError(.invalidArgument) { try s.advise(shared, length: Int(page), .wipeOnFork) }
            let huge = try s.map(length: PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous, .hugetlb])
            expectError(.invalidArgument) { try s.advise(huge, length: PageSize.pmd, .wipeOnFork) }
            try m.checkInvariants()
            s.exit()
            #expect(m.freeFrames == free)
        }
    }
}
