import ArgumentParser
import Foundation
import HMM
import HMMDevices

/// `hmm demo`: a short narrated scenario on the default machine.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Narrate a scenario: map, touch, fork + COW, mprotect, THP fault and split, device migration, fault-back, coherent access, eviction, P2PDMA map/pin/unbind, unmap, exit.")

    @Flag(help: "Print the same report as JSON.")
    var json = false

    @Option(help: "System RAM of the simulated machine, in MiB.")
    var memory = 512

    @Flag(help: "Run on this process's real memory (the native engine): a real Int32 buffer migrates, faults back and is unmapped.")
    var native = false

    @Option(help: "Also draw the residency of each step's pages as an SVG picture (one row per step) into this file.")
    var svg: String?

    struct Step: Codable {
        var action: String
        var pageMap: String?
    }

    struct Report: Codable {
        var machine: [String: Int]
        var steps: [Step]
        var counters: [String: Int]
        var framesFree: Int
        var framesUsed: Int
        var invariants: String
    }

    func run() throws {
        if let svg { try TextFile.checkWritable(svg) }
        if native { return try NativeDemo(json: json, memory: memory, svg: svg).run() }
        let m = try Machine(.init(systemMemory: memory << 20, hugetlbPages: 2))
        var steps: [Step] = []
        var picture = ResidencyMap()
        func say(_ s: String, _ map: String? = nil) {
            steps.append(Step(action: s, pageMap: map))
            if let map { picture.add(s, map.compactMap { PageResidency(rawValue: $0) }) }
            guard !json else { return }
            print("• " + s)
            if let map { print("    " + map) }
        }
        let page: UInt64 = 4096
        let parent = try m.makeAddressSpace()

        let p = try parent.map(length: 16 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
        say("map 16 pages private anonymous at \(hexString(p))", try pageMap(parent, p, 16))
        _ = try parent.load(UInt64.self, at: p)
        _ = try parent.load(UInt64.self, at: p + page)
        for i in 4..<12 { try parent.store(UInt64(i), at: p + UInt64(i) * page) }
        say("read pages 0-1 (zero page), write pages 4-11 (private zeroed frames)", try pageMap(parent, p, 16))

        let child = try parent.fork()
        say("fork: private pages now shared read-only between parent and child", try pageMap(parent, p, 16))
        try child.store(UInt64(99), at: p + 5 * page)
        try parent.store(UInt64(77), at: p + 6 * page)
        say("child writes page 5, parent writes page 6: each copy-on-write stays private; "
            + "parent sees page 5 = \(try parent.load(UInt64.self, at: p + 5 * page)), "
            + "child sees page 6 = \(try child.load(UInt64.self, at: p + 6 * page))", try pageMap(parent, p, 16))

        try parent.protect(p + 8 * page, length: 4 * Int(page), [.read])
        var segv = "no fault"
        do { try parent.store(UInt8(1), at: p + 9 * page) } catch { segv = "\(error.code)" }
        say("mprotect pages 8-11 read-only; a store there raises \(segv) and changes nothing", try pageMap(parent, p, 16))

        let raw = try parent.map(length: 4 << 20, protection: [.read, .write], flags: [.private, .anonymous])
        let h = (raw + 0x1F_FFFF) & ~0x1F_FFFF
        try parent.advise(h, length: 2 << 20, .hugePage)
        _ = try parent.load(UInt8.self, at: h)
        say("madvise(HUGEPAGE) on a 2 MiB window; a read maps the huge zero page", try pageMap(parent, h, 16))
        try parent.store(UInt8(1), at: h + 3)
        say("a write there allocates one 2 MiB folio, PMD-mapped", try pageMap(parent, h, 16))
        try parent.protect(h + 4 * page, length: 2 * Int(page), [.read])
        say("mprotect 2 pages of it read-only: the PMD splits into 512 PTEs (the folio stays whole)",
            try pageMap(parent, h, 16))
        try parent.protect(h + 4 * page, length: 2 * Int(page), [.read, .write])
        try parent.advise(h, length: 2 << 20, .collapse)
        say("make them writable again (the VMAs merge) and MADV_COLLAPSE: one PMD mapping again",
            try pageMap(parent, h, 16))
        let before = m.freeFrames
        try parent.unmap(h + 2 * page, length: 2 * Int(page))
        say("unmap 2 pages inside it: PMD and folio split, \(m.freeFrames - before) frames return at once",
            try pageMap(parent, h, 16))

        let hp = try parent.map(length: 2 << 20, protection: [.read, .write], flags: [.private, .anonymous, .hugetlb])
        try parent.store(UInt64(1), at: hp)
        say("MAP_HUGETLB: a 2 MiB page from the hugetlb pool (\(m.freeHugetlbPages) of 2 left free)",
            try pageMap(parent, hp, 16))

        // Device act: two mirror devices, one device-private and one device-coherent.
        let devices = try MirrorDeviceSet(machine: m, chunkSize: 16 << 20)
        let gpu = try devices.device(0)
        let cxl = try devices.device(2)
        let d = try parent.map(length: 16 * Int(page), protection: [.read, .write], flags: [.private, .anonymous])
        for i in 0..<16 { try parent.store(UInt64(1000 + i), at: d + UInt64(i) * page) }
        let gpuFile = try gpu.open(parent)
        let cxlFile = try cxl.open(parent)
        var mirror = [UInt8](repeating: 0, count: 8 * Int(page))
        let moved = try gpuFile.migrateToDevice(d, pages: 8, into: &mirror)
        say("device act: 16 fresh pages; migrate_vma moves pages 0-7 to device-private memory of \(gpu) "
            + "(cpages \(moved.cpages)); the CPU page table now holds non-present device-private entries",
            try pageMap(parent, d, 16))
        var seen: [UInt64] = []
        for i in 0..<4 { seen.append(try parent.load(UInt64.self, at: d + UInt64(i) * page)) }
        say("the CPU reads pages 0-3: each access faults, migrate_to_ram brings the page back "
            + "(values \(seen.map(String.init).joined(separator: ", ")))", try pageMap(parent, d, 16))
        let coherent = try cxlFile.migrateToDevice(d + 8 * page, pages: 4, into: &mirror)
        let inPlace = try parent.load(UInt64.self, at: d + 8 * page)
        say("migrate pages 8-11 to device-coherent memory of \(cxl) (cpages \(coherent.cpages)); the CPU reads "
            + "page 8 in place without a fault (value \(inPlace))", try pageMap(parent, d, 16))
        var snap = [UInt8](repeating: 0, count: 16)
        _ = try gpuFile.snapshot(d, pages: 16, into: &snap)
        say("the private device's snapshot bytes (hmm_range_fault without faulting): "
            + snap.map { String(format: "%02x", $0) }.joined(separator: " "))
        let inUse = gpu.pagesInUse
        try gpu.release()
        say("release \(gpu): migrate_device_range evicts its \(inUse) remaining pages to RAM through the "
            + "reverse map; \(cxl) still holds \(cxl.pagesInUse)", try pageMap(parent, d, 16))
        try parent.unmap(d, length: 16 * Int(page))
        say("unmap the buffer: the coherent pages go back to their device (\(cxl.pagesInUse) in use)")

        // 2 MiB device pages.
        let raw2 = try parent.map(length: 4 << 20, protection: [.read, .write], flags: [.private, .anonymous])
        let t = (raw2 + 0x1F_FFFF) & ~0x1F_FFFF
        try parent.advise(t, length: 2 << 20, .hugePage)
        for i in 0..<512 { try parent.store(UInt64(5000 + i), at: t + UInt64(i) * page) }
        let huge = try gpuFile.migrateToDevice(t, pages: 512, into: nil)
        say("a 2 MiB THP migrates as one compound entry to one 2 MiB device folio (\(huge.cpages) pages mapped by "
            + "the device; the CPU sees a single device-private PMD entry)", try pageMap(parent, t, 16))
        try parent.unmap(t + 4 * page, length: 4 * Int(page))
        say("unmap 4 pages inside it: the device-private PMD splits into 512 device-private PTEs and the device "
            + "folio is split (folioSplit); \(gpu.pagesInUse) device pages stay in use", try pageMap(parent, t, 16))
        let v2 = try parent.load(UInt64.self, at: t + 9 * page)
        say("the CPU reads page 9: one 4 KiB page comes back (value \(v2)); the rest stays on the device",
            try pageMap(parent, t, 16))
        gpuFile.close()
        cxlFile.close()
        try parent.unmap(raw2, length: 4 << 20)

        try p2pAct(m, parent, say)

        try parent.unmap(p, length: 16 * Int(page))
        child.exit()
        say("unmap the small region in the parent, exit the child")
        let used = m.totalFrames - m.freeFrames
        parent.exit()
        say("exit the parent: \(used - (m.totalFrames - m.freeFrames)) frames returned; "
            + "\(m.freeFrames) of \(m.totalFrames) frames free")
        var invariants = "ok"
        do { try m.checkInvariants() } catch { invariants = "\(error)" }

        var counters: [String: Int] = [:]
        for (c, v) in m.statistics.snapshot where v != 0 { counters[c.description] = v }
        let report = Report(
            machine: ["systemMemoryMiB": memory, "frames": m.totalFrames, "hugetlbPages": 2],
            steps: steps, counters: counters, framesFree: m.freeFrames, framesUsed: m.totalFrames - m.freeFrames,
            invariants: invariants)
        if let svg {
            try TextFile.write(picture.svg(title: "hmm demo: page residency after each step (simulated engine)"), to: svg)
        }
        if json { return try printJSON(report) }
        print("\ncounters:")
        for (c, v) in m.statistics.snapshot where v != 0 { print("  " + pad(c.description, 24) + "\(v)") }
        print("frames: \(report.framesUsed) used, \(report.framesFree) free (reserved zero pages and the hugetlb "
              + "pool count as used)")
        print("invariants: \(invariants)")
        if let svg { print("picture: \(svg)") }
        print("legend: . none  z zero page  Z huge zero  a anon (exclusive)  s anon (shared)  r read-only  "
              + "- PROT_NONE/absent  H THP (PMD)  T hugetlb  f file  P device-private  D device-private PMD  "
              + "C device-coherent  X device-exclusive  p PCI P2PDMA")
    }

    /// One character per page (``PageResidency``); each map also becomes a row of the `--svg` picture.
    func pageMap(_ s: AddressSpace, _ start: UInt64, _ pages: Int) throws -> String {
        "[" + String(try s.residency(start, pages: pages).map(\.rawValue)) + "]"
    }
}

func hexString(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// Prints `value` as sorted, pretty-printed JSON (the demos' `--json`).
func printJSON(_ value: some Encodable) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}
