import Foundation
import Synchronization
import Testing
@testable import HMM
import HMMDevices

/// The event stream, the counters by phase and the Chrome trace, on the simulated engine (issue 12).
@Suite("events and counters", .timeLimit(.minutes(10)))
struct EventTests {
    /// Every event of `subscription` now in its ring.
    func drained(_ subscription: EventSubscription) -> [HMMEvent] {
        var out: [HMMEvent] = []
        subscription.drain { out.append($0.event) }
        return out
    }

    func withDevice(_ body: (Machine, MirrorFile, AddressSpace) throws -> Void) throws {
        try withMachine(.init(systemMemory: 64 << 20)) { m in
            let devices = try MirrorDeviceSet(machine: m, chunkSize: 8 << 20, coherent: false)
            let s = try m.makeAddressSpace()
            let fd = try devices.devices[0].open(s)
            try body(m, fd, s)
            fd.close()
            s.exit()
        }
    }

    @Test("events are plain values: a ring slot is copied without reference counting")
    func eventsArePlainValues() {
        #expect(_isPOD(HMMEvent.self))
        #expect(_isPOD(HMMEventRecord.self))
    }

    @Test("nobody listening: the hub does not observe, and nothing is counted")
    func idleHub() throws {
        try withMachine { m in
            #expect(!m.events.isObserving || EventHub.processWideSubscriptions > 0)
            let s = try m.makeAddressSpace()
            let a = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt8(1), at: a)
            #expect(m.events.counters[.faults, .base] == 0 || EventHub.processWideSubscriptions > 0)
            let sub = try m.events.subscribe()
            #expect(m.events.isObserving)
            sub.cancel()
            // (A process-wide subscription of another test, running meanwhile, also makes every hub observe.)
            #expect(!m.events.isObserving || EventHub.processWideSubscriptions > 0, "the last cancel turns observing off")
            s.exit()
        }
    }

    @Test("CPU faults: what each one hit (zero page, new page, copy-on-write, reuse), its thread and time")
    func cpuFaultHits() throws {
        try withMachine { m in
            let sub = try m.events.subscribe(kinds: HMMEventKinds(.cpuFault))
            let s = try m.makeAddressSpace()
            let a = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.advise(a, length: 4 * Int(page), .noHugePage)
            _ = try s.load(UInt8.self, at: a)  // zero page
            try s.store(UInt8(1), at: a)  // write over the zero page: a new page
            try s.store(UInt8(2), at: a + page)  // new page
            let child = try s.fork()
            try s.store(UInt8(3), at: a + page)  // shared with the child: copy-on-write
            try child.store(UInt8(4), at: a + page)  // the child is now the only user: reuse
            let faults = drained(sub).compactMap { e -> CPUFaultEvent? in if case .cpuFault(let f) = e { f } else { nil } }
            #expect(faults.map(\.hit) == [.zeroPage, .newPage, .newPage, .copyOnWrite, .reuse])
            #expect(faults.map(\.access) == [.read, .write, .write, .write, .write])
            #expect(faults.allSatisfy { $0.size == .base && $0.succeeded && $0.thread == currentThreadID() && $0.start > 0 })
            #expect(faults.map(\.space) == [s.id, s.id, s.id, s.id, child.id])
            #expect(faults[0].address == a && faults[3].address == a + page)
            #expect(m.events.counters[.faults, .base] == 5)
            #expect(m.events.counters[.faultNanoseconds, .base] == faults.reduce(0) { $0 + Int($1.duration) })
            let me = m.events.counters.threadLatencies.first { $0.thread == currentThreadID() }
            #expect(me?.faults == 5)
            #expect(me?.histogram.reduce(0, +) == 5)
            child.exit()
            s.exit()
        }
    }

    @Test("a failing access is an event too: a store to a read-only mapping fails with succeeded = false")
    func failedFault() throws {
        try withMachine { m in
            let sub = try m.events.subscribe()
            let s = try m.makeAddressSpace()
            let a = try s.map(length: Int(page), protection: [.read], flags: [.private, .anonymous])
            expectError(.segmentationFault) { try s.store(UInt8(1), at: a) }
            let faults = drained(sub).compactMap { e -> CPUFaultEvent? in if case .cpuFault(let f) = e { f } else { nil } }
            #expect(faults.count == 1)
            #expect(faults.first?.succeeded == false)
            s.exit()
        }
    }

    @Test("THP faults count in the 2 MiB size class")
    func hugeFaults() throws {
        try withMachine { m in
            m.events.countersEnabled = true
            let s = try m.makeAddressSpace()
            let raw = try s.map(length: 2 * PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous])
            let a = (raw + pmdSize - 1) & ~(pmdSize - 1)
            try s.advise(a, length: PageSize.pmd, .hugePage)
            try s.store(UInt8(1), at: a)
            #expect(m.events.counters[.faults, .huge] == 1)
            #expect(m.events.counters[.faults, .base] == 0)
            m.events.countersEnabled = false
            #expect(!m.events.isObserving || EventHub.processWideSubscriptions > 0)
            s.exit()
        }
    }

    @Test("migrations: to the device (explicit) and back on a CPU touch (cpu_fault), with pages, memories and phases")
    func migrationEvents() throws {
        try withDevice { m, fd, s in
            let sub = try m.events.subscribe(kinds: [HMMEventKinds(.migration), HMMEventKinds(.cpuFault)])
            let a = try s.map(length: 8 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            for p in 0..<8 { try s.store(UInt8(p + 1), at: a + UInt64(p) * page) }
            #expect(try fd.migrateToDevice(a, pages: 8, into: nil).cpages == 8)
            #expect(try s.load(UInt8.self, at: a + 3 * page) == 4)
            let events = drained(sub)
            let migrations = events.compactMap { e -> MigrationEvent? in if case .migration(let x) = e { x } else { nil } }
            #expect(migrations.count == 2)
            guard migrations.count == 2 else { return }
            let out = migrations[0]
            let back = migrations[1]
            #expect(out.cause == .explicit && out.from.isSystem && out.to.kind == .devicePrivate)
            #expect(out.pages == 8 && out.failedPages == 0 && out.bytes == 8 * PageSize.base && out.address == a)
            #expect(out.pagemapSlot != 0 && out.pagemapPagesInUse == 8)
            #expect(back.cause == .cpuFault && back.from == out.to && back.to.isSystem && back.pages >= 1)
            #expect(back.pagemapPagesInUse == 8 - back.pages)
            #expect(out.collect > 0 && out.copy > 0 && out.finalize > 0 && out.end > out.begin)
            let hits = events.compactMap { e -> CPUFaultEvent.Hit? in if case .cpuFault(let f) = e { f.hit } else { nil } }
            #expect(hits.contains(.devicePrivate))
            let c = m.events.counters
            #expect(c[.migrations, .base] == 2)
            #expect(c[.migratedPages, .base] == 8 + back.pages)
            #expect(c[.collectNanoseconds, .base] == Int(out.collect + back.collect))
            #expect(c.migratedBytes(cause: .explicit) == 8 * PageSize.base)
            #expect(c.migratedBytes(cause: .cpuFault) == back.bytes)
            #expect(c[.deviceCopyBytes] == (8 + back.pages) * PageSize.base, "the copy engine copied every page that moved")
        }
    }

    @Test("invalidations reach the stream only when a notifier hears them; device-exclusive grant and restore")
    func invalidationAndExclusive() throws {
        try withDevice { m, fd, s in
            let a = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.store(UInt8(7), at: a)
            let sub = try m.events.subscribe()
            var mirror = [UInt8](repeating: 0, count: Int(page))
            _ = try fd.makeExclusive(a, pages: 1, into: &mirror)
            #expect(try s.load(UInt8.self, at: a) == 7)
            let events = drained(sub)
            let exclusive = events.compactMap { e -> ExclusiveEvent? in if case .exclusive(let x) = e { x } else { nil } }
            #expect(exclusive.map(\.action) == [.grant, .restore])
            #expect(exclusive.allSatisfy { $0.address == a && $0.space == s.id })
            let invalidations = events.compactMap { e -> InvalidationEvent? in if case .invalidation(let x) = e { x } else { nil } }
            #expect(invalidations.contains { $0.event == .exclusive && $0.start == a })
            #expect(invalidations.contains { $0.event == .clear && $0.owner == 0 })
            #expect(m.events.counters[.exclusiveGrants] == 1 && m.events.counters[.exclusiveRestores] == 1)
            #expect(m.events.counters[.invalidations] == invalidations.count)
        }
    }

    @Test("a full ring drops new events and counts them by kind; the ones kept are the oldest")
    func ringDrops() throws {
        try withMachine { m in
            let sub = try m.events.subscribe(capacity: 4, kinds: HMMEventKinds(.cpuFault))
            #expect(sub.capacity == 4)
            let s = try m.makeAddressSpace()
            let a = try s.map(length: 10 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            try s.advise(a, length: 10 * Int(page), .noHugePage)
            for p in 0..<10 { try s.store(UInt8(1), at: a + UInt64(p) * page) }
            let kept = drained(sub).compactMap { e -> UInt64? in if case .cpuFault(let f) = e { f.address } else { nil } }
            #expect(kept == (0..<4).map { a + UInt64($0) * page })
            #expect(sub.dropped(.cpuFault) == 6)
            #expect(sub.droppedTotal == 6)
            #expect(m.events.counters[.faults, .base] == 10, "counters see every event, dropped or not")
            s.exit()
        }
    }

    @Test("bad subscriptions throw invalidArgument")
    func badSubscriptions() throws {
        try withMachine { m in
            expectError(.invalidArgument) { try m.events.subscribe(capacity: 1) }
            expectError(.invalidArgument) { try m.events.subscribe(capacity: 1 << 25) }
            expectError(.invalidArgument) { try m.events.subscribe(kinds: []) }
            #expect(!m.events.isObserving || EventHub.processWideSubscriptions > 0)
        }
    }

    @Test("many publishing threads and a reader: every event is delivered or counted dropped, none twice")
    func concurrentPublishers() throws {
        try withMachine { m in
            let sub = try m.events.subscribe(capacity: 256)
            let threads = 4
            let perThread = 5000
            let seen = Locked([Int](repeating: 0, count: threads * perThread))
            let done = Atomic<Int>(0)
            let reader = TestThread {
                while true {
                    let finished = done.load(ordering: .acquiring) == threads
                    sub.drain { r in
                        if case .policy(let p) = r.event { seen.withLock { $0[Int(p.address)] += 1 } }
                    }
                    if finished { break }
                }
            }
            runThreads(threads) { t in
                for i in 0..<perThread {
                    m.events.publish(.policy(PolicyEvent(kind: .prefetch, space: 0, address: UInt64(t * perThread + i), bytes: 0,
                                                         processor: .system, timestamp: 0)))
                }
                done.add(1, ordering: .releasing)
            }
            reader.join()
            let counts = seen.withLock { $0 }
            #expect(counts.allSatisfy { $0 <= 1 }, "no event delivered twice")
            #expect(counts.reduce(0, +) + sub.dropped(.policy) + m.events.lostToReconfiguration == threads * perThread)
            #expect(m.events.counters[.policyEvents] == threads * perThread)
        }
    }

    @Test("a process-wide subscription sees machines made after it, each record naming its machine's hub")
    func subscribeToAll() throws {
        // Eviction events: no engine publishes them, so other tests running meanwhile cannot fill the ring.
        let sub = try EventHub.subscribeToAll(capacity: 1 << 12, kinds: HMMEventKinds(.eviction))
        let m1 = try Machine(.init(systemMemory: 16 << 20))
        let m2 = try Machine(.init(systemMemory: 16 << 20))
        let e = EvictionEvent(device: .system, space: 0, address: 0x1000, pages: 1, neededBy: 0x2000, timestamp: 1)
        m1.events.publish(.eviction(e))
        m2.events.publish(.eviction(e))
        var sources: [Int] = []
        sub.drain { sources.append($0.source) }
        #expect(sources.contains(m1.events.id) && sources.contains(m2.events.id))
        #expect(sub.dropped(.eviction) == 0)
        #expect(m1.events.counters[.evictions] == 1 && m1.events.counters[.evictedPages] == 1)
        sub.cancel()
        #expect((!m1.events.isObserving && !m2.events.isObserving) || EventHub.processWideSubscriptions > 0)
        try m1.checkInvariants()
        try m2.checkInvariants()
    }

    @Test("the Chrome trace parses as JSON and its slices and instants match the counters")
    func chromeTrace() throws {
        try withDevice { m, fd, s in
            let sub = try m.events.subscribe()
            let a = try s.map(length: 16 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
            for p in 0..<16 { try s.store(UInt8(p), at: a + UInt64(p) * page) }
            _ = try fd.migrateToDevice(a, pages: 16, into: nil)
            for p in stride(from: 0, to: 16, by: 4) { _ = try s.load(UInt8.self, at: a + UInt64(p) * page) }
            var text = ""
            var writer = ChromeTraceWriter { text += $0 }
            sub.drain { writer.add($0) }
            writer.finish()
            let json = try JSONSerialization.jsonObject(with: Data(text.utf8)) as! [String: Any]
            let events = json["traceEvents"] as! [[String: Any]]
            func count(_ ph: String, _ cat: String) -> Int { events.filter { $0["ph"] as? String == ph && $0["cat"] as? String == cat }.count }
            let c = m.events.counters
            #expect(count("i", "cpu_fault") == c[.faults, .base] + c[.faults, .huge])
            #expect(count("X", "migration") == c[.migrations, .base] + c[.migrations, .huge])
            #expect(count("X", "migration_phase") == 3 * count("X", "migration"))
            #expect(count("C", "residency") == count("X", "migration"))
            #expect(count("X", "invalidation") == c[.invalidations])
            #expect(writer.counts[.migration] == count("X", "migration"))
            // Slices on one track never overlap unless nested (the phases inside their migration).
            var byTrack: [String: [(Double, Double)]] = [:]
            for e in events where e["ph"] as? String == "X" && e["cat"] as? String != "migration_phase" {
                let key = "\(e["pid"]!)/\(e["tid"]!)"
                byTrack[key, default: []].append((e["ts"] as! Double, (e["ts"] as! Double) + (e["dur"] as! Double)))
            }
            for (_, slices) in byTrack {
                let sorted = slices.sorted { $0.0 < $1.0 }
                for k in sorted.indices.dropFirst() { #expect(sorted[k].0 >= sorted[k - 1].1) }
            }
        }
    }
}
