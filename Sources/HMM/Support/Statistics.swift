import Synchronization

/// Event counters of a ``Machine`` (the kernel's `vmstat` events), updated with relaxed atomics.
public final class Statistics: @unchecked Sendable {
    /// One counter.
    public enum Counter: Int, CaseIterable, Sendable, CustomStringConvertible {
        case faultAnonZeroPage, faultAnonNew, faultCOWCopy, faultCOWReuse, faultUnshare
        case faultFile, faultShared, faultTHP, faultHugeZero, faultHugetlb, faultMigrationWait
        case thpSplitPMD, thpSplitFolio, thpCollapse, forkPinnedCopy, forks, exits
        case faultDevicePrivate, faultDevicePrivateWait, faultDeviceExclusive
        case migrateSuccess, migrateFail, migrateDeviceEvicted
        case gupFastPages, gupFastFallback, p2pPagesMapped, p2pMappingsRevoked

        public var description: String {
            switch self {
            case .faultAnonZeroPage: return "fault.anon.zero_page"
            case .faultAnonNew: return "fault.anon.new_page"
            case .faultCOWCopy: return "fault.cow.copy"
            case .faultCOWReuse: return "fault.cow.reuse"
            case .faultUnshare: return "fault.unshare"
            case .faultFile: return "fault.file"
            case .faultShared: return "fault.shared"
            case .faultTHP: return "fault.thp"
            case .faultHugeZero: return "fault.huge_zero_page"
            case .faultHugetlb: return "fault.hugetlb"
            case .faultMigrationWait: return "fault.migration_wait"
            case .thpSplitPMD: return "thp.split_pmd"
            case .thpSplitFolio: return "thp.split_folio"
            case .thpCollapse: return "thp.collapse"
            case .forkPinnedCopy: return "fork.pinned_copy"
            case .forks: return "fork"
            case .exits: return "exit"
            case .faultDevicePrivate: return "fault.device_private"
            case .faultDevicePrivateWait: return "fault.device_private.wait"
            case .faultDeviceExclusive: return "fault.device_exclusive"
            case .migrateSuccess: return "migrate.success"
            case .migrateFail: return "migrate.fail"
            case .migrateDeviceEvicted: return "migrate_device.evicted"
            case .gupFastPages: return "gup.fast.pages"
            case .gupFastFallback: return "gup.fast.fallback"
            case .p2pPagesMapped: return "p2pdma.pages_mapped"
            case .p2pMappingsRevoked: return "p2pdma.mappings_revoked"
            }
        }
    }

    private let slots: UnsafeMutablePointer<Atomic<Int>>

    init() {
        slots = .allocate(capacity: Counter.allCases.count)
        for i in 0..<Counter.allCases.count { (slots + i).initialize(to: Atomic(0)) }
    }

    deinit { slots.deallocate() }

    @inline(__always) func count(_ c: Counter, _ n: Int = 1) {
        slots[c.rawValue].wrappingAdd(n, ordering: .relaxed)
    }

    /// The current value of a counter.
    public subscript(_ c: Counter) -> Int { slots[c.rawValue].load(ordering: .relaxed) }

    /// All counters at once.
    public var snapshot: [(Counter, Int)] { Counter.allCases.map { ($0, self[$0]) } }
}
