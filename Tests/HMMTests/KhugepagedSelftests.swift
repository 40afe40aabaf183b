import Testing
@testable import HMM

/// The port of `tools/testing/selftests/mm/khugepaged.c`, `madvise:anon` context: each case is named
/// after the upstream function, with the upstream steps and the upstream expectation of `MADV_COLLAPSE`
/// (which, unlike khugepaged, ignores the `max_ptes_*` limits). The `khugepaged` context needs the
/// background scanner, which the model does not have; `file` and `shmem` need file THPs (see the
/// skipped entries at the end).
@Suite("khugepaged.c (madvise:anon)")
struct KhugepagedSelftests {
    /// `BASE_ADDR`: 1 GiB, PMD-aligned, where every case maps its area.
    static let base: UInt64 = 1 << 30

    /// `anon_setup_area`: `nr` huge pages of private anonymous memory at `BASE_ADDR`.
    func setupArea(_ s: AddressSpace, _ nr: Int) throws -> UInt64 {
        let p = try s.map(at: Self.base, length: nr * PageSize.pmd, protection: [.read, .write],
                          flags: [.private, .anonymous, .fixed])
        #expect(p == Self.base)
        return p
    }

    /// `fill_memory`: the first word of page `i` becomes `i + 0xdead0000`.
    func fault(_ s: AddressSpace, _ p: UInt64, _ start: UInt64, _ end: UInt64) throws {
        var a = start
        while a < end {
            try s.store(UInt32(truncatingIfNeeded: a / page) &+ 0xdead_0000, at: p + a)
            a += page
        }
    }

    /// `validate_memory`.
    func validate(_ s: AddressSpace, _ p: UInt64, _ start: UInt64, _ end: UInt64,
                  sourceLocation: SourceLocation = #_sourceLocation) throws {
        var a = start
        while a < end {
            let v: UInt32 = try s.load(at: p + a)
            if v != UInt32(truncatingIfNeeded: a / page) &+ 0xdead_0000 {
                Issue.record("page \(a / page) is corrupted: \(v)", sourceLocation: sourceLocation)
                return
            }
            a += page
        }
    }

    /// `check_huge_anon`: the VMA containing `p` has exactly `nr` PMD-mapped anonymous THPs
    /// (`AnonHugePages` in smaps; the huge zero page does not count).
    func checkHuge(_ s: AddressSpace, _ m: Machine, _ p: UInt64, _ nr: Int) throws -> Bool {
        guard let vma = s.mappings.first(where: { $0.start <= p && p < $0.end }) else { return nr == 0 }
        var count = 0
        var a = (vma.start + pmdSize - 1) & ~(pmdSize - 1)
        while a + pmdSize <= vma.end {
            let e = try s.pagemap(at: a)
            if e.level == .pmd, e.present, e.pfn != m.hugeZeroPFN { count += 1 }
            a += pmdSize
        }
        return count == nr
    }

    /// `madvise_collapse_retry`: one retry on EAGAIN.
    func collapseRetry(_ s: AddressSpace, _ p: UInt64, _ length: Int) -> HMMError? {
        do { try s.advise(p, length: length, .collapse) } catch {
            if error.code != .tryAgain { return error }
            do { try s.advise(p, length: length, .collapse) } catch { return error }
        }
        return nil
    }

    /// `alloc_hpage`: a PMD-mapped THP filled by `fill_memory`, in a `VM_HUGEPAGE` VMA.
    func allocHPage(_ s: AddressSpace, _ m: Machine) throws -> UInt64 {
        let p = try setupArea(s, 1)
        try fault(s, p, 0, pmdSize)
        #expect(collapseRetry(s, p, PageSize.pmd) == nil)
        #expect(try checkHuge(s, m, p, 1))
        try s.advise(p, length: PageSize.pmd, .hugePage)
        return p
    }

    /// `madvise_collapse` (with its sanity check) and `__madvise_collapse`.
    func collapse(_ s: AddressSpace, _ m: Machine, _ p: UInt64, _ nr: Int, expect: Bool, sanity: Bool = true,
                  sourceLocation: SourceLocation = #_sourceLocation) throws {
        if sanity { #expect(try checkHuge(s, m, p, 0), "unexpected huge page", sourceLocation: sourceLocation) }
        try s.advise(p, length: nr * PageSize.pmd, .hugePage)  // clears VM_NOHUGEPAGE
        let error = collapseRetry(s, p, nr * PageSize.pmd)
        #expect((error == nil) == expect, "MADV_COLLAPSE returned \(String(describing: error))",
                sourceLocation: sourceLocation)
        #expect(try checkHuge(s, m, p, expect ? nr : 0), "check_huge()", sourceLocation: sourceLocation)
    }

    @Test("collapse_full_of_compound: MADV_NOHUGEPAGE on one page splits the PMD; collapse restores it")
    func collapse_full_of_compound() throws {
        try withMachine { m in
            let free = m.freeFrames
            let s = try m.makeAddressSpace()
            let p = try allocHPage(s, m)
            // "Split huge page leaving single PTE page table full of compound pages": the VMA split at
            // p + 4 KiB must split the huge PMD (`vma_adjust_trans_huge`); the merge that follows must not
            // make it huge again.
            try s.advise(p, length: Int(page), .noHugePage)
            try s.advise(p, length: PageSize.pmd, .noHugePage)
            #expect(try checkHuge(s, m, p, 0))
            #expect(try s.pagemap(at: p).level == .pte)
            try collapse(s, m, p, 1, expect: true)
            try validate(s, p, 0, pmdSize)
            s.exit()
            #expect(m.freeFrames == free, "every frame came back")
        }
    }

    @Test("collapse_fork_compound: the child splits the shared PMD and collapses it; the parent keeps its THP")
    func collapse_fork_compound() throws {
        try withMachine { m in
            let free = m.freeFrames
            let s = try m.makeAddressSpace()
            let p = try allocHPage(s, m)
            let child = try s.fork()
            #expect(try checkHuge(child, m, p, 1))
            try child.advise(p, length: Int(page), .noHugePage)
            try child.advise(p, length: PageSize.pmd, .noHugePage)
            #expect(try checkHuge(child, m, p, 0))
            try fault(child, p, 0, page)
            try collapse(child, m, p, 1, expect: true)
            try validate(child, p, 0, pmdSize)
            try m.checkInvariants()
            child.exit()
            #expect(try checkHuge(s, m, p, 1))
            try validate(s, p, 0, pmdSize)
            s.exit()
            #expect(m.freeFrames == free, "every frame came back")
        }
    }
}
