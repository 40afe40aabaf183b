import Foundation
import HMM
import HMMDevices
import HMMNative
#if canImport(Glibc)
import Glibc
#endif

/// `hmm bench c-abi`: what the C interface costs. A `libhmm` call (in `abi-bench`, a C program built by
/// `c/build`) against the same call through the Swift API in this process, alternately in the same run;
/// and a process start under the `hmm dmirror` interposer against a bare start of the same program.
func cABIBenchmarks(_ report: BenchReport, reps: Int, quick: Bool) throws {
    guard let dir = cBuildDirectory(containing: ["lib/libhmm-dmirror.so", "bin/abi-bench"]) else {
        report.note("c-abi: .build-c not found; build libhmm with c/build first")
        return
    }
    report.section("swift-hmm C interface (\(reps) timed rounds after a warm-up round)")
    let machine = try Machine(.init(systemMemory: 256 << 20))
    let space = try NativeSpace(machine: machine)
    defer { try? space.close() }
    let device = try MirrorDevice(machine: machine, minor: 0, kind: .devicePrivate, chunkSize: 64 << 20)
    let file = try device.open(space)
    defer { file.close() }
    let region = try space.allocate(length: 64 * 4096, hugePages: false, populate: true)
    region.pointer.initializeMemory(as: UInt8.self, repeating: 7, count: 64 * 4096)
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 4096, alignment: 4096)
    defer { buffer.deallocate() }

    let reads = quick ? 2_000 : 20_000
    try report.pair(name: "libhmm hmm_mirror_read, 1 page", unit: "ns/call", baseline: "MirrorFile.read from Swift", reps: reps,
                    baselineBody: {
        try timePerOperation(reads) { _ = try file.read(region.address, pages: 1, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<4096])) }
    }, measuredBody: { try runCBench(dir + "/bin/abi-bench", "read1", reads) })

    let trips = quick ? 50 : 500
    try report.pair(name: "libhmm migrate 64 pages there and back", unit: "ns/trip", baseline: "MirrorFile from Swift", reps: reps,
                    baselineBody: {
        try timePerOperation(trips) {
            _ = try file.migrateToDevice(region.address, pages: 64, into: nil)
            _ = try file.migrateToSystem(region.address, pages: 64)
        }
    }, measuredBody: { try runCBench(dir + "/bin/abi-bench", "migrate64", trips) })

    let starts = quick ? 3 : 10
    let preload = dir + "/lib/libhmm-dmirror.so"
    let row = try BenchReport.rounds(reps: reps) {
        [try spawnMilliseconds("/bin/true", preload: nil, times: starts), try spawnMilliseconds("/bin/true", preload: preload, times: starts)]
    }
    let extra = (BenchReport.quantile(zip(row.map { $0[1] }, row.map { $0[0] }).map { $0 - $1 }, 0.5) ?? .nan)
    report.add(name: "process start under hmm dmirror (/bin/true)", unit: "ms", baseline: "a bare start",
               note: "median difference \(String(format: "%.2f", extra)) ms (goal ≤ 3 ms)",
               measured: row.map { $0[1] }, baselineSamples: row.map { $0[0] })
}

/// Nanoseconds per call of `body`, over `n` calls.
private func timePerOperation(_ n: Int, _ body: () throws -> Void) throws -> Double {
    let t0 = ContinuousClock.now
    for _ in 0..<n { try body() }
    let d = ContinuousClock.now - t0
    return (Double(d.components.seconds) * 1e9 + Double(d.components.attoseconds) / 1e9) / Double(n)
}

/// Runs `abi-bench OP N` and reads its ns/op.
private func runCBench(_ path: String, _ op: String, _ n: Int) throws -> Double {
    let out = try spawn([path, op, String(n)], environment: ["SWIFT_BACKTRACE=enable=no"], capture: true)
    guard let v = Double(out.trimmingCharacters(in: .whitespacesAndNewlines)) else {
        throw HMMError(.fault, "abi-bench printed \(out)")
    }
    return v
}

/// The median wall time of `times` starts of `program` (to its exit), with `preload` as `LD_PRELOAD`.
private func spawnMilliseconds(_ program: String, preload: String?, times: Int) throws -> Double {
    var samples: [Double] = []
    for _ in 0..<times {
        let t0 = ContinuousClock.now
        _ = try spawn([program], environment: preload.map { ["LD_PRELOAD=" + $0, "SWIFT_BACKTRACE=enable=no"] } ?? [],
                      capture: false)
        let d = ContinuousClock.now - t0
        samples.append(Double(d.components.seconds) * 1e3 + Double(d.components.attoseconds) / 1e15)
    }
    return BenchReport.quantile(samples, 0.5) ?? .nan
}

/// Runs `argv` to its exit with `environment` added to this process's, and returns its stdout when
/// `capture`. Throws if it cannot start or does not exit with 0.
private func spawn(_ argv: [String], environment: [String], capture: Bool) throws -> String {
    var fds: [Int32] = [-1, -1]
    if capture { guard pipe(&fds) == 0 else { throw HMMError(.outOfMemory, "pipe") } }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    if capture {
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_addclose(&actions, fds[0])
    }
    var env = environment
    var i = 0
    while let e = environ[i] {
        env.append(String(cString: e))
        i += 1
    }
    let cArgs = argv.map { strdup($0) } + [nil]
    let cEnv = env.map { strdup($0) } + [nil]
    defer { (cArgs + cEnv).forEach { free($0) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, argv[0], &actions, nil, cArgs, cEnv)
    if capture { close(fds[1]) }
    guard rc == 0 else {
        if capture { close(fds[0]) }
        throw HMMError(.noEntry, "cannot start \(argv[0]): \(String(cString: strerror(rc)))")
    }
    var out: [UInt8] = []
    if capture {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if n <= 0 { break }
            out.append(contentsOf: chunk[0..<n])
        }
        close(fds[0])
    }
    var status: Int32 = 0
    waitpid(pid, &status, 0)
    guard status == 0 else { throw HMMError(.fault, "\(argv[0]) exited with status \(status)") }
    return String(decoding: out, as: UTF8.self)
}
