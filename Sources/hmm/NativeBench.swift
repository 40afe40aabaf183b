import CUserfaultfd
import HMM
import HMMDevices
import HMMNative
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `hmm bench native`: the native engine on this process's real memory, each figure beside a baseline
/// measured alternately with it in the same rounds (`BenchReport`; the machine is noisy):
/// - CPU fault-back of one 4 KiB page vs a bare userfaultfd round trip (a minimal handler thread
///   resolving each fault with `UFFDIO_COPY`);
/// - the same in in-thread mode vs a bare in-thread resolution (`UFFD_FEATURE_SIGBUS`, a signal hook
///   doing `UFFDIO_COPY`), and in-thread fault-around with 1 and 2 threads vs handler mode;
/// - fault-back throughput with fault-around (16 pages) vs page by page, with 1 and 2 faulting threads;
/// - migration to the device and back, 4 KiB and 2 MiB units, vs memcpy of the same bytes;
/// - snapshot (`HMM_DMIRROR_SNAPSHOT`) pages/s vs a bare `PAGEMAP_SCAN` of the same range.
extension Bench {
    func nativeBenchmarks(_ report: BenchReport, reps: Int, quick: Bool) throws {
        report.section("swift-hmm native engine benchmarks (\(reps) timed rounds after a warm-up round)")
        if let reason = NativeSpace.unsupportedReason() {
            report.note("native benchmarks skipped: \(reason)")
            return
        }
        let machine = try Machine(.init(systemMemory: quick ? 64 << 20 : 512 << 20))
        let space = try NativeSpace(machine: machine)
        defer { try? space.close() }
        let gpu = try MirrorDevice(machine: machine, minor: 0, kind: .devicePrivate, chunkSize: quick ? 32 << 20 : 256 << 20)
        let file = try gpu.open(space)
        defer { file.close() }

        // 1. Fault-back latency, one page per fault.
        let pages = quick ? 256 : 4096
        try space.setFaultAroundPages(1)
        try report.pair(name: "CPU fault-back, 1 page", unit: "µs/fault", baseline: "bare uffd COPY", reps: reps,
                        baselineBody: { bareRoundTrip(pages: pages) / 1000 },
                        measuredBody: { try faultBack(space, file, pages: pages, threads: 1) / 1000 })

        // 1b. In-thread mode: a second machine's space (one space per machine).
        let machine2 = try Machine(.init(systemMemory: quick ? 64 << 20 : 512 << 20))
        var options = NativeSpace.Options()
        options.faultMode = .inThread
        let inThread = try NativeSpace(machine: machine2, options: options)
        defer { try? inThread.close() }
        let gpu2 = try MirrorDevice(machine: machine2, minor: 1, kind: .devicePrivate, chunkSize: quick ? 32 << 20 : 256 << 20)
        let file2 = try gpu2.open(inThread)
        defer { file2.close() }
        try inThread.setFaultAroundPages(1)
        try report.pair(name: "in-thread fault-back, 1 page", unit: "µs/fault", baseline: "bare SIGBUS + COPY",
                        reps: reps, baselineBody: { bareInThread(pages: pages) / 1000 },
                        measuredBody: { try faultBack(inThread, file2, pages: pages, threads: 1) / 1000 })
        try space.setFaultAroundPages(16)
        try inThread.setFaultAroundPages(16)
        let kpages = { (nsPerPage: Double) in 1e6 / nsPerPage }
        for threads in [1, 2] {
            try report.pair(name: "in-thread fault-around 16, \(threads) thr", unit: "kpages/s", baseline: "handler mode",
                            digits: 0, reps: reps,
                            baselineBody: { kpages(try faultBack(space, file, pages: pages * 4, threads: threads)) },
                            measuredBody: { kpages(try faultBack(inThread, file2, pages: pages * 4, threads: threads)) })
        }

        // 2. Fault-around throughput.
        for threads in [1, 2] {
            try report.pair(name: "fault-around 16, \(threads) thr", unit: "kpages/s", baseline: "per page", digits: 0,
                            reps: reps, baselineBody: {
                try space.setFaultAroundPages(1)
                return kpages(try faultBack(space, file, pages: pages * 4, threads: threads))
            }, measuredBody: {
                try space.setFaultAroundPages(16)
                return kpages(try faultBack(space, file, pages: pages * 4, threads: threads))
            })
        }
        try space.setFaultAroundPages(16)

        // 3. Migration to the device and back, against a memcpy of the same bytes in the same units, there
        // and back between two buffers of its own (one round: copy there, copy back, migrate there, back).
        let bytes = quick ? 8 << 20 : 64 << 20
        let copy = CopyBuffers(bytes: bytes)
        for huge in [false, true] {
            let region = try space.allocate(length: bytes, hugePages: huge, populate: true)
            memset(region.pointer, 5, bytes)
            let unitBytes = huge ? 2 << 20 : 4096
            let gbps = { (ns: Double) in Double(bytes) / ns }
            let samples = try BenchReport.rounds(reps: reps) {
                let copyThere = copy.copy(chunk: unitBytes)
                let copyBack = copy.copy(chunk: unitBytes, reverse: true)
                var t = now()
                _ = try file.migrateToDevice(region.address, pages: bytes >> 12, into: nil)
                let to = Double(now() - t)
                t = now()
                _ = try file.migrateToSystem(region.address, pages: bytes >> 12)
                return [gbps(copyThere), gbps(copyBack), gbps(to), gbps(Double(now() - t))]
            }
            let stillHuge = huge ? "AnonHugePages \(cu_anon_huge_kb(region.address) >> 10) MiB of \(bytes >> 20)" : nil
            region.free()
            let unit = huge ? "2 MiB" : "4 KiB"
            for (dir, k) in [("device", 0), ("system", 1)] {
                report.add(name: "migrate to \(dir), \(unit) units", unit: "GB/s", baseline: "memcpy",
                           note: k == 1 ? stillHuge : nil,
                           measured: samples.map { $0[2 + k] }, baselineSamples: samples.map { $0[k] })
            }
        }

        // First writes to untouched memory: a huge-advised region gets one zeroed THP per 2 MiB unit,
        // against 4 KiB zero fills, one fault per page.
        let firstTouchBytes = quick ? 4 << 20 : 32 << 20
        let firstGBps = { (ns: Double) in Double(firstTouchBytes) / ns }
        try report.pair(name: "first writes, huge-advised region", unit: "GB/s", baseline: "4 KiB zero fills",
                        reps: reps,
                        baselineBody: { firstGBps(try firstWrites(space, bytes: firstTouchBytes, huge: false)) },
                        measuredBody: { firstGBps(try firstWrites(space, bytes: firstTouchBytes, huge: true)) })

        // Device-coherent memory mapped in place: what a migration costs against device-private, and
        // CPU reads of the coherent pages against the same reads of host pages (no fault either way).
        try coherentBenchmarks(report, machine, space, reps: reps, bytes: quick ? 2 << 20 : 16 << 20,
                               privateFile: file)

        // 4. Snapshot vs a bare PAGEMAP_SCAN.
        let snapPages = quick ? 4096 : 65536
        let region = try space.allocate(length: snapPages << 12, hugePages: false, populate: true)
        defer { region.free() }
        var out = [UInt8](repeating: 0, count: snapPages)
        let fd = open("/proc/self/pagemap", O_RDONLY)
        defer { close(fd) }
        var vec = [cu_page_region](repeating: cu_page_region(), count: 64)
        let mpages = { (ns: Double) in Double(snapPages) / ns * 1000 }
        try report.pair(name: "snapshot, 4 KiB pages", unit: "Mpages/s", baseline: "bare PAGEMAP_SCAN", reps: reps,
                        baselineBody: {
            let t = now()
            var a = region.address
            var walkEnd: UInt64 = 0
            while a < region.end {
                let n = cu_pagemap_scan(fd, a, region.end, &vec, 64, UInt64(CU_PAGE_IS_PRESENT | CU_PAGE_IS_PFNZERO | CU_PAGE_IS_HUGE), &walkEnd)
                if n < 0 || walkEnd <= a { break }
                a = walkEnd
            }
            return mpages(Double(now() - t))
        }, measuredBody: {
            let t = now()
            _ = try file.snapshot(region.address, pages: snapPages, into: &out)
            return mpages(Double(now() - t))
        })
        try machine.checkInvariants()
    }

