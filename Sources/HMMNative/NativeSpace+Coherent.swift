import CUserfaultfd
import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// Device-coherent memory in place: a page that migrates to a device-coherent pagemap is mapped at its
/// own address, so CPU loads and stores reach the device frame without a fault (`MEMORY_DEVICE_COHERENT`
/// is mapped by ordinary present entries, `include/linux/memremap.h`).
///
/// A coherent pagemap's frames live in a shared-memory file (``Pagemap/backingFile(of:)``). Migrating
/// to it maps the frame (`mmap(MAP_SHARED)`) at a scratch address, registers it MISSING + MINOR there
/// and moves it over the page's hole with `mremap(MREMAP_FIXED)` — never unregistered at the page's
/// address — so `munmap`, `MADV_DONTNEED` and `mremap` of it still send their events,
/// and a touch after `MADV_DONTNEED` (page-table entry gone, frame still in the file) faults to the
/// engine, which handles the remove event first. Leaving device memory (migration to RAM, a drop, a
/// poison) first puts a registered hole back with `mremap(MREMAP_FIXED)` of a fresh registered
/// mapping: the replacement is atomic, and a touch meanwhile waits on the page's lock as for any page
/// on the move. Both replacements raise an UNMAP event of the page's range that the engine expects
/// (``SelfUnmaps``).
///
/// Costs and limits (measured on the host): each isolated coherent page splits the region's mapping (+2
/// host VMAs; `vm.max_map_count` bounds them — a page that cannot be mapped stays in RAM); the device
/// mapping is `MADV_DONTFORK` (never the parent's device memory shared with a child): under
/// ``ForkPolicy/share`` a fork first replaces it by a hole the child gets a copy in
/// (``unmapCoherentForFork()``); `makeDeviceExclusive` of a coherent page is refused.
extension NativeSpace {
    /// Whether `s` names a device-coherent frame mapped in place at its page's address (not one a fork
    /// left copy-on-write, ``PageState/isAway``).
    @inline(__always) func isCoherent(_ s: PageState) -> Bool {
        s.kind == .device && !s.isAway && machine.deviceKind(s.pfn) == .deviceCoherent
    }

    /// `fork` under ``ForkPolicy/share`` (in `prepare`, every lock held for writing): each coherent
    /// page mapped in place gets a registered hole instead, so the child inherits a hole the FORK
    /// event fills with a copy of the frame — the kernel's copy-on-write of an anonymous device-coherent
    /// page. The parent's page stays in the frame, not mapped (``PageState/isAway``), read-only to
    /// devices, and its first CPU touch brings it to RAM. A page whose mapping the host would not
    /// replace stays in place (the child then has no mapping there: `MADV_DONTFORK`).
    func unmapCoherentForFork() {
        for region in regions {
            var i = 0
            while i < region.pages {
                let s = region.lock(i)
                guard isCoherent(s) else {
                    region.setState(i, s.unlocked)
                    i += 1
                    continue
                }
                // A compound unit goes whole.
                let unit = s.isCompound ? PageSize.pagesPerPMD : 1
                if s.isCompound { for j in 1..<unit { _ = region.lock(i + j) } }
                let away = replaceWithHole(region, at: region.pageAddress(i), pages: unit) == .replaced
                for j in 0..<unit {
                    let w = region.state(i + j)
                    region.setState(i + j, away
                        ? PageState(rawValue: (w.rawValue | PageState.awayBit) & ~PageState.writableBit).unlocked : w.unlocked)
                }
                i += unit
            }
        }
    }

