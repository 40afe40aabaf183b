import HMM
import HMMDevices
import HMMNative
#if canImport(Glibc)
import Glibc
#endif

/// Managed memory on an accelerator — `cudaMallocManaged` with UVM's policy layer, over HMM: allocations
/// any processor can touch, pages migrated to device memory on device faults (with prefetching),
/// evicted back when device memory or a budget runs out, on either engine.
///
/// The manager is its accelerator context's ``DeviceFaultServicer``: every fault batch comes here, and
/// per 2 MiB block the ``PrefetchPolicy`` widens what migrates, the ``EvictionPolicy`` picks what leaves
/// when room is needed, and the options say whether running out evicts or fails with `.outOfMemory`
/// naming the budget — never a silent swap storm, never a hang. Every decision is a ``PolicyEvent`` on
/// the machine's event hub.
///
/// One manager per accelerator: device memory in use is the accelerator's.
///
/// Locking: the manager's state lock is a leaf for bookkeeping; it is never held while migrating.
public final class ManagedMemory: DeviceFaultServicer, @unchecked Sendable {
    /// What to do when a fault needs device memory beyond the budget.
    public enum Exhaustion: Sendable {
        /// Evict blocks chosen by the eviction policy (the default).
        case evict
        /// Fail the kernel with `.outOfMemory`, naming the budget.
        case fail
    }

    public struct Options: Sendable {
        public var prefetch: any PrefetchPolicy = DensityPrefetch()
        public var eviction: any EvictionPolicy = AllocationOrderEviction()
        /// Device memory this manager may use, in bytes (nil: all of the accelerator's).
        public var budget: Int? = nil
        public var onExhaustion = Exhaustion.evict
        /// Device memory each allocation owner may hold, in bytes.
        public var quotas: [String: Int] = [:]
        /// Proactive eviction: above `high` × budget after a batch, evict down to `low` × budget.
        public var watermarks: (high: Double, low: Double)? = nil
        /// Faults per batch (UVM's 256).
        public var batchSize = 256
        /// Thrashing detection and mitigation (UVM's, with a diagnosis); nil turns it off.
        public var thrashing: ThrashingPolicy? = ThrashingPolicy()
        public init() {}
    }

    /// Hints per allocation (UVM's `cudaMemAdvise`, AMD SVM's attributes, Xe's madvise).
    public struct Advice: Sendable, Equatable {
        /// Where the pages should live.
        public enum Location: Sendable, Equatable {
            /// System memory: the device maps the pages remotely instead of migrating them.
            case cpu
            /// Device memory: a block's first touch brings it whole (UVM's first-touch rule).
            case device
        }
        /// How much a fault migrates at least (Xe's chunk sizes).
        public enum Granularity: Int, Sendable {
            case page = 1
            case bigPage = 16
            case block = 512
        }
        public var preferredLocation: Location? = nil
        /// The device maps the pages where they are instead of migrating them.
        public var accessedBy = false
        /// Device reads are served in place (mapped remotely, read-only) and only writes migrate. UVM
        /// duplicates such pages instead; on HMM that needs the CPU's mapping write-protected, which the
        /// mechanism does not give a driver (UVM's own HMM mode does not support read duplication either).
        public var readMostly = false
        public var granularity = Granularity.page

        public init(preferredLocation: Location? = nil, accessedBy: Bool = false, readMostly: Bool = false,
                    granularity: Granularity = .page) {
            self.preferredLocation = preferredLocation
            self.accessedBy = accessedBy
            self.readMostly = readMostly
            self.granularity = granularity
        }

        public static let none = Advice()
        public static let accessedBy = Advice(accessedBy: true)
        public static let readMostly = Advice(readMostly: true)
    }

