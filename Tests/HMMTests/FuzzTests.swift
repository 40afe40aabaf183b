import Dispatch
import Synchronization
import Testing
@testable import HMM
import HMMDevices

#if canImport(Glibc)
import Glibc
#endif

/// A seeded fuzz of the public API (issue 14): random valid and invalid calls across spaces, files,
/// GUP, mirrors, the migration phases and the inspection API. Every call may throw — it must throw an
/// `HMMError`, never trap or hang — the invariant checker runs every `checkEvery` calls, a canary region
/// only ever touched by data-preserving operations must keep its bytes, and after every space exits and
/// every device releases its memory, every frame must be free again.
///
/// `HMM_FUZZ_ITERATIONS` (default 1500) and `HMM_FUZZ_SEED` (default: three fixed seeds) make longer or
/// targeted runs: `HMM_FUZZ_ITERATIONS=200000 swift test --filter Fuzz`; `HMM_FUZZ_CHECK_EVERY=1` (from call
/// `HMM_FUZZ_CHECK_FROM`) runs the checker after every call, to find the call that broke an invariant.
@Suite("Fuzz", .serialized)
struct FuzzTests {
    static func environment(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }
    static var iterations: Int { environment("HMM_FUZZ_ITERATIONS").flatMap { Int($0) } ?? 1500 }
    static var seeds: [UInt64] {
        if let s = environment("HMM_FUZZ_SEED").flatMap({ UInt64($0) }) { return [s] }
        return [0x5EED_0001, 0x5EED_0002, 0x5EED_0003]
    }

    @Test("seeded fuzz of the public API: no trap, no hang, invariants hold, the canary keeps its bytes, nothing leaks",
          arguments: FuzzTests.seeds)
    func fuzz(seed: UInt64) throws {
        let iterations = Self.iterations
        let report = Locked<[String]>([])
        let trail = Locked<[String]>([])
        let done = Atomic<Bool>(false)
        let t = TestThread {
            do {
                var f = try Fuzzer(seed: seed, trail: trail)
                report.withLock { $0 = f.run(iterations) }
            } catch {
                report.withLock { $0 = ["setup failed: \(error)"] }
            }
            done.store(true, ordering: .releasing)
        }
        // Bounded: a hang fails the test with its seed instead of hanging the suite.
        let until = DispatchTime.now() + .seconds(60 + iterations / 100)
        while !done.load(ordering: .acquiring) && DispatchTime.now() < until { usleep(2000) }
        let finished = done.load(ordering: .acquiring)
        #expect(finished, "seed \(seed): the fuzz run hung (rerun with HMM_FUZZ_SEED=\(seed)); last calls: \(trail.withLock { $0 }.joined(separator: "; "))")
        guard finished else { return }
        t.join()
        let problems = report.withLock { $0 }
        #expect(problems.isEmpty, "seed \(seed) (HMM_FUZZ_SEED=\(seed)): \(problems.prefix(8).joined(separator: "\n"))")
    }
}

/// One fuzz run: a machine, its devices, up to four spaces and the state the random calls work on.
struct Fuzzer {
    var rng: ConcurrencyTests.XorShift
    let seed: UInt64
    let machine: Machine
    let devices: MirrorDeviceSet
    var spaces: [AddressSpace] = []
    /// Known mappings per space (start, length), refreshed from `mappings` now and then.
    var regions: [[(UInt64, Int)]] = []
    var mirrors: [MirrorFile] = []
    var pins: [PinnedPages] = []
    var files: [MemoryFile] = []
    var notifiers: [IntervalNotifier] = []
    /// The canary: 16 pages of space 0 that only data-preserving operations touch.
    var canary: UInt64 = 0
    let canaryPages = 16
    var log: [String] = []
    /// The number of the call being made.
    var call = 0
    var problems: [String] = []
    let checkEvery = FuzzTests.environment("HMM_FUZZ_CHECK_EVERY").flatMap { Int($0) } ?? 100
    let checkFrom = FuzzTests.environment("HMM_FUZZ_CHECK_FROM").flatMap { Int($0) } ?? 0
    let baselineFree: Int

    /// The last calls, readable from another thread when the run hangs.
    let trail: Locked<[String]>

