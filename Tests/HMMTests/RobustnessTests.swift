import Dispatch
import Synchronization
import Testing
@_spi(Engine) @testable import HMM
import HMMDevices

#if canImport(Glibc)
import Glibc
#endif

/// What a seeded fuzz of the public API and free-running races found (issue 14): abandoned migrations,
/// protection lost through migration, a fork child's entry never restored, mirrors left incoherent by
/// reverse-map unmaps, a read racing a fault-back. Each test failed before its fix; a case that used to
/// hang first checks the entry it would wait on, so the suite itself never hangs.
@Suite("Robustness", .serialized)
struct RobustnessTests {
    func withDevices(_ body: (Machine, MirrorDeviceSet, AddressSpace) throws -> Void) throws {
        try withMachine(.init(systemMemory: 64 << 20)) { m in
            let devices = try MirrorDeviceSet(machine: m, chunkSize: 8 << 20)
            let s = try m.makeAddressSpace()
            try body(m, devices, s)
        }
    }

    func fill(_ s: AddressSpace, _ a: UInt64, pages: Int, _ value: (Int) -> UInt8) throws {
        for p in 0..<pages { try s.write([UInt8](repeating: value(p), count: Int(page)), at: a + UInt64(p) * page) }
    }

    func anonymous(_ s: AddressSpace, pages: Int, _ value: (Int) -> UInt8) throws -> UInt64 {
        let a = try s.map(length: pages * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
        try fill(s, a, pages: pages, value)
        return a
    }

    /// A THP window of 2 MiB filled with `value(page)`.
    func thp(_ s: AddressSpace, _ value: (Int) -> UInt8) throws -> UInt64 {
        let base = try s.map(length: 2 * PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous])
        let w = (base + pmdSize - 1) & ~(pmdSize - 1)
        try s.advise(w, length: PageSize.pmd, .hugePage)
        try fill(s, w, pages: PageSize.pagesPerPMD, value)
        return w
    }

    // MARK: 1. abandoned migrations

