import HMM
import HMMDevices
import ManagedMemory
import Testing

/// Each policy's rule at the anchors' thresholds: just below, at, just above.
@Suite("managed memory: policy rules", .timeLimit(.minutes(10)))
struct PolicyTests {
    func state(local: [Int] = [], faulted: [Int], touched: Bool = true, pages: Int = 512) -> BlockState {
        BlockState(start: 0x20_0000, pages: pages, local: PageBitmap(local), faulted: PageBitmap(faulted), touched: touched)
    }

    @Test("density: an untouched block comes whole on first touch")
    func firstTouchWholeBlock() {
        #expect(DensityPrefetch().prefetch(state(faulted: [7], touched: false)).count == 512)
        #expect(DensityPrefetch().prefetch(state(faulted: [7], touched: false, pages: 100)).count == 100)
    }

    @Test("density: a lone fault in a touched block brings its 64 KiB big page only")
    func loneFault() {
        let p = DensityPrefetch().prefetch(state(faulted: [20]))
        #expect(p == PageBitmap(16..<32))
    }

    @Test("density: a 128 KiB subtree is taken above 51 % and not at or below it")
    func threshold51() {
        // 128 KiB subtree = pages 0..<32. The faulted big page 0..<16 counts 16 leaves; local pages in
        // 16..<32 add to them. 32 × 51 % = 16.32: 17 leaves qualify, 16 do not.
        let at = DensityPrefetch().prefetch(state(local: [], faulted: [0]))
        #expect(at == PageBitmap(0..<16), "16 of 32 = 50 %: not more than 51 %")
        let above = DensityPrefetch().prefetch(state(local: [16], faulted: [0]))
        #expect(above.contains(31) && !above.contains(32), "17 of 32 > 51 %: the 128 KiB subtree")
        // Threshold 50: 16 of 32 is not more than 50 % either; 17 is.
        #expect(DensityPrefetch(threshold: 50).prefetch(state(faulted: [0])) == PageBitmap(0..<16))
        #expect(DensityPrefetch(threshold: 49).prefetch(state(faulted: [0])).contains(31), "16 of 32 > 49 %")
    }

    @Test("density: a mostly resident block is completed to 2 MiB")
    func completesBlock() {
        let p = DensityPrefetch().prefetch(state(local: Array(0..<262), faulted: [300]))
        #expect(p.count == 512, "262 local + the faulted big page = 278 of 512 > 51 %")
        let q = DensityPrefetch().prefetch(state(local: Array(0..<240), faulted: [300]))
        #expect(q.count < 512, "240 + 16 = 256 of 512 = 50 %: not the whole block")
    }

    @Test("sequential: the next 16 pages of each fault, within the block")
    func sequential() {
        #expect(SequentialPrefetch().prefetch(state(faulted: [10])) == PageBitmap(10..<26))
        #expect(SequentialPrefetch().prefetch(state(faulted: [505])) == PageBitmap(505..<512))
        #expect(SequentialPrefetch().ahead(state(faulted: [505])) == 0)
        #expect(CrossBlockPrefetch(window: 16).ahead(state(faulted: [505])) == 9, "the cross-block policy continues into the next block")
    }

    @Test("eviction: UVM order by allocation, LRU by last use, FIFO by first residency")
    func evictionOrder() {
        let blocks = [
            ResidentBlock(start: 0x0, localPages: 512, firstResident: 1, lastAllocated: 9, lastUse: 9),
            ResidentBlock(start: 0x20_0000, localPages: 512, firstResident: 2, lastAllocated: 3, lastUse: 10),
            ResidentBlock(start: 0x40_0000, localPages: 512, firstResident: 3, lastAllocated: 4, lastUse: 5),
        ]
        #expect(AllocationOrderEviction().victim(among: blocks)?.start == 0x20_0000)
        #expect(LRUEviction().victim(among: blocks)?.start == 0x40_0000)
        #expect(FIFOEviction().victim(among: blocks)?.start == 0x0)
        #expect(LRUEviction().victim(among: []) == nil)
    }
}
