#if canImport(Glibc)
import Glibc
#endif

/// The one error type of swift-hmm.
///
/// Every public entry point validates its input and throws an `HMMError` instead of trapping. The
/// ``Code`` says which errno (or signal) the kernel would have produced; the message names the address
/// and the reason.
public struct HMMError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What went wrong, as the kernel would report it.
    public enum Code: String, Hashable, Sendable, CaseIterable {
        /// `EFAULT`: a bad address handed to a system call (GUP on an unmapped or forbidden range…).
        case fault
        /// `EPERM`: the operation is not permitted (a device write to a read-only mapping…).
        case permission
        /// `EINVAL`: malformed arguments (unaligned, zero length, contradictory flags…).
        case invalidArgument
        /// `ENOENT`: no such entry.
        case noEntry
        /// `ENOMEM`: out of memory, or an address range that cannot be found or represented.
        case outOfMemory
        /// `EBUSY`: the object is in use.
        case busy
        /// `EAGAIN`: a transient condition; trying again may succeed.
        case tryAgain
        /// `EOPNOTSUPP`: the operation is not supported on this object.
        case unsupported
        /// `EREMOTEIO`: peer-to-peer memory reached without the flag that allows it.
        case remoteIO
        /// `ESRCH`: the address space has exited.
        case noProcess
        /// `EBADF`: a closed device handle.
        case badDescriptor
        /// `ENODEV`: the device was removed.
        case noDevice
        /// `EEXIST`: the object already exists (a `MAP_FIXED_NOREPLACE` range that is already mapped).
        case exists
        /// `SIGSEGV`: a CPU access the mapping does not allow, or an access to no mapping at all.
        case segmentationFault
        /// `SIGBUS`: a CPU access to memory that cannot be provided (past the end of a file,
        /// hardware poison, an exhausted hugetlb pool, a revoked mapping).
        case bus
    }

    /// The kind of failure.
    public let code: Code
    /// A human-readable reason naming the address or argument involved.
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// The errno value the kernel returns for this failure. Signals (`SIGSEGV`, `SIGBUS`) report `EFAULT`,
    /// which is what a system call touching such memory returns.
    public var errno: Int32 {
        switch code {
        case .fault, .segmentationFault, .bus: return EFAULT
        case .permission: return EPERM
        case .invalidArgument: return EINVAL
        case .noEntry: return ENOENT
        case .outOfMemory: return ENOMEM
        case .busy: return EBUSY
        case .tryAgain: return EAGAIN
        case .unsupported: return EOPNOTSUPP
        case .remoteIO: return EREMOTEIO
        case .noProcess: return ESRCH
        case .badDescriptor: return EBADF
        case .noDevice: return ENODEV
        case .exists: return EEXIST
        }
    }

    public var description: String { "\(code): \(message)" }

    static func invalid(_ message: String) -> HMMError { HMMError(.invalidArgument, message) }
}

/// Formats an address the way kernel messages do.
func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
