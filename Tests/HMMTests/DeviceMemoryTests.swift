import Dispatch
import Synchronization
import Testing
@_spi(Engine) @testable import HMM
import HMMDevices

#if canImport(Glibc)
import Glibc
#endif

/// Device memory beyond the selftest port: the kernel's historical device-memory races forced through hook
/// points, the cpages rules, the frame lifecycle, and a multi-device stress run.
@Suite("Device memory", .serialized)
struct DeviceMemoryTests {
    static let config = Machine.Configuration(systemMemory: 64 << 20, hugetlbPages: 2)

    /// A machine with two private devices (0, 1) and two coherent ones (2, 3) of 8 MiB each.
    func withDevices(_ body: (Machine, MirrorDeviceSet, AddressSpace) throws -> Void) throws {
        try withMachine(Self.config) { m in
            let devices = try MirrorDeviceSet(machine: m, chunkSize: 8 << 20)
            let s = try m.makeAddressSpace()
            try body(m, devices, s)
        }
    }

    func pte(_ s: AddressSpace, _ a: UInt64) -> PageTableEntry {
        var out = PageTableEntry.none
        s.mmapLock.withReadLock { s.withLockedPTE(a) { _, e in out = e } }
        return out
    }

    func fill(_ s: AddressSpace, _ a: UInt64, pages: Int, _ value: (Int) -> UInt8) throws {
        for p in 0..<pages { try s.write([UInt8](repeating: value(p), count: Int(page)), at: a + UInt64(p) * page) }
    }

    @Test("a device page comes and goes: refcount 1 and locked on allocation, folioFree at 0, pagemap references balance")
    func frameLifecycle() throws {
        try withDevices { m, devices, s in
            let dev = try devices.device(0)
            let fd = try dev.open(s)
            let a = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try fill(s, a, pages: 4) { UInt8($0 + 1) }
            var mirror = [UInt8](repeating: 0, count: 4 * Int(page))
            #expect(try fd.migrateToDevice(a, pages: 4, into: &mirror).cpages == 4)
            #expect(dev.pagesInUse == 4)
            let e = pte(s, a)
            #expect(e.kind == .devicePrivateWrite)
            let pm = try #require(m.pagemap(of: e.pfn))
            #expect(pm.refcount(e.pfn) == 1 && pm.framesInUse == 4)
            #expect(!m.frames.flags(e.pfn).contains(.locked))
            // A device-private frame is never CPU-readable through a present entry: the CPU faults it back.
            #expect(try s.read(count: 1, at: a) == [1])
            #expect(dev.pagesInUse == 3 && pm.refcount(e.pfn) == 0)
            try s.unmap(a, length: 4 * Int(page))
            #expect(dev.pagesInUse == 0 && pm.framesInUse == 0)
            fd.close()
        }
    }

    @Test("unregistering a pagemap with frames in use reports it instead of hanging; after eviction it succeeds")
    func unregisterBusy() throws {
        try withDevices { m, devices, s in
            let dev = try devices.device(1)
            let fd = try dev.open(s)
            let a = try s.map(length: Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt32(0xfeed), at: a)
            var mirror = [UInt8](repeating: 0, count: Int(page))
            _ = try fd.migrateToDevice(a, pages: 1, into: &mirror)
            let pm = try #require(m.pagemap(of: pte(s, a).pfn))
            expectError(.busy) { try m.unregisterPagemap(pm) }
            #expect(!pm.isUnregistered)
            try dev.release()
            #expect(pm.isUnregistered && dev.chunkCount == 0)
            #expect(try s.load(UInt32.self, at: a) == 0xfeed)
            #expect(pte(s, a).kind == .present)
            fd.close()
        }
    }

