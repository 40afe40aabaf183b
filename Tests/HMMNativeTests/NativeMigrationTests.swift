import CUserfaultfd
import HMM
import HMMDevices
import HMMNative
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("Native engine: migration and fault-back", .enabled(if: nativeUnavailable == nil, "native engine unavailable here (issue 15): \(nativeUnavailable ?? "")"), .timeLimit(.minutes(10)))
struct NativeMigrationTests {
    @Test("64 MiB of a real region migrate to a MirrorDevice and back, every byte intact")
    func roundTrip64MiB() throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 64 << 20, populate: true)
            fill(region, seed: 0x1234_5678)
            let file = try gpu.open(space)
            let pages = region.length >> 12
            let r = try file.migrateToDevice(region.address, pages: pages, into: nil)
            #expect(r.cpages == pages)
            #expect(region.devicePages == pages)
            #expect(gpu.pagesInUse == pages)
            try machine.checkInvariants()
            let back = try file.migrateToSystem(region.address, pages: pages)
            #expect(back.cpages > 0)
            #expect(region.devicePages == 0)
            #expect(firstMismatch(region, seed: 0x1234_5678) == nil)
            #expect(gpu.pagesInUse == 0)
            file.close()
        }
    }

    @Test("a plain Swift load of a device-resident page faults it back with the right value")
    func swiftLoadFaultsBack() throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 2 << 20, hugePages: false, populate: true)
            fill(region, seed: 7)
            let file = try gpu.open(space)
            var mirror = [UInt8](repeating: 0, count: 64 << 12)
            let r = try file.migrateToDevice(region.address, pages: 64, into: &mirror)
            #expect(r.cpages == 64)
            #expect(mirror.withUnsafeBytes { $0.load(fromByteOffset: 4096 * 3, as: UInt32.self) } == 7 &+ 1024 * 3)
            #expect(try region.residency(0..<4096) == [.device(owner: ObjectIdentifier(gpu), huge: false)])
            let words = region.pointer.bindMemory(to: UInt32.self, capacity: region.length / 4)
            let before = space.statistics.snapshot.faultBacks
            #expect(words[1024 * 5 + 3] == 7 &+ UInt32(1024 * 5 + 3))  // page 5: a plain load
            #expect(space.statistics.snapshot.faultBacks == before + 1)
            // Fault-around brought the aligned 16-page window home in that one fault.
            let home = try region.residency(0..<(16 << 12))
            #expect(home.allSatisfy { $0 == .host(huge: false, zero: false) }, "\(home)")
            #expect(region.devicePages == 48)
            #expect(firstMismatch(region, seed: 7) == nil)
            #expect(region.devicePages == 0)
            file.close()
        }
    }

    @Test("read(2) from a file into a device-resident page lands (the kernel's copy_to_user faults it back)")
    func kernelReadIntoDevicePage() throws {
        try withNativeSpace(options: { var o = NativeSpace.Options(); o.faultAroundPages = 1; return o }()) { _, space, gpu in
            guard !space.isUserModeOnly else { return }  // user-mode-only: EFAULT by design
            let region = try space.allocate(length: 64 << 10, hugePages: false, populate: true)
            fill(region, seed: 99)
            let file = try gpu.open(space)
            _ = try file.migrateToDevice(region.address, pages: 16, into: nil)
            var path = Array("/tmp/hmm-native-XXXXXX".utf8CString)
            let fd = mkstemp(&path)
            #expect(fd >= 0)
            defer { close(fd); unlink(path) }
            var data = [UInt8](repeating: 0, count: 4096)
            for i in 0..<4096 { data[i] = UInt8(truncatingIfNeeded: i * 7) }
            #expect(pwrite(fd, data, 4096, 0) == 4096)
            let n = pread(fd, region.pointer + 3 * 4096, 4096, 0)
            #expect(n == 4096)
            let landed = UnsafeRawBufferPointer(start: region.pointer + 3 * 4096, count: 4096)
            #expect(Array(landed) == data)
            // The neighbours came back only when touched, with their own bytes.
            #expect(region.devicePages == 15)
            #expect(firstMismatch(region, seed: 99, from: 4 * 4096) == nil)
            file.close()
        }
    }

    @Test("a 2 MiB THP moves as one compound unit and comes back huge")
    func compoundRoundTripKeepsTHP() throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 4 << 20, populate: true)
            fill(region, seed: 3)
            let hugeBefore = cu_anon_huge_kb(region.address)
            #expect(!hostHasTHP || hugeBefore == 4096, "a populated MADV_HUGEPAGE region is THP-backed")
            let file = try gpu.open(space)
            let r = try file.migrateToDevice(region.address, pages: 1024, into: nil)
            #expect(r.cpages == 1024)
            let where_ = try region.residency(0..<region.length)
            if hugeBefore == 4096 {
                #expect(where_.allSatisfy { $0 == .device(owner: ObjectIdentifier(gpu), huge: true) })
            }
            try machine.checkInvariants()
            let back = try file.migrateToSystem(region.address, pages: 1024)
            #expect(back.cpages == (hugeBefore == 4096 ? 2 : 1024))
            #expect(firstMismatch(region, seed: 3) == nil)
            #expect(space.statistics.snapshot.pagesMovedOut == 1024)
            if hugeBefore == 4096 {
                #expect(cu_anon_huge_kb(region.address) == 4096, "the region stays THP-backed")
            }
            file.close()
        }
    }

    @Test("releasing the device evicts its native pages home by physical range (migrate_device_range)")
    func deviceReleaseEvictsNativePages() throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 4 << 20, populate: true)
            fill(region, seed: 17)
            let file = try gpu.open(space)
            _ = try file.migrateToDevice(region.address, pages: 1024, into: nil)
            #expect(region.devicePages == 1024)
            try gpu.release()
            #expect(region.devicePages == 0)
            #expect(gpu.pagesInUse == 0)
            #expect(gpu.chunkCount == 0, "every chunk was emptied and unregistered")
            #expect(firstMismatch(region, seed: 17) == nil)
            try machine.checkInvariants()
            file.close()
        }
    }
    /// `UFFDIO_MOVE` refuses a read-only source (EINVAL): the engine makes the range writable for the
    /// move only; the way back copies. Before the fallback no page of a read-only region was collected.
    @Test("a read-only region migrates to the device and back; it stays read-only", arguments: [false, true])
    func readOnlyRegionMigrates(huge: Bool) throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 4 << 20, hugePages: huge, populate: true)
            fill(region, seed: 61)
            try region.protect(0..<region.length, [.read])
            let file = try gpu.open(space)
            let r = try file.migrateToDevice(region.address, pages: 1024, into: nil)
            #expect(r.cpages == 1024)
            #expect(region.devicePages == 1024)
            try machine.checkInvariants()
            // Half comes back through the driver, half through CPU loads (fault-back copies).
            _ = try file.migrateToSystem(region.address, pages: 512)
            #expect(firstMismatch(region, seed: 61) == nil)
            #expect(region.devicePages == 0)
            var code: Int32 = 0
            #expect(cu_probe_write(region.pointer + 5 * 4096, 1, &code) == SIGSEGV, "still read-only after the moves")
            file.close()
        }
    }
}
