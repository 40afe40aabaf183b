import HMM

/// The process a selftest runs in: the address-space operations the kernel's test bodies make as
/// system calls (`mmap`, `munmap`, `mprotect`, `madvise`, `mremap`, loads and stores). The simulated
/// engine's ``AddressSpace`` is one; ``NativeSelftestProcess`` makes them real calls on this process's
/// memory, so the same bodies run on either engine.
///
/// Each call throws `HMMError` as its engine does (the simulated core's typed errors, or the host's
/// errno as an `HMMError`), or ``SelftestSkip`` where the engine cannot give the call its kernel
/// meaning (a hugetlb or file mapping natively): the case is then skipped with that reason.
public protocol SelftestProcess: AnyObject {
    /// The space drivers mirror: ``MirrorDevice/open(_:)`` takes it.
    var mirrored: any MirroredAddressSpace { get }
    func map(length: Int, protection: Protection, flags: MapFlags, file: MemoryFile?) throws -> UInt64
    func unmap(_ address: UInt64, length: Int) throws
    func protect(_ address: UInt64, length: Int, _ protection: Protection) throws
    func advise(_ address: UInt64, length: Int, _ advice: Advice) throws
    func remap(_ address: UInt64, length: Int, newLength: Int, flags: RemapFlags, to target: UInt64?) throws -> UInt64
    /// A CPU read of `buffer.count` bytes at `address` (faulting as a load would).
    func read(into buffer: UnsafeMutableRawBufferPointer, at address: UInt64) throws
    /// A CPU write of `bytes` at `address` (faulting as a store would).
    func write(_ bytes: UnsafeRawBufferPointer, at address: UInt64) throws
}

extension SelftestProcess {
    /// A CPU load of one value.
    func load<T: BitwiseCopyable>(at address: UInt64) throws -> T {
        var value = [UInt8](repeating: 0, count: MemoryLayout<T>.size)
        try value.withUnsafeMutableBytes { try read(into: $0, at: address) }
        return value.withUnsafeBytes { $0.loadUnaligned(as: T.self) }
    }

    /// A CPU store of one value.
    func store<T: BitwiseCopyable>(_ value: T, at address: UInt64) throws {
        try withUnsafeBytes(of: value) { try write($0, at: address) }
    }
}

extension AddressSpace: SelftestProcess {
    public var mirrored: any MirroredAddressSpace { self }

    public func map(length: Int, protection: Protection, flags: MapFlags, file: MemoryFile?) throws -> UInt64 {
        try map(at: 0, length: length, protection: protection, flags: flags, file: file, offset: 0)
    }
}
