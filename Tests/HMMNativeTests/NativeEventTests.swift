import CUserfaultfd
import HMM
import HMMDevices
import HMMNative
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// munmap, MADV_DONTNEED, MADV_FREE and mremap by plain system calls on device-resident ranges: the
/// host's userfaultfd events become the kernel's notifier events, and device pages of ranges that lost
/// their mapping are freed.
@Suite("Native engine: host events", .enabled(if: nativeUnavailable == nil, "native engine unavailable here (issue 15): \(nativeUnavailable ?? "")"), .timeLimit(.minutes(10)))
struct NativeEventTests {
    @Test("munmap of part of a device-resident region frees its device pages and tells the mirror")
    func munmapFreesDevicePages() throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 64 << 12, hugePages: false, populate: true)
            fill(region, seed: 1)
            let file = try gpu.open(space)
            _ = try file.migrateToDevice(region.address, pages: 64, into: nil)
            #expect(gpu.pagesInUse == 64)
            #expect(file.mappedPages == 64)
            #expect(munmap(region.pointer + 8 * 4096, 4 * 4096) == 0)
            #expect(eventually { gpu.pagesInUse == 60 })
            #expect(file.mappedPages < 64, "the mirror heard the unmap")
            #expect(try region.residency((8 << 12)..<(12 << 12)).allSatisfy { $0 == .unmapped })
            try machine.checkInvariants()
            // The rest is intact (and comes back on touch).
            #expect(firstMismatch(region, seed: 1, to: 8 << 12) == nil)
            #expect(firstMismatch(region, seed: 1, from: 12 << 12) == nil)
            region.free()
            #expect(eventually { gpu.pagesInUse == 0 })
            #expect(space.region(containing: region.address) == nil)
            file.close()
        }
    }

    @Test("munmap of a whole region removes it from the space")
    func munmapWholeRegion() throws {
        try withNativeSpace { _, space, gpu in
            let region = try space.allocate(length: 2 << 20, populate: true)
            let file = try gpu.open(space)
            _ = try file.migrateToDevice(region.address, pages: 512, into: nil)
            #expect(munmap(region.pointer, region.length) == 0)
            #expect(eventually { space.region(containing: region.address) == nil })
            #expect(gpu.pagesInUse == 0)
            file.close()
        }
    }

    @Test("MADV_DONTNEED and MADV_FREE of device-resident pages free them; the pages then read zeros", arguments: [MADV_DONTNEED, MADV_FREE])
    func dropDevicePages(advice: Int32) throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 16 << 12, hugePages: false, populate: true)
            fill(region, seed: 5)
            let file = try gpu.open(space)
            _ = try file.migrateToDevice(region.address, pages: 16, into: nil)
            #expect(madvise(region.pointer + 2 * 4096, 4 * 4096, advice) == 0)
            #expect(eventually { gpu.pagesInUse == 12 })
            try machine.checkInvariants()
            let words = region.pointer.bindMemory(to: UInt32.self, capacity: region.length / 4)
            for page in 2..<6 { #expect(words[page * 1024 + 17] == 0) }
            #expect(firstMismatch(region, seed: 5, to: 2 << 12) == nil)
            #expect(firstMismatch(region, seed: 5, from: 6 << 12) == nil)
            file.close()
        }
    }

    @Test("mremap moves device-resident pages with the mapping; the new address reads the old data")
    func mremapMovesDevicePages() throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 32 << 12, hugePages: false, populate: true)
            fill(region, seed: 11)
            let file = try gpu.open(space)
            _ = try file.migrateToDevice(region.address, pages: 32, into: nil)
            // Somewhere else: a placeholder mapping the move replaces (MREMAP_MAYMOVE | MREMAP_FIXED).
            var error: Int32 = 0
            let target = cu_map_aligned(UInt64(region.length), 4096, PROT_NONE, &error)
            #expect(target != 0)
            let to = cu_mremap(region.address, UInt64(region.length), UInt64(region.length), 1 | 2, target, &error)
            #expect(to == target)
            #expect(to != 0, "mremap: errno \(-error)")
            guard to != 0, let moved = UnsafeMutableRawPointer(bitPattern: UInt(to)) else { return }
            #expect(eventually { space.region(containing: to) != nil && space.region(containing: region.address) == nil })
            #expect(gpu.pagesInUse == 32, "the device pages moved with the mapping, none freed")
            try machine.checkInvariants()
            let words = moved.bindMemory(to: UInt32.self, capacity: region.length / 4)
            for i in stride(from: 0, to: region.length / 4, by: 97) { #expect(words[i] == 11 &+ UInt32(i)) }
            space.region(containing: to)?.free()
            #expect(eventually { gpu.pagesInUse == 0 })
            file.close()
        }
    }
}

