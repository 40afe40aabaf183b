import Synchronization

/// Migration of a virtual range between system RAM and device memory in three phases
/// (`struct migrate_vma`, `migrate_vma_setup/pages/finalize` in `mm/migrate_device.c`).
///
/// ```
/// try space.withMmapReadLock { () throws(HMMError) in
///     let m = try MigrateVMA(space: space, start: a, end: b, select: .system, owner: me)
///     try m.setup()                       // collect + unmap: src[], cpages, npages
///     for i in 0..<m.npages where m.src[i].isMigrating { allocate, lock, copy or zero; m.dst[i] = … }
///     m.pages()                           // move the metadata, insert holes
///     …update device page tables for entries still migrating…
///     m.finalize()                        // remove migration entries, unlock, drop references
/// }
/// ```
///
/// Locking: the caller holds the space's `mmapLock` (read is enough) from `setup` through `finalize`.
/// Source and destination folios stay locked in between. Page-table locks are taken inside; folios
/// are only try-locked under them (a contended page is simply not collected).
///
/// This class is the protocol only: it checks the phases' order, the range and the destinations, keeps
/// `src`/`dst`/`cpages`, and observes the migration. The page work of each phase is the space's engine's
/// (`MirroredAddressSpace.migrationEngine`): the simulated ``AddressSpace`` on its page tables, the
/// native `NativeSpace` on the host process's memory. What both engines decide alike is
/// `MigrationRules`. A driver's code is the same on either.
public final class MigrateVMA: @unchecked Sendable {
    /// The space migrated, on either engine.
    public let space: any MirroredAddressSpace
    /// The engine that carries out the phases: the space's.
    let engine: any MigrationEngine
    public let start: UInt64
    /// Exclusive; shrinks if collection stopped early.
    public private(set) var end: UInt64
    public let select: MigrateSelect
    /// The driver identity matched against pagemap owners (`pgmap_owner`); also the owner of the
    /// `migrate` notifier event.
    public let owner: (any AnyObject & Sendable)?
    /// The locked device-private page whose CPU fault started this migration (`fault_page`).
    public let faultPage: PFN?
    /// Source entries, one per page (read-only for the driver). (It, ``dst`` and `engineContext` are
    /// exclusivity-unchecked: the thread running the phases is the only one touching them — the driver
    /// between phases, the engine inside — and the checks cost more than a 4 KiB page's migration
    /// elsewhere.)
    @exclusivity(unchecked) public internal(set) var src: [MigratePFN]
    /// Destination entries, filled by the driver between ``setup()`` and ``pages()``.
    @exclusivity(unchecked) public var dst: [MigratePFN]
    /// Entries still migrating after ``setup()`` (holes included).
    public private(set) var cpages = 0
    /// Page slots walked.
    public private(set) var npages = 0
    private var phase = 0
    /// Why it migrates, for its ``MigrationEvent``: `.cpuFault` when a fault page is given, else
    /// `.explicit` unless the driver says otherwise (prefetch, eviction, device fault…). Set it before
    /// ``setup()``, from the thread that runs the phases.
    @exclusivity(unchecked) public var cause: MigrationCause
    /// (Unchecked: touched only by the thread running the phases, and a dynamic exclusivity check per
    /// phase was measurable on 4 KiB migrations.)
    @exclusivity(unchecked) private var observation = MigrationObservation()

    /// The most pages one migration may cover: its `src`/`dst` arrays take 17 bytes a page, so larger
    /// ranges go in pieces (drivers migrate 512 pages at a time).
    public static let maximumPages = 1 << 20

    /// Describes a migration of `[start, end)`; nothing happens until ``setup()``.
    /// - Throws: `.invalidArgument` for an empty or overflowing range, one outside user space, or one
    ///   longer than ``maximumPages``.
    public init(
        space: any MirroredAddressSpace, start: UInt64, end: UInt64, select: MigrateSelect,
        owner: (any AnyObject & Sendable)?, faultPage: PFN? = nil
    ) throws(HMMError) {
        let lo = start & ~PageSize.baseMask
        let hi = end & ~PageSize.baseMask
        guard hi > lo, hi <= PageTableIndex.userTop else {
            throw .invalid("migrate_vma range \(hex(start))..<\(hex(end)) is empty or outside user space")
        }
        guard (hi - lo) >> UInt64(PageSize.shift) <= UInt64(Self.maximumPages) else {
            throw .invalid("migrate_vma range \(hex(start))..<\(hex(end)) is longer than \(Self.maximumPages) pages")
        }
        self.space = space
        engine = space.migrationEngine
        machine = space.machine
        self.start = lo
        self.end = hi
        self.select = select
        self.owner = owner
        self.faultPage = faultPage
        cause = faultPage == nil ? .explicit : .cpuFault
        let n = Int((hi - lo) >> UInt64(PageSize.shift))
        src = Array(repeating: .empty, count: n)
        dst = Array(repeating: .empty, count: n)
    }

