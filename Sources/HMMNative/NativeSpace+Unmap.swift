import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// `munmap` through the engine: the program's own unmapping of region memory, ordered against the
/// engine's work as the kernel orders `munmap` against `migrate_vma` (which runs under `mmap_lock`).
///
/// A raw `munmap` reaches the engine only as an UNMAP event, after the fact, and the host gives
/// userspace no way to replace a mapping only if it is still the one it was. The engine asks the host
/// just before each of its own remappings whether the address is still the region's
/// (``NativeSpace/owns(_:_:_:)``) and never moves a page out of an address that is not; what stays is
/// a window of microseconds between that question and the remapping, in which a raw `munmap` followed
/// at once by an `mmap` of the same address can still be replaced by a device-coherent page mapped in
/// place. ``unmap(address:length:)`` closes it: it excludes every migration, fault resolution, eviction
/// and remapping (the event thread's too) of the space while the host unmaps, and returns once the
/// engine has forgotten the pages.
/// Programs that churn mappings while the engine migrates them — interposers, runtimes — call this.
extension NativeSpace {
    /// Unmaps `[address, address + length)` (`munmap`): region pages there are dropped — their device
    /// copies freed, drivers told `unmap` — and the host mapping removed; P2PDMA pages there give their
    /// frames back to the pool (``mapP2PMemory(_:length:protection:flags:offset:)``); other memory is
    /// unmapped as `munmap` would. Takes `mmapLock`, the fault gate and the remap gate for writing: no
    /// migration, fault resolution, eviction or remapping of this space runs meanwhile, so none can remap the address after
    /// the program's own `mmap` has reused it. Do not call with `mmapLock` held, or from a
    /// driver callback.
    /// - Throws: `.invalidArgument` (unaligned, empty or wrapping), `.noProcess` after close, what
    ///   `munmap` returns.
    public func unmap(address: UInt64, length: Int) throws(HMMError) {
        guard length > 0, length % PageSize.base == 0, address % Sys.page == 0,
            address <= UInt64.max - UInt64(length)
        else { throw HMMError(.invalidArgument, "unmap: \(length) bytes at \(address) is not a page-aligned range") }
        try checkOpen()
        try mmapLock.withWriteLock { () throws(HMMError) in
            try faultGate.withWriteLock { () throws(HMMError) in
                try remapGate.withWriteLock { () throws(HMMError) in
                    try checkOpen()
                    forgetForeignWindows(address, address + UInt64(length))
                    let rc = Sys.munmap(address, UInt64(length))
                    guard rc == 0 else { throw HMMError.system(rc, "munmap") }
                    forgetP2PMappings(address, address + UInt64(length))
                }
            }
        }
        // The unmap event was read before munmap returned; it is handled once this returns.
        catchUpWithEvents()
    }
}