    /// Nanoseconds to write one byte per page of a fresh region (every write a first touch).
    private func firstWrites(_ space: NativeSpace, bytes: Int, huge: Bool) throws -> Double {
        let region = try space.allocate(length: bytes, hugePages: huge)
        defer { region.free() }
        let t = now()
        for offset in stride(from: 0, to: bytes, by: 4096) { region.pointer.storeBytes(of: 1, toByteOffset: offset, as: UInt8.self) }
        return Double(now() - t)
    }

    private func coherentBenchmarks(_ report: BenchReport, _ machine: Machine, _ space: NativeSpace, reps: Int,
                                    bytes: Int, privateFile: MirrorFile) throws {
        let coherent = try MirrorDevice(machine: machine, minor: 2, kind: .deviceCoherent, chunkSize: max(bytes, 32 << 20))
        let file = try coherent.open(space)
        defer { file.close() }
        let region = try space.allocate(length: bytes, hugePages: false, populate: true)
        defer { region.free() }
        memset(region.pointer, 7, bytes)
        let pages = bytes >> 12
        /// Sums the region's 64-bit words (a CPU read of every byte).
        func readAll() -> Double {
            let words = region.pointer.bindMemory(to: UInt64.self, capacity: bytes / 8)
            let t = now()
            var sum: UInt64 = 0
            for i in 0..<(bytes / 8) { sum &+= words[i] }
            blackHole(sum)
            return Double(now() - t)
        }
        let usPerPage = { (ns: Double) in ns / Double(pages) / 1000 }
        let gbps = { (ns: Double) in Double(bytes) / ns }
        // One round: device-private there and back, a read of the host pages, coherent there, a read in
        // place, coherent back.
        let samples = try BenchReport.rounds(reps: reps) {
            var t = now()
            _ = try privateFile.migrateToDevice(region.address, pages: pages, into: nil)
            _ = try privateFile.migrateToSystem(region.address, pages: pages)
            let priv = Double(now() - t)
            let hostRead = readAll()
            t = now()
            _ = try file.migrateToDevice(region.address, pages: pages, into: nil)
            let mid = now()
            let cohRead = readAll()
            let back = now()
            _ = try file.migrateToSystem(region.address, pages: pages)
            let coh = Double(mid - t) + Double(now() - back)
            return [usPerPage(priv), usPerPage(coh), gbps(hostRead), gbps(cohRead)]
        }
        report.add(name: "coherent: migrate there and back", unit: "µs/page", baseline: "device-private",
                   measured: samples.map { $0[1] }, baselineSamples: samples.map { $0[0] })
        report.add(name: "coherent: CPU read in place", unit: "GB/s", baseline: "host pages",
                   measured: samples.map { $0[3] }, baselineSamples: samples.map { $0[2] })
    }

