import HMM
import HMMDevices
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The cases of `hmm-tests.c` (torvalds/linux @ 0eaed89c), in file order, each asserting exactly the
/// values `hmm-tests.c` asserts (its driver is `lib/test_hmm.c`). A forked child is a ``SelftestChild``: a forked
/// ``AddressSpace`` on its own thread, or natively a real child process.
enum SelftestCatalogue {
    static func hmm(_ name: String, pending: String? = nil, knownFailures: [SelftestVariant: String] = [:],
                    nativeSkip: String? = nil, nativeKnownFailures: [SelftestVariant: String] = [:],
                    systemMemory: Int = 256 << 20, forks: Bool = false,
                    _ body: @escaping @Sendable (SelftestContext) throws -> Void) -> Selftest {
        Selftest(name: "hmm." + name, fixture: .hmm, pending: pending, knownFailures: knownFailures,
                 nativeSkip: nativeSkip, nativeKnownFailures: nativeKnownFailures, systemMemory: systemMemory, forks: forks,
                 body: body)
    }

    /// Why a case that needs the huge zero page from a first read fails natively: the engine gives a
    /// first write of an advised 2 MiB unit a THP, but a first read gets the 4 KiB zero page (userfaultfd
    /// cannot map the huge zero page), so the window is small pages and FAIL_ALLOC meets an order-0 page.
    static let nativeFirstReadIsSmall =
        "a first read natively maps the 4 KiB zero page, not the huge zero page (userfaultfd cannot map it), so FAIL_ALLOC hits an order-0 page: ENOENT"

    /// Why MADV_FREE fails on coherent pages natively: they are mapped in place from device memory's
    /// shared-memory file, and the host refuses MADV_FREE on shared mappings (EINVAL).
    static let nativeCoherentIsShared =
        "coherent pages are mapped in place from a shared-memory file natively, and the host refuses MADV_FREE on shared mappings (EINVAL)"

    /// Why T36 fails in the coherent variant, here as with `lib/test_hmm.c`: a coherent dmirror has one
    /// fixed chunk of order-0 pages and cannot add a chunk of 2 MiB folios, so the THP is split on its way
    /// to the device; the FAIL_ALLOC set before MIGRATE_TO_SYS then meets an order-0 device page, which
    /// `dmirror_devmem_fault_alloc_and_copy` fails as `VM_FAULT_OOM` (ENOMEM).
    static let coherentHasNoDeviceTHP =
        "device-coherent dmirror memory has no 2 MiB folios, so FAIL_ALLOC hits an order-0 page: MIGRATE_TO_SYS fails with ENOMEM as upstream"


    static func hmm2(_ name: String, _ body: @escaping @Sendable (SelftestContext) throws -> Void) -> Selftest {
        Selftest(name: "hmm2." + name, fixture: .hmm2, pending: nil, body: body)
    }

    static let cases: [Selftest] = [
        hmm("open_close") { _ in },
        hmm("anon_read", anonRead),
        hmm("anon_read_prot", anonReadProt),
        hmm("anon_write", anonWrite),
        hmm("anon_write_prot", anonWriteProt),
        hmm("anon_write_child", forks: true, anonWriteChild),
        hmm("anon_write_child_shared", forks: true, anonWriteChildShared),
        hmm("anon_write_huge", anonWriteHuge),
        hmm("anon_write_hugetlbfs", anonWriteHugetlbfs),
        hmm("file_read", fileRead),
        hmm("file_write", fileWrite),
        hmm("migrate", migrate),
        hmm("migrate_file_private", migrateFilePrivate),
        hmm("migrate_fault", migrateFault),
        hmm("migrate_release", migrateRelease),
        hmm("migrate_shared", migrateShared),
        hmm2("migrate_mixed", migrateMixed),
        hmm("migrate_multiple", migrateMultiple),
        hmm("anon_read_multiple", anonReadMultiple),
        hmm("anon_teardown", anonTeardown),
        hmm("mixedmap", nativeSkip: "needs a driver mmap (VM_MIXEDMAP) of the device file; natively there is no device file", mixedmap),
        hmm2("snapshot", snapshot),
        hmm("compound", compound),
        hmm2("double_map", doubleMap),
        hmm("exclusive", exclusive),
        hmm("exclusive_mprotect", exclusiveMprotect),
        hmm("exclusive_cow", forks: true, exclusiveCOW),
        hmm("hmm_gup_test", gupTest),
        hmm("hmm_cow_in_device", forks: true, cowInDevice),
        hmm("migrate_anon_huge_empty", migrateAnonHugeEmpty),
        hmm("migrate_anon_huge_zero", migrateAnonHugeZero),
        hmm("migrate_anon_huge_free", nativeKnownFailures: [.deviceCoherent: nativeCoherentIsShared], migrateAnonHugeFree),
        hmm("migrate_anon_huge_fault", migrateAnonHugeFault),
        hmm("migrate_partial_unmap_fault", migratePartialUnmapFault),
        hmm("migrate_remap_fault", migrateRemapFault),
        hmm("migrate_anon_huge_err", knownFailures: [.deviceCoherent: coherentHasNoDeviceTHP], migrateAnonHugeErr),
        hmm("migrate_anon_huge_zero_err",
            nativeSkip: "its second half reads through a stale pointer, counting on the next mmap landing at the unmapped address; "
                + "in a multi-threaded process another thread's mapping may be there (and where it does land, " + nativeFirstReadIsSmall + ")",
            migrateAnonHugeZeroErr),
        hmm("benchmark_thp_migration", systemMemory: 1 << 30, benchmarkTHPMigration),
    ]

