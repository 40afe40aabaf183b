import CUserfaultfd
import HMM
import Synchronization
import Testing
@_spi(Engine) import HMM
@testable import HMMNative

#if canImport(Glibc)
import Glibc
#endif

/// A provider below a PCIe switch with 2 MiB of BAR memory (the smallest pool: one pagemap).
private func makeProvider(_ machine: Machine) throws -> P2PProvider {
    let topology = PCITopology()
    let port = topology.addRootPort(on: topology.addHostBridge())
    let downstream = try topology.addSwitch(under: port, downstreamPorts: 2)
    let function = try topology.addDevice(under: downstream[0], bars: [PCIBAR(size: 2 << 20, busAddress: 0x8_0000_0000)])[0]
    return try P2PProvider.addResource(machine: machine, function: function, bar: 0)
}

/// The host memory behind the mapping at `address` (for the peer's view of its frames).
private func hostMemory(_ space: NativeSpace, _ address: UInt64) -> (memory: P2PHostMemory, firstPage: Int)? {
    space.withMmapReadLockForTests {
        space.p2pMappings.first { $0.address == address }.map { ($0.memory, $0.firstPage) }
    }
}

/// The peer's view (DMA through the BAR) of page `i` of `memory`.
private func peerBytes(_ memory: P2PHostMemory, _ i: Int) throws -> UnsafeMutableRawBufferPointer {
    try memory.provider.pagemaps[0].bytes(of: memory.first + i)
}

/// A thread parked inside an epoch critical section (a lockless walker) until ``leave()``.
private final class ParkedWalker: @unchecked Sendable {
    private let inside = Atomic<Bool>(false)
    private let go = Atomic<Bool>(false)
    private var thread: HostThread?

    init(_ machine: Machine) {
        thread = HostThread { [self] in
            machine.epoch.withCriticalSection {
                inside.store(true, ordering: .releasing)
                // Bounded: a test that forgets leave() fails on its own expectations, never wedges.
                let deadline = ContinuousClock.now + .seconds(30)
                while !go.load(ordering: .acquiring) && ContinuousClock.now < deadline { usleep(100) }
            }
        }
        let deadline = ContinuousClock.now + .seconds(30)
        while !inside.load(ordering: .acquiring) && ContinuousClock.now < deadline { usleep(100) }
    }

    func leave() {
        go.store(true, ordering: .releasing)
        thread?.join()
        thread = nil
    }
}

private let page = 4096

/// Whether `O_DIRECT` works in the temporary directory (tmpfs before 6.6 and some overlay setups refuse it).
private let directIOUnavailable: String? = {
    var template = Array("/tmp/hmm-odirect-XXXXXX".utf8CString)
    let fd = mkstemp(&template)
    guard fd >= 0 else { return "mkstemp failed" }
    close(fd)
    let path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    defer { unlink(path) }
    let d = cu_open_direct(path, O_RDWR)
    guard d >= 0 else { return "O_DIRECT open of a file in /tmp fails: \(String(cString: strerror(-d)))" }
    close(d)
    return nil
}()

