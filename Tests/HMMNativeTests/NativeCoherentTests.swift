import CUserfaultfd
import HMM
import HMMDevices
import HMMNative
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Device-coherent memory on real pages: migrated pages are mapped in place, so CPU loads and stores
/// reach the device frame with no fault, and host events on them behave as on any page.
@Suite("Native engine: device-coherent pages in place", .enabled(if: nativeUnavailable == nil, "native engine unavailable here (issue 15): \(nativeUnavailable ?? "")"), .timeLimit(.minutes(10)))
struct NativeCoherentTests {
    @Test("pages migrated to a coherent device are read and written in place, with no CPU fault", arguments: [FaultMode.handlerThread, .inThread])
    func coherentInPlace(mode: FaultMode) throws {
        try withNativeSpace(options: .init(faultMode: mode), kind: .deviceCoherent) { machine, space, gpu in
            let region = try space.allocate(length: 1 << 20, hugePages: false, populate: true)
            fill(region, seed: 41)
            let file = try gpu.open(space)
            let r = try file.migrateToDevice(region.address, pages: 64, into: nil)
            #expect(r.cpages == 64)
            #expect(gpu.pagesInUse == 64)
            #expect(try region.residency(0..<(64 << 12)).allSatisfy { $0 == .coherent(owner: ObjectIdentifier(gpu), huge: false) })
            try machine.checkInvariants()
            let before = space.statistics.snapshot
            // Plain loads and stores of the device pages: no fault, no migration.
            #expect(firstMismatch(region, seed: 41) == nil)
            let words = region.pointer.bindMemory(to: UInt32.self, capacity: region.length / 4)
            words[1024 * 7 + 5] = 0xC0FFEE
            let after = space.statistics.snapshot
            #expect(after.faultBacks == before.faultBacks)
            #expect(after.pagesMovedIn == before.pagesMovedIn)
            #expect(region.devicePages == 64)
            // The device sees the CPU's store (its READ goes through its own page table, in place) …
            var mirror = [UInt8](repeating: 0, count: 64 << 12)
            #expect(try file.read(region.address, pages: 64, into: &mirror).cpages == 64)
            #expect(mirror.withUnsafeBytes { $0.load(fromByteOffset: 4096 * 7 + 20, as: UInt32.self) } == 0xC0FFEE)
            // … the CPU sees the device's write, and the snapshot says coherent, local.
            var data = mirror
            data.withUnsafeMutableBytes { $0.storeBytes(of: UInt32(0xBEEF), toByteOffset: 4096 * 9, as: UInt32.self) }
            #expect(try file.write(region.address, pages: 64, from: data).cpages == 64)
            #expect(words[1024 * 9] == 0xBEEF)
            var snap = [UInt8](repeating: 0, count: 64)
            _ = try file.snapshot(region.address, pages: 64, into: &snap)
            #expect(snap.allSatisfy { $0 == MirrorProtection.deviceCoherentLocal | MirrorProtection.write }, "\(snap)")
            // Back to system memory with the bytes both sides wrote.
            let back = try file.migrateToSystem(region.address, pages: 64)
            #expect(back.cpages == 64)
            #expect(region.devicePages == 0)
            #expect(gpu.pagesInUse == 0)
            #expect(words[1024 * 7 + 5] == 0xC0FFEE)
            #expect(words[1024 * 9] == 0xBEEF)
            words[1024 * 7 + 5] = 41 &+ UInt32(1024 * 7 + 5)
            words[1024 * 9] = 41 &+ UInt32(1024 * 9)
            #expect(firstMismatch(region, seed: 41) == nil)
            #expect(try region.residency(0..<(64 << 12)).allSatisfy { if case .host = $0 { true } else { false } })
            try machine.checkInvariants()
            file.close()
        }
    }

    @Test("another device reads coherent pages in place (hmm2.double_map, coherent variant): they stay, snapshot REMOTE")
    func coherentReadByAnotherDevice() throws {
        let machine = try Machine(.init(systemMemory: 256 << 20))
        let space = try NativeSpace(machine: machine)
        let dev2 = try MirrorDevice(machine: machine, minor: 2, kind: .deviceCoherent, chunkSize: 64 << 20)
        let dev3 = try MirrorDevice(machine: machine, minor: 3, kind: .deviceCoherent, chunkSize: 64 << 20)
        let region = try space.allocate(length: 6 << 12, hugePages: false, populate: true)
        fill(region, seed: 0)
        try region.protect(0..<region.length, [.read])
        let file0 = try dev2.open(space)
        let file1 = try dev3.open(space)
        var mirror = [UInt8](repeating: 0, count: 6 << 12)
        #expect(try file0.read(region.address, pages: 6, into: &mirror) == MirrorResult(cpages: 6, faults: 1))
        #expect(try file1.migrateToDevice(region.address, pages: 6, into: nil).cpages == 6)
        #expect(dev3.pagesInUse == 6)
        // fd0's entries were invalidated by the migration; its READ faults once and reads in place.
        mirror = [UInt8](repeating: 0, count: 6 << 12)
        #expect(try file0.read(region.address, pages: 6, into: &mirror) == MirrorResult(cpages: 6, faults: 1))
        #expect(mirror.withUnsafeBytes { b in (0..<(6 * 1024)).allSatisfy { b.load(fromByteOffset: $0 * 4, as: UInt32.self) == UInt32($0) } })
        #expect(dev3.pagesInUse == 6, "the pages stay on device 3")
        var snap = [UInt8](repeating: 0, count: 6)
        _ = try file0.snapshot(region.address, pages: 6, into: &snap)
        #expect(snap == [UInt8](repeating: MirrorProtection.deviceCoherentRemote | MirrorProtection.read, count: 6), "\(snap)")
        _ = try file1.snapshot(region.address, pages: 6, into: &snap)
        #expect(snap == [UInt8](repeating: MirrorProtection.deviceCoherentLocal | MirrorProtection.read, count: 6), "\(snap)")
        #expect(firstMismatch(region, seed: 0) == nil)
        try machine.checkInvariants()
        try space.close()
        #expect(dev3.pagesInUse == 0)
        #expect(firstMismatch(region, seed: 0) == nil)
        file0.close()
        file1.close()
        try machine.checkInvariants()
    }