    /// What the manager did.
    public struct Statistics: Sendable, Equatable {
        public var batches = 0
        public var faultedPages = 0
        public var prefetchedPages = 0
        public var evictions = 0
        public var evictedPages = 0
        public var remoteMappedPages = 0
        public var failures = 0
        /// Pages found thrashing (each with a diagnosis event), throttles, pins and unpins.
        public var thrashingDetected = 0
        public var throttles = 0
        public var pins = 0
        public var unpins = 0
    }

    public let accelerator: Accelerator
    public let space: ManagedSpace
    public let options: Options
    /// The accelerator's context on the space, serviced by this manager.
    public private(set) var context: AcceleratorContext!
    public let budgetPages: Int

    private struct Block {
        var allocation: Int
        var firstResident = -1
        var lastAllocated = -1
        var lastUse = -1
    }
    private struct State {
        var allocations: [Int: ManagedAllocation] = [:]
        var nextAllocation = 1
        var blocks: [UInt64: Block] = [:]
        var sequence = 0
        var stats = Statistics()
        /// Thrashing state of the pages that migrated lately.
        var pages: [UInt64: PageThrashing] = [:]
        /// Pinned pages and when their pin ends.
        var pinned: [UInt64: UInt64] = [:]
    }
    private let state = Locked(State())

    /// A manager of `accelerator`'s memory for `space`.
    /// - Throws: `.invalidArgument` (a budget outside 1 page…the accelerator's memory, watermarks not
    ///   0 < low < high ≤ 1, a negative quota), what creating the context throws (`.busy` if the
    ///   accelerator already has one on the space).
    public init(accelerator: Accelerator, space: ManagedSpace, options: Options = Options()) throws(HMMError) {
        let budget = options.budget ?? accelerator.memoryPages * PageSize.base
        guard budget >= PageSize.base, budget <= accelerator.memoryPages * PageSize.base else {
            throw HMMError(.invalidArgument, "budget of \(budget) bytes is outside 4 KiB…\(accelerator.memoryPages * PageSize.base)")
        }
        if let w = options.watermarks, !(w.low > 0 && w.low < w.high && w.high <= 1) {
            throw HMMError(.invalidArgument, "watermarks must satisfy 0 < low < high ≤ 1")
        }
        guard options.quotas.values.allSatisfy({ $0 >= 0 }) else { throw HMMError(.invalidArgument, "a quota is negative") }
        self.accelerator = accelerator
        self.space = space
        self.options = options
        budgetPages = budget / PageSize.base
        context = try AcceleratorContext(accelerator: accelerator, space: space.mirrored, servicer: self,
                                         batchSize: options.batchSize)
    }

    /// Evicts everything and closes the context; allocations stay mapped (CPU memory).
    public func close() { context.close() }

    public var statistics: Statistics { state.withLock { $0.stats } }

    /// Device pages in use (the accelerator's).
    public var devicePagesInUse: Int { accelerator.memoryPages - accelerator.freePages }

    // MARK: allocations

    /// Allocates `bytes` (rounded up to 4 KiB) of managed memory owned by `owner`.
    /// - Throws: `.invalidArgument` (zero or over 1 TiB), `.outOfMemory`, what the engine throws.
    public func allocate(_ bytes: Int, owner: String = "default", advice: Advice = .none) throws(HMMError) -> ManagedAllocation {
        guard bytes > 0, bytes <= 1 << 40 else { throw HMMError(.invalidArgument, "allocation of \(bytes) bytes") }
        let length = (bytes + PageSize.base - 1) & ~(PageSize.base - 1)
        let (address, region) = try space.map(length)
        do throws(HMMError) { try context.register(address, length: length) } catch {
            space.unmap(address, length, region)
            throw error
        }
        return state.withLock { s in
            let id = s.nextAllocation
            s.nextAllocation += 1
            let a = ManagedAllocation(manager: self, id: id, address: address, length: length, owner: owner, advice: advice, region: region)
            s.allocations[id] = a
            var b = address
            while b < address + UInt64(length) {
                s.blocks[b] = Block(allocation: id)
                b += UInt64(PageSize.pmd)
            }
            return a
        }
    }

