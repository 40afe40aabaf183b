import HMM
import HMMDevices
import HMMNative

/// A failed assertion of a selftest (the kernel's `ASSERT_*`).
public struct SelftestFailure: Error, CustomStringConvertible {
    public let message: String
    public let line: Int
    public var description: String { "line \(line): \(message)" }
}

/// A case that cannot run here (`SKIP()`), with the reason.
public struct SelftestSkip: Error, CustomStringConvertible {
    public let reason: String
    public var description: String { reason }
}

/// The kernel fixtures: `hmm` opens one device, `hmm2` two.
public enum SelftestFixture: String, Sendable {
    case hmm, hmm2
}

/// A fixture variant: which devices the fixture opens.
public enum SelftestVariant: String, CaseIterable, Sendable {
    /// `hmm_device_private` / `hmm2_device_private`: devices 0 (and 1).
    case devicePrivate
    /// `hmm_device_coherent` / `hmm2_device_coherent`: devices 2 (and 3).
    case deviceCoherent

    /// The kernel's variant name for `fixture`.
    public func name(_ fixture: SelftestFixture) -> String {
        fixture.rawValue + (self == .devicePrivate ? "_device_private" : "_device_coherent")
    }
}

/// One ported case of `tools/testing/selftests/mm/hmm-tests.c`.
public struct Selftest: Sendable {
    /// The kernel's name, `fixture.case` (`hmm.anon_read`, `hmm2.snapshot`).
    public let name: String
    public let fixture: SelftestFixture
    /// Why the case is not run yet, if it is not.
    public let pending: String?
    /// Variants in which the case fails upstream too, with the reason (kselftest's `XFAIL`).
    public let knownFailures: [SelftestVariant: String]
    /// Why the case cannot run on the native engine, if it cannot at all (cases that need a simulated-
    /// only facility part way through skip from there, with the reason).
    public let nativeSkip: String?
    /// Variants that fail on the native engine for a known, named reason (a limit of userspace HMM),
    /// reported as `XFAIL` there.
    public let nativeKnownFailures: [SelftestVariant: String]
    /// System RAM of the case's machine: 256 MiB, more for a case that needs it (T38 migrates 256 MiB).
    public let systemMemory: Int
    /// The case forks the test process (T6, T7, T27, T29). Natively that is a real `fork()`, which
    /// runs only in a single-threaded process (`hmm selftests --native`, the helper executable the
    /// test suite starts) and needs ``ForkPolicy/share``.
    public let forks: Bool
    let body: @Sendable (SelftestContext) throws -> Void

    init(name: String, fixture: SelftestFixture, pending: String?, knownFailures: [SelftestVariant: String] = [:],
         nativeSkip: String? = nil, nativeKnownFailures: [SelftestVariant: String] = [:], systemMemory: Int = 256 << 20,
         forks: Bool = false, body: @escaping @Sendable (SelftestContext) throws -> Void) {
        self.name = name
        self.fixture = fixture
        self.pending = pending
        self.knownFailures = knownFailures
        self.nativeSkip = nativeSkip
        self.nativeKnownFailures = nativeKnownFailures
        self.systemMemory = systemMemory
        self.forks = forks
        self.body = body
    }
}

/// The outcome of one case in one variant.
public enum SelftestOutcome: Sendable, Equatable {
    case passed
    case skipped(String)
    case failed(String)
    /// Failed as the case fails upstream too (kselftest `XFAIL`): the known reason, then what failed.
    case expectedFailure(String)
}

/// The engine a case runs on.
public enum SelftestEngine: String, CaseIterable, Sendable {
    /// The simulated machine: the process is an ``AddressSpace``.
    case simulated
    /// This process's real memory through ``NativeSpace`` (userfaultfd).
    case native
}

/// What a case runs against: a fresh machine with the four mirror devices, the test "process" (an
/// address space, simulated or this process's own memory) and the fixture's open device files.
public final class SelftestContext {
    public let machine: Machine
    public let devices: MirrorDeviceSet
    public let variant: SelftestVariant
    public let engine: SelftestEngine
    /// The process under test.
    public let process: any SelftestProcess
    /// The native space, when the case runs natively (closed after the case).
    let nativeSpace: NativeSpace?
    /// The fixture's first (or only) device file.
    public let fd0: MirrorFile
    /// The `hmm2` fixture's second device file.
    public let fd1: MirrorFile?
    public var fd: MirrorFile { fd0 }
    /// Page size.
    public let page = PageSize.base
    /// `HMM_BUFFER_SIZE`: 4 MiB.
    public let bufferSize = 4 << 20