    init(seed: UInt64, trail: Locked<[String]>) throws {
        self.seed = seed
        self.trail = trail
        rng = ConcurrencyTests.XorShift(state: (seed &* 0x9E37_79B9_7F4A_7C15) | 1)
        machine = try Machine(.init(systemMemory: 64 << 20, hugetlbPages: 2))
        devices = try MirrorDeviceSet(machine: machine, chunkSize: 4 << 20)
        baselineFree = machine.freeFrames
        let s = try machine.makeAddressSpace()
        spaces = [s]
        regions = [[]]
        canary = try s.map(length: canaryPages * PageSize.base, protection: [.read, .write], flags: [.private, .anonymous])
        for p in 0..<canaryPages { try s.write([UInt8](repeating: canaryByte(p), count: PageSize.base), at: canary + UInt64(p) * page) }
    }

    func canaryByte(_ p: Int) -> UInt8 { UInt8(0xC0 | p) }

    mutating func below(_ n: Int) -> Int { n <= 0 ? 0 : rng.below(n) }
    mutating func chance(_ percent: Int) -> Bool { below(100) < percent }

    // MARK: random arguments

    /// An address: mostly inside a known non-canary mapping, sometimes at its edge, unaligned, or wild.
    mutating func address(in si: Int) -> UInt64 {
        let r = below(100)
        let known = regions[si]
        if r < 70, !known.isEmpty {
            let (start, length) = known[below(known.count)]
            var a = start + UInt64(below(max(1, length / PageSize.base))) * page
            if chance(5) { a += UInt64(below(PageSize.base)) }
            return a
        }
        if r < 80, !known.isEmpty {
            let (start, length) = known[below(known.count)]
            return chance(50) ? start &- page : start + UInt64(length)
        }
        switch below(6) {
        case 0: return 0
        case 1: return UInt64.max &- UInt64(below(3)) * page
        case 2: return 0x7FFF_FFFF_F000
        case 3: return rng.next()
        case 4: return 0x7F00_0000_0000 + UInt64(below(1 << 20)) * page
        default: return UInt64(below(1 << 24)) * page
        }
    }

    /// A length in bytes: mostly a few pages, sometimes 0, negative, unaligned or absurd.
    mutating func length() -> Int {
        switch below(20) {
        case 0: return 0
        case 1: return -PageSize.base
        case 2: return Int.max
        case 3: return PageSize.base + below(PageSize.base)
        case 4: return PageSize.pmd * (1 + below(2))
        case 5: return 1 << 40
        default: return (1 + below(32)) * PageSize.base
        }
    }

    mutating func pages() -> Int {
        switch below(16) {
        case 0: return 0
        case 1: return -1
        case 2: return 1 << 36
        case 3: return 512
        default: return 1 + below(24)
        }
    }

    mutating func protection() -> Protection {
        chance(5) ? Protection(rawValue: UInt8(below(256))) : Protection(rawValue: UInt8(below(8)))
    }

    /// Whether `[a, a + n)` overlaps the canary (destructive calls skip it).
    func hitsCanary(_ si: Int, _ a: UInt64, _ n: Int) -> Bool {
        guard si == 0, n > 0 else { return si == 0 && a >= canary && a < canary + UInt64(canaryPages) * page }
        let end = a.addingReportingOverflow(UInt64(n))
        let hi = end.overflow ? UInt64.max : end.partialValue
        return a < canary + UInt64(canaryPages) * page && hi > canary
    }

    // MARK: the run

    mutating func run(_ iterations: Int) -> [String] {
        for i in 0..<iterations {
            call = i
            step(i)
            // The canary read and the region refresh change what later calls do, so they keep a fixed
            // cadence; the checker's cadence can change without changing the run.
            if i % checkEvery == checkEvery - 1 && i >= checkFrom { checkInvariants(i) }
            if i % 100 == 99 { checkpoint(i) }
            if problems.count > 8 { break }
        }
        teardown()
        return problems
    }

    mutating func note(_ s: String) {
        log.append(s)
        if log.count > 24 { log.removeFirst() }
        trail.withLock { t in
            t.append("\(call): \(s)")
            if t.count > 8 { t.removeFirst() }
        }
    }

