import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

/// `hmm dmirror -- PROGRAM [ARGS…]`: runs an unmodified program with `/dev/hmm_dmirror0..3` emulated on
/// the native engine, through the `libhmm-dmirror.so` interposer that `c/build` makes.
struct Dmirror: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a program with /dev/hmm_dmirror0..3 (the kernel's test_hmm devices) emulated on the native engine.",
        discussion: """
            Devices 0 and 1 are device-private, 2 and 3 device-coherent, as test_hmm loaded with spm_addr_dev0/1. \
            The program's private anonymous memory comes under the engine in each process that opens a device. \
            Build the interposer first with c/build. Example: hmm dmirror -- ./hmm-tests
            """)

    @Option(help: "The interposer (default: .build-c/lib/libhmm-dmirror.so here or next to this checkout's build).")
    var library: String?

    @Option(help: "Staging RAM of each process's engine, in MiB.")
    var memory = 512

    @Argument(parsing: .captureForPassthrough, help: "The program and its arguments, after --.")
    var command: [String] = []

    func run() throws {
        var args = command
        if args.first == "--" { args.removeFirst() }
        guard let program = args.first else { throw ValidationError("name a program: hmm dmirror -- PROGRAM [ARGS…]") }
        guard memory >= 16, memory <= 65536, memory % 2 == 0 else { throw ValidationError("--memory must be an even MiB count, 16…65536") }
        let preload = try interposer()
        let previous = getenv("LD_PRELOAD").map { String(cString: $0) } ?? ""
        setenv("LD_PRELOAD", previous.isEmpty ? preload : preload + ":" + previous, 1)
        setenv("HMM_DMIRROR_MEMORY_MB", String(memory), 1)
        // The Swift runtime inside libhmm would print its own crash reports into the program's stderr.
        setenv("SWIFT_BACKTRACE", "enable=no", 1)
        var argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) }
        argv.append(nil)
        execvp(program, &argv)
        throw ValidationError("cannot run \(program): \(String(cString: strerror(errno)))")
    }

    /// The interposer's path: `--library`, else `.build-c/lib` of the checkout (``cBuildDirectory(containing:)``).
    private func interposer() throws -> String {
        if let library {
            guard access(library, R_OK) == 0 else { throw ValidationError("\(library) is not readable") }
            return realpath(library, nil).map { p in defer { free(p) }; return String(cString: p) } ?? library
        }
        if let dir = cBuildDirectory(containing: ["lib/libhmm-dmirror.so"]) { return dir + "/lib/libhmm-dmirror.so" }
        throw ValidationError("libhmm-dmirror.so not found in .build-c here or beside this build: build it with c/build")
    }
}
