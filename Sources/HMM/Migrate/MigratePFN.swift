/// One entry of a migration's `src` or `dst` array (`(pfn << MIGRATE_PFN_SHIFT) | flags`), with the
/// kernel's bit values (`include/linux/migrate.h`).
public struct MigratePFN: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// `MIGRATE_PFN_VALID`: the pfn field is meaningful.
    public static let valid: UInt64 = 1 << 0
    /// `MIGRATE_PFN_MIGRATE`: (src) the entry is migrating; cleared when the core gives up on it.
    public static let migrate: UInt64 = 1 << 1
    /// `MIGRATE_PFN_WRITE`: (src) the source mapping was writable; (dst) the device may write.
    public static let write: UInt64 = 1 << 3
    /// `MIGRATE_PFN_COMPOUND`: the entry stands for a whole PMD-sized folio.
    public static let compound: UInt64 = 1 << 4
    /// `MIGRATE_PFN_SHIFT`.
    public static let shift: UInt64 = 6

    /// The empty entry.
    public static let empty = MigratePFN(rawValue: 0)

    /// `migrate_pfn(pfn)`: a valid entry naming `pfn`, plus `flags`.
    @inlinable public init(_ pfn: PFN, flags: UInt64 = 0) {
        rawValue = pfn.rawValue << Self.shift | Self.valid | flags
    }

    /// The frame, when `valid` is set (`migrate_pfn_to_page`).
    @inlinable public var pfn: PFN? { rawValue & Self.valid != 0 ? PFN(rawValue >> Self.shift) : nil }
    @inlinable public var isMigrating: Bool { rawValue & Self.migrate != 0 }
    @inlinable public var isWritable: Bool { rawValue & Self.write != 0 }
    @inlinable public var isCompound: Bool { rawValue & Self.compound != 0 }

    @inlinable mutating func clearMigrate() { rawValue &= ~Self.migrate }

    public var description: String {
        var s = pfn.map { "\($0)" } ?? "-"
        if isMigrating { s += " migrate" }
        if isWritable { s += " write" }
        if isCompound { s += " compound" }
        return s
    }
}

/// Which pages a ``MigrateVMA`` collects (`enum migrate_vma_direction`).
public struct MigrateSelect: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `MIGRATE_VMA_SELECT_SYSTEM`: system pages, the zero page and holes.
    public static let system = MigrateSelect(rawValue: 1 << 0)
    /// `MIGRATE_VMA_SELECT_DEVICE_PRIVATE`: device-private entries of the owner.
    public static let devicePrivate = MigrateSelect(rawValue: 1 << 1)
    /// `MIGRATE_VMA_SELECT_DEVICE_COHERENT`: device-coherent pages of the owner.
    public static let deviceCoherent = MigrateSelect(rawValue: 1 << 2)
    /// `MIGRATE_VMA_SELECT_COMPOUND`: PMD-sized entries instead of splitting (device THP).
    public static let compound = MigrateSelect(rawValue: 1 << 3)
}
