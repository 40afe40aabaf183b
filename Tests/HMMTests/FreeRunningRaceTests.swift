import Dispatch
import Synchronization
import Testing
@testable import HMM
import HMMDevices

/// The kernel's historical device-memory races and issue 14 run free on real threads — beside the hook-forced tests,
/// which pin one interleaving each, these let the scheduler find others. Every page of the shared
/// range holds one constant byte that nobody ever changes; pages only move (to a device, back, into a
/// fork child), and frames are freed and reused by another process all the time. Whoever reads a page —
/// the CPU, a mirror of the parent, a mirror of a fork child — must always see that byte.
@Suite("Free-running races", .serialized)
struct FreeRunningRaceTests {
    static let pages = 64
    static func value(_ p: Int) -> UInt8 { UInt8(0x20 + p) }

    @Test("device reads (parent and fork child) race CPU fault-backs, migrations both ways and frame reuse by another process: nobody reads another page's bytes")
    func readersRaceMovers() throws {
        try withMachine(.init(systemMemory: 64 << 20)) { m in
            let devices = try MirrorDeviceSet(machine: m, chunkSize: 4 << 20, coherent: false)
            let s = try m.makeAddressSpace()
            let n = Self.pages
            let a = try s.map(length: n * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            for p in 0..<n { try s.write([UInt8](repeating: Self.value(p), count: Int(page)), at: a + UInt64(p) * page) }
            let child = try s.fork()
            let parentMirror = try devices.device(0).open(s)
            let mover = try devices.device(0).open(s)
            let childMirror = try devices.device(1).open(child)
            let childMover = try devices.device(1).open(child)
            let other = try m.makeAddressSpace()
            let otherFD = try devices.device(0).open(other)
            let b = try other.map(length: 32 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try other.write([UInt8](repeating: 0xEE, count: 32 * Int(page)), at: b)

            let failures = Locked<[String]>([])
            let reads = Atomic<Int>(0)
            @Sendable func check(_ bytes: UnsafeRawBufferPointer, _ first: Int, _ count: Int, _ who: String) {
                for i in 0..<count {
                    let want = Self.value(first + i)
                    let pageBytes = UnsafeRawBufferPointer(rebasing: bytes[(i * Int(page))..<((i + 1) * Int(page))])
                    if let bad = pageBytes.first(where: { $0 != want }) {
                        failures.withLock { $0.append("\(who): page \(first + i) read \(bad), not \(want)") }
                        return
                    }
                }
            }
            let deadline = DispatchTime.now() + .milliseconds(600)
            runThreads(5) { t in
                var rng = ConcurrencyTests.XorShift(state: 0xFACE &+ UInt64(t) &* 0x9E37_79B9_7F4A_7C15)
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8 * Int(page), alignment: 64)
                defer { buffer.deallocate() }
                while DispatchTime.now() < deadline {
                    let p = rng.below(n - 8)
                    let k = 1 + rng.below(8)
                    let at = a + UInt64(p) * page
                    switch t {
                    case 0:  // the parent's device reads
                        if (try? parentMirror.read(at, pages: k, into: buffer)) != nil {
                            check(UnsafeRawBufferPointer(buffer), p, k, "parent mirror")
                            reads.wrappingAdd(1, ordering: .relaxed)
                        }
                    case 1:  // the fork child's device reads
                        if (try? childMirror.read(at, pages: k, into: buffer)) != nil {
                            check(UnsafeRawBufferPointer(buffer), p, k, "child mirror")
                            reads.wrappingAdd(1, ordering: .relaxed)
                        }
                    case 2:  // the parent's CPU faults pages back; its pages move to the device and back
                        if rng.below(3) == 0 {
                            _ = try? mover.migrateToDevice(at, pages: k, into: nil)
                        } else if rng.below(2) == 0 {
                            _ = try? mover.migrateToSystem(at, pages: k)
                        } else if (try? s.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<(k * Int(page))]), at: at)) != nil {
                            check(UnsafeRawBufferPointer(buffer), p, k, "parent CPU")
                        }
                    case 3:  // the child's pages move too, and its CPU reads
                        if rng.below(2) == 0 {
                            _ = try? childMover.migrateToDevice(at, pages: k, into: nil)
                        } else if (try? child.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<(k * Int(page))]), at: at)) != nil {
                            check(UnsafeRawBufferPointer(buffer), p, k, "child CPU")
                        }
                    default:  // another process takes the freed device frames and gives them back
                        let q = rng.below(24)
                        _ = try? otherFD.migrateToDevice(b + UInt64(q) * page, pages: 8, into: nil)
                        if let bytes = try? other.read(count: Int(page), at: b + UInt64(q) * page), bytes.contains(where: { $0 != 0xEE }) {
                            failures.withLock { $0.append("other process: page \(q) lost its bytes") }
                        }
                        _ = try? otherFD.migrateToSystem(b, pages: 32)
                    }
                }
            }
            let problems = failures.withLock { $0 }
            #expect(problems.isEmpty, "\(problems.count) bad reads: \(problems.prefix(5))")
            #expect(reads.load(ordering: .relaxed) > 0)
            for fd in [parentMirror, mover, childMirror, childMover, otherFD] { fd.close() }
            child.exit()
            other.exit()
        }
    }

    /// After `MADV_DONTNEED` returns, the page reads zero — even with migrations collecting the same pages
    /// on other threads (the collect must not keep a stale copy alive past the zap; until v6.0 the kernel
    /// flushed the TLB after dropping the page-table lock, leaving a writable stale entry).
    @Test("MADV_DONTNEED races migrate_vma collection; after it returns the page reads zero")
    func dontNeedRacesCollect() throws {
        try withMachine(.init(systemMemory: 64 << 20)) { m in
            let devices = try MirrorDeviceSet(machine: m, chunkSize: 4 << 20, coherent: false)
            let s = try m.makeAddressSpace()
            let n = 32
            let a = try s.map(length: n * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            let fds = try [devices.device(0).open(s), devices.device(1).open(s)]
            let failures = Locked<[String]>([])
            let deadline = DispatchTime.now() + .milliseconds(500)
            runThreads(4) { t in
                var rng = ConcurrencyTests.XorShift(state: 0xD0D0 &+ UInt64(t) &* 0x9E37_79B9_7F4A_7C15)
                while DispatchTime.now() < deadline {
                    switch t {
                    case 0, 1:
                        // Each writer owns the pages of its parity: write, zap, read back zero.
                        let p = rng.below(n / 2) * 2 + t
                        let at = a + UInt64(p) * page
                        try? s.write([UInt8](repeating: 0x5A, count: Int(page)), at: at)
                        guard (try? s.advise(at, length: Int(page), .dontNeed)) != nil else { continue }
                        if let bytes = try? s.read(count: Int(page), at: at), bytes.contains(where: { $0 != 0 }) {
                            failures.withLock { $0.append("page \(p) read \(bytes.first { $0 != 0 }!) after MADV_DONTNEED") }
                        }
                    default:
                        let p = rng.below(n - 8)
                        let fd = fds[t - 2]
                        if rng.below(2) == 0 {
                            _ = try? fd.migrateToDevice(a + UInt64(p) * page, pages: 8, into: nil)
                        } else {
                            _ = try? fd.migrateToSystem(a + UInt64(p) * page, pages: 8)
                        }
                    }
                }
            }
            let problems = failures.withLock { $0 }
            #expect(problems.isEmpty, "\(problems.prefix(5))")
            for fd in fds { fd.close() }
        }
    }
}
