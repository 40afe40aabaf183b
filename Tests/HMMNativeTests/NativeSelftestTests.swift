import HMMNative
import HMMSelftests
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The kernel's hmm-tests on this process's real memory (`hmm selftests --native`): the same bodies and
/// asserted values as the simulated port, with the test process's mappings as native regions and its
/// system calls real. A case the native engine cannot run is a visible skip, and one that fails for a
/// named limit of userspace HMM a visible expected failure; anything else failing fails here.
@Suite("hmm-tests on native memory", .enabled(if: nativeUnavailable == nil, "native engine unavailable here (issue 15): \(nativeUnavailable ?? "")"), .timeLimit(.minutes(10)))
struct NativeSelftestTests {
    static let runnable = Selftests.all.filter { $0.pending == nil }.map(\.name)

    @Test("kernel selftest, native", arguments: runnable, SelftestVariant.allCases)
    func selftest(_ name: String, _ variant: SelftestVariant) throws {
        let test = try #require(Selftests.all.first { $0.name == name })
        // A case that forks runs in the helper executable: this test process has many threads, and a
        // child forked from it may run only async-signal-safe code.
        let outcome = test.forks ? try helperOutcome(test, variant) : Selftests.run(test, variant, engine: .native)
        switch outcome {
        case .passed:
            break
        case .skipped(let reason):
            withKnownIssue("\(name) [\(variant.name(test.fixture))] skipped natively (issue 11): \(reason)") {
                Issue.record("skipped: \(reason)")
            }
        case .expectedFailure(let reason):
            withKnownIssue("\(name) [\(variant.name(test.fixture))] fails natively for a named reason (issue 11): \(reason)") {
                Issue.record("expected failure: \(reason)")
            }
        case .failed(let message):
            Issue.record("\(name) [\(variant.name(test.fixture))] on native memory: \(message)")
        }
    }

    /// Runs `test` in `hmm selftests --native` (built beside this test bundle, single-threaded) and reads
    /// its TAP line for `variant` back as an outcome.
    private func helperOutcome(_ test: Selftest, _ variant: SelftestVariant) throws -> SelftestOutcome {
        let name = Selftests.harnessName(test, variant)
        let tap = try runHelper(["selftests", "--native", "--filter", test.name])
        let lines = tap.split(separator: "\n").map(String.init)
        let index = try #require(lines.firstIndex { $0.hasSuffix(" " + name) || $0.contains(" \(name) # ") },
                                 "no TAP line for \(name) in:\n\(tap)")
        let line = lines[index]
        if line.hasPrefix("not ok") {
            return .failed(index > 0 && lines[index - 1].hasPrefix("# ") ? String(lines[index - 1].dropFirst(2)) : line)
        }
        if let r = line.firstRange(of: " # SKIP ") { return .skipped(String(line[r.upperBound...])) }
        if let r = line.firstRange(of: " # XFAIL ") { return .expectedFailure(String(line[r.upperBound...])) }
        return .passed
    }
}

/// Runs the `hmm` executable that `swift test` builds beside the test bundle with `arguments`, and
/// returns what it printed (at most 10 minutes; it is killed after that, and the test fails).
func runHelper(_ arguments: [String]) throws -> String {
    var exe = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &exe, exe.count - 1)
    try #require(n > 0, "cannot read /proc/self/exe")
    let me = String(decoding: exe[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    var dir = me[..<(me.lastIndex(of: "/") ?? me.endIndex)]
    // The bundle may be a directory (`….xctest/…/binary`) on some layouts: look beside the bundle.
    if let bundle = dir.firstRange(of: ".xctest") { dir = dir[..<bundle.lowerBound] }
    if let slash = dir.lastIndex(of: "/"), dir.hasSuffix("PackageTests") { dir = dir[..<slash] }
    let helper = String(dir) + "/hmm"
    try #require(access(helper, X_OK) == 0, "the helper executable \(helper) is not built (swift build builds it)")
    var fds: [Int32] = [0, 0]
    try #require(pipe(&fds) == 0)
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
    posix_spawn_file_actions_addclose(&actions, fds[0])
    let argv: [UnsafeMutablePointer<CChar>?] = ([helper] + arguments).map { strdup($0) } + [nil]
    defer { for a in argv { free(a) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, helper, &actions, nil, argv, environ)
    close(fds[1])
    defer { close(fds[0]) }
    try #require(rc == 0, "posix_spawn \(helper): \(rc)")
    // Read until the helper closes its output, for at most 10 minutes: a hung helper is killed, so the
    // test fails instead of wedging the run.
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    let deadline = ContinuousClock.now + .seconds(600)
    while ContinuousClock.now < deadline {
        var p = pollfd(fd: fds[0], events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, 1000) != 0 else { continue }
        let got = chunk.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
        if got <= 0 { break }
        out += chunk[0..<got]
    }
    #expect(waitChild(pid, seconds: 30) != nil, "the helper hung and was killed")
    return String(decoding: out, as: UTF8.self)
}
