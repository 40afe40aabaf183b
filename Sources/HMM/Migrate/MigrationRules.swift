/// The decisions of device migration that do not depend on the engine carrying it out, each written
/// once, as the kernel writes them once: which pages a migration collects (`migrate_vma_collect_pmd`),
/// which destinations the pages phase refuses (`__migrate_device_pages`, which `migrate_vma_pages` and
/// `migrate_device_pages` both wrap) and where an entry ends (`__migrate_device_finalize`).
/// ``MigrateVMA``'s engines and ``MigrateDevice`` call these; what an engine adds on top (its own
/// reference counts, what its memory cannot represent) it documents where it adds it.
@_spi(Engine)
public enum MigrationRules {
    /// `migrate_vma_collect_pmd`'s test of a mapped page: whether a migration selecting `select` for
    /// `owner` collects a page of memory `kind` (nil: system RAM) — system pages with `.system`;
    /// device-private and device-coherent pages with their flag, and only from pagemaps registered with
    /// the same owner (`pgmap_owner`, compared by identity); other device memory never.
    /// `pagemapOwner` is evaluated only for device memory.
    @inline(__always)
    public static func collects(
        _ select: MigrateSelect, _ kind: PagemapKind?, pagemapOwner: @autoclosure () -> (any AnyObject & Sendable)?,
        owner: (any AnyObject & Sendable)?
    ) -> Bool {
        switch kind {
        case nil: select.contains(.system)
        case .devicePrivate?: select.contains(.devicePrivate) && pagemapOwner() === owner
        case .deviceCoherent?: select.contains(.deviceCoherent) && pagemapOwner() === owner
        default: false
        }
    }

    /// `__migrate_device_pages`' refusal by memory kind: a destination in RAM takes any page;
    /// device-private and device-coherent memory take only anonymous pages ("for now only support
    /// anonymous memory migrating to device private or coherent memory"); other device memory (generic,
    /// P2PDMA) takes none.
    @inline(__always)
    public static func destinationAccepts(_ kind: PagemapKind?, anonymousSource: Bool) -> Bool {
        switch kind {
        case nil: true
        case .devicePrivate?, .deviceCoherent?: anonymousSource
        default: false
        }
    }

    /// `__migrate_device_finalize`: whether entry `src` ends in its destination `dst` — the pages phase
    /// ran and accepted the migration, the entry still migrates, and the driver gave a destination.
    /// Otherwise the source is restored where it was.
    @inline(__always)
    public static func moves(_ src: MigratePFN, to dst: PFN?, accepted: Bool) -> Bool {
        accepted && src.isMigrating && dst != nil
    }
}

extension Machine {
    /// `migrate_vma_collect_pmd`'s test (``MigrationRules/collects(_:_:pagemapOwner:owner:)``) for frame `pfn`.
    @inline(__always)
    func migrationCollects(_ pfn: PFN, _ select: MigrateSelect, owner: (any AnyObject & Sendable)?) -> Bool {
        MigrationRules.collects(select, deviceKind(pfn), pagemapOwner: self.pagemap(of: pfn)?.owner, owner: owner)
    }

    /// The destination finalize releases or installs for entry `dst`: any destination once the pages
    /// phase accepted the migration (it checked them all); before that — an abandoned migration — only
    /// one that is a valid destination, since one the driver got wrong is not the migration's to release.
    @inline(__always)
    func finalizeDestination(_ dst: MigratePFN, accepted: Bool) -> PFN? {
        dst.pfn.flatMap { accepted || isMigrationDestination($0, compound: dst.isCompound) ? $0 : nil }
    }
}
