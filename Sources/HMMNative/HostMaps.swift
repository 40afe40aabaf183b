import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// The process's own mappings as the host lists them (`/proc/self/maps`): how the engine describes
/// memory it does not manage — a shared or file mapping a driver is pointed at — to a driver that asks,
/// and checks memory it is asked to adopt. A cold path: one read of the file per question.
enum HostMaps {
    /// One line of `/proc/self/maps`.
    struct Entry {
        let start: UInt64
        let end: UInt64
        let protection: Protection
        let shared: Bool
        /// The inode column (0 for anonymous memory).
        let inode: UInt64
        /// The inode field is 0 (anonymous, or a special mapping such as `[stack]`).
        var noInode: Bool { inode == 0 }
        /// The path column: empty, `[heap]`, `[stack]`, `[anon:name]`, a file.
        let path: String

        var anonymous: Bool { noInode || path.hasPrefix("/dev/zero") || path.hasPrefix("[anon") }

        /// Private anonymous memory the engine may register and move pages of: no file, not shared, and
        /// none of the kernel's special mappings (`[stack]`, `[vdso]`, `[vvar]`, `[vsyscall]`).
        var adoptable: Bool {
            !shared && noInode && (path.isEmpty || path == "[heap]" || path.hasPrefix("[anon:"))
        }
    }

    /// The mappings overlapping `[lo, hi)`, in address order.
    static func entries(overlapping lo: UInt64, _ hi: UInt64) -> [Entry] {
        let fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var text: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            text.append(contentsOf: chunk[0..<n])
        }
        var out: [Entry] = []
        for line in text.split(separator: UInt8(ascii: "\n")) {
            // start-end perms offset dev inode [path]
            let fields = line.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: true)
            guard fields.count >= 5 else { continue }
            let bounds = fields[0].split(separator: UInt8(ascii: "-"))
            guard bounds.count == 2, let start = UInt64(String(decoding: bounds[0], as: UTF8.self), radix: 16),
                let end = UInt64(String(decoding: bounds[1], as: UTF8.self), radix: 16), end > lo, start < hi
            else { continue }
            let perms = Array(fields[1])
            guard perms.count >= 4 else { continue }
            var protection: Protection = []
            if perms[0] == UInt8(ascii: "r") { protection.insert(.read) }
            if perms[1] == UInt8(ascii: "w") { protection.insert(.write) }
            if perms[2] == UInt8(ascii: "x") { protection.insert(.execute) }
            let path = fields.count > 5 ? String(decoding: fields[5], as: UTF8.self) : ""
            out.append(Entry(start: start, end: end, protection: protection, shared: perms[3] == UInt8(ascii: "s"),
                             inode: UInt64(String(decoding: fields[4], as: UTF8.self)) ?? 0, path: path))
        }
        return out
    }

    /// The host mapping containing `address`, nil where nothing is mapped.
    static func mapping(containing address: UInt64) -> MappingInfo? {
        guard let e = entries(overlapping: address, address + 1).first else { return nil }
        return MappingInfo(start: e.start, end: e.end, protection: e.protection, shared: e.shared,
                           anonymous: e.anonymous, hugetlb: false, hugePageAdvice: false)
    }
}