/// A 2 MiB device unit that `mremap` moves (found by `migrate_remap_fault` on native memory): before the
/// fix its fault-back looped until the page was poisoned when the unit was not split on the move.
/// And the first write to an empty huge-advised unit, which makes such units.
@Suite("Native engine: mremap of compound device units", .enabled(if: nativeUnavailable == nil, "native engine unavailable here (issue 15): \(nativeUnavailable ?? "")"), .timeLimit(.minutes(10)))
struct NativeCompoundRemapTests {
    @Test("a compound device unit moved by mremap (2 MiB-aligned or not) faults back with its bytes",
          arguments: [0, 1 << 19, 1 << 20])
    func compoundUnitSurvivesMremap(offset: Int) throws {
        try withNativeSpace { machine, space, gpu in
            let size = 2 << 20
            // Populated before registration, a huge-advised region is THP-backed: the first 2 MiB migrates
            // as one compound unit.
            let region = try space.allocate(length: 8 * size, hugePages: true, populate: true)
            let map = region.address
            #expect(munmap(UnsafeMutableRawPointer(bitPattern: UInt(map) + UInt(size)), 2 * size) == 0)
            let ints = region.pointer.bindMemory(to: Int32.self, capacity: size / 4)
            for i in 0..<(size / 4) { ints[i] = Int32(i) }
            let file = try gpu.open(space)
            #expect(try file.migrateToDevice(map, pages: 512, into: nil).cpages == 512)
            if hostHasTHP {
                #expect(try region.residency(0..<size).allSatisfy { $0 == .device(owner: ObjectIdentifier(gpu), huge: true) })
            }
            var e: Int32 = 0
            let to = cu_mremap(map, UInt64(size), UInt64(size), 3, map + UInt64(size + offset), &e)
            #expect(to != 0, "mremap: \(e)")
            let moved = UnsafeMutablePointer<Int32>(bitPattern: UInt(to))!
            var bad = 0
            for i in 0..<(size / 4) where moved[i] != Int32(i) { bad += 1 }
            #expect(bad == 0)
            #expect(space.statistics.snapshot.poisoned == 0)
            try machine.checkInvariants()
            file.close()
        }
    }

    @Test("the first write to an empty huge-advised 2 MiB unit fills it with one zeroed THP; a read gets 4 KiB")
    func hugeFirstTouch() throws {
        try withNativeSpace { machine, space, gpu in
            guard hostHasTHP else { return }
            let region = try space.allocate(length: 4 << 20, hugePages: nil)
            try region.advise(0..<(2 << 20), hugePages: true)
            let bytes = region.pointer.bindMemory(to: UInt8.self, capacity: region.length)
            bytes[4096 * 7] = 9                                   // a write in the advised unit
            var byte: UInt8 = 1
            var code: Int32 = 0
            #expect(cu_probe_read(region.pointer + (2 << 20) + 4096 * 3, &byte, &code) == 0 && byte == 0)  // a read in the unadvised one
            let s = space.statistics.snapshot
            // The host may refuse a THP (memory, fragmentation): then the engine filled a 4 KiB page.
            if s.hugeZeroFills == 1 {
                #expect(try region.residency(0..<(2 << 20)).allSatisfy { $0 == .host(huge: true, zero: false) })
                #expect(cu_anon_huge_kb(region.address) >= 2048)
            } else {
                #expect(s.zeroFills == 2)
            }
            #expect(bytes[4096 * 7] == 9 && bytes[0] == 0 && bytes[(2 << 20) - 1] == 0)
            #expect(try region.residency(((2 << 20) + 4096 * 3)..<((2 << 20) + 4096 * 4)) == [.host(huge: false, zero: true)])
            try machine.checkInvariants()
        }
    }
}