    /// Frees an allocation: its device pages are released, its memory unmapped.
    /// - Throws: `.invalidArgument` if it is not this manager's or already freed, `.busy` while a kernel runs.
    public func free(_ a: ManagedAllocation) throws(HMMError) {
        guard state.withLock({ $0.allocations[a.id] != nil }) else {
            throw HMMError(.invalidArgument, "allocation \(a.id) is not live in this manager")
        }
        try context.unregister(a.address)
        state.withLock { s in
            s.allocations[a.id] = nil
            var b = a.address
            while b < a.address + UInt64(a.length) {
                s.blocks[b] = nil
                b += UInt64(PageSize.pmd)
            }
        }
        space.unmap(a.address, a.length, a.region)
    }

    /// Runs a kernel on the accelerator (``AcceleratorContext/launch(items:workers:_:)``).
    public func launch(items: Int, workers: Int, _ body: @escaping @Sendable (DeviceLane, Int) throws(HMMError) -> Void) throws(HMMError) -> AcceleratorContext.KernelReport {
        try context.launch(items: items, workers: workers, body)
    }

    // MARK: servicing

    public func service(_ batch: DeviceFaultBatch, in context: AcceleratorContext) throws(HMMError) {
        let seq = state.withLock { s -> Int in
            s.sequence += 1
            s.stats.batches += 1
            return s.sequence
        }
        sampleAccessBits(seq)
        unpinExpired()
        for block in batch.blocks {
            do throws(HMMError) { try service(block, seq) } catch {
                state.withLock { $0.stats.failures += 1 }
                throw error
            }
        }
        if let w = options.watermarks, devicePagesInUse > Int(Double(budgetPages) * w.high) {
            try evictDown(to: Int(Double(budgetPages) * w.low), protecting: Set(batch.blocks.map(\.start)), neededBy: nil)
        }
    }