    /// A fresh machine with the four devices, the process, and the fixture's files. Natively the space
    /// has `forkPolicy`; a policy the process may not have (``ForkPolicy/share`` without
    /// `CAP_SYS_PTRACE`) skips the case.
    convenience init(variant: SelftestVariant, fixture: SelftestFixture, systemMemory: Int = 256 << 20,
                     engine: SelftestEngine = .simulated, forkPolicy: ForkPolicy = .deny) throws {
        let machine = try Machine(.init(systemMemory: systemMemory, hugetlbPages: engine == .simulated ? 2 : 0))
        // `DEVMEM_CHUNK_SIZE`: a coherent device has this one chunk and no other.
        let devices = try MirrorDeviceSet(machine: machine, chunkSize: 256 << 20)
        let process: any SelftestProcess
        var nativeSpace: NativeSpace?
        switch engine {
        case .simulated:
            process = try machine.makeAddressSpace()
        case .native:
            let space = try Self.nativeSpace(machine, forkPolicy)
            process = NativeSelftestProcess(space: space)
            nativeSpace = space
        }
        let first = variant == .devicePrivate ? 0 : 2
        let fd0: MirrorFile, fd1: MirrorFile?
        do {
            fd0 = try devices.device(first).open(process.mirrored)
            fd1 = fixture == .hmm2 ? try devices.device(first + 1).open(process.mirrored) : nil
        } catch {
            try? nativeSpace?.close()
            throw error
        }
        self.init(machine: machine, devices: devices, variant: variant, engine: engine, process: process,
                  nativeSpace: nativeSpace, fd0: fd0, fd1: fd1)
    }

    /// A native space with `forkPolicy`; the case skips where the process may not have it.
    private static func nativeSpace(_ machine: Machine, _ forkPolicy: ForkPolicy) throws -> NativeSpace {
        var options = NativeSpace.Options()
        options.forkPolicy = forkPolicy
        do {
            return try NativeSpace(machine: machine, options: options)
        } catch {
            guard error.code == .permission, forkPolicy == .share else { throw error }
            throw SelftestSkip(reason: "native engine: a forked child inherits device pages only with UFFD_FEATURE_EVENT_FORK, which needs CAP_SYS_PTRACE: \(error)")
        }
    }

    init(machine: Machine, devices: MirrorDeviceSet, variant: SelftestVariant, engine: SelftestEngine,
         process: any SelftestProcess, nativeSpace: NativeSpace?, fd0: MirrorFile, fd1: MirrorFile?) {
        self.machine = machine
        self.devices = devices
        self.variant = variant
        self.engine = engine
        self.process = process
        self.nativeSpace = nativeSpace
        self.fd0 = fd0
        self.fd1 = fd1
    }

    var coherent: Bool { variant == .deviceCoherent }

    /// After a case ended early: its files and (natively) its space are closed.
    func closeQuietly() {
        fd0.close()
        fd1?.close()
        (process as? NativeSelftestProcess)?.tearDown()
        try? nativeSpace?.close()
    }

    /// The simulated address space, for what only the simulated engine models (`fork` of the test
    /// process, `/proc/self/pagemap` entries, `get_user_pages`); natively the case skips with `why`.
    func simulated(_ why: String) throws -> AddressSpace {
        guard let space = process as? AddressSpace else { throw SelftestSkip(reason: "native engine: \(why)") }
        return space
    }

    // MARK: assertions

    func expect(_ ok: Bool, _ message: @autoclosure () -> String, line: Int = #line) throws {
        if !ok { throw SelftestFailure(message: message(), line: line) }
    }

    func expectEqual<T: Equatable>(_ a: T, _ b: T, _ what: String, line: Int = #line) throws {
        if a != b { throw SelftestFailure(message: "\(what): \(a) != \(b)", line: line) }
    }

    // MARK: the kernel helpers

    /// A test buffer (`struct hmm_buffer`): the mapping and the device-side mirror.
    final class Buffer {
        var ptr: UInt64
        let size: Int
        var mirror: [UInt8]
        var cpages = 0
        var faults = 0
        init(ptr: UInt64, size: Int, mirror: Int? = nil) {
            self.ptr = ptr
            self.size = size
            self.mirror = [UInt8](repeating: 0, count: mirror ?? size)
        }
    }