    /// Maps coherent frames `frame..<frame + pages` over the hole at `a` (pages of `region` locked by the
    /// caller); false if the frame has no backing file, the host refused the mapping, or the address is
    /// no longer the region's (the program unmapped it) — then nothing of the program's changed. Must
    /// not run inside an install or on the service thread: the host waits until the service thread has
    /// read the UNMAP the mapping raises.
    ///
    /// Ordering against the program's own `munmap`/`mmap` of the address (``owns(_:_:_:)``): the host
    /// is asked, just before the call, whether `[a, a + pages)` is still the region's registered hole
    /// with no unmap of the region pending; after it, whether the call replaced that hole (its UNMAP
    /// was read). If the program unmapped the address in between, the mapping landed where nothing was
    /// and is taken back.
    func mapCoherent(_ region: NativeRegion, at a: UInt64, frame: PFN, pages: Int) -> Bool {
        guard let pm = machine.pagemap(of: frame), pm.contains(frame + (pages - 1)),
            let (file, offset) = pm.backingFile(of: frame)
        else { return false }
        let bytes = UInt64(pages) << UInt64(PageSize.shift)
        return remapGate.withReadLock { mapCoherentHoldingGate(region, at: a, file: file, offset: offset, bytes) }
    }

    private func mapCoherentHoldingGate(_ region: NativeRegion, at a: UInt64, file: Int32, offset: Int, _ bytes: UInt64) -> Bool {
        let pages = Int(bytes >> UInt64(PageSize.shift))
        // The frame is mapped at a scratch address first, made `MADV_DONTFORK` and registered there
        // (shared memory registers for MISSING and MINOR; events come from either), and then moved
        // over the hole in one `mremap(MREMAP_FIXED)`, which keeps the registration: the address is
        // never an unregistered mapping. Mapped straight over the hole and registered afterwards,
        // it was one for a moment — a `MADV_DONTNEED` of the page then raised no remove event, the
        // host zapped the populated entries of the shared mapping (the file keeps its page) and the
        // next touch mapped the file page again: the program read the bytes it had just dropped
        // (the churn suite's resurrection, device-coherent). As in ``replaceWithHole(_:at:pages:)``
        // the host also reports the move itself (REMAP from an address no region holds: ignored).
        let protection = region.protection(page: region.index(a))
        let scratch = Sys.mapAnonymous(bytes, protection)
        guard scratch != 0 else { return false }
        guard Sys.mapShared(at: scratch, bytes, protection, file: file, offset: offset) == 0 else {
            _ = Sys.munmap(scratch, bytes)
            return false
        }
        func dropScratch() {
            _ = Sys.unregister(uffd, scratch, bytes)
            _ = Sys.munmap(scratch, bytes)
        }
        _ = Sys.madvise(scratch, bytes, Sys.dontFork)
        guard Sys.register(uffd, scratch, bytes, missing: true, minor: true) == 0 else {
            dropScratch()
            return false
        }
        guard owns(a, bytes, .hole) else {
            dropScratch()
            return false
        }
        guard let slot = selfUnmaps.expect(a, a + bytes) else {
            dropScratch()
            return false
        }
        guard Sys.moveMapping(from: scratch, to: a, bytes) == 0 else {
            selfUnmaps.cancel(slot)
            dropScratch()
            return false
        }
        waitForReader()
        guard selfUnmaps.finish(slot) else {
            takeBack(a, bytes) { $0.shared && $0.inode == Sys.inode(file) }
            return false
        }
        statistics.count(\.coherentMapped, pages)
        return true
    }

    /// What ``replaceWithHole(_:at:pages:)`` did.
    enum HoleReplacement {
        /// A registered hole of the region is there now.
        case replaced
        /// The host refused (out of mappings): the coherent mapping is still there.
        case refused
        /// The address is no longer the region's (the program unmapped it): no coherent mapping of
        /// ours is there any more, and nothing was put there.
        case gone
    }

    /// Puts a registered hole (anonymous private memory, as the region's) at `[a, a + pages)` in place of
    /// the device-coherent mapping there, atomically. The same threading rules and the same ordering
    /// against the program's own unmapping as ``mapCoherent(_:at:frame:pages:)``.
    func replaceWithHole(_ region: NativeRegion, at a: UInt64, pages: Int) -> HoleReplacement {
        remapGate.withReadLock { replaceWithHoleHoldingGate(region, at: a, pages: pages) }
    }

