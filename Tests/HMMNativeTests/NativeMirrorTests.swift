import CUserfaultfd
import HMM
import HMMDevices
import HMMNative
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The dmirror commands — READ, WRITE, SNAPSHOT, EXCLUSIVE — on native memory: the same MirrorFile
/// code, the same values as on the simulated engine.
@Suite("Native engine: mirror commands", .enabled(if: nativeUnavailable == nil, "native engine unavailable here (issue 15): \(nativeUnavailable ?? "")"), .timeLimit(.minutes(10)))
struct NativeMirrorTests {
    @Test("the device reads and writes CPU-resident pages through the host window")
    func readAndWrite() throws {
        try withNativeSpace { _, space, gpu in
            let region = try space.allocate(length: 64 << 12, hugePages: false, populate: true)
            fill(region, seed: 21)
            let file = try gpu.open(space)
            var mirror = [UInt8](repeating: 0, count: region.length)
            let r = try file.read(region.address, pages: 64, into: &mirror)
            #expect(r.cpages == 64)
            #expect(r.faults == 1)  // one fault round mirrors the whole range (32 pages per hmm_range_fault)
            #expect(mirror.withUnsafeBytes { $0.load(fromByteOffset: 4096 * 40 + 8, as: UInt32.self) } == 21 &+ 40 * 1024 + 2)
            var data = [UInt8](repeating: 0, count: 4 << 12)
            for i in 0..<data.count { data[i] = UInt8(truncatingIfNeeded: i &* 13) }
            _ = try file.write(region.address + 8 << 12, pages: 4, from: data)
            #expect(Array(UnsafeRawBufferPointer(start: region.pointer + 8 * 4096, count: data.count)) == data)
            file.close()
        }
    }

    @Test("a device write to an untouched page faults it in writable first")
    func writeFaultsIn() throws {
        try withNativeSpace { _, space, gpu in
            let region = try space.allocate(length: 16 << 12, hugePages: false)
            let file = try gpu.open(space)
            let data = [UInt8](repeating: 0xA5, count: 4096)
            let r = try file.write(region.address + 4096, pages: 1, from: data)
            #expect(r.faults == 1)
            #expect(region.pointer.load(fromByteOffset: 4096 + 100, as: UInt8.self) == 0xA5)
            // An untouched neighbour still reads zeros (through a zero fill).
            #expect(region.pointer.load(fromByteOffset: 5 * 4096, as: UInt64.self) == 0)
            file.close()
        }
    }

    @Test("snapshot classifies untouched, zero, written, THP and device pages as dmirror does")
    func snapshot() throws {
        try withNativeSpace { _, space, gpu in
            // Small pages: a first write to a huge-advised region would fill the whole 2 MiB unit.
            let region = try space.allocate(length: 4 << 20, hugePages: false, populate: false)
            let file = try gpu.open(space)
            let words = region.pointer.bindMemory(to: UInt32.self, capacity: region.length / 4)
            words[1024 * 1] = 1                                // page 1 written
            var byte: UInt8 = 0
            var code: Int32 = 0
            #expect(cu_probe_read(region.pointer + 2 * 4096, &byte, &code) == 0)  // page 2 read: the zero page
            _ = try file.migrateToDevice(region.address + 3 << 12, pages: 1, into: nil)  // page 3 on the device
            var out = [UInt8](repeating: 0xEE, count: 8)
            _ = try file.snapshot(region.address, pages: 8, into: &out)
            #expect(out[0] == MirrorProtection.none)
            #expect(out[1] == MirrorProtection.write)
            #expect(out[2] == MirrorProtection.zero | MirrorProtection.read)
            #expect(out[3] == MirrorProtection.devicePrivateLocal | MirrorProtection.write)
            #expect(out[4] == MirrorProtection.none)
            file.close()
        }
    }

    @Test("a THP snapshots as PMD-mapped")
    func snapshotHuge() throws {
        try withNativeSpace { _, space, gpu in
            guard hostHasTHP else { return }
            let region = try space.allocate(length: 2 << 20, populate: true)
            let file = try gpu.open(space)
            var out = [UInt8](repeating: 0, count: 4)
            _ = try file.snapshot(region.address, pages: 4, into: &out)
            #expect(out.allSatisfy { $0 == MirrorProtection.write | MirrorProtection.pmd })
            file.close()
        }
    }

    @Test("exclusive: the device holds the page until a CPU touch restores it, data intact")
    func exclusiveThenTouch() throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 16 << 12, hugePages: false, populate: true)
            fill(region, seed: 31)
            let file = try gpu.open(space)
            var mirror = [UInt8](repeating: 0, count: 4 << 12)
            let r = try file.makeExclusive(region.address, pages: 4, into: &mirror)
            #expect(r.cpages == 4)
            #expect(mirror.withUnsafeBytes { $0.load(fromByteOffset: 4096 + 4, as: UInt32.self) } == 31 &+ 1025)
            #expect(throws: HMMError.self) { try file.checkExclusive(region.address, pages: 4) }
            #expect(try region.residency(0..<(4 << 12)) == Array(repeating: .exclusive, count: 4))
            try machine.checkInvariants()
            let words = region.pointer.bindMemory(to: UInt32.self, capacity: region.length / 4)
            for p in 0..<4 { #expect(words[p * 1024 + 9] == 31 &+ UInt32(p * 1024 + 9)) }
            try file.checkExclusive(region.address, pages: 4)
            #expect(space.statistics.snapshot.exclusiveRestores == 4)
            #expect(firstMismatch(region, seed: 31) == nil)
            file.close()
        }
    }

    @Test("revoke: a touch is SIGBUS (observed without dying), a read(2) EFAULT; recover puts the bytes back")
    func revokeAndRecover() throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 8 << 12, hugePages: false, populate: true)
            fill(region, seed: 41)
            let file = try gpu.open(space)
            _ = try file.migrateToDevice(region.address + 4096, pages: 1, into: nil)
            var saved = [UInt8](repeating: 0, count: 2 << 12)
            saved.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(start: region.pointer, count: 2 << 12)) }
            try region.revoke(0..<(2 << 12))
            #expect(gpu.pagesInUse == 0, "the device copy of a revoked page is dropped")
            var byte: UInt8 = 0
            var code: Int32 = 0
            #expect(cu_probe_read(region.pointer + 4096 + 5, &byte, &code) == SIGBUS)
            #expect(cu_probe_read(region.pointer + 5, &byte, &code) == SIGBUS)
            let devZero = open("/dev/zero", O_RDONLY)
            defer { close(devZero) }
            #expect(read(devZero, region.pointer, 16) == -1 && errno == EFAULT)
            try machine.checkInvariants()
            let recovered = saved.withUnsafeBytes { b in Result { () throws(HMMError) in try region.recover(0..<(2 << 12), from: b) } }
            try recovered.get()
            #expect(firstMismatch(region, seed: 41) == nil)
            file.close()
        }
    }
}