    mutating func checkInvariants(_ i: Int) {
        do { try machine.checkInvariants() } catch {
            problems.append("after call \(i): \(error)\n  last calls: \(log.suffix(8).joined(separator: "; "))")
        }
    }

    mutating func checkpoint(_ i: Int) {
        let s = spaces[0]
        for p in 0..<canaryPages {
            do throws(HMMError) {
                let got = try s.read(count: 1, at: canary + UInt64(p) * page)
                if got != [canaryByte(p)] {
                    problems.append("after call \(i): canary page \(p) reads \(got[0])\n  last calls: \(log.suffix(8).joined(separator: "; "))")
                    return
                }
            } catch where error.code == .outOfMemory && machine.freeFrames < 1024 {
                // RAM is exhausted, so a page on a device cannot come back yet; it must stay there intact.
                continue
            } catch {
                problems.append("after call \(i): canary page \(p) reads \(error)\n  last calls: \(log.suffix(8).joined(separator: "; "))")
                return
            }
        }
        refreshRegions()
    }

    mutating func refreshRegions() {
        for (i, s) in spaces.enumerated() {
            regions[i] = s.mappings.compactMap { m in
                m.start == canary && i == 0 ? nil : (m.start, Int(m.end - m.start))
            }
        }
    }

    mutating func step(_ i: Int) {
        let si = below(spaces.count)
        let s = spaces[si]
        let op = below(24)
        switch op {
        case 0, 1:
            var flags: MapFlags = chance(80) ? [.private, .anonymous] : MapFlags(rawValue: UInt32(below(64)))
            if chance(10) { flags.insert(.populate) }
            if chance(5) { flags = [.private, .anonymous, .hugetlb] }
            let n = chance(90) ? (1 + below(64)) * PageSize.base : length()
            let at = chance(10) ? address(in: si) : 0
            if at != 0 && hitsCanary(si, at, n) { return }
            if at != 0 { flags.insert(.fixed) }
            note("map(\(hex(at)), \(n), \(flags.rawValue))")
            if let a = try? s.map(at: at, length: n, protection: chance(80) ? [.read, .write] : protection(), flags: flags) {
                // A populate larger than RAM succeeds and fills it (as the kernel's does); give it back at
                // once so the rest of the run is not spent out of memory.
                regions[si].append((a, n))
            }
        case 2:
            let a = address(in: si), n = length()
            if hitsCanary(si, a, n) { return }
            note("unmap(\(hex(a)), \(n))")
            try? s.unmap(a, length: n)
        case 3:
            let a = address(in: si), n = length(), p = protection()
            if hitsCanary(si, a, n) { return }
            note("protect(\(hex(a)), \(n), \(p.rawValue))")
            try? s.protect(a, length: n, p)
        case 4:
            let advices: [Advice] = [
                .dontNeed, .free, .hugePage, .noHugePage, .collapse, .dontFork, .doFork, .wipeOnFork, .keepOnFork,
                .populateRead, .populateWrite,
            ]
            let a = address(in: si), n = length(), adv = advices[below(advices.count)]
            if hitsCanary(si, a, n) && [.dontNeed, .free, .dontFork, .wipeOnFork].contains(adv) { return }
            note("advise(\(hex(a)), \(n), \(adv))")
            try? s.advise(a, length: n, adv)
        case 5:
            let a = address(in: si), n = length(), nn = chance(50) ? n : length()
            let flags = RemapFlags(rawValue: UInt8(below(8)))
            let target: UInt64? = flags.contains(.fixed) ? address(in: si) : nil
            if hitsCanary(si, a, n) || target.map({ hitsCanary(si, $0, nn) }) == true { return }
            note("remap(\(hex(a)), \(n), \(nn), \(flags.rawValue))")
            if let q = try? s.remap(a, length: n, newLength: nn, flags: flags, to: target) { regions[si].append((q, nn)) }
        case 6:
            if spaces.count < 4, chance(60) {
                note("fork(\(si))")
                if let c = try? s.fork() {
                    spaces.append(c)
                    regions.append(regions[si])
                }
            } else if si != 0 {
                note("exit(\(si))")
                s.exit()
                mirrors.removeAll { $0.space === s }
                spaces.remove(at: si)
                regions.remove(at: si)
            }
        case 7, 8:
            let a = address(in: si)
            let n = chance(90) ? 1 + below(3 * PageSize.base) : length()
            if chance(50) {
                note("read(\(hex(a)), \(n))")
                _ = try? s.read(count: max(0, min(n, 1 << 20)), at: a)
            } else {
                if hitsCanary(si, a, n) { return }
                note("write(\(hex(a)), \(n))")
                try? s.write([UInt8](repeating: UInt8(truncatingIfNeeded: i), count: max(0, min(n, 1 << 20))), at: a)
            }
        case 9:
            let a = address(in: si)
            if chance(50) {
                note("load(\(hex(a)))")
                _ = try? s.load(UInt32.self, at: a)
            } else if !hitsCanary(si, a, 4) {
                note("store(\(hex(a)))")
                try? s.store(UInt32(truncatingIfNeeded: i), at: a)
            }
        case 10:
            let a = address(in: si)
            let flags = GUPFlags(rawValue: chance(80)
                ? [GUPFlags.write, .pin, .longTerm, .fast].reduce(0) { chance(50) ? $0 | $1.rawValue : $0 }
                : UInt32(truncatingIfNeeded: rng.next()))
            let n = chance(90) ? 1 + below(8) : pages()
            note("gup(\(hex(a)), \(n), \(flags.rawValue))")
            if let p = try? s.getUserPages(a, count: n, flags: flags) {
                if chance(70) || pins.count > 4 { p.release() } else { pins.append(p) }
            }
            if !pins.isEmpty && chance(30) { pins.removeFirst().release() }
        case 11, 12, 13, 14:
            mirrorCall(si, s)
        case 15, 16:
            migrateByHand(si, s)
        case 17:
            evictByHand()
        case 18:
            let a = address(in: si)
            note("inspect(\(hex(a)))")
            if let e = try? s.pageTableEntry(at: a), let pfn = e.pfn { _ = try? machine.pageInfo(pfn) }
            _ = try? s.pagemap(at: a)
            _ = try? s.residentPages(a, length: length())
            _ = try? machine.pageInfo(PFN(rng.next() % (1 << 25)))
        case 19:
            fileCall(si, s)
        case 20:
            notifierCall(si, s)
        case 21:
            // The canary moves to a device and back, is read by a mirror, made exclusive, forked.
            guard si == 0 else { return }
            let dev = devices.devices[below(devices.devices.count)]
            note("canary via \(dev)")
            guard let fd = try? dev.open(s) else { return }
            let p = below(canaryPages)
            let a = canary + UInt64(p) * page
            let n = 1 + below(canaryPages - p)
            switch below(4) {
            case 0: _ = try? fd.migrateToDevice(a, pages: n, into: nil)
            case 1: _ = try? fd.migrateToSystem(a, pages: n)
            case 2:
                var b = [UInt8](repeating: 0, count: n * PageSize.base)
                _ = try? fd.makeExclusive(a, pages: n, into: &b)
            default:
                var b = [UInt8](repeating: 0, count: n * PageSize.base)
                if let r = try? fd.read(a, pages: n, into: &b), r.cpages == n, b.first != canaryByte(p) {
                    problems.append("call \(i): mirror read of canary page \(p) gave \(b[0])")
                }
            }
            fd.close()
        case 22:
            let dev = devices.devices[below(devices.devices.count)]
            note("release(\(dev))")
            try? dev.release()
        default:
            // Garbage into the physical-frame API.
            let pfn = PFN(chance(50) ? rng.next() : UInt64(machine.totalFrames) + UInt64(below(1 << 12)))
            note("frames(\(pfn))")
            _ = try? machine.copyPage(from: pfn, to: PFN(rng.next()))
            _ = try? machine.framePointer(pfn)
            _ = try? machine.zeroPage(PFN(rng.next()))
            _ = try? machine.releaseMigrationPage(pfn)
        }
    }

