/// One thing the memory manager did, as a subscriber of an ``EventHub`` sees it. Each kind has a type of
/// its own with the fields that explain it; every field is a plain value, so an event is copied into a
/// subscriber's ring without a reference count or an allocation.
///
/// Times are `CLOCK_MONOTONIC` nanoseconds (``monotonicNanoseconds()``); threads are kernel thread ids
/// (`gettid`); address spaces are ``AddressSpace/id`` (simulated) or ``MirroredAddressSpace/eventSpaceID``.
public enum HMMEvent: Sendable, Equatable {
    /// A CPU fault: a load or store that found no usable mapping (`handle_mm_fault`).
    case cpuFault(CPUFaultEvent)
    /// Pages moved between memories (`migrate_vma`, `migrate_device_range`, native moves).
    case migration(MigrationEvent)
    /// A device gave up a page to make room for another (published by a driver or a policy).
    case eviction(EvictionEvent)
    /// Interval notifiers heard an invalidation (`mmu_notifier_invalidate_range_start`).
    case invalidation(InvalidationEvent)
    /// A device-exclusive entry was granted or restored.
    case exclusive(ExclusiveEvent)
    /// Memory was taken away from its users: P2PDMA unbind, or a native page poisoned.
    case revoke(RevokeEvent)
    /// The host kernel's userfaultfd told the native engine about a change it made (native mode).
    case host(HostEvent)
    /// A managed-memory policy decided something (prefetch, eviction, thrashing, pinning…).
    case policy(PolicyEvent)

    /// The kind, for filtering and for the per-kind dropped counts.
    public var kind: HMMEventKind {
        switch self {
        case .cpuFault: return .cpuFault
        case .migration: return .migration
        case .eviction: return .eviction
        case .invalidation: return .invalidation
        case .exclusive: return .exclusive
        case .revoke: return .revoke
        case .host: return .host
        case .policy: return .policy
        }
    }

    /// When it happened (its start, for events with a duration).
    public var timestamp: UInt64 {
        switch self {
        case .cpuFault(let e): return e.start
        case .migration(let e): return e.begin
        case .eviction(let e): return e.timestamp
        case .invalidation(let e): return e.startTime
        case .exclusive(let e): return e.timestamp
        case .revoke(let e): return e.timestamp
        case .host(let e): return e.timestamp
        case .policy(let e): return e.timestamp
        }
    }
}

/// The kinds of ``HMMEvent``.
public enum HMMEventKind: Int, CaseIterable, Sendable, CustomStringConvertible {
    case cpuFault, migration, eviction, invalidation, exclusive, revoke, host, policy

    public var description: String {
        ["cpu_fault", "migration", "eviction", "invalidation", "exclusive", "revoke", "host", "policy"][rawValue]
    }
}

/// A set of ``HMMEventKind``s, for subscribing to some.
public struct HMMEventKinds: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public init(_ kind: HMMEventKind) { rawValue = 1 << UInt32(kind.rawValue) }
    public static let all = HMMEventKinds(rawValue: (1 << UInt32(HMMEventKind.allCases.count)) - 1)
    public func contains(_ kind: HMMEventKind) -> Bool { rawValue & (1 << UInt32(kind.rawValue)) != 0 }
}

/// The two page sizes counters and events are split by (Intel Xe's size classes, less 64 KiB).
public enum PageSizeClass: Int, CaseIterable, Sendable, CustomStringConvertible {
    case base
    case huge
    public var bytes: Int { self == .base ? PageSize.base : PageSize.pmd }
    public var description: String { self == .base ? "4K" : "2M" }
}

/// What a memory access wanted.
public enum MemoryAccess: UInt8, Sendable, CustomStringConvertible {
    case read, write
    /// Break copy-on-write sharing without asking for write access (before a read-only pin).
    case unshare
    public var description: String { ["read", "write", "unshare"][Int(rawValue)] }
}

/// A memory a page can live in: system RAM, or a device's memory (the pagemaps registered with one owner).
public struct MemoryLocation: Hashable, Sendable, CustomStringConvertible {
    /// The identity of the pagemaps' owner (the driver), or 0 for system RAM.
    public let device: UInt
    /// The kind of device memory, nil for system RAM.
    public let kind: PagemapKind?

