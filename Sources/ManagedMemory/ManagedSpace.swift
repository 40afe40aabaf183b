import HMM
import HMMNative

/// The engine a ``ManagedMemory`` allocates from: the simulated machine's address space, or this
/// process's real memory through a native space. Everything else — the accelerator, its faults, the
/// policies — is the same code on both.
public enum ManagedSpace: Sendable {
    case simulated(AddressSpace)
    case native(NativeSpace)

    /// The driver-facing space.
    public var mirrored: any MirroredAddressSpace {
        switch self {
        case .simulated(let s): return s
        case .native(let s): return s
        }
    }

    public var machine: Machine { mirrored.machine }

    /// Maps `length` bytes of private anonymous memory, 2 MiB-aligned, with 4 KiB pages (device blocks
    /// are tracked per 2 MiB; THP would only be split by the first migration).
    func map(_ length: Int) throws(HMMError) -> (address: UInt64, region: NativeRegion?) {
        switch self {
        case .simulated(let s):
            let raw = try s.map(length: length + PageSize.pmd, protection: [.read, .write], flags: [.private, .anonymous])
            let a = (raw + UInt64(PageSize.pmd - 1)) & ~UInt64(PageSize.pmd - 1)
            if a > raw { try s.unmap(raw, length: Int(a - raw)) }
            let tail = Int(raw) + length + PageSize.pmd - Int(a) - length
            if tail > 0 { try s.unmap(a + UInt64(length), length: tail) }
            try s.advise(a, length: length, .noHugePage)
            return (a, nil)
        case .native(let s):
            let r = try s.allocate(length: length, hugePages: false)
            return (r.address, r)
        }
    }

    func unmap(_ address: UInt64, _ length: Int, _ region: NativeRegion?) {
        switch self {
        case .simulated(let s): try? s.unmap(address, length: length)
        case .native: region?.free()
        }
    }

    /// Pages of `[address, address + length)` the CPU has populated (resident in host memory).
    func populatedPages(_ address: UInt64, _ length: Int, _ region: NativeRegion?) -> Int {
        switch self {
        case .simulated(let s):
            return (try? s.residentPages(address, length: length)) ?? 0
        case .native:
            guard let region, let places = try? region.residency(Int(address - region.address)..<Int(address - region.address) + length)
            else { return 0 }
            return places.reduce(0) { n, r in
                if case .host(_, let zero) = r, !zero { return n + 1 }
                return n
            }
        }
    }

    /// CPU faults that brought device pages back so far (the simulated machine's, or the native space's).
    public var cpuFaultBacks: Int {
        switch self {
        case .simulated(let s): return s.machine.statistics[.faultDevicePrivate]
        case .native(let s): return s.statistics.snapshot.faultBacks
        }
    }

    /// Copies bytes out through the CPU (faulting device pages back, as a CPU load would).
    func cpuRead(_ address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(HMMError) {
        switch self {
        case .simulated(let s): try s.read(into: buffer, at: address)
        case .native:
            buffer.baseAddress!.copyMemory(from: UnsafeRawPointer(bitPattern: UInt(address))!, byteCount: buffer.count)
        }
    }

    /// Copies bytes in through the CPU.
    func cpuWrite(_ address: UInt64, from buffer: UnsafeRawBufferPointer) throws(HMMError) {
        switch self {
        case .simulated(let s): try s.write(buffer, at: address)
        case .native:
            UnsafeMutableRawPointer(bitPattern: UInt(address))!.copyMemory(from: buffer.baseAddress!, byteCount: buffer.count)
        }
    }
}
