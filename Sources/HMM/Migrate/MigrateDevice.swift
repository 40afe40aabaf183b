/// Migration by physical frame, without a VMA (`mm/migrate_device.c`: `migrate_device_range`,
/// `migrate_device_pfns`, `migrate_device_pages`, `migrate_device_finalize`): how a driver empties its
/// memory — on release, unbind or eviction — not knowing which processes map it. Every mapping is found
/// through the reverse map and turned into a migration entry.
///
/// ```
/// let m = try MigrateDevice(machine: machine, range: pagemap.firstPFN, count: n)
/// for i in 0..<m.src.count where m.src[i].isMigrating { allocate a locked system page, copy, set m.dst[i] }
/// try m.pages()
/// m.finalize()
/// ```
/// Locking: needs no `mmapLock`; takes folio locks by try-lock, then rmap and page-table locks.
public final class MigrateDevice: @unchecked Sendable {
    public let machine: Machine
    /// Source entries, one per frame asked for.
    public private(set) var src: [MigratePFN]
    /// Destinations, filled by the driver before ``pages()``.
    public var dst: [MigratePFN]
    /// References the caller holds on the sources beyond the migration's own.
    private let callerReferences: Int32
    private var phase = 1
    /// Why the device memory empties, for its ``MigrationEvent``: `.release` unless the driver says
    /// `.eviction` (or another cause).
    public var cause = MigrationCause.release
    /// (Unchecked, as `MigrateVMA`'s: only the thread running the phases touches it.)
    @exclusivity(unchecked) private var observation = MigrationObservation()

    /// `migrate_device_range`: collects the `count` frames from `first`, each in-use one referenced,
    /// locked and unmapped from every space. Free frames, frames whose lock is contended, and frames with
    /// a reference nobody can explain (a pin) come back as empty entries.
    /// - Throws: `.invalidArgument` if the range is empty or not inside one registered pagemap.
    public convenience init(machine: Machine, range first: PFN, count: Int) throws(HMMError) {
        guard count > 0, let pm = machine.pagemap(of: first), !pm.isUnregistered,
            first.rawValue + UInt64(count) <= pm.endPFN.rawValue
        else { throw .invalid("migrate_device_range: \(first)+\(count) is not inside one pagemap") }
        try self.init(machine: machine, pfns: (0..<count).map { first + $0 })
    }

    /// `migrate_device_pfns`: as the range form, for an arbitrary set of device frames.
    /// - Throws: `.invalidArgument` for an empty list or a frame outside every registered pagemap.
    public convenience init(machine: Machine, pfns: [PFN]) throws(HMMError) {
        try self.init(machine: machine, pfns: pfns, callerReferences: 0)
    }

    init(machine: Machine, pfns: [PFN], callerReferences: Int32) throws(HMMError) {
        guard !pfns.isEmpty else { throw .invalid("migrate_device_pfns: no frames") }
        for p in pfns where machine.pagemap(of: p)?.isUnregistered != false {
            throw .invalid("migrate_device_pfns: \(p) is not device memory of this machine")
        }
        self.machine = machine
        self.callerReferences = callerReferences
        observation.start(machine)
        // Pages another engine holds (native device-resident pages) have no reverse-map entry: that
        // engine brings them home first.
        let lo = pfns.map(\.rawValue).min()!
        let hi = pfns.map(\.rawValue).max()! + 1
        for holder in machine.liveReferenceHolders { holder.evictFrames(in: lo..<hi) }
        src = Array(repeating: .empty, count: pfns.count)
        dst = Array(repeating: .empty, count: pfns.count)
        let frames = machine.frames
        for (i, p) in pfns.enumerated() {
            // A device THP is split first (through migration entries, in every space that maps it) and
            // its pages move one by one: eviction has no VMA to place a 2 MiB destination by.
            if frames.head(of: p) == p, frames.order(p) > 0, machine.tryGetFolio(p) {
                if frames.tryLock(p) {
                    _ = machine.splitFolioEverywhere(p, extra: 1)
                    frames.unlock(p)
                }
                machine.putFolio(p)
            }
            guard frames.head(of: p) == p, frames.order(p) == 0, machine.tryGetFolio(p) else { continue }
            guard frames.tryLock(p) else {
                machine.putFolio(p)
                continue
            }
            src[i] = MigratePFN(p, flags: MigratePFN.migrate)
        }
        for i in src.indices {
            guard let p = src[i].pfn else { continue }
            if machine.pageMapcount(p) > 0 { _ = machine.tryToMigrate(p) }
            if machine.pageMapcount(p) == 0 && machine.refcount(p) == 1 + callerReferences { continue }
            machine.removeMigrationEntries(p, p)
            frames.unlock(p)
            machine.putFolio(p)
            src[i] = .empty
        }
        observation.collected(src)
    }