    @Test("MADV_DONTNEED of a coherent page drops it (zeros after, frame freed); munmap frees the frames")
    func coherentDontNeedAndUnmap() throws {
        try withNativeSpace(kind: .deviceCoherent) { machine, space, gpu in
            let region = try space.allocate(length: 1 << 20, hugePages: false, populate: true)
            fill(region, seed: 5)
            let file = try gpu.open(space)
            #expect(try file.migrateToDevice(region.address, pages: 32, into: nil).cpages == 32)
            #expect(gpu.pagesInUse == 32)
            // Zap pages 2..<4: the device hears it, frees them, and they read zeros at once.
            #expect(madvise(region.pointer + 2 * 4096, 2 * 4096, MADV_DONTNEED) == 0)
            let words = region.pointer.bindMemory(to: UInt32.self, capacity: region.length / 4)
            #expect(words[2 * 1024] == 0 && words[3 * 1024 + 17] == 0)
            #expect(eventually { gpu.pagesInUse == 30 })
            #expect(region.devicePages == 30)
            #expect(firstMismatch(region, seed: 5, from: 4 * 4096) == nil)
            #expect(firstMismatch(region, seed: 5, to: 2 * 4096) == nil)
            // The zapped pages are ordinary memory again.
            words[2 * 1024] = 77
            #expect(words[2 * 1024] == 77)
            // munmap of pages 8..<16 frees their device frames.
            #expect(munmap(region.pointer + 8 * 4096, 8 * 4096) == 0)
            #expect(eventually { gpu.pagesInUse == 22 })
            #expect(firstMismatch(region, seed: 5, from: 16 * 4096) == nil)
            try machine.checkInvariants()
            file.close()
        }
    }

    @Test("closing the space brings coherent pages home with their bytes; a device release evicts them")
    func coherentEviction() throws {
        let machine = try Machine(.init(systemMemory: 256 << 20))
        let space = try NativeSpace(machine: machine)
        let gpu = try MirrorDevice(machine: machine, minor: 2, kind: .deviceCoherent, chunkSize: 64 << 20)
        let region = try space.allocate(length: 2 << 20, hugePages: false, populate: true)
        fill(region, seed: 11)
        let file = try gpu.open(space)
        #expect(try file.migrateToDevice(region.address, pages: 512, into: nil).cpages == 512)
        // Eviction by physical range (the driver's chunk release).
        try gpu.release()
        #expect(region.devicePages == 0)
        #expect(gpu.pagesInUse == 0)
        #expect(firstMismatch(region, seed: 11) == nil)
        let again = try file.migrateToDevice(region.address, pages: 100, into: nil)
        let placed = try region.residency(0..<(100 << 12))
        #expect(again.cpages == 100, "\(again) chunks \(gpu.chunkCount) inUse \(gpu.pagesInUse) \(space.statistics.snapshot) \(placed.prefix(2))")
        try space.close()
        #expect(gpu.pagesInUse == 0)
        #expect(firstMismatch(region, seed: 11) == nil)
        try machine.checkInvariants()
        file.close()
    }

    @Test("CPU stores racing migrations to and from coherent memory lose nothing")
    func coherentStoresRaceMigrations() throws {
        try withNativeSpace(kind: .deviceCoherent) { machine, space, gpu in
            let pages = 256
            let region = try space.allocate(length: pages << 12, hugePages: false, populate: true)
            fill(region, seed: 0)
            let file = try gpu.open(space)
            let words = region.pointer.bindMemory(to: UInt32.self, capacity: region.length / 4)
            let stop = Atomic<Bool>(false)
            // One thread keeps incrementing one word per page (its own count in a local array).
            let counts = UnsafeMutablePointer<UInt32>.allocate(capacity: pages)
            counts.initialize(repeating: 0, count: pages)
            defer { counts.deallocate() }
            let address = UInt(bitPattern: region.pointer)
            let countsAddress = UInt(bitPattern: counts)
            let writer = HostThread {
                let w = UnsafeMutablePointer<UInt32>(bitPattern: address)!
                let c = UnsafeMutablePointer<UInt32>(bitPattern: countsAddress)!
                while !stop.load(ordering: .relaxed) {
                    for p in 0..<pages {
                        w[p * 1024 + 1] &+= 1
                        c[p] &+= 1
                    }
                }
            }
            for round in 0..<40 {
                let lo = UInt64((round * 37) % (pages - 64)) << 12
                _ = try? file.migrateToDevice(region.address + lo, pages: 64, into: nil)
                _ = try? file.migrateToSystem(region.address + UInt64((round * 53) % (pages - 64)) << 12, pages: 64)
            }
            stop.store(true, ordering: .relaxed)
            writer.join()
            for p in 0..<pages {
                #expect(words[p * 1024 + 1] == 1 &+ UInt32(p * 1024) &+ counts[p], "page \(p)")
                #expect(words[p * 1024 + 2] == 2 &+ UInt32(p * 1024), "page \(p)")
            }
            try machine.checkInvariants()
            file.close()
        }
    }
}
