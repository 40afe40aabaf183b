import CUserfaultfd
import HMM
import HMMDevices
import HMMNative
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `NativeSpace.adopt`: memory the process already has becomes a region with its bytes.
@Suite("Native engine: adopting existing memory", .enabled(if: nativeUnavailable == nil, "native engine unavailable here (issue 15): \(nativeUnavailable ?? "")"), .timeLimit(.minutes(10)))
struct NativeAdoptTests {
    /// A private anonymous mapping of `length` bytes, THP-advised and populated, with word `i` = `seed + i`.
    private func mapFilled(_ length: Int, seed: Int32) -> UnsafeMutablePointer<Int32> {
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        _ = madvise(p, length, MADV_HUGEPAGE)
        let ints = p.bindMemory(to: Int32.self, capacity: length / 4)
        for i in 0..<(length / 4) { ints[i] = seed &+ Int32(i) }
        return ints
    }

    private func mismatches(_ ints: UnsafeMutablePointer<Int32>, _ range: Range<Int>, seed: Int32) -> Int {
        var bad = 0
        for i in range where ints[i] != seed &+ Int32(i) { bad += 1 }
        return bad
    }

    @Test("an adopted mapping keeps its bytes, migrates (2 MiB units and an unaligned start) and faults back")
    func adoptMigratesAndFaultsBack() throws {
        try withNativeSpace { machine, space, gpu in
            let length = 8 << 20
            let ints = mapFilled(length, seed: 7)
            let base = UInt64(UInt(bitPattern: ints))
            defer { munmap(ints, length) }
            // Start one page past a 2 MiB boundary: the region's pages and the host's 2 MiB units do not line up.
            let first = ((base + (2 << 20) - 1) & ~UInt64((2 << 20) - 1)) + 4096
            let adoptedLength = 4 << 20
            let region = try space.adopt(address: first, length: adoptedLength)
            #expect(region.address == first && region.length == adoptedLength)
            #expect(space.statistics.snapshot.regionsAdopted == 1)
            let lo = Int(first - base) / 4
            let hi = lo + adoptedLength / 4
            #expect(mismatches(ints, lo..<hi, seed: 7) == 0, "adoption changes no byte")
            let file = try gpu.open(space)
            let pages = adoptedLength >> 12
            #expect(try file.migrateToDevice(first, pages: pages, into: nil).cpages == pages)
            #expect(try region.residency(0..<adoptedLength).allSatisfy {
                if case .device = $0 { return true } else { return false }
            })
            // Plain loads fault every page back with its bytes.
            #expect(mismatches(ints, lo..<hi, seed: 7) == 0)
            #expect(space.statistics.snapshot.faultBacks > 0)
            // Outside the region nothing changed.
            #expect(mismatches(ints, 0..<lo, seed: 7) == 0)
            #expect(mismatches(ints, hi..<(length / 4), seed: 7) == 0)
            file.close()
            try machine.checkInvariants()
        }
    }

    @Test("bad adoptions throw the documented errors and change nothing")
    func badAdoptions() throws {
        try withNativeSpace { _, space, _ in
            let length = 1 << 20
            let ints = mapFilled(length, seed: 3)
            let base = UInt64(UInt(bitPattern: ints))
            defer { munmap(ints, length) }
            func code(_ body: () throws(HMMError) -> NativeRegion) -> HMMError.Code? {
                do throws(HMMError) {
                    _ = try body()
                    return nil
                } catch {
                    return error.code
                }
            }
            #expect(code { () throws(HMMError) in try space.adopt(address: base + 1, length: 4096) } == .invalidArgument)
            #expect(code { () throws(HMMError) in try space.adopt(address: base, length: 0) } == .invalidArgument)
            #expect(code { () throws(HMMError) in try space.adopt(address: base, length: 100) } == .invalidArgument)
            #expect(code { () throws(HMMError) in try space.adopt(address: UInt64.max & ~4095, length: 8192) } == .invalidArgument)
            // Past the end of the mapping: a hole (unmapped guard first).
            #expect(munmap(UnsafeMutableRawPointer(bitPattern: UInt(base) + UInt(length - 4096)), 4096) == 0)
            #expect(code { () throws(HMMError) in try space.adopt(address: base, length: length) } == .fault)
            // Shared memory cannot be adopted.
            let shared = mmap(nil, 8192, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)!
            defer { munmap(shared, 8192) }
            #expect(code { () throws(HMMError) in try space.adopt(address: UInt64(UInt(bitPattern: shared)), length: 8192) } == .unsupported)
            // The stack cannot be adopted.
            var local = 0
            let stackPage = UInt64(UInt(bitPattern: withUnsafeMutablePointer(to: &local) { UnsafeMutableRawPointer($0) })) & ~4095
            #expect(code { () throws(HMMError) in try space.adopt(address: stackPage, length: 4096) } == .unsupported)
            // Memory already in a region.
            let region = try space.allocate(length: 16 << 12)
            #expect(code { () throws(HMMError) in try space.adopt(address: region.address + 4096, length: 4096) } == .busy)
            _ = try space.adopt(address: base, length: 8192)
            #expect(code { () throws(HMMError) in try space.adopt(address: base + 4096, length: 8192) } == .busy)
            #expect(space.statistics.snapshot.regionsAdopted == 1)
            #expect(mismatches(ints, 0..<((length - 4096) / 4), seed: 3) == 0, "no failed adoption changed a byte")
            try space.close()
            #expect(code { () throws(HMMError) in try space.adopt(address: base + 16384, length: 4096) } == .noProcess)
        }
    }
}
