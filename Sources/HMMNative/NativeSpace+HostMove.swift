import CUserfaultfd
import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// Taking host pages out of the process: the one way the native engine does it is `UFFDIO_MOVE` into
/// staging RAM frames on the staging userfaultfd (write-protect-only: no event, no wait), and this is
/// where the host's refusals of a move are worked around, for every caller (migration, exclusive
/// grant, revoke).
extension NativeSpace {
    /// Moves the region pages `[a, a + bytes)` into the staging frames at address `frame`; holes are
    /// skipped (`MOVE_ALLOW_SRC_HOLES`). The host refuses a move in two cases, handled here:
    /// - `EINVAL` — MOVE moves only between writable mappings: a read-only region is made writable for
    ///   the move and given its protection back after it (`mprotect` raises no userfaultfd event). A
    ///   store to a page of the range in that window does not fault; the page is leaving anyway.
    /// - `EINVAL` on a range that crosses host mappings (one MOVE stays within one): page by page.
    /// - `EBUSY` (or `EAGAIN` after a partial move) — the page is not exclusive to this process (shared
    ///   with a child after `fork`, or
    ///   pinned): its copy-on-write is broken first by a write fault (`MADV_POPULATE_WRITE`, which keeps
    ///   its bytes), as the kernel's `FOLL_WRITE`/unshare does before it hands a page to a device. A
    ///   pinned page stays refused.
    ///
    /// Returns the bytes moved from the start (holes count); the pages after them were refused. Must
    /// not be called inside ``enterInstall()`` (it enters it around each move).
    func moveToStaging(_ region: NativeRegion, from a: UInt64, to frame: UInt64, _ bytes: UInt64) -> UInt64 {
        let pages = region.index(a)..<region.index(a + bytes)
        let readOnly = !region.allow(.write, pages)
        if readOnly {
            guard Sys.mprotect(a, bytes, [.read, .write]) == 0 else { return 0 }
        }
        defer { if readOnly { restoreProtection(region, pages) } }
        var done: UInt64 = 0
        var unsharedAt: UInt64?
        var againAt: UInt64?
        var pageByPage = false
        while done < bytes {
            let length = pageByPage ? Sys.page : bytes - done
            // No event is read during the move, so the host's zap of a `MADV_DONTNEED` never runs on the
            // pages being moved (a MOVE racing that zap was seen to spin in the kernel, 6.18), and a
            // program's `munmap` of them cannot return: the probe then finds them still the region's
            // (the staging userfaultfd's MOVE would take pages from any anonymous memory at the address,
            // the program's fresh mapping too). See ``owns(_:_:_:)``.
            enterInstall()
            let owner = probeInInstall(a + done, length)
            let (rc, moved) = owner == 0 ? Sys.move(stagingUffd, to: frame + done, from: a + done, length, allowHoles: true) : (owner, 0)
            leaveInstall()
            if owner == -EAGAIN {
                // An event is queued unread: let the service thread read it, then ask again.
                waitForReaderTurn()
                continue
            }
            if rc == 0 {
                done += length
                continue
            }
            if moved > 0 { done += UInt64(moved) }
            if rc == -EAGAIN {
                // The host moved what it could and stopped at a page it will not move as it is — one
                // still shared with a child since a `fork` answers EAGAIN after a partial move, EBUSY
                // before any. Go on from there; a page that stops the move twice is unshared below.
                if moved > 0 { continue }
                if againAt != a + done {
                    againAt = a + done
                    sched_yieldShim()
                    continue
                }
            }
            if (rc == -EINVAL || rc == -ENOENT) && !pageByPage && bytes - done > Sys.page {
                // One MOVE stays within one host mapping, and the range crosses a boundary (coherent
                // pages mapped in place split a region's mapping): page by page from here.
                pageByPage = true
                continue
            }
            guard rc == -EBUSY || rc == -EAGAIN, unsharedAt != a + done, unshare(region, a + done, a + bytes) else { return done }
            unsharedAt = a + done
        }
        return done
    }

    /// Inside ``enterInstall()``: 0 if `[a, a + bytes)` lies in one registered anonymous mapping (a
    /// region's) with no event pending — the ``owns(_:_:_:)`` probe, asked once, since the reader is
    /// held off — else `EAGAIN` (an event is queued unread) or `ENOENT` (not the region's any more, or
    /// the range spans host mappings).
    private func probeInInstall(_ a: UInt64, _ bytes: UInt64) -> Int32 {
        let rc = probeOnce(a, bytes, .hole)
        return ExpectedMapping.hole.accepts(rc) ? 0 : rc == -EAGAIN ? -EAGAIN : -ENOENT
    }

    /// Lets the service thread read what is queued (called outside ``enterInstall()``).
    func waitForReaderTurn() {
        sched_yieldShim()
        waitForReader()
    }

    /// Gives `pages` their protections back after a move made them writable, one `mprotect` per run.
    private func restoreProtection(_ region: NativeRegion, _ pages: Range<Int>) {
        var i = pages.lowerBound
        while i < pages.upperBound {
            let p = region.protection(page: i)
            var j = i + 1
            while j < pages.upperBound && region.protection(page: j) == p { j += 1 }
            _ = Sys.mprotect(region.pageAddress(i), UInt64(j - i) << UInt64(PageSize.shift), p)
            i = j
        }
    }

    /// Breaks the copy-on-write sharing of the present pages of `[lo, hi)` with a write fault each. No
    /// remove event is read meanwhile (the install exclusion), so no page of the range turns into a hole
    /// under the write fault — which would wait for the service thread — except one already marked
    /// zapped, and then nothing is done. Returns whether every present page was faulted.
    private func unshare(_ region: NativeRegion, _ lo: UInt64, _ hi: UInt64) -> Bool {
        // Allocated before the install exclusion: the reader waits on it, and nothing that waits on an
        // allocation may hold it up (a `fork` holds the allocator — see ``MessageQueue``).
        var runs: [Range<UInt64>] = []
        runs.reserveCapacity(Int((hi - lo) >> UInt64(PageSize.shift)) / 2 + 1)
        enterInstall()
        defer { leaveInstall() }
        for i in region.index(lo)..<region.index(hi) where region.state(i).isZapped { return false }
        try? scan(lo, hi) { (p, cat) in
            guard cat & UInt64(CU_PAGE_IS_PRESENT) != 0, cat & UInt64(CU_PAGE_IS_PFNZERO) == 0 else { return }
            if let last = runs.last, last.upperBound == p {
                runs[runs.count - 1] = last.lowerBound..<(p + Sys.page)
            } else {
                runs.append(p..<(p + Sys.page))
            }
        }
        for run in runs where Sys.madvise(run.lowerBound, run.upperBound - run.lowerBound, Sys.populateWrite) != 0 {
            return false
        }
        return !runs.isEmpty
    }
}
