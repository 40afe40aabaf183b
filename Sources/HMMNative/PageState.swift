import HMM

/// What the host page table cannot say about one 4 KiB page of a native region: one 64-bit word,
/// changed only by compare-and-swap, whose `migrating` bit is the page lock (the folio lock of the
/// simulated engine's lock order, for pages the host owns).
///
/// ```
/// bits 0-2  kind   host · device (a private or coherent device frame) · exclusive (parked in a staging
///                  RAM frame) · revoked (a poison marker is installed) · unmapped
/// bit  3    migrating: locked by a migration, a fault resolution or an event
/// bit  4    writable: the device copy may be written (MIGRATE_PFN_WRITE of the migration)
/// bit  5    compound: one of the 512 pages of a 2 MiB device folio held as one unit
/// bit  6    zapped: a MADV_DONTNEED/MADV_FREE event covered the page; whoever locks it next (or the
///           holder, as it unlocks) drops its contents first
/// bit  7    zap pending (host words only): the zapped mark was applied, but the host's own zap of the
///           page may not have run yet — the host wakes the `madvise` caller when its event is read
///           and zaps afterwards. A present page so marked is never taken out of the process
///           (collected for migration, made exclusive): its bytes would outlive the zap. Cleared when
///           a fault fills the page (the host saw the hole) or a collection finds it a hole.
/// bit  8    away (device words of a coherent frame only): not mapped in place — a `.share` fork gave
///           the child a copy, and the parent's page became copy-on-write; its first CPU touch brings
///           it to RAM, as the kernel's write to a COW-shared device-coherent page does
/// bits 12-  PFN: the device frame (device), the staging frame (exclusive), else 0
/// ```
///
/// A `device` or `exclusive` word holds one reference on its frame's folio — a compound unit one for
/// all 512 words, on its head. `host` means the host page table is the truth: the page may be present,
/// the zero page, part of a THP, or never touched.
struct PageState: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    var rawValue: UInt64

    enum Kind: UInt64 {
        case host = 0
        case device = 1
        case exclusive = 3
        case revoked = 4
        case unmapped = 5
    }

    static let migratingBit: UInt64 = 1 << 3
    static let writableBit: UInt64 = 1 << 4
    static let compoundBit: UInt64 = 1 << 5
    static let zappedBit: UInt64 = 1 << 6
    static let zapPendingBit: UInt64 = 1 << 7
    static let awayBit: UInt64 = 1 << 8
    static let pfnShift: UInt64 = 12

    static let host = PageState(rawValue: 0)
    static let unmapped = PageState(rawValue: Kind.unmapped.rawValue)

    init(rawValue: UInt64) { self.rawValue = rawValue }

    init(_ kind: Kind, pfn: PFN = PFN(0), writable: Bool = false, compound: Bool = false) {
        rawValue = kind.rawValue | pfn.rawValue << Self.pfnShift | (writable ? Self.writableBit : 0)
            | (compound ? Self.compoundBit : 0)
    }

    var kind: Kind { Kind(rawValue: rawValue & 7) ?? .host }
    var isMigrating: Bool { rawValue & Self.migratingBit != 0 }
    var isWritable: Bool { rawValue & Self.writableBit != 0 }
    var isCompound: Bool { rawValue & Self.compoundBit != 0 }
    var isZapped: Bool { rawValue & Self.zappedBit != 0 }
    var isZapPending: Bool { rawValue & Self.zapPendingBit != 0 }
    var isAway: Bool { rawValue & Self.awayBit != 0 }
    var pfn: PFN { PFN(rawValue >> Self.pfnShift) }

    /// The same word with the lock bit set.
    var locked: PageState { PageState(rawValue: rawValue | Self.migratingBit) }
    /// The same word with the lock bit clear.
    var unlocked: PageState { PageState(rawValue: rawValue & ~Self.migratingBit) }

    var description: String {
        "\(kind)\(isMigrating ? " migrating" : "")\(isWritable ? " w" : "")\(isCompound ? " compound" : "")\(isZapped ? " zapped" : "")"
            + (isZapPending ? " zap-pending" : "") + (isAway ? " away" : "")
            + (pfn.rawValue != 0 ? " \(pfn)" : "")
    }
}
