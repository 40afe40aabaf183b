/// One 64-bit page-table word, encoded like x86-64 entries and the kernel's swap-format entries.
///
/// Present entries: bit 0 present, 1 write, 2 user (clear for `PROT_NONE`), 5 young, 6 dirty, 7 huge
/// (PMD leaf), 8 table (points at the next-level node), 9 special (no struct page: zero page), 10
/// soft-dirty, bits 12…51 the PFN (or the node number of a table). Non-present entries keep bit 0 clear
/// and carry a ``Kind`` in bits 1…4, the PFN in bits 12…51, young/dirty (migration entries only), huge and
/// soft-dirty in the same positions as present entries.
public struct PageTableEntry: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// What an entry is.
    public enum Kind: UInt64, Sendable {
        case none = 0
        /// Maps a page (or a 2 MiB folio at PMD level) the CPU can access.
        case present = 100
        /// Points at a next-level table.
        case table = 101
        /// Non-present: migration of a page that was mapped read-only and shared.
        case migrationRead = 1
        /// Non-present: migration of a read-only, anon-exclusive page.
        case migrationReadExclusive = 2
        /// Non-present: migration of a writable page.
        case migrationWrite = 3
        /// Non-present: a device-private page, read-only.
        case devicePrivateRead = 4
        /// Non-present: a device-private page, writable.
        case devicePrivateWrite = 5
        /// Non-present: a system page held exclusively by a device (atomics).
        case deviceExclusive = 6
        /// Non-present: a poisoned page; access raises `SIGBUS`.
        case hwpoison = 7
    }

    static let presentBit: UInt64 = 1 << 0
    static let writeBit: UInt64 = 1 << 1
    static let userBit: UInt64 = 1 << 2
    static let youngBit: UInt64 = 1 << 5
    static let dirtyBit: UInt64 = 1 << 6
    static let hugeBit: UInt64 = 1 << 7
    static let tableBit: UInt64 = 1 << 8
    static let specialBit: UInt64 = 1 << 9
    static let softDirtyBit: UInt64 = 1 << 10
    static let typeShift: UInt64 = 1
    static let typeMask: UInt64 = 0xF << 1
    static let pfnShift: UInt64 = 12
    static let pfnMask: UInt64 = ((1 << 40) - 1) << 12

    /// The empty entry (`pte_none`).
    public static let none = PageTableEntry(rawValue: 0)

    // MARK: constructors

    /// A present leaf mapping `pfn`.
    @inlinable
    public static func present(
        _ pfn: PFN, writable: Bool, user: Bool = true, young: Bool = true, dirty: Bool = false,
        huge: Bool = false, special: Bool = false
    ) -> PageTableEntry {
        var v: UInt64 = 1 | (pfn.rawValue << 12)
        if writable { v |= 1 << 1 }
        if user { v |= 1 << 2 }
        if young { v |= 1 << 5 }
        if dirty { v |= 1 << 6 | 1 << 10 }  // `pte_mkdirty` also marks the entry soft-dirty
        if huge { v |= 1 << 7 }
        if special { v |= 1 << 9 }
        return PageTableEntry(rawValue: v)
    }

    static func table(_ node: UInt32) -> PageTableEntry {
        PageTableEntry(rawValue: presentBit | tableBit | (UInt64(node) << pfnShift))
    }

    /// A non-present (swap-format) entry of `kind` for `pfn`.
    public static func nonPresent(
        _ kind: Kind, _ pfn: PFN, young: Bool = false, dirty: Bool = false, huge: Bool = false
    ) -> PageTableEntry {
        precondition(kind.rawValue >= 1 && kind.rawValue <= 15, "not a non-present kind")
        var v = (kind.rawValue << typeShift) | (pfn.rawValue << pfnShift)
        if young { v |= youngBit }
        if dirty { v |= dirtyBit }
        if huge { v |= hugeBit }
        return PageTableEntry(rawValue: v)
    }

    // MARK: decoding

    @inlinable public var isNone: Bool { rawValue == 0 }
    @inlinable public var isPresent: Bool { rawValue & 1 != 0 }
    public var isTable: Bool { rawValue & (Self.presentBit | Self.tableBit) == (Self.presentBit | Self.tableBit) }
    /// A present leaf (not a table pointer).
    @inlinable public var isLeaf: Bool { rawValue & 0x101 == 1 }
    public var isNonPresent: Bool { rawValue != 0 && rawValue & 1 == 0 }

    public var kind: Kind {
        if rawValue == 0 { return .none }
        if isPresent { return isTable ? .table : .present }
        return Kind(rawValue: (rawValue & Self.typeMask) >> Self.typeShift) ?? .none
    }

    @inlinable public var pfn: PFN { PFN((rawValue & 0x000F_FFFF_FFFF_F000) >> 12) }
    var node: UInt32 { UInt32(truncatingIfNeeded: (rawValue & Self.pfnMask) >> Self.pfnShift) }

    @inlinable public var isWritable: Bool { rawValue & 0b11 == 0b11 }
    /// Accessible at all (present and not `PROT_NONE`).
    @inlinable public var isUser: Bool { rawValue & 0b101 == 0b101 }
    public var isYoung: Bool { rawValue & Self.youngBit != 0 }
    public var isDirty: Bool { rawValue & Self.dirtyBit != 0 }
    public var isHuge: Bool { rawValue & Self.hugeBit != 0 }
    public var isSpecial: Bool { isPresent && rawValue & Self.specialBit != 0 }
    public var isSoftDirty: Bool { rawValue & Self.softDirtyBit != 0 }

    public var isMigration: Bool {
        let k = kind
        return k == .migrationRead || k == .migrationReadExclusive || k == .migrationWrite
    }

    public var isDevicePrivate: Bool {
        let k = kind
        return k == .devicePrivateRead || k == .devicePrivateWrite
    }

    // MARK: modifiers

    func with(_ bit: UInt64, _ on: Bool) -> PageTableEntry {
        PageTableEntry(rawValue: on ? rawValue | bit : rawValue & ~bit)
    }
    func writable(_ on: Bool) -> PageTableEntry { with(Self.writeBit, on) }
    func user(_ on: Bool) -> PageTableEntry { with(Self.userBit, on) }
    func young(_ on: Bool) -> PageTableEntry { with(Self.youngBit, on) }
    /// Sets or clears the dirty bit; setting it also sets soft-dirty (`pte_mkdirty`), clearing it
    /// leaves soft-dirty alone (`pte_mkclean`).
    func dirty(_ on: Bool) -> PageTableEntry { on ? with(Self.dirtyBit | Self.softDirtyBit, true) : with(Self.dirtyBit, false) }
    func softDirty(_ on: Bool) -> PageTableEntry { with(Self.softDirtyBit, on) }
    func huge(_ on: Bool) -> PageTableEntry { with(Self.hugeBit, on) }
    func withPFN(_ pfn: PFN) -> PageTableEntry {
        PageTableEntry(rawValue: (rawValue & ~Self.pfnMask) | (pfn.rawValue << Self.pfnShift))
    }

    public var description: String {
        switch kind {
        case .none: return "none"
        case .table: return "table(\(node))"
        case .present:
            var s = "present(\(hex(pfn.rawValue))"
            s += isUser ? (isWritable ? " rw" : " ro") : " none"
            if isHuge { s += " huge" }
            if isSpecial { s += " special" }
            if isDirty { s += " dirty" }
            return s + ")"
        default:
            return "\(kind)(\(hex(pfn.rawValue))\(isHuge ? " huge" : ""))"
        }
    }
}
