#if canImport(Glibc)
import Glibc
#endif

/// The checkout's `.build-c` (what `c/build` makes) holding every file of `files`: the one under the
/// working directory, else the one beside the build this executable runs from
/// (`.build/<config>/hmm`, or `.build/<triple>/<config>/hmm`). Nil if `c/build` has not run.
func cBuildDirectory(containing files: [String]) -> String? {
    var candidates = [".build-c"]
    if let exe = realpath("/proc/self/exe", nil) {
        defer { free(exe) }
        var dir = String(cString: exe)
        for _ in 0..<4 {
            guard let slash = dir.lastIndex(of: "/") else { break }
            dir = String(dir[..<slash])
            candidates.append(dir + "/.build-c")
        }
    }
    for c in candidates where files.allSatisfy({ access(c + "/" + $0, R_OK) == 0 }) {
        if let p = realpath(c, nil) {
            defer { free(p) }
            return String(cString: p)
        }
    }
    return nil
}