    private func replaceWithHoleHoldingGate(_ region: NativeRegion, at a: UInt64, pages: Int) -> HoleReplacement {
        let bytes = UInt64(pages) << UInt64(PageSize.shift)
        let scratch = Sys.mapAnonymous(bytes, region.protection(page: region.index(a)))
        guard scratch != 0 else { return .refused }
        if let huge = region.hugePages { _ = Sys.madvise(scratch, bytes, huge ? Sys.hugePage : Sys.noHugePage) }
        if options.forkPolicy == .deny { _ = Sys.madvise(scratch, bytes, Sys.dontFork) }
        guard Sys.register(uffd, scratch, bytes, missing: true) == 0 else {
            _ = Sys.munmap(scratch, bytes)
            return .refused
        }
        func dropScratch() {
            _ = Sys.unregister(uffd, scratch, bytes)
            _ = Sys.munmap(scratch, bytes)
        }
        guard owns(a, bytes, .coherent) else {
            dropScratch()
            return .gone
        }
        guard let slot = selfUnmaps.expect(a, a + bytes) else {
            dropScratch()
            return .refused
        }
        // The host also reports the move itself (REMAP from an address no region holds: ignored) and the
        // UNMAP of the scratch range (likewise).
        guard Sys.moveMapping(from: scratch, to: a, bytes) == 0 else {
            selfUnmaps.cancel(slot)
            dropScratch()
            return .refused
        }
        waitForReader()
        guard selfUnmaps.finish(slot) else {
            // Our hole landed where the program had unmapped the page: take it back.
            takeBack(a, bytes) { !$0.shared && $0.inode == 0 && self.probe(a, bytes, .hole) == -EINVAL }
            return .gone
        }
        statistics.count(\.coherentUnmapped, pages)
        return .replaced
    }

    /// What the engine expects at an address it is about to remap.
    enum ExpectedMapping {
        /// A hole of a region: anonymous private memory registered with the userfaultfd.
        case hole
        /// A coherent frame mapped in place: shared memory registered with the userfaultfd.
        case coherent

        /// Whether a probe's answer (no event pending) says the range is this: anonymous memory refuses
        /// `UFFDIO_CONTINUE` with `EINVAL`; a coherent frame's page is in its file (`EEXIST`) or was
        /// never written (a zero page is put there).
        func accepts(_ rc: Int32) -> Bool {
            switch self {
            case .hole: return rc == -EINVAL
            case .coherent: return rc >= 0 || rc == -EEXIST
            }
        }
    }

    /// Whether `[a, a + bytes)` is still the engine's, as `expected`, with no unmap, remap or remove of
    /// the regions queued unread — asked of the host with a resolving ioctl that checks, in this
    /// order: a registered mapping covers the range (else `ENOENT`: the program unmapped or replaced
    /// it — its own memory is never registered), no non-cooperative event is pending (else `EAGAIN`:
    /// the service thread reads it, and the probe is asked again), and then what is there. A hole is
    /// asked with `UFFDIO_CONTINUE`, which anonymous memory refuses (`EINVAL`) without touching it; a
    /// coherent mapping with `UFFDIO_ZEROPAGE`, which finds the frame's page in the shared-memory file
    /// (`EEXIST`) — or, for a frame never written, puts a zero page there, which is what it reads
    /// anyway — and never maps the frame's bytes for a toucher waiting on the page. A range the probe
    /// cannot answer whole (it spans host mappings) is asked page by page.
    func owns(_ a: UInt64, _ bytes: UInt64, _ expected: ExpectedMapping) -> Bool {
        let rc = probe(a, bytes, expected)
        if rc != -ENOENT || bytes == Sys.page { return expected.accepts(rc) }
        var p = a
        while p < a + bytes {
            if !expected.accepts(probe(p, Sys.page, expected)) { return false }
            p += Sys.page
        }
        return true
    }

