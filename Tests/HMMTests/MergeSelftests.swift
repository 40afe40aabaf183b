import Testing
@testable import HMM

/// The port of `tools/testing/selftests/mm/merge.c`: VMA merging after mprotect, mmap, fork and mremap,
/// checked as upstream checks it (`PROCMAP_QUERY` for the VMA containing an address is
/// ``AddressSpace/mappings``). Each case runs in the fixture's 30-page `PROT_NONE` carve-out, mapped over
/// with `MAP_FIXED`. "Faulted" means the VMA has an anon_vma (a page was written); "unfaulted" that it
/// has none yet, which lets it merge with any compatible neighbour (issue 10 item 6).
@Suite("merge.c")
struct MergeSelftests {
    /// `FIXTURE_SETUP(merge)`.
    struct Fixture {
        let m: Machine
        let s: AddressSpace
        let carveout: UInt64
        init(_ m: Machine) throws {
            self.m = m
            s = try m.makeAddressSpace()
            carveout = try s.map(length: 30 * Int(page), protection: .none, flags: [.private, .anonymous])
        }
        func at(_ pages: Int) -> UInt64 { carveout + UInt64(pages) * page }

        /// `mmap(addr, pages, PROT_READ | PROT_WRITE [| PROT_EXEC], MAP_ANON | MAP_PRIVATE | MAP_FIXED)`.
        @discardableResult
        func map(_ addr: UInt64, _ pages: Int, _ prot: Protection = [.read, .write]) throws -> UInt64 {
            try s.map(at: addr, length: pages * Int(page), protection: prot, flags: [.private, .anonymous, .fixed])
        }

        /// `sys_mremap(old, pages, pages, MREMAP_MAYMOVE | MREMAP_FIXED [| MREMAP_DONTUNMAP], new)`.
        func move(_ old: UInt64, _ pages: Int, to new: UInt64, dontUnmap: Bool = false) throws -> UInt64 {
            try s.remap(old, length: pages * Int(page), newLength: pages * Int(page),
                        flags: dontUnmap ? [.mayMove, .fixed, .dontUnmap] : [.mayMove, .fixed], to: new)
        }

        /// `find_vma_procmap`: the VMA containing `addr`, as `[start, end)`.
        func vma(_ addr: UInt64, _ s: AddressSpace? = nil) -> [UInt64] {
            guard let v = (s ?? self.s).mappings.first(where: { $0.start <= addr && addr < $0.end }) else { return [] }
            return [v.start, v.end]
        }

        func fault(_ addr: UInt64, _ s: AddressSpace? = nil) throws { try (s ?? self.s).store(UInt8(ascii: "x"), at: addr) }
        func span(_ addr: UInt64, _ pages: Int) -> [UInt64] { [addr, addr + UInt64(pages) * page] }
    }

    func run(_ body: (Fixture) throws -> Void) throws {
        try withMachine { m in
            let f = try Fixture(m)
            try body(f)
            f.s.exit()
        }
    }

    @Test func mprotect_unfaulted_left() throws {
        try run { f in
            let ptr = try f.map(f.at(1), 10)
            try f.s.protect(ptr, length: 5 * Int(page), [.read])
            try f.fault(ptr + 5 * page)
            try f.s.protect(ptr + 5 * page, length: 5 * Int(page), [.read])
            #expect(f.vma(ptr) == f.span(ptr, 10))
        }
    }

    @Test func mprotect_unfaulted_right() throws {
        try run { f in
            let ptr = try f.map(f.at(1), 10)
            try f.s.protect(ptr + 5 * page, length: 5 * Int(page), [.read])
            try f.fault(ptr)
            try f.s.protect(ptr, length: 5 * Int(page), [.read])
            #expect(f.vma(ptr) == f.span(ptr, 10))
        }
    }

    @Test func mprotect_unfaulted_both() throws {
        try run { f in
            let ptr = try f.map(f.at(2), 9)
            try f.s.protect(ptr, length: 3 * Int(page), [.read])
            try f.s.protect(ptr + 6 * page, length: 3 * Int(page), [.read])
            try f.fault(ptr + 3 * page)
            try f.s.protect(ptr + 3 * page, length: 3 * Int(page), [.read])
            #expect(f.vma(ptr) == f.span(ptr, 9))
        }
    }

    @Test func mprotect_faulted_left_unfaulted_right() throws {
        try run { f in
            let ptr = try f.map(f.at(2), 9)
            try f.s.protect(ptr + 6 * page, length: 3 * Int(page), [.read])
            try f.fault(ptr)
            try f.s.protect(ptr, length: 3 * Int(page), [.read])
            try f.s.protect(ptr + 3 * page, length: 3 * Int(page), [.read])
            #expect(f.vma(ptr) == f.span(ptr, 9))
        }
    }

