import CUserfaultfd
import HMM
import HMMDevices
import HMMNative
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The native engine's events on its machine's hub (issue 12): real loads and stores fault, and the
/// stream says what they hit, which thread waited and for how long; the host's userfaultfd events appear
/// as they are handled.
@Suite("Native engine: events", .enabled(if: nativeUnavailable == nil, "native engine unavailable here (issue 15): \(nativeUnavailable ?? "")"), .timeLimit(.minutes(10)))
struct NativeObserveTests {
    func faults(_ events: [HMMEvent]) -> [CPUFaultEvent] {
        events.compactMap { e -> CPUFaultEvent? in if case .cpuFault(let f) = e { f } else { nil } }
    }

    func migrations(_ events: [HMMEvent]) -> [MigrationEvent] {
        events.compactMap { e -> MigrationEvent? in if case .migration(let m) = e { m } else { nil } }
    }

    func drained(_ s: EventSubscription) -> [HMMEvent] {
        var out: [HMMEvent] = []
        s.drain { out.append($0.event) }
        return out
    }

    @Test("a plain load of a device-private page: a device_private fault by this thread, blocked while the fault thread migrated it back", arguments: [false, true])
    func faultBackEvent(inThread: Bool) throws {
        var options = NativeSpace.Options()
        if inThread { options.faultMode = .inThread }
        try withNativeSpace(options: options) { machine, space, gpu in
            let region = try space.allocate(length: 16 << 12, hugePages: false, populate: true)
            fill(region, seed: 9)
            let file = try gpu.open(space)
            let sub = try machine.events.subscribe()
            _ = try file.migrateToDevice(region.address, pages: 16, into: nil)
            let word = region.pointer.load(fromByteOffset: 5 << 12, as: UInt32.self)
            #expect(word == 9 &+ UInt32((5 << 12) / 4))
            // The fault thread publishes its event after waking the toucher: wait for it.
            var events: [HMMEvent] = []
            #expect(eventually {
                events += drained(sub)
                return faults(events).contains { $0.hit == .devicePrivate }
            })
            let f = faults(events).filter { $0.hit == .devicePrivate }
            #expect(f.count == 1)
            #expect(f.first?.thread == cu_gettid(), "the faulting thread, not the fault thread")
            #expect(f.first?.address == region.address + (5 << 12) && f.first?.access == .read && f.first?.succeeded == true)
            if let e = f.first {
                #expect(e.blocked >= e.duration)
                if inThread { #expect(e.blocked == e.duration) }
            }
            let m = migrations(events)
            #expect(m.first?.cause == .explicit && m.first?.pages == 16 && m.first?.to.kind == .devicePrivate)
            #expect(m.first?.space == Int(getpid()))
            let back = m.filter { $0.cause == .cpuFault }
            #expect(back.count == 1 && back.first!.to.isSystem && back.first!.pages == space.faultAroundPages)
            #expect(machine.events.counters[.faults, .base] == faults(events).count)
            #expect(machine.events.counters.threadLatencies.contains { $0.thread == cu_gettid() && $0.faults >= 1 })
            sub.cancel()
            file.close()
            region.free()
        }
    }

    @Test("first touches: a read maps zeros (zero_page), a write fills a new page (new_page)")
    func firstTouchEvents() throws {
        try withNativeSpace { machine, space, _ in
            let region = try space.allocate(length: 4 << 12, hugePages: false)
            let sub = try machine.events.subscribe(kinds: HMMEventKinds(.cpuFault))
            #expect(region.pointer.load(as: UInt8.self) == 0)
            region.pointer.storeBytes(of: 1, toByteOffset: 4096, as: UInt8.self)
            var events: [HMMEvent] = []
            #expect(eventually {
                events += drained(sub)
                return faults(events).count >= 2
            })
            let f = faults(events)
            #expect(f.map(\.hit) == [.zeroPage, .newPage])
            #expect(f.map(\.access) == [.read, .write])
            sub.cancel()
            region.free()
        }
    }

    @Test("munmap, MADV_DONTNEED and mremap arrive as host events with their ranges and handling times")
    func hostEvents() throws {
        try withNativeSpace { machine, space, gpu in
            let region = try space.allocate(length: 64 << 12, hugePages: false, populate: true)
            fill(region, seed: 2)
            let file = try gpu.open(space)
            _ = try file.migrateToDevice(region.address, pages: 64, into: nil)
            let sub = try machine.events.subscribe(kinds: HMMEventKinds(.host))
            var seen: [HostEvent] = []
            func collect() -> [HostEvent] {
                sub.drain { r in if case .host(let h) = r.event { seen.append(h) } }
                return seen
            }
            #expect(munmap(region.pointer + 8 * 4096, 4 * 4096) == 0)
            #expect(madvise(region.pointer + 16 * 4096, 4 * 4096, MADV_DONTNEED) == 0)
            #expect(eventually { collect().count >= 2 })
            let a = region.address
            #expect(seen.contains { $0.kind == .unmap && $0.start == a + 8 * 4096 && $0.end == a + 12 * 4096 })
            #expect(seen.contains { $0.kind == .remove && $0.start == a + 16 * 4096 && $0.end == a + 20 * 4096 })
            #expect(seen.allSatisfy { $0.space == Int(getpid()) && $0.timestamp > 0 })
            #expect(machine.events.counters[.hostEvents] >= 2)
            sub.cancel()
            file.close()
            region.free()
        }
    }
}
