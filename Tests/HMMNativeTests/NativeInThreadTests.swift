import CUserfaultfd
import HMM
import HMMDevices
import HMMNative
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// In-thread fault mode (`UFFD_FEATURE_SIGBUS`): the faulting thread resolves its own fault in its
/// SIGBUS handler, through the same driver callbacks.
@Suite("Native engine: in-thread fault mode", .enabled(if: nativeUnavailable == nil, "native engine unavailable here (issue 15): \(nativeUnavailable ?? "")"), .timeLimit(.minutes(10)))
struct NativeInThreadTests {
    static var inThread: NativeSpace.Options {
        var o = NativeSpace.Options()
        o.faultMode = .inThread
        return o
    }

    @Test("loads and stores of device-resident pages fault them back in the touching thread, with fault-around")
    func loadAndStoreFaultBack() throws {
        try withNativeSpace(options: Self.inThread) { machine, space, gpu in
            let region = try space.allocate(length: 2 << 20, hugePages: false, populate: true)
            fill(region, seed: 5)
            let file = try gpu.open(space)
            #expect(try file.migrateToDevice(region.address, pages: 512, into: nil).cpages == 512)
            let words = region.pointer.bindMemory(to: UInt32.self, capacity: region.length / 4)
            #expect(words[1024 * 5 + 3] == 5 &+ UInt32(1024 * 5 + 3))
            #expect(space.statistics.snapshot.faultBacks == 1)
            #expect(region.devicePages == 512 - 16, "the aligned 16-page window came home")
            words[1024 * 100] = 77  // a store
            #expect(space.statistics.snapshot.faultBacks == 2)
            try machine.checkInvariants()
            words[1024 * 100] = 5 &+ UInt32(1024 * 100)
            #expect(firstMismatch(region, seed: 5) == nil)
            #expect(region.devicePages == 0)
            file.close()
        }
    }

    @Test("a first touch is a zero fill in the touching thread; a device write faults an untouched page in")
    func zeroFillAndDeviceWrite() throws {
        try withNativeSpace(options: Self.inThread) { _, space, gpu in
            let region = try space.allocate(length: 16 << 12, hugePages: false)
            #expect(region.pointer.load(fromByteOffset: 3 * 4096 + 8, as: UInt64.self) == 0)
            region.pointer.storeBytes(of: 0xFEED, toByteOffset: 4 * 4096, as: UInt64.self)
            #expect(space.statistics.snapshot.zeroFills == 2)
            let file = try gpu.open(space)
            let data = [UInt8](repeating: 0xA5, count: 4096)
            #expect(try file.write(region.address + 8 * 4096, pages: 1, from: data).faults == 1)
            #expect(region.pointer.load(fromByteOffset: 8 * 4096 + 100, as: UInt8.self) == 0xA5)
            #expect(region.pointer.load(fromByteOffset: 4 * 4096, as: UInt64.self) == 0xFEED)
            file.close()
        }
    }

    @Test("exclusive: a CPU touch restores the page in the touching thread")
    func exclusiveRestore() throws {
        try withNativeSpace(options: Self.inThread) { _, space, gpu in
            let region = try space.allocate(length: 16 << 12, hugePages: false, populate: true)
            fill(region, seed: 13)
            let file = try gpu.open(space)
            var mirror = [UInt8](repeating: 0, count: 4 << 12)
            #expect(try file.makeExclusive(region.address, pages: 4, into: &mirror).cpages == 4)
            #expect(firstMismatch(region, seed: 13) == nil)
            #expect(space.statistics.snapshot.exclusiveRestores == 4)
            file.close()
        }
    }

    @Test("a kernel access to a device-resident page is EFAULT in-thread, and the page stays on the device")
    func kernelAccessIsEFAULT() throws {
        try withNativeSpace(options: Self.inThread) { _, space, gpu in
            let region = try space.allocate(length: 16 << 12, hugePages: false, populate: true)
            fill(region, seed: 3)
            let file = try gpu.open(space)
            _ = try file.migrateToDevice(region.address, pages: 16, into: nil)
            let devZero = open("/dev/zero", O_RDONLY)
            defer { close(devZero) }
            #expect(read(devZero, region.pointer + 2 * 4096, 16) == -1 && errno == EFAULT)
            #expect(region.devicePages == 16)
            #expect(firstMismatch(region, seed: 3) == nil)
            file.close()
        }
    }
}
