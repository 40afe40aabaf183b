import CUserfaultfd
import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// The three threads of a native space and CPU fault resolution (`handle_mm_fault` for pages the host
/// kernel hands to userspace: `do_anonymous_page`, `do_swap_page` on a device-private entry,
/// `remove_device_exclusive_entry`).
extension NativeSpace {
    /// The service thread: reads the userfaultfd and dispatches, and does nothing else — it takes no
    /// lock but the queues' and the region list's, allocates nothing (a `fork` holds the allocator's
    /// locks until this thread has read its event) and calls no user code, because every `munmap`, `MADV_DONTNEED` and `mremap`
    /// of a region in any thread waits until it has read the event (and every resolving ioctl returns
    /// `EAGAIN` meanwhile). It does wait for one thing, briefly: installs of bytes in flight, because the
    /// host zaps a `MADV_DONTNEED` range as soon as the remove event is read (see ``enterInstall()``);
    /// an install that hits `EAGAIN` steps aside so the reader can read.
    func serviceLoop() {
        let buffer = messageBuffer
        serviceReady.store(true, ordering: .releasing)
        while !stoppingNow {
            let ready = cu_poll(uffd, wakeFD, 1000)
            guard ready > 0 else { continue }
            readSequence.add(1, ordering: .acquiringAndReleasing)
            // No install may be in flight while events are read: a remove event releases its caller's
            // zap at once, and bytes going back must land either before that read (the zap removes
            // them) or after the page is marked (the installer sees the mark and skips it).
            while installing.load(ordering: .acquiring) > 0 { sched_yieldShim() }
            // Only what both rings have room for (the service thread never allocates: MessageQueue).
            let room = min(64, faults.room, events.room)
            guard room > 0 else {
                readSequence.add(1, ordering: .acquiringAndReleasing)
                sched_yieldShim()
                continue
            }
            let n = cu_read_messages(uffd, buffer, Int32(room))
            if _slowPath(machine.events.isObserving) {
                let t = monotonicNanoseconds()
                for k in 0..<max(0, Int(n)) { buffer[k].read_at = t }
            }
            // A remove event's caller zaps as soon as the event is read: mark its pages now, lock-free, so
            // a migration putting bytes back into them learns of the zap (``waitForReader()``).
            for k in 0..<max(0, Int(n)) where buffer[k].kind == UInt32(CU_MSG_REMOVE) {
                markZapped(buffer[k].a, buffer[k].b)
            }
            for k in 0..<max(0, Int(n)) {
                if buffer[k].kind == UInt32(CU_MSG_UNMAP) && selfUnmaps.consume(buffer[k].a, buffer[k].b) {
                    // The engine's own remapping of a coherent page: its caller learns it replaced the
                    // region's mapping (``SelfUnmaps/finish(_:)``); nothing else is to be done.
                    continue
                }
                if buffer[k].kind == UInt32(CU_MSG_PAGEFAULT) {
                    // Stamp the fault with the events read before it: they are handled before it is.
                    var m = buffer[k]
                    m.c = events.pushed
                    faults.push(m)
                } else {
                    events.push(buffer[k])
                }
            }
            readSequence.add(1, ordering: .acquiringAndReleasing)
        }
    }

    /// Marks every page of `[lo, hi)` zapped.
    private func markZapped(_ lo: UInt64, _ hi: UInt64) {
        // Under the list's lock: no copy of the list is made, so none is freed here.
        withRegionsLocked { list in
            for region in list where region.address < hi && lo < region.end {
                let a = max(lo, region.address)
                let b = min(hi, region.end)
                for i in region.index(a)..<region.index(b + PageSize.baseMask) { region.markZapped(i) }
            }
        }
    }

    /// The fault thread. A fault is resolved only after the events read before it: a thread that
    /// returned from `MADV_DONTNEED` (released as soon as its event was read) and then touches the page
    /// must see it dropped, not fault back the device copy the event is about to free. A hole of host
    /// memory is the exception (``isHostHole(_:)``).
    func faultLoop() {
        while let m = faults.pop() {
            if faultNeedsEvents(m.a) { events.waitFinished(m.c) }
            let write = m.b & UInt64(CU_PAGEFAULT_WRITE) != 0
            if _slowPath(machine.events.isObserving) {
                _ = faultGate.withReadLock { handleFaultObserved(m.a, write: write, thread: Int32(bitPattern: m.thread), readAt: m.read_at) }
            } else {
                _ = faultGate.withReadLock { handleFault(m.a, write: write) }
            }
            faults.finish()
        }
    }

