import CUserfaultfd
import Logging
import HMM
@_spi(Engine) import HMM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The native engine: HMM semantics on the host process's own memory, through userfaultfd
/// (<doc:ManagingRealMemory>). A runtime allocates ``NativeRegion``s, gets ordinary
/// pointers, and a driver written against the driver API (`MirroredAddressSpace`, `MigrateVMA`,
/// `IntervalNotifier`, `HMMRange`) — `MirrorDevice` unchanged — migrates their pages to its device
/// memory; a plain load, store or system call touching such a page faults and migrates it back.
///
/// Truth: the host page tables for CPU-resident pages; one `PageState` word per page for the rest.
/// Device memory stays the machine's `Pagemap`s, and the machine's RAM arena is the staging pool:
/// a page leaves the process by `UFFDIO_MOVE` into a free RAM frame (the migration entry's analog — a
/// concurrent touch faults and waits), so drivers copy frame to frame exactly as on the simulated
/// engine.
///
/// Threads: a service thread reads the userfaultfd and waits for nothing but installs of bytes in flight
/// (every `munmap`, `MADV_DONTNEED` and `mremap` of a region waits until it has read the event); a fault thread
/// (or, in-thread, the faulting thread itself) resolves CPU faults (zero fill, fault-back through the driver's
/// `PagemapOperations.migrateToRAM(_:)`, exclusive restore); an event thread turns unmap, remove and
/// remap events into notifier invalidations and frees device pages. Migrations a driver asks for run
/// in the caller's thread, as `migrate_vma` runs in a driver's ioctl.
///
/// Locking, in order: `mmapLock` (drivers hold it for reading around their phases; region changes take
/// it for writing) → `faultGate` (held for reading around each fault resolution and eviction; a `fork`
/// takes both for writing, `ForkRegistry`) → `remapGate` (around each remapping of a region address;
/// ``unmap(address:length:)`` takes all three for writing) → page-state lock bits (ascending page order) → folio
/// locks → driver notifier locks; the region list, the registries and the message queues are leaves.
/// The fault thread and the event thread take no `mmapLock`: a driver thread holding it for reading
/// may be waiting on a fault they must resolve. In-thread fault mode (``FaultMode/inThread``) runs the
/// fault thread's work in the faulting thread, which may hold `mmapLock` for reading (a driver).
/// Waits on the event thread: ``withMmapReadLock(_:)`` first handles the events read so far (a
/// driver then sees a completed `mremap`), so no thread may call it while holding a lock an
/// invalidation needs (a driver's notifier lock); a fault on a host hole never waits for events, so a
/// driver may copy from a page's host window under its notifier lock. Replacing a coherent page's
/// mapping (`mapCoherent(_:at:frame:pages:)`, `replaceWithHole(_:at:pages:)`) waits until the
/// service thread has read the UNMAP it raises: never inside an install, never on the service thread.
///
/// Lifetime: call ``close()``. It evicts every device page first — a userfaultfd closed while pages
/// are away would turn them into zeros — and only then stops the threads; until then the threads
/// keep the space alive.
public final class NativeSpace: MirroredAddressSpace, @unchecked Sendable, CustomStringConvertible {
    /// How a space is set up.
    public struct Options: Sendable {
        /// Pages a CPU fault-back migrates around the faulting page (aligned window, within the region):
        /// each fault costs a userfaultfd round trip, so neighbours come along. 1 disables fault-around.
        /// Compound (2 MiB) device pages always come back whole. Default 16 (64 KiB).
        public var faultAroundPages = 16
        /// Open the userfaultfd with `UFFD_USER_MODE_ONLY`: required without `CAP_SYS_PTRACE` when
        /// `vm.unprivileged_userfaultfd` is 0; kernel accesses (`read(2)` into a device-resident page)
        /// then fail with `EFAULT` instead of faulting the page back. Nil: only if the privileged open is
        /// refused.
        public var userModeOnly: Bool? = nil
        /// What a child created by `fork` gets of the regions (``ForkPolicy``). Default `.deny`.
        public var forkPolicy = ForkPolicy.deny
        /// Which thread resolves CPU faults (``FaultMode``). Default `.handlerThread`.
        public var faultMode = FaultMode.handlerThread
        /// Where cold-path diagnostics go (swift-log): capability probes, setup failures, and at close
        /// a summary of pages lost or stranded. Never written per fault.
        public var logger = Logger(label: "swift-hmm.native")
        public init() {}
    }

    public let machine: Machine
    public let options: Options
    private let faultAround: Atomic<Int>
    /// Whether the userfaultfd is user-mode-only (see ``Options/userModeOnly``).
    public let isUserModeOnly: Bool
    /// Counters of what the engine did.
    public let statistics = NativeStatistics()

    /// The regions' userfaultfd: `MISSING` registrations and the unmap / remove / remap events.
    let uffd: Int32
    /// The staging pool's userfaultfd: the machine's RAM arena registered write-protect-only with no
    /// events, so it can be a `UFFDIO_MOVE` destination and dropping its frames waits for nobody.
    let stagingUffd: Int32
    /// `/proc/self/pagemap`, for `PAGEMAP_SCAN`.
    let pagemapFD: Int32
    /// Wakes the service thread at close.
    let wakeFD: Int32

