import CUserfaultfd
import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// Device-coherent memory in place: a page that migrates to a device-coherent pagemap is mapped at its
/// own address, so CPU loads and stores reach the device frame without a fault (`MEMORY_DEVICE_COHERENT`
/// is mapped by ordinary present entries, kernel-spec §1).
///
/// A coherent pagemap's frames live in a shared-memory file (``Pagemap/backingFile(of:)``). Migrating
/// to it maps the frame over the page's hole with `mmap(MAP_FIXED | MAP_SHARED)`; the new mapping is
/// registered MISSING + MINOR, so `munmap`, `MADV_DONTNEED` and `mremap` of it still send their events,
/// and a touch after `MADV_DONTNEED` (page-table entry gone, frame still in the file) faults to the
/// engine, which handles the remove event first. Leaving device memory (migration to RAM, a drop, a
/// poison) first puts a registered hole back with `mremap(MREMAP_FIXED)` of a fresh registered
/// mapping: the replacement is atomic, and a touch meanwhile waits on the page's lock as for any page
/// on the move. Both replacements raise an UNMAP event of the page's range that the engine expects
/// (``SelfUnmaps``).
///
/// Costs and limits (native-mode.md §1d): each isolated coherent page splits the region's mapping (+2
/// host VMAs; `vm.max_map_count` bounds them — a page that cannot be mapped stays in RAM); the device
/// mapping is `MADV_DONTFORK` under either fork policy (a child touching it gets `SIGSEGV`, never the
/// parent's device memory shared); `makeDeviceExclusive` of a coherent page is refused.
extension NativeSpace {
    /// Whether `s` names a device-coherent frame (mapped in place at its page's address).
    @inline(__always) func isCoherent(_ s: PageState) -> Bool {
        s.kind == .device && machine.deviceKind(s.pfn) == .deviceCoherent
    }

    /// Maps coherent frames `frame..<frame + pages` over the hole at `a` (pages of `region` locked by the
    /// caller); false if the frame has no backing file or the host refused the mapping (then nothing
    /// changed). Must not run inside an install or on the service thread: the host waits until the
    /// service thread has read the UNMAP the mapping raises.
    func mapCoherent(_ region: NativeRegion, at a: UInt64, frame: PFN, pages: Int) -> Bool {
        guard let pm = machine.pagemap(of: frame), pm.contains(frame + (pages - 1)),
            let (file, offset) = pm.backingFile(of: frame)
        else { return false }
        let bytes = UInt64(pages) << UInt64(PageSize.shift)
        guard let slot = selfUnmaps.expect(a, a + bytes) else { return false }
        let rc = Sys.mapShared(at: a, bytes, region.protection(page: region.index(a)), file: file, offset: offset)
        guard rc == 0 else {
            selfUnmaps.cancel(slot)
            return false
        }
        _ = Sys.madvise(a, bytes, Sys.dontFork)
        // Shared memory registers for MISSING and MINOR; events come from either.
        _ = Sys.register(uffd, a, bytes, missing: true, minor: true)
        statistics.count(\.coherentMapped, pages)
        return true
    }

    /// Puts a registered hole (anonymous private memory, as the region's) at `[a, a + pages)` in place of
    /// the device-coherent mapping there, atomically; false if the host refused (nothing changed). The
    /// same threading rules as ``mapCoherent(_:at:frame:pages:)``.
    func replaceWithHole(_ region: NativeRegion, at a: UInt64, pages: Int) -> Bool {
        let bytes = UInt64(pages) << UInt64(PageSize.shift)
        let scratch = Sys.mapAnonymous(bytes, region.protection(page: region.index(a)))
        guard scratch != 0 else { return false }
        if let huge = region.hugePages { _ = Sys.madvise(scratch, bytes, huge ? Sys.hugePage : Sys.noHugePage) }
        if options.forkPolicy == .deny { _ = Sys.madvise(scratch, bytes, Sys.dontFork) }
        guard Sys.register(uffd, scratch, bytes, missing: true) == 0 else {
            _ = Sys.munmap(scratch, bytes)
            return false
        }
        guard let slot = selfUnmaps.expect(a, a + bytes) else {
            _ = Sys.unregister(uffd, scratch, bytes)
            _ = Sys.munmap(scratch, bytes)
            return false
        }
        // The host also reports the move itself (REMAP from an address no region holds: ignored) and the
        // UNMAP of the scratch range (likewise).
        guard Sys.moveMapping(from: scratch, to: a, bytes) == 0 else {
            selfUnmaps.cancel(slot)
            _ = Sys.unregister(uffd, scratch, bytes)
            _ = Sys.munmap(scratch, bytes)
            return false
        }
        statistics.count(\.coherentUnmapped, pages)
        return true
    }

    /// Page `i` (locked, word `s`) is about to stop being device memory without migrating (a drop, a zap
    /// or a poison): if it is mapped in place, a hole replaces the mapping first, so the frame can be
    /// freed. False if that failed: the frame must then stay referenced (counted as
    /// ``NativeStatistics/Counters/coherentStranded``), since the address still maps it.
    func detachCoherent(_ region: NativeRegion, _ i: Int, _ s: PageState) -> Bool {
        guard isCoherent(s) else { return true }
        if replaceWithHole(region, at: region.pageAddress(i), pages: 1) { return true }
        statistics.count(\.coherentStranded)
        return false
    }

    /// A CPU fault on a coherent page mapped in place: its page-table entry is gone (a MINOR fault) or
    /// its frame has no page in the file yet (MISSING). Maps the frame's page, or a zeroed one.
    func resolveCoherentFault(_ a: UInt64) {
        var rc = retryingAgain { Sys.continueMapping(uffd, a, Sys.page) }
        if rc == -ENOENT || rc == -EFAULT {
            // No page behind it in the file: the device frame reads as zeros.
            rc = retryingAgain { Sys.copy(uffd, to: a, from: UInt64(UInt(bitPattern: zeros)), Sys.page).0 }
        }
        if rc != 0 { _ = Sys.wake(uffd, a, Sys.page) }
    }
}
