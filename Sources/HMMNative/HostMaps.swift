import HMM
@_spi(Engine) import HMM
#if canImport(Glibc)
import Glibc
#endif

/// The process's own mappings as the host lists them (`/proc/self/maps`): how the engine describes
/// memory it does not manage — a shared or file mapping a driver is pointed at — to a driver that asks.
/// A cold path: one read of the file per question.
enum HostMaps {
    /// The host mapping containing `address`, nil where nothing is mapped.
    static func mapping(containing address: UInt64) -> MappingInfo? {
        let fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var text: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            text.append(contentsOf: chunk[0..<n])
        }
        for line in text.split(separator: UInt8(ascii: "\n")) {
            // start-end perms offset dev inode [path]
            let fields = line.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: true)
            guard fields.count >= 5 else { continue }
            let bounds = fields[0].split(separator: UInt8(ascii: "-"))
            guard bounds.count == 2, let lo = UInt64(String(decoding: bounds[0], as: UTF8.self), radix: 16),
                let hi = UInt64(String(decoding: bounds[1], as: UTF8.self), radix: 16), address >= lo, address < hi
            else { continue }
            let perms = Array(fields[1])
            guard perms.count >= 4 else { return nil }
            var protection: Protection = []
            if perms[0] == UInt8(ascii: "r") { protection.insert(.read) }
            if perms[1] == UInt8(ascii: "w") { protection.insert(.write) }
            if perms[2] == UInt8(ascii: "x") { protection.insert(.execute) }
            let inode = String(decoding: fields[4], as: UTF8.self)
            let path = fields.count > 5 ? String(decoding: fields[5], as: UTF8.self) : ""
            return MappingInfo(start: lo, end: hi, protection: protection, shared: perms[3] == UInt8(ascii: "s"),
                               anonymous: inode == "0" || path.hasPrefix("/dev/zero") || path.hasPrefix("[anon"),
                               hugetlb: false, hugePageAdvice: false)
        }
        return nil
    }
}