    /// Nanoseconds per page for `threads` threads touching every page of a region whose pages all sit on
    /// the device (each thread its own part).
    private func faultBack(_ space: NativeSpace, _ file: MirrorFile, pages: Int, threads: Int) throws -> Double {
        let region = try space.allocate(length: pages << 12, hugePages: false, populate: true)
        defer { region.free() }
        memset(region.pointer, 3, pages << 12)
        _ = try file.migrateToDevice(region.address, pages: pages, into: nil)
        let base = UInt(bitPattern: region.pointer)
        let sum = Atomic<Int>(0)
        let t = now()
        let per = pages / threads
        let workers = (0..<threads).map { k in
            HostThread {
                var s = 0
                for p in (k * per)..<((k + 1) * per) {
                    s &+= Int(UnsafePointer<UInt8>(bitPattern: base + UInt(p << 12) + 64)!.pointee)
                }
                sum.add(s, ordering: .relaxed)
            }
        }
        for w in workers { w.join() }
        let ns = Double(now() - t) / Double(pages)
        precondition(sum.load(ordering: .relaxed) == 3 * pages, "fault-back returned wrong bytes")
        return ns
    }

    /// Nanoseconds per fault for a minimal in-thread resolution: a userfaultfd with
    /// `UFFD_FEATURE_SIGBUS`, and a signal hook (the one the engine uses, swapped in for the run) that
    /// resolves each fault with `UFFDIO_COPY` of 4 KiB from a source buffer.
    private func bareInThread(pages: Int) -> Double {
        var error: Int32 = 0
        let bytes = UInt64(pages) << 12
        let region = cu_map_aligned(bytes, 2 << 20, PROT_READ | PROT_WRITE, &error)
        _ = cu_madvise(region, bytes, MADV_NOHUGEPAGE)
        let fd = cu_uffd_open(UInt64(CU_FEATURE_SIGBUS), 0, nil)
        guard region != 0, fd >= 0, cu_register(fd, region, bytes, UInt64(CU_REGISTER_MISSING)) == 0 else { return .nan }
        let source = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        memset(source, 3, 4096)
        BareInThread.fd.store(fd, ordering: .releasing)
        BareInThread.source.store(UInt64(UInt(bitPattern: source)), ordering: .releasing)
        BareInThread.range.store(region, ordering: .releasing)
        BareInThread.end.store(region + bytes, ordering: .releasing)
        let previous = cu_set_fault_hook { address, _ in
            guard address >= BareInThread.range.load(ordering: .acquiring), address < BareInThread.end.load(ordering: .acquiring)
            else { return 0 }
            var copied: Int64 = 0
            let rc = cu_copy(BareInThread.fd.load(ordering: .acquiring), address & ~4095,
                             BareInThread.source.load(ordering: .acquiring), 4096, 0, &copied)
            return rc == 0 || rc == -EEXIST ? 1 : 0
        }
        let t = now()
        var s = 0
        for p in 0..<pages { s &+= Int(UnsafePointer<UInt8>(bitPattern: UInt(region) + UInt(p << 12) + 64)!.pointee) }
        let ns = Double(now() - t) / Double(pages)
        _ = cu_set_fault_hook(previous)
        BareInThread.end.store(0, ordering: .releasing)
        precondition(s == 3 * pages, "the bare in-thread handler returned wrong bytes")
        _ = cu_close(fd)
        _ = cu_munmap(region, bytes)
        source.deallocate()
        return ns
    }