    @Test func mprotect_unfaulted_left_faulted_right() throws {
        try run { f in
            let ptr = try f.map(f.at(2), 9)
            try f.s.protect(ptr, length: 3 * Int(page), [.read])
            try f.fault(ptr + 3 * page)
            try f.s.protect(ptr + 6 * page, length: 3 * Int(page), [.read])
            try f.s.protect(ptr + 3 * page, length: 3 * Int(page), [.read])
            #expect(f.vma(ptr) == f.span(ptr, 9))
        }
    }

    @Test("forked_target_vma: a forked, faulted VMA does not lend its anon_vma to a new neighbour")
    func forked_target_vma() throws {
        try run { f in
            let ptr = try f.map(f.at(1), 5)
            try f.fault(ptr)
            let child = try f.s.fork()
            for i in 0..<5 { try f.fault(ptr + UInt64(i) * page, child) }
            _ = try child.map(at: ptr + 5 * page, length: 5 * Int(page), protection: [.read, .write],
                              flags: [.private, .anonymous, .fixed])
            #expect(f.vma(ptr, child) == f.span(ptr, 5))
            child.exit()
        }
    }

    @Test("forked_source_vma: nor does it merge into an unfaulted neighbour when mprotect makes them alike")
    func forked_source_vma() throws {
        try run { f in
            let ptr = try f.map(f.at(1), 5)
            try f.fault(ptr)
            let child = try f.s.fork()
            for i in 0..<5 { try f.fault(ptr + UInt64(i) * page, child) }
            let ptr2 = try child.map(at: f.at(6), length: 5 * Int(page), protection: [.read, .write, .execute],
                                     flags: [.private, .anonymous, .fixed])
            #expect(f.vma(ptr2, child) == f.span(ptr2, 5))
            try child.protect(ptr, length: 5 * Int(page), [.read, .write, .execute])
            #expect(f.vma(ptr2, child) == f.span(ptr2, 5))
            child.exit()
        }
    }

    @Test("ksm_merge (the part before PR_SET_MEMORY_MERGE): two adjacent R/W mappings merge, also after munmap")
    func ksm_merge_plain() throws {
        try run { f in
            var ptr = try f.map(f.at(1), 1)
            try f.map(f.at(2), 1)
            #expect(f.vma(ptr) == f.span(ptr, 2))
            try f.s.unmap(ptr, length: 2 * Int(page))
            ptr = try f.map(f.at(1), 1)
            try f.map(f.at(2), 1)
            #expect(f.vma(ptr) == f.span(ptr, 2))
        }
    }

    @Test func mremap_unfaulted_to_faulted() throws {
        try run { f in
            let ptr = try f.map(f.at(1), 5)
            var ptr2 = try f.map(f.at(7), 5)
            ptr2 = try f.move(ptr2, 5, to: ptr2 + 1000 * page)
            try f.fault(ptr)
            ptr2 = try f.move(ptr2, 5, to: ptr + 5 * page)
            #expect(f.vma(ptr) == f.span(ptr, 10))
        }
    }

    @Test func mremap_unfaulted_behind_faulted() throws {
        try run { f in
            let ptr = try f.map(f.at(6), 5)
            var ptr2 = try f.map(f.at(14), 5)
            ptr2 = try f.move(ptr2, 5, to: ptr2 + 1000 * page)
            try f.fault(ptr)
            ptr2 = try f.move(ptr2, 5, to: f.at(1))
            #expect(f.vma(ptr2) == f.span(ptr2, 10))
        }
    }

    @Test func mremap_unfaulted_between_faulted() throws {
        try run { f in
            let ptr = try f.map(f.at(1), 5)
            var ptr2 = try f.map(f.at(7), 5)
            var ptr3 = try f.map(f.at(14), 5)
            ptr3 = try f.move(ptr3, 5, to: ptr3 + 2000 * page)
            ptr2 = try f.move(ptr2, 5, to: ptr2 + 1000 * page)
            try f.fault(ptr)
            try f.fault(ptr3)
            ptr3 = try f.move(ptr3, 5, to: ptr + 10 * page)
            ptr2 = try f.move(ptr2, 5, to: ptr + 5 * page)
            #expect(f.vma(ptr) == f.span(ptr, 10))
            #expect(f.vma(ptr3) == f.span(ptr3, 5))
        }
    }