    /// CVE-2022-3523: the fault takes its page reference under the page-table lock, so a page
    /// whose every mapping disappears while `migrateToRAM` is pending is not freed under it.
    @Test("a racing unmap cannot free the device page under a pending migrateToRAM")
    func faultVersusFree() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let a = try s.map(length: Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt64(42), at: a)
            var mirror = [UInt8](repeating: 0, count: Int(page))
            _ = try fd.migrateToDevice(a, pages: 1, into: &mirror)
            let child = try s.fork()
            let devPage = pte(s, a).pfn
            let pm = try #require(m.pagemap(of: devPage))
            let seen = Locked<Int32>(-1)
            m.hooks.set(.deviceFaultBeforeMigrateToRAM) {
                // Another process drops its mapping of the page while our fault is in flight.
                child.exit()
                seen.withLock { $0 = Int32(pm.refcount(devPage)) }
            }
            defer { m.hooks.set(.deviceFaultBeforeMigrateToRAM, nil) }
            #expect(try s.load(UInt64.self, at: a) == 42)
            // Our mapping + the fault's own reference: the page survived the child's exit.
            #expect(seen.withLock { $0 } == 2)
            #expect(pm.refcount(devPage) == 0)
            fd.close()
        }
    }

    /// A page migrated back from a writable device-private entry comes back writable (`try_to_migrate_one()`
    /// made read-only migration entries for them, and so a second fault, until its 2021 fix).
    @Test("a write fault on a device page needs exactly one fault and lands writable")
    func noDoubleFault() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let a = try s.map(length: Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt32(1), at: a)
            var mirror = [UInt8](repeating: 0, count: Int(page))
            _ = try fd.migrateToDevice(a, pages: 1, into: &mirror)
            let faults = m.statistics[.faultDevicePrivate]
            let reuse = m.statistics[.faultCOWReuse]
            try s.store(UInt32(2), at: a)
            #expect(m.statistics[.faultDevicePrivate] == faults + 1)
            #expect(m.statistics[.faultCOWReuse] == reuse)
            let e = pte(s, a)
            #expect(e.isPresent && e.isWritable && m.frames.flags(e.pfn).contains(.anonExclusive))
            fd.close()
        }
    }

    /// The PTE's dirty bit reaches the folio when the entry is torn down, and comes back (the kernel's
    /// collect dropped it, losing data, until v6.0; migration entries carry young/dirty since v6.1).
    @Test("the dirty bit is carried to the device page and back")
    func dirtyCarried() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let a = try s.map(length: Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt32(7), at: a)
            let ram = pte(s, a)
            #expect(ram.isDirty && !m.frames.flags(ram.pfn).contains(.dirty))
            var mirror = [UInt8](repeating: 0, count: Int(page))
            _ = try fd.migrateToDevice(a, pages: 1, into: &mirror)
            let dev = pte(s, a)
            #expect(m.frames.flags(dev.pfn).contains(.dirty))
            _ = try fd.migrateToSystem(a, pages: 1)
            let back = pte(s, a)
            #expect(back.isPresent && m.frames.flags(back.pfn).contains(.dirty))
            #expect(try s.load(UInt32.self, at: a) == 7)
            fd.close()
        }
    }

    final class Owner: Sendable {}

    /// cpages counts what still migrates after unmap (holes included), npages every slot (an amdgpu driver
    /// that assumed `cpages == npages` mis-migrated partial ranges until Jan 2025).
    @Test("cpages excludes pinned and locked pages, includes holes; drivers must walk npages")
    func cpagesSemantics() throws {
        try withMachine(Self.config) { m in
            let s = try m.makeAddressSpace()
            let a = try s.map(length: 8 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            for p in 0..<4 { try s.store(UInt32(p + 10), at: a + UInt64(p) * page) }
            let pin = try s.getUserPages(a + page, count: 1, flags: [.write, .pin])
            let locked = pte(s, a + 2 * page).pfn
            m.frames.lock(locked)
            let owner = Owner()
            try s.withMmapReadLock { () throws(HMMError) in
                let mig = try MigrateVMA(space: s, start: a, end: a + 8 * page, select: .system, owner: owner)
                try mig.setup()
                #expect(mig.npages == 8)
                #expect(mig.cpages == 6)  // pages 0 and 3, holes 4…7
                #expect(mig.src[1] == .empty && mig.src[2] == .empty)
                #expect(mig.src[4].isMigrating && mig.src[4].pfn == nil)
                #expect(pte(s, a).isMigration)
                mig.finalize()  // no destinations: everything is restored
            }
            m.frames.unlock(locked)
            #expect(pte(s, a).isPresent && pte(s, a).isWritable)
            for p in 0..<4 { #expect(try s.load(UInt32.self, at: a + UInt64(p) * page) == UInt32(p + 10)) }
            pin.release()
        }
    }

    /// Many CPUs faulting one device page all make progress: the losers sleep on the page lock instead of
    /// spinning on a failed migration (a livelock the kernel fixed in 2025).
    @Test("concurrent faults on one device-private page all complete")
    func concurrentFaults() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let a = try s.map(length: Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt64(0xabcdef), at: a)
            var mirror = [UInt8](repeating: 0, count: Int(page))
            _ = try fd.migrateToDevice(a, pages: 1, into: &mirror)
            let entered = DispatchSemaphore(value: 0)
            let release = DispatchSemaphore(value: 0)
            let once = Atomic<Bool>(false)
            m.hooks.set(.deviceFaultBeforeMigrateToRAM) {
                if !once.exchange(true, ordering: .relaxed) {
                    entered.signal()
                    release.wait()
                }
            }
            defer { m.hooks.set(.deviceFaultBeforeMigrateToRAM, nil) }
            let results = Locked<[UInt64]>([])
            var threads = [TestThread {
                let v = (try? s.load(UInt64.self, at: a)) ?? 0
                results.withLock { $0.append(v) }
            }]
            entered.wait()
            let waitsBefore = m.statistics[.faultDevicePrivateWait]
            for _ in 0..<3 {
                threads.append(TestThread {
                    let v = (try? s.load(UInt64.self, at: a)) ?? 0
                results.withLock { $0.append(v) }
                })
            }
            // Let the others reach the locked page, then let the first fault finish.
            let deadline = DispatchTime.now() + .seconds(5)
            while m.statistics[.faultDevicePrivateWait] < waitsBefore + 3 && DispatchTime.now() < deadline { usleep(100) }
            release.signal()
            for t in threads { t.join() }
            #expect(results.withLock { $0 } == [UInt64](repeating: 0xabcdef, count: 4))
            #expect(m.statistics[.faultDevicePrivateWait] >= waitsBefore + 3)
            #expect(m.statistics[.faultDevicePrivate] >= 1)
            fd.close()
        }
    }

    @Test("a long-term pin moves a device-coherent page to RAM; a short-term one leaves it in place")
    func coherentLongTermPin() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(2).open(s)
            let a = try s.map(length: 2 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt32(5), at: a)
            try s.store(UInt32(6), at: a + page)
            var mirror = [UInt8](repeating: 0, count: 2 * Int(page))
            _ = try fd.migrateToDevice(a, pages: 2, into: &mirror)
            #expect(m.deviceKind(pte(s, a).pfn) == .deviceCoherent)
            let short = try s.getUserPages(a, count: 1, flags: [.write, .pin])
            #expect(m.deviceKind(short.pfns[0]) == .deviceCoherent)
            short.release()
            let long = try s.getUserPages(a + page, count: 1, flags: [.write, .pin, .longTerm])
            #expect(m.deviceKind(long.pfns[0]) == nil)
            #expect(try s.load(UInt32.self, at: a + page) == 6)
            long.release()
            fd.close()
        }
    }

    @Test("interval notifiers: read-begin / read-retry see every invalidation, with event and owner")
    func notifierProtocol() throws {
        try withMachine(Self.config) { m in
            let s = try m.makeAddressSpace()
            final class Recorder: IntervalNotifierOperations, @unchecked Sendable {
                let events = Locked<[(NotifierEvent, UInt64, UInt64)]>([])
                func invalidate(_ n: IntervalNotifier, range: NotifierRange, sequence: UInt64) -> Bool {
                    events.withLock { $0.append((range.event, range.start, range.end)) }
                    n.setSequence(sequence)
                    return true
                }
            }
            let rec = Recorder()
            let a = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            let n = try s.insertIntervalNotifier(start: a, length: 4 * page, rec)
            let seq = n.readBegin()
            #expect(!n.readRetry(seq))
            try s.store(UInt8(1), at: a)
            #expect(!n.readRetry(seq))  // a fault does not invalidate
            try s.protect(a, length: Int(page), [.read])
            #expect(n.readRetry(seq))
            let seq2 = n.readBegin()
            try s.advise(a + page, length: Int(page), .dontNeed)
            try s.unmap(a + 3 * page, length: Int(page))
            _ = try s.unmap(a + 100 * page, length: Int(page))  // outside: not delivered
            #expect(n.readRetry(seq2))
            let ev = rec.events.withLock { $0 }
            #expect(ev.map(\.0) == [.protectionVMA, .clear, .unmap])
            #expect(ev[2].1 == a + 3 * page && ev[2].2 == a + 4 * page)
            n.remove()
            try s.unmap(a, length: Int(page))
            #expect(rec.events.withLock { $0.count } == 3)
            expectError(.invalidArgument) { try s.insertIntervalNotifier(start: a, length: 0, rec) }
        }
    }

    @Test("bad input to the driver-facing API gets the kernel's errno and changes nothing")
    func badDriverInput() throws {
        try withDevices { m, devices, s in
            let owner = Owner()
            let a = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt32(9), at: a)
            let h = try s.map(length: PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous, .hugetlb])
            try s.withMmapReadLock { () throws(HMMError) in
                expectError(.invalidArgument) { try MigrateVMA(space: s, start: a, end: a, select: .system, owner: owner) }
                expectError(.invalidArgument) {
                    try MigrateVMA(space: s, start: 0x1000, end: 0x3000, select: .system, owner: owner).setup()
                }
                expectError(.invalidArgument) {
                    try MigrateVMA(space: s, start: a, end: a + 8 * page, select: .system, owner: owner).setup()
                }
                expectError(.invalidArgument) {
                    try MigrateVMA(space: s, start: h, end: h + page, select: .system, owner: owner).setup()
                }
                expectError(.invalidArgument) {
                    try MigrateVMA(space: s, start: a, end: a + page, select: .system, owner: owner, faultPage: PFN(5)).setup()
                }
                let mig = try MigrateVMA(space: s, start: a, end: a + page, select: .system, owner: owner)
                expectError(.invalidArgument) { try mig.pages() }
                try mig.setup()
                expectError(.invalidArgument) { try mig.setup() }
                mig.dst[0] = MigratePFN(PFN(3))  // not locked, not ours
                expectError(.invalidArgument) { try mig.pages() }
                mig.finalize()
                expectError(.unsupported) {
                    let f = try m.makeFile(size: Int(page))
                    _ = f
                    try s.makeDeviceExclusive(h, owner: nil) { _ in }
                }
            }
            #expect(try s.load(UInt32.self, at: a) == 9)
            expectError(.invalidArgument) { try MigrateDevice(machine: m, range: PFN(0), count: 1) }
            expectError(.invalidArgument) { try MigrateDevice(machine: m, pfns: []) }
            expectError(.invalidArgument) { try m.registerPagemap(kind: .devicePrivate, count: 100, owner: owner, operations: devices.devices[0]) }
            let pm = try #require(m.pagemap(of: PFN(UInt64(m.totalFrames))))
            expectError(.invalidArgument) { try pm.initFolio(pm.firstPFN + 1, order: 9) }
            expectError(.invalidArgument) { try pm.initFolio(PFN(0), order: 0) }
            expectError(.invalidArgument) { try m.copyPage(from: PFN(UInt64(1) << 23), to: PFN(1)) }
            var pfns = try HMMRange(notifier: try s.insertIntervalNotifier(start: a, length: page, SilentNotifier()), start: a, end: a + page)
            pfns.pfns = [0, 0]
            expectError(.invalidArgument) { try s.withMmapReadLock { () throws(HMMError) in try s.rangeFault(&pfns) } }
            pfns.notifier.remove()
            let other = try m.makeAddressSpace()
            var foreign = try HMMRange(notifier: try other.insertIntervalNotifier(start: a, length: page, SilentNotifier()),
                                   start: a, end: a + page)
            expectError(.invalidArgument) { try s.withMmapReadLock { () throws(HMMError) in try s.rangeFault(&foreign) } }
            foreign.notifier.remove()
            other.exit()

            // Wrong owner: a device-private page is selected only by the migration of its own driver.
            let fd0 = try devices.device(0).open(s)
            var one = [UInt8](repeating: 0, count: Int(page))
            _ = try fd0.migrateToDevice(a, pages: 1, into: &one)
            try s.withMmapReadLock { () throws(HMMError) in
                let stranger = try MigrateVMA(space: s, start: a, end: a + page, select: .devicePrivate, owner: owner)
                try stranger.setup()
                #expect(stranger.cpages == 0 && stranger.src[0] == .empty)
                stranger.finalize()
            }
            #expect(pte(s, a).kind == .devicePrivateWrite)
            fd0.close()

            // MirrorFile commands: the ioctl entry checks, closed handles and removed devices.
            let fd = try devices.device(0).open(s)
            var buf = [UInt8](repeating: 0, count: 4 * Int(page))
            expectError(.invalidArgument) { try fd.read(a + 1, pages: 1, into: &buf) }
            expectError(.invalidArgument) { try fd.read(a, pages: 0, into: &buf) }
            expectError(.invalidArgument) { try fd.write(UInt64.max & ~0xfff, pages: 2, from: buf) }
            expectError(.fault) { try fd.read(a, pages: 8, into: &buf) }  // mirror buffer too short
            expectError(.fault) { try fd.read(0x10000, pages: 1, into: &buf) }  // unmapped
            expectError(.invalidArgument) { try fd.migrateToDevice(0x10000, pages: 1, into: &buf) }
            expectError(.invalidArgument) { try fd.migrateToSystem(0x10000, pages: 1) }
            fd.close()
            expectError(.badDescriptor) { try fd.read(a, pages: 1, into: &buf) }
            expectError(.badDescriptor) { try fd.setFlags(.failAllocation) }
            let dev3 = try devices.device(3)
            let fd3 = try dev3.open(s)
            try dev3.remove()
            expectError(.noDevice) { try fd3.snapshot(a, pages: 1, into: &buf) }
            expectError(.noDevice) { try dev3.open(s) }
            expectError(.noDevice) { try devices.device(7) }
            #expect(try s.load(UInt32.self, at: a) == 9)
        }
    }

    /// Threads migrate to two devices and back, fault, write, fork, protect and unmap one range; every
    /// page always holds one value of its own (a checksum) and the invariants hold at the end.
    @Test("stress: migrations on two devices, CPU faults, fork, mprotect and unmap race on one range")
    func stress() throws {
        try withDevices { m, devices, s in
            let pages = 32
            let a = try s.map(length: pages * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            for p in 0..<pages { try s.write([UInt8](repeating: UInt8(p), count: Int(page)), at: a + UInt64(p) * page) }
            let fds = try [devices.device(0).open(s), devices.device(1).open(s), devices.device(2).open(s)]
            let failures = Locked<[String]>([])
            let seed: UInt64 = 0x5DEECE66D
            let deadline = DispatchTime.now() + .milliseconds(1500)
            /// A page is consistent if every byte is the same and ≡ its index mod 32 (or 0 after unmap).
            @Sendable func check(_ bytes: [UInt8], _ p: Int, _ what: String) {
                guard let first = bytes.first else { return }
                if bytes.contains(where: { $0 != first }) || (first != 0 && Int(first) % pages != p) {
                    failures.withLock { $0.append("\(what): page \(p) torn (\(first))") }
                }
            }
            runThreads(5) { t in
                var rng = ConcurrencyTests.XorShift(state: seed &+ UInt64(t) &* 0x9E3779B97F4A7C15)
                var mirror = [UInt8](repeating: 0, count: 4 * Int(page))
                while DispatchTime.now() < deadline {
                    let p = rng.below(pages - 4)
                    let at = a + UInt64(p) * page
                    switch t {
                    case 0, 1:
                        let fd = fds[t == 0 ? rng.below(2) : 2]
                        _ = try? fd.migrateToDevice(at, pages: 4, into: &mirror)
                        if rng.below(3) == 0 { _ = try? fd.migrateToSystem(at, pages: 4) }
                    case 2:
                        if let bytes = try? s.read(count: Int(page), at: at) { check(bytes, p, "cpu read") }
                        let v = UInt8(p + pages * (1 + rng.below(6)))
                        try? s.write([UInt8](repeating: v, count: Int(page)), at: at)
                    case 3:
                        if let child = try? s.fork() {
                            if let bytes = try? child.read(count: Int(page), at: at) { check(bytes, p, "child read") }
                            try? child.write([UInt8](repeating: UInt8(p), count: Int(page)), at: at)
                            child.exit()
                        }
                    default:
                        if rng.below(4) == 0 {
                            try? s.unmap(at, length: Int(page))
                            _ = try? s.map(at: at, length: Int(page), protection: [.read, .write], flags: [.private, .anonymous, .fixed])
                        } else {
                            try? s.protect(at, length: 2 * Int(page), [.read])
                            try? s.protect(at, length: 2 * Int(page), [.read, .write])
                        }
                    }
                }
            }
            #expect(failures.withLock { $0 }.isEmpty, "seed \(seed): \(failures.withLock { $0.prefix(5) })")
            for p in 0..<pages { check(try s.read(count: Int(page), at: a + UInt64(p) * page), p, "final") }
            #expect(failures.withLock { $0 }.isEmpty)
            for fd in fds { fd.close() }
        }
    }
}

