/// What an engine supplies, with a host window's operations, when the window's pages can disappear
/// under a copy: the native engine's regions are the user's memory, which any thread may unmap while a
/// driver copies a page it mirrors (a kernel driver's copy holds the `struct page`; ours holds only an
/// address). Copies then fail instead of faulting.
@_spi(Engine)
public protocol HostWindowAccess: AnyObject {
    /// Copies `count` bytes from the host address `src` into `dst`; false if `src` is not mapped.
    func copyOut(from src: UnsafeRawPointer, to dst: UnsafeMutableRawPointer, count: Int) -> Bool
    /// Copies `count` bytes from `src` to the host address `dst`; false if `dst` is not mapped.
    func copyIn(from src: UnsafeRawPointer, to dst: UnsafeMutableRawPointer, count: Int) -> Bool
}

extension Machine {
    /// Reads a frame's 4 KiB into `buffer`, as a device's DMA engine does: a RAM or device frame by a
    /// plain copy; a host-window frame (a native region's page where it lives) through its engine,
    /// which fails cleanly if the user unmapped the page meanwhile. The caller keeps the frame from
    /// being freed (a reference, or a notifier-protected mapping).
    /// - Throws: `.invalidArgument` for a frame neither in RAM nor in a registered pagemap; `.fault`
    ///   when a host-window page is no longer mapped.
    public func readFrame(_ pfn: PFN, into buffer: UnsafeMutableRawPointer) throws(HMMError) {
        try copy(pfn, toFrame: false, buffer)
    }

    /// Writes 4 KiB from `buffer` into a frame, as ``readFrame(_:into:)-(_,UnsafeMutableRawPointer)`` reads.
    /// - Throws: as ``readFrame(_:into:)-(_,UnsafeMutableRawPointer)``.
    public func writeFrame(_ pfn: PFN, from buffer: UnsafeRawPointer) throws(HMMError) {
        try copy(pfn, toFrame: true, UnsafeMutableRawPointer(mutating: buffer))
    }

    /// One page between frame `pfn` and `other`, in the direction given: plainly, or through the
    /// engine for a host-window frame.
    private func copy(_ pfn: PFN, toFrame: Bool, _ other: UnsafeMutableRawPointer) throws(HMMError) {
        let frame = try framePointer(pfn)
        let (src, dst) = toFrame ? (UnsafeRawPointer(other), frame) : (UnsafeRawPointer(frame), other)
        if let access = hostWindowAccess(pfn) {
            let copied = toFrame ? access.copyIn(from: src, to: dst, count: PageSize.base)
                : access.copyOut(from: src, to: dst, count: PageSize.base)
            guard copied else { throw HMMError(.fault, "the host page of \(pfn) is no longer mapped") }
            return
        }
        dst.copyMemory(from: src, byteCount: PageSize.base)
    }

    /// The engine's access to a host-window frame, nil for any other frame.
    @inline(__always) private func hostWindowAccess(_ pfn: PFN) -> (any HostWindowAccess)? {
        guard deviceKind(pfn) == .hostWindow else { return nil }
        return pagemap(of: pfn)?.ops as? any HostWindowAccess
    }
}
