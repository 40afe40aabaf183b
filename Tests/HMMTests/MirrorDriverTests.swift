import Testing
@testable import HMM
import HMMDevices

/// Smaller ways the dmirror port now matches `lib/test_hmm.c` (issue 10 item 9).
@Suite("dmirror details", .serialized)
struct MirrorDriverTests {
    func withDevice(_ body: (Machine, MirrorDevice, AddressSpace) throws -> Void) throws {
        try withMachine(.init(systemMemory: 64 << 20)) { m in
            let devices = try MirrorDeviceSet(machine: m, chunkSize: 8 << 20, coherent: false)
            let s = try m.makeAddressSpace()
            try body(m, devices.devices[0], s)
        }
    }

    @Test("snapshot: the huge zero page reads READ|PMD (0x05); only the 4 KiB zero page is ZERO (is_zero_pfn)")
    func snapshotHugeZeroPage() throws {
        try withDevice { m, dev, s in
            let fd = try dev.open(s)
            let raw = try s.map(length: 2 * PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous])
            let w = (raw + pmdSize - 1) & ~(pmdSize - 1)
            try s.advise(w, length: PageSize.pmd, .hugePage)
            #expect(try s.load(UInt8.self, at: w) == 0)
            #expect(try s.pagemap(at: w).pfn == m.hugeZeroPFN)
            var out = [UInt8](repeating: 0, count: 512)
            _ = try fd.snapshot(w, pages: 512, into: &out)
            #expect(Set(out) == [MirrorProtection.read | MirrorProtection.pmd])
            let small = try s.map(length: Int(page), protection: [.read], flags: [.private, .anonymous])
            #expect(try s.load(UInt8.self, at: small) == 0)
            var one = [UInt8](repeating: 0, count: 1)
            _ = try fd.snapshot(small, pages: 1, into: &one)
            #expect(one == [MirrorProtection.zero | MirrorProtection.read])
            fd.close()
            s.exit()
        }
    }

    @Test("close evicts the device's pages back to system memory (dmirror_fops_release); the data survives")
    func closeEvicts() throws {
        try withDevice { m, dev, s in
            let fd = try dev.open(s)
            let a = try s.map(length: 8 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            for p in 0..<8 { try s.store(UInt8(p + 1), at: a + UInt64(p) * page) }
            #expect(try fd.migrateToDevice(a, pages: 8, into: nil).cpages == 8)
            #expect(dev.pagesInUse == 8)
            #expect(try !s.pagemap(at: a).present)
            let chunks = dev.chunkCount
            fd.close()
            #expect(dev.pagesInUse == 0, "every device page was evicted")
            #expect(dev.chunkCount == chunks, "the chunks stay registered")
            for p in 0..<8 {
                #expect(try s.pagemap(at: a + UInt64(p) * page).present)
                #expect(try s.load(UInt8.self, at: a + UInt64(p) * page) == UInt8(p + 1))
            }
            s.exit()
        }
    }

    @Test("RELEASE and FLAGS pass the ioctl's entry check: unaligned address or an empty range is EINVAL, so FLAGS(0) is")
    func ioctlEntryCheck() throws {
        try withDevice { m, dev, s in
            let fd = try dev.open(s)
            let a = try s.map(length: Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            expectError(.invalidArgument) { try fd.checkCommand(a + 8, pages: 1) }
            expectError(.invalidArgument) { try fd.checkCommand(a, pages: 0) }
            expectError(.invalidArgument) { try fd.checkCommand(UInt64.max & ~(page - 1), pages: 2) }
            try fd.checkCommand(a, pages: Int(MirrorFlags.failAllocation.rawValue))
            fd.close()
            expectError(.badDescriptor) { try fd.checkCommand(a, pages: 1) }
            s.exit()
        }
    }
}
