import CUserfaultfd
import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// Revocation (`UFFDIO_POISON`): how a device that is unbound, or a backend that lost a page, takes
/// memory away so that a later touch fails loudly — `SIGBUS` for a load or store, `EFAULT` for a system
/// call — instead of reading zeros; and how bytes are put back.
extension NativeRegion {
    /// Revokes the pages of `offsets`: drivers hear `clear`, device and staging copies are dropped, host
    /// pages leave the process, and a poison marker takes each page's place.
    /// - Throws: `.invalidArgument` (bad range), `.badDescriptor` after `free()`, `.noProcess` after close, `.busy` if the host refused
    ///   to give up a page (the pages before it stay revoked).
    public func revoke(_ offsets: Range<Int>) throws(HMMError) {
        let (lo, hi) = try checkedRange(offsets, "revoke")
        try space.revoke(self, lo, hi)
    }

    /// Puts `bytes` (exactly the range's length) into the revoked pages of `offsets`; pages that are not
    /// revoked are left alone.
    /// - Throws: `.invalidArgument` (bad range or a byte count that does not match), `.badDescriptor` after `free()`, `.noProcess`.
    public func recover(_ offsets: Range<Int>, from bytes: UnsafeRawBufferPointer) throws(HMMError) {
        let (lo, hi) = try checkedRange(offsets, "recover")
        guard bytes.count == offsets.count, let base = bytes.baseAddress else {
            throw HMMError(.invalidArgument, "recover: \(bytes.count) bytes for a range of \(offsets.count)")
        }
        try space.recover(self, lo, hi, from: base)
    }
}

extension NativeSpace {
    func revoke(_ region: NativeRegion, _ lo: UInt64, _ hi: UInt64) throws(HMMError) {
        try withMmapReadLock { () throws(HMMError) in
            for i in region.index(lo)..<region.index(hi) {
                if region.state(i).isCompound { splitUnit(region, region.unitStart(i)) }
                let s = region.lock(i)
                let a = region.pageAddress(i)
                var failure: HMMError?
                invalidating(a, a + Sys.page, .clear, owner: nil) {
                    switch s.kind {
                    case .revoked, .unmapped:
                        region.setState(i, s)
                        return
                    case .device, .exclusive:
                        guard detachCoherent(region, i, s) else {
                            failure = HMMError(.busy, "revoke: the host would not unmap the coherent page at \(a)")
                            region.setState(i, s)
                            return
                        }
                        machine.folioPut(machine.folioHead(s.pfn))
                    case .host:
                        // The page leaves the process (a move into a staging frame: no event, no wait).
                        guard let frame = machine.allocateMigrationPage(zeroed: false) else {
                            failure = HMMError(.outOfMemory, "revoke: no staging frame")
                            region.setState(i, s)
                            return
                        }
                        let f = frameAddress(frame)
                        _ = Sys.madvise(f, Sys.page, Sys.dontNeed)
                        let moved = moveToStaging(region, from: a, to: f, Sys.page)
                        try? machine.releaseMigrationPage(frame)
                        guard moved == Sys.page else {
                            failure = HMMError(.busy, "revoke: the host would not give up \(a) (pinned)")
                            region.setState(i, s)
                            return
                        }
                    }
                    let rc = retryingAgain { Sys.poison(uffd, a, Sys.page) }
                    if rc != 0 && rc != -EEXIST { failure = HMMError.system(rc, "UFFDIO_POISON \(a)") }
                    region.setState(i, PageState(.revoked))
                }
                if let failure { throw failure }
            }
        }
    }

    func recover(_ region: NativeRegion, _ lo: UInt64, _ hi: UInt64, from base: UnsafeRawPointer) throws(HMMError) {
        try withMmapReadLock { () throws(HMMError) in
            for i in region.index(lo)..<region.index(hi) {
                let s = region.lock(i)
                guard s.kind == .revoked else {
                    region.setState(i, s)
                    continue
                }
                let a = region.pageAddress(i)
                let src = UInt64(UInt(bitPattern: base + Int(a - lo)))
                // UFFDIO_COPY replaces the poison marker (measured: e_revoke).
                let rc = retryingAgain { Sys.copy(uffd, to: a, from: src, Sys.page).0 }
                region.setState(i, rc == 0 ? .host : s)
                if rc != 0 { throw HMMError.system(rc, "recover: UFFDIO_COPY onto \(a)") }
            }
        }
    }
}
