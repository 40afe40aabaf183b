import Synchronization

/// Something outside the simulated page tables that holds references to frames at rest — the native
/// engine's per-page state words hold their device pages (and the staging frames of device-exclusive
/// pages). ``Machine/checkInvariants()`` counts these references as mappings, so a leak still shows.
@_spi(Engine)
public protocol FrameReferenceHolder: AnyObject, Sendable {
    /// Calls `body` once per reference held, with the folio's head frame. Called only when no other
    /// thread changes the holder (the invariant checker's contract); a holder with threads of its own
    /// lets them finish what is in flight first.
    func forEachHeldReference(_ body: (PFN) -> Void)
    /// A driver is about to evict the device frames `range` by physical address (``MigrateDevice``):
    /// bring every page the holder keeps in one of them back to host memory first (through the frame's
    /// driver, as a CPU fault would), since the reverse map cannot see the holder's references.
    func evictFrames(in range: Range<UInt64>)
}

/// The frame operations an engine needs beyond the driver API: the folio lock and references
/// (`folio_lock`, `folio_get`, `folio_put`), the RAM arena's host range, reference holders.
@_spi(Engine)
extension Machine {
    /// The host range of system RAM: frame `pfn` (below ``totalFrames``) is at
    /// `ramBase + pfn << 12`. A native engine registers it as the staging pool of its migrations.
    public var ramBase: UnsafeMutableRawPointer { ram.base }

    /// The head of the folio containing `pfn`.
    public func folioHead(_ pfn: PFN) -> PFN { frames.head(of: pfn) }
    /// `folio_trylock`.
    public func folioTryLock(_ head: PFN) -> Bool { frames.tryLock(head) }
    /// `folio_unlock`.
    public func folioUnlock(_ head: PFN) { frames.unlock(head) }
    /// `folio_get`: the caller already holds a reference.
    public func folioGet(_ head: PFN) { getFolio(head) }
    /// `folio_put`: the last reference frees the folio (a device folio through its driver's
    /// ``PagemapOperations/folioFree(_:order:)``).
    public func folioPut(_ head: PFN) { putFolio(head) }

    /// The first half of `do_swap_page`'s device-private handshake: the folio lock of `page`'s folio by
    /// try-lock, then a reference. Call it while the page's mapping is still held stable (its page-table
    /// lock, or natively its locked state word), so a racing migration or unmap cannot free the folio
    /// between the two (the page a driver's `migrateToRAM` gets must stay alive). False — nothing taken —
    /// when the lock is contended: another thread is moving the page; let it finish and fault again.
    public func deviceFaultTryLock(_ page: PFN) -> Bool {
        let head = frames.head(of: page)
        guard frames.tryLock(head) else { return false }
        getFolio(head)
        return true
    }

    /// The second half of `do_swap_page`'s device-private handshake, after ``deviceFaultTryLock(_:)``
    /// succeeded and the caller let go of the mapping: the driver's `migrateToRAM` with `fault`, then the
    /// folio lock and the reference dropped — from whichever folio holds `fault.page` now, since the
    /// driver may have split it (the lock and the reference then sit on the page's own folio).
    /// - Throws: `.bus` if the driver object of `pagemap` is gone, else what the driver throws.
    public func deviceFaultMigrateToRAM(_ pagemap: Pagemap, _ fault: DeviceFault) throws(HMMError) {
        defer {
            let holder = frames.head(of: fault.page)
            frames.unlock(holder)
            putFolio(holder)
        }
        #if DEBUG
        hooks.fire(.deviceFaultBeforeMigrateToRAM)
        #endif
        guard let ops = pagemap.ops else { throw HMMError(.bus, "the driver of \(pagemap) is gone") }
        try ops.migrateToRAM(fault)
    }

    /// Adds `holder` to the references ``checkInvariants()`` accounts for; held weakly.
    public func addReferenceHolder(_ holder: any FrameReferenceHolder) {
        referenceHolders.withLock { list in
            list.removeAll { $0.object == nil }
            list.append(WeakHolder(object: holder))
        }
    }

    /// The live reference holders.
    var liveReferenceHolders: [any FrameReferenceHolder] {
        referenceHolders.withLock { $0.compactMap { $0.object } }
    }
}

/// A weak reference to a ``FrameReferenceHolder``.
struct WeakHolder: @unchecked Sendable {
    weak var object: (any FrameReferenceHolder)?
}

@_spi(Engine)
extension Pagemap {
    /// The driver's callbacks; nil once the driver object is gone (then a CPU fault on its pages is
    /// `SIGBUS`).
    public var callbacks: (any PagemapOperations)? { ops }
}