    private func service(_ block: DeviceFaultBatch.Block, _ seq: Int) throws(HMMError) {
        guard let (allocation, _) = state.withLock({ s -> (ManagedAllocation, Block)? in
            guard let b = s.blocks[block.start], let a = s.allocations[b.allocation] else { return nil }
            return (a, b)
        }) else {
            // Not managed (a range registered by someone else): plain demand paging.
            try DemandPaging().service(DeviceFaultBatch(id: seq, records: block.pages.map {
                DeviceFaultRecord(address: block.start + UInt64($0.index) << UInt64(PageSize.shift), access: $0.access)
            }), in: context)
            return
        }
        state.withLock { $0.stats.faultedPages += block.pages.count }
        let advice = allocation.advice
        // Pages the advice keeps where they are: all of them (accessed-by, preferred CPU), or the reads
        // of a read-mostly allocation.
        let inPlace = block.pages.filter { advice.accessedBy || advice.preferredLocation == .cpu || (advice.readMostly && !$0.access.writes) }
        if !inPlace.isEmpty {
            var mapped = 0
            for (index, access) in inPlace {
                let a = block.start + UInt64(index) << UInt64(PageSize.shift)
                mapped += try context.mapRemote(a..<(a + UInt64(PageSize.base)), write: access.writes)
            }
            state.withLock { $0.stats.remoteMappedPages += mapped }
            publish(.remoteMap, block.start, mapped)
            if inPlace.count == block.pages.count {
                try context.satisfy(block)
                return
            }
        }
        let migrating = DeviceFaultBatch.Block(start: block.start, pages: block.pages.filter { p in !inPlace.contains { $0.index == p.index } })
        let pagesInBlock = min(PageSize.pagesPerPMD, Int((allocation.address + UInt64(allocation.length) - block.start) >> UInt64(PageSize.shift)))
        let local = context.localPages(block: block.start)
        var faulted = PageBitmap(migrating.pages.map(\.index))
        // The allocation's granularity: a fault moves at least its aligned 64 KiB or 2 MiB.
        if advice.granularity != .page {
            let g = advice.granularity.rawValue
            for i in faulted.indexes { for j in (i / g * g)..<min(pagesInBlock, i / g * g + g) { faulted.insert(j) } }
        }
        var thrashing = PageBitmap()
        if let policy = options.thrashing {
            let (pin, throttle, hot) = thrashingDecisions(migrating, local, policy)
            thrashing = hot
            if !throttle.isEmpty {
                // Throttle the requester: its faults on these pages wait one lapse (UVM's nap).
                publish(.throttleStart, block.start, throttle.count)
                usleep(UInt32(policy.lapse / 1000))
                publish(.throttleEnd, block.start, throttle.count)
                state.withLock { $0.stats.throttles += 1 }
            }
            if !pin.isEmpty {
                // Pinned where it is: the device maps the page remotely instead of moving it.
                for run in DemandPaging.runs(block.start, pin.indexes) {
                    let writes = migrating.pages.contains { pin.contains($0.index) && $0.access.writes }
                    let n = try context.mapRemote(run, write: writes)
                    state.withLock { $0.stats.remoteMappedPages += n }
                    publish(.remoteMap, run.lowerBound, n)
                }
                faulted = faulted.subtracting(pin)
            }
        }
        // First touch brings the whole block only where the device is the destination preferred (or none is).
        let touched = !local.isEmpty || advice.preferredLocation == .cpu
            || space.populatedPages(block.start, pagesInBlock << PageSize.shift, allocation.region) > 0
        let view = BlockState(start: block.start, pages: pagesInBlock, local: local, faulted: faulted, touched: touched)
        // Thrashing pages are never prefetched (UVM removes them from the prefetch region).
        var extra = options.prefetch.prefetch(view).subtracting(faulted).subtracting(local).subtracting(thrashing)
        for i in extra.indexes where i >= pagesInBlock { extra.remove(i) }
        let wanted = faulted.subtracting(local)
        // Room: other blocks are evicted for the faulted pages only; prefetching uses what is free then
        // (evicting for speculation turns a random workload past the budget into an eviction storm).
        let room = try makeRoom(wanted.count, owner: allocation.owner, protecting: block.start, neededBy: block.start)
        if room < wanted.count + extra.count { extra = PageBitmap() }
        if room < wanted.count {
            let why = options.onExhaustion == .fail ? "the policy is to fail" : "nothing can be evicted"
            if let quota = options.quotas[allocation.owner], pagesHeld(by: allocation.owner) + wanted.count > quota / PageSize.base {
                throw HMMError(.outOfMemory, "quota of \(quota >> 20) MiB for owner '\(allocation.owner)' exhausted: \(wanted.count) page(s) at \(hex(block.start)) need room and \(why) (a block is evicted whole: a quota needs at least two 2 MiB blocks)")
            }
            throw HMMError(.outOfMemory, "device budget of \(budgetPages >> 8) MiB exhausted: \(wanted.count) page(s) at \(hex(block.start)) need room and \(why)")
        }
        var refused: [UInt64] = []
        let moved = try context.migrateToDevice(DemandPaging.runs(block.start, wanted.indexes), cause: .deviceFault, refused: &refused)
        var prefetched = 0
        if !extra.isEmpty {
            prefetched = try context.migrateToDevice(DemandPaging.runs(block.start, extra.indexes), cause: .prefetch)
            publish(.prefetch, block.start, prefetched)
        }
        try context.satisfy(block, refused: refused)
        state.withLock { s in
            s.stats.prefetchedPages += prefetched
            guard var b = s.blocks[block.start] else { return }
            if moved + prefetched > 0 {
                if b.firstResident < 0 { b.firstResident = seq }
                b.lastAllocated = seq
            }
            b.lastUse = seq
            s.blocks[block.start] = b
        }
        // Prefetch that crosses into the next block of the allocation.
        let ahead = options.prefetch.ahead(view)
        let next = block.start + UInt64(PageSize.pmd)
        if ahead > 0, next < allocation.address + UInt64(allocation.length) {
            let n = min(ahead, Int((allocation.address + UInt64(allocation.length) - next) >> UInt64(PageSize.shift)))
            let missing = PageBitmap(0..<n).subtracting(context.localPages(block: next))
            if !missing.isEmpty, freeRoom(owner: allocation.owner) >= missing.count {
                let p = try context.migrateToDevice(DemandPaging.runs(next, missing.indexes), cause: .prefetch)
                publish(.prefetch, next, p)
                state.withLock { s in
                    s.stats.prefetchedPages += p
                    if p > 0, var b = s.blocks[next] {
                        if b.firstResident < 0 { b.firstResident = seq }
                        b.lastAllocated = seq
                        s.blocks[next] = b
                    }
                }
            }
        }
    }

