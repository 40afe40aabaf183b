#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A block of anonymous virtual memory reserved with `MAP_NORESERVE`: the only system call the platform-
/// free core makes. The kernel backs it lazily, so a large reservation costs nothing until touched.
final class Arena: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let byteCount: Int
    /// False for memory someone else mapped (a native region seen through a host window).
    private let owned: Bool
    /// The shared-memory file behind a ``init(sharedByteCount:what:)`` arena, else -1: its pages can be
    /// mapped a second time elsewhere in the process (the native engine maps device-coherent frames
    /// into regions that way), and both mappings see the same bytes.
    let file: Int32

    /// Memory owned elsewhere, named here; never unmapped by the arena.
    init(borrowing base: UnsafeMutableRawPointer, byteCount: Int) {
        self.base = base
        self.byteCount = byteCount
        owned = false
        file = -1
    }

    /// An arena backed by an unlinked POSIX shared-memory object (tmpfs), mapped `MAP_SHARED`. Pages are
    /// allocated on first touch, as for an anonymous arena.
    /// - Throws: `.outOfMemory` if the host refuses the object or the mapping.
    init(sharedByteCount byteCount: Int, what: String) throws(HMMError) {
        let fd = try Arena.sharedMemoryFile(byteCount: byteCount, what: what)
        let p = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
        guard let p, p != MAP_FAILED else {
            close(fd)
            throw HMMError(.outOfMemory, "cannot map \(byteCount) bytes of shared memory for \(what)")
        }
        base = p
        self.byteCount = byteCount
        owned = true
        file = fd
    }

    private static let sharedSerial = Atomic<Int>(0)

    /// A fresh, unlinked POSIX shared-memory object (tmpfs) of `byteCount` zero bytes, close-on-exec.
    /// - Throws: `.outOfMemory` if the host refuses it.
    static func sharedMemoryFile(byteCount: Int, what: String) throws(HMMError) -> Int32 {
        var fd: Int32 = -1
        for attempt in 0..<64 where fd < 0 {
            let name = "/swift-hmm-\(getpid())-\(Arena.sharedSerial.add(1, ordering: .relaxed).newValue)-\(attempt)"
            fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            if fd >= 0 { shm_unlink(name) } else if errno != EEXIST { break }
        }
        guard fd >= 0, ftruncate(fd, off_t(byteCount)) == 0 else {
            if fd >= 0 { close(fd) }
            throw HMMError(.outOfMemory, "cannot create \(byteCount) bytes of shared memory for \(what)")
        }
        return fd
    }

    /// - Throws: `.outOfMemory` if the host refuses the reservation.
    init(byteCount: Int, what: String) throws(HMMError) {
        let p = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else {
            throw HMMError(.outOfMemory, "cannot reserve \(byteCount) bytes of host memory for \(what)")
        }
        file = -1
        base = p
        self.byteCount = byteCount
        owned = true
        // Ask the host for transparent huge pages behind large arenas: page copies and walks then miss the
        // host TLB far less often. Advisory; harmless where THP is off.
        if byteCount >= 2 << 20 { _ = madvise(p, byteCount, Int32(MADV_HUGEPAGE)) }
    }

    deinit {
        if owned { munmap(base, byteCount) }
        if file >= 0 { close(file) }
    }
}