    mutating func mirrorCall(_ si: Int, _ s: AddressSpace) {
        if mirrors.isEmpty || chance(10) {
            let dev = devices.devices[below(devices.devices.count)]
            note("open(\(dev), \(si))")
            if let fd = try? dev.open(s) { mirrors.append(fd) }
            return
        }
        let fd = mirrors[below(mirrors.count)]
        guard let fi = spaces.firstIndex(where: { $0 === fd.space }) else { return }
        let a = address(in: fi)
        let n = pages()
        let bytes = max(0, min(n, 64)) * PageSize.base
        var buffer = [UInt8](repeating: 0, count: chance(95) ? bytes : bytes / 2)
        switch below(10) {
        case 0:
            note("mirror.read(\(hex(a)), \(n))")
            _ = try? fd.read(a, pages: n, into: &buffer)
        case 1:
            if hitsCanary(fi, a, bytes) { return }
            note("mirror.write(\(hex(a)), \(n))")
            _ = try? fd.write(a, pages: n, from: buffer)
        case 2, 3:
            note("mirror.migrateToDevice(\(hex(a)), \(n))")
            if chance(50) {
                _ = try? fd.migrateToDevice(a, pages: n, into: nil)
            } else {
                _ = try? fd.migrateToDevice(a, pages: n, into: &buffer)
            }
        case 4:
            note("mirror.migrateToSystem(\(hex(a)), \(n))")
            _ = try? fd.migrateToSystem(a, pages: n)
        case 5:
            note("mirror.snapshot(\(hex(a)), \(n))")
            _ = try? fd.snapshot(a, pages: n, into: &buffer)
        case 6:
            note("mirror.makeExclusive(\(hex(a)), \(n))")
            _ = try? fd.makeExclusive(a, pages: n, into: &buffer)
        case 7:
            note("mirror.checkExclusive(\(hex(a)), \(n))")
            try? fd.checkExclusive(a, pages: n)
        case 8:
            note("mirror.setFlags")
            try? fd.setFlags(chance(50) ? .failAllocation : [])
        default:
            note("mirror.close")
            fd.close()
            mirrors.removeAll { $0 === fd }
        }
    }

