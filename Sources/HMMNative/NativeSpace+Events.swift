import CUserfaultfd
import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// The host's non-cooperative userfaultfd events as the kernel's MMU-notifier events
/// (as `fs/userfaultfd.c` raises them): `munmap` → UNMAP (after the fact), `MADV_DONTNEED`/`MADV_FREE` → REMOVE
/// (before the zap), `mremap` → REMAP (after the move, followed by UNMAP of the old range unless
/// `MREMAP_DONTUNMAP`). Each runs in the event thread.
///
/// The event thread takes no `mmapLock`: a driver thread holding it for reading may be waiting on a
/// CPU fault that the fault thread resolves only after the events read before it (see
/// ``faultLoop()``). Page-state locks and the region list's lock are all it needs.
extension NativeSpace {
    func handleEvent(_ m: cu_message) {
        statistics.count(\.events)
        switch Int32(m.kind) {
        case CU_MSG_UNMAP:
            // The user's munmap (the engine's own remappings were consumed as they were read).
            dropRange(m.a, m.b, .unmap, to: .unmapped)
        case CU_MSG_REMOVE:
            dropRange(m.a, m.b, .clear, to: .host)
        case CU_MSG_REMAP:
            remap(from: m.a, to: m.b, length: m.c)
        case CU_MSG_FORK:
            // Requested only by the `.share` fork policy; the child's descriptor is always closed.
            let child = Int32(truncatingIfNeeded: m.a)
            if options.forkPolicy == .share { copyIntoChild(child) } else { _ = cu_close(child) }
        default:
            break
        }
    }

    /// `[lo, hi)` lost its pages (unmapped, or zapped by `MADV_DONTNEED`/`MADV_FREE`): the notifiers
    /// hear `event`, the device and staging pages there are freed and the pages become `final`. A
    /// region with no mapped page left leaves the space.
    func dropRange(_ lo: UInt64, _ hi: UInt64, _ event: NotifierEvent, to final: PageState) {
        for region in regions where region.address < hi && lo < region.end {
            let a = max(lo, region.address) & ~PageSize.baseMask
            let b = min(hi, region.end)
            guard a < b else { continue }
            invalidating(a, b, event, owner: nil) {
                var unmapped = 0
                for i in region.index(a)..<region.index(b + PageSize.baseMask) {
                    // An unmapped page stays so: its address may be another region's now (after an mremap).
                    if region.state(i).kind == .unmapped { continue }
                    if final == .host && !region.state(i).isCompound {
                        // A remove event drops only what its mark still names. The service thread
                        // marked every page of the range as it read the event, and the host woke the
                        // `madvise` caller then; whoever locks a marked page first applies the zap
                        // (``NativeRegion/lock(_:unmapped:)``), so a page no longer marked was dropped
                        // already — and may hold newer bytes. The churn suite lost stores that way:
                        // `MADV_DONTNEED` returned, the owner's store faulted on the hole, the fault
                        // applied the mark and filled it (a host hole never waits for events), a
                        // migration moved the stored page to a device, and only then did this thread
                        // reach the event and free the device copy (the owner read zeros). A marked
                        // page is settled here if it is free; one held by a migration or a fault is
                        // settled by its holder as it unlocks (``NativeRegion/setState(_:_:zapDone:)``).
                        // A compound unit is still dropped whole below: ``NativeSpace/applyZap(_:_:_:)``
                        // leaves it to this thread.
                        region.settle(i)
                        continue
                    }
                    if dropPage(region, i, to: final) { unmapped += 1 }
                }
                if unmapped > 0 && region.mappedPages.subtract(unmapped, ordering: .acquiringAndReleasing).newValue == 0 {
                    remove(region)
                    try? machine.unregisterPagemap(region.window)
                }
            }
        }
    }

    /// Pages `pages` of `region` are no longer the region's — the host said so when the engine tried
    /// to remap them (the program unmapped the address while a migration held them): they are dropped
    /// as their unmap event would drop them, which then finds nothing to do. Called with the pages
    /// unlocked.
    func forgetUnmapped(_ region: NativeRegion, _ pages: [Int]) {
        for i in pages {
            let a = region.pageAddress(i)
            dropRange(a, a + Sys.page, .unmap, to: .unmapped)
        }
    }

    /// `mremap` moved `[from, from + length)` to `to`: the host pages went with it, and so must the
    /// state words of the pages the host does not hold (device, exclusive, revoked). The new range
    /// becomes a region of its own (``region(containing:)`` finds it); the old range's words become
    /// host holes, so the UNMAP that follows frees nothing that moved. Drivers hear `unmap` for the old
    /// range.
    func remap(from: UInt64, to: UInt64, length: UInt64) {
        guard let old = region(containing: from), from + length <= old.end else { return }
        let first = old.index(from)
        let n = Int(length >> UInt64(PageSize.shift))
        // Compound units that move are split (each page then holds a reference): the moved words no
        // longer line up with the host's PMDs unless the move kept 2 MiB alignment, and a unit cut by
        // the move's ends must be split anyway.
        var j = first
        while j < first + n {
            if old.state(j).isCompound { splitUnit(old, old.unitStart(j)) }
            j += 1
        }
        guard let moved = try? makeRegion(to, Int(length), old.protection(page: first), old.hugePages) else { return }
        for k in 0..<n { moved.copyAttributes(of: old, page: first + k, to: k) }
        invalidating(from, from + length, .unmap, owner: nil) {
            for k in 0..<n {
                let s = old.lock(first + k)
                // A zap still pending at the old address cannot follow the page (the host looks its
                // range up again and finds it gone), so the moved page has none.
                moved.setState(k, s.unlocked, zapDone: true)
                old.setState(first + k, .host)
            }
        }
        insert(moved)
    }
}
