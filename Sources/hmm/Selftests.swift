import ArgumentParser
import HMMSelftests

/// `hmm selftests`: runs the port of the kernel's hmm-tests and prints TAP like the kernel harness.
struct SelftestsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "selftests",
        abstract: "Run the port of tools/testing/selftests/mm/hmm-tests.c and print TAP.")

    @Option(name: .long, help: "Run only cases whose name contains this text.")
    var filter: String?

    func run() throws {
        let runs = Selftests.all.filter { filter == nil || $0.name.contains(filter!) }
            .flatMap { t in SelftestVariant.allCases.map { (t, $0) } }
        print("TAP version 13")
        print("1..\(runs.count)")
        var passed = 0, skipped = 0, failed = 0
        for (n, (test, variant)) in runs.enumerated() {
            let label = "\(test.name) # \(variant.name(test.fixture))"
            switch Selftests.run(test, variant) {
            case .passed:
                passed += 1
                print("ok \(n + 1) \(label)")
            case .skipped(let reason):
                skipped += 1
                print("ok \(n + 1) \(label) SKIP \(reason)")
            case .failed(let message):
                failed += 1
                print("# \(message)")
                print("not ok \(n + 1) \(label)")
            }
        }
        print("# Totals: pass:\(passed) fail:\(failed) xfail:0 xpass:0 skip:\(skipped) error:0")
        if failed > 0 { throw ExitCode.failure }
    }
}