    typealias Buffer = SelftestContext.Buffer

    /// A 4 MiB private anonymous read-write buffer.
    static func anonBuffer(_ t: SelftestContext, _ prot: Protection = [.read, .write]) throws -> Buffer {
        Buffer(ptr: try t.map(t.bufferSize, prot), size: t.bufferSize)
    }

    // T2
    static func anonRead(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = try anonBuffer(t)
        try t.fill(b.ptr, b.size, from: 2 * t.page / 4) { Int32($0) }
        try t.process.protect(b.ptr, length: b.size, [.read])
        let v: Int32 = try t.process.load(at: b.ptr + UInt64(t.page))
        try t.expectEqual(v, 0, "zero page read")
        try t.expectSuccess(t.fd, .read, b, npages, faults: 1)
        try t.expectPattern(t.mirrorInts(b), "mirror") { $0 < 2 * t.page / 4 ? 0 : Int32($0) }
    }

    // T3
    static func anonReadProt(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = try anonBuffer(t)
        try t.fill(b.ptr, b.size) { Int32($0) }
        t.setMirror(b) { -Int32($0) }
        try t.process.protect(b.ptr, length: b.size, .none)
        try t.expectEqual(t.cmd(t.fd, .read, b, npages), -EFAULT, "READ of PROT_NONE")
        try t.process.protect(b.ptr, length: b.size, [.read])
        try t.expectPattern(t.ints(b.ptr, b.size), "buffer") { Int32($0) }
        try t.expectPattern(t.mirrorInts(b), "mirror") { -Int32($0) }
    }

    // T4
    static func anonWrite(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = try anonBuffer(t)
        t.setMirror(b) { Int32($0) }
        try t.expectSuccess(t.fd, .write, b, npages, faults: 1)
        try t.expectPattern(t.ints(b.ptr, b.size), "buffer") { Int32($0) }
    }

    // T5
    static func anonWriteProt(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = try anonBuffer(t, [.read])
        try t.expectSuccess(t.fd, .read, b, 1, faults: 1)
        t.setMirror(b) { Int32($0) }
        try t.expectEqual(t.cmd(t.fd, .write, b, npages), -EPERM, "WRITE to PROT_READ")
        try t.expectPattern(t.ints(b.ptr, b.size), "buffer") { _ in 0 }
        try t.process.protect(b.ptr, length: b.size, [.read, .write])
        try t.expectSuccess(t.fd, .write, b, npages, faults: 1)
        try t.expectPattern(t.ints(b.ptr, b.size), "buffer") { Int32($0) }
    }

    // T6
    static func anonWriteChild(_ t: SelftestContext) throws {
        for migrate in [false, true] {
            for useTHP in [false, true] {
                let size = useTHP ? PageSize.pmd : t.bufferSize
                let npages = size / t.page
                let base = try t.map(2 * size, [.read, .write])
                let ptr = useTHP ? try t.thpWindow(base, huge: true) : base
                let b = Buffer(ptr: ptr, size: size)
                try t.fill(ptr, size) { Int32($0) }
                t.setMirror(b) { -Int32($0) }
                if migrate {
                    try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
                }
                // Child: sees the pattern (faulting shared device pages back), writes −i through device 0.
                try t.fork { c in
                    try c.expectPattern(c.ints(ptr, size), "child buffer") { Int32($0) }
                    if !migrate { try c.expectPattern(c.mirrorInts(b), "child mirror") { -Int32($0) } }
                    try c.adopt(ptr, size)
                    try c.expectSuccess(c.fd, .write, b, npages, faults: 1)
                    if !migrate { try c.expectPattern(c.ints(ptr, size), "child buffer after WRITE") { -Int32($0) } }
                }.wait()
                // Parent.
                try t.expectPattern(t.ints(ptr, size), "parent buffer") { Int32($0) }
                try t.process.unmap(base, length: 2 * size)
            }
        }
    }