    public static let system = MemoryLocation(device: 0, kind: nil)

    public init(device: UInt, kind: PagemapKind?) {
        self.device = device
        self.kind = kind
    }

    /// The memory of `pagemap`'s owner.
    public init(_ pagemap: Pagemap) {
        self.init(device: pagemap.ownerIdentity, kind: pagemap.kind)
    }

    public var isSystem: Bool { kind == nil }

    public var description: String {
        guard let kind else { return "system" }
        return "\(kind)@\(String(device, radix: 16))"
    }
}

/// A CPU fault. `duration` covers the whole resolution, a migration back from a device included; in native
/// mode `blocked` is how long the faulting thread waited in the kernel (from the message's read to its
/// wake-up; in-thread faults block for their whole duration).
public struct CPUFaultEvent: Sendable, Equatable {
    /// What the fault found where the page should be.
    public enum Hit: UInt8, CaseIterable, Sendable, CustomStringConvertible {
        /// Nothing, read: the shared zero page is mapped.
        case zeroPage
        /// Nothing, write: a new zeroed page.
        case newPage
        /// A read-only page that is shared: copied (`do_wp_page`).
        case copyOnWrite
        /// A read-only page with one user: made writable where it is.
        case reuse
        /// A file page (page cache, shared memory).
        case file
        /// A device-private entry: the page migrates back to RAM (`do_swap_page`).
        case devicePrivate
        /// A device-coherent page mapped in place.
        case deviceCoherent
        /// A device-exclusive entry: restored (`remove_device_exclusive_entry`).
        case deviceExclusive
        /// A migration entry: waits for the migration to end.
        case migrationWait
        /// Nothing, in a THP-eligible range: a transparent huge page.
        case transparentHuge
        /// Nothing, read, THP-eligible: the huge zero page.
        case hugeZeroPage
        /// A hugetlb mapping.
        case hugetlb
        /// Poison: the access fails (`SIGBUS`).
        case poisoned
        /// A present, sufficient entry: another thread resolved it first.
        case spurious

        public var description: String {
            ["zero_page", "new_page", "cow", "reuse", "file", "device_private", "device_coherent",
             "device_exclusive", "migration_wait", "thp", "huge_zero_page", "hugetlb", "poisoned", "spurious"][Int(rawValue)]
        }
    }

    public var space: Int
    public var address: UInt64
    public var access: MemoryAccess
    public var hit: Hit
    public var size: PageSizeClass
    public var thread: Int32
    public var start: UInt64
    public var duration: UInt64
    /// Nanoseconds the faulting thread was stopped; equals `duration` where the faulting thread resolves
    /// its own fault.
    public var blocked: UInt64
    /// Whether the access may go on (false: it fails, as `SIGSEGV` or `SIGBUS`).
    public var succeeded: Bool

    public init(space: Int, address: UInt64, access: MemoryAccess, hit: Hit, size: PageSizeClass, thread: Int32,
                start: UInt64, duration: UInt64, blocked: UInt64, succeeded: Bool) {
        self.space = space
        self.address = address
        self.access = access
        self.hit = hit
        self.size = size
        self.thread = thread
        self.start = start
        self.duration = duration
        self.blocked = blocked
        self.succeeded = succeeded
    }
}

/// Why pages migrated (UVM's migration causes, AMD's triggers).
public enum MigrationCause: UInt8, CaseIterable, Sendable, CustomStringConvertible {
    /// A driver or user asked for it (`migrate_vma` from an ioctl).
    case explicit
    /// A CPU touched a device-private page (`migrate_to_ram`).
    case cpuFault
    /// A device touched a page it wanted local.
    case deviceFault
    /// A prefetch policy moved it ahead of use.
    case prefetch
    /// Room was needed on the device.
    case eviction
    /// Device memory went away (chunk freed, device removed, file closed): `migrate_device_range`.
    case release
    /// Kept coherent: a device-coherent page moved out of the way (long-term pin, in-place mapping).
    case coherence

    public var description: String {
        ["explicit", "cpu_fault", "device_fault", "prefetch", "eviction", "release", "coherence"][Int(rawValue)]
    }
}