    /// The three phases by hand, with random ranges, selections, owners and destinations — always
    /// finalized, as the protocol requires.
    mutating func migrateByHand(_ si: Int, _ s: AddressSpace) {
        let a = address(in: si)
        let n = chance(90) ? (1 + below(32)) * PageSize.base : length()
        if hitsCanary(si, a, n) { return }
        let select = MigrateSelect(rawValue: UInt32(below(16)))
        let owner: (any AnyObject & Sendable)? = chance(70) ? devices.devices[below(devices.devices.count)] : nil
        let end = a.addingReportingOverflow(UInt64(bitPattern: Int64(n))).partialValue
        note("migrate_vma(\(hex(a)), \(hex(end)), \(select.rawValue))")
        let lockless = chance(5)
        let body = { (f: inout Fuzzer) throws(HMMError) in
            let m = try MigrateVMA(space: s, start: a, end: end, select: select, owner: owner)
            do throws(HMMError) { try m.setup() } catch { return }
            for i in 0..<m.npages where m.src[i].isMigrating && f.chance(60) {
                switch f.below(5) {
                case 0: m.dst[i] = MigratePFN(f.machine.zeroPFN)
                case 1: m.dst[i] = MigratePFN(PFN(f.rng.next() % (1 << 25)))
                default:
                    guard !m.src[i].isCompound, let d = f.machine.allocateMigrationPage(zeroed: false) else { continue }
                    if let src = m.src[i].pfn { try? f.machine.copyPage(from: src, to: d) } else { try? f.machine.zeroPage(d) }
                    m.dst[i] = MigratePFN(d)
                }
            }
            if f.chance(90) { try? m.pages() }
            m.finalize()
            m.finalize()
        }
        if lockless {
            try? body(&self)
        } else {
            var me = self
            _ = try? s.withMmapReadLock { () throws(HMMError) in try body(&me) }
            self = me
        }
    }

    /// `migrate_device_range` over random frames of a random device chunk.
    mutating func evictByHand() {
        let first = PFN(UInt64(machine.totalFrames) + UInt64(below(1 << 13)))
        let count = chance(90) ? 1 + below(64) : pages()
        note("migrate_device(\(first), \(count))")
        guard let md = try? MigrateDevice(machine: machine, range: first, count: count) else { return }
        for i in md.src.indices where md.src[i].isMigrating && chance(80) {
            guard let s = md.src[i].pfn, let d = machine.allocateMigrationPage(zeroed: false) else { continue }
            try? machine.copyPage(from: s, to: d)
            md.dst[i] = MigratePFN(d)
        }
        if chance(10) {
            // A bad destination makes pages() refuse the lot; the page it replaces goes back first.
            let i = below(md.dst.count)
            if let d = md.dst[i].pfn { try? machine.releaseMigrationPage(d) }
            md.dst[i] = MigratePFN(machine.zeroPFN)
        }
        try? md.pages()
        md.finalize()
    }

