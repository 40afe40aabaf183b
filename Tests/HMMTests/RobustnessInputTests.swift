import Testing
@testable import HMM
import HMMDevices

#if canImport(Glibc)
import Glibc
#endif

/// Bad or extreme input that used to trap, leak or allocate without bound (issue 14): each call gets the
/// kernel's answer and leaves the machine consistent.
@Suite("Robustness: input")
struct RobustnessInputTests {
    let rw: Protection = [.read, .write]
    let anon: MapFlags = [.private, .anonymous]

    // MARK: hugetlb VMAs

    @Test("madvise on hugetlb: MADV_FREE and MADV_COLLAPSE are EINVAL, no advice cuts a huge page, nothing changes")
    func adviseHugetlb() throws {
        try withMachine(.init(systemMemory: 64 << 20, hugetlbPages: 2)) { m in
            let s = try m.makeAddressSpace()
            let h = try s.map(length: 2 * PageSize.pmd, protection: rw, flags: anon.union(.hugetlb))
            try s.write([7], at: h + page)
            try s.write([9], at: h + pmdSize + 5 * page)
            let before = (s.mappings, m.freeFrames, m.freeHugetlbPages, m.hugetlb.reservedPages)
            func unchanged(_ line: Int = #line) throws {
                #expect(s.mappings == before.0, "mappings changed (line \(line))")
                #expect(m.freeFrames == before.1 && m.freeHugetlbPages == before.2 && m.hugetlb.reservedPages == before.3,
                        "memory changed (line \(line))")
                #expect(try s.read(count: 1, at: h + page) == [7] && s.read(count: 1, at: h + pmdSize + 5 * page) == [9],
                        "data changed (line \(line))")
            }
            let cuts: [(UInt64, Int)] = [
                (h + page, Int(page)), (h, Int(page)), (h + page, 2 * PageSize.pmd - Int(page)),
                (h + pmdSize - page, 2 * Int(page)), (h + pmdSize + page, PageSize.pmd),
            ]
            // The kernel refuses MADV_FREE and MADV_COLLAPSE on any hugetlb VMA, whole pages included.
            for (lo, length) in cuts + [(h, PageSize.pmd), (h, 2 * PageSize.pmd)] {
                expectError(.invalidArgument) { try s.advise(lo, length: length, .free) }
                expectError(.invalidArgument) { try s.advise(lo, length: length, .collapse) }
            }
            try unchanged()
            // A VMA split inside a huge page is EINVAL (`hugetlb_vm_op_split`); so is an MADV_DONTNEED that
            // starts inside one, while one that starts on a huge page has its end rounded down (to nothing).
            for advice in [Advice.hugePage, .noHugePage, .dontNeed] {
                for (lo, length) in cuts {
                    if advice == .dontNeed && lo & (pmdSize - 1) == 0 {
                        try s.advise(lo, length: length, advice)
                    } else {
                        expectError(.invalidArgument) { try s.advise(lo, length: length, advice) }
                    }
                }
            }
            try unchanged()
            // Whole huge pages take THP advice (it has no effect on hugetlb) and lose it again.
            try s.advise(h + pmdSize, length: PageSize.pmd, .hugePage)
            #expect(s.mappings.map(\.hugePageAdvice) == [false, true])
            try s.advise(h + pmdSize, length: PageSize.pmd, .noHugePage)
            #expect(s.mappings.allSatisfy { $0.hugetlb && !$0.hugePageAdvice })
            #expect(try s.read(count: 1, at: h + page) == [7] && s.read(count: 1, at: h + pmdSize + 5 * page) == [9])
            try s.unmap(h, length: 2 * PageSize.pmd)
        }
    }

    @Test("MAP_FIXED over part of a hugetlb page is EINVAL and changes nothing; over whole pages it replaces them")
    func fixedMapOverHugetlb() throws {
        try withMachine(.init(systemMemory: 64 << 20, hugetlbPages: 2)) { m in
            let s = try m.makeAddressSpace()
            let h = try s.map(length: 2 * PageSize.pmd, protection: rw, flags: anon.union(.hugetlb))
            try s.write([7], at: h + page)
            try s.write([9], at: h + pmdSize)
            let before = (s.mappings, m.freeFrames, m.freeHugetlbPages, m.hugetlb.reservedPages)
            expectError(.invalidArgument) { try s.map(at: h + page, length: Int(page), protection: rw, flags: anon.union(.fixed)) }
            expectError(.invalidArgument) { try s.map(at: h - page, length: 2 * Int(page), protection: rw, flags: anon.union(.fixed)) }
            expectError(.invalidArgument) {
                try s.map(at: h + pmdSize - page, length: Int(page), protection: rw, flags: anon.union([.fixed, .populate]))
            }
            #expect(s.mappings == before.0)
            #expect(m.freeFrames == before.1 && m.freeHugetlbPages == before.2 && m.hugetlb.reservedPages == before.3)
            #expect(try s.read(count: 1, at: h + page) == [7] && s.read(count: 1, at: h + pmdSize) == [9])
            // An aligned MAP_FIXED replaces the second huge page, which goes back to the pool.
            let q = try s.map(at: h + pmdSize, length: PageSize.pmd, protection: rw, flags: anon.union(.fixed))
            #expect(q == h + pmdSize && m.freeHugetlbPages == before.2 + 1)
            #expect(try s.read(count: 1, at: h + pmdSize) == [0] && s.read(count: 1, at: h + page) == [7])
            try s.unmap(h, length: 2 * PageSize.pmd)
        }
    }

    // MARK: sparse page cache

    /// Resident set size of this process, from `/proc/self/statm`.
    func residentBytes() -> Int {
        let fd = open("/proc/self/statm", O_RDONLY)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 128)
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return 0 }
        let fields = buffer[0..<n].split(separator: UInt8(ascii: " "))
        guard fields.count > 1, let pages = Int(String(decoding: fields[1], as: UTF8.self)) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }

    @Test("a 1-byte pwrite at the end of the largest file caches one page, allocates nothing big and reads back")
    func sparsePageCache() throws {
        try withMachine { m in
            let limit = 1 << 40
            let f = try m.makeFile(size: 0)
            let rss = residentBytes()
            #expect(try f.write([0x5a], at: limit - 1) == 1)
            #expect(f.size == limit && f.cachedPages == 1)
            // The dense page cache this replaces needed 2 GiB of slots for this one page.
            #expect(residentBytes() - rss < 256 << 20, "page cache grew the process by \((residentBytes() - rss) >> 20) MiB")
            var b = [UInt8](repeating: 1, count: 2)
            #expect(try b.withUnsafeMutableBytes { try f.read(into: $0, at: limit - 1) } == 1 && b[0] == 0x5a)
            // A hole far below reads as zero and caches nothing.
            #expect(try b.withUnsafeMutableBytes { try f.read(into: $0, at: 1 << 30) } == 2 && b == [0, 0])
            #expect(f.cachedPages == 1)
            expectError(.invalidArgument) { try f.write([1], at: limit) }
            expectError(.invalidArgument) { try f.write([1, 2], at: limit - 1) }
            // The fault path finds the same page, and a write across a 512-page leaf boundary lands in both.
            let s = try m.makeAddressSpace()
            let a = try s.map(length: Int(page), protection: [.read], flags: [.shared], file: f, offset: limit - Int(page))
            #expect(try s.read(count: 1, at: a + page - 1) == [0x5a])
            let boundary = 512 * Int(page) * 3
            try f.write([1, 2, 3, 4], at: boundary - 2)
            #expect(f.cachedPages == 3)
            var c = [UInt8](repeating: 0, count: 4)
            #expect(try c.withUnsafeMutableBytes { try f.read(into: $0, at: boundary - 2) } == 4 && c == [1, 2, 3, 4])
            #expect(f.cachedPFNs.count == 3)
            try s.unmap(a, length: Int(page))
        }
    }

    // MARK: device PFN space

    /// Driver callbacks for bare pagemaps that never hold a page.
    final class IdlePagemapDriver: PagemapOperations, @unchecked Sendable {
        func folioFree(_ head: PFN, order: Int) {}
        func migrateToRAM(_ fault: DeviceFault) throws(HMMError) { throw HMMError(.bus, "no pages to migrate") }
    }

    @Test("device memory keeps working after more release rounds than the PFN space holds without reuse")
    func releaseReusesPFNSpace() throws {
        try withMachine(.init(systemMemory: 64 << 20, hugetlbPages: 0)) { m in
            let dev = try MirrorDevice(machine: m, minor: 0, kind: .devicePrivate, chunkSize: 256 << 20)
            let s = try m.makeAddressSpace()
            let fd = try dev.open(s)
            let pages = 4
            let a = try s.map(length: pages * Int(page), protection: rw, flags: anon)
            var mirror = [UInt8](repeating: 0, count: pages * Int(page))
            // Each round also registers and unregisters a region of almost 16 GiB beside the device's
            // chunk, so four rounds use up the PFN space unless unregistering gives ranges back; sized so
            // that without reuse the device's own chunk is what no longer fits.
            let driver = IdlePagemapDriver()
            let big = (1 << 22) - dev.chunkPages
            let rounds = (m.frames.capacity - m.totalFrames) / (big + dev.chunkPages) + 1
            for round in 0..<rounds {
                let value = UInt8(truncatingIfNeeded: round + 1)
                let other = try m.registerPagemap(kind: .deviceCoherent, count: big, owner: driver, operations: driver)
                try s.write([UInt8](repeating: value, count: pages * Int(page)), at: a)
                let r = try fd.migrateToDevice(a, pages: pages, into: &mirror)
                let e = try s.pagemap(at: a + 3 * page)
                guard r.cpages == pages, dev.pagesInUse == pages, e.kind == .devicePrivateWrite, mirror[0] == value else {
                    Issue.record("round \(round): cpages \(r.cpages), \(dev.pagesInUse) device pages in use, entry \(e)")
                    break
                }
                try dev.release()
                try m.unregisterPagemap(other)
                guard dev.pagesInUse == 0, dev.chunkCount == 0, try s.read(count: 1, at: a + 3 * page) == [value] else {
                    Issue.record("round \(round): release left \(dev.pagesInUse) pages, \(dev.chunkCount) chunks")
                    break
                }
            }
            fd.close()
        }
    }

    @Test("PFN ranges of unregistered pagemaps are reused first fit and coalesced; a registration that does not fit is ENOMEM")
    func pfnSpaceFirstFit() throws {
        try withMachine { m in
            let driver = IdlePagemapDriver()
            let n = 1 << 16
            func register(_ count: Int) throws(HMMError) -> Pagemap {
                try m.registerPagemap(kind: .devicePrivate, count: count, owner: driver, operations: driver)
            }
            let a = try register(n)
            let b = try register(n)
            let c = try register(n)
            #expect(b.firstPFN == a.endPFN && c.firstPFN == b.endPFN)
            try m.unregisterPagemap(a)
            #expect(m.pagemap(of: a.firstPFN) == nil && m.deviceKind(a.firstPFN) == nil)
            let d = try register(n / 2)
            #expect(d.firstPFN == a.firstPFN, "first fit takes the lowest hole")
            try m.unregisterPagemap(b)
            let e = try register(n)
            #expect(e.firstPFN == d.endPFN, "the rest of a's range and b's range coalesce")
            #expect(m.pagemap(of: e.firstPFN) === e && m.pagemap(of: b.firstPFN) === e)
            for pm in [c, d, e] { try m.unregisterPagemap(pm) }
            let f = try register(3 * n)
            #expect(f.firstPFN == a.firstPFN, "every hole merged back into one")
            do throws(HMMError) {
                _ = try register(1 << 24)
                Issue.record("a registration larger than the PFN space succeeded")
            } catch {
                #expect(error.code == .outOfMemory && "\(error)".contains("PFN space"), "\(error)")
            }
            // The failed registration took nothing.
            let g = try register(n)
            #expect(g.firstPFN == f.endPFN)
            for pm in [f, g] { try m.unregisterPagemap(pm) }
        }
    }

    @Test("a PFN range is not reused while a lockless walker that may still hold one of its PFNs is inside")
    func pfnReuseWaitsForWalkers() throws {
        try withMachine { m in
            let driver = IdlePagemapDriver()
            let n = 1 << 16
            func register(_ count: Int) throws(HMMError) -> Pagemap {
                try m.registerPagemap(kind: .deviceCoherent, count: count, owner: driver, operations: driver)
            }
            let a = try register(n)
            let walker = m.epoch.enter()
            try m.unregisterPagemap(a)
            let b = try register(n)
            #expect(b.firstPFN != a.firstPFN && m.pagemap(of: a.firstPFN) == nil)
            m.epoch.leave(walker)
            let c = try register(n)
            #expect(c.firstPFN == a.firstPFN)
            for pm in [b, c] { try m.unregisterPagemap(pm) }
        }
    }

    // MARK: MAP_POPULATE

    @Test("MAP_POPULATE of PROT_NONE memory maps and populates nothing")
    func populateProtNone() throws {
        try withMachine { m in
            let s = try m.makeAddressSpace()
            let free = m.freeFrames
            let length = 16 * Int(page)
            let a = try s.map(length: length, protection: [], flags: anon.union(.populate))
            #expect(s.mappings.map(\.start) == [a] && s.mappings[0].protection == [])
            #expect(try s.residentPages(a, length: length) == 0 && m.freeFrames == free)
            try s.protect(a, length: length, rw)
            try s.write([3], at: a + page)
            #expect(try s.read(count: 1, at: a + page) == [3])
            try s.unmap(a, length: length)
            #expect(m.freeFrames == free)
        }
    }

    @Test("MAP_POPULATE larger than RAM maps, populates what fits, and unmap gives every frame back")
    func populateBeyondRAM() throws {
        try withMachine(.init(systemMemory: 16 << 20, hugetlbPages: 0)) { m in
            let s = try m.makeAddressSpace()
            let free = m.freeFrames
            let length = 32 << 20
            let a = try s.map(length: length, protection: rw, flags: anon.union(.populate))
            #expect(s.mappings.map(\.start) == [a] && s.mappings[0].end == a + UInt64(length))
            let resident = try s.residentPages(a, length: length)
            #expect(resident > 0 && resident < length / Int(page))
            #expect(resident == free - m.freeFrames, "\(resident) pages populated, \(free - m.freeFrames) frames taken")
            try m.checkInvariants()
            // What could not be populated faults like any other page once memory is back.
            try s.unmap(a, length: length / 2)
            try s.write([5], at: a + UInt64(length) - page)
            #expect(try s.read(count: 1, at: a + UInt64(length) - page) == [5])
            try s.unmap(a + UInt64(length / 2), length: length / 2)
            #expect(s.mappings.isEmpty && m.freeFrames == free)
        }
    }

    @Test("a device whose PFN space is exhausted says so: migrateToDevice throws ENOMEM and every page stays in RAM")
    func exhaustedDeviceIsAnError() throws {
        try withMachine(.init(systemMemory: 64 << 20, hugetlbPages: 0)) { m in
            let dev = try MirrorDevice(machine: m, minor: 0, kind: .devicePrivate, chunkSize: 2 << 20)
            let driver = IdlePagemapDriver()
            // Fill the rest of the PFN space so that the device cannot add a second chunk.
            var fillers: [Pagemap] = []
            var left = m.frames.capacity - m.totalFrames - dev.chunkPages
            while left >= PageSize.pagesPerPMD {
                let n = min(left, 1 << 24) / PageSize.pagesPerPMD * PageSize.pagesPerPMD
                fillers.append(try m.registerPagemap(kind: .deviceCoherent, count: n, owner: driver, operations: driver))
                left -= n
            }
            let s = try m.makeAddressSpace()
            let fd = try dev.open(s)
            let n = dev.chunkPages
            let a = try s.map(length: (n + 8) * Int(page), protection: rw, flags: anon)
            for p in 0..<(n + 8) { try s.store(UInt32(p), at: a + UInt64(p) * page) }
            #expect(try fd.migrateToDevice(a, pages: n, into: nil).cpages == n)  // the whole chunk
            expectError(.outOfMemory) { try fd.migrateToDevice(a + UInt64(n) * page, pages: 8, into: nil) }
            for p in n..<(n + 8) {
                #expect(try s.pageTableEntry(at: a + UInt64(p) * page).kind == .present)
                #expect(try s.load(UInt32.self, at: a + UInt64(p) * page) == UInt32(p))
            }
            #expect(try s.load(UInt32.self, at: a + 5 * page) == 5)
            fd.close()
            try dev.release()
            for pm in fillers { try m.unregisterPagemap(pm) }
        }
    }
}