    /// Free pages under the budget (and the owner's quota) for `need` pages, evicting other blocks as
    /// the policy picks if allowed; returns the room there is afterwards.
    private func makeRoom(_ need: Int, owner: String, protecting: UInt64, neededBy: UInt64) throws(HMMError) -> Int {
        var room = min(budgetPages - devicePagesInUse, accelerator.freePages)
        if let quota = options.quotas[owner] { room = min(room, quota / PageSize.base - pagesHeld(by: owner)) }
        guard room < need, options.onExhaustion == .evict else { return max(0, room) }
        while room < need {
            guard let victim = pickVictim(protecting: [protecting], owner: options.quotas[owner] != nil ? owner : nil) else { break }
            try evictBlock(victim, neededBy: neededBy)
            room = min(budgetPages - devicePagesInUse, accelerator.freePages)
            if let quota = options.quotas[owner] { room = min(room, quota / PageSize.base - pagesHeld(by: owner)) }
        }
        return max(0, room)
    }

    /// Pages free under the budget and the owner's quota, without evicting anything.
    private func freeRoom(owner: String) -> Int {
        var room = min(budgetPages - devicePagesInUse, accelerator.freePages)
        if let quota = options.quotas[owner] { room = min(room, quota / PageSize.base - pagesHeld(by: owner)) }
        return max(0, room)
    }

    private func evictDown(to target: Int, protecting: Set<UInt64>, neededBy: UInt64?) throws(HMMError) {
        while devicePagesInUse > target, let victim = pickVictim(protecting: protecting, owner: nil) {
            try evictBlock(victim, neededBy: neededBy)
        }
    }

    private func pickVictim(protecting: Set<UInt64>, owner: String?) -> ResidentBlock? {
        let candidates = state.withLock { s in
            s.blocks.filter { start, b in
                !protecting.contains(start) && b.firstResident >= 0
                    && (owner == nil || s.allocations[b.allocation]?.owner == owner)
            }
        }
        var resident: [ResidentBlock] = []
        for (start, b) in candidates {
            let n = context.localPages(block: start).count
            if n > 0 {
                resident.append(ResidentBlock(start: start, localPages: n, firstResident: b.firstResident,
                                              lastAllocated: b.lastAllocated, lastUse: b.lastUse))
            }
        }
        return options.eviction.victim(among: resident)
    }

    private func evictBlock(_ victim: ResidentBlock, neededBy: UInt64?) throws(HMMError) {
        let n = try context.evict(victim.start..<(victim.start + UInt64(PageSize.pmd)), cause: .eviction)
        state.withLock { s in
            s.stats.evictions += 1
            s.stats.evictedPages += n
            if var b = s.blocks[victim.start] {
                b.firstResident = -1
                s.blocks[victim.start] = b
            }
        }
        let hub = accelerator.machine.events
        if hub.isObserving {
            hub.publish(.eviction(EvictionEvent(device: accelerator.location, space: space.mirrored.eventSpaceID,
                                                address: victim.start, pages: n, neededBy: neededBy,
                                                timestamp: monotonicNanoseconds())))
        }
        publish(.evict, victim.start, n)
    }

