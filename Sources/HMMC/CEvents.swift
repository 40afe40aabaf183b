import CHMM
import HMM
#if canImport(Glibc)
import Glibc
#endif

// hmm_events_*: the machine's event stream (``EventHub``), one flat struct per event.

@_cdecl("hmm_events_subscribe")
public func hmmEventsSubscribe(
    _ machineHandle: OpaquePointer?, _ mask: UInt32, _ capacity: UInt32, _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "subscription")
        let (machine, machineID) = try HandleTable.shared.lookup(machineHandle, .machine, as: Machine.self)
        guard mask & ~HMMEventKinds.all.rawValue == 0 else { throw CError(EINVAL, "unknown event kinds in mask \(mask)") }
        let slots = capacity == 0 ? 16384 : Int(capacity)
        guard slots >= 64, slots <= 1 << 20, slots & (slots - 1) == 0 else {
            throw CError(EINVAL, "capacity \(capacity) is not a power of two 64…1048576")
        }
        let subscription = try engine { () throws(HMMError) in
            try machine.events.subscribe(capacity: slots, kinds: HMMEventKinds(rawValue: mask))
        }
        out.pointee = HandleTable.shared.insert(subscription, .subscription, parents: [machineID])
    }
}

@_cdecl("hmm_events_next")
public func hmmEventsNext(_ handle: OpaquePointer?, _ out: UnsafeMutablePointer<hmm_event>?) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "event")
        let (subscription, _) = try HandleTable.shared.lookup(handle, .subscription, as: EventSubscription.self)
        guard let record = subscription.next() else { throw CError(EAGAIN, "no event") }
        out.pointee = flatten(record.event)
    }
}

@_cdecl("hmm_events_dropped")
public func hmmEventsDropped(_ handle: OpaquePointer?, _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "dropped")
        let (subscription, _) = try HandleTable.shared.lookup(handle, .subscription, as: EventSubscription.self)
        out.pointee = UInt64(subscription.droppedTotal)
    }
}

@_cdecl("hmm_events_close")
public func hmmEventsClose(_ handle: OpaquePointer?) -> Int32 {
    cCall { () throws(CError) in
        let (subscription, id) = try HandleTable.shared.lookup(handle, .subscription, as: EventSubscription.self)
        HandleTable.shared.remove(id)
        subscription.cancel()
    }
}

/// Pages covering `[start, end)`.
private func pages(_ start: UInt64, _ end: UInt64) -> UInt64 {
    end > start ? (end - start + UInt64(PageSize.base - 1)) >> UInt64(PageSize.shift) : 0
}

/// One event as `struct hmm_event`.
private func flatten(_ event: HMMEvent) -> hmm_event {
    var e = hmm_event()
    switch event {
    case .cpuFault(let f):
        e.kind = UInt32(HMM_EVENT_CPU_FAULT.rawValue)
        e.detail = f.access == .write ? 1 : 0
        (e.space, e.address, e.pages, e.timestamp_ns, e.duration_ns) = (Int64(f.space), f.address, 1, f.start, f.duration)
    case .migration(let m):
        e.kind = UInt32(HMM_EVENT_MIGRATION.rawValue)
        e.detail = m.to.isSystem ? 0 : 1
        (e.space, e.address, e.pages, e.timestamp_ns) = (Int64(m.space), m.address, UInt64(m.pages), m.begin)
        e.duration_ns = m.end &- m.begin
    case .eviction(let v):
        e.kind = UInt32(HMM_EVENT_EVICTION.rawValue)
        (e.space, e.address, e.pages, e.timestamp_ns) = (Int64(v.space), v.address, UInt64(v.pages), v.timestamp)
    case .invalidation(let i):
        e.kind = UInt32(HMM_EVENT_INVALIDATION.rawValue)
        (e.space, e.address, e.pages, e.duration_ns) = (Int64(i.space), i.start, pages(i.start, i.end), i.duration)
    case .exclusive(let x):
        e.kind = UInt32(HMM_EVENT_EXCLUSIVE.rawValue)
        e.detail = x.action == .grant ? 0 : 1
        (e.space, e.address, e.pages, e.timestamp_ns) = (Int64(x.space), x.address, UInt64(x.pages), x.timestamp)
    case .revoke(let r):
        e.kind = UInt32(HMM_EVENT_REVOKE.rawValue)
        e.detail = r.reason == .peerUnbind ? 1 : 0
        (e.space, e.address, e.pages, e.timestamp_ns) = (Int64(r.space), r.address, UInt64(r.pages), r.timestamp)
    case .host(let h):
        e.kind = UInt32(HMM_EVENT_HOST.rawValue)
        e.detail = UInt32(h.kind.rawValue)
        (e.space, e.address, e.pages, e.timestamp_ns, e.duration_ns) = (Int64(h.space), h.start, pages(h.start, h.end), h.timestamp, h.duration)
    case .policy(let p):
        e.kind = UInt32(HMM_EVENT_POLICY.rawValue)
        e.detail = UInt32(p.kind.rawValue)
        (e.space, e.address, e.timestamp_ns) = (Int64(p.space), p.address, p.timestamp)
        e.pages = (UInt64(p.bytes) + UInt64(PageSize.base - 1)) >> UInt64(PageSize.shift)
    }
    return e
}