final class SilentNotifier: IntervalNotifierOperations, @unchecked Sendable {
    func invalidate(_ n: IntervalNotifier, range: NotifierRange, sequence: UInt64) -> Bool {
        n.setSequence(sequence)
        return true
    }
}

/// 2 MiB device pages: compound migration, PMD device-private entries, splitting, eviction.
@Suite("Device THP", .serialized)
struct DeviceTHPTests {
    func withDevices(_ body: (Machine, MirrorDeviceSet, AddressSpace) throws -> Void) throws {
        try withMachine(.init(systemMemory: 64 << 20)) { m in
            let devices = try MirrorDeviceSet(machine: m, chunkSize: 8 << 20)
            let s = try m.makeAddressSpace()
            try body(m, devices, s)
        }
    }

    /// A THP window of 2 MiB filled with `value(page)`.
    func thp(_ s: AddressSpace, _ value: (Int) -> UInt8) throws -> (UInt64, UInt64) {
        let base = try s.map(length: 2 * PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous])
        let w = (base + pmdSize - 1) & ~(pmdSize - 1)
        try s.advise(w, length: PageSize.pmd, .hugePage)
        for p in 0..<PageSize.pagesPerPMD { try s.write([UInt8](repeating: value(p), count: Int(page)), at: w + UInt64(p) * page) }
        return (base, w)
    }

    func pmdEntry(_ s: AddressSpace, _ a: UInt64) -> PageTableEntry {
        s.mmapLock.withReadLock {
            guard let n = try? s.pmdNode(a, allocate: false), n != 0 else { return .none }
            return PageTableEntry(rawValue: s.pmdSlot(n, a).pointee.load(ordering: .acquiring))
        }
    }

    @Test("a THP moves to the device as one 2 MiB folio (one PMD entry) and back as one")
    func roundTrip() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            let (_, w) = try thp(s) { UInt8($0 & 0xFF) }
            #expect(pmdEntry(s, w).isLeaf)
            #expect(try fd.migrateToDevice(w, pages: 512, into: nil).cpages == 512)
            let e = pmdEntry(s, w)
            #expect(e.kind == .devicePrivateWrite && e.isHuge && m.frames.order(e.pfn) == PageSize.pmdOrder)
            #expect(try fd.migrateToSystem(w, pages: 512).cpages == 1)  // one compound entry
            let back = pmdEntry(s, w)
            #expect(back.isLeaf && back.isHuge && back.isWritable)
            #expect(try s.read(count: 1, at: w + 300 * page) == [UInt8(300 & 0xFF)])
            fd.close()
        }
    }

    /// The race the device-THP review worried about: a CPU fault on one subpage of a device THP while
    /// another thread splits it by unmapping part of it.
    @Test("a CPU fault on a device THP subpage races a partial unmap that splits it; data stays intact")
    func faultVersusSplit() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(0).open(s)
            for round in 0..<6 {
                let (base, w) = try thp(s) { UInt8(($0 + round) & 0xFF) }
                _ = try fd.migrateToDevice(w, pages: 512, into: nil)
                #expect(pmdEntry(s, w).isDevicePrivate)
                let entered = Atomic<Bool>(false)
                m.hooks.set(.deviceFaultBeforeMigrateToRAM) { entered.store(true, ordering: .releasing) }
                let reader = TestThread {
                    let v = (try? s.read(count: 1, at: w + 10 * page)) ?? []
                    #expect(v == [UInt8((10 + round) & 0xFF)])
                }
                let unmapper = TestThread {
                    if round % 2 == 0 {
                        // Wait (bounded) until the reader's fault holds its reference, then split under it.
                        let until = DispatchTime.now() + .seconds(5)
                        while !entered.load(ordering: .acquiring) && DispatchTime.now() < until { sched_yield() }
                    }
                    try? s.unmap(w + 256 * page, length: 128 * Int(page))
                }
                reader.join()
                unmapper.join()
                m.hooks.set(.deviceFaultBeforeMigrateToRAM, nil)
                for p in [0, 10, 255, 384, 511] {
                    #expect(try s.read(count: 1, at: w + UInt64(p) * page) == [UInt8((p + round) & 0xFF)])
                }
                try s.unmap(base, length: 2 * PageSize.pmd)
            }
            fd.close()
        }
    }

    @Test("fork shares a device THP read-only; each side faults it back and copies on write")
    func forkDeviceTHP() throws {
        try withDevices { m, devices, s in
            let fd = try devices.device(1).open(s)
            let (_, w) = try thp(s) { UInt8($0 & 0x7F) }
            _ = try fd.migrateToDevice(w, pages: 512, into: nil)
            let child = try s.fork()
            #expect(pmdEntry(s, w).kind == .devicePrivateRead && pmdEntry(child, w).kind == .devicePrivateRead)
            try child.write([0xEE], at: w + 5 * page)
            #expect(try s.read(count: 1, at: w + 5 * page) == [5])
            #expect(try child.read(count: 1, at: w + 5 * page) == [0xEE])
            child.exit()
            try s.write([0xDD], at: w)
            #expect(try s.read(count: 1, at: w) == [0xDD])
            fd.close()
        }
    }

    @Test("release evicts device THPs (split through the reverse map) and the chunks unregister")
    func releaseEvictsTHP() throws {
        try withDevices { m, devices, s in
            let dev = try devices.device(0)
            let fd = try dev.open(s)
            let (_, w) = try thp(s) { UInt8($0 & 0xFF) }
            _ = try fd.migrateToDevice(w, pages: 512, into: nil)
            let child = try s.fork()
            try dev.release()
            #expect(dev.chunkCount == 0 && dev.pagesInUse == 0)
            #expect(try s.read(count: 1, at: w + 77 * page) == [77])
            #expect(try child.read(count: 1, at: w + 78 * page) == [78])
            child.exit()
            fd.close()
        }
    }

    @Test("stress: huge and small migrations, faults, splits, fork, mprotect and mremap race; checksums hold")
    func stress() throws {
        try withDevices { m, devices, s in
            let fds = try [devices.device(0).open(s), devices.device(1).open(s)]
            let (_, w) = try thp(s) { UInt8($0 % 251) }
            // A parking place for the window while it is remapped away (unaligned, so the PMD splits).
            let park = try s.map(length: 2 * PageSize.pmd, protection: [.read], flags: [.private, .anonymous]) + 3 * page
            let failures = Locked<[String]>([])
            let deadline = DispatchTime.now() + .milliseconds(1200)
            @Sendable func check(_ bytes: [UInt8], _ p: Int, _ what: String) {
                guard let first = bytes.first else { return }
                if bytes.contains(where: { $0 != first }) || (first != 0 && Int(first) % 251 != p % 251 && first < 251) {
                    failures.withLock { $0.append("\(what): page \(p) torn or wrong (\(first))") }
                }
            }
            runThreads(4) { t in
                var rng = ConcurrencyTests.XorShift(state: 0xC0FFEE &+ UInt64(t) &* 0x9E3779B97F4A7C15)
                var mirror = [UInt8](repeating: 0, count: 8 * Int(page))
                while DispatchTime.now() < deadline {
                    switch t {
                    case 0:
                        let fd = fds[rng.below(2)]
                        if rng.below(2) == 0 {
                            _ = try? fd.migrateToDevice(w, pages: 512, into: nil)
                        } else {
                            let p = rng.below(504)
                            _ = try? fd.migrateToDevice(w + UInt64(p) * page, pages: 8, into: &mirror)
                        }
                        if rng.below(3) == 0 { _ = try? fd.migrateToSystem(w, pages: 512) }
                    case 1:
                        let p = rng.below(512)
                        if let bytes = try? s.read(count: Int(page), at: w + UInt64(p) * page) { check(bytes, p, "read") }
                    case 2:
                        if let child = try? s.fork() {
                            let p = rng.below(512)
                            if let bytes = try? child.read(count: Int(page), at: w + UInt64(p) * page) { check(bytes, p, "child") }
                            child.exit()
                        }
                    default:
                        let p = rng.below(500)
                        let a = w + UInt64(p) * page
                        if rng.below(16) == 0 {
                            // Move the whole window away and back: its pages (on the device or not) travel.
                            if (try? s.remap(w, length: PageSize.pmd, newLength: PageSize.pmd, flags: [.mayMove, .fixed], to: park)) != nil {
                                do {
                                    _ = try s.remap(park, length: PageSize.pmd, newLength: PageSize.pmd, flags: [.mayMove, .fixed], to: w)
                                } catch {
                                    failures.withLock { $0.append("remap back: \(error)") }
                                }
                            }
                        } else if rng.below(2) == 0 {
                            try? s.protect(a, length: 4 * Int(page), [.read])
                            try? s.protect(a, length: 4 * Int(page), [.read, .write])
                        } else {
                            try? s.advise(a, length: Int(page), .dontNeed)  // splits; the page reads zero after
                        }
                    }
                }
            }
            #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0.prefix(5) })")
            for fd in fds { fd.close() }
        }
    }

    /// Issue 10 item 1 for a device-private PMD: a VMA split inside it splits it into device-private PTEs,
    /// so fork shares the pages per VMA and nothing leaks.
    @Test("a VMA split inside a device-private PMD splits it; fork and exit leak nothing")
    func vmaSplitSplitsDevicePMD() throws {
        try withDevices { m, devices, s in
            let free = m.freeFrames
            let dev = try devices.device(0)
            let fd = try dev.open(s)
            let (base, w) = try thp(s) { UInt8(($0 * 7) & 0xFF) }
            #expect(try fd.migrateToDevice(w, pages: 512, into: nil).cpages == 512)
            #expect(pmdEntry(s, w).isDevicePrivate)
            try s.advise(w + 3 * page, length: Int(page), .noHugePage)
            #expect(pmdEntry(s, w).isTable, "the device-private PMD was split at the VMA boundary")
            let child = try s.fork()
            try m.checkInvariants()
            #expect(try child.read(count: 1, at: w + 300 * page) == [UInt8((300 * 7) & 0xFF)])
            child.exit()
            #expect(try s.read(count: 1, at: w + 5 * page) == [UInt8((5 * 7) & 0xFF)])
            fd.close()
            try s.unmap(base, length: 2 * PageSize.pmd)
            #expect(dev.pagesInUse == 0)
            s.exit()
            #expect(m.freeFrames == free, "every frame came back")
        }
    }
}
