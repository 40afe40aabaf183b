import HMM
import HMMDevices
import HMMNative
#if canImport(Glibc)
import Glibc
#endif

/// A child of the test process, as the kernel's bodies `fork()` one (T6, T7, T27, T29).
///
/// On the simulated engine the child is a forked ``AddressSpace`` of the same machine whose code runs
/// on a thread of its own, so parent and child run at once as the two processes do. On the native
/// engine it is a real child process: `fork()` of this process with the space's policy
/// ``ForkPolicy/share``, so the child inherits every page as it was — device-resident ones copied in
/// before `fork` returns — and runs its part on a fresh machine, space and device files of its own
/// (the parent's belong to the parent), then `_exit`s with its verdict.
final class SelftestChild {
    private enum Body {
        case simulated(space: AddressSpace, context: SelftestContext, thread: HostThread, failure: Locked<(any Error)?>)
        case native(pid: pid_t, report: Int32)
    }

    private let body: Body
    private var reaped = false

    private init(_ body: Body) { self.body = body }

    /// Waits for the child to finish its part and exit (`waitpid`, `WIFEXITED`, exit status 0); throws
    /// the child's own failure, or its skip.
    func wait() throws {
        precondition(!reaped, "the child was already waited for")
        reaped = true
        switch body {
        case .simulated(let space, let context, let thread, let failure):
            thread.join()
            context.fd0.close()
            space.exit()
            if let error = failure.withLock({ $0 }) { throw error }
        case .native(let pid, let report):
            let status = Self.reap(pid)
            let message = Self.drain(report)
            _ = Glibc.close(report)
            guard let status else { throw SelftestFailure(message: "the child \(pid) hung and was killed", line: #line) }
            let signalled = status & 0x7f
            if signalled != 0 { throw SelftestFailure(message: "the child died of signal \(signalled)", line: #line) }
            switch (status >> 8) & 0xff {
            case 0: return
            case SelftestChild.skipStatus: throw SelftestSkip(reason: message)
            default: throw SelftestFailure(message: "child: \(message)", line: #line)
            }
        }
    }

    /// `kill(child, SIGKILL)`, then `waitpid`: the child must die of that signal (T29's four checks).
    func kill(_ t: SelftestContext) throws {
        precondition(!reaped, "the child was already waited for")
        reaped = true
        switch body {
        case .simulated(let space, let context, let thread, _):
            thread.join()
            context.fd0.close()
            space.exit()
        case .native(let pid, let report):
            defer { _ = Glibc.close(report) }
            try t.expectEqual(Glibc.kill(pid, SIGKILL), 0, "kill(child, SIGKILL)")
            var status: Int32 = 0
            try t.expectEqual(waitpid(pid, &status, 0), pid, "waitpid")
            try t.expect(status & 0x7f != 0 && status & 0x7f != 0x7f, "WIFSIGNALED (status \(status))")
            try t.expectEqual(status & 0x7f, SIGKILL, "WTERMSIG")
        }
    }

    // MARK: native

    /// The exit status of a child that skipped its part.
    static let skipStatus: Int32 = 77

    /// Waits for `pid` for at most 60 s; a child that hangs is killed. Nil then.
    private static func reap(_ pid: pid_t) -> Int32? {
        var status: Int32 = 0
        for _ in 0..<60_000 {
            if waitpid(pid, &status, WNOHANG) == pid { return status }
            usleep(1000)
        }
        _ = Glibc.kill(pid, SIGKILL)
        _ = waitpid(pid, &status, 0)
        return nil
    }

    /// Everything the child wrote on its report pipe.
    private static func drain(_ fd: Int32) -> String {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// `fork()` natively. The child waits until the parent's `fork` has returned — by then the space's
    /// service thread has copied the child's device-resident pages in and closed the child's
    /// userfaultfd, so the inherited memory is the child's own plain memory — then runs `body` on a
    /// fresh context and `_exit`s: 0, ``skipStatus`` or 1, with the reason on the report pipe. With
    /// `untilKilled` it then waits to be killed instead.
    fileprivate static func forkNative(_ t: SelftestContext, untilKilled: Bool,
                                       _ body: (SelftestContext) throws -> Void) throws -> SelftestChild {
        var go: [Int32] = [0, 0]
        var report: [Int32] = [0, 0]
        guard pipe(&go) == 0 else { throw HMMError(.outOfMemory, "pipe: errno \(errno)") }
        guard pipe(&report) == 0 else {
            _ = Glibc.close(go[0]); _ = Glibc.close(go[1])
            throw HMMError(.outOfMemory, "pipe: errno \(errno)")
        }
        let pid = Glibc.fork()
        if pid == 0 {
            _ = Glibc.close(go[1]); _ = Glibc.close(report[0])
            var byte: UInt8 = 0
            _ = Glibc.read(go[0], &byte, 1)
            let status = runChild(t, report[1], body)
            if untilKilled { while true { pause() } }
            _exit(status)
        }
        _ = Glibc.close(go[0]); _ = Glibc.close(report[1])
        defer { _ = Glibc.close(go[1]) }
        guard pid > 0 else {
            _ = Glibc.close(report[0])
            throw HMMError(.outOfMemory, "fork: errno \(errno)")
        }
        var byte: UInt8 = 1
        _ = Glibc.write(go[1], &byte, 1)
        return SelftestChild(.native(pid: pid, report: report[0]))
    }

    /// The child's part on a machine, space and device files of its own (device 0's file is `fd`, as
    /// the kernel's children open `/dev/hmm_dmirror0`): its exit status.
    private static func runChild(_ t: SelftestContext, _ report: Int32, _ body: (SelftestContext) throws -> Void) -> Int32 {
        func say(_ s: String) { _ = Array(s.utf8).withUnsafeBytes { Glibc.write(report, $0.baseAddress, $0.count) } }
        do {
            let c = try SelftestContext(variant: .devicePrivate, fixture: .hmm, engine: .native)
            defer { c.closeQuietly() }
            try body(c)
            return 0
        } catch let skip as SelftestSkip {
            say(skip.reason)
            return skipStatus
        } catch {
            say("\(error)")
            return 1
        }
    }

    // MARK: simulated

    fileprivate static func forkSimulated(_ t: SelftestContext,
                                          _ body: @escaping (SelftestContext) throws -> Void) throws -> SelftestChild {
        // The engine is the simulated one, so the process is an address space.
        let space = try (t.process as! AddressSpace).fork()
        let context = SelftestContext(machine: t.machine, devices: t.devices, variant: t.variant, engine: .simulated,
                                      process: space, nativeSpace: nil,
                                      fd0: try t.devices.device(0).open(space), fd1: nil)
        let failure = Locked<(any Error)?>(nil)
        let run = Unchecked({ () -> Void in
            do { try body(context) } catch { failure.withLock { $0 = error } }
        })
        let thread = HostThread { run.value() }
        return SelftestChild(.simulated(space: space, context: context, thread: thread, failure: failure))
    }
}

extension SelftestContext {
    /// `fork()`: runs `body` as the child's part, on a context whose process is the child and whose
    /// `fd` is the child's file of device 0 (see ``SelftestChild``); returns to the parent at once.
    /// With `untilKilled` a native child then waits for ``SelftestChild/kill(_:)`` (the kernel's
    /// child busy-loops); a simulated child's space lives until then.
    func fork(untilKilled: Bool = false, _ body: @escaping (SelftestContext) throws -> Void) throws -> SelftestChild {
        switch engine {
        case .simulated: return try SelftestChild.forkSimulated(self, body)
        case .native: return try SelftestChild.forkNative(self, untilKilled: untilKilled, body)
        }
    }

    /// Natively, takes memory this process inherited into its own space (``NativeSpace/adopt(address:length:)``),
    /// so its device files reach it; the simulated child's space already has it.
    func adopt(_ ptr: UInt64, _ size: Int) throws {
        _ = try nativeSpace?.adopt(address: ptr, length: size)
    }
}

extension Selftests {
    /// How many threads besides the calling one the process has (`/proc/self/status`), or nil if none:
    /// a real `fork()` whose child runs more than async-signal-safe code needs nil.
    static func otherThreads() -> Int? {
        guard let f = fopen("/proc/self/status", "r") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, 256, f) != nil {
            let s = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if s.hasPrefix("Threads:"), let n = Int(String(s.dropFirst(8).filter(\.isNumber))) {
                return n > 1 ? n - 1 : nil
            }
        }
        return nil
    }
}