    // T7
    static func anonWriteChildShared(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = Buffer(ptr: try t.map(t.bufferSize, [.read, .write], [.shared, .anonymous]), size: t.bufferSize)
        try t.fill(b.ptr, b.size) { Int32($0) }
        t.setMirror(b) { -Int32($0) }
        try t.fork { c in
            try c.expectPattern(c.ints(b.ptr, b.size), "child buffer") { Int32($0) }
            try c.expectPattern(c.mirrorInts(b), "child mirror") { -Int32($0) }
            try c.expectSuccess(c.fd, .write, b, npages, faults: 1)
            try c.expectPattern(c.ints(b.ptr, b.size), "child buffer") { -Int32($0) }
        }.wait()
        try t.expectPattern(t.ints(b.ptr, b.size), "parent buffer") { -Int32($0) }
    }

    // T8
    static func anonWriteHuge(_ t: SelftestContext) throws {
        let size = PageSize.pmd
        let npages = size / t.page
        let base = try t.map(2 * size, [.read, .write])
        let b = Buffer(ptr: try t.thpWindow(base, huge: true), size: size)
        t.setMirror(b) { Int32($0) }
        try t.expectSuccess(t.fd, .write, b, npages, faults: 1)
        try t.expectPattern(t.ints(b.ptr, size), "buffer") { Int32($0) }
    }

    // T9
    static func anonWriteHugetlbfs(_ t: SelftestContext) throws {
        guard t.machine.freeHugetlbPages > 0 else { throw SelftestSkip(reason: "Not enough huge pages") }
        let size = PageSize.pmd
        let npages = size / t.page
        guard let ptr = try? t.map(size, [.read, .write], [.private, .anonymous, .hugetlb]) else {
            throw SelftestSkip(reason: "Huge page could not be allocated")
        }
        let b = Buffer(ptr: ptr, size: size)
        t.setMirror(b) { Int32($0) }
        try t.expectSuccess(t.fd, .write, b, npages, faults: 1)
        try t.expectPattern(t.ints(ptr, size), "buffer") { Int32($0) }
        try t.process.unmap(ptr, length: size)
    }

    static func patternFile(_ t: SelftestContext) throws -> MemoryFile {
        let file = try t.machine.makeFile(size: t.bufferSize)
        let ints = (0..<(t.bufferSize / 4)).map { Int32($0) }
        let written = try ints.withUnsafeBytes { b in try file.write(b, at: 0) }
        try t.expectEqual(written, t.bufferSize, "pwrite length")
        return file
    }

    // T10
    static func fileRead(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let file = try patternFile(t)
        let b = Buffer(ptr: try t.map(t.bufferSize, [.read], [.shared], file: file), size: t.bufferSize)
        try t.expectSuccess(t.fd, .read, b, npages, faults: 1)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
    }

    // T11
    static func fileWrite(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let file = try t.machine.makeFile(size: t.bufferSize)
        let b = Buffer(ptr: try t.map(t.bufferSize, [.read, .write], [.shared], file: file), size: t.bufferSize)
        t.setMirror(b) { Int32($0) }
        try t.expectSuccess(t.fd, .write, b, npages, faults: 1)
        try t.expectPattern(t.ints(b.ptr, b.size), "mapping") { Int32($0) }
        var back = [Int32](repeating: 0, count: t.bufferSize / 4)
        let n = try back.withUnsafeMutableBytes { buf in try file.read(into: buf, at: 0) }
        try t.expectEqual(n, t.bufferSize, "pread length")
        try t.expectPattern(back, "file") { Int32($0) }
    }

    // T12
    static func migrate(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = try anonBuffer(t)
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
    }

