import CUserfaultfd
import HMM
import HMMDevices
import HMMNative
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Handles, limits, fork and remap corners of the native engine that a real program reaches
/// (issue 22 items 3–7), each reproduced single-threaded.
@Suite("Native engine: handles, limits, fork and remap corners", .enabled(if: nativeUnavailable == nil, "native engine unavailable here: \(nativeUnavailable ?? "")"), .timeLimit(.minutes(10)))
struct NativeLifecycleTests {
    /// Item 3: after a `.share` fork whose child exited, the parent rewrites 8 of 64 pages; the other 56
    /// stay copy-on-write shared with nobody, and `UFFDIO_MOVE` stops at the first of them with `EAGAIN`
    /// after a partial move. The migration must unshare and go on, not stop part-way without an error.
    @Test("after a .share fork, a migration of pages still shared with the exited child moves them all",
          .disabled(if: underThreadSanitizer, "the TSan runtime holds its locks across fork, so the FORK event is never read (see ForkPolicy.share)"))
    func migrationAfterShareFork() throws {
        var options = NativeSpace.Options()
        options.forkPolicy = .share
        try withNativeSpace(options: options) { machine, space, gpu in
            let pages = 64
            let region = try space.allocate(length: pages << 12, hugePages: false, populate: true)
            fill(region, seed: 41)
            let file = try gpu.open(space)
            let pid = fork()
            if pid == 0 { _exit(0) }
            #expect(pid > 0)
            let status = waitChild(pid)
            #expect(status != nil && status! & 0x7f == 0, "the child exited cleanly")
            // The parent rewrites every eighth page (its copy-on-write breaks there), with the same words.
            let words = region.pointer.bindMemory(to: UInt32.self, capacity: region.length / 4)
            for p in stride(from: 0, to: pages, by: 8) { words[p * 1024] = 41 &+ UInt32(p * 1024) }
            #expect(try file.migrateToDevice(region.address, pages: pages, into: nil).cpages == pages)
            #expect(region.devicePages == pages)
            #expect(firstMismatch(region, seed: 41) == nil, "every byte comes back as written")
            try machine.checkInvariants()
            file.close()
        }
    }

