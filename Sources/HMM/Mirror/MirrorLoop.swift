/// The driver's side of mirroring, written once as `drm_gpusvm_range_get_pages` writes it for every
/// DRM driver: read-begin on the notifier, `hmm_range_fault` under the space's `mmapLock`, then program
/// the device under the driver's lock unless an invalidation came in between — and start over if one
/// did, for a bounded time.
extension IntervalNotifier {
    /// `HMM_RANGE_DEFAULT_TIMEOUT`: how long a driver's mirror loop keeps retrying.
    public static let mirrorTimeout = Duration.milliseconds(1000)

    /// Mirrors `range` (a range of this notifier): ``readBegin()``, then ``MirroredAddressSpace/rangeFault(_:)``
    /// under ``MirroredAddressSpace/withMmapReadLock(_:)`` (an invalidation meanwhile, `.busy`, starts
    /// over), then `program` with the filled range. `program` takes the driver lock its invalidate
    /// callback also takes, checks ``readRetry(_:)`` with `range.notifierSeq` under it, and programs the
    /// device only if that is false; it returns false when it had to give up (the loop starts over).
    /// Call without `mmapLock` and without the driver lock held.
    /// - Throws: `.busy` if no walk stayed valid for ``mirrorTimeout`` (or `timeout`); what
    ///   ``MirroredAddressSpace/rangeFault(_:)`` throws other than `.busy`; what `program` throws.
    public func mirror(
        _ range: inout HMMRange, timeout: Duration = mirrorTimeout, program: (HMMRange) throws(HMMError) -> Bool
    ) throws(HMMError) {
        let deadline = ContinuousClock.now + timeout
        while true {
            if ContinuousClock.now > deadline { throw HMMError(.busy, "hmm_range_fault kept retrying for \(timeout)") }
            range.notifierSeq = readBegin()
            do {
                try space.withMmapReadLock { () throws(HMMError) in try space.rangeFault(&range) }
            } catch where error.code == .busy {
                continue
            }
            if try program(range) { return }
        }
    }
}