    // T13
    static func migrateFilePrivate(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let file = try t.machine.makeFile(size: t.bufferSize)
        let b = Buffer(ptr: try t.map(t.bufferSize, [.read, .write], [.private], file: file), size: t.bufferSize)
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
    }

    // T14
    static func migrateFault(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = try anonBuffer(t)
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
        try t.expectPattern(t.ints(b.ptr, b.size / 2), "first half") { Int32($0) }
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
    }

    // T15
    static func migrateRelease(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = try anonBuffer(t)
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
        try t.expectEqual(t.cmd(t.fd, .release, b, npages), 0, "RELEASE")
        try t.expectPattern(t.ints(b.ptr, b.size / 2), "first half") { Int32($0) }
    }

    // T16
    static func migrateShared(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = Buffer(ptr: try t.map(t.bufferSize, [.read, .write], [.shared, .anonymous]), size: t.bufferSize)
        try t.expectEqual(t.cmd(t.fd, .migrateToDevice, b, npages), -ENOENT, "MIGRATE_TO_DEV of shared memory")
    }

    // T17
    static func migrateMixed(_ t: SelftestContext) throws {
        let npages = 6
        let p = try t.map(npages * t.page, .none)
        let b = Buffer(ptr: p, size: npages * t.page)
        let pg = UInt64(t.page)
        let fd1 = t.fd1!
        try t.expectEqual(t.cmd(fd1, .migrateToDevice, b, npages), -EINVAL, "MIGRATE of PROT_NONE")
        try t.process.unmap(p + pg, length: t.page)
        try t.expectEqual(t.cmd(fd1, .migrateToDevice, b, 3), -EINVAL, "MIGRATE over a hole")
        try t.process.protect(p + 2 * pg, length: t.page, [.read])
        let z: Int32 = try t.process.load(at: p + 2 * pg)
        try t.expectEqual(z + 3, 3, "zero page value")
        try t.process.protect(p + 3 * pg, length: t.page, [.read, .write])
        try t.process.store(Int32(3), at: p + 3 * pg)
        try t.process.protect(p + 3 * pg, length: t.page, [.read])
        try t.process.protect(p + 4 * pg, length: 2 * t.page, [.read, .write])
        try t.process.store(Int32(3), at: p + 4 * pg)
        try t.process.store(Int32(3), at: p + 5 * pg)
        b.ptr = p + 2 * pg
        try t.expectSuccess(fd1, .migrateToDevice, b, 4)
        b.ptr = p + 5 * pg
        try t.expectEqual(t.cmd(t.fd0, .migrateToDevice, b, 1), -ENOENT, "MIGRATE of another device's page")
    }

    // T18
    static func migrateMultiple(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        for _ in 0..<10 {
            let b = try anonBuffer(t)
            try t.fill(b.ptr, b.size) { Int32($0) }
            try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
            try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
            if t.coherent {
                try t.expectSuccess(t.fd, .migrateToSystem, b, npages)
            }
            try t.expectPattern(t.ints(b.ptr, b.size), "buffer") { Int32($0) }
            try t.process.unmap(b.ptr, length: b.size)
        }
    }