    /// Whether a fault at `a` must wait for the events read before it: yes unless the page is host
    /// memory — a hole to fill with zeros whatever the pending events say, since none of them can put
    /// bytes there (a remove event only zaps, and its mark is set when it is read). A page on the move
    /// is waited for first, then decided. Skipping the wait is what keeps a driver safe that copies
    /// from a page's host window under its own lock after a `MADV_DONTNEED` zapped it: the copy
    /// faults, and the invalidation of that remove event waits for the same lock.
    func faultNeedsEvents(_ a: UInt64) -> Bool {
        while true {
            guard let region = region(containing: a) else { return true }
            let s = region.state(region.index(a))
            if s.isMigrating {
                sched_yieldShim()
                continue
            }
            return s.kind != .host
        }
    }

    /// The event thread.
    func eventLoop() {
        while let m = events.pop() {
            if _slowPath(machine.events.isObserving) { handleEventObserved(m) } else { handleEvent(m) }
            events.finish()
        }
    }

    /// Resolves one CPU fault on a registered page: the faulting thread sleeps in the kernel until a
    /// `UFFDIO_COPY`, `ZEROPAGE`, `MOVE`, `POISON` or `WAKE` of its page (or, in-thread, runs this
    /// itself). Returns false where the access must fail (a poisoned page), true where it may run again.
    func handleFault(_ address: UInt64, write: Bool) -> Bool {
        let a = address & ~PageSize.baseMask
        statistics.count(\.cpuFaults)
        var lookups = 0
        while true {
            guard let region = region(containing: a) else {
                // A remap may be queued behind the fault (faults are read before events): let the event
                // thread catch up and look again; an address no region claims is zero-filled.
                if lookups < 2 {
                    lookups += 1
                    events.drain()
                    continue
                }
                _ = fillZeros(a, write: write)
                _ = Sys.wake(uffd, a, Sys.page)
                return true
            }
            let i = region.index(a)
            let s = region.state(i)
            if s.isMigrating {
                // A migration or an event holds the page: it ends soon, then the state says what to do.
                sched_yieldShim()
                continue
            }
            var retry = true
            switch s.kind {
            case .host:
                if write && s == .host && hugeFirstTouch(region, i) { break }
                guard region.tryLock(i, s) else { continue }
                let filled = zeroFill(a, write: write)
                // Unlocked before the toucher runs again, as the kernel's fault returns with no page
                // lock held: a migration it starts next must find the page free. A fill that found a
                // hole says any zap still pending has run; one that found the page present (`EEXIST`)
                // says nothing of the kind. That is a stale fault (its toucher was woken by an install
                // and went on; its message is read later) handled between the read of a REMOVE event
                // and the host's zap — the host wakes the `madvise` caller when the event is read and
                // zaps only once that thread runs again. Declaring the zap done there would let a
                // migration move the still-present bytes out ahead of the zap (which then finds a
                // hole), and bring them back after `madvise` returned. The pending mark stays until a
                // fault fills the hole or a collection finds one; every fill of a hole clears it, so a
                // present page keeps it only until its zap runs.
                region.setState(i, .host, zapDone: filled)
                _ = Sys.wake(uffd, a, Sys.page)
            case .device where isCoherent(s):
                // Mapped in place: only the page-table entry is missing — unless a remove event marked
                // the page: its file page still holds the old bytes (`MADV_DONTNEED` of a shared
                // mapping only unmaps it), so the zap is applied first, as for any other kind.
                if s.isZapped {
                    region.settle(i)
                    continue
                }
                guard resolveCoherentFault(region, i, a) else { continue }
            case .device:
                // Not home yet (a drop or another fault got there first): look again.
                switch bringBack(region, i, write: write) {
                case .notOnDevice: continue
                case .poisoned: retry = false
                case .home: break
                }
            case .exclusive:
                guard region.tryLock(i, s) else { continue }
                restoreExclusive(region, i, s)
            case .revoked:
                // The marker is there unless someone dropped it: make sure, then let the access fail.
                _ = retryingAgain { Sys.poison(uffd, a, Sys.page) }
                _ = Sys.wake(uffd, a, Sys.page)
                retry = false
            case .unmapped:
                _ = Sys.wake(uffd, a, Sys.page)
            }
            return retry
        }
    }

    /// Fills the hole at `a` with zeros, as `do_anonymous_page` gives — the zero page for a read, a
    /// fresh zeroed page for a write — without waking the toucher. Used for a region's first touch and
    /// for registered memory no region claims (the tail an `mremap` grew a region by: its remap event
    /// names the old length only). False if the host says the address is not registered memory at all
    /// (the fault is then not the engine's); `EEXIST` (someone filled it) counts as filled.
    func fillZeros(_ a: UInt64, write: Bool) -> Bool {
        let rc = fillZerosOnce(a, write: write)
        return rc == 0 || rc == -EEXIST
    }

