import CUserfaultfd
import HMM
@_spi(Engine) import HMM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What a child created by `fork` gets of the native regions (``NativeSpace/Options/forkPolicy``).
///
/// A device-resident page is a hole in the host page table, so without help a child would read it as
/// zeros — silent data loss (without `UFFD_FEATURE_EVENT_FORK`, `dup_userfaultfd()` drops the child's
/// registration). Neither policy lets that happen.
///
/// Under either policy a `fork` holds every native space still while the host copies the address
/// space (`ForkRegistry`), as the kernel's `fork` holds the `mmap_lock` for writing: a thread that
/// forks while it holds a space's lock (inside a driver's migration or walk) deadlocks, as it would in
/// the kernel.
public enum ForkPolicy: Sendable, Equatable {
    /// The regions are `MADV_DONTFORK`: the child has no mapping there, and a touch is `SIGSEGV` —
    /// loud, never zeros. Works for every process. The default.
    case deny
    /// The child inherits every page as it was at the fork, as the kernel's copy-on-write gives it:
    /// host pages by the kernel's own copy-on-write, device-resident and device-exclusive pages by a
    /// copy of their bytes into the child before the parent's `fork` returns (a revoked page stays
    /// poisoned in the child). The parent's device pages stay the parent's, so later device writes are
    /// never seen by the child, and a page the parent later migrates is unshared first. Needs
    /// `UFFD_FEATURE_EVENT_FORK`, that is `CAP_SYS_PTRACE`: ``NativeSpace/init(machine:options:)``
    /// throws `.permission` without it.
    ///
    /// The child gets plain memory: its copy of the ``NativeSpace`` has no threads, and every call on
    /// it throws `.noProcess`.
    ///
    /// The fork completes only once the space's service thread has read the FORK event, so that thread
    /// allocates nothing and takes no lock a forking process holds (glibc holds its allocator's locks
    /// across the system call). A runtime that holds more across `fork` — ThreadSanitizer's does —
    /// deadlocks: do not combine `.share` with `--sanitize=thread`.
    case share
}

/// The `pthread_atfork` hooks of every native space. `prepare` takes each space's `mmapLock` for
/// writing (no migration, snapshot or exclusive grant runs — the kernel's `dup_mmap` holds the
/// parent's `mmap_lock` likewise), then its fault gate (no CPU fault resolution or eviction changes a
/// page). So no `UFFDIO_MOVE` of the engine is in flight while the host copies the address space:
/// `dup_mmap` write-locks every VMA and waits for the per-VMA read locks a MOVE holds, and a MOVE
/// spinning on its retry path then stalls the fork — and every page fault of the process behind it
/// (seen on 6.18). A `.share` space also tells its notifiers `protectionPage`, as `dup_mmap` does for
/// copy-on-write mappings; the host's FORK event is read before `fork` returns, and `parent` waits
/// until the event thread has copied the child's device-resident pages
/// (``NativeSpace/copyIntoChild(_:)``). Then `parent` unlocks; `child` marks every space unusable in
/// the child and unlocks the child's copies of the locks.
///
/// All mmap locks are taken before any fault gate: a thread holding one space's `mmapLock` may be
/// waiting on a CPU fault of another space's region, which that space's fault thread must resolve.
final class ForkRegistry: @unchecked Sendable {
    static let shared = ForkRegistry()

    /// Every space; its lock is held from `prepare` to `parent`/`child`.
    private let spaces = SpaceList()

    /// Registers the hooks, once per process (as ``InThreadFaults`` installs its signal hook).
    private static let installHooks: Void = {
        pthread_atfork({ ForkRegistry.shared.prepare() }, { ForkRegistry.shared.parent() },
                       { ForkRegistry.shared.child() })
    }()

    func add(_ space: NativeSpace) {
        _ = Self.installHooks
        spaces.add(space)
    }

    func remove(_ space: NativeSpace) { spaces.remove(space) }

    private func prepare() {
        spaces.lock.writeLock()
        let live = spaces.liveHoldingLock
        for s in live { s.forkPrepareLock() }
        for s in live { s.forkPrepareGate() }
    }

    private func parent() {
        for s in spaces.liveHoldingLock { s.forkParent() }
        spaces.lock.unlock()
    }

    private func child() {
        for s in spaces.liveHoldingLock { s.forkChild() }
        spaces.lock.reinitializeInForkedChild()
    }
}

extension NativeSpace {
    /// `prepare`, first step (see ``ForkRegistry``).
    func forkPrepareLock() {
        guard !hasExited else { return }
        mmapLock.writeLock()
        forkHeld.store(true, ordering: .relaxed)
        // The child shares every P2PDMA mapping, and this space cannot see the child's unmaps.
        detachP2PMappings(forget: false)
    }