/// A migration: one `migrate_vma` (or `migrate_device_range`) from setup to finalize. The phases split its
/// time as Xe's counters do: `collect` (setup: lock and unmap the sources), `copy` (the driver allocating
/// and copying between setup and pages) and `finalize` (pages and finalize: move metadata, remap, free).
/// Phase times are recorded only while the hub observes.
public struct MigrationEvent: Sendable, Equatable {
    public var cause: MigrationCause
    public var from: MemoryLocation
    public var to: MemoryLocation
    /// The address space (0 for `migrate_device_range`, which works on frames).
    public var space: Int
    /// First address of the range asked for (0 for `migrate_device_range`).
    public var address: UInt64
    /// 4 KiB pages that moved, and pages asked for that did not.
    public var pages: Int
    public var failedPages: Int
    /// Whether 2 MiB folios moved whole.
    public var size: PageSizeClass
    public var thread: Int32
    public var begin: UInt64
    public var collect: UInt64
    public var copy: UInt64
    public var finalize: UInt64
    /// Pages in use afterwards in the device pagemap the migration touched (its slot; 0 for none):
    /// summed per device, what a timeline draws as resident bytes.
    public var pagemapSlot: Int
    public var pagemapPagesInUse: Int

    public var bytes: Int { pages << PageSize.shift }
    public var end: UInt64 { begin &+ collect &+ copy &+ finalize }

    public init(cause: MigrationCause, from: MemoryLocation, to: MemoryLocation, space: Int, address: UInt64,
                pages: Int, failedPages: Int, size: PageSizeClass, thread: Int32, begin: UInt64, collect: UInt64,
                copy: UInt64, finalize: UInt64, pagemapSlot: Int, pagemapPagesInUse: Int) {
        self.cause = cause
        self.from = from
        self.to = to
        self.space = space
        self.address = address
        self.pages = pages
        self.failedPages = failedPages
        self.size = size
        self.thread = thread
        self.begin = begin
        self.collect = collect
        self.copy = copy
        self.finalize = finalize
        self.pagemapSlot = pagemapSlot
        self.pagemapPagesInUse = pagemapPagesInUse
    }
}

/// A device evicted `address` to make room, because `neededBy` wanted device memory (UVM's Eviction
/// {addressOut, addressIn}).
public struct EvictionEvent: Sendable, Equatable {
    public var device: MemoryLocation
    public var space: Int
    public var address: UInt64
    public var pages: Int
    /// The address whose need caused the eviction; nil when none is known (a budget shrink).
    public var neededBy: UInt64?
    public var timestamp: UInt64

    public init(device: MemoryLocation, space: Int, address: UInt64, pages: Int, neededBy: UInt64?, timestamp: UInt64) {
        self.device = device
        self.space = space
        self.address = address
        self.pages = pages
        self.neededBy = neededBy
        self.timestamp = timestamp
    }
}

/// Interval notifiers were told `[start, end)` of `space` is changing; `notifiers` callbacks ran for
/// `duration` nanoseconds. Only invalidations some notifier overlaps are events.
public struct InvalidationEvent: Sendable, Equatable {
    public var event: NotifierEvent
    public var space: Int
    public var start: UInt64
    public var end: UInt64
    /// The identity of the driver on whose behalf (migrate, exclusive), or 0.
    public var owner: UInt
    public var notifiers: Int
    public var thread: Int32
    /// When the callbacks began, and how long they took.
    public var startTime: UInt64
    public var duration: UInt64

    public init(event: NotifierEvent, space: Int, start: UInt64, end: UInt64, owner: UInt, notifiers: Int,
                thread: Int32, startTime: UInt64, duration: UInt64) {
        self.event = event
        self.space = space
        self.start = start
        self.end = end
        self.owner = owner
        self.notifiers = notifiers
        self.thread = thread
        self.startTime = startTime
        self.duration = duration
    }
}

/// A device-exclusive entry granted (`make_device_exclusive`) or restored by a CPU touch.
public struct ExclusiveEvent: Sendable, Equatable {
    public enum Action: UInt8, Sendable, CustomStringConvertible {
        case grant, restore
        public var description: String { self == .grant ? "grant" : "restore" }
    }
    public var action: Action
    public var space: Int
    public var address: UInt64
    public var pages: Int
    public var owner: UInt
    public var thread: Int32
    public var timestamp: UInt64