    /// ``fillZeros(_:write:)``'s ioctl: 0 if it filled the hole, `-EEXIST` if the page was present.
    private func fillZerosOnce(_ a: UInt64, write: Bool) -> Int32 {
        let zerosAddress = UInt64(UInt(bitPattern: zeros))
        return retryingAgain {
            write ? Sys.copy(uffd, to: a, from: zerosAddress, Sys.page, dontWake: true).0
                : Sys.zeropage(uffd, a, Sys.page, dontWake: true)
        }
    }

    /// A first touch (or a touch after the page was dropped): zeros, as `do_anonymous_page` gives — the
    /// zero page for a read, a fresh zeroed page for a write. `EEXIST` (someone filled it: a stale
    /// fault) is fine. The toucher is not woken: the caller wakes it once the page is unlocked. Returns
    /// whether the fill found a hole (false: the page was present, or the address is not registered).
    private func zeroFill(_ a: UInt64, write: Bool) -> Bool {
        statistics.count(\.zeroFills)
        let rc = fillZerosOnce(a, write: write)
        return rc == 0
    }

    /// `do_huge_pmd_anonymous_page` natively: the first write to an empty 2 MiB unit of a huge-advised
    /// range gets a zeroed transparent huge page, moved in as one PMD (userfaultfd itself fills only
    /// 4 KiB entries). False — fill one small page instead — unless the whole unit is in the region,
    /// advised, of one protection, writable, unheld and empty.
    private func hugeFirstTouch(_ region: NativeRegion, _ i: Int) -> Bool {
        let first = region.unitStart(i)
        guard first >= 0, first + PageSize.pagesPerPMD <= region.pages, region.isHugeAdvised(page: i) else { return false }
        let unit = first..<(first + PageSize.pagesPerPMD)
        guard region.allow(.write, unit), unit.allSatisfy({ region.isHugeAdvised(page: $0) }),
            region.protectionRun(around: i).pages.contains(unit.lowerBound),
            region.protectionRun(around: i).pages.contains(unit.upperBound - 1)
        else { return false }
        var locked = 0
        while locked < PageSize.pagesPerPMD, region.state(first + locked) == .host,
            region.tryLock(first + locked, .host)
        {
            locked += 1
        }
        func unlock() { for j in 0..<locked { region.setState(first + j, .host) } }
        let a = region.pageAddress(first)
        var empty = locked == PageSize.pagesPerPMD
        if empty {
            try? scan(a, a + Sys.pmd) { (_, cat) in
                if cat & UInt64(CU_PAGE_IS_PRESENT | CU_PAGE_IS_SWAPPED) != 0 { empty = false }
            }
        }
        guard empty, let folio = machine.allocateMigrationFolio(zeroed: false) else {
            unlock()
            return false
        }
        // A fresh THP of zeros in the staging frame, moved in whole.
        let frame = frameAddress(folio)
        _ = Sys.madvise(frame, Sys.pmd, Sys.dontNeed)
        _ = Sys.madvise(frame, Sys.pmd, Sys.populateWrite)
        let done = installFrame(folio, at: a, pages: PageSize.pagesPerPMD, move: true, unlessZapped: (region, first))
        try? machine.releaseMigrationPage(folio)
        unlock()
        wake(a, pages: PageSize.pagesPerPMD)
        statistics.count(\.hugeZeroFills)
        return done
    }