    /// `migrate_device_pages`: moves page state to each destination. Entries without a destination, with
    /// one `MigrationRules` refuses, or whose source gained a reference, stop migrating.
    /// - Throws: `.invalidArgument` out of order or for a destination that is not a locked order-0 folio
    ///   with one reference. Nothing changes on error.
    public func pages() throws(HMMError) {
        guard phase == 1 else { throw .invalid("migrate_device_pages called out of order") }
        observation.pagesBegan()
        for i in dst.indices {
            guard let d = dst[i].pfn else { continue }
            guard machine.isMigrationDestination(d) else { throw .invalid("dst[\(i)] = \(d) is not a locked order-0 folio holding one reference") }
        }
        phase = 2
        for i in src.indices where src[i].isMigrating {
            guard let s = src[i].pfn, let d = dst[i].pfn, machine.refcount(s) == 1 + callerReferences,
                MigrationRules.destinationAccepts(machine.deviceKind(d), anonymousSource: machine.frames.flags(s).contains(.anon))
            else {
                src[i].clearMigrate()
                continue
            }
            machine.migrateMetadata(from: s, to: d)
        }
    }

    /// `migrate_device_finalize`: every migration entry of a source becomes a mapping of its destination
    /// (or of the source again); locks and the migration's references are dropped, freeing each source
    /// that moved. Idempotent. Calling it before ``pages()`` — or after a ``pages()`` that threw —
    /// abandons the migration: every source is restored where it was and the valid destinations are
    /// released.
    public func finalize() {
        guard phase != 3 else { return }
        let outcome = observation.observing
            ? observation.outcome(machine, src: src, dst: dst, accepted: phase == 2) : MigrationObservation.Outcome()
        defer { observation.publish(machine, outcome, cause: cause, space: 0, address: 0) }
        let accepted = phase == 2
        phase = 3
        let frames = machine.frames
        for i in src.indices {
            let d = machine.finalizeDestination(dst[i], accepted: accepted)
            guard let s = src[i].pfn else {
                if let d {
                    frames.unlock(d)
                    machine.putFolio(d)
                }
                continue
            }
            let new = MigrationRules.moves(src[i], to: d, accepted: accepted) ? d! : s
            if let d, d != new {
                frames.unlock(d)
                machine.putFolio(d)
            }
            machine.removeMigrationEntries(s, new)
            frames.unlock(s)
            machine.putFolio(s)
            if new != s {
                frames.unlock(new)
                machine.putFolio(new)
                machine.statistics.count(.migrateDeviceEvicted)
            }
        }
    }
}

extension Machine {
    /// `migrate_device_coherent_folio`: moves a device-coherent page the caller holds a reference on to
    /// a new system page (before a long-term pin). Requires no page-table lock held.
    /// - Throws: `.busy` if the page could not be unmapped or migrated, `.outOfMemory`.
    func migrateDeviceCoherentPage(_ pfn: PFN) throws(HMMError) {
        let m = try MigrateDevice(machine: self, pfns: [pfn], callerReferences: 1)
        guard m.src[0].isMigrating else {
            m.finalize()
            throw HMMError(.busy, "device-coherent \(pfn) could not be unmapped for migration")
        }
        guard let page = allocateMigrationPage() else {
            m.finalize()
            throw HMMError(.outOfMemory, "no system page to move device-coherent \(pfn) to")
        }
        copyPageUnchecked(from: pfn, to: page)
        m.dst[0] = MigratePFN(page)
        do throws(HMMError) { try m.pages() } catch {
            m.finalize()
            throw error
        }
        let moved = m.src[0].isMigrating
        m.finalize()
        if !moved { throw HMMError(.busy, "device-coherent \(pfn) gained a reference during migration") }
    }

    @inline(__always) func copyPageUnchecked(from src: PFN, to dst: PFN) {
        pointer(dst).copyMemory(from: pointer(src), byteCount: PageSize.base)
    }
}
