import ArgumentParser
import HMMNative
import HMMSelftests

/// `hmm selftests`: runs the port of the kernel's hmm-tests and prints TAP like the kernel harness.
struct SelftestsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "selftests",
        abstract: "Run the port of tools/testing/selftests/mm/hmm-tests.c and print TAP.")

    @Option(name: .long, help: "Run only cases whose name contains this text.")
    var filter: String?

    @Flag(name: .long, help: "Run the cases on this process's real memory (the native engine, userfaultfd).")
    var native = false

    func run() throws {
        let engine: SelftestEngine = native ? .native : .simulated
        if native, let reason = NativeSpace.unsupportedReason() {
            print("TAP version 13")
            print("1..0 # SKIP native engine unavailable: \(reason)")
            return
        }
        let runs = Selftests.all.filter { filter == nil || $0.name.contains(filter!) }
            .flatMap { t in SelftestVariant.allCases.map { (t, $0) } }
        print("TAP version 13")
        print("1..\(runs.count)")
        var passed = 0, skipped = 0, failed = 0, expectedFailures = 0
        for (n, (test, variant)) in runs.enumerated() {
            let outcome = Selftests.run(test, variant, engine: engine)
            switch outcome {
            case .passed: passed += 1
            case .skipped: skipped += 1
            case .expectedFailure: expectedFailures += 1
            case .failed: failed += 1
            }
            print(Selftests.tapLines(number: n + 1, test, variant, outcome), terminator: "")
        }
        print("# Totals: pass:\(passed) fail:\(failed) xfail:\(expectedFailures) xpass:0 skip:\(skipped) error:0")
        if failed > 0 { throw ExitCode.failure }
    }
}