    @Test("item 1: migrate_device_finalize after a refused pages() restores every source; nothing waits forever")
    func abandonedEviction() throws {
        try withDevices { m, devices, s in
            let dev = try devices.device(0)
            let fd = try dev.open(s)
            let a = try anonymous(s, pages: 4) { UInt8(0x40 + $0) }
            _ = try fd.migrateToDevice(a, pages: 4, into: nil)
            let pfns = try (0..<4).map { try #require(try s.pageTableEntry(at: a + UInt64($0) * page).pfn) }
            let free = m.freeFrames
            let md = try MigrateDevice(machine: m, pfns: pfns)
            #expect(md.src.allSatisfy { $0.isMigrating })
            md.dst[0] = MigratePFN(try #require(m.allocateMigrationPage()))
            md.dst[1] = MigratePFN(m.zeroPFN)  // not a locked destination: pages() refuses the lot
            expectError(.invalidArgument) { try md.pages() }
            md.finalize()
            #expect(m.freeFrames == free, "the valid destination was given back")
            var restored = true
            for (i, p) in pfns.enumerated() {
                let e = try s.pageTableEntry(at: a + UInt64(i) * page)
                #expect(e.kind == .devicePrivateWrite && e.pfn == p, "page \(i): \(e)")
                restored = restored && e.kind == .devicePrivateWrite
                #expect(try m.pageInfo(p).refcount == 1 && !m.pageInfo(p).isLocked)
            }
            // Only once no migration entry is left can a read not wait forever.
            if restored {
                for i in 0..<4 { #expect(try s.read(count: 1, at: a + UInt64(i) * page) == [UInt8(0x40 + i)]) }
            }
            fd.close()
        }
    }

    @Test("item 1: migrate_vma_finalize without, or after a refused, pages() leaves every source mapped as it was")
    func abandonedMigrateVMA() throws {
        try withDevices { m, devices, s in
            let dev = try devices.device(0)
            let a = try anonymous(s, pages: 4) { UInt8(0x10 + $0) }
            let before = try (0..<4).map { try s.pageTableEntry(at: a + UInt64($0) * page) }
            for refusePages in [true, false] {
                let free = m.freeFrames
                try s.withMmapReadLock { () throws(HMMError) in
                    let mv = try MigrateVMA(space: s, start: a, end: a + 4 * page, select: .system, owner: dev)
                    try mv.setup()
                    #expect(mv.cpages == 4)
                    mv.dst[0] = MigratePFN(m.allocateMigrationPage()!)
                    mv.dst[2] = MigratePFN(m.allocateMigrationPage()!)
                    if refusePages {
                        mv.dst[1] = MigratePFN(m.zeroPFN)
                        expectError(.invalidArgument) { try mv.pages() }
                    }
                    mv.finalize()
                }
                #expect(m.freeFrames == free)
                for i in 0..<4 {
                    let e = try s.pageTableEntry(at: a + UInt64(i) * page)
                    #expect(e.kind == .present && e.pfn == before[i].pfn && e.isWritable, "page \(i): \(e)")
                }
            }
            for i in 0..<4 { #expect(try s.read(count: 1, at: a + UInt64(i) * page) == [UInt8(0x10 + i)]) }
        }
    }

    // MARK: 2. PROT_NONE

    @Test("item 2: evicting device pages of a PROT_NONE VMA installs inaccessible entries (remove_migration_pte uses vm_page_prot)")
    func protNoneSurvivesEviction() throws {
        try withDevices { m, devices, s in
            let dev = try devices.device(1)
            let fd = try dev.open(s)
            let a = try anonymous(s, pages: 2) { UInt8(0x77 + $0) }
            _ = try fd.migrateToDevice(a, pages: 2, into: nil)
            try s.protect(a, length: 2 * Int(page), .none)
            try dev.release()
            for i in 0..<2 {
                let e = try s.pageTableEntry(at: a + UInt64(i) * page)
                #expect(e.kind == .present && !e.isAccessible, "\(e)")
            }
            expectError(.segmentationFault) { try s.read(count: 1, at: a) }
            try s.protect(a, length: 2 * Int(page), [.read])
            expectError(.segmentationFault) { try s.write([1], at: a) }
            #expect(try s.read(count: 1, at: a + page) == [0x78])
            fd.close()
        }
    }

    @Test("item 2: a migrate_vma that restores its sources keeps PROT_NONE, 4 KiB and 2 MiB")
    func protNoneSurvivesRestore() throws {
        try withDevices { m, devices, s in
            let a = try anonymous(s, pages: 2) { UInt8(0x21 + $0) }
            let w = try thp(s) { UInt8($0 & 0xFF) }
            try s.protect(a, length: 2 * Int(page), .none)
            try s.protect(w, length: PageSize.pmd, .none)
            #expect(try s.pageTableEntry(at: w).level == .pmd)
            try s.withMmapReadLock { () throws(HMMError) in
                for (start, end, select) in [(a, a + 2 * page, MigrateSelect.system), (w, w + pmdSize, [.system, .compound])] {
                    let mv = try MigrateVMA(space: s, start: start, end: end, select: select, owner: nil)
                    try mv.setup()
                    #expect(mv.cpages > 0)
                    try mv.pages()  // no destinations: every source stays
                    mv.finalize()
                }
            }
            for addr in [a, a + page, w, w + 100 * page] {
                let e = try s.pageTableEntry(at: addr)
                #expect(e.kind == .present && !e.isAccessible, "\(hex(addr)): \(e)")
                expectError(.segmentationFault) { try s.read(count: 1, at: addr) }
            }
            try s.protect(w, length: PageSize.pmd, [.read, .write])
            #expect(try s.read(count: 1, at: w + 100 * page) == [100])
        }
    }

    // MARK: 3. device THP shared with a fork child, split on its way back

    @Test("item 3: a fork-shared device THP split on its way back (no 2 MiB system folio) restores the child's entries")
    func forkSharedDeviceTHPSplitOnReturn() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let w = try thp(s) { UInt8(($0 * 3) & 0xFF) }
            _ = try fd.migrateToDevice(w, pages: 512, into: nil)
            #expect(try s.pageTableEntry(at: w).level == .pmd)
            let child = try s.fork()
            try fd.setFlags(.failAllocation)  // the fault-back finds no 2 MiB system folio
            #expect(try s.read(count: 1, at: w + 5 * page) == [15])
            var clean = true
            for p in [0, 7, 300, 511] {
                let e = try child.pageTableEntry(at: w + UInt64(p) * page)
                #expect(!e.entry.isMigration, "child page \(p): \(e)")
                clean = clean && !e.entry.isMigration
            }
            if clean {
                for p in [0, 7, 300, 511] {
                    #expect(try child.read(count: 1, at: w + UInt64(p) * page) == [UInt8((p * 3) & 0xFF)])
                }
            }
            child.exit()
            fd.close()
        }
    }

    // MARK: 4. mirror coherence across reverse-map unmaps

    @Test("item 4: migrating a page shared after fork invalidates the child's mirror; it never reads another process's bytes")
    func childMirrorSeesRmapMigration() throws {
        try withDevices { m, devices, s in
            let a = try anonymous(s, pages: 1) { _ in 0xA1 }
            let child = try s.fork()
            let childMirror = try devices.device(1).open(child)
            var bytes = [UInt8](repeating: 0, count: Int(page))
            _ = try childMirror.read(a, pages: 1, into: &bytes)
            #expect(bytes[0] == 0xA1 && childMirror.mappedPages == 1)
            // The parent moves the (shared) page to its device: the child's mapping changes through the
            // reverse map, and the old frame is freed.
            let parentMirror = try devices.device(0).open(s)
            _ = try parentMirror.migrateToDevice(a, pages: 1, into: nil)
            #expect(childMirror.mappedPages == 0, "the child's mirror heard the clear")
            // Someone else takes the freed frame and fills it with a secret.
            let other = try m.makeAddressSpace()
            _ = try anonymous(other, pages: 32) { _ in 0x5E }
            _ = try childMirror.read(a, pages: 1, into: &bytes)
            #expect(bytes.allSatisfy { $0 == 0xA1 }, "child mirror read \(bytes[0])")
            other.exit()
            child.exit()
            childMirror.close()
            parentMirror.close()
        }
    }

    @Test("item 4: a long-term pin moving a coherent page out invalidates the mirror; a device write lands in the right page")
    func mirrorSeesCoherentPinMigration() throws {
        try withDevices { m, devices, s in
            let coherent = try devices.device(2)
            let fd = try coherent.open(s)
            let a = try anonymous(s, pages: 1) { _ in 0x11 }
            _ = try fd.migrateToDevice(a, pages: 1, into: nil)
            let c = try #require(try s.pageTableEntry(at: a).pfn)
            #expect(m.deviceKind(c) == .deviceCoherent)
            let mirror = try devices.device(0).open(s)
            var bytes = [UInt8](repeating: 0, count: Int(page))
            _ = try mirror.read(a, pages: 1, into: &bytes)
            _ = try mirror.write(a, pages: 1, from: [UInt8](repeating: 0x12, count: Int(page)))
            #expect(mirror.mappedPages == 1)
            let pin = try s.getUserPages(a, count: 1, flags: [.write, .pin, .longTerm])
            #expect(try s.pageTableEntry(at: a).pfn != c, "the pin moved the page to RAM")
            #expect(mirror.mappedPages == 0)
            // Another process's page lands in the freed coherent frame.
            let other = try m.makeAddressSpace()
            let otherFD = try coherent.open(other)
            let b = try anonymous(other, pages: 8) { _ in 0x99 }
            _ = try otherFD.migrateToDevice(b, pages: 8, into: nil)
            _ = try mirror.write(a, pages: 1, from: [UInt8](repeating: 0x13, count: Int(page)))
            #expect(try s.read(count: 1, at: a) == [0x13])
            for i in 0..<8 { #expect(try other.read(count: 1, at: b + UInt64(i) * page) == [0x99]) }
            pin.release()
            other.exit()
            otherFD.close()
            mirror.close()
            fd.close()
        }
    }

    // MARK: 5. a device read racing the fault-back of the device's own page

    @Test("item 5: a device read racing the CPU fault-back of its own page retries instead of reading a reused frame")
    func readRacingOwnFaultBack() throws {
        try withDevices { m, devices, s in
            let dev = try devices.device(0)
            let fd = try dev.open(s)
            let a = try anonymous(s, pages: 1) { _ in 0x3C }
            _ = try fd.migrateToDevice(a, pages: 1, into: nil)
            let x = try #require(try s.pageTableEntry(at: a).pfn)
            // A second open has no table entry yet: its read walks with hmm_range_fault and reports `x`.
            let reader = try dev.open(s)
            let other = try m.makeAddressSpace()
            let otherFD = try dev.open(other)
            let b = try anonymous(other, pages: 1) { _ in 0xEE }
            let fired = Atomic<Bool>(false)
            let reused = Atomic<Bool>(false)
            m.hooks.set(.rangeFaultAfterWalk) {
                guard !fired.exchange(true, ordering: .acquiringAndReleasing) else { return }
                // The walk saw `x`. Now the CPU takes the page back and the frame goes to another process.
                let t = TestThread {
                    _ = try? s.read(count: 1, at: a)
                    _ = try? otherFD.migrateToDevice(b, pages: 1, into: nil)
                    reused.store((try? other.pageTableEntry(at: b).pfn) == x, ordering: .releasing)
                }
                t.join()
            }
            var bytes = [UInt8](repeating: 0, count: Int(page))
            _ = try reader.read(a, pages: 1, into: &bytes)
            m.hooks.set(.rangeFaultAfterWalk, nil)
            let (didFire, didReuse) = (fired.load(ordering: .acquiring), reused.load(ordering: .acquiring))
            #expect(didFire)
            #expect(didReuse, "the freed frame went to the other process")
            #expect(bytes.allSatisfy { $0 == 0x3C }, "read \(bytes[0])")
            other.exit()
            for f in [fd, reader, otherFD] { f.close() }
        }
    }
}

/// Items 6–10 of issue 14 and the API a new user tripped on.
@Suite("Robustness: driver API", .serialized)
struct RobustnessDriverTests {
    let helpers = RobustnessTests()

    func withDevices(_ body: (Machine, MirrorDeviceSet, AddressSpace) throws -> Void) throws {
        try helpers.withDevices(body)
    }

    /// Runs `body` on a thread and waits at most `seconds` for it; false if it did not finish (the thread
    /// is then left behind: this is how a test of a former hang fails without hanging the suite).
    func finishes(within seconds: Int, _ body: @escaping @Sendable () -> Void) -> Bool {
        let done = Atomic<Bool>(false)
        let t = TestThread {
            body()
            done.store(true, ordering: .releasing)
        }
        let until = DispatchTime.now() + .seconds(seconds)
        while !done.load(ordering: .acquiring) && DispatchTime.now() < until { usleep(1000) }
        guard done.load(ordering: .acquiring) else { return false }
        t.join()
        return true
    }

    @Test("item 6: a device write over its own read-only device-private page (fork, mprotect) migrates it back, never loops")
    func deviceWriteOverOwnReadOnlyPage() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let a = try helpers.anonymous(s, pages: 2) { _ in 0x61 }
            _ = try fd.migrateToDevice(a, pages: 2, into: nil)
            let child = try s.fork()
            #expect(try s.pageTableEntry(at: a).kind == .devicePrivateRead)
            let wrote = Locked<Result<MirrorResult, HMMError>?>(nil)
            let data = [UInt8](repeating: 0x62, count: Int(page))
            let ok = finishes(within: 10) {
                let r = Result { () throws(HMMError) in try fd.write(a, pages: 1, from: data) }
                wrote.withLock { $0 = r }
            }
            #expect(ok, "the device write never finished")
            guard ok else { return }
            #expect(try wrote.withLock { $0 }?.get().cpages == 1)
            #expect(try s.read(count: 1, at: a) == [0x62])
            #expect(try child.read(count: 1, at: a) == [0x61], "the child keeps its copy")
            child.exit()
            // mprotect(PROT_READ): the device page is read-only because the VMA is; the write is refused.
            try s.protect(a + page, length: Int(page), [.read])
            #expect(try s.pageTableEntry(at: a + page).kind == .devicePrivateRead)
            let refused = Locked<HMMError?>(nil)
            #expect(finishes(within: 10) {
                do throws(HMMError) { _ = try fd.write(a + page, pages: 1, from: data) } catch { refused.withLock { $0 = error } }
            })
            #expect(refused.withLock { $0 }?.code == .permission)
            #expect(try s.read(count: 1, at: a + page) == [0x61])
            fd.close()
        }
    }

    @Test("item 7: ranges too large for one migration or one hmm_range throw instead of allocating a word per page")
    func hugeRanges() throws {
        try withDevices { m, devices, s in
            let dev = try devices.device(0)
            let top: UInt64 = 0x7FFF_FFFF_F000
            expectError(.invalidArgument) { try MigrateVMA(space: s, start: 0, end: top, select: .system, owner: dev) }
            expectError(.invalidArgument) { try MigrateVMA(space: s, start: 0, end: UInt64.max, select: .system, owner: dev) }
            let n = try s.insertIntervalNotifier(start: 0, length: top, SilentNotifier())
            expectError(.invalidArgument) { try HMMRange(notifier: n, start: 0, end: top) }
            expectError(.invalidArgument) { try HMMRange(notifier: n, start: page, end: page) }
            expectError(.invalidArgument) { try HMMRange(notifier: n, start: 1, end: page) }
            let fits = try HMMRange(notifier: n, start: 0, end: UInt64(HMMRange.maximumPages) * page)
            #expect(fits.pfns.count == HMMRange.maximumPages)
            n.remove()
        }
    }

    @Test("item 8: device-exclusive access to a device-coherent page is granted as the kernel grants it, and restored on touch")
    func exclusiveOnCoherentPage() throws {
        try withDevices { m, devices, s in
            let coherent = try devices.device(2).open(s)
            let a = try helpers.anonymous(s, pages: 2) { UInt8(0x30 + $0) }
            _ = try coherent.migrateToDevice(a, pages: 2, into: nil)
            let c = try #require(try s.pageTableEntry(at: a).pfn)
            #expect(m.deviceKind(c) == .deviceCoherent)
            let fd = try devices.device(0).open(s)
            var mirror = [UInt8](repeating: 0, count: 2 * Int(page))
            #expect(try fd.makeExclusive(a, pages: 2, into: &mirror).cpages == 2)
            #expect(mirror[0] == 0x30 && mirror[Int(page)] == 0x31)
            let e = try s.pageTableEntry(at: a)
            #expect(e.kind == .deviceExclusive && e.pfn == c)
            #expect(try m.pageInfo(c).mapcount == 1)
            try m.checkInvariants()
            expectError(.permission) { try fd.checkExclusive(a, pages: 2) }
            #expect(try s.read(count: 1, at: a) == [0x30])  // the CPU touch restores the entry
            #expect(try s.pageTableEntry(at: a).kind == .present)
            try s.write([0x3F], at: a + page)
            try fd.checkExclusive(a, pages: 2)
            #expect(try coherent.migrateToSystem(a, pages: 2).cpages == 2)
            #expect(try s.read(count: 1, at: a + page) == [0x3F])
            fd.close()
            coherent.close()
        }
    }

    @Test("item 9: checkExclusive over 2^35 pages costs what the device table holds, not the range's width")
    func checkExclusiveCost() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let a = try helpers.anonymous(s, pages: 1) { _ in 1 }
            var mirror = [UInt8](repeating: 0, count: Int(page))
            _ = try fd.makeExclusive(a, pages: 1, into: &mirror)
            let held = Locked<HMMError.Code?>(nil)
            let ok = finishes(within: 10) {
                do throws(HMMError) { try fd.checkExclusive(0, pages: 1 << 35) } catch { held.withLock { $0 = error.code } }
            }
            #expect(ok, "checkExclusive walked every page number")
            #expect(held.withLock { $0 } == .permission)
            try fd.checkExclusive(a + page, pages: (1 << 35) - Int(a >> 12) - 1)
            fd.close()
        }
    }

    @Test("item 10: a dropped MirrorFile (closed or not) and a dropped, never-exited space give every frame back")
    func droppedFileAndSpaceReturnFrames() throws {
        try withDevices { m, devices, s in
            let dev = try devices.device(0)
            let free = m.freeFrames
            for close in [true, false] {
                weak var weakFile: MirrorFile?
                weak var weakSpace: AddressSpace?
                do {
                    let space = try m.makeAddressSpace()
                    let a = try helpers.anonymous(space, pages: 64) { UInt8($0) }
                    let file = try dev.open(space)
                    var bytes = [UInt8](repeating: 0, count: 8 * Int(page))
                    _ = try file.read(a, pages: 8, into: &bytes)
                    _ = try file.migrateToDevice(a + 8 * page, pages: 8, into: nil)
                    if close { file.close() }
                    weakFile = file
                    weakSpace = space
                }
                #expect(weakFile == nil, "the file was released (close: \(close))")
                #expect(weakSpace == nil, "the space was released (close: \(close))")
                #expect(m.freeFrames == free, "every frame came back (close: \(close))")
                #expect(dev.pagesInUse == 0)
            }
        }
    }

    @Test("contracts: migrate_vma phases without mmapLock, device selection without an owner, and a released destination")
    func contracts() throws {
        try withDevices { m, devices, s in
            let dev = try devices.device(0)
            let a = try helpers.anonymous(s, pages: 2) { _ in 7 }
            let before = try s.pageTableEntry(at: a)
            let m1 = try MigrateVMA(space: s, start: a, end: a + 2 * page, select: .system, owner: dev)
            expectError(.invalidArgument) { try m1.setup() }  // no mmapLock held
            #expect(try s.pageTableEntry(at: a) == before)
            try s.withMmapReadLock {
                let m2 = try MigrateVMA(space: s, start: a, end: a + 2 * page, select: .devicePrivate, owner: nil)
                expectError(.invalidArgument) { try m2.setup() }
                let m3 = try MigrateVMA(space: s, start: a, end: a + 2 * page, select: .system, owner: dev)
                try m3.setup()
                #expect(m3.cpages == 2)
                let d = try #require(m.allocateMigrationPage(zeroed: false))
                try m.copyPage(from: try #require(m3.src[0].pfn), to: d)
                m3.dst[0] = MigratePFN(d)
                // The driver changes its mind about a destination it has not handed over yet.
                let spare = try #require(m.allocateMigrationPage())
                try m.releaseMigrationPage(spare)
                expectError(.invalidArgument) { try m.releaseMigrationPage(spare) }  // already given back
                expectError(.invalidArgument) { try m.releaseMigrationPage(m.zeroPFN) }
                expectError(.invalidArgument) { try m.releaseMigrationPage(before.pfn!) }  // a mapped page
                try m3.pages()
                m3.finalize()
            }
            // finalize of a migration whose caller dropped the lock takes it itself.
            let m4 = try s.withMmapReadLock { () throws(HMMError) -> MigrateVMA in
                let m4 = try MigrateVMA(space: s, start: a, end: a + 2 * page, select: .system, owner: dev)
                try m4.setup()
                return m4
            }
            m4.finalize()
            #expect(try s.read(count: 1, at: a + page) == [7])
            #expect(try s.read(count: 1, at: a) == [7])
        }
    }

    // MARK: what the fuzz found on its own

    @Test("fuzz finding: entries made in a PROT_NONE VMA by fork of a device-exclusive entry and by migrate_vma hole insertion are inaccessible")
    func protNoneEntriesFromForkAndHoles() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let a = try helpers.anonymous(s, pages: 1) { _ in 0x4D }
            var mirror = [UInt8](repeating: 0, count: Int(page))
            _ = try fd.makeExclusive(a, pages: 1, into: &mirror)
            try s.protect(a, length: Int(page), .none)  // mprotect leaves the exclusive entry alone
            #expect(try s.pageTableEntry(at: a).kind == .deviceExclusive)
            let child = try s.fork()  // restores the parent's entry and shares it
            for space in [s, child] {
                let e = try space.pageTableEntry(at: a)
                #expect(e.kind == .present && !e.isAccessible, "\(e)")
                expectError(.segmentationFault) { try space.read(count: 1, at: a) }
            }
            child.exit()
            // A hole of a PROT_NONE VMA filled by migrate_vma (a system destination).
            let hole = try s.map(length: Int(page), protection: .none, flags: [.private, .anonymous])
            try s.withMmapReadLock { () throws(HMMError) in
                let mv = try MigrateVMA(space: s, start: hole, end: hole + page, select: .system, owner: nil)
                try mv.setup()
                #expect(mv.cpages == 1)
                mv.dst[0] = MigratePFN(m.allocateMigrationPage()!)
                try mv.pages()
                mv.finalize()
            }
            let e = try s.pageTableEntry(at: hole)
            #expect(e.kind == .present && !e.isAccessible, "\(e)")
            expectError(.segmentationFault) { try s.read(count: 1, at: hole) }
            try s.protect(a, length: Int(page), [.read])
            #expect(try s.read(count: 1, at: a) == [0x4D])
            fd.close()
        }
    }

    @Test("fuzz finding: MREMAP_FIXED onto part of a hugetlb page is EINVAL and changes nothing (it used to leave an unaligned hugetlb VMA whose next fault spun forever)")
    func remapFixedIntoHugetlbPage() throws {
        try withMachine(.init(systemMemory: 64 << 20, hugetlbPages: 2)) { m in
            let s = try m.makeAddressSpace()
            let h = try s.map(length: PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous, .hugetlb])
            try s.write([0x48], at: h + 5 * page)
            let a = try helpers.anonymous(s, pages: 3) { _ in 0x41 }
            let before = s.mappings
            expectError(.invalidArgument) {
                try s.remap(a, length: 3 * Int(page), newLength: 3 * Int(page), flags: [.mayMove, .fixed], to: h + 0xBE000)
            }
            #expect(s.mappings == before)
            #expect(try s.read(count: 1, at: h + 0xBE000) == [0])
            #expect(try s.read(count: 1, at: h + 5 * page) == [0x48])
            #expect(try s.read(count: 1, at: a + 2 * page) == [0x41])
            try m.checkInvariants()
        }
    }
}