    enum Command { case read, write, migrateToDevice, migrateToSystem, snapshot, exclusive, checkExclusive, release, flags }

    /// `hmm_dmirror_cmd`: 0 or `-errno`; `cpages`/`faults` updated on success only.
    func cmd(_ file: MirrorFile, _ c: Command, _ b: Buffer, _ npages: Int) -> Int32 {
        do {
            let r: MirrorResult
            switch c {
            case .read: r = try file.read(b.ptr, pages: npages, into: &b.mirror)
            case .write: r = try file.write(b.ptr, pages: npages, from: b.mirror)
            case .migrateToDevice: r = try file.migrateToDevice(b.ptr, pages: npages, into: &b.mirror)
            case .migrateToSystem: r = try file.migrateToSystem(b.ptr, pages: npages)
            case .snapshot: r = try file.snapshot(b.ptr, pages: npages, into: &b.mirror)
            case .exclusive: r = try file.makeExclusive(b.ptr, pages: npages, into: &b.mirror)
            case .checkExclusive:
                try file.checkExclusive(b.ptr, pages: npages)
                r = MirrorResult()
            case .release:
                try file.checkCommand(b.ptr, pages: npages)
                try file.release()
                r = MirrorResult()
            case .flags:
                try file.checkCommand(b.ptr, pages: npages)
                try file.setFlags(MirrorFlags(rawValue: UInt64(npages)))
                r = MirrorResult()
            }
            b.cpages = r.cpages
            b.faults = r.faults
            return 0
        } catch {
            return -error.errno
        }
    }

    /// Runs a command expecting success with `cpages` (and, if given, `faults`) — the three `ASSERT_EQ`s
    /// that follow almost every command in the kernel file.
    func expectSuccess(
        _ file: MirrorFile, _ c: Command, _ b: Buffer, _ npages: Int, cpages: Int? = nil, faults: Int? = nil,
        line: Int = #line
    ) throws {
        try expectEqual(cmd(file, c, b, npages), 0, "\(c)", line: line)
        try expectEqual(b.cpages, cpages ?? npages, "\(c) cpages", line: line)
        if let faults { try expectEqual(b.faults, faults, "\(c) faults", line: line) }
    }

    func map(_ size: Int, _ prot: Protection, _ flags: MapFlags = [.private, .anonymous], file: MemoryFile? = nil) throws -> UInt64 {
        try process.map(length: size, protection: prot, flags: flags, file: file)
    }

    /// `THP setup`: the PMD-aligned window inside a mapping of twice the size, with the advice.
    func thpWindow(_ ptr: UInt64, huge: Bool) throws -> UInt64 {
        let pmd = UInt64(PageSize.pmd)
        let w = (ptr + pmd - 1) & ~(pmd - 1)
        try process.advise(w, length: PageSize.pmd, huge ? .hugePage : .noHugePage)
        return w
    }

    /// Stores `value(i)` in every `Int32` of `[ptr, ptr + size)`.
    func fill(_ ptr: UInt64, _ size: Int, in s: (any SelftestProcess)? = nil, from first: Int = 0, _ value: (Int) -> Int32) throws {
        let n = size / 4
        var ints = [Int32](repeating: 0, count: n - first)
        for i in first..<n { ints[i - first] = value(i) }
        try ints.withUnsafeBytes { b in try (s ?? process).write(b, at: ptr + UInt64(first * 4)) }
    }

    /// The `Int32`s of `[ptr, ptr + size)` as the CPU sees them.
    func ints(_ ptr: UInt64, _ size: Int, in s: (any SelftestProcess)? = nil) throws -> [Int32] {
        var out = [Int32](repeating: 0, count: size / 4)
        try out.withUnsafeMutableBytes { b in try (s ?? process).read(into: b, at: ptr) }
        return out
    }

    func mirrorInts(_ b: Buffer) -> [Int32] {
        b.mirror.withUnsafeBytes { Array($0.bindMemory(to: Int32.self)) }
    }

    func setMirror(_ b: Buffer, _ value: (Int) -> Int32) {
        b.mirror.withUnsafeMutableBytes { raw in
            let p = raw.bindMemory(to: Int32.self)
            for i in p.indices { p[i] = value(i) }
        }
    }

