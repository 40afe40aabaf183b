import CHMM
import HMM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The kinds of opaque handle `hmm.h` hands out.
enum HandleKind: UInt64, CustomStringConvertible {
    case machine = 1, space, region, device, mirror, subscription

    var description: String {
        switch self {
        case .machine: "machine"
        case .space: "space"
        case .region: "region"
        case .device: "device"
        case .mirror: "mirror"
        case .subscription: "subscription"
        }
    }
}

/// Every live handle of the library. A handle is a number, `kind << 48 | serial`, never an address: C
/// code passing a destroyed, forged or wrong-kind handle gets `-EBADF`/`-EINVAL`, never a dangling
/// dereference. Serials are never reused.
///
/// Each entry names its parent (a space's machine, a region's space, a mirror's device and space), so
/// destroying a parent can refuse while children live (`-EBUSY`) or invalidate them with it.
///
/// Locking: one mutex, a leaf — no engine call runs under it.
final class HandleTable: Sendable {
    static let shared = HandleTable()

    struct Entry {
        let kind: HandleKind
        let object: any AnyObject & Sendable
        let parents: [UInt64]
    }

    private let entries = Mutex<[UInt64: Entry]>([:])
    private let serial = Atomic<UInt64>(1)

    /// A new handle for `object`.
    func insert(_ object: any AnyObject & Sendable, _ kind: HandleKind, parents: [UInt64] = []) -> OpaquePointer {
        let id = kind.rawValue << 48 | serial.wrappingAdd(1, ordering: .relaxed).oldValue
        entries.withLock { $0[id] = Entry(kind: kind, object: object, parents: parents) }
        return OpaquePointer(bitPattern: UInt(id))!
    }

    /// The handle already given for `object` (regions found again), or a new one.
    func handle(for object: any AnyObject & Sendable, _ kind: HandleKind, parents: [UInt64]) -> OpaquePointer {
        entries.withLock { e -> OpaquePointer in
            if let (id, _) = e.first(where: { $0.value.object === object && $0.value.kind == kind }) {
                return OpaquePointer(bitPattern: UInt(id))!
            }
            let id = kind.rawValue << 48 | serial.wrappingAdd(1, ordering: .relaxed).oldValue
            e[id] = Entry(kind: kind, object: object, parents: parents)
            return OpaquePointer(bitPattern: UInt(id))!
        }
    }

    /// The object behind `handle`, which must be of `kind`.
    func lookup<T: AnyObject>(_ handle: OpaquePointer?, _ kind: HandleKind, as type: T.Type) throws(CError) -> (T, UInt64) {
        guard let handle else { throw CError(EINVAL, "\(kind) handle is NULL") }
        let id = UInt64(UInt(bitPattern: handle))
        guard id >> 48 == kind.rawValue else {
            if let other = HandleKind(rawValue: id >> 48) { throw CError(EINVAL, "a \(other) handle where a \(kind) handle is expected") }
            throw CError(EBADF, "\(kind) handle \(id) is not a handle of this library")
        }
        guard let entry = entries.withLock({ $0[id] }), let object = entry.object as? T else {
            throw CError(EBADF, "\(kind) handle \(id) was closed or never existed")
        }
        return (object, id)
    }

    /// Removes handle `id`.
    func remove(_ id: UInt64) { entries.withLock { _ = $0.removeValue(forKey: id) } }

    /// The live handles with `parent` among their parents.
    func children(of parent: UInt64) -> [(UInt64, Entry)] {
        entries.withLock { $0.filter { $0.value.parents.contains(parent) }.map { ($0.key, $0.value) } }
    }
}

/// A failure of a C call: its errno and message.
struct CError: Error {
    let code: Int32
    let message: String
    init(_ code: Int32, _ message: String) {
        self.code = code
        self.message = message
    }
    init(_ error: HMMError) {
        code = error.errno
        message = "\(error)"
    }
}

/// Runs a C entry point's body: 0 on success; on failure the negative errno, with the message stored
/// for `hmm_last_error()`. Nothing thrown escapes into C.
func cCall(_ body: () throws(CError) -> Void) -> Int32 {
    do {
        try body()
        return 0
    } catch {
        chmm_set_error(error.message)
        return -error.code
    }
}

/// Converts the engine's typed error.
func engine<R>(_ body: () throws(HMMError) -> R) throws(CError) -> R {
    do { return try body() } catch { throw CError(error) }
}

/// Writes `value` to a C output parameter, which must not be NULL.
func output<T>(_ pointer: UnsafeMutablePointer<T>?, _ what: String) throws(CError) -> UnsafeMutablePointer<T> {
    guard let pointer else { throw CError(EINVAL, "\(what) output pointer is NULL") }
    return pointer
}

/// A byte count from C that must be a positive multiple of the page size.
func pageCount(_ length: UInt64, _ what: String) throws(CError) -> Int {
    guard length > 0, length % UInt64(PageSize.base) == 0, length <= 1 << 46 else {
        throw CError(EINVAL, "\(what) \(length) is not a positive multiple of 4096 below 64 TiB")
    }
    return Int(length)
}

@_cdecl("hmm_api_version")
public func hmmAPIVersion() -> Int32 { Int32(HMM_API_VERSION) }
