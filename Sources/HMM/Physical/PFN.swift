/// A page frame number: the index of a 4 KiB physical frame. System RAM occupies PFNs `0 ..< ramFrames`;
/// device pagemaps are registered above it.
public struct PFN: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ value: UInt64) { self.rawValue = value }
    @inlinable public static func < (a: PFN, b: PFN) -> Bool { a.rawValue < b.rawValue }
    @inlinable public static func + (a: PFN, n: Int) -> PFN { PFN(a.rawValue &+ UInt64(n)) }
    public var description: String { "pfn " + hex(rawValue) }
}

/// Page-size constants of the simulated machine (x86-64 with 4-level paging).
public enum PageSize {
    public static let shift = 12
    /// 4 KiB.
    public static let base = 1 << shift
    public static let pmdShift = 21
    /// 2 MiB: the PMD mapping size, the THP size and the hugetlb page size.
    public static let pmd = 1 << pmdShift
    /// Pages in a PMD-sized folio (`HPAGE_PMD_NR`).
    public static let pagesPerPMD = pmd / base
    /// The PMD order (`HPAGE_PMD_ORDER`).
    public static let pmdOrder = pmdShift - shift
    /// 4 KiB as an address offset (`address + PageSize.baseOffset`): addresses are `UInt64`, lengths `Int`.
    public static let baseOffset = UInt64(base)
    /// 2 MiB as an address offset.
    public static let pmdOffset = UInt64(pmd)
    /// `pages` base pages as an address offset (`address + PageSize.offset(pages: 3)`).
    @inlinable public static func offset(pages: Int) -> UInt64 { UInt64(pages) << UInt64(shift) }
    @_spi(Engine) public static let baseMask: UInt64 = UInt64(base - 1)
    @_spi(Engine) public static let pmdMask: UInt64 = UInt64(pmd - 1)
}
