#if canImport(Glibc)
import Glibc
#endif

/// A block of anonymous virtual memory reserved with `MAP_NORESERVE`: the only system call the platform-
/// free core makes. The kernel backs it lazily, so a large reservation costs nothing until touched.
final class Arena: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let byteCount: Int
    /// False for memory someone else mapped (a native region seen through a host window).
    private let owned: Bool

    /// Memory owned elsewhere, named here; never unmapped by the arena.
    init(borrowing base: UnsafeMutableRawPointer, byteCount: Int) {
        self.base = base
        self.byteCount = byteCount
        owned = false
    }

    /// - Throws: `.outOfMemory` if the host refuses the reservation.
    init(byteCount: Int, what: String) throws(HMMError) {
        let p = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else {
            throw HMMError(.outOfMemory, "cannot reserve \(byteCount) bytes of host memory for \(what)")
        }
        base = p
        self.byteCount = byteCount
        owned = true
        // Ask the host for transparent huge pages behind large arenas: page copies and walks then miss the
        // host TLB far less often. Advisory; harmless where THP is off.
        if byteCount >= 2 << 20 { _ = madvise(p, byteCount, Int32(MADV_HUGEPAGE)) }
    }

    deinit { if owned { munmap(base, byteCount) } }
}
