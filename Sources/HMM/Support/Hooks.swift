import Synchronization

/// Places in the library where a test can run code of its own, to force a bad interleaving of two
/// threads, as in the kernel's historical device-memory races. Hooks fire only in debug builds; release
/// builds compile the calls out.
public enum HookPoint: Int, CaseIterable, Sendable {
    /// CPU fault on a device-private entry: the page reference is taken and the page-table lock dropped,
    /// `migrateToRAM` has not run yet (the window of CVE-2022-3523: a racing unmap could free the page under
    /// `migrate_to_ram`).
    case deviceFaultBeforeMigrateToRAM
    /// `MigrateVMA.setup` has collected and unmapped; the driver has not copied yet.
    case migrateAfterSetup
    /// `RangeFault` finished its walk; the driver has not taken its lock to check the sequence yet.
    case rangeFaultAfterWalk
    /// Lockless GUP-fast read a leaf entry and has taken no reference yet; it is inside its epoch
    /// critical section, so the action must not wait for anything that waits for a grace period.
    case gupFastAfterReadEntry
}

/// Test hook table of a ``Machine``.
public final class Hooks: @unchecked Sendable {
    private let table = Locked<[HookPoint: @Sendable () -> Void]>([:])
    private let armed = Atomic<Int>(0)

    init() {}

    /// Installs (or, with nil, removes) the action run at `point`. The action runs on the thread that
    /// reaches the point, possibly with locks held (documented per point): it may block on a semaphore
    /// but must not call back into the same address space with its `mmapLock` needed for writing.
    public func set(_ point: HookPoint, _ action: (@Sendable () -> Void)?) {
        table.withLock { t in
            t[point] = action
            armed.store(t.count, ordering: .releasing)
        }
    }

    @inline(__always) func fire(_ point: HookPoint) {
        guard armed.load(ordering: .acquiring) != 0 else { return }
        let action = table.withLock { $0[point] }
        action?()
    }
}
