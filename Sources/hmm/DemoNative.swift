import CUserfaultfd
import Foundation
import HMM
import HMMDevices
import HMMNative

/// `hmm demo --native`: the same driver on this process's real memory. A real `Int32` buffer lives in a
/// native region; part of it migrates to a device-private and a device-coherent mirror device, plain
/// loads fault pages back, a kernel `read(2)` lands in a device-resident page, and `munmap` of part of
/// it reaches the device as a notifier event.
struct NativeDemo {
    let json: Bool
    let memory: Int
    let svg: String?

    struct Step: Codable {
        var action: String
        var residency: String
        var counters: [String: Int]
    }

    struct Report: Codable {
        var engine: String
        var pages: Int
        var steps: [Step]
        var dataCheck: String
        var invariants: String
    }

    func run() throws {
        if let reason = NativeSpace.unsupportedReason() {
            print("native demo skipped: \(reason)")
            return
        }
        let machine = try Machine(.init(systemMemory: memory << 20))
        let space = try NativeSpace(machine: machine)
        let gpu = try MirrorDevice(machine: machine, minor: 0, kind: .devicePrivate, chunkSize: 64 << 20)
        let cxl = try MirrorDevice(machine: machine, minor: 2, kind: .deviceCoherent, chunkSize: 64 << 20)
        let pages = 64
        let region = try space.allocate(length: pages << 12, hugePages: false)
        let ints = region.pointer.bindMemory(to: Int32.self, capacity: pages * 1024)
        let gpuFile = try gpu.open(space)
        let cxlFile = try cxl.open(space)
        var steps: [Step] = []
        var picture = ResidencyMap()
        func say(_ action: String) {
            // After the space closed the region is plain memory, all of it home: no map then.
            let places = try? region.residency(0..<region.length).map(\.pageResidency)
            let step = Step(action: action, residency: places.map { String($0.map(\.rawValue)) } ?? "plain memory now (the space is closed)",
                            counters: counters(space))
            steps.append(step)
            if let places { picture.add(action, places) }
            guard !json else { return }
            print("• " + action)
            print("    " + step.residency)
            print("    " + step.counters.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: "  "))
        }
        let page = UInt64(4096)

        say("allocate a native region of \(pages) pages at \(hexString(region.address)): ordinary memory, nothing touched yet")
        for i in 0..<(pages * 1024) { ints[i] = Int32(i) }
        say("store ints[i] = i into all of it: each first touch was a userfaultfd zero fill")

        _ = try gpuFile.migrateToDevice(region.address + 8 * page, pages: 32, into: nil)
        say("migrate pages 8..<40 to device-private memory (\(gpu.pagesInUse) device pages): their addresses are holes now")

        var sum: Int64 = 0
        for i in (10 * 1024)..<(12 * 1024) { sum += Int64(ints[i]) }
        say("plain loads of pages 10-11 (sum \(sum)): one fault brought home the device pages (8-15) of its 16-page fault-around window")

        let path = NSTemporaryDirectory() + "hmm-native-demo-\(getpid())"
        _ = FileManager.default.createFile(atPath: path, contents: Data(repeating: 0x5A, count: 4096))
        defer { unlink(path) }
        let fd = open(path, O_RDONLY)
        let n = pread(fd, region.pointer + 30 * 4096, 4096, 0)
        close(fd)
        say("read(2) from a file into page 30, on the device: the kernel's copy faulted it back first (\(n) bytes landed)")

        let before = gpu.pagesInUse
        _ = munmap(region.pointer + 36 * 4096, 4 * 4096)
        space.waitUntilIdle()
        say("munmap pages 36..<40: the device heard `unmap` and freed \(before - gpu.pagesInUse) device pages")

        _ = try cxlFile.migrateToDevice(region.address + 48 * page, pages: 8, into: nil)
        let faults = space.statistics.snapshot.cpuFaults
        var coherentSum: Int64 = 0
        for i in (48 * 1024)..<(56 * 1024) { coherentSum += Int64(ints[i]) }
        ints[50 * 1024] = -1
        say("migrate pages 48..<56 to device-coherent memory, mapped in place: loads and a store there "
                + "took \(space.statistics.snapshot.cpuFaults - faults) faults (sum \(coherentSum))")
        ints[50 * 1024] = Int32(50 * 1024)

        try space.close()
        say("close the space: every device page came home before the userfaultfd closed")
        var bad = 0
        for p in 0..<pages where !(36..<40).contains(p) {
            for j in 0..<1024 {
                // Page 30 holds what read(2) put there; every other page its ints.
                let expected = p == 30 ? Int32(bitPattern: 0x5A5A_5A5A) : Int32(p * 1024 + j)
                if ints[p * 1024 + j] != expected { bad += 1 }
            }
        }
        let dataCheck = bad == 0 ? "every int intact" : "\(bad) ints wrong"
        var invariants = "ok"
        do { try machine.checkInvariants() } catch { invariants = "\(error)" }
        gpuFile.close()
        cxlFile.close()
        let report = Report(engine: "native", pages: pages, steps: steps, dataCheck: dataCheck, invariants: invariants)
        if let svg {
            try TextFile.write(picture.svg(title: "hmm demo --native: residency of a real buffer after each step"), to: svg)
        }
        if json { return try printJSON(report) }
        print("\ndata: \(dataCheck)")
        print("invariants: \(invariants)")
        if let svg { print("picture: \(svg)") }
        print("legend: . untouched  z zero page  a host page  H host THP  P device-private  C device-coherent  "
              + "X device-exclusive  ! revoked  - unmapped")
    }

    func counters(_ space: NativeSpace) -> [String: Int] {
        let s = space.statistics.snapshot
        return ["cpuFaults": s.cpuFaults, "faultBacks": s.faultBacks, "zeroFills": s.zeroFills, "events": s.events,
                "pagesMovedOut": s.pagesMovedOut, "pagesMovedIn": s.pagesMovedIn, "coherentMapped": s.coherentMapped]
    }
}
