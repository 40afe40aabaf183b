/// What a migration in progress records for its ``MigrationEvent`` while the machine's hub observes:
/// the clock at each phase boundary and the pages that were collected. Both `MigrateVMA` and
/// `MigrateDevice` keep one; nothing is recorded (one relaxed load, at setup) when nobody observes.
struct MigrationObservation {
    var observing = false
    var begin: UInt64 = 0
    var setupEnd: UInt64 = 0
    var pagesBegin: UInt64 = 0
    /// 4 KiB pages collected (still migrating after setup).
    var collected = 0

    /// Starts observing if the hub does.
    mutating func start(_ machine: Machine) {
        observing = machine.events.isObserving
        if observing { begin = monotonicNanoseconds() }
    }

    /// Setup is over: `src` holds what was collected.
    mutating func collected(_ src: [MigratePFN]) {
        guard observing else { return }
        setupEnd = monotonicNanoseconds()
        collected = src.reduce(0) { $0 + ($1.isMigrating ? ($1.isCompound ? PageSize.pagesPerPMD : 1) : 0) }
    }

    mutating func pagesBegan() {
        if observing { pagesBegin = monotonicNanoseconds() }
    }

    /// What moved, read before finalize (which may drop the references these PFNs are good for): the
    /// memories are named while the migration holds their frames, and the device's pagemap is kept
    /// (one reference) to read its pages in use afterwards.
    struct Outcome {
        var pages = 0
        var huge = false
        var from = MemoryLocation.system
        var to = MemoryLocation.system
        var devicePagemap: Pagemap?
        /// Pages of the fault page's folio that moved: the faulting thread still holds them referenced
        /// (it drops its reference after `migrateToRAM` returns), so they are not counted in use.
        var heldPages = 0
    }

    /// The entries that migrate if finalize accepts them (`accepted`: pages ran).
    func outcome(_ machine: Machine, src: [MigratePFN], dst: [MigratePFN], accepted: Bool, faultPage: PFN? = nil) -> Outcome {
        var o = Outcome()
        guard accepted else { return o }
        var located = false
        for i in src.indices where src[i].isMigrating {
            guard let d = dst[i].pfn else { continue }
            let huge = src[i].isCompound || dst[i].isCompound
            let n = huge ? PageSize.pagesPerPMD : 1
            o.pages += n
            o.huge = o.huge || huge
            if let f = faultPage, let p = src[i].pfn, f >= p, f < p + n { o.heldPages = n }
            if !located {
                located = true
                let fromSlot = src[i].pfn.map { machine.pagemapSlot(of: $0) } ?? 0
                let toSlot = machine.pagemapSlot(of: d)
                o.from = machine.memory(ofPagemapSlot: fromSlot)
                o.to = machine.memory(ofPagemapSlot: toSlot)
                if toSlot != 0 || fromSlot != 0 { o.devicePagemap = machine.pagemap(of: toSlot != 0 ? d : src[i].pfn!) }
            }
        }
        return o
    }

    /// Publishes the migration's event once finalize is done.
    func publish(_ machine: Machine, _ o: Outcome, cause: MigrationCause, space: Int, address: UInt64) {
        guard observing, o.pages > 0 || collected > 0 else { return }
        let end = monotonicNanoseconds()
        let pagesAt = pagesBegin == 0 ? end : pagesBegin
        machine.events.publish(.migration(MigrationEvent(
            cause: cause, from: o.from, to: o.to, space: space, address: address, pages: o.pages,
            failedPages: max(0, collected - o.pages), size: o.huge ? .huge : .base, thread: currentThreadID(),
            begin: begin, collect: setupEnd &- begin, copy: pagesAt &- setupEnd, finalize: end &- pagesAt,
            pagemapSlot: o.devicePagemap?.slot ?? 0,
            pagemapPagesInUse: max(0, (o.devicePagemap?.framesInUse ?? 0) - o.heldPages))))
    }
}