@Suite("Native engine: P2PDMA memory mapped into the process (seed 004)", .serialized, .enabled(if: nativeUnavailable == nil, "native engine unavailable here: \(nativeUnavailable ?? "")"), .timeLimit(.minutes(5)))
struct NativeP2PDMATests {
    @Test("p2pmem mapped natively: zeroed; the CPU and the peer share the bytes; frames come back only after their grace period")
    func mappingLifecycle() throws {
        try withNativeSpace { machine, space, _ in
            let p2p = try makeProvider(machine)
            let total = p2p.available
            // A previous user's bytes in the BAR never show.
            let scribble = try p2p.allocate(16 * page)
            _ = try scribble.withBytes { $0.initializeMemory(as: UInt8.self, repeating: 0xEE) }
            try p2p.free(scribble)
            let a = try space.mapP2PMemory(p2p, length: 16 * page)
            let p = UnsafeMutableRawPointer(bitPattern: UInt(a))!
            #expect(p2p.available == total - 16 * page)
            #expect((0..<16 * page).allSatisfy { p.load(fromByteOffset: $0, as: UInt8.self) == 0 }, "every page starts zeroed")
            let (memory, firstPage) = try #require(hostMemory(space, a))
            #expect(firstPage == 0)
            // CPU stores reach the frames; peer writes reach the CPU.
            for i in 0..<16 { p.storeBytes(of: UInt32(0xC0DE_0000 + i), toByteOffset: i * page + 8, as: UInt32.self) }
            for i in 0..<16 { #expect(try peerBytes(memory, i).load(fromByteOffset: 8, as: UInt32.self) == UInt32(0xC0DE_0000 + i)) }
            try peerBytes(memory, 5).storeBytes(of: 0xFEED_BEEF, toByteOffset: 100, as: UInt32.self)
            #expect(p.load(fromByteOffset: 5 * page + 100, as: UInt32.self) == 0xFEED_BEEF)
            try machine.checkInvariants()

            // Unmap half while a lockless walker is inside: the frames wait for it.
            let walker = ParkedWalker(machine)
            try space.unmap(address: a, length: 8 * page)
            if memory.isDetached {
                // Any fork of this process (another suite's fork test) shares every p2pmem mapping with
                // its child, so the frames rightly stay taken until unbind: nothing left to check here.
                walker.leave()
                withKnownIssue("issue 22: a concurrent test forked this process, so the mapping is shared with a child") {
                    Issue.record("mapping detached by a fork elsewhere in the test process")
                }
                try p2p.unbind(timeout: .seconds(5))
                try machine.checkInvariants()
                return
            }
            machine.epoch.collect()
            #expect(p2p.available == total - 16 * page, "8 pages retired, not yet reusable")
            walker.leave()
            machine.epoch.collect()
            #expect(p2p.available == total - 8 * page)
            // The rest of the mapping still works after the partial unmap.
            #expect(p.load(fromByteOffset: 12 * page + 8, as: UInt32.self) == 0xC0DE_000C)
            try machine.checkInvariants()
            try space.unmap(address: a + UInt64(8 * page), length: 8 * page)
            machine.epoch.collect()
            #expect(p2p.available == total)
            #expect(memory.heldPages == 0)
            try p2p.unbind(timeout: .seconds(5))
            try machine.checkInvariants()
        }
    }

    @Test("unbind revokes the mapping: a touch is SIGBUS, a system call EFAULT, and the frames are back",
          arguments: [FaultMode.handlerThread, .inThread])
    func unbindRevokes(mode: FaultMode) throws {
        try withNativeSpace(options: .init(faultMode: mode)) { machine, space, _ in
            let p2p = try makeProvider(machine)
            let events = try machine.events.subscribe()
            let a = try space.mapP2PMemory(p2p, length: 4 * page)
            let p = UnsafeMutableRawPointer(bitPattern: UInt(a))!
            p.storeBytes(of: 0x5A, toByteOffset: page, as: UInt8.self)
            var byte: UInt8 = 0
            var code: Int32 = 0
            #expect(cu_probe_read(p + page, &byte, &code) == 0 && byte == 0x5A)
            var fds: [Int32] = [0, 0]
            #expect(pipe(&fds) == 0)
            defer { close(fds[0]); close(fds[1]) }
            #expect(write(fds[1], p, 64) == 64, "a system call reaches p2pmem before unbind")

            let report = try p2p.unbind(timeout: .seconds(5))
            #expect(report.mappingsRevoked == 1)
            #expect(report.outstandingPages == 0)
            #expect(p2p.isRemoved)
            #expect(cu_probe_read(p + page, &byte, &code) == SIGBUS, "a touch after unbind is SIGBUS")
            #expect(cu_probe_write(p, 1, &code) == SIGBUS, "a store too")
            errno = 0
            #expect(write(fds[1], p, 64) == -1 && errno == EFAULT, "a system call gets EFAULT")
            var revokes: [RevokeEvent] = []
            events.drain { if case .revoke(let r) = $0.event { revokes.append(r) } }
            #expect(revokes.map(\.reason) == [.peerUnbind])
            #expect(revokes.first?.space == space.eventSpaceID && revokes.first?.mappings == 1)
            // The mapping (the VMA) stays until the program unmaps it; then it is plain unmapped memory.
            try space.unmap(address: a, length: 4 * page)
            #expect(space.withMmapReadLockForTests { space.p2pMappings.isEmpty })
            expectNativeError(.noDevice) { _ = try space.mapP2PMemory(p2p, length: page) }
            try machine.checkInvariants()
        }
    }

    @Test("fork shares the mapping; unbind revokes the child's too; the frames stay taken until then",
          .disabled(if: underThreadSanitizer,
                    "a child forked from a multi-threaded process can hang inside the TSan runtime (google/sanitizers#453, #945); the plain suite runs it"))
    func forkShares() throws {
        try withNativeSpace { machine, space, _ in
            let p2p = try makeProvider(machine)
            let total = p2p.available
            let a = try space.mapP2PMemory(p2p, length: 4 * page)
            let p = UnsafeMutableRawPointer(bitPattern: UInt(a))!
            p.storeBytes(of: 0x11, as: UInt8.self)
            var byte: UInt8 = 0
            var code: Int32 = 0
            _ = cu_probe_read(p, &byte, &code)  // installs the probe before fork
            var toChild: [Int32] = [0, 0]
            var toParent: [Int32] = [0, 0]
            #expect(pipe(&toChild) == 0 && pipe(&toParent) == 0)
            let pid = fork()
            if pid == 0 {
                // Async-signal-safe only: probed loads and stores, pipes, _exit.
                var b: UInt8 = 0
                var c: Int32 = 0
                guard cu_probe_read(p, &b, &c) == 0, b == 0x11 else { _exit(41) }
                guard cu_probe_write(p + page, 0x22, &c) == 0 else { _exit(42) }
                var token: UInt8 = 1
                _ = write(toParent[1], &token, 1)
                _ = read(toChild[0], &token, 1)  // the parent has unbound
                _exit(cu_probe_read(p + page, &b, &c) == SIGBUS ? 0 : 43)
            }
            #expect(pid > 0)
            // The parent keeps only its own ends: a child that dies ends the read with 0, never a hang.
            close(toParent[1])
            close(toChild[0])
            var token: UInt8 = 0
            #expect(read(toParent[0], &token, 1) == 1, "the child ran")
            #expect(p.load(fromByteOffset: page, as: UInt8.self) == 0x22, "the parent sees the child's store")
            // The child may still reach the frames: the parent's unmap does not hand them out.
            try space.unmap(address: a, length: 4 * page)
            machine.epoch.collect()
            #expect(p2p.available == total - 4 * page, "frames a child may reach stay taken")
            try machine.checkInvariants()
            let report = try p2p.unbind(timeout: .seconds(5))
            #expect(report.mappingsRevoked == 1)
            _ = write(toChild[1], &token, 1)
            let status = waitChild(pid)
            #expect(status != nil, "the child hung and was killed")
            #expect((status ?? -1) & 0x7f == 0 && ((status ?? -1) >> 8) & 0xff == 0,
                    "the child's touch after unbind must be SIGBUS (status \(status ?? -1))")
            close(toChild[1])
            close(toParent[0])
            try machine.checkInvariants()
        }
    }