    /// Item 4: under `.share` a forked child inherits the userfaultfd; with in-thread faults it would
    /// inherit `UFFD_FEATURE_SIGBUS` and die on its first touch of a hole. The combination is refused.
    @Test(".share with in-thread faults is refused at init, naming the combination")
    func shareWithInThreadRefused() throws {
        let machine = try Machine(.init(systemMemory: 64 << 20))
        var options = NativeSpace.Options()
        options.forkPolicy = .share
        options.faultMode = .inThread
        #expect {
            _ = try NativeSpace(machine: machine, options: options)
        } throws: { error in
            guard let e = error as? HMMError else { return false }
            return e.code == .unsupported && "\(e)".contains("in-thread")
        }
        // Nothing was left behind: the machine takes a space afterwards.
        let space = try NativeSpace(machine: machine)
        try space.close()
        try machine.checkInvariants()
    }

    /// Item 5: `mremap` growing a region: the host's remap event names the old length only, so the
    /// grown tail is registered memory no region claims. Its first touch reads zeros in both modes —
    /// in-thread it used to be answered "not ours" and the process died of SIGBUS.
    @Test("the grown tail of an mremapped region reads zeros and takes stores", arguments: [FaultMode.handlerThread, .inThread])
    func grownTailReadsZeros(mode: FaultMode) throws {
        try withNativeSpace(options: .init(faultMode: mode)) { machine, space, gpu in
            let region = try space.allocate(length: 8 << 12, hugePages: false, populate: true)
            fill(region, seed: 9)
            let file = try gpu.open(space)
            #expect(try file.migrateToDevice(region.address + (2 << 12), pages: 2, into: nil).cpages == 2)
            var error: Int32 = 0
            let to = cu_mremap(region.address, 8 << 12, 16 << 12, 1, 0, &error)
            #expect(to != 0, "mremap failed: errno \(error)")
            guard to != 0 else { return }
            let words = UnsafeMutablePointer<UInt32>(bitPattern: UInt(to))!
            // Old pages keep their bytes (the device-resident two fault back), the tail reads zeros.
            #expect(words[3 * 1024 + 5] == 9 &+ UInt32(3 * 1024 + 5))
            #expect(words[7 * 1024] == 9 &+ UInt32(7 * 1024))
            var byte: UInt8 = 0xFF
            var code: Int32 = 0
            #expect(cu_probe_read(UnsafeRawPointer(bitPattern: UInt(to + (12 << 12)))!, &byte, &code) == 0, "the tail's first touch raised a signal")
            #expect(byte == 0)
            words[13 * 1024 + 1] = 0xABCD
            #expect(words[13 * 1024 + 1] == 0xABCD)
            space.waitUntilIdle()
            try machine.checkInvariants()
            file.close()
            _ = munmap(UnsafeMutableRawPointer(bitPattern: UInt(to)), 16 << 12)
        }
    }

    /// Item 6: a freed region's handle must throw — its addresses may be another mapping's now, and a
    /// `protect` through it would change that mapping's protection.
    @Test("a freed region's handle throws .badDescriptor and touches nothing at its old address")
    func freedHandleThrows() throws {
        try withNativeSpace { _, space, _ in
            let region = try space.allocate(length: 4 << 12, hugePages: false, populate: true)
            let address = region.address
            region.free()
            // Something else takes the address.
            let other = mmap(UnsafeMutableRawPointer(bitPattern: UInt(address)), 4 << 12, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
            #expect(other == UnsafeMutableRawPointer(bitPattern: UInt(address)))
            func isBadDescriptor(_ body: () throws -> Void) -> Bool {
                do { try body() } catch let e as HMMError { return e.code == .badDescriptor } catch { return false }
                return false
            }
            #expect(isBadDescriptor { try region.protect(0..<(4 << 12), [.read]) })
            #expect(isBadDescriptor { try region.advise(0..<(4 << 12), hugePages: true) })
            #expect(isBadDescriptor { _ = try region.residency(0..<(4 << 12)) })
            #expect(isBadDescriptor { try region.revoke(0..<4096) })
            // The other mapping is untouched: still writable.
            other?.storeBytes(of: 7, as: UInt32.self)
            #expect(other?.load(as: UInt32.self) == 7)
            region.free()  // idempotent
            _ = munmap(other, 4 << 12)
        }
    }

    /// Item 6, the partial case: `protect` over a page the program unmapped and mapped again must not
    /// change the program's new mapping.
    @Test("protect over a page the program replaced throws .outOfMemory and leaves the new mapping alone")
    func protectOverReplacedPage() throws {
        try withNativeSpace { _, space, _ in
            let region = try space.allocate(length: 4 << 12, hugePages: false, populate: true)
            let page = region.pointer + 2 * 4096
            #expect(munmap(page, 4096) == 0)
            #expect(mmap(page, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) == page)
            #expect {
                try region.protect(0..<(4 << 12), [.read])
            } throws: { ($0 as? HMMError)?.code == .outOfMemory }
            page.storeBytes(of: 5, as: UInt32.self)  // still writable: no SIGSEGV
            #expect(page.load(as: UInt32.self) == 5)
            // The pages still the region's can be protected.
            try region.protect(0..<(2 << 12), [.read])
            region.free()
            _ = munmap(page, 4096)
        }
    }

    /// Item 7: the limit on a region's size is the host window's, 2^24 pages (64 GiB), and the error says so.
    @Test("a region over 64 GiB is refused with the real limit named")
    func regionLimitNamed() throws {
        try withNativeSpace { _, space, _ in
            #expect(NativeRegion.maximumLength == 64 << 30)
            #expect {
                _ = try space.allocate(length: (64 << 30) + 4096)
            } throws: { error in
                guard let e = error as? HMMError else { return false }
                return e.code == .invalidArgument && "\(e)".contains("64 GiB")
            }
            #expect {
                _ = try space.adopt(address: 1 << 40, length: (64 << 30) + 4096)
            } throws: { error in
                guard let e = error as? HMMError else { return false }
                return e.code == .invalidArgument && "\(e)".contains("64 GiB")
            }
        }
    }

    /// Found by the C interface's fuzz: a device evicting the pages of a region the program made
    /// inaccessible poisoned them. The kernel's eviction (`migrate_device_range`) ignores the VMA's
    /// protection; the bytes must come home and read back once the program allows reads again.
    @Test("device pages of a region without read access come home on eviction, never poisoned",
          arguments: [Protection(), [.write], [.execute]])
    func evictionIgnoresProtection(protection: Protection) throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 8 << 12, hugePages: false, populate: true)
            fill(region, seed: 5)
            let file = try gpu.open(space)
            #expect(try file.migrateToDevice(region.address, pages: 8, into: nil).cpages == 8)
            try region.protect(0..<(8 << 12), protection)
            file.close()  // dmirror_fops_release evicts every page of the device
            #expect(space.statistics.snapshot.poisoned == 0)
            #expect(gpu.pagesInUse == 0)
            try region.protect(0..<(8 << 12), [.read, .write])
            #expect(firstMismatch(region, seed: 5) == nil)
            try machine.checkInvariants()
        }
    }
}
