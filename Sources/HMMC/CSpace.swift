import CHMM
import HMM
import HMMNative
import Logging
#if canImport(Glibc)
import Glibc
#endif

// hmm_space_*: the native space of a machine.

@_cdecl("hmm_space_create")
public func hmmSpaceCreate(
    _ machineHandle: OpaquePointer?, _ options: UnsafePointer<hmm_space_options>?, _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "space")
        let (machine, machineID) = try HandleTable.shared.lookup(machineHandle, .machine, as: Machine.self)
        var o = NativeSpace.Options()
        // A library never writes to its host program's stderr: the engine's log goes nowhere.
        o.logger = Logger(label: "swift-hmm.native", factory: { _ in SwiftLogNoOpLogHandler() })
        if let options {
            guard options.pointee.size >= UInt32(MemoryLayout<hmm_space_options>.size) else {
                throw CError(EINVAL, "hmm_space_options.size \(options.pointee.size) is smaller than this version's struct")
            }
            switch options.pointee.fault_mode {
            case Int32(HMM_FAULT_HANDLER_THREAD.rawValue): o.faultMode = .handlerThread
            case Int32(HMM_FAULT_IN_THREAD.rawValue): o.faultMode = .inThread
            default: throw CError(EINVAL, "unknown fault mode \(options.pointee.fault_mode)")
            }
            switch options.pointee.fork_policy {
            case Int32(HMM_FORK_DENY.rawValue): o.forkPolicy = .deny
            case Int32(HMM_FORK_SHARE.rawValue): o.forkPolicy = .share
            default: throw CError(EINVAL, "unknown fork policy \(options.pointee.fork_policy)")
            }
            let around = options.pointee.fault_around_pages
            guard around >= 0, around <= 512 else { throw CError(EINVAL, "fault-around of \(around) pages is not 0…512") }
            if around > 0 { o.faultAroundPages = Int(around) }
        }
        if HandleTable.shared.children(of: machineID).contains(where: { $0.1.kind == .space }) {
            throw CError(EEXIST, "the machine already has a space")
        }
        let space = try engine { () throws(HMMError) in try NativeSpace(machine: machine, options: o) }
        out.pointee = HandleTable.shared.insert(space, .space, parents: [machineID])
    }
}

@_cdecl("hmm_space_close")
public func hmmSpaceClose(_ handle: OpaquePointer?) -> Int32 {
    cCall { () throws(CError) in
        let (space, id) = try HandleTable.shared.lookup(handle, .space, as: NativeSpace.self)
        // Mirrors of the space close first (their notifiers), then the regions' handles go.
        for (child, entry) in HandleTable.shared.children(of: id) {
            if let mirror = entry.object as? MirrorHandle { mirror.file.close() }
            HandleTable.shared.remove(child)
        }
        HandleTable.shared.remove(id)
        try engine { () throws(HMMError) in try space.close() }
    }
}

@_cdecl("hmm_space_unmap")
public func hmmSpaceUnmap(_ handle: OpaquePointer?, _ address: UInt64, _ length: UInt64) -> Int32 {
    cCall { () throws(CError) in
        let (space, _) = try HandleTable.shared.lookup(handle, .space, as: NativeSpace.self)
        let n = try pageCount(length, "unmap length")
        try engine { () throws(HMMError) in try space.unmap(address: address, length: n) }
    }
}

@_cdecl("hmm_space_find_region")
public func hmmSpaceFindRegion(_ handle: OpaquePointer?, _ address: UInt64, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "region")
        let (space, id) = try HandleTable.shared.lookup(handle, .space, as: NativeSpace.self)
        guard let region = space.region(containing: address) else {
            throw CError(ENOENT, "no region of the space contains \(address)")
        }
        out.pointee = HandleTable.shared.handle(for: region, .region, parents: [id])
    }
}

@_cdecl("hmm_space_counters")
public func hmmSpaceCounters(_ handle: OpaquePointer?, _ out: UnsafeMutablePointer<hmm_space_counters>?) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "counters")
        let (space, _) = try HandleTable.shared.lookup(handle, .space, as: NativeSpace.self)
        let c = space.statistics.snapshot
        out.pointee = hmm_space_counters(cpu_faults: UInt64(c.cpuFaults), fault_backs: UInt64(c.faultBacks),
                                         events: UInt64(c.events), poisoned: UInt64(c.poisoned))
    }
}