    /// Asserts `ints[i] == value(i)` for every i, reporting the first mismatch.
    func expectPattern(_ ints: [Int32], _ what: String, line: Int = #line, _ value: (Int) -> Int32) throws {
        for (i, v) in ints.enumerated() where v != value(i) {
            throw SelftestFailure(message: "\(what)[\(i)] = \(v), expected \(value(i))", line: line)
        }
    }
}

/// Runs the port.
public enum Selftests {
    /// Every case, in the kernel file's order.
    public static var all: [Selftest] { SelftestCatalogue.cases }

    /// Runs `test` in `variant` on a fresh machine and checks the machine's invariants afterwards. A
    /// failure the case lists as known for `variant` is an ``SelftestOutcome/expectedFailure(_:)``; a
    /// pass where a failure was expected is a failure (the list is out of date).
    public static func run(_ test: Selftest, _ variant: SelftestVariant, engine: SelftestEngine = .simulated) -> SelftestOutcome {
        let outcome = runBody(test, variant, engine)
        guard let known = (engine == .native ? test.nativeKnownFailures[variant] : nil) ?? test.knownFailures[variant]
        else { return outcome }
        switch outcome {
        case .failed(let message): return .expectedFailure("\(known) — \(message)")
        case .passed: return .failed("expected to fail (\(known)) but passed")
        default: return outcome
        }
    }

    /// The kselftest harness's name of a case in a variant: `fixture.variant.case`
    /// (`hmm.hmm_device_private.anon_read`).
    public static func harnessName(_ test: Selftest, _ variant: SelftestVariant) -> String {
        let caseName = test.name.dropFirst(test.fixture.rawValue.count + 1)
        return "\(test.fixture.rawValue).\(variant.name(test.fixture)).\(caseName)"
    }

    /// The TAP 13 lines for one result, as the kselftest harness prints them: `ok N name`, a skip as
    /// `ok N name # SKIP reason` and an expected failure as `ok N name # XFAIL reason` (the directive
    /// after ` # ` is what TAP parsers count), a failure as a `# message` diagnostic then `not ok N name`.
    /// Each line ends with a newline.
    public static func tapLines(number: Int, _ test: Selftest, _ variant: SelftestVariant,
                                _ outcome: SelftestOutcome) -> String {
        let name = harnessName(test, variant)
        func oneLine(_ s: String) -> String { String(s.map { $0 == "\n" || $0 == "#" ? " " : $0 }) }
        switch outcome {
        case .passed: return "ok \(number) \(name)\n"
        case .skipped(let reason): return "ok \(number) \(name) # SKIP \(oneLine(reason))\n"
        case .expectedFailure(let reason): return "ok \(number) \(name) # XFAIL \(oneLine(reason))\n"
        case .failed(let message): return "# \(oneLine(message))\nnot ok \(number) \(name)\n"
        }
    }

    private static func runBody(_ test: Selftest, _ variant: SelftestVariant, _ engine: SelftestEngine) -> SelftestOutcome {
        if let pending = test.pending { return .skipped(pending) }
        if engine == .native, let reason = test.nativeSkip { return .skipped("native engine: \(reason)") }
        if engine == .native, test.forks, let threads = Selftests.otherThreads() {
            return .skipped("native engine: this case forks the test process, and a child forked from a multi-threaded process "
                + "(\(threads) other threads here) may run only async-signal-safe code; it runs in the single-threaded `hmm selftests --native`")
        }
        var context: SelftestContext?
        do {
            let ctx = try SelftestContext(variant: variant, fixture: test.fixture, systemMemory: test.systemMemory, engine: engine,
                                          forkPolicy: test.forks ? .share : .deny)
            context = ctx
            try test.body(ctx)
            ctx.fd0.close()
            ctx.fd1?.close()
            // Natively the case's memory is given back and the space closed (every device page home)
            // before the invariants are checked.
            (ctx.process as? NativeSelftestProcess)?.tearDown()
            try ctx.nativeSpace?.close()
            try ctx.machine.checkInvariants()
            return .passed
        } catch let skip as SelftestSkip {
            context?.closeQuietly()
            return .skipped(skip.reason)
        } catch {
            context?.closeQuietly()
            return .failed("\(error)")
        }
    }
}

/// A value handed to a ``HostThread`` that the compiler cannot prove `Sendable`: the selftest's
/// context and buffers, which the thread uses only through thread-safe calls (address-space accesses)
/// while the starting thread waits in `join`.
struct Unchecked<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}
