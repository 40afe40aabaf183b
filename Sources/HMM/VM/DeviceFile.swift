/// The file behind a device mapping (the `vm_file` of an `mmap` of a device node or a sysfs attribute
/// such as P2PDMA's `allocate`), reduced to what the core needs: which address spaces map it, so the
/// device can revoke every user mapping at once (`unmap_mapping_range` over the file's `i_mmap`).
///
/// A VMA that maps it is `VM_SHARED | VM_MIXEDMAP` and names it in ``VMA/deviceFile``; fork, split and
/// mremap keep the name, so the set of mappers only grows until the spaces exit.
final class DeviceFile: @unchecked Sendable {
    private let mappers = SpaceSet()

    func addMapper(_ space: AddressSpace) { mappers.insert(space) }

    /// Live spaces that mapped this file at some point.
    var spaces: [AddressSpace] { mappers.spaces.filter { !$0.hasExited } }
}

extension AddressSpace {
    /// Zaps every page of every VMA that maps `file`, leaving the VMAs in place: a later touch finds no
    /// page and raises `SIGBUS` (`unmap_mapping_range` on the whole file). Returns how many VMAs lost
    /// pages. Takes `mmapLock` and `rmapLock` for writing.
    func revokeMappings(of file: DeviceFile) -> Int {
        mmapLock.writeLock()
        defer { mmapLock.unlock() }
        guard !hasExited else { return 0 }
        var revoked = 0
        for v in vmas where v.deviceFile === file {
            invalidating(v.start, v.end, .clear) {
                rmapLock.withReadLock { zapVMA(v, v.start, v.end) }
            }
            revoked += 1
        }
        return revoked
    }

    /// `remove_vma` → `vm_ops->close`: under ``Epoch/RetirePolicy/synchronousPerClose`` a device mapping's
    /// close waits for a grace period so its frames go back at once (the rejected alternative to
    /// deferred retirement, kept to measure it). Requires `mmapLock` held for writing.
    func closeVMA(_ v: VMA) {
        if v.deviceFile != nil, machine.epoch.policy == .synchronousPerClose { machine.epoch.synchronize() }
    }
}
