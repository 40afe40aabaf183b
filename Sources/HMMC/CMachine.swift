import CHMM
import HMM
#if canImport(Glibc)
import Glibc
#endif

// hmm_machine_*: the machine (staging RAM, device memory).

@_cdecl("hmm_machine_create")
public func hmmMachineCreate(_ systemMemory: UInt64, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "machine")
        guard systemMemory >= 16 << 20, systemMemory <= 64 << 30, systemMemory % UInt64(PageSize.pmd) == 0 else {
            throw CError(EINVAL, "system memory \(systemMemory) is not a multiple of 2 MiB between 16 MiB and 64 GiB")
        }
        let machine = try engine { () throws(HMMError) in try Machine(.init(systemMemory: Int(systemMemory))) }
        out.pointee = HandleTable.shared.insert(machine, .machine)
    }
}

@_cdecl("hmm_machine_destroy")
public func hmmMachineDestroy(_ handle: OpaquePointer?) -> Int32 {
    cCall { () throws(CError) in
        let (_, id) = try HandleTable.shared.lookup(handle, .machine, as: Machine.self)
        let children = HandleTable.shared.children(of: id)
        guard children.isEmpty else {
            throw CError(EBUSY, "the machine still has \(children.count) open space, device or subscription handle(s)")
        }
        HandleTable.shared.remove(id)
    }
}
