import Testing
@testable import HMM
import HMMDevices

/// `HMM_DMIRROR_FLAGS` / `HMM_DMIRROR_FLAG_FAIL_ALLOC` exactly as `lib/test_hmm.c` implements them
/// (issue 10 item 7): the flag belongs to one open file, and the first migrating entry of either
/// direction consumes it whatever its order — a compound entry falls back to small pages, an order-0
/// entry to the device is skipped, an order-0 entry back to system fails as `VM_FAULT_OOM`.
@Suite("dmirror FAIL_ALLOC", .serialized)
struct MirrorFlagsTests {
    func withDevices(_ body: (Machine, MirrorDeviceSet, AddressSpace) throws -> Void) throws {
        try withMachine(.init(systemMemory: 64 << 20)) { m in
            let devices = try MirrorDeviceSet(machine: m, chunkSize: 8 << 20, coherent: false)
            let s = try m.makeAddressSpace()
            try body(m, devices, s)
        }
    }

    func small(_ s: AddressSpace, pages: Int) throws -> UInt64 {
        let a = try s.map(length: pages * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
        for p in 0..<pages { try s.store(UInt8(p + 1), at: a + UInt64(p) * page) }
        return a
    }

    func thp(_ s: AddressSpace) throws -> UInt64 {
        let base = try s.map(length: 2 * PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous])
        let w = (base + pmdSize - 1) & ~(pmdSize - 1)
        try s.advise(w, length: PageSize.pmd, .hugePage)
        for p in 0..<PageSize.pagesPerPMD { try s.store(UInt8(truncatingIfNeeded: p), at: w + UInt64(p) * page) }
        return w
    }

    @Test("an order-0 entry to the device consumes FAIL_ALLOC and is skipped: MIGRATE_TO_DEV reports ENOENT")
    func orderZeroToDeviceIsSkipped() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let a = try small(s, pages: 4)
            try fd.setFlags(.failAllocation)
            var mirror = [UInt8](repeating: 0, count: 4 * Int(page))
            expectError(.noEntry) { try fd.migrateToDevice(a, pages: 4, into: &mirror) }
            #expect(fd.flags == [], "the first migrating entry consumed the flag")
            #expect(try s.pagemap(at: a).present, "the skipped page stayed in system memory")
            for p in 1..<4 { #expect(!(try s.pagemap(at: a + UInt64(p) * page).present), "page \(p) moved") }
            #expect(try fd.migrateToDevice(a, pages: 4, into: &mirror).cpages == 4)
            for p in 0..<4 { #expect(mirror[p * Int(page)] == UInt8(p + 1)) }
            fd.close()
            s.exit()
        }
    }

    @Test("an order-0 device page going back consumes FAIL_ALLOC and fails as VM_FAULT_OOM: MIGRATE_TO_SYS is ENOMEM, a CPU access retries")
    func orderZeroToSystemFails() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let a = try small(s, pages: 2)
            #expect(try fd.migrateToDevice(a, pages: 2, into: nil).cpages == 2)
            try fd.setFlags(.failAllocation)
            expectError(.outOfMemory) { try fd.migrateToSystem(a, pages: 2) }
            #expect(fd.flags == [])
            #expect(!(try s.pagemap(at: a).present), "the page is still on the device")
            try fd.setFlags(.failAllocation)
            // A CPU fault asks the file that migrated the page (`rpage->zone_device_data`): VM_FAULT_OOM,
            // which the access retries (`pagefault_out_of_memory`) — the flag is gone, so it succeeds.
            #expect(try s.load(UInt8.self, at: a + page) == 2)
            #expect(fd.flags == [])
            #expect(try fd.migrateToSystem(a, pages: 2).cpages == 1)
            #expect(try s.load(UInt8.self, at: a) == 1)
            fd.close()
            s.exit()
        }
    }

    @Test("a compound entry consumes FAIL_ALLOC by falling back to 512 small pages, both ways")
    func compoundFallsBack() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let w = try thp(s)
            try fd.setFlags(.failAllocation)
            #expect(try fd.migrateToDevice(w, pages: 512, into: nil).cpages == 512)
            #expect(fd.flags == [])
            #expect(try s.pageTableEntry(at: w).level == .pte, "the source was split into small device pages")
            #expect(try fd.migrateToSystem(w, pages: 512).cpages == 512)
            let v = try thp(s)
            #expect(try fd.migrateToDevice(v, pages: 512, into: nil).cpages == 512)
            #expect(try s.pageTableEntry(at: v).level == .pmd, "a device THP")
            try fd.setFlags(.failAllocation)
            #expect(try fd.migrateToSystem(v, pages: 512).cpages > 0)
            #expect(fd.flags == [])
            #expect(try s.pageTableEntry(at: v).level == .pte, "back as small pages")
            for p in [0, 5, 511] { #expect(try s.load(UInt8.self, at: v + UInt64(p) * page) == UInt8(truncatingIfNeeded: p)) }
            fd.close()
            s.exit()
        }
    }

    @Test("FAIL_ALLOC belongs to one open file; FLAGS(0) cancels it")
    func perFileAndCancel() throws {
        try withDevices { m, devices, s in
            let dev = try devices.device(0)
            let fd = try dev.open(s)
            let other = try dev.open(s)
            try fd.setFlags(.failAllocation)
            let w = try thp(s)
            #expect(try other.migrateToDevice(w, pages: 512, into: nil).cpages == 512)
            #expect(try s.pageTableEntry(at: w).level == .pmd, "the other file's migration got a device THP")
            #expect(fd.flags == .failAllocation)
            try fd.setFlags([])
            let a = try small(s, pages: 1)
            var mirror = [UInt8](repeating: 0, count: Int(page))
            #expect(try fd.migrateToDevice(a, pages: 1, into: &mirror).cpages == 1)
            fd.close()
            other.close()
            s.exit()
        }
    }
}
