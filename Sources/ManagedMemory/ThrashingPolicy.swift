import HMM

/// NVIDIA UVM's thrashing detection and mitigation (`uvm_perf_thrashing.c`), per 4 KiB page: a migration
/// of a page within `lapse` of its previous one counts as a thrashing event (a longer gap resets the
/// count); at `threshold` events the page is thrashing. Faults on a thrashing page are throttled (the
/// requester waits `lapse`), and after `pinAfterThrottles` throttles the page is pinned where it is and
/// mapped remotely by the other processor, until `pinDuration` passes. A page whose last thrashing is
/// older than `epoch` starts over.
///
/// Beyond UVM, each detection comes with a **diagnosis**: the advice that would stop it — read-mostly
/// when the device only reads the page (read duplication would serve both), accessed-by when both sides
/// write it (a remote mapping avoids moving it at all).
public struct ThrashingPolicy: Sendable {
    /// UVM's defaults: 3 events within 500 µs, pin after 10 throttles for 150 ms, epoch 1 s.
    public var threshold = 3
    public var lapse: UInt64 = 500_000
    public var pinAfterThrottles = 10
    public var pinDuration: UInt64 = 150_000_000
    public var epoch: UInt64 = 1_000_000_000
    /// Whether to act (throttle, pin) or only detect and diagnose.
    public var mitigate = true

    public init() {}

    /// No detection at all.
    public static let disabled: ThrashingPolicy? = nil
}

/// What a processor did to a page, for thrashing bookkeeping.
public enum PageTouch: Sendable {
    case deviceRead, deviceWrite, cpuRead, cpuWrite
    var isCPU: Bool { self == .cpuRead || self == .cpuWrite }
    var writes: Bool { self == .deviceWrite || self == .cpuWrite }
}

/// One page's thrashing state (UVM's per-page `thrashing_info`): the rule itself, which the manager
/// applies to every page that migrates.
public struct PageThrashing: Sendable {
    var last: UInt64 = 0
    var events = 0
    var lastProcessorCPU = false
    public private(set) var throttles = 0
    public private(set) var pinnedUntil: UInt64 = 0
    public private(set) var thrashing = false
    var detectedAt: UInt64 = 0
    var deviceWrites = false
    var cpuWrites = false

    public init() {}

    /// What the policy decided for a device fault on the page.
    public enum Decision: Equatable, Sendable { case migrate, throttle, pin }

    /// Records a migration caused by `touch` at `now`; returns true when this event made the page
    /// thrashing (the detection to report).
    public mutating func record(_ touch: PageTouch, at now: UInt64, _ p: ThrashingPolicy) -> Bool {
        if thrashing, now &- detectedAt > p.epoch, pinnedUntil < now {
            self = PageThrashing()
        }
        if touch.writes { if touch.isCPU { cpuWrites = true } else { deviceWrites = true } }
        // A migration counts only when the page moves between processors within one lapse.
        let within = last != 0 && now &- last <= p.lapse && lastProcessorCPU != touch.isCPU
        last = now
        lastProcessorCPU = touch.isCPU
        if !within {
            if pinnedUntil < now && !thrashing { events = 0 }
            return false
        }
        events = min(events + 1, 7)
        guard !thrashing, events >= p.threshold else { return false }
        thrashing = true
        detectedAt = now
        return true
    }

    /// The decision for a device fault on the page at `now`.
    public mutating func decide(at now: UInt64, _ p: ThrashingPolicy) -> Decision {
        guard p.mitigate, thrashing else { return .migrate }
        if pinnedUntil > now { return .pin }
        if throttles >= p.pinAfterThrottles {
            throttles = 0
            pinnedUntil = now + p.pinDuration
            return .pin
        }
        throttles += 1
        return .throttle
    }

    /// The advice that would stop the ping-pong.
    public var hint: PolicyEvent.Hint { deviceWrites ? .accessedBy : .readMostly }
}