    mutating func fileCall(_ si: Int, _ s: AddressSpace) {
        if files.isEmpty || chance(20) {
            let size = chance(80) ? below(64) * PageSize.base + below(PageSize.base) : length()
            note("makeFile(\(size))")
            if let f = try? machine.makeFile(size: size) { files.append(f) }
            if files.count > 4 { files.removeFirst() }
            return
        }
        let f = files[below(files.count)]
        let off = chance(80) ? below(80 * PageSize.base) : (chance(50) ? Int.max - below(100) : (1 << 40) - 1)
        switch below(3) {
        case 0:
            note("file.write(\(off))")
            _ = try? f.write([UInt8](repeating: 0xF1, count: 1 + below(2 * PageSize.base)), at: off)
        case 1:
            note("file.read(\(off))")
            var b = [UInt8](repeating: 0, count: 1 + below(2 * PageSize.base))
            _ = try? b.withUnsafeMutableBytes { buf in try f.read(into: buf, at: off) }
        default:
            let shared = chance(50)
            note("map file shared:\(shared)")
            if let a = try? s.map(length: (1 + below(16)) * PageSize.base, protection: [.read, .write],
                                  flags: shared ? MapFlags.shared : MapFlags.private, file: f, offset: below(4) * PageSize.base) {
                regions[si].append((a, PageSize.base))
            }
        }
    }

    mutating func notifierCall(_ si: Int, _ s: AddressSpace) {
        if notifiers.isEmpty || chance(30) {
            let a = address(in: si)
            note("notifier(\(hex(a)))")
            if let n = try? s.insertIntervalNotifier(start: a, length: UInt64(truncatingIfNeeded: length()), FuzzNotifier()) {
                notifiers.append(n)
            }
            if notifiers.count > 4 { notifiers.removeFirst().remove() }
            return
        }
        let n = notifiers[below(notifiers.count)]
        let a = address(in: si) & ~UInt64(PageSize.base - 1)
        let end = a &+ UInt64(max(1, min(64, pages()))) * page
        note("rangeFault(\(hex(a)), \(hex(end)))")
        guard var range = try? HMMRange(notifier: n, start: a, end: end, defaultFlags: chance(50) ? HMMPFN.requestFault : 0,
                                         devicePrivateOwner: chance(50) ? devices.devices[0] : nil)
        else { return }
        if chance(5) { range.pfns = [] }
        range.notifierSeq = n.readBegin()
        _ = try? s.withMmapReadLock { () throws(HMMError) in try s.rangeFault(&range) }
    }

    mutating func teardown() {
        for p in pins { p.release() }
        pins.removeAll()
        for n in notifiers { n.remove() }
        notifiers.removeAll()
        for fd in mirrors { fd.close() }
        mirrors.removeAll()
        checkInvariants(-1)
        checkpoint(-1)
        for s in spaces { s.exit() }
        spaces.removeAll()
        files.removeAll()
        for dev in devices.devices {
            do { try dev.release() } catch { problems.append("release of \(dev) after exit: \(error)") }
            if dev.pagesInUse != 0 { problems.append("\(dev) has \(dev.pagesInUse) pages in use after every space exited") }
        }
        do { try machine.checkInvariants() } catch { problems.append("after teardown: \(error)") }
        if machine.freeFrames != baselineFree {
            problems.append("\(baselineFree - machine.freeFrames) frames leaked after every space exited")
        }
    }
}

final class FuzzNotifier: IntervalNotifierOperations, @unchecked Sendable {
    let lock = Locked(())
    func invalidate(_ notifier: IntervalNotifier, range: NotifierRange, sequence: UInt64) -> Bool {
        lock.withLock { _ in notifier.setSequence(sequence) }
        return true
    }
}