    /// Brings device page `i` of `region` back to host memory through its driver, as a CPU fault does
    /// (`do_swap_page` → `migrate_to_ram`): the device folio is locked and referenced for the callback
    /// (it is the migration's `faultPage`), and the driver is asked for a fault-around window — the
    /// whole 2 MiB for a compound page. A driver that fails transiently is retried; one that cannot
    /// bring the page back gets it poisoned, so the toucher sees `SIGBUS` and never zeros (the kernel's
    /// `VM_FAULT_SIGBUS`).
    func bringBack(_ region: NativeRegion, _ i: Int, write: Bool) -> BringBack {
        var attempts = 0
        var tried = false
        let deadline = ContinuousClock.now + .seconds(10)
        while true {
            let s = region.state(i)
            if s.isMigrating {
                sched_yieldShim()
                continue
            }
            switch s.kind {
            case .host, .unmapped:
                return tried ? .home : .notOnDevice
            case .revoked:
                return .poisoned
            case .exclusive:
                guard region.tryLock(i, s) else { continue }
                restoreExclusive(region, i, s)
                return .home
            case .device:
                break
            }
            tried = true
            guard let pagemap = machine.pagemap(of: s.pfn), pagemap.callbacks != nil else {
                poison(region, i)
                return .poisoned
            }
            // As `do_swap_page`: the folio lock and a reference, taken while the page's word is locked
            // (it stands in for the page-table lock: nothing can drop the word's reference meanwhile). A
            // contended folio lock is a migration already moving the page: let it finish and look again.
            guard region.tryLock(i, s) else { continue }
            guard machine.deviceFaultTryLock(s.pfn) else {
                region.setState(i, s)
                sched_yieldShim()
                continue
            }
            region.setState(i, s)
            let a = region.pageAddress(i)
            let unit: Range<UInt64>
            if s.isCompound {
                let lo = a & ~PageSize.pmdMask
                unit = lo..<(lo + Sys.pmd)
            } else {
                let window = UInt64(faultAroundPages) << UInt64(PageSize.shift)
                let lo = max(a & ~(window - 1), region.address)
                unit = lo..<min(lo + window, region.end)
            }
            statistics.count(\.faultBacks)
            var failure: HMMError?
            do throws(HMMError) {
                try machine.deviceFaultMigrateToRAM(pagemap, DeviceFault(
                    space: self, address: s.isCompound ? unit.lowerBound : a, page: s.pfn, huge: s.isCompound,
                    write: write, range: unit))
            } catch {
                failure = error
            }
            let now = region.state(i)
            if now.kind != .device || now.isMigrating {
                wake(unit.lowerBound, pages: Int((unit.upperBound - unit.lowerBound) >> UInt64(PageSize.shift)))
                continue
            }
            if let failure {
                // The driver failed: retry what may pass, poison what will not (VM_FAULT_SIGBUS).
                attempts += 1
                if attempts >= 3 || ![.busy, .tryAgain, .outOfMemory].contains(failure.code) {
                    poison(region, i)
                    return .poisoned
                }
                usleep(UInt32(1000 * attempts))
            } else {
                // The driver returned without moving it (its folio was busy in another migration): fault
                // again, as the kernel would — for a bounded time.
                if ContinuousClock.now > deadline {
                    poison(region, i)
                    return .poisoned
                }
                sched_yieldShim()
            }
        }
    }

    /// What ``bringBack(_:_:write:)`` did.
    enum BringBack {
        /// The page came home (and whoever waited on it was woken).
        case home
        /// It was not on a device when looked at: nothing was done, nobody woken.
        case notOnDevice
        /// It could not come back and is poisoned (waiters woken into `SIGBUS`).
        case poisoned
    }

    /// The page is lost: a poison marker replaces it, so the next touch raises `SIGBUS` and a system
    /// call `EFAULT`; its device copy is dropped. ``NativeSpace/recover(_:_:from:)`` puts bytes back.
    func poison(_ region: NativeRegion, _ i: Int) {
        if region.state(i).isCompound { splitUnit(region, region.unitStart(i)) }
        let s = region.lock(i)
        let a = region.pageAddress(i)
        invalidating(a, a + Sys.page, .clear, owner: nil) {
            if (s.kind == .device || s.kind == .exclusive) && detachCoherent(region, i, s) {
                machine.folioPut(machine.folioHead(s.pfn))
            }
            _ = retryingAgain { Sys.poison(uffd, a, Sys.page) }
            region.setState(i, PageState(.revoked))
        }
        statistics.count(\.poisoned)
        if machine.events.isObserving {
            machine.events.publish(.revoke(RevokeEvent(reason: .poison, space: eventSpaceID, address: a, pages: 1, mappings: 0,
                                                       timestamp: monotonicNanoseconds())))
        }
        _ = Sys.wake(uffd, a, Sys.page)
    }

    /// `remove_device_exclusive_entry`: the CPU touched a page a device held exclusively. The notifiers
    /// hear `clear` (no owner), the page moves back from its staging frame, and the toucher resumes.
    /// Requires page `i` locked (its word `s`).
    func restoreExclusive(_ region: NativeRegion, _ i: Int, _ s: PageState) {
        let a = region.pageAddress(i)
        statistics.count(\.exclusiveRestores)
        invalidating(a, a + Sys.page, .clear, owner: nil) {
            region.setState(i, PageState.host.locked)
            _ = installFrame(s.pfn, at: a, pages: 1, move: true, unlessZapped: (region, i))
        }
        region.setState(i, .host)
        machine.folioPut(s.pfn)
        publishExclusive(.restore, a, owner: 0)
    }