    /// `mmap_lock`: see the type's locking notes.
    let mmapLock = ReadWriteLock()
    /// Held for reading around every CPU fault resolution and eviction, and for writing by a `fork`
    /// under ``ForkPolicy/share`` (``ForkRegistry``): nothing then changes a page's word.
    let faultGate = ReadWriteLock()
    /// Held for reading around each remapping of a region address (a coherent frame mapped in place, a
    /// hole put back: ``mapCoherent(_:at:frame:pages:)``, ``replaceWithHole(_:at:pages:)``) — from any
    /// thread, the event thread's included — and for writing by ``unmap(address:length:)`` around the
    /// host's `munmap`, so no remapping's question to the host and its call straddle a program's
    /// unmap. Taken after `mmapLock` and `faultGate`; nothing waits for another thread while holding it
    /// for reading but the service thread's read of the remapping's own event.
    let remapGate = ReadWriteLock()
    /// Whether the `fork` in progress holds `mmapLock` and `faultGate` (``ForkRegistry``).
    let forkHeld = Atomic<Bool>(false)
    /// Set in a forked child: this copy of the space has no threads.
    let forkedAway = Atomic<Bool>(false)
    let subscriptions: NotifierSubscriptions
    private let regionList = Locked<[NativeRegion]>([])
    private let closedFlag = Atomic<Bool>(false)
    private let closeLock = Locked(())
    let faults = MessageQueue()
    let events = MessageQueue()
    let stopping = Atomic<Bool>(false)
    /// Odd while the service thread is between a `read` and marking the zapped pages of what it read.
    let readSequence = Atomic<UInt64>(0)
    /// Installs of bytes into region pages in flight (``installFrame(_:at:pages:move:unlessZapped:)``).
    let installing = Atomic<Int>(0)
    /// The UNMAP events the engine's own remappings raise (device-coherent pages in place).
    let selfUnmaps = SelfUnmaps()
    /// P2PDMA memory mapped into the process (``mapP2PMemory(_:length:protection:flags:offset:)``).
    /// Guarded by `mmapLock`.
    var p2pMappings: [P2PMappingRecord] = []
    /// Host mappings outside the regions that devices walked (``foreignMapping(containing:)``).
    let foreignWindows = Locked<[ForeignWindow]>([])
    private var threads: [HostThread] = []
    /// The callbacks of the regions' host windows (never called for a window's frames).
    let windowOperations = HostWindowOperations()
    /// 64 KiB of zeros: the source of zero-filling copies.
    let zeros: UnsafeMutableRawPointer
    /// The service thread's read buffer (64 messages), allocated here: that thread allocates nothing.
    let messageBuffer: UnsafeMutablePointer<cu_message>
    /// Set once the service thread runs its loop; ``init(machine:options:)`` returns only then, so no
    /// `fork` can catch it still starting (allocating) while its FORK event waits to be read.
    let serviceReady = Atomic<Bool>(false)

    private static let machinesInUse = Locked<Set<ObjectIdentifier>>([])

    /// Opens the userfaultfd, registers the machine's RAM arena as the staging pool and starts the
    /// service, fault and event threads.
    /// - Throws: `.unsupported` naming what the kernel lacks (userfaultfd, `UFFDIO_MOVE`,
    ///   `UFFDIO_POISON`, `PAGEMAP_SCAN`, the unmap/remove/remap events) or for fork policy `.share`
    ///   with ``FaultMode/inThread`` (a forked child could not resolve its faults); `.permission` when the process
    ///   may not open a userfaultfd at all, or a fork policy of `.share` without `CAP_SYS_PTRACE`;
    ///   `.busy` if the machine already has a native space (its RAM arena can be one userfaultfd's
    ///   staging pool only).
    public init(machine: Machine, options: Options = .init()) throws(HMMError) {
        guard options.faultAroundPages >= 1, options.faultAroundPages <= PageSize.pagesPerPMD,
            options.faultAroundPages & (options.faultAroundPages - 1) == 0
        else { throw HMMError(.invalidArgument, "fault-around of \(options.faultAroundPages) pages: a power of two up to 512") }
        let id = ObjectIdentifier(machine)
        try Self.machinesInUse.withLock { (s: inout Set<ObjectIdentifier>) throws(HMMError) in
            guard !s.contains(id) else { throw HMMError(.busy, "the machine already has a native space") }
            s.insert(id)
        }
        var cleanup: [() -> Void] = [{ _ = Self.machinesInUse.withLock { $0.remove(id) } }]
        func fail(_ e: HMMError) -> HMMError {
            for c in cleanup.reversed() { c() }
            options.logger.info("native space not created", metadata: ["error": "\(e)"])
            return e
        }
        self.machine = machine
        subscriptions = NotifierSubscriptions(machine: machine)
        self.options = options
        faultAround = Atomic(options.faultAroundPages)

        let required = UInt64(CU_FEATURE_EVENT_UNMAP | CU_FEATURE_EVENT_REMOVE | CU_FEATURE_EVENT_REMAP
                                  | CU_FEATURE_MOVE | CU_FEATURE_POISON)
        var userModeOnly = options.userModeOnly ?? false
        var supported: UInt64 = 0
        var rc = cu_uffd_probe(userModeOnly ? 1 : 0, &supported)
        if rc == -EPERM && options.userModeOnly == nil {
            userModeOnly = true
            rc = cu_uffd_probe(1, &supported)
        }
        if rc == -ENOSYS { throw fail(HMMError(.unsupported, "the kernel has no userfaultfd (CONFIG_USERFAULTFD)")) }
        if rc == -EPERM {
            throw fail(HMMError(.permission, "userfaultfd refused: needs CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1 or UFFD_USER_MODE_ONLY"))
        }
        guard rc == 0 else { throw fail(.system(rc, "userfaultfd")) }
        let missing = [(CU_FEATURE_MOVE, "UFFDIO_MOVE (Linux 6.8)"), (CU_FEATURE_POISON, "UFFDIO_POISON (Linux 6.6)"),
                       (CU_FEATURE_EVENT_UNMAP, "UFFD_FEATURE_EVENT_UNMAP"), (CU_FEATURE_EVENT_REMOVE, "UFFD_FEATURE_EVENT_REMOVE"),
                       (CU_FEATURE_EVENT_REMAP, "UFFD_FEATURE_EVENT_REMAP")]
            .filter { supported & UInt64($0.0) == 0 }.map(\.1)
        guard missing.isEmpty else {
            throw fail(HMMError(.unsupported, "the kernel lacks \(missing.joined(separator: ", ")), which the native engine needs"))
        }
        isUserModeOnly = userModeOnly
        options.logger.debug("userfaultfd probed", metadata: [
            "features": "0x\(String(supported, radix: 16))", "userModeOnly": "\(userModeOnly)",
            "faultMode": "\(options.faultMode)", "forkPolicy": "\(options.forkPolicy)"])
        // A child forked under `.share` inherits the userfaultfd with its SIGBUS feature but no fault
        // hook and no engine: its first touch of a hole would kill it. Refused, not half-supported.
        guard !(options.forkPolicy == .share && options.faultMode == .inThread) else {
            throw fail(HMMError(.unsupported, "fork policy .share with in-thread faults: a forked child inherits UFFD_FEATURE_SIGBUS and would die of SIGBUS on its first touch of a hole; use the handler thread"))
        }
        let forkFeature = options.forkPolicy == .share ? UInt64(CU_FEATURE_EVENT_FORK) : 0
        let sigbusFeature = options.faultMode == .inThread ? UInt64(CU_FEATURE_SIGBUS) : 0
        guard sigbusFeature == 0 || supported & sigbusFeature != 0 else {
            throw fail(HMMError(.unsupported, "the kernel lacks UFFD_FEATURE_SIGBUS, which in-thread fault mode needs"))
        }
        uffd = cu_uffd_open(required | forkFeature | sigbusFeature | UInt64(CU_FEATURE_THREAD_ID), userModeOnly ? 1 : 0, nil)
        if uffd == -EPERM && forkFeature != 0 {
            throw fail(HMMError(.permission, "fork policy .share needs UFFD_FEATURE_EVENT_FORK, which needs CAP_SYS_PTRACE"))
        }
        guard uffd >= 0 else { throw fail(.system(uffd, "userfaultfd (regions)")) }
        let regionsFD = uffd
        cleanup.append { _ = cu_close(regionsFD) }
        stagingUffd = cu_uffd_open(UInt64(CU_FEATURE_MOVE), userModeOnly ? 1 : 0, nil)
        guard stagingUffd >= 0 else { throw fail(.system(stagingUffd, "userfaultfd (staging)")) }
        let stagingFD = stagingUffd
        cleanup.append { _ = cu_close(stagingFD) }
        let ram = UInt64(UInt(bitPattern: machine.ramBase))
        let ramBytes = UInt64(machine.totalFrames) << UInt64(PageSize.shift)
        rc = Sys.register(stagingUffd, ram, ramBytes, missing: false)
        guard rc == 0 else { throw fail(.system(rc, "registering the RAM arena as the staging pool")) }
        // A forked child must not share the staging pool (and MOVE refuses pages shared after fork).
        _ = Sys.madvise(ram, ramBytes, Sys.dontFork)
        pagemapFD = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        guard pagemapFD >= 0 else { throw fail(HMMError(.unsupported, "cannot open /proc/self/pagemap")) }
        let pmFD = pagemapFD
        cleanup.append { _ = cu_close(pmFD) }
        var probe = cu_page_region()
        var walkEnd: UInt64 = 0
        rc = cu_pagemap_scan(pagemapFD, ram, ram + UInt64(PageSize.base), &probe, 1, UInt64(CU_PAGE_IS_PRESENT), &walkEnd)
        guard rc >= 0 else { throw fail(HMMError(.unsupported, "the kernel lacks PAGEMAP_SCAN (Linux 6.7)")) }
        wakeFD = cu_eventfd()
        guard wakeFD >= 0 else { throw fail(.system(wakeFD, "eventfd")) }
        zeros = .allocate(byteCount: 16 * PageSize.base, alignment: PageSize.base)
        zeros.initializeMemory(as: UInt8.self, repeating: 0, count: 16 * PageSize.base)
        messageBuffer = .allocate(capacity: 64)
        messageBuffer.initialize(repeating: cu_message(), count: 64)

        machine.addReferenceHolder(self)
        ForkRegistry.shared.add(self)
        if options.faultMode == .inThread { InThreadFaults.add(self) }
        threads = [HostThread { [self] in serviceLoop() }, HostThread { [self] in faultLoop() },
                   HostThread { [self] in eventLoop() }]
        while !serviceReady.load(ordering: .acquiring) { sched_yieldShim() }
    }

