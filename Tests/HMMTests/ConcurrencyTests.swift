import Dispatch
import Synchronization
import Testing
@testable import HMM

/// Real threads fault, store, fork, protect, remap and unmap overlapping ranges of one space.
@Suite("Concurrency")
struct ConcurrencyTests {
    /// A small deterministic generator (the seed is printed on failure).
    struct XorShift {
        var state: UInt64
        mutating func next() -> UInt64 {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            return state
        }
        mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    }

    @Test("faults, stores, fork, protect and unmap race on one space; data and invariants hold")
    func stress() throws {
        try withMachine(.init(systemMemory: 128 << 20)) { m in
            let s = try m.makeAddressSpace()
            let pages = 64
            // Stable region: each thread owns one 8-byte slot per page and checks it stays its own.
            let stable = try s.map(length: pages * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.advise(stable, length: pages * Int(page), .hugePage)
            // Chaos region: remapped, protected, unmapped and refilled under the other threads' feet.
            let chaos = try s.map(length: pages * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            let iterations = 3000
            let failures = Locked<[String]>([])
            let seed = UInt64(0x9E37_79B9_7F4A_7C15)
            DispatchQueue.concurrentPerform(iterations: 3) { t in
                var rng = XorShift(state: seed &+ UInt64(t) &* 0x1000_0001)
                var mine = [UInt64](repeating: 0, count: pages)
                for step in 0..<iterations {
                    do {
                        let pg = rng.below(pages)
                        let slot = stable + UInt64(pg) * page + UInt64(t * 8)
                        let value = UInt64(t) << 56 | UInt64(step)
                        try s.store(value, at: slot)
                        mine[pg] = value
                        let check = rng.below(pages)
                        let got: UInt64 = try s.load(at: stable + UInt64(check) * page + UInt64(t * 8))
                        if got != mine[check] {
                            failures.withLock { $0.append("thread \(t) page \(check): \(got) != \(mine[check])") }
                        }
                        let c = chaos + UInt64(rng.below(pages)) * page
                        switch (t, rng.below(8)) {
                        case (0, _), (_, 0...3):
                            try? s.store(UInt32(step), at: c + UInt64(t * 4))
                            _ = try? s.load(UInt32.self, at: c)
                        case (1, 4):
                            try s.protect(chaos, length: pages / 2 * Int(page), step % 2 == 0 ? [.read] : [.read, .write])
                        case (1, 5):
                            try s.unmap(c, length: Int(page))
                            try s.map(at: c, length: Int(page), protection: [.read, .write], flags: [.private, .anonymous, .fixed])
                        case (1, _):
                            // Thread 2's mremap below leaves a hole for a moment: ENOMEM there is right.
                            do { try s.advise(c, length: Int(page), .dontNeed) } catch let e as HMMError where e.code == .outOfMemory {}
                        case (2, 4) where step % 50 == 0:
                            let child = try s.fork()
                            for i in 0..<pages {
                                let v: UInt64 = try child.load(at: stable + UInt64(i) * page + 16)
                                if v != mine[i] { failures.withLock { $0.append("child of 2 sees \(v) != \(mine[i])") } }
                            }
                            try child.store(UInt64.max, at: stable + 16)
                            child.exit()
                        case (2, _):
                            _ = try s.getUserPages(stable + UInt64(pg) * page, count: 1, flags: [.write])
                            if step % 64 == 0 {
                                // Thread 1 fragments this range into separate VMAs; then mremap fails with
                                // EFAULT, as Linux does for a range spanning mappings.
                                do {
                                    _ = try s.remap(chaos + 60 * page, length: 4 * Int(page), newLength: 4 * Int(page),
                                                    flags: [.mayMove, .fixed], to: chaos + 56 * page)
                                } catch let e as HMMError where e.code == .fault {}
                                try s.map(at: chaos + 60 * page, length: 4 * Int(page), protection: [.read, .write],
                                          flags: [.private, .anonymous, .fixed])
                            }
                        default:
                            break
                        }
                    } catch {
                        failures.withLock { $0.append("thread \(t) step \(step): \(error)") }
                    }
                }
            }
            let found = failures.withLock { $0 }
            #expect(found.isEmpty, "seed \(seed): \(found.prefix(5))")
            try m.checkInvariants()
            s.exit()
        }
    }
}