    /// `prepare`, second step: the fault gate, then `protectionPage` for every region.
    func forkPrepareGate() {
        guard forkHeld.load(ordering: .relaxed) else { return }
        faultGate.writeLock()
        guard options.forkPolicy == .share else { return }
        for r in regions { invalidating(r.address, r.end, .protectionPage, owner: nil) {} }
        unmapCoherentForFork()
    }

    /// `parent`: the FORK event (read before `fork` returned) is handled — the child has its pages.
    func forkParent() {
        guard forkHeld.exchange(false, ordering: .relaxed) else { return }
        if options.forkPolicy == .share { catchUpWithEvents() }
        faultGate.unlock()
        mmapLock.unlock()
    }

    /// `child`: this copy of the space has no threads and no userfaultfd of its own. Its locks are
    /// made fresh, not unlocked (``ReadWriteLock/reinitializeInForkedChild()``).
    func forkChild() {
        forkedAway.store(true, ordering: .releasing)
        guard forkHeld.exchange(false, ordering: .relaxed) else { return }
        faultGate.reinitializeInForkedChild()
        mmapLock.reinitializeInForkedChild()
    }

    /// The host's FORK event (`.share`): `child` is the child's userfaultfd, over the child's copies of
    /// the regions. Every device-resident and exclusive page is copied into the child from its frame
    /// (runs of adjacent frames in one `UFFDIO_COPY`), every revoked page poisoned there; then the
    /// descriptor is closed, which unregisters the child's regions — its other holes fault as plain
    /// anonymous memory, zeros, as they read in the parent. The parent's words are stable meanwhile
    /// (``ForkRegistry``).
    func copyIntoChild(_ child: Int32) {
        defer { _ = cu_close(child) }
        var messages = [cu_message](repeating: cu_message(), count: 16)
        /// One ioctl on the child's userfaultfd. `EAGAIN`: the child has an event queued that only we
        /// could read (it unmapped something): read it and try again.
        func onChild(_ body: () -> Int32) -> Int32 {
            while true {
                let rc = body()
                guard rc == -EAGAIN else { return rc }
                let n = messages.withUnsafeMutableBufferPointer { cu_read_messages(child, $0.baseAddress!, 16) }
                for k in 0..<max(0, Int(n)) where messages[k].kind == UInt32(CU_MSG_FORK) {
                    _ = cu_close(Int32(truncatingIfNeeded: messages[k].a))
                }
            }
        }
        var runStart: UInt64 = 0
        var runSource: UInt64 = 0
        var runBytes: UInt64 = 0
        var alive = true
        func flush() {
            defer { runBytes = 0 }
            var done: UInt64 = 0
            while alive && done < runBytes {
                var copied: Int64 = 0
                let rc = onChild {
                    let (rc, n) = Sys.copy(child, to: runStart + done, from: runSource + done, runBytes - done)
                    copied = n
                    return rc
                }
                if rc == 0 { break }
                if copied > 0 { done += UInt64(copied) }
                if rc == -ESRCH { alive = false }  // the child is gone
                done += Sys.page  // EEXIST / ENOENT: the child changed that page already; the next one
            }
        }
        for region in regions {
            for i in 0..<region.pages where alive {
                var s = region.state(i)
                while s.isMigrating {
                    sched_yieldShim()
                    s = region.state(i)
                }
                switch s.kind {
                case .device where isCoherent(s):
                    // Still mapped in place (the host would not replace it at the fork), MADV_DONTFORK: the
                    // child has no mapping there (SIGSEGV on touch). Others were made holes for the fork
                    // (``unmapCoherentForFork()``) and are copied below like any device page.
                    flush()
                case .device, .exclusive:
                    guard let p = try? machine.framePointer(s.pfn) else {
                        flush()
                        continue
                    }
                    let a = region.pageAddress(i)
                    let src = UInt64(UInt(bitPattern: p))
                    if runBytes > 0 && runStart + runBytes == a && runSource + runBytes == src {
                        runBytes += Sys.page
                    } else {
                        flush()
                        (runStart, runSource, runBytes) = (a, src, Sys.page)
                    }
                    statistics.count(\.pagesCopiedToChild)
                case .revoked:
                    flush()
                    let a = region.pageAddress(i)
                    if onChild({ Sys.poison(child, a, Sys.page) }) == -ESRCH { alive = false }
                default:
                    flush()
                }
            }
            flush()
        }
    }
}