    /// The probe of ``owns(_:_:_:)``, asked once: `EAGAIN` while an event is queued unread (callers
    /// inside ``enterInstall()`` must not wait for the reader, so they take this answer as it is).
    func probeOnce(_ a: UInt64, _ bytes: UInt64, _ expected: ExpectedMapping) -> Int32 {
        switch expected {
        case .hole: return Sys.continueMapping(uffd, a, bytes)
        case .coherent: return Sys.zeropage(uffd, a, bytes, dontWake: true)
        }
    }

    /// The probe of ``owns(_:_:_:)``: its result once no event is pending.
    func probe(_ a: UInt64, _ bytes: UInt64, _ expected: ExpectedMapping) -> Int32 {
        retryingAgain { probeOnce(a, bytes, expected) }
    }

    /// A remapping landed on `[a, a + bytes)` after the program had unmapped it: unmaps it again if the
    /// host still shows what the engine put there (`ours`) — never the program's own memory.
    private func takeBack(_ a: UInt64, _ bytes: UInt64, _ ours: (HostMaps.Entry) -> Bool) {
        let entries = HostMaps.entries(overlapping: a, a + bytes)
        guard let first = entries.first, first.start <= a, entries.allSatisfy(ours),
            zip(entries, entries.dropFirst()).allSatisfy({ $0.end == $1.start }), entries.last!.end >= a + bytes
        else { return }
        _ = Sys.unregister(uffd, a, bytes)
        _ = Sys.munmap(a, bytes)
        statistics.count(\.remapsTakenBack)
    }

    /// Page `i` (locked, word `s`) is about to stop being device memory without migrating (a drop, a zap
    /// or a poison): if it is mapped in place, a hole replaces the mapping first, so the frame can be
    /// freed. False if that failed: the frame must then stay referenced (counted as
    /// ``NativeStatistics/Counters/coherentStranded``), since the address still maps it. True also when
    /// the address is no longer the region's: the program's unmap took the mapping away.
    func detachCoherent(_ region: NativeRegion, _ i: Int, _ s: PageState) -> Bool {
        guard isCoherent(s) else { return true }
        if replaceWithHole(region, at: region.pageAddress(i), pages: 1) != .refused { return true }
        statistics.count(\.coherentStranded)
        return false
    }

    /// A CPU fault on coherent page `i` of `region` (at `a`), mapped in place: its page-table entry is
    /// gone (a MINOR fault) or its frame has no page in the file yet (MISSING). Maps the frame's page,
    /// or a zeroed one. False, mapping nothing, if a remove event marked the page: its zap is applied
    /// first (look again).
    ///
    /// The frame's page is mapped as an install (``enterInstall()``), after a look at the mark: a
    /// fault read before a remove event does not wait for it (a stale fault — its toucher was woken by
    /// an install and went on — or one from another thread), and the host zaps the page-table entry
    /// only after the event is read. Mapping the file page after that zap would hand the old bytes
    /// back to a `madvise` caller that has returned. Installs and the reader exclude each other, so
    /// either the mapping lands before the event is read (the zap, after it, removes it) or the mark
    /// is seen here.
    func resolveCoherentFault(_ region: NativeRegion, _ i: Int, _ a: UInt64) -> Bool {
        var rc: Int32
        while true {
            enterInstall()
            if region.state(i).isZapped {
                leaveInstall()
                return false
            }
            rc = Sys.continueMapping(uffd, a, Sys.page)
            leaveInstall()
            // An event is queued unread: let the reader read it, then look again.
            guard rc == -EAGAIN, !stopping.load(ordering: .relaxed) else { break }
            sched_yieldShim()
        }
        if rc == -ENOENT || rc == -EFAULT {
            // No page behind it in the file: the device frame reads as zeros.
            rc = retryingAgain { Sys.copy(uffd, to: a, from: UInt64(UInt(bitPattern: zeros)), Sys.page).0 }
        }
        if rc != 0 { _ = Sys.wake(uffd, a, Sys.page) }
        return true
    }
}
