import CUserfaultfd
import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// How CPU faults on a space's regions are resolved (``NativeSpace/Options/faultMode``;
/// <doc:ManagingRealMemory> weighs the two).
public enum FaultMode: Sendable, Equatable {
    /// The space's fault thread resolves every fault while the faulting thread sleeps in the kernel.
    /// Every access path reaches it: loads and stores, and kernel accesses — `read(2)` into a
    /// device-resident page, `O_DIRECT`, `vmsplice`, `futex`, another process's `process_vm_readv`.
    /// A fault costs a round trip between threads (13–21 µs measured) and does not scale with faulting
    /// threads; fault-around amortises it. The default.
    case handlerThread
    /// `UFFD_FEATURE_SIGBUS`: the faulting thread resolves its own fault, inside its `SIGBUS` handler —
    /// no round trip (7–8 µs measured), and faulting threads scale. The driver's
    /// `PagemapOperations.migrateToRAM(_:)` then runs in that thread, in signal context: like a
    /// kernel driver's, it must not wait for anything the interrupted code may hold (a driver that
    /// touches its own region's memory while holding its lock deadlocks, as it would in the kernel).
    /// The process's earlier `SIGBUS` handler (the Swift runtime's) still gets every signal this mode
    /// does not resolve — a poisoned page's among them. Kernel accesses to a device-resident or
    /// untouched page fail with `EFAULT`, as under ``NativeSpace/Options/userModeOnly``.
    case inThread
}

/// The process's in-thread spaces and the `SIGBUS` hook that resolves their faults (``FaultMode/inThread``).
enum InThreadFaults {
    static let spaces = SpaceList()

    /// Installs the hook (once) and adds `space`.
    static func add(_ space: NativeSpace) {
        _ = installHook
        spaces.add(space)
    }

    private static let installHook: Void = {
        _ = cu_set_fault_hook { address, write in InThreadFaults.resolve(address, write: write != 0) ? 1 : 0 }
    }()

    /// The hook, in the faulting thread: the space whose region holds `address` resolves it. An address
    /// no region claims may be one a remap moved, not yet handled: each space catches up with its
    /// events and is asked again. False: the signal is not ours (or the page is poisoned).
    static func resolve(_ address: UInt64, write: Bool) -> Bool {
        if let space = spaces.first(where: { $0.region(containing: address) != nil }) {
            return space.resolveInThread(address, write: write)
        }
        for space in spaces.live where !space.hasExited {
            space.catchUpWithEvents()
            if space.region(containing: address) != nil { return space.resolveInThread(address, write: write) }
        }
        // Registered memory no region claims (the grown tail of an mremap): zeros, as the fault thread
        // gives; the host refuses any address that is not registered, and the signal is then not ours.
        for space in spaces.live where !space.hasExited && !space.forkedAway.load(ordering: .acquiring) {
            if space.fillZeros(address & ~PageSize.baseMask, write: write) { return true }
        }
        return false
    }
}

extension NativeSpace {
    /// Resolves a fault in the faulting thread, after the events read before it unless the page is a
    /// host hole (as the fault thread does). Returns whether the access should run again.
    func resolveInThread(_ address: UInt64, write: Bool) -> Bool {
        guard !forkedAway.load(ordering: .acquiring), !hasExited else { return false }
        if faultNeedsEvents(address) { catchUpWithEvents() }
        guard _slowPath(machine.events.isObserving) else { return faultGate.withReadLock { handleFault(address, write: write) } }
        return faultGate.withReadLock { handleFaultObserved(address, write: write, thread: cu_gettid(), readAt: 0) }
    }

    /// Faults the page at `a` in for `rangeFault` and `make_device_exclusive`: `MADV_POPULATE_READ` or
    /// `WRITE` from the caller's thread. In-thread mode first resolves a hole the way a CPU touch
    /// would, in this thread (the host refuses kernel-mode faults on holes there: `EFAULT`, which
    /// then means "look again"). Returns 0 or a negative errno.
    func faultIn(_ a: UInt64, write: Bool) -> Int32 {
        let inThread = options.faultMode == .inThread
        if inThread { _ = resolveInThread(a, write: write) }
        let rc = Sys.madvise(a, Sys.page, write ? Sys.populateWrite : Sys.populateRead)
        return inThread && rc == -EFAULT ? -EAGAIN : rc
    }
}