    @Test func mremap_unfaulted_between_faulted_unfaulted() throws {
        try run { f in
            let ptr = try f.map(f.at(1), 5)
            var ptr2 = try f.map(f.at(7), 5)
            var ptr3 = try f.map(f.at(14), 5)
            ptr3 = try f.move(ptr3, 5, to: ptr3 + 2000 * page)
            ptr2 = try f.move(ptr2, 5, to: ptr2 + 1000 * page)
            try f.fault(ptr)
            ptr3 = try f.move(ptr3, 5, to: ptr + 10 * page)
            ptr2 = try f.move(ptr2, 5, to: ptr + 5 * page)
            #expect(f.vma(ptr) == f.span(ptr, 15))
        }
    }

    @Test func mremap_unfaulted_between_correctly_placed_faulted() throws {
        try run { f in
            let ptr = try f.map(f.at(1), 15)
            try f.fault(ptr)
            try f.s.unmap(ptr + 5 * page, length: 5 * Int(page))
            var ptr2 = try f.map(f.at(20), 5)
            ptr2 = try f.move(ptr2, 5, to: ptr + 5 * page)
            #expect(f.vma(ptr) == f.span(ptr, 15))
        }
    }

    @Test func mremap_correct_placed_faulted() throws {
        try run { f in
            var ptr = try f.map(f.at(1), 15)
            try f.fault(ptr)
            var ptr3 = try f.move(ptr + 10 * page, 5, to: ptr + 10 * page + 2000 * page)
            var ptr2 = try f.move(ptr + 5 * page, 5, to: ptr + 5 * page + 1000 * page)
            ptr2 = try f.move(ptr2, 5, to: ptr + 5 * page)
            #expect(f.vma(ptr) == f.span(ptr, 10))
            ptr = try f.move(ptr, 5, to: ptr + 1000 * page)
            ptr = try f.move(ptr, 5, to: f.at(1))
            #expect(f.vma(ptr) == f.span(ptr, 10))
            ptr = try f.move(ptr, 5, to: ptr + 1000 * page)
            ptr3 = try f.move(ptr3, 5, to: ptr2 + 5 * page)
            #expect(f.vma(ptr2) == f.span(ptr2, 10))
            ptr = try f.move(ptr, 5, to: f.at(1))
            #expect(f.vma(ptr) == f.span(ptr, 15))
            ptr2 = try f.move(ptr2, 5, to: ptr2 + 1000 * page)
            ptr2 = try f.move(ptr2, 5, to: ptr + 5 * page)
            #expect(f.vma(ptr) == f.span(ptr, 15))
            ptr3 = try f.move(ptr3, 5, to: ptr3 + 1000 * page)
            ptr3 = try f.move(ptr3, 5, to: ptr + 10 * page)
            #expect(f.vma(ptr) == f.span(ptr, 15))
        }
    }

    @Test func mremap_faulted_to_unfaulted_prev() throws {
        try run { f in
            var a = try f.map(f.at(4), 3)
            try f.fault(a)
            a = try f.move(a, 3, to: f.at(20))
            let b = try f.map(f.at(1), 3)
            a = try f.move(a, 3, to: f.at(4), dontUnmap: true)
            #expect(f.vma(b) == f.span(b, 6))
        }
    }

    @Test func mremap_faulted_to_unfaulted_next() throws {
        try run { f in
            var a = try f.map(f.at(1), 3)
            try f.fault(a)
            a = try f.move(a, 3, to: f.at(20))
            try f.map(f.at(4), 3)
            a = try f.move(a, 3, to: f.at(1), dontUnmap: true)
            #expect(f.vma(a) == f.span(a, 6))
        }
    }

    @Test func mremap_faulted_to_unfaulted_prev_unfaulted_next() throws {
        try run { f in
            var b = try f.map(f.at(4), 3)
            try f.fault(b)
            b = try f.move(b, 3, to: f.at(20))
            let a = try f.map(f.at(1), 3)
            try f.map(f.at(7), 3)
            b = try f.move(b, 3, to: f.at(4), dontUnmap: true)
            #expect(f.vma(a) == f.span(a, 9))
        }
    }

    @Test func mremap_faulted_to_unfaulted_prev_faulted_next() throws {
        try run { f in
            let bc = try f.map(f.at(4), 6)
            try f.fault(bc)
            var b = try f.move(bc, 3, to: f.at(20))
            let a = try f.map(f.at(1), 3)
            b = try f.move(b, 3, to: f.at(4), dontUnmap: true)
            #expect(f.vma(a) == f.span(a, 9))
        }
    }

    @Test("handle_uprobe_upon_merged_vma", .disabled("needs uprobes (perf_event_open), which the model does not have"))
    func handle_uprobe_upon_merged_vma() {}

    @Test("ksm_merge (after PR_SET_MEMORY_MERGE)", .disabled("needs KSM (VM_MERGEABLE), which the model does not have"))
    func ksm_merge() {}
}
