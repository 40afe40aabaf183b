import CUserfaultfd
import HMM
import HMMNative
#if canImport(Glibc)
import Glibc
#endif

/// The selftests' process on the native engine: this process, with its private anonymous mappings
/// allocated as ``NativeRegion``s of a ``NativeSpace`` (so they can migrate), and every other call a
/// real system call on the real address — `munmap`, `madvise` and `mremap` reach the engine as the
/// host's userfaultfd events, as they reach a kernel driver as MMU notifiers.
///
/// Loads and stores are the kernel's user copies (`process_vm_readv`/`writev` on this process): a
/// device-resident page faults back through the driver, an unmapped address throws.
/// Hugetlb and file mappings have no native meaning here and skip the case (``SelftestSkip``).
public final class NativeSelftestProcess: SelftestProcess {
    public let space: NativeSpace
    public var mirrored: any MirroredAddressSpace { space }

    /// Shared mappings made for the case (the engine does not manage them): unmapped at teardown.
    private var sharedMappings: [(address: UInt64, length: Int)] = []

    public init(space: NativeSpace) { self.space = space }

    /// Gives the case's memory back: every region the space still has (only the pages it still owns)
    /// and the shared mappings. Call before closing the space.
    public func tearDown() {
        for region in space.regions { region.free() }
        for m in sharedMappings { _ = munmap(pointer(m.address), m.length) }
        sharedMappings = []
    }

    public func map(length: Int, protection: Protection, flags: MapFlags, file: MemoryFile?) throws -> UInt64 {
        if flags.contains(.hugetlb) { throw SelftestSkip(reason: "hugetlb mappings are not registered natively (no hugetlbfs pool here)") }
        if file != nil { throw SelftestSkip(reason: "file mappings are outside the native engine's registered memory") }
        if flags.contains(.shared) {
            // Shared anonymous memory: an ordinary mapping the engine does not register (it cannot migrate).
            let p = mmap(nil, length, hostFlags(protection), MAP_SHARED | MAP_ANONYMOUS, -1, 0)
            guard let p, p != MAP_FAILED else { throw HMMError(.outOfMemory, "mmap of \(length) shared bytes") }
            let address = UInt64(UInt(bitPattern: p))
            sharedMappings.append((address, length))
            return address
        }
        // No huge-page advice: the host's default, as for the kernel test's own mmap.
        return try space.allocate(length: length, protection: protection, hugePages: nil).address
    }

    public func unmap(_ address: UInt64, length: Int) throws {
        try check(munmap(pointer(address), length), "munmap")
    }

    public func protect(_ address: UInt64, length: Int, _ protection: Protection) throws {
        if let region = space.region(containing: address), address + UInt64(length) <= region.end {
            let lo = Int(address - region.address)
            try region.protect(lo..<(lo + length), protection)
        } else {
            try check(mprotect(pointer(address), length, hostFlags(protection)), "mprotect")
        }
    }

    public func advise(_ address: UInt64, length: Int, _ advice: Advice) throws {
        // Huge-page advice inside a region goes through the engine, which then gives first touches THPs.
        if advice == .hugePage || advice == .noHugePage, let region = space.region(containing: address),
            address + UInt64(length) <= region.end
        {
            let lo = Int(address - region.address)
            return try region.advise(lo..<(lo + length), hugePages: advice == .hugePage)
        }
        let host: Int32
        switch advice {
        case .dontNeed: host = MADV_DONTNEED
        case .free: host = MADV_FREE
        case .hugePage: host = MADV_HUGEPAGE
        case .noHugePage: host = MADV_NOHUGEPAGE
        case .collapse: host = 25  // MADV_COLLAPSE (6.1)
        case .dontFork: host = MADV_DONTFORK
        case .doFork: host = MADV_DOFORK
        case .wipeOnFork: host = MADV_WIPEONFORK
        case .keepOnFork: host = MADV_KEEPONFORK
        case .populateRead: host = 22
        case .populateWrite: host = 23
        @unknown default: throw SelftestSkip(reason: "advice \(advice) has no native counterpart here")
        }
        try check(madvise(pointer(address), length, host), "madvise")
    }

    public func remap(_ address: UInt64, length: Int, newLength: Int, flags: RemapFlags, to target: UInt64?) throws -> UInt64 {
        var error: Int32 = 0
        let at = cu_mremap(address, UInt64(length), UInt64(newLength), Int32(flags.rawValue), target ?? 0, &error)
        guard at != 0 else { throw hostError(-error, "mremap") }
        return at
    }

    /// A CPU read, as the kernel's `copy_from_user` makes it (`process_vm_readv` on this process): a
    /// device-resident page faults back through the engine, and an address with no readable mapping
    /// throws `.fault` where a plain load would kill the test process.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at address: UInt64) throws {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        let n = cu_self_read(base, pointer(address)!, buffer.count)
        guard n == buffer.count else { throw hostError(n < 0 ? Int32(-n) : EFAULT, "read of \(buffer.count) bytes at \(address)") }
    }

    /// A CPU write, as ``read(into:at:)`` reads.
    public func write(_ bytes: UnsafeRawBufferPointer, at address: UInt64) throws {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        let n = cu_self_write(pointer(address)!, base, bytes.count)
        guard n == bytes.count else { throw hostError(n < 0 ? Int32(-n) : EFAULT, "write of \(bytes.count) bytes at \(address)") }
    }

    private func pointer(_ address: UInt64) -> UnsafeMutableRawPointer? { UnsafeMutableRawPointer(bitPattern: UInt(address)) }

    private func check(_ rc: Int32, _ what: String) throws {
        if rc != 0 { throw hostError(errno, what) }
    }

    private func hostError(_ e: Int32, _ what: String) -> HMMError {
        let code: HMMError.Code = e == EINVAL ? .invalidArgument : e == ENOMEM ? .outOfMemory : e == EPERM || e == EACCES ? .permission : .fault
        return HMMError(code, "\(what): \(String(cString: strerror(e))) (errno \(e))")
    }

    private func hostFlags(_ p: Protection) -> Int32 {
        (p.contains(.read) ? PROT_READ : 0) | (p.contains(.write) ? PROT_WRITE : 0) | (p.contains(.execute) ? PROT_EXEC : 0)
    }
}
