import CUserfaultfd
import HMM
import HMMDevices
import HMMNative
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A device-private driver written against the driver API whose copy engine can be told to fail:
/// during migration to the device (after `failAfter` pages) or on CPU fault-back (`faultBackFailures`
/// more times, with `faultBackError`).
final class FlakyDevice: PagemapOperations, @unchecked Sendable {
    let machine: Machine
    var pagemap: Pagemap!
    private let free = Locked<[PFN]>([])
    let failAfter = Atomic<Int>(Int.max)
    let faultBackFailures = Atomic<Int>(0)
    let faultBackError = Locked(HMMError.Code.bus)

    init(machine: Machine) throws {
        self.machine = machine
        pagemap = try machine.registerPagemap(kind: .devicePrivate, count: 4096, owner: self, operations: self)
        free.withLock { f in for i in stride(from: 4095, through: 0, by: -1) { f.append(pagemap.firstPFN + i) } }
    }

    func allocate() -> PFN? {
        guard let p = free.withLock({ $0.popLast() }) else { return nil }
        try? pagemap.initFolio(p, order: 0)
        return p
    }

    func folioFree(_ head: PFN, order: Int) { free.withLock { $0.append(head) } }

    /// Migrates `[address, address + pages)` here; throws after `failAfter` copies.
    func migrateToDevice(_ space: any MirroredAddressSpace, _ address: UInt64, pages: Int) throws(HMMError) {
        try space.withMmapReadLock { () throws(HMMError) in
            let m = try MigrateVMA(space: space, start: address, end: address + UInt64(pages) << 12, select: .system, owner: self)
            try m.setup()
            do throws(HMMError) {
                var copied = 0
                for i in 0..<m.npages where m.src[i].isMigrating {
                    if copied == failAfter.load(ordering: .relaxed) { throw HMMError(.fault, "the copy engine failed") }
                    guard let d = allocate() else { continue }
                    m.dst[i] = MigratePFN(d, flags: m.src[i].isWritable ? MigratePFN.write : 0)
                    if let s = m.src[i].pfn { try machine.copyPage(from: s, to: d) } else { try machine.zeroPage(d) }
                    copied += 1
                }
                try m.pages()
            } catch {
                m.finalize()
                throw error
            }
            m.finalize()
        }
    }

    func migrateToRAM(_ fault: DeviceFault) throws(HMMError) {
        if faultBackFailures.load(ordering: .relaxed) > 0 {
            faultBackFailures.subtract(1, ordering: .relaxed)
            throw HMMError(faultBackError.withLock { $0 }, "the backend failed")
        }
        let m = try MigrateVMA(space: fault.space, start: fault.range.lowerBound, end: fault.range.upperBound,
                               select: .devicePrivate, owner: self, faultPage: fault.page)
        try m.setup()
        for i in 0..<m.npages where m.src[i].isMigrating {
            guard let s = m.src[i].pfn, let d = machine.allocateMigrationPage(zeroed: false) else { continue }
            m.dst[i] = MigratePFN(d)
            try? machine.copyPage(from: s, to: d)
        }
        do { try m.pages() } catch { m.finalize(); throw error }
        m.finalize()
    }

    var pagesInUse: Int { 4096 - free.withLock { $0.count } }
}

@Suite("Native engine: failures", .enabled(if: nativeUnavailable == nil, "native engine unavailable here (issue 15): \(nativeUnavailable ?? "")"), .timeLimit(.minutes(10)))
struct NativeFailureTests {
    @Test("a device that fails mid-migration leaves every page where it was, bytes intact")
    func failingMigrationLosesNothing() throws {
        try withNativeSpace { machine, space, _ in
            let dev = try FlakyDevice(machine: machine)
            let region = try space.allocate(length: 64 << 12, hugePages: false, populate: true)
            fill(region, seed: 51)
            dev.failAfter.store(20, ordering: .relaxed)
            #expect(throws: HMMError.self) { try dev.migrateToDevice(space, region.address, pages: 64) }
            #expect(dev.pagesInUse == 0)
            #expect(region.devicePages == 0)
            #expect(try region.residency(0..<region.length).allSatisfy { $0 == .host(huge: false, zero: false) })
            #expect(firstMismatch(region, seed: 51) == nil)
            #expect(space.statistics.snapshot.cpuFaults == 0, "the pages went back without a CPU fault")
            try machine.checkInvariants()
        }
    }

    @Test("a backend that fails on fault-back transiently is retried; the toucher gets its bytes")
    func transientFaultBackFailure() throws {
        var o = NativeSpace.Options()
        o.faultAroundPages = 1
        try withNativeSpace(options: o) { machine, space, _ in
            let dev = try FlakyDevice(machine: machine)
            let region = try space.allocate(length: 8 << 12, hugePages: false, populate: true)
            fill(region, seed: 61)
            try dev.migrateToDevice(space, region.address, pages: 8)
            #expect(dev.pagesInUse == 8)
            dev.faultBackError.withLock { $0 = .busy }
            dev.faultBackFailures.store(2, ordering: .relaxed)
            #expect(region.pointer.load(fromByteOffset: 4096 * 2 + 4, as: UInt32.self) == 61 &+ 2049)
            #expect(space.statistics.snapshot.poisoned == 0)
            #expect(firstMismatch(region, seed: 61) == nil)
            #expect(eventually { dev.pagesInUse == 0 }, "the fault thread drops the device references")
        }
    }

