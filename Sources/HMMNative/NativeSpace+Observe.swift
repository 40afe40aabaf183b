import CUserfaultfd
import HMM
@_spi(Engine) import HMM

/// The native engine's events (``HMMEvent``), published to its machine's hub while it observes: CPU
/// faults with what they found and how long the faulting thread was stopped, the host's userfaultfd
/// events, exclusive grants and restores, poisoned pages. Each entry point here is reached only after
/// the caller's one relaxed load said the hub observes.
extension NativeSpace {
    /// ``handleFault(_:write:)`` timed and labelled. `thread` is the faulting thread (the message's, or
    /// the caller's in-thread); `readAt` when the service thread read the message (0 in-thread: the
    /// thread was stopped from the fault's start).
    func handleFaultObserved(_ address: UInt64, write: Bool, thread: Int32, readAt: UInt64) -> Bool {
        let a = address & ~PageSize.baseMask
        let (hit, size) = faultHit(a, write: write)
        let start = monotonicNanoseconds()
        let ok = handleFault(address, write: write)
        let end = monotonicNanoseconds()
        let from = readAt != 0 && readAt < start ? readAt : start
        machine.events.publish(.cpuFault(CPUFaultEvent(
            space: eventSpaceID, address: a, access: write ? .write : .read, hit: ok ? hit : .poisoned, size: size,
            thread: thread, start: start, duration: end &- start, blocked: end &- from, succeeded: ok)))
        return ok
    }

    /// What a fault at `a` finds, from the page's state word (read without its lock).
    func faultHit(_ a: UInt64, write: Bool) -> (CPUFaultEvent.Hit, PageSizeClass) {
        guard let region = region(containing: a) else { return (.zeroPage, .base) }
        let i = region.index(a)
        let s = region.state(i)
        if s.isMigrating { return (.migrationWait, s.isCompound ? .huge : .base) }
        switch s.kind {
        case .host:
            if write && region.isHugeAdvised(page: i) { return (.transparentHuge, .huge) }
            return (write ? .newPage : .zeroPage, .base)
        case .device:
            return (isCoherent(s) ? .deviceCoherent : .devicePrivate, s.isCompound ? .huge : .base)
        case .exclusive: return (.deviceExclusive, .base)
        case .revoked: return (.poisoned, .base)
        case .unmapped: return (.spurious, .base)
        }
    }

    /// ``handleEvent(_:)`` timed: a ``HostEvent`` from the message's read to the end of its handling.
    func handleEventObserved(_ m: cu_message) {
        let kind: HostEvent.Kind
        switch Int32(m.kind) {
        case CU_MSG_UNMAP: kind = .unmap
        case CU_MSG_REMOVE: kind = .remove
        case CU_MSG_REMAP: kind = .remap
        case CU_MSG_FORK: kind = .fork
        default: return handleEvent(m)
        }
        let start = m.read_at != 0 ? m.read_at : monotonicNanoseconds()
        handleEvent(m)
        let (lo, hi, target): (UInt64, UInt64, UInt64) = switch kind {
        case .remap: (m.a, m.a &+ m.c, m.b)
        case .fork: (0, 0, 0)
        default: (m.a, m.b, 0)
        }
        machine.events.publish(.host(HostEvent(kind: kind, space: eventSpaceID, start: lo, end: hi, target: target,
                                               timestamp: start, duration: monotonicNanoseconds() &- start)))
    }

    /// A device-exclusive grant or restore of the page at `a`.
    func publishExclusive(_ action: ExclusiveEvent.Action, _ a: UInt64, owner: UInt) {
        guard machine.events.isObserving else { return }
        machine.events.publish(.exclusive(ExclusiveEvent(action: action, space: eventSpaceID, address: a, pages: 1,
                                                         owner: owner, thread: cu_gettid(), timestamp: monotonicNanoseconds())))
    }
}
