import HMMSelftests
import Testing

/// The kernel's hmm-tests, one Swift test per kernel case and fixture variant (`hmm.anon_read` ×
/// `hmm_device_private`, `hmm_device_coherent`, …). Cases waiting for the device-THP work are reported
/// as skipped with that reason; every other case ends with the machine's invariant checker.
@Suite("hmm-tests")
struct SelftestTests {
    static let cases = Selftests.all.map(\.name)

    @Test("kernel selftest", arguments: cases, SelftestVariant.allCases)
    func selftest(_ name: String, _ variant: SelftestVariant) throws {
        let test = try #require(Selftests.all.first { $0.name == name })
        switch Selftests.run(test, variant) {
        case .passed:
            break
        case .skipped(let reason):
            try Test.cancel("\(name) [\(variant.name(test.fixture))]: \(reason)")
        case .failed(let message):
            Issue.record("\(name) [\(variant.name(test.fixture))]: \(message)")
        }
    }
}