    /// Device pages held by `owner`'s blocks.
    private func pagesHeld(by owner: String) -> Int {
        let starts = state.withLock { s in s.blocks.filter { s.allocations[$0.value.allocation]?.owner == owner }.map(\.key) }
        return starts.reduce(0) { $0 + context.localPages(block: $1).count }
    }

    // MARK: thrashing

    /// Records the block's device faults that will migrate pages and decides per page: the pages to pin
    /// (map remotely), to throttle, and every page now thrashing (kept out of prefetch).
    private func thrashingDecisions(_ block: DeviceFaultBatch.Block, _ local: PageBitmap,
                                    _ policy: ThrashingPolicy) -> (pin: PageBitmap, throttle: PageBitmap, thrashing: PageBitmap) {
        let now = monotonicNanoseconds()
        var pin = PageBitmap()
        var throttle = PageBitmap()
        var hot = PageBitmap()
        var detected: [(UInt64, PolicyEvent.Hint)] = []
        var pinnedNow: [UInt64] = []
        state.withLock { s in
            for (index, access) in block.pages where !local.contains(index) {
                let a = block.start + UInt64(index) << UInt64(PageSize.shift)
                var t = s.pages[a] ?? PageThrashing()
                if t.record(access.writes ? .deviceWrite : .deviceRead, at: now, policy) {
                    detected.append((a, t.hint))
                    s.stats.thrashingDetected += 1
                }
                switch t.decide(at: now, policy) {
                case .migrate: break
                case .throttle: throttle.insert(index)
                case .pin:
                    pin.insert(index)
                    if s.pinned[a] == nil {
                        s.pinned[a] = t.pinnedUntil
                        s.stats.pins += 1
                        pinnedNow.append(a)
                    }
                }
                if t.thrashing { hot.insert(index) }
                s.pages[a] = t
            }
        }
        for (a, hint) in detected { announce(a, hint) }
        for a in pinnedNow { publish(.pin, a, 1) }
        return (pin, throttle, hot)
    }

    /// A CPU touch brought pages back: a thrashing event for each (the other processor's half of the
    /// ping-pong).
    public func cpuFaultedBack(_ pages: [UInt64], write: Bool, in context: AcceleratorContext) {
        guard let policy = options.thrashing else { return }
        let now = monotonicNanoseconds()
        var detected: [(UInt64, PolicyEvent.Hint)] = []
        state.withLock { s in
            for a in pages {
                var t = s.pages[a] ?? PageThrashing()
                if t.record(write ? .cpuWrite : .cpuRead, at: now, policy) {
                    detected.append((a, t.hint))
                    s.stats.thrashingDetected += 1
                }
                s.pages[a] = t
            }
            // Bounded bookkeeping: forget quiet pages once the table grows.
            if s.pages.count > 1 << 16 { s.pages = s.pages.filter { now &- $0.value.last < policy.epoch } }
        }
        for (a, hint) in detected { announce(a, hint) }
    }

    /// ThrashingDetected, and the diagnosis naming the advice that would stop it.
    private func announce(_ a: UInt64, _ hint: PolicyEvent.Hint) {
        let hub = accelerator.machine.events
        guard hub.isObserving else { return }
        let t = monotonicNanoseconds()
        for kind in [PolicyEvent.Kind.thrashingDetected, .diagnosis] {
            hub.publish(.policy(PolicyEvent(kind: kind, space: space.mirrored.eventSpaceID, address: a, bytes: PageSize.base,
                                            processor: accelerator.location, hint: kind == .diagnosis ? hint : .none,
                                            timestamp: t)))
        }
    }

    /// Pins past their time end: the device's remote mappings are dropped, so the next access faults
    /// and the page migrates again (UVM's delayed unpin work).
    private func unpinExpired() {
        let now = monotonicNanoseconds()
        let expired = state.withLock { s -> [UInt64] in
            let done = s.pinned.filter { $0.value <= now }.map(\.key)
            for a in done {
                s.pinned[a] = nil
                s.stats.unpins += 1
            }
            return done
        }
        for a in expired {
            context.dropMappings(a, a + UInt64(PageSize.base))
            publish(.unpin, a, 1)
        }
    }