    /// Why this process cannot have a native space, or nil if it can: the capability probe of
    /// ``init(machine:options:)`` (userfaultfd, its MOVE/POISON features and events, `PAGEMAP_SCAN`),
    /// without side effects. Tests skip with this reason.
    public static func unsupportedReason() -> String? {
        var supported: UInt64 = 0
        var rc = cu_uffd_probe(0, &supported)
        if rc == -EPERM { rc = cu_uffd_probe(1, &supported) }
        if rc == -ENOSYS { return "the kernel has no userfaultfd" }
        if rc == -EPERM { return "userfaultfd is not permitted for this process" }
        if rc != 0 { return "userfaultfd failed (errno \(-rc))" }
        for (bit, name) in [(CU_FEATURE_MOVE, "UFFDIO_MOVE"), (CU_FEATURE_POISON, "UFFDIO_POISON"),
                            (CU_FEATURE_EVENT_UNMAP, "UFFD_FEATURE_EVENT_UNMAP")] where supported & UInt64(bit) == 0 {
            return "the kernel lacks \(name)"
        }
        let fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "/proc/self/pagemap cannot be opened" }
        defer { _ = cu_close(fd) }
        var region = cu_page_region()
        var walkEnd: UInt64 = 0
        var probe: UInt8 = 0
        let a = UInt64(UInt(bitPattern: withUnsafeMutablePointer(to: &probe) { UnsafeMutableRawPointer($0) }))
            & ~PageSize.baseMask
        guard cu_pagemap_scan(fd, a, a + Sys.page, &region, 1, UInt64(CU_PAGE_IS_PRESENT), &walkEnd) >= 0 else {
            return "the kernel lacks PAGEMAP_SCAN"
        }
        return nil
    }

    /// Events name a native space by the host process's id: it is the process's own memory.
    public var eventSpaceID: Int { Int(getpid()) }

    public var description: String { "native space (uffd \(uffd)\(isUserModeOnly ? ", user-mode only" : ""))" }

    /// Pages a CPU fault-back asks its driver for (``Options/faultAroundPages``, changeable at run time).
    public var faultAroundPages: Int { faultAround.load(ordering: .relaxed) }

    /// Changes ``faultAroundPages``.
    /// - Throws: `.invalidArgument` unless a power of two from 1 to 512.
    public func setFaultAroundPages(_ pages: Int) throws(HMMError) {
        guard pages >= 1, pages <= PageSize.pagesPerPMD, pages & (pages - 1) == 0 else {
            throw HMMError(.invalidArgument, "fault-around of \(pages) pages: a power of two up to 512")
        }
        faultAround.store(pages, ordering: .relaxed)
    }

    /// Waits until the fault and event threads have handled everything read so far: afterwards the
    /// page words and frame references reflect every fault and host event that happened before the call.
    public func waitUntilIdle() {
        guard !hasExited else { return }
        catchUpWithEvents()
        faults.drain()
        events.drain()
    }

    /// Whether ``close()`` ran.
    public var hasExited: Bool { closedFlag.load(ordering: .acquiring) }

    func checkOpen() throws(HMMError) {
        if forkedAway.load(ordering: .acquiring) {
            throw HMMError(.noProcess, "the native space belongs to the parent of this forked process")
        }
        if closedFlag.load(ordering: .acquiring) { throw HMMError(.noProcess, "the native space is closed") }
    }

    // MARK: regions

    /// Allocates anonymous private memory that can migrate: `mmap` (2 MiB-aligned),
    /// `MADV_HUGEPAGE` or `MADV_NOHUGEPAGE` (neither for `hugePages: nil`: the host's default), `MADV_DONTFORK` under the default fork policy (a forked
    /// child gets `SIGSEGV` touching it, never device pages read as silent zeros; see ``ForkPolicy``),
    /// `MADV_POPULATE_WRITE` with `populate`, then
    /// `UFFDIO_REGISTER`. An unpopulated page's first touch is a userfaultfd round trip (zero fill).
    /// - Throws: `.invalidArgument` (length not a positive multiple of 4 KiB up to ``NativeRegion/maximumLength``, 64 GiB),
    ///   `.outOfMemory`, `.noProcess` after close, what registration returns.
    public func allocate(length: Int, protection: Protection = [.read, .write], hugePages: Bool? = true,
                         populate: Bool = false) throws(HMMError) -> NativeRegion {
        try checkOpen()
        guard length > 0, length % PageSize.base == 0, length <= NativeRegion.maximumLength else {
            throw HMMError(.invalidArgument, "region length \(length) is not a positive multiple of 4 KiB up to \(NativeRegion.maximumLengthDescription)")
        }
        let bytes = UInt64(length)
        // The host may hand out an address an unmapped region had: its events must be handled first.
        catchUpWithEvents()
        var error: Int32 = 0
        // 2 MiB-aligned either way: fault-around windows and compound units then line up with the region.
        let base = cu_map_aligned(bytes, Sys.pmd, PROT_READ | PROT_WRITE, &error)
        guard base != 0 else { throw HMMError(.outOfMemory, "mmap of \(length) bytes failed (errno \(-error))") }
        var registered = false
        var region: NativeRegion?
        do throws(HMMError) {
            if let hugePages { _ = Sys.madvise(base, bytes, hugePages ? Sys.hugePage : Sys.noHugePage) }
            if options.forkPolicy == .deny { _ = Sys.madvise(base, bytes, Sys.dontFork) }
            if populate {
                let rc = Sys.madvise(base, bytes, Sys.populateWrite)
                guard rc == 0 else { throw HMMError.system(rc, "MADV_POPULATE_WRITE") }
            }
            if protection != [.read, .write] {
                let rc = Sys.mprotect(base, bytes, protection)
                guard rc == 0 else { throw HMMError.system(rc, "mprotect") }
            }
            let rc = Sys.register(uffd, base, bytes, missing: true)
            guard rc == 0 else { throw HMMError.system(rc, "UFFDIO_REGISTER") }
            registered = true
            let r = try makeRegion(base, length, protection, hugePages)
            region = r
            try mmapLock.withWriteLock { () throws(HMMError) in
                try checkOpen()
                insert(r)
            }
            return r
        } catch {
            if let region { try? machine.unregisterPagemap(region.window) }
            if registered { _ = Sys.unregister(uffd, base, bytes) }
            _ = Sys.munmap(base, bytes)
            throw error
        }
    }

    /// Takes memory the process already has into the space as a region, with its bytes: a
    /// `malloc`ed buffer, a mapping from another allocator, the copy of a region a forked child
    /// inherited. Every page of `[address, address + length)` must be private anonymous memory (no
    /// file, not shared, not the main or the calling thread's stack) and in no live region. Another
    /// thread's stack looks like any anonymous mapping to the host: never adopt one. The pages keep their protections and the
    /// host's huge-page advice; populated pages stay where they are, and holes read zeros on first
    /// touch. Under ``ForkPolicy/deny`` the range becomes `MADV_DONTFORK`, as an allocated region is.
    ///
    /// The region then owns the memory as an allocated one does: ``NativeRegion/free()`` unmaps it, and
    /// ``close()`` leaves it mapped as ordinary memory. Takes `mmapLock` for writing.
    /// - Throws: `.invalidArgument` (unaligned, empty, over ``NativeRegion/maximumLength`` or wrapping), `.fault` where nothing is
    ///   mapped, `.unsupported` for shared, file-backed or special memory, `.busy` if a page is already in
    ///   a region, `.noProcess` after close, what registration returns.
    public func adopt(address: UInt64, length: Int) throws(HMMError) -> NativeRegion {
        try checkOpen()
        guard length > 0, length % PageSize.base == 0, length <= NativeRegion.maximumLength, address % Sys.page == 0,
            address <= UInt64.max - UInt64(length)
        else {
            throw HMMError(.invalidArgument, "adopt: \(length) bytes at \(address) is not a page-aligned range of up to \(NativeRegion.maximumLengthDescription)")
        }
        let end = address + UInt64(length)
        if let stack = Self.callingThreadStack(), stack.lowerBound < end && address < stack.upperBound {
            throw HMMError(.unsupported, "adopt: \(address)+\(length) overlaps the calling thread's stack")
        }
        catchUpWithEvents()
        // What the host has there, page-exact: one protection run per host mapping piece.
        var runs: [(lo: UInt64, hi: UInt64, protection: Protection)] = []
        var next = address
        for e in HostMaps.entries(overlapping: address, end) {
            guard e.start <= next else { break }
            guard e.adoptable else {
                throw HMMError(.unsupported, "adopt: \(e.path.isEmpty ? "a shared mapping" : e.path) at \(max(e.start, address)) is not private anonymous memory")
            }
            let hi = min(e.end, end)
            runs.append((next, hi, e.protection))
            next = hi
            if next == end { break }
        }
        guard next == end else { throw HMMError(.fault, "adopt: nothing is mapped at \(next)") }
        return try mmapLock.withWriteLock { () throws(HMMError) -> NativeRegion in
            try checkOpen()
            for r in regions where r.address < end && address < r.end {
                let lo = r.index(max(r.address, address))
                let hi = r.index(min(r.end, end))
                if (lo..<hi).contains(where: { r.state($0).kind != .unmapped }) {
                    throw HMMError(.busy, "adopt: \(max(r.address, address)) is already in \(r)")
                }
            }
            if options.forkPolicy == .deny { _ = Sys.madvise(address, UInt64(length), Sys.dontFork) }
            let rc = Sys.register(uffd, address, UInt64(length), missing: true)
            guard rc == 0 else { throw HMMError.system(rc, "UFFDIO_REGISTER") }
            let r: NativeRegion
            do throws(HMMError) {
                r = try makeRegion(address, length, runs[0].protection, nil)
            } catch {
                _ = Sys.unregister(uffd, address, UInt64(length))
                throw error
            }
            for run in runs.dropFirst() { r.setProtection(run.protection, pages: r.index(run.lo)..<r.index(run.hi)) }
            insert(r)
            statistics.count(\.regionsAdopted)
            return r
        }
    }

    /// The calling thread's stack (`pthread_getattr_np`), which ``adopt(address:length:)`` refuses: a
    /// thread stack is ordinary anonymous memory to the host, and only the main thread's is named.
    private static func callingThreadStack() -> Range<UInt64>? {
        var lo: UInt64 = 0
        var size: UInt64 = 0
        guard cu_thread_stack(&lo, &size) == 0 else { return nil }
        return lo..<(lo + size)
    }

    /// A region object for `[base, base + length)`, with its host window.
    func makeRegion(_ base: UInt64, _ length: Int, _ protection: Protection, _ hugePages: Bool?) throws(HMMError) -> NativeRegion {
        let pages = length >> PageSize.shift
        let windowFrames = (pages + PageSize.pagesPerPMD - 1) / PageSize.pagesPerPMD * PageSize.pagesPerPMD
        let window = try machine.registerHostWindow(base: UnsafeMutableRawPointer(bitPattern: UInt(base))!,
                                                    count: windowFrames, owner: self, operations: windowOperations)
        return NativeRegion(space: self, address: base, length: length, protection: protection, hugePages: hugePages,
                            window: window)
    }

    /// Adds `r` to the region list. The list is replaced whole, built outside its lock, and the old
    /// array is released outside it too: the service thread takes that lock and must never wait for an
    /// allocation (``serviceLoop()``).
    func insert(_ r: NativeRegion) {
        replaceRegions { list in
            let i = list.firstIndex { $0.address > r.address } ?? list.count
            list.insert(r, at: i)
        }
    }

    func remove(_ r: NativeRegion) {
        replaceRegions { list in list.removeAll { $0 === r } }
    }

    private func replaceRegions(_ change: (inout [NativeRegion]) -> Void) {
        while true {
            let old = regions
            var new = old
            change(&new)
            let swapped = regionList.withLock { (list: inout [NativeRegion]) -> Bool in
                guard list.count == old.count, zip(list, old).allSatisfy({ $0 === $1 }) else { return false }
                list = new  // `old` still holds the previous buffer: it is freed after the lock
                return true
            }
            if swapped { return }
        }
    }

    /// The live region containing `address` (any thread; the region list's lock is a leaf). Regions
    /// can overlap: an `mremap` may move pages into a range an older region unmapped, and that older
    /// region still spans it. The region whose page there is mapped wins.
    public func region(containing address: UInt64) -> NativeRegion? {
        regionList.withLock { list in
            var unmappedThere: NativeRegion?
            for r in list where r.contains(address) {
                if r.state(r.index(address)).kind != .unmapped { return r }
                if unmappedThere == nil { unmappedThere = r }
            }
            return unmappedThere
        }
    }

    /// The live regions.
    public var regions: [NativeRegion] { regionList.withLock { $0 } }

    /// Runs `body` on the region list under its lock (a leaf: `body` must not block or allocate).
    func withRegionsLocked(_ body: ([NativeRegion]) -> Void) {
        regionList.withLock { list in body(list) }
    }

    /// Frees `region` (``NativeRegion/free()``): drivers hear `unmap`, its device pages are freed, and the
    /// parts the user has not unmapped already are unregistered and unmapped — never an address range
    /// the region no longer owns.
    func free(_ region: NativeRegion) {
        guard !region.freed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        // Pages the user unmapped (or moved) themselves are known once their events are handled.
        if !hasExited { catchUpWithEvents() }
        var runs: [Range<UInt64>] = []
        mmapLock.withWriteLock {
            for i in 0..<region.pages where region.state(i).kind != .unmapped {
                let a = region.pageAddress(i)
                if let last = runs.last, last.upperBound == a { runs[runs.count - 1] = last.lowerBound..<(a + Sys.page) } else {
                    runs.append(a..<(a + Sys.page))
                }
            }
            guard regionList.withLock({ $0.contains { $0 === region } }) else { return }
            invalidating(region.address, region.end, .unmap, owner: nil) {
                for i in 0..<region.pages { dropPage(region, i, to: .unmapped) }
            }
            remove(region)
        }
        for run in runs where !hasExited { _ = Sys.unregister(uffd, run.lowerBound, run.upperBound - run.lowerBound) }
        try? machine.unregisterPagemap(region.window)
        for run in runs { _ = Sys.munmap(run.lowerBound, run.upperBound - run.lowerBound) }
    }

    /// Changes a region's protection (``NativeRegion/protect(_:_:)``).
    func protect(_ region: NativeRegion, _ lo: UInt64, _ hi: UInt64, _ protection: Protection) throws(HMMError) {
        if !hasExited { catchUpWithEvents() }
        try mmapLock.withWriteLock { () throws(HMMError) in
            try checkOpen()
            try requireMapped(region, lo, hi, "mprotect")
            invalidating(lo, hi, .protectionVMA, owner: nil) {}
            let rc = Sys.mprotect(lo, hi - lo, protection)
            guard rc == 0 else { throw HMMError.system(rc, "mprotect") }
            region.setProtection(protection, pages: region.index(lo)..<region.index(hi))
            // Device copies of a page that is no longer writable must not be written by the device.
            for i in region.index(lo)..<region.index(hi) where !protection.contains(.write) {
                let s = region.lock(i)
                region.setState(i, PageState(rawValue: s.rawValue & ~PageState.writableBit))
            }
        }
    }

    /// Refuses a range of `region` that is no longer all its own — freed, or partly unmapped by the
    /// program (the host may have given the addresses to another mapping) — as the host refuses
    /// `mprotect` over a hole (`ENOMEM`). Under `mmapLock`, after the events read so far are handled.
    private func requireMapped(_ region: NativeRegion, _ lo: UInt64, _ hi: UInt64, _ what: String) throws(HMMError) {
        guard !region.freed.load(ordering: .acquiring), regionList.withLock({ $0.contains { $0 === region } }) else {
            throw HMMError(.badDescriptor, "\(what): \(region) was freed")
        }
        for i in region.index(lo)..<region.index(hi) where region.state(i).kind == .unmapped {
            throw HMMError(.outOfMemory, "\(what): \(region.pageAddress(i)) was unmapped by the program")
        }
    }

    /// Huge-page advice for part of a region (``NativeRegion/advise(_:hugePages:)``).
    func adviseHugePages(_ region: NativeRegion, _ lo: UInt64, _ hi: UInt64, _ huge: Bool) throws(HMMError) {
        if !hasExited { catchUpWithEvents() }
        try mmapLock.withWriteLock { () throws(HMMError) in
            try checkOpen()
            try requireMapped(region, lo, hi, huge ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE")
            let rc = Sys.madvise(lo, hi - lo, huge ? Sys.hugePage : Sys.noHugePage)
            guard rc == 0 else { throw HMMError.system(rc, huge ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE") }
            region.setHugeAdvice(huge, pages: region.index(lo)..<region.index(hi))
        }
    }

    /// Drops what page `i` holds (its device or staging frame, or a split compound unit's share) and
    /// leaves it `to` (``PageState/host`` or ``PageState/unmapped``), unlocked. Waits for the page's
    /// lock. A compound unit is split first (each of its pages then holds its own reference).
    ///
    /// Returns whether the page became unmapped here: an unmapped page stays so (its address may be
    /// another mapping's now), and is not counted twice when its unmap event and a migration that found
    /// the address gone (``forgetUnmapped(_:_:)``) both see it.
    @discardableResult
    func dropPage(_ region: NativeRegion, _ i: Int, to final: PageState) -> Bool {
        if region.state(i).isCompound { splitUnit(region, region.unitStart(i)) }
        let s = region.lock(i, unmapped: final == .unmapped)
        if s.kind == .unmapped {
            region.setState(i, s.unlocked)
            return false
        }
        switch s.kind {
        case .device, .exclusive:
            // Still mapped in place (a coherent page whose address the host kept): a hole first.
            if final != .unmapped && !detachCoherent(region, i, s) { break }
            machine.folioPut(machine.folioHead(s.pfn))
            statistics.count(\.pagesDropped)
        default:
            break
        }
        region.setState(i, final)
        return final == .unmapped
    }

    /// Applies the zap of locked page `i` (word `s`, zapped): `MADV_DONTNEED` dropped the page while
    /// it was away or held, so its device or staging copy is freed. Returns the new word: host, still
    /// locked. A compound unit is left to the event thread, which splits it first.
    ///
    /// Whatever is at the page's address the host's own zap removes: the remove event comes before the
    /// zap, and no bytes go back into a page once its remove event is read (installs and the reader
    /// exclude each other, and an install checks the marks first — ``installFrame(_:at:pages:move:unlessZapped:)``).
    /// So nothing is moved out here; a `UFFDIO_MOVE` racing the host's zap of the same page was seen
    /// to spin in the kernel (6.18) and stall every `fork` and page fault of the process behind it.
    ///
    /// The host's zap itself may still be to come (its caller was woken when the event was read), so
    /// the page is left with a pending zap (``PageState/isZapPending``): until a fault fills it or a
    /// collection finds it a hole, nothing takes its bytes out of the process — the zap is ordered
    /// before any collection of the page as the kernel's page-table lock orders them.
    func applyZap(_ region: NativeRegion, _ i: Int, _ s: PageState) -> PageState {
        let clean = PageState(rawValue: s.rawValue & ~(PageState.zappedBit | PageState.zapPendingBit))
        // An unmapped page's address belongs to someone else now (another region, after an mremap).
        if s.isCompound || s.kind == .unmapped {
            region.states[i].store(clean.rawValue, ordering: .releasing)
            return clean
        }
        switch s.kind {
        case .device, .exclusive:
            if !detachCoherent(region, i, s) { break }
            machine.folioPut(machine.folioHead(s.pfn))
            statistics.count(\.pagesDropped)
        default:
            break
        }
        let host = PageState(rawValue: PageState.zapPendingBit).locked
        region.states[i].store(host.rawValue, ordering: .releasing)
        return host
    }

    /// Waits until the service thread is not between a `read` of the userfaultfd and marking the pages of
    /// the remove events it read: after this, every zap the host has done is marked.
    func waitForReader() {
        while readSequence.load(ordering: .acquiring) & 1 != 0 { sched_yieldShim() }
    }

    /// Splits the compound device unit starting at page `first`: each of its 512 words then holds its own
    /// reference on the device folio (which stays one folio until its last page is freed).
    func splitUnit(_ region: NativeRegion, _ first: Int) {
        guard first >= 0, first + PageSize.pagesPerPMD <= region.pages else { return }
        var words: [PageState] = []
        words.reserveCapacity(PageSize.pagesPerPMD)
        for j in 0..<PageSize.pagesPerPMD { words.append(region.lock(first + j)) }
        if words[0].isCompound && words[0].kind == .device {
            let head = machine.folioHead(words[0].pfn)
            for _ in 1..<PageSize.pagesPerPMD { machine.folioGet(head) }
        }
        for j in 0..<PageSize.pagesPerPMD {
            region.setState(first + j, PageState(rawValue: words[j].rawValue & ~PageState.compoundBit).unlocked)
        }
    }

    // MARK: invalidations

    /// Runs `body` between the start and the end of an invalidation of `[lo, hi)`.
    @inline(__always)
    func invalidating<R, E: Error>(
        _ lo: UInt64, _ hi: UInt64, _ event: NotifierEvent, owner: (any AnyObject & Sendable)?, _ body: () throws(E) -> R
    ) throws(E) -> R {
        try subscriptions.invalidating(NotifierRange(space: self, start: lo, end: hi, event: event, owner: owner), body)
    }

    // MARK: the driver-facing protocol

    /// Runs `body` with `mmapLock` held for reading, after the host events read so far are handled.
    /// - Throws: what `body` throws, `.noProcess` after close.
    public func withMmapReadLock<R>(_ body: () throws(HMMError) -> R) throws(HMMError) -> R {
        try checkOpen()
        // What the host did before this call (an `mremap` that returned, say) is what the driver sees,
        // as a kernel driver taking `mmap_lock` sees a completed `mremap`: its events are handled first.
        if !hasExited { catchUpWithEvents() }
        return try mmapLock.withReadLock { () throws(HMMError) -> R in
            try checkOpen()
            return try body()
        }
    }

    /// The space's interval notifiers.
    @_spi(Engine) public var notifierSubscriptions: NotifierSubscriptions { subscriptions }

    /// Runs `body` with `mmapLock` held for writing, once the space is known to be open.
    /// - Throws: what `body` throws, or `.noProcess` after close.
    @_spi(Engine) public func withMmapWriteLock<R>(_ body: () throws(HMMError) -> R) throws(HMMError) -> R {
        try mmapLock.withWriteLock { () throws(HMMError) -> R in
            try checkOpen()
            return try body()
        }
    }

    /// A driver's `mmap` of its device file (`VM_MIXEDMAP`): natively there is no device file to map.
    /// - Throws: `.unsupported`, always.
    public func mapDriverPages(length: Int, protection: Protection, shared: Bool) throws(HMMError) -> UInt64 {
        throw HMMError(.unsupported, "a driver mmap (VM_MIXEDMAP) needs the simulated engine: the host has no device file")
    }

    /// The region containing `address`, as a mapping — the run of pages with its protection and advice,
    /// clipped to 512 pages either side of it; outside every region, the host's own mapping there
    /// (`/proc/self/maps`: shared or file memory the engine does not manage); nil where nothing is.
    public func mappingHoldingLock(containing address: UInt64) -> MappingInfo? {
        guard let r = region(containing: address) else { return HostMaps.mapping(containing: address) }
        guard r.state(r.index(address)).kind != .unmapped else { return HostMaps.mapping(containing: address) }
        // The pages around it with its attributes — the VMA a partial mprotect made — clipped to 2 MiB
        // either side, so a driver walking a large region in pieces stays linear.
        let (protection, run) = r.protectionRun(around: r.index(address), reach: PageSize.pagesPerPMD)
        return MappingInfo(start: r.pageAddress(run.lowerBound), end: r.pageAddress(run.upperBound),
                           protection: protection, shared: false, anonymous: true,
                           hugetlb: false, hugePageAdvice: r.hugePages == true)
    }

    // MARK: PAGEMAP_SCAN

    /// Calls `body(address, categories)` for every page of `[lo, hi)` (`PAGEMAP_SCAN` categories:
    /// present, zero page, huge, swapped — a poison marker).
    func scan(_ lo: UInt64, _ hi: UInt64, also extra: UInt64 = 0, _ body: (UInt64, UInt64) throws(HMMError) -> Void) throws(HMMError) {
        let mask = UInt64(CU_PAGE_IS_PRESENT | CU_PAGE_IS_PFNZERO | CU_PAGE_IS_HUGE | CU_PAGE_IS_SWAPPED) | extra
        try withUnsafeTemporaryAllocation(of: cu_page_region.self, capacity: 64) { (vec) throws(HMMError) in
            var a = lo
            while a < hi {
                var walkEnd: UInt64 = 0
                let n = cu_pagemap_scan(pagemapFD, a, hi, vec.baseAddress!, 64, mask, &walkEnd)
                guard n >= 0 else { throw HMMError.system(Int32(n), "PAGEMAP_SCAN") }
                for k in 0..<Int(n) {
                    let r = vec[k]
                    while a < r.start {  // not reported: nothing there
                        try body(a, 0)
                        a += Sys.page
                    }
                    while a < r.end {
                        try body(a, r.categories)
                        a += Sys.page
                    }
                }
                // A full vector: the walk goes on from the last region's end (where the host stopped
                // is not trusted to leave no matching page unreported before it). Otherwise the walk
                // covered everything up to `walkEnd` (or the end): what it did not report is a hole.
                let stop = n == 64 ? a : (walkEnd > a ? min(walkEnd, hi) : hi)
                while a < stop {
                    try body(a, 0)
                    a += Sys.page
                }
            }
        }
    }

    // MARK: close

    /// Evicts every device-resident page back to host memory (restoring exclusive ones), tells the
    /// notifiers `release`, unregisters the regions — which stay mapped as ordinary memory — and stops
    /// the threads and closes the userfaultfds. A page whose driver cannot give it back is poisoned:
    /// touching it raises `SIGBUS`, it never reads as zeros. Idempotent.
    /// - Throws: `.bus` naming how many pages had to be poisoned (the space is closed anyway).
    public func close() throws(HMMError) {
        if forkedAway.load(ordering: .acquiring) {
            // A forked child's copy: no threads to stop, and the descriptors are the parent's too.
            closedFlag.store(true, ordering: .releasing)
            return
        }
        let poisoned = closeLock.withLock { _ -> Int? in
            guard !closedFlag.load(ordering: .acquiring) else { return nil }
            ForkRegistry.shared.remove(self)
            InThreadFaults.spaces.remove(self)
            let lost = evictAll()
            mmapLock.withWriteLock {
                closedFlag.store(true, ordering: .releasing)
                detachP2PMappings(forget: true)
                dropForeignWindows()
                invalidating(0, 0x8000_0000_0000, .release, owner: nil) {}
                for r in regions {
                    _ = Sys.unregister(uffd, r.address, UInt64(r.length))
                    remove(r)
                    try? machine.unregisterPagemap(r.window)
                }
            }
            stopping.store(true, ordering: .releasing)
            _ = cu_eventfd_signal(wakeFD)
            faults.close()
            events.close()
            for t in threads { t.join() }
            threads = []
            let ram = UInt64(UInt(bitPattern: machine.ramBase))
            _ = Sys.unregister(stagingUffd, ram, UInt64(machine.totalFrames) << UInt64(PageSize.shift))
            for fd in [uffd, stagingUffd, pagemapFD, wakeFD] { _ = cu_close(fd) }
            zeros.deallocate()
            messageBuffer.deallocate()
            let id = ObjectIdentifier(machine)
            _ = Self.machinesInUse.withLock { $0.remove(id) }
            return lost
        }
        let counters = statistics.snapshot
        options.logger.debug("native space closed", metadata: [
            "cpuFaults": "\(counters.cpuFaults)", "faultBacks": "\(counters.faultBacks)", "events": "\(counters.events)"])
        if counters.poisoned > 0 || counters.coherentStranded > 0 {
            options.logger.warning("pages were lost during this space's life", metadata: [
                "poisoned": "\(counters.poisoned)", "coherentStranded": "\(counters.coherentStranded)"])
        }
        if let poisoned, poisoned > 0 {
            throw HMMError(.bus, "\(poisoned) device page(s) could not come back and were poisoned (SIGBUS on touch)")
        }
    }

    /// Brings every device and exclusive page back; returns how many had to be poisoned instead.
    private func evictAll() -> Int {
        var lost = 0
        for r in regions {
            var i = 0
            while i < r.pages {
                let s = r.state(i)
                switch s.kind {
                case .device, .exclusive:
                    if faultGate.withReadLock({ bringBack(r, i, write: false) }) == .poisoned { lost += 1 }
                    if r.state(i).kind == .device || r.state(i).kind == .exclusive { continue }
                default:
                    break
                }
                i += 1
            }
        }
        return lost
    }
}

@_spi(Engine)
extension NativeSpace: FrameReferenceHolder {
    /// `migrate_device_range` on frames this space's pages use: each such page comes home through its
    /// driver, as a CPU touch would bring it (one that cannot is poisoned, never left as zeros).
    public func evictFrames(in range: Range<UInt64>) {
        guard !hasExited else { return }
        for r in regions {
            for i in 0..<r.pages {
                let s = r.state(i)
                if s.kind == .device && range.contains(s.pfn.rawValue) {
                    _ = faultGate.withReadLock { bringBack(r, i, write: false) }
                }
            }
        }
    }

    public func forEachHeldReference(_ body: (PFN) -> Void) {
        // A toucher resumes as soon as its page is home; the fault thread then still drops references.
        waitUntilIdle()
        for r in regions {
            for i in 0..<r.pages {
                let s = r.state(i)
                switch s.kind {
                case .device:
                    // A compound unit holds one reference for its 512 pages, on its head.
                    if !s.isCompound || machine.folioHead(s.pfn) == s.pfn { body(machine.folioHead(s.pfn)) }
                case .exclusive:
                    body(s.pfn)
                default:
                    break
                }
            }
        }
    }
}

/// The callbacks of a host window: its frames are never allocated, so none is ever called for real.
final class HostWindowOperations: PagemapOperations, HostWindowAccess, @unchecked Sendable {
    func folioFree(_ head: PFN, order: Int) {}

    /// A driver's copy out of a region page, through `process_vm_readv` on this process: `EFAULT`
    /// instead of `SIGSEGV` if the user unmapped the page meanwhile (a hole faults through the
    /// engine, as a load would).
    func copyOut(from src: UnsafeRawPointer, to dst: UnsafeMutableRawPointer, count: Int) -> Bool {
        cu_self_read(dst, src, count) == count
    }

    /// A driver's copy into a region page (`process_vm_writev` on this process).
    func copyIn(from src: UnsafeRawPointer, to dst: UnsafeMutableRawPointer, count: Int) -> Bool {
        cu_self_write(dst, src, count) == count
    }
    func migrateToRAM(_ fault: DeviceFault) throws(HMMError) {
        throw HMMError(.bus, "a host window page is already in host memory")
    }
}

/// What the native engine did, counted.
public final class NativeStatistics: @unchecked Sendable {
    private let counters = Locked(Counters())

    public struct Counters: Sendable, Equatable {
        /// CPU faults the fault thread resolved.
        public var cpuFaults = 0
        /// Of those, fault-backs of device pages through a driver.
        public var faultBacks = 0
        /// Of those, first touches (or touches after `MADV_DONTNEED`) filled with zeros.
        public var zeroFills = 0
        /// Of those, first writes to an empty huge-advised 2 MiB unit, filled with a zeroed THP.
        public var hugeZeroFills = 0
        /// Of those, device-exclusive pages restored.
        public var exclusiveRestores = 0
        /// Pages poisoned because their driver could not bring them back.
        public var poisoned = 0
        /// Non-cooperative events handled (unmap, remove, remap).
        public var events = 0
        /// Device or staging pages dropped by unmap, `MADV_DONTNEED` or free.
        public var pagesDropped = 0
        /// Pages moved out of the process to staging frames, and moved or copied back in.
        public var pagesMovedOut = 0
        public var pagesMovedIn = 0
        /// Regions made of memory the process already had (``NativeSpace/adopt(address:length:)``).
        public var regionsAdopted = 0
        /// Device-resident and exclusive pages copied into forked children (``ForkPolicy/share``).
        public var pagesCopiedToChild = 0
        /// Device-coherent frames mapped in place into regions, and in-place mappings replaced by holes.
        public var coherentMapped = 0
        public var coherentUnmapped = 0
        /// Coherent frames kept referenced because the host refused to unmap them (`vm.max_map_count`).
        public var coherentStranded = 0
        /// Remappings of coherent pages that landed where the program had just unmapped the page, and
        /// were taken back.
        public var remapsTakenBack = 0
    }

    func count(_ field: WritableKeyPath<Counters, Int>, _ n: Int = 1) {
        counters.withLock { $0[keyPath: field] += n }
    }

    /// A snapshot of the counters.
    public var snapshot: Counters { counters.withLock { $0 } }
}