    /// In-thread, the SIGBUS of a poisoned page goes on to the handler installed before the engine's
    /// (here the probe's), while a page that can come back is still resolved under the probe.
    @Test("a backend that cannot bring a page back gets it poisoned: SIGBUS for the toucher, never zeros",
          arguments: [FaultMode.handlerThread, .inThread])
    func failedFaultBackPoisons(mode: FaultMode) throws {
        var o = NativeSpace.Options()
        o.faultAroundPages = 1
        o.faultMode = mode
        try withNativeSpace(options: o) { machine, space, _ in
            let dev = try FlakyDevice(machine: machine)
            let region = try space.allocate(length: 8 << 12, hugePages: false, populate: true)
            fill(region, seed: 71)
            try dev.migrateToDevice(space, region.address, pages: 8)
            dev.faultBackError.withLock { $0 = .bus }
            dev.faultBackFailures.store(1, ordering: .relaxed)
            var byte: UInt8 = 0
            var code: Int32 = 0
            #expect(cu_probe_read(region.pointer + 3 * 4096, &byte, &code) == SIGBUS)
            #expect(eventually { (try? region.residency((3 << 12)..<(4 << 12))) == [.revoked] })
            #expect(cu_probe_read(region.pointer + 3 * 4096, &byte, &code) == SIGBUS, "and again")
            #expect(space.statistics.snapshot.poisoned >= 1)
            #expect(eventually { dev.pagesInUse == 7 }, "the lost page's device copy is dropped")
            #expect(cu_probe_read(region.pointer + 5 * 4096, &byte, &code) == 0, "a page that can come back does")
            try machine.checkInvariants()
            // The other pages come back with their bytes.
            #expect(firstMismatch(region, seed: 71, to: 3 << 12) == nil)
            #expect(firstMismatch(region, seed: 71, from: 4 << 12) == nil)
        }
    }

    @Test("bad input to the native API throws HMMError and changes nothing")
    func badInput() throws {
        try withNativeSpace { _, space, gpu in
            #expect(throws: HMMError.self) { try space.allocate(length: 0) }
            #expect(throws: HMMError.self) { try space.allocate(length: 4095) }
            let region = try space.allocate(length: 4 << 12, hugePages: false, populate: true)
            #expect(throws: HMMError.self) { try region.residency(0..<5000) }
            #expect(throws: HMMError.self) { try region.revoke(4096..<(5 << 12)) }
            #expect(throws: HMMError.self) { try region.revoke(1..<4097) }
            #expect(throws: HMMError.self) {
                try [UInt8](repeating: 0, count: 10).withUnsafeBytes { b in try region.recover(0..<4096, from: b) }
            }
            let file = try gpu.open(space)
            // A range that leaves the region, or lies where no region is.
            #expect(throws: HMMError.self) { try file.migrateToDevice(region.address, pages: 5, into: nil) }
            // (An address nothing maps: a page mapped, then unmapped. Memory the engine does not manage
            // but that is mapped — shared or file memory — collects nothing, as in the kernel.)
            let hole = mmap(nil, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
            munmap(hole, 4096)
            #expect(throws: HMMError.self) { try file.migrateToDevice(UInt64(UInt(bitPattern: hole)), pages: 1, into: nil) }
            #expect(throws: HMMError.self) { try file.mmap(length: 4096, protection: [.read], shared: false) }
            #expect(gpu.pagesInUse <= 4)
            _ = try file.migrateToSystem(region.address, pages: 4)
            #expect(throws: HMMError.self) { try NativeSpace(machine: space.machine) }  // one per machine
            var o = NativeSpace.Options()
            o.faultAroundPages = 3
            let other = try Machine(.init(systemMemory: 16 << 20))
            #expect(throws: HMMError.self) { try NativeSpace(machine: other, options: o) }
            file.close()
            region.free()
            region.free()  // idempotent
        }
    }

    @Test("after close every operation throws noProcess and the memory is ordinary memory")
    func afterClose() throws {
        let machine = try Machine(.init(systemMemory: 64 << 20))
        let space = try NativeSpace(machine: machine)
        let gpu = try MirrorDevice(machine: machine, minor: 0, kind: .devicePrivate, chunkSize: 16 << 20)
        let region = try space.allocate(length: 16 << 12, hugePages: false, populate: true)
        fill(region, seed: 81)
        let file = try gpu.open(space)
        _ = try file.migrateToDevice(region.address, pages: 16, into: nil)
        try space.close()
        #expect(gpu.pagesInUse == 0)
        #expect(firstMismatch(region, seed: 81) == nil, "close evicted every page home")
        #expect(throws: HMMError.self) { try space.allocate(length: 4096) }
        #expect(throws: HMMError.self) { try file.migrateToDevice(region.address, pages: 1, into: nil) }
        try space.close()  // idempotent
        try machine.checkInvariants()
        region.free()
        // The machine can have a native space again.
        let again = try NativeSpace(machine: machine)
        try again.close()
    }
}
