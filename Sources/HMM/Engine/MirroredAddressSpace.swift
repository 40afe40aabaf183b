/// What a device driver needs from "a process's address space": the seam between the driver API and an
/// engine. Both engines adopt it — the simulated ``AddressSpace`` (a software MMU) and the native
/// engine's `NativeSpace` (the host process's own memory through userfaultfd) — so a driver such as
/// `MirrorDevice` is written once and runs unchanged on either.
///
/// Everything here is called per range or per migration piece, never per page: a driver's per-page
/// work happens on the concrete ``MigrateVMA`` arrays and on ``HMMRange/pfns``, so the existential
/// costs one dynamic call per piece.
///
/// The lock order of the simulated engine (<doc:Locking>) holds for both: `mmapLock` → folio lock → driver
/// notifier lock → page-table locks.
public protocol MirroredAddressSpace: AnyObject, Sendable {
    /// The machine whose frames (RAM, device pagemaps) back this space's migrations.
    var machine: Machine { get }
    /// Whether the space has exited (or, natively, been closed): every operation then throws.
    var hasExited: Bool { get }
    /// Runs `body` with the space's `mmapLock` held for reading — what a driver wraps around
    /// ``MigrateVMA`` phases, ``rangeFault(_:)`` and ``makeDeviceExclusive(_:owner:_:)``.
    /// - Throws: what `body` throws, or `.noProcess` after exit.
    func withMmapReadLock<R>(_ body: () throws(HMMError) -> R) throws(HMMError) -> R
    /// `hmm_range_fault`: fills `range.pfns`, faulting where requested. Requires `mmapLock` held for
    /// reading.
    /// - Throws: `.busy` (invalidated since `notifierSeq`: retry), `.fault`, `.permission`,
    ///   `.invalidArgument`, `.outOfMemory`, `.noProcess`.
    func rangeFault(_ range: inout HMMRange) throws(HMMError)
    /// `make_device_exclusive`: the page at `address` becomes the device's until the next CPU touch;
    /// `program` runs with the frame the device may use. Requires `mmapLock` held for reading.
    /// - Throws: `.invalidArgument`, `.unsupported`, `.fault`, `.outOfMemory`.
    func makeDeviceExclusive(_ address: UInt64, owner: (any AnyObject & Sendable)?, _ program: (PFN) -> Void) throws(HMMError)
    /// A driver's `mmap` of its device file: a `VM_MIXEDMAP` mapping of `length` bytes with a fresh zeroed
    /// page inserted at every page (`vm_insert_page`). Takes `mmapLock` for writing.
    /// - Returns: the start address.
    /// - Throws: `.invalidArgument`, `.outOfMemory`, `.noProcess`; `.unsupported` where the engine has no
    ///   device file to map (the native engine: the host kernel has no such file).
    func mapDriverPages(length: Int, protection: Protection, shared: Bool) throws(HMMError) -> UInt64
    /// The mapping containing `address`; call it with `mmapLock` held.
    func mappingHoldingLock(containing address: UInt64) -> MappingInfo?
    /// How events name this space (``HMMEvent``): a simulated space's ``AddressSpace/id``, the host
    /// process's id for a native space.
    var eventSpaceID: Int { get }
    /// The engine that carries out ``MigrateVMA``'s phases on this space's memory; an engine that is its
    /// own space gets it by default.
    @_spi(Engine) var migrationEngine: any MigrationEngine { get }
    /// The space's interval notifiers (the kernel's `mmu_notifier_subscriptions`).
    @_spi(Engine) var notifierSubscriptions: NotifierSubscriptions { get }
    /// Runs `body` with `mmapLock` held for writing, once the space is known to be alive.
    /// - Throws: what `body` throws, or `.noProcess` after exit (or close).
    @_spi(Engine) func withMmapWriteLock<R>(_ body: () throws(HMMError) -> R) throws(HMMError) -> R
}

extension MirroredAddressSpace {
    /// `mmu_interval_notifier_insert`: subscribes `operations` to changes of `[start, start + length)`.
    /// Takes `mmapLock` for writing: do not call with it held.
    /// - Throws: `.invalidArgument` (empty or overflowing: the kernel's `-EOVERFLOW`), `.noProcess` after
    ///   exit.
    public func insertIntervalNotifier(
        start: UInt64, length: UInt64, _ operations: any IntervalNotifierOperations
    ) throws(HMMError) -> IntervalNotifier {
        guard length > 0, start <= UInt64.max - length else {
            throw .invalid("interval notifier \(hex(start))+\(length) is empty or overflows")
        }
        let n = IntervalNotifier(space: self, subscriptions: notifierSubscriptions, start: start, end: start + length,
                                 operations: operations)
        try withMmapWriteLock { () throws(HMMError) in notifierSubscriptions.insert(n) }
        return n
    }
}

@_spi(Engine)
extension MirroredAddressSpace where Self: MigrationEngine {
    public var migrationEngine: any MigrationEngine { self }
}

/// How an engine carries out the three phases of a ``MigrateVMA`` on its memory: the simulated
/// ``AddressSpace`` on its page tables, the native `NativeSpace` on the host process's. For engine
/// implementers (`@_spi(Engine) import HMM`), not drivers: ``MigrateVMA`` checks the phase order, the
/// range, the owner and the destinations (locked folios of the entry's size with exactly the driver's
/// reference) before it calls in, and keeps `src`/`dst`/`cpages` in its own arrays, so a driver's
/// per-page work never crosses this protocol. The decisions the engines share are ``MigrationRules``.
@_spi(Engine)
public protocol MigrationEngine: AnyObject {
    /// `migrate_vma_setup`: collect `[m.start, m.end)` into `m.engineSource` (locked sources, holes as
    /// bare `migrate` entries). Nothing may stay collected when it throws.
    func migrateSetup(_ m: MigrateVMA) throws(HMMError)
    /// `migrate_vma_pages`: decide, per entry still migrating with a destination, whether it moves
    /// (clear `migrate` on the ones that cannot).
    func migratePages(_ m: MigrateVMA) throws(HMMError)
    /// `migrate_vma_finalize`: install the destinations of the entries that moved (all of them only if
    /// `accepted`, i.e. ``migratePages(_:)`` ran and succeeded), restore the rest, unlock and drop the
    /// migration's references.
    func migrateFinalize(_ m: MigrateVMA, accepted: Bool)
}