    // T19
    static func anonReadMultiple(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        for c in 0..<10 {
            let b = try anonBuffer(t)
            try t.fill(b.ptr, b.size) { Int32($0 + c) }
            try t.expectSuccess(t.fd, .read, b, npages, faults: 1)
            try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0 + c) }
            try t.process.unmap(b.ptr, length: b.size)
        }
    }

    // T20
    static func anonTeardown(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        for c in 0..<10 {
            let b = try anonBuffer(t)
            try t.fill(b.ptr, b.size) { Int32($0 + c) }
            let process = Unchecked(t.process)
            let half = UInt64(b.size / 2)
            let ptr = b.ptr
            let delay = UInt32.random(in: 0..<32)
            let unmapper = HostThread {
                usleep(delay)
                try? process.value.unmap(ptr + half, length: Int(half))
            }
            let rc = t.cmd(t.fd, .read, b, npages)
            unmapper.join()
            if rc == 0 {
                try t.expectEqual(b.cpages, npages, "cpages")
                try t.expectEqual(b.faults, 1, "faults")
                try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0 + c) }
            }
            try t.process.unmap(b.ptr, length: Int(half))
        }
    }

    // T21
    static func mixedmap(_ t: SelftestContext) throws {
        let p = try t.fd.mmap(length: t.page, protection: [.read, .write], shared: false)
        let b = Buffer(ptr: p, size: t.page, mirror: 1)
        try t.expectSuccess(t.fd, .snapshot, b, 1)
        try t.expectEqual(b.mirror[0], MirrorProtection.read, "m[0]")
    }

    // T22
    static func snapshot(_ t: SelftestContext) throws {
        let npages = 7
        let p = try t.map(npages * t.page, .none)
        let pg = UInt64(t.page)
        try t.process.unmap(p + pg, length: t.page)
        try t.process.protect(p + 2 * pg, length: t.page, [.read])
        let z: Int32 = try t.process.load(at: p + 2 * pg)
        try t.expectEqual(z + 3, 3, "zero page value")
        try t.process.protect(p + 3 * pg, length: t.page, [.read, .write])
        try t.process.store(Int32(3), at: p + 3 * pg)
        try t.process.protect(p + 3 * pg, length: t.page, [.read])
        try t.process.protect(p + 4 * pg, length: 3 * t.page, [.read, .write])
        try t.process.store(Int32(3), at: p + 4 * pg)
        let b = Buffer(ptr: p + 5 * pg, size: t.page)
        try t.expectSuccess(t.fd0, .migrateToDevice, b, 1)
        b.ptr = p + 6 * pg
        try t.expectSuccess(t.fd1!, .migrateToDevice, b, 1)
        let s = Buffer(ptr: p, size: npages * t.page, mirror: npages)
        try t.expectSuccess(t.fd0, .snapshot, s, npages)
        let expected: [UInt8] = t.coherent
            ? [0xFF, 0xFF, 0x11, 0x01, 0x02, 0x42, 0x52]
            : [0xFF, 0xFF, 0x11, 0x01, 0x02, 0x22, 0x00]
        try t.expectEqual(s.mirror, expected, "snapshot bytes")
    }

    // T23
    static func compound(_ t: SelftestContext) throws {
        guard t.machine.freeHugetlbPages > 0 else { throw SelftestSkip(reason: "Not enough huge pages") }
        let size = PageSize.pmd
        let npages = size / t.page
        guard let ptr = try? t.map(size, [.read, .write], [.private, .anonymous, .hugetlb]) else { return }
        try t.fill(ptr, size) { Int32($0) }
        let b = Buffer(ptr: ptr, size: size, mirror: npages)
        try t.expectSuccess(t.fd, .snapshot, b, npages)
        let level = b.mirror[0] & MirrorProtection.pud != 0 ? MirrorProtection.pud : MirrorProtection.pmd
        try t.expectEqual(b.mirror, [UInt8](repeating: MirrorProtection.write | level, count: npages), "RW bytes")
        try t.process.protect(ptr, length: size, [.read])
        try t.expectSuccess(t.fd, .snapshot, b, npages)
        try t.expectEqual(b.mirror, [UInt8](repeating: MirrorProtection.read | level, count: npages), "RO bytes")
        try t.process.unmap(ptr, length: size)
    }

    // T24
    static func doubleMap(_ t: SelftestContext) throws {
        let npages = 6
        let b = Buffer(ptr: try t.map(npages * t.page, [.read, .write]), size: npages * t.page)
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.process.protect(b.ptr, length: b.size, [.read])
        for file in [t.fd0, t.fd1!] {
            try t.expectSuccess(file, .read, b, npages, faults: 1)
            try t.expectPattern(t.mirrorInts(b), "mirror of \(file.device)") { Int32($0) }
        }
        try t.expectSuccess(t.fd1!, .migrateToDevice, b, npages)
        try t.expectSuccess(t.fd0, .read, b, npages, faults: 1)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
    }

    // T25
    static func exclusive(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = try anonBuffer(t)
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.expectSuccess(t.fd, .exclusive, b, npages)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
        try incrementAll(t, b, in: t.process)
        try t.expectEqual(t.cmd(t.fd, .checkExclusive, b, npages), 0, "CHECK_EXCLUSIVE")
    }

    /// The CPU loop of the exclusive tests: every int equals i, becomes i + 1 (the first touch of each
    /// page revokes the device's exclusive access).
    static func incrementAll(_ t: SelftestContext, _ b: Buffer, in s: any SelftestProcess) throws {
        for page in stride(from: 0, to: b.size, by: t.page) {
            let a = b.ptr + UInt64(page)
            let ints = try t.ints(a, t.page, in: s)
            try t.expectPattern(ints, "exclusive page") { Int32(page / 4 + $0) }
            try t.fill(a, t.page, in: s) { Int32(page / 4 + $0 + 1) }
        }
        try t.expectPattern(t.ints(b.ptr, b.size, in: s), "after increment") { Int32($0 + 1) }
    }

    // T26
    static func exclusiveMprotect(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = try anonBuffer(t)
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.expectSuccess(t.fd, .exclusive, b, npages)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
        try t.process.protect(b.ptr, length: b.size, [.read])
        try t.expectEqual(t.cmd(t.fd, .write, b, npages), -EPERM, "WRITE after mprotect")
    }

    // T27
    static func exclusiveCOW(_ t: SelftestContext) throws {
        let npages = t.bufferSize / t.page
        let b = try anonBuffer(t)
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.expectSuccess(t.fd, .exclusive, b, npages)
        // Parent and child run at once, as the two processes do.
        let child = try t.fork { c in try incrementAll(c, b, in: c.process) }
        var parentFailure: (any Error)?
        do { try incrementAll(t, b, in: t.process) } catch { parentFailure = error }
        let childFailure: (any Error)?
        do { try child.wait(); childFailure = nil } catch { childFailure = error }
        if let parentFailure { throw parentFailure }
        if let skip = childFailure as? SelftestSkip { throw skip }
        if let childFailure { throw SelftestFailure(message: "child: \(childFailure)", line: #line) }
    }

    // T28
    static func gupTest(_ t: SelftestContext) throws {
        let npages = 4
        let b = Buffer(ptr: try t.map(npages * t.page, [.read, .write]), size: npages * t.page)
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
        let pg = UInt64(t.page)
        let calls: [GUPFlags] = [[.write], [.write, .fast], [.write, .pin, .fast, .longTerm], [.write, .pin, .longTerm]]
        for (i, flags) in calls.enumerated() {
            let held = try t.simulated("get_user_pages needs CONFIG_GUP_TEST (off), as the kernel case skips").getUserPages(b.ptr + UInt64(i) * pg, count: 1, flags: flags)
            held.release()
        }
        let s = Buffer(ptr: b.ptr, size: b.size, mirror: npages)
        try t.expectSuccess(t.fd, .snapshot, s, npages)
        try t.expectEqual(s.mirror, t.coherent ? [0x42, 0x42, 0x02, 0x02] : [0x02, 0x02, 0x02, 0x02], "snapshot bytes")
        try t.expectPattern(t.ints(b.ptr, b.size), "buffer") { Int32($0) }
    }

    // T29
    static func cowInDevice(_ t: SelftestContext) throws {
        let npages = 4
        let b = Buffer(ptr: try t.map(npages * t.page, [.read, .write]), size: npages * t.page)
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        // The child busy-loops until killed; the parent rewrites its pages meanwhile (copy-on-write:
        // the parent's come back from the device first, the child copies its own).
        let child = try t.fork(untilKilled: true) { _ in }
        try t.fill(b.ptr, b.size) { Int32($0) }
        try child.kill(t)
        let s = Buffer(ptr: b.ptr, size: b.size, mirror: npages)
        try t.expectSuccess(t.fd, .snapshot, s, npages)
        try t.expectEqual(s.mirror, [UInt8](repeating: MirrorProtection.write, count: npages), "snapshot bytes")
    }
}

extension SelftestCatalogue {
    /// `THP setup` with a mirror of `mirrorSize` bytes filled with 0xFF, as the huge tests start.
    static func hugeBuffer(_ t: SelftestContext, _ prot: Protection, huge: Bool = true, mirrorSize: Int? = nil,
                           advise: Bool = true) throws -> (base: UInt64, b: Buffer) {
        let size = PageSize.pmd
        let base = try t.map(2 * size, prot)
        let pmd = UInt64(size)
        let w = (base + pmd - 1) & ~(pmd - 1)
        if advise { try t.process.advise(w, length: size, huge ? .hugePage : .noHugePage) }
        let b = Buffer(ptr: w, size: size, mirror: mirrorSize ?? size)
        for i in b.mirror.indices { b.mirror[i] = 0xFF }
        return (base, b)
    }

    // T30
    static func migrateAnonHugeEmpty(_ t: SelftestContext) throws {
        let npages = PageSize.pmd / t.page
        let (_, b) = try hugeBuffer(t, [.read])
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expect(b.mirror.allSatisfy { $0 == 0 }, "mirror is not all zero")
    }

    // T31
    static func migrateAnonHugeZero(_ t: SelftestContext) throws {
        let npages = PageSize.pmd / t.page
        let (_, b) = try hugeBuffer(t, [.read])
        let v: Int32 = try t.process.load(at: b.ptr)
        try t.expectEqual(v, 0, "huge zero page")
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expect(b.mirror.allSatisfy { $0 == 0 }, "mirror is not all zero")
        try t.expectPattern(t.ints(b.ptr, b.size), "window") { _ in 0 }
    }

    // T32
    static func migrateAnonHugeFree(_ t: SelftestContext) throws {
        let npages = PageSize.pmd / t.page
        let (_, b) = try hugeBuffer(t, [.read, .write])
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
        try t.process.advise(b.ptr, length: b.size, .free)
    }

    // T33
    static func migrateAnonHugeFault(_ t: SelftestContext) throws {
        let npages = PageSize.pmd / t.page
        let (_, b) = try hugeBuffer(t, [.read, .write], advise: false)
        try t.fill(b.ptr, b.size) { Int32($0) }
        try t.process.advise(b.ptr, length: b.size, .collapse)
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
        if !t.coherent {
            let s = Buffer(ptr: b.ptr, size: b.size, mirror: npages)
            try t.expectSuccess(t.fd, .snapshot, s, npages)
            try t.expect(s.mirror.allSatisfy { $0 == 0x26 }, "snapshot bytes \(Set(s.mirror)) are not all 0x26")
            for i in 0..<npages {
                let e = try t.simulated("a device-resident page is a hole natively: /proc/self/pagemap reports swap 0 where the kernel reports a device-private swap entry").pagemap(at: b.ptr + UInt64(i * t.page))
                try t.expect(e.swapped && !e.present, "pagemap of page \(i): \(e)")
            }
        }
        try t.expectPattern(t.ints(b.ptr, b.size), "window") { Int32($0) }
    }

    // T34
    static func migratePartialUnmapFault(_ t: SelftestContext) throws {
        let size = PageSize.pmd
        let npages = size / t.page
        for useTHP in [false, true] {
            for offset in [0, size / 4, size / 2] {
                let (base, b) = try hugeBuffer(t, [.read, .write], huge: useTHP)
                try t.fill(b.ptr, size) { Int32($0) }
                try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
                try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
                try t.process.unmap(b.ptr + UInt64(offset), length: size / 2)
                for range in [0..<offset, (offset + size / 2)..<size] where !range.isEmpty {
                    let ints = try t.ints(b.ptr + UInt64(range.lowerBound), range.count)
                    try t.expectPattern(ints, "thp \(useTHP) offset \(offset)") { Int32(range.lowerBound / 4 + $0) }
                }
                try t.process.unmap(base, length: 2 * size)
            }
        }
    }

    // T35
    static func migrateRemapFault(_ t: SelftestContext) throws {
        let size = PageSize.pmd
        let npages = size / t.page
        let pmd = UInt64(size)
        for before in [false, true] {
            for dontUnmap in [false, true] {
                for useTHP in [false, true] {
                    for offset in [0, size / 4, size / 2] {
                        let base = try t.map(8 * size, [.read, .write])
                        let map = (base + pmd - 1) & ~(pmd - 1)
                        try t.process.advise(map, length: size, useTHP ? .hugePage : .noHugePage)
                        try t.process.unmap(map + pmd, length: 2 * size)
                        try t.fill(map, size) { Int32($0) }
                        var flags: RemapFlags = [.mayMove, .fixed]
                        if dontUnmap { flags.insert(.dontUnmap) }
                        let target = map + pmd + UInt64(offset)
                        var ptr = map
                        if before { ptr = try t.process.remap(map, length: size, newLength: size, flags: flags, to: target) }
                        let b = Buffer(ptr: ptr, size: size)
                        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
                        try t.expectPattern(t.mirrorInts(b), "mirror") { Int32($0) }
                        if !before { ptr = try t.process.remap(map, length: size, newLength: size, flags: flags, to: target) }
                        try t.expectPattern(t.ints(ptr, size), "before \(before) dontUnmap \(dontUnmap) thp \(useTHP) offset \(offset)") {
                            Int32($0)
                        }
                        try t.process.unmap(ptr, length: size)
                        try t.process.unmap(base, length: 8 * size)
                    }
                }
            }
        }
    }

    // T36
    static func migrateAnonHugeErr(_ t: SelftestContext) throws {
        let size = PageSize.pmd
        let npages = size / t.page
        var (base, b) = try hugeBuffer(t, [.read, .write], mirrorSize: 2 * size)
        try t.fill(b.ptr, size) { Int32($0) }
        try t.expectEqual(t.cmd(t.fd, .flags, b, Int(MirrorFlags.failAllocation.rawValue)), 0, "FLAGS")
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expectPattern(Array(t.mirrorInts(b).prefix(size / 4)), "mirror") { Int32($0) }
        let v2048: Int32 = try t.process.load(at: b.ptr + 2048 * 4)
        try t.expectEqual(v2048, 2048, "ptr[2048]")
        try t.process.unmap(base, length: 2 * size)
        (base, b) = try hugeBuffer(t, [.read, .write], mirrorSize: 2 * size)
        try t.fill(b.ptr, size) { Int32($0) }
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expectEqual(t.cmd(t.fd, .flags, b, Int(MirrorFlags.failAllocation.rawValue)), 0, "FLAGS")
        try t.expectEqual(t.cmd(t.fd, .migrateToSystem, b, npages), 0, "MIGRATE_TO_SYS")
        let again: Int32 = try t.process.load(at: b.ptr + 2048 * 4)
        try t.expectEqual(again, 2048, "ptr[2048] after MIGRATE_TO_SYS")
        try t.process.unmap(base, length: 2 * size)
    }

    // T37
    static func migrateAnonHugeZeroErr(_ t: SelftestContext) throws {
        let size = PageSize.pmd
        let npages = size / t.page
        var (base, b) = try hugeBuffer(t, [.read], mirrorSize: 2 * size)
        try t.expectEqual(t.cmd(t.fd, .flags, b, Int(MirrorFlags.failAllocation.rawValue)), 0, "FLAGS")
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expect(b.mirror.prefix(size).allSatisfy { $0 == 0 }, "mirror is not all zero")
        let zero: Int32 = try t.process.load(at: b.ptr + 2048 * 4)
        try t.expectEqual(zero, 0, "ptr[2048]")
        let stale = b.ptr
        try t.process.unmap(base, length: 2 * size)
        (base, b) = try hugeBuffer(t, [.read], mirrorSize: 2 * size)
        let v: Int32 = try t.process.load(at: stale)  // works because the new mapping lands at the same place
        try t.expectEqual(v, 0, "huge zero page through the stale pointer")
        try t.expectEqual(t.cmd(t.fd, .flags, b, Int(MirrorFlags.failAllocation.rawValue)), 0, "FLAGS")
        try t.expectSuccess(t.fd, .migrateToDevice, b, npages)
        try t.expectPattern(t.ints(b.ptr, size), "window") { _ in 0 }
        try t.process.unmap(base, length: 2 * size)
    }

    // T38: upstream's asserts (every mmap, madvise and migration returns 0; MIGRATE_TO_DEV reads the range
    // back) without its timing table, which `hmm bench migration` prints.
    static func benchmarkTHPMigration(_ t: SelftestContext) throws {
        let thp = PageSize.pmd
        for size in [thp / 4, thp / 2, thp, 2 * thp, 4 * thp, 8 * thp, 128 * thp] {
            try runMigrationBenchmark(t, useTHP: true, size: size, iterations: 5)
            try runMigrationBenchmark(t, useTHP: false, size: size, iterations: 5)
        }
    }

    /// `run_migration_benchmark`: warm-up, then `iterations` round trips; each ioctl must return 0.
    static func runMigrationBenchmark(_ t: SelftestContext, useTHP: Bool, size: Int, iterations: Int) throws {
        let npages = size / t.page
        let b = Buffer(ptr: try t.map(size, [.read, .write]), size: size)
        try t.process.advise(b.ptr, length: size, useTHP ? .hugePage : .noHugePage)
        try t.fill(b.ptr, size) { Int32($0 & 0xFF) }
        for round in 0...iterations {
            try t.expectEqual(t.cmd(t.fd, .migrateToDevice, b, npages), 0, "MIGRATE_TO_DEV \(size) thp \(useTHP) round \(round)")
            try t.expectEqual(t.cmd(t.fd, .migrateToSystem, b, npages), 0, "MIGRATE_TO_SYS \(size) thp \(useTHP) round \(round)")
        }
        try t.expectPattern(t.mirrorInts(b), "mirror \(size) thp \(useTHP)") { Int32($0 & 0xFF) }
        try t.process.unmap(b.ptr, length: size)
    }
}