    public init(action: Action, space: Int, address: UInt64, pages: Int, owner: UInt, thread: Int32, timestamp: UInt64) {
        self.action = action
        self.space = space
        self.address = address
        self.pages = pages
        self.owner = owner
        self.thread = thread
        self.timestamp = timestamp
    }
}

/// Memory taken from its users.
public struct RevokeEvent: Sendable, Equatable {
    public enum Reason: UInt8, Sendable, CustomStringConvertible {
        /// A P2PDMA provider unbound: its mappings were zapped (`p2pdma` unbind).
        case peerUnbind
        /// A native page whose driver could not bring it back was poisoned (`SIGBUS` on touch).
        case poison
        public var description: String { self == .peerUnbind ? "p2pdma_unbind" : "poison" }
    }
    public var reason: Reason
    public var space: Int
    /// The page poisoned (0 for an unbind, which revokes whole mappings).
    public var address: UInt64
    /// Pages poisoned, or for an unbind the mappings of this space revoked.
    public var pages: Int
    public var mappings: Int
    public var timestamp: UInt64

    public init(reason: Reason, space: Int, address: UInt64, pages: Int, mappings: Int, timestamp: UInt64) {
        self.reason = reason
        self.space = space
        self.address = address
        self.pages = pages
        self.mappings = mappings
        self.timestamp = timestamp
    }
}

/// A non-cooperative userfaultfd event the native engine handled (its MMU-notifier events).
public struct HostEvent: Sendable, Equatable {
    public enum Kind: UInt8, Sendable, CustomStringConvertible {
        /// `munmap`.
        case unmap
        /// `MADV_DONTNEED` / `MADV_FREE`.
        case remove
        /// `mremap`.
        case remap
        /// `fork` (with the `.share` policy).
        case fork
        public var description: String { ["unmap", "remove", "remap", "fork"][Int(rawValue)] }
    }
    public var kind: Kind
    public var space: Int
    public var start: UInt64
    public var end: UInt64
    /// For a remap: the new start.
    public var target: UInt64
    /// When the event was read, and how long the engine took to handle it — the calling thread (of
    /// `munmap`, `madvise`, `mremap`, `fork`) was held up by the kernel until the read, and its later
    /// faults wait for the handling.
    public var timestamp: UInt64
    public var duration: UInt64

    public init(kind: Kind, space: Int, start: UInt64, end: UInt64, target: UInt64, timestamp: UInt64, duration: UInt64) {
        self.kind = kind
        self.space = space
        self.start = start
        self.end = end
        self.target = target
        self.timestamp = timestamp
        self.duration = duration
    }
}

/// A decision of a managed-memory policy (UVM's ThrashingDetected, Throttling{Start,End}, MapRemote…, and a
/// diagnosis no anchor has).
public struct PolicyEvent: Sendable, Equatable {
    public enum Kind: UInt8, CaseIterable, Sendable, CustomStringConvertible {
        case prefetch, evict, thrashingDetected, throttleStart, throttleEnd, pin, unpin, remoteMap, diagnosis
        public var description: String {
            ["prefetch", "evict", "thrashing_detected", "throttle_start", "throttle_end", "pin", "unpin",
             "remote_map", "diagnosis"][Int(rawValue)]
        }
    }
    /// The advice a diagnosis names as the one that would stop what it saw.
    public enum Hint: UInt8, Sendable, CustomStringConvertible {
        case none, readMostly, accessedBy, preferredLocation
        public var description: String { ["none", "read_mostly", "accessed_by", "preferred_location"][Int(rawValue)] }
    }
    public var kind: Kind
    public var space: Int
    public var address: UInt64
    public var bytes: Int
    /// The processor concerned (a device's memory, or system for the CPU).
    public var processor: MemoryLocation
    public var hint: Hint
    public var timestamp: UInt64

    public init(kind: Kind, space: Int, address: UInt64, bytes: Int, processor: MemoryLocation, hint: Hint = .none,
                timestamp: UInt64) {
        self.kind = kind
        self.space = space
        self.address = address
        self.bytes = bytes
        self.processor = processor
        self.hint = hint
        self.timestamp = timestamp
    }
}