    /// The diagnoses so far: for each page found thrashing, the advice that would stop it.
    public var diagnoses: [(address: UInt64, hint: PolicyEvent.Hint)] {
        state.withLock { s in s.pages.filter { $0.value.thrashing }.map { ($0.key, $0.value.hint) }.sorted { $0.0 < $1.0 } }
    }

    /// LRU's input: blocks whose pages the device touched since the last batch are used now.
    private func sampleAccessBits(_ seq: Int) {
        guard options.eviction is LRUEviction else { return }
        let resident = state.withLock { s in s.blocks.filter { $0.value.firstResident >= 0 }.map(\.key) }
        var used: [UInt64] = []
        for start in resident where context.testAndClearAccessed(start, start + UInt64(PageSize.pmd)) { used.append(start) }
        state.withLock { s in for start in used { s.blocks[start]?.lastUse = seq } }
    }

    private func publish(_ kind: PolicyEvent.Kind, _ address: UInt64, _ pages: Int) {
        let hub = accelerator.machine.events
        guard hub.isObserving, pages > 0 else { return }
        hub.publish(.policy(PolicyEvent(kind: kind, space: space.mirrored.eventSpaceID, address: address,
                                        bytes: pages << PageSize.shift, processor: accelerator.location,
                                        timestamp: monotonicNanoseconds())))
    }
}

/// A managed allocation: `length` bytes at `address`, reachable by the CPU and the accelerator.
public final class ManagedAllocation: @unchecked Sendable {
    public unowned let manager: ManagedMemory
    public let id: Int
    public let address: UInt64
    public let length: Int
    public let owner: String
    public let advice: ManagedMemory.Advice
    let region: NativeRegion?

    init(manager: ManagedMemory, id: Int, address: UInt64, length: Int, owner: String, advice: ManagedMemory.Advice,
         region: NativeRegion?) {
        self.manager = manager
        self.id = id
        self.address = address
        self.length = length
        self.owner = owner
        self.advice = advice
        self.region = region
    }

    /// Reads `count` 64-bit words from word `index` through the CPU (faulting device pages back).
    /// - Throws: `.invalidArgument` outside the allocation, what the CPU access throws.
    public func cpuLoad(_ index: Int, count: Int) throws(HMMError) -> [UInt64] {
        try check(index, count)
        var out = [UInt64](repeating: 0, count: count)
        let at = address + UInt64(index * 8)
        let space = manager.space
        var failure: HMMError?
        out.withUnsafeMutableBytes { b in
            do throws(HMMError) { try space.cpuRead(at, into: b) } catch { failure = error }
        }
        if let failure { throw failure }
        return out
    }

    /// Writes words from word `index` through the CPU.
    /// - Throws: `.invalidArgument` outside the allocation, what the CPU access throws.
    public func cpuStore(_ words: [UInt64], at index: Int) throws(HMMError) {
        try check(index, words.count)
        let at = address + UInt64(index * 8)
        let space = manager.space
        var failure: HMMError?
        words.withUnsafeBytes { b in
            do throws(HMMError) { try space.cpuWrite(at, from: b) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    private func check(_ index: Int, _ count: Int) throws(HMMError) {
        guard index >= 0, count >= 0, (index + count) * 8 <= length else {
            throw HMMError(.invalidArgument, "words \(index)..<\(index + count) are outside the allocation of \(length) bytes")
        }
    }

    /// The address of word `index`.
    public func word(_ index: Int) -> UInt64 { address + UInt64(index * 8) }

    /// The allocation as a pointer (a native space's memory is this process's: plain loads and stores
    /// reach it, faulting device pages back; a simulated space's addresses are not host addresses).
    public var pointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: UInt(address))! }
}

private func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
