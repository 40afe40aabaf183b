#if canImport(Glibc)
import Glibc
#endif

/// A text file written front to back (a trace, a picture): opened at once so a bad path fails before
/// any work, buffered by stdio.
final class TextFile {
    let path: String
    private let handle: UnsafeMutablePointer<FILE>

    /// Creates (or truncates) `path`.
    /// - Throws: an ``OutputError`` naming the path and the reason.
    init(path: String) throws {
        guard let f = fopen(path, "w") else {
            throw OutputError(path: path, reason: String(cString: strerror(errno)))
        }
        self.path = path
        handle = f
    }

    func write(_ text: String) {
        _ = text.withCString { fputs($0, handle) }
    }

    /// Flushes and closes.
    /// - Throws: an ``OutputError`` if the data could not be written (disk full…).
    func close() throws {
        let failed = ferror(handle) != 0
        let rc = fclose(handle)
        if failed || rc != 0 { throw OutputError(path: path, reason: String(cString: strerror(errno))) }
    }

    /// Throws unless a file at `path` can be created (its folder exists and is writable): a run that
    /// measures for a minute should not find out at the end that its output has nowhere to go.
    static func checkWritable(_ path: String) throws {
        let folder = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let target = access(path, F_OK) == 0 ? path : folder.isEmpty ? "/" : folder
        if access(target, W_OK) != 0 { throw OutputError(path: path, reason: String(cString: strerror(errno))) }
    }

    /// Writes `text` to `path` in one go.
    static func write(_ text: String, to path: String) throws {
        let f = try TextFile(path: path)
        f.write(text)
        try f.close()
    }
}

/// An output file could not be written (printed as the error, without the usage text).
struct OutputError: Error, CustomStringConvertible {
    let path: String
    let reason: String
    var description: String { "cannot write \(path): \(reason)" }
}