    @Test("the seed's flow: pread(O_DIRECT) from a file into p2pmem works before unbind and fails with EFAULT after",
          .enabled(if: directIOUnavailable == nil, "\(directIOUnavailable ?? "")"))
    func directIO() throws {
        try withNativeSpace { machine, space, _ in
            let p2p = try makeProvider(machine)
            var template = Array("/tmp/hmm-p2p-XXXXXX".utf8CString)
            let plain = mkstemp(&template)
            try #require(plain >= 0)
            let path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            defer { unlink(path) }
            let length = 16 * page
            var pattern = [UInt8](repeating: 0, count: length)
            for i in 0..<length { pattern[i] = UInt8(truncatingIfNeeded: i &* 31 &+ i >> 12) }
            #expect(write(plain, pattern, length) == length)
            #expect(fsync(plain) == 0)
            close(plain)
            let fd = cu_open_direct(path, O_RDONLY)
            try #require(fd >= 0, "O_DIRECT open: \(fd)")
            defer { close(fd) }

            let a = try space.mapP2PMemory(p2p, length: length)
            let p = UnsafeMutableRawPointer(bitPattern: UInt(a))!
            #expect(pread(fd, p, length, 0) == length, "errno \(errno)")
            #expect(memcmp(p, pattern, length) == 0, "the file's bytes landed in p2pmem")
            let (memory, _) = try #require(hostMemory(space, a))
            #expect(try peerBytes(memory, 7).load(fromByteOffset: 0, as: UInt8.self) == pattern[7 * page],
                    "and in the provider's frames")
            try p2p.unbind(timeout: .seconds(5))
            errno = 0
            #expect(pread(fd, p, length, 0) == -1 && errno == EFAULT, "after unbind the read gets EFAULT")
            try space.unmap(address: a, length: length)
            try machine.checkInvariants()
        }
    }

    @Test("bad input gets the kernel's errors and takes nothing; a closed space's mapping lives until unbind")
    func badInputAndClose() throws {
        try withNativeSpace { machine, space, _ in
            let p2p = try makeProvider(machine)
            let total = p2p.available
            expectNativeError(.invalidArgument) { _ = try space.mapP2PMemory(p2p, length: 0) }
            expectNativeError(.invalidArgument) { _ = try space.mapP2PMemory(p2p, length: page, flags: [.private]) }
            expectNativeError(.invalidArgument) { _ = try space.mapP2PMemory(p2p, length: page, flags: [.shared, .fixed]) }
            expectNativeError(.invalidArgument) { _ = try space.mapP2PMemory(p2p, length: page, offset: page) }
            expectNativeError(.invalidArgument) {
                _ = try space.mapP2PMemory(p2p, length: page, protection: Protection(rawValue: 8))
            }
            let other = try Machine(.init(systemMemory: 16 << 20))
            let foreign = try makeProvider(other)
            expectNativeError(.invalidArgument) { _ = try space.mapP2PMemory(foreign, length: page) }
            expectNativeError(.outOfMemory) { _ = try space.mapP2PMemory(p2p, length: total + page) }
            #expect(p2p.available == total, "a refused mapping takes nothing")
            try foreign.unbind()

            // Close: the mapping stays usable (a raw munmap is no longer seen), its frames stay taken.
            let a = try space.mapP2PMemory(p2p, length: 2 * page, protection: .read)
            let p = UnsafeMutableRawPointer(bitPattern: UInt(a))!
            var code: Int32 = 0
            #expect(cu_probe_write(p, 1, &code) == SIGSEGV, "PROT_READ is kept")
            try space.close()
            var byte: UInt8 = 0xFF
            #expect(cu_probe_read(p, &byte, &code) == 0 && byte == 0)
            expectNativeError(.noProcess) { _ = try space.mapP2PMemory(p2p, length: page) }
            machine.epoch.collect()
            #expect(p2p.available == total - 2 * page)
            try p2p.unbind(timeout: .seconds(5))
            #expect(cu_probe_read(p, &byte, &code) == SIGBUS)
            munmap(p, 2 * page)
            try machine.checkInvariants()
        }
    }
}

extension NativeSpace {
    /// `body` under `mmapLock` for reading (the guard of ``p2pMappings``).
    fileprivate func withMmapReadLockForTests<R>(_ body: () -> R) -> R {
        mmapLock.withReadLock { body() }
    }
}