    /// Nanoseconds per fault for a minimal userfaultfd handler: a thread that polls, reads the fault and
    /// resolves it with `UFFDIO_COPY` of 4 KiB from a source buffer — the bare cost of a round trip.
    private func bareRoundTrip(pages: Int) -> Double {
        var error: Int32 = 0
        let bytes = UInt64(pages) << 12
        let region = cu_map_aligned(bytes, 2 << 20, PROT_READ | PROT_WRITE, &error)
        _ = cu_madvise(region, bytes, MADV_NOHUGEPAGE)
        let fd = cu_uffd_open(0, 0, nil)
        guard region != 0, fd >= 0, cu_register(fd, region, bytes, UInt64(CU_REGISTER_MISSING)) == 0 else { return .nan }
        let source = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        memset(source, 3, 4096)
        let src = UInt64(UInt(bitPattern: source))
        let served = Atomic<Int>(0)
        let handler = HostThread {
            var msgs = [cu_message](repeating: cu_message(), count: 64)
            while served.load(ordering: .relaxed) < pages {
                guard cu_poll(fd, -1, 100) > 0 else { continue }
                let n = msgs.withUnsafeMutableBufferPointer { cu_read_messages(fd, $0.baseAddress!, 64) }
                for k in 0..<max(0, Int(n)) where msgs[k].kind == UInt32(CU_MSG_PAGEFAULT) {
                    var copied: Int64 = 0
                    _ = cu_copy(fd, msgs[k].a & ~4095, src, 4096, 0, &copied)
                    served.add(1, ordering: .relaxed)
                }
            }
        }
        let t = now()
        var s = 0
        for p in 0..<pages { s &+= Int(UnsafePointer<UInt8>(bitPattern: UInt(region) + UInt(p << 12) + 64)!.pointee) }
        let ns = Double(now() - t) / Double(pages)
        handler.join()
        blackHole(s)
        _ = cu_close(fd)
        _ = cu_munmap(region, bytes)
        source.deallocate()
        return ns
    }
}

/// The bare in-thread baseline's state, read by its signal hook (a C function pointer captures nothing).
private enum BareInThread {
    static let fd = Atomic<Int32>(-1)
    static let source = Atomic<UInt64>(0)
    static let range = Atomic<UInt64>(0)
    static let end = Atomic<UInt64>(0)
}