    /// Puts the bytes of RAM frames `frame…frame+pages` into the hole at `a`: `UFFDIO_MOVE` (no copy; a
    /// 2 MiB unit moves as one PMD) or `UFFDIO_COPY` (no TLB shootdown: the better choice for 4 KiB
    /// pages in a multi-threaded process), falling back to COPY where MOVE refuses (a read-only
    /// region), and page by page where the range crosses host mappings. Wakes the threads waiting on the
    /// range: the caller marks the pages' words home (still locked) first, so a thread that resumes sees
    /// them home. Returns false if some page could not be filled (its address is gone, or it was zapped).
    @discardableResult
    func installFrame(_ frame: PFN, at a: UInt64, pages: Int, move: Bool,
                      unlessZapped check: (NativeRegion, Int)? = nil) -> Bool {
        let src = UInt64(UInt(bitPattern: (try? machine.framePointer(frame)) ?? machine.ramBase))
        let bytes = UInt64(pages) << UInt64(PageSize.shift)
        // No remove event is read while bytes go in (the reader waits for `installing` to drain), so a
        // zap either comes after the install — and removes what it put — or was marked before the
        // check below.
        func zapped() -> Bool {
            guard let (region, first) = check else { return false }
            for j in 0..<pages where region.state(first + j).isZapped { return true }
            return false
        }
        enterInstall()
        defer { leaveInstall() }
        if zapped() { return false }
        var done: UInt64 = 0
        /// One ioctl, retried while an event is queued unread (EAGAIN) — stepping aside for the reader.
        func attempt(_ body: () -> (Int32, Int64)) -> Int32 {
            while true {
                let (rc, n) = body()
                if n > 0 { done += UInt64(n) }
                guard rc == -EAGAIN else { return rc }
                leaveInstall()
                sched_yieldShim()
                enterInstall()
                if zapped() { return -ECANCELED }
            }
        }
        if move {
            let rc = attempt { Sys.move(uffd, to: a + done, from: src + done, bytes - done, allowHoles: true) }
            if rc == 0 { done = bytes }
            if rc == -ECANCELED { return false }
        }
        var pageByPage = false
        var lost = 0
        while done < bytes {
            let length = pageByPage ? Sys.page : bytes - done
            let before = done
            let rc = attempt { Sys.copy(uffd, to: a + done, from: src + done, length) }
            if rc == 0 {
                done = before + length
                continue
            }
            if rc == -ECANCELED { return false }
            if rc == -EEXIST {
                // Something is mapped there already (it cannot be our page): skip it.
                done += Sys.page
                continue
            }
            // ENOENT / EINVAL: one COPY stays within one host mapping, and the range crosses a boundary
            // (coherent pages split a region's mapping) — or the page was unmapped under us.
            if !pageByPage && bytes - done > Sys.page {
                pageByPage = true
                continue
            }
            lost += 1
            done += Sys.page
        }
        statistics.count(\.pagesMovedIn, pages - lost)
        return lost == 0
    }

    /// Runs a resolving ioctl on the regions' userfaultfd until it stops returning `EAGAIN`: the host
    /// refuses while a non-cooperative event is queued unread (`ctx->mmap_changing`), and the service
    /// thread reads it within microseconds — unless the space is closing, when the last result is
    /// returned. The caller must not be inside ``enterInstall()`` (the reader waits for installs).
    func retryingAgain(_ body: () -> Int32) -> Int32 {
        var rc = body()
        var spins = 0
        while rc == -EAGAIN && !stopping.load(ordering: .relaxed) {
            spins += 1
            if spins > 4 { sched_yieldShim() }
            rc = body()
        }
        return rc
    }

    /// Marks an install in progress, stepping aside while the reader is reading (see ``serviceLoop()``).
    func enterInstall() {
        while true {
            installing.add(1, ordering: .acquiringAndReleasing)
            if readSequence.load(ordering: .acquiring) & 1 == 0 { return }
            installing.subtract(1, ordering: .acquiringAndReleasing)
            while readSequence.load(ordering: .acquiring) & 1 != 0 { sched_yieldShim() }
        }
    }

    func leaveInstall() { installing.subtract(1, ordering: .acquiringAndReleasing) }

    /// Wakes the threads waiting on `[a, a + pages)`.
    func wake(_ a: UInt64, pages: Int) {
        _ = Sys.wake(uffd, a, UInt64(pages) << UInt64(PageSize.shift))
    }

    /// Waits until every event the service thread has read so far is handled: the page words then say
    /// what the host did (an address the host reused is not mistaken for the old mapping's).
    func catchUpWithEvents() {
        waitForReader()
        events.waitFinished(events.pushed)
    }

    private var stoppingNow: Bool { stopping.load(ordering: .acquiring) }
}