    /// The space's machine, stored so per-page paths load it once.
    let machine: Machine

    @inline(__always) func address(_ i: Int) -> UInt64 { start + UInt64(i) << UInt64(PageSize.shift) }

    /// What the engine keeps about this migration between its phases (which pages it locked…); the
    /// engine sets it in setup and clears it in finalize.
    @_spi(Engine)
    @exclusivity(unchecked) public var engineContext: AnyObject?

    /// The source entries, writable by the engine that collects them (``MigrationEngine``).
    @_spi(Engine)
    public var engineSource: [MigratePFN] {
        get { src }
        _modify { yield &src }
    }

    // MARK: phase 1

    /// `migrate_vma_setup`: validates, collects every page of the range into ``src`` (locking it and
    /// replacing its mapping by a migration entry) and unmaps it from other spaces.
    /// - Throws: `.invalidArgument` (no VMA at `start`, range past the VMA, hugetlb or driver VMA, a fault
    ///   page that is not a locked device-private page, device memory selected without an `owner`,
    ///   `mmapLock` not held, called twice), `.noProcess` after exit. Nothing is
    ///   collected on error.
    public func setup() throws(HMMError) {
        guard phase == 0 else { throw .invalid("migrate_vma_setup called twice") }
        observation.start(machine)
        // Owners are identities compared with `===`, as the kernel compares `pgmap_owner` pointers: any
        // code in the process can name any driver, so the check catches mistakes, not impostors.
        if !select.isDisjoint(with: [.devicePrivate, .deviceCoherent]) && owner == nil {
            throw .invalid("migrate_vma: selecting device memory needs the owner its pagemaps were registered with")
        }
        try engine.migrateSetup(self)
        phase = 1
        npages = src.count
        cpages = src.reduce(0) { $0 + ($1.isMigrating ? 1 : 0) }
        observation.collected(src)
        #if DEBUG
        machine.hooks.fire(.migrateAfterSetup)
        #endif
    }

    // MARK: phase 2

    /// `migrate_vma_pages`: for every entry still migrating with a destination, moves the page state to
    /// the destination (or, for a hole, maps the destination now). Entries that cannot move (no
    /// destination, an extra reference appeared, a non-anonymous page bound for device memory, a hole
    /// a concurrent fault filled) lose `migrate`.
    /// - Throws: `.invalidArgument` if called out of order, without `mmapLock` held, or for a destination
    ///   that is not a locked folio with exactly the driver's reference. Nothing changes on error; a
    ///   ``finalize()`` afterwards restores every source.
    public func pages() throws(HMMError) {
        guard phase == 1 else { throw .invalid("migrate_vma_pages called out of order") }
        observation.pagesBegan()
        try validateDestinations()
        try engine.migratePages(self)
        phase = 2
    }

    private func validateDestinations() throws(HMMError) {
        for i in 0..<dst.count {
            guard let d = dst[i].pfn else { continue }
            guard machine.isMigrationDestination(d, compound: dst[i].isCompound) else {
                throw .invalid("dst[\(i)] = \(d) is not a locked folio of the entry's size holding one reference")
            }
        }
    }

    // MARK: phase 3

    /// `migrate_vma_finalize`: every migration entry becomes a mapping of the destination (or of the
    /// source again where migration failed); sources and destinations are unlocked and the migration's
    /// references dropped, which frees each source that moved (device pages through `folioFree`).
    /// Calling it before ``pages()`` — or after a ``pages()`` that threw — abandons the migration: every
    /// source is restored, and the valid destinations are unlocked and released. Idempotent. Should the
    /// caller not hold `mmapLock` (a broken contract), finalize takes it for writing itself.
    public func finalize() {
        guard phase == 1 || phase == 2 else { return }
        let outcome = observation.observing
            ? observation.outcome(machine, src: src, dst: dst, accepted: phase == 2, faultPage: faultPage)
            : MigrationObservation.Outcome()
        defer {
            if observation.observing {
                observation.publish(machine, outcome, cause: cause, space: space.eventSpaceID, address: start)
            }
        }
        // Destinations were checked by `pages()`; if it never ran (or refused them) no source moved.
        let accepted = phase == 2
        phase = 3
        engine.migrateFinalize(self, accepted: accepted)
    }
}
