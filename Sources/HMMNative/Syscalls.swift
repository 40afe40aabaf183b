import CUserfaultfd
import HMM
#if canImport(Glibc)
import Glibc
#endif

/// The system calls of the native engine, behind one thin internal seam (as swift-system wraps its
/// `system_*` calls): every function is one call of the C shim, returning 0 or a count on success and
/// a negative errno on failure. Nothing above this file calls the shim's ioctls directly.
enum Sys {
    static let page = UInt64(PageSize.base)
    static let pmd = UInt64(PageSize.pmd)

    /// `UFFDIO_MOVE` of `length` bytes; the bytes moved come back even on a partial failure.
    static func move(_ fd: Int32, to dst: UInt64, from src: UInt64, _ length: UInt64, allowHoles: Bool = false,
                     dontWake: Bool = false) -> (Int32, Int64) {
        var moved: Int64 = 0
        let mode = (allowHoles ? UInt64(CU_MOVE_ALLOW_SRC_HOLES) : 0) | (dontWake ? UInt64(CU_MODE_DONTWAKE) : 0)
        let rc = cu_move(fd, dst, src, length, mode, &moved)
        return (rc, moved)
    }

    /// `UFFDIO_COPY` of `length` bytes from `src` (any readable memory) into the registered hole `dst`.
    static func copy(_ fd: Int32, to dst: UInt64, from src: UInt64, _ length: UInt64, dontWake: Bool = false) -> (Int32, Int64) {
        var copied: Int64 = 0
        let rc = cu_copy(fd, dst, src, length, dontWake ? UInt64(CU_MODE_DONTWAKE) : 0, &copied)
        return (rc, copied)
    }

    static func zeropage(_ fd: Int32, _ start: UInt64, _ length: UInt64, dontWake: Bool = false) -> Int32 {
        var zeroed: Int64 = 0
        return cu_zeropage(fd, start, length, dontWake ? UInt64(CU_MODE_DONTWAKE) : 0, &zeroed)
    }

    static func poison(_ fd: Int32, _ start: UInt64, _ length: UInt64) -> Int32 { cu_poison(fd, start, length) }
    static func wake(_ fd: Int32, _ start: UInt64, _ length: UInt64) -> Int32 { cu_wake(fd, start, length) }
    static func register(_ fd: Int32, _ start: UInt64, _ length: UInt64, missing: Bool, minor: Bool = false) -> Int32 {
        cu_register(fd, start, length, (missing ? UInt64(CU_REGISTER_MISSING) : UInt64(CU_REGISTER_WP))
                        | (minor ? UInt64(CU_REGISTER_MINOR) : 0))
    }
    /// `UFFDIO_CONTINUE`: maps the shared-memory pages already behind a MINOR-registered range.
    static func continueMapping(_ fd: Int32, _ start: UInt64, _ length: UInt64) -> Int32 { cu_continue(fd, start, length) }
    /// `mmap(MAP_FIXED | MAP_SHARED | MAP_POPULATE)` of `file` at `offset` over `[start, start + length)`.
    static func mapShared(at start: UInt64, _ length: UInt64, _ protection: Protection, file: Int32, offset: Int) -> Int32 {
        cu_map_shared_fixed(start, length, protection.hostFlags, file, UInt64(offset), 1)
    }
    /// A fresh anonymous private mapping of `length` bytes anywhere; 0 on failure.
    static func mapAnonymous(_ length: UInt64, _ protection: Protection) -> UInt64 {
        var error: Int32 = 0
        return cu_map_aligned(length, page, protection.hostFlags, &error)
    }
    /// `mremap(MREMAP_MAYMOVE | MREMAP_FIXED)` of `[from, from + length)` onto `to`, replacing what is
    /// there; 0 or -errno.
    static func moveMapping(from: UInt64, to: UInt64, _ length: UInt64) -> Int32 {
        var error: Int32 = 0
        let at = cu_mremap(from, length, length, 3, to, &error)
        return at == to ? 0 : (error != 0 ? error : -EINVAL)
    }
    /// Whether every page of `[start, end)` is mapped (`msync(MS_ASYNC)` answers `ENOMEM` otherwise).
    /// The inode number of open file `fd` (0 if `fstat` fails).
    static func inode(_ fd: Int32) -> UInt64 {
        var st = stat()
        return fstat(fd, &st) == 0 ? UInt64(st.st_ino) : 0
    }
    static func isMapped(_ start: UInt64, _ end: UInt64) -> Bool {
        msync(UnsafeMutableRawPointer(bitPattern: UInt(start)), Int(end - start), MS_ASYNC) == 0
    }
    static func unregister(_ fd: Int32, _ start: UInt64, _ length: UInt64) -> Int32 { cu_unregister(fd, start, length) }
    static func madvise(_ start: UInt64, _ length: UInt64, _ advice: Int32) -> Int32 { cu_madvise(start, length, advice) }
    static func munmap(_ start: UInt64, _ length: UInt64) -> Int32 { cu_munmap(start, length) }
    static func mprotect(_ start: UInt64, _ length: UInt64, _ protection: Protection) -> Int32 {
        cu_mprotect(start, length, protection.hostFlags)
    }

    static let dontNeed = Int32(MADV_DONTNEED)
    static let hugePage = Int32(MADV_HUGEPAGE)
    static let noHugePage = Int32(MADV_NOHUGEPAGE)
    static let dontFork = Int32(MADV_DONTFORK)
    static let populateRead: Int32 = 22   // MADV_POPULATE_READ (5.14)
    static let populateWrite: Int32 = 23  // MADV_POPULATE_WRITE (5.14)
}

extension Protection {
    /// `PROT_*` bits.
    var hostFlags: Int32 {
        (contains(.read) ? PROT_READ : 0) | (contains(.write) ? PROT_WRITE : 0) | (contains(.execute) ? PROT_EXEC : 0)
    }
}

extension HMMError {
    /// The error a failed system call means, named after the call and the errno.
    static func system(_ rc: Int32, _ what: String) -> HMMError {
        let e = -rc
        let code: HMMError.Code
        switch e {
        case EFAULT: code = .fault
        case EPERM, EACCES: code = .permission
        case EINVAL: code = .invalidArgument
        case ENOENT: code = .noEntry
        case ENOMEM: code = .outOfMemory
        case EBUSY, EEXIST: code = .busy
        case EAGAIN: code = .tryAgain
        case ENOSYS, EOPNOTSUPP: code = .unsupported
        default: code = .fault
        }
        return HMMError(code, "\(what): \(String(cString: strerror(e))) (errno \(e))")
    }
}
