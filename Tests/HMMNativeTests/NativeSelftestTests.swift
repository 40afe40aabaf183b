import HMMNative
import HMMSelftests
import Testing

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
        switch Selftests.run(test, variant, engine: .native) {
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
}
