import HMMSelftests
import Testing

/// The kernel's hmm-tests, one Swift test case per kernel case and fixture variant (`hmm.anon_read` ×
/// `hmm_device_private`, `hmm_device_coherent`, …). Every case ends with the machine's invariant checker.
@Suite("hmm-tests")
struct SelftestTests {
    static let runnable = Selftests.all.filter { $0.pending == nil }.map(\.name)

    @Test("kernel selftest", arguments: runnable, SelftestVariant.allCases)
    func selftest(_ name: String, _ variant: SelftestVariant) throws {
        let test = try #require(Selftests.all.first { $0.name == name })
        switch Selftests.run(test, variant) {
        case .passed:
            break
        case .skipped(let reason):
            // A kernel SKIP (e.g. no hugetlb page): visible, not a failure.
            withKnownIssue("\(name) [\(variant.name(test.fixture))] skipped as the kernel skips it (issue 3): \(reason)") {
                Issue.record("skipped: \(reason)")
            }
        case .expectedFailure(let reason):
            // Fails as upstream fails (kselftest XFAIL): visible, named, not a failure.
            withKnownIssue("\(name) [\(variant.name(test.fixture))] fails as upstream does: \(reason)") {
                Issue.record("expected failure: \(reason)")
            }
        case .failed(let message):
            Issue.record("\(name) [\(variant.name(test.fixture))]: \(message)")
        }
    }
}

/// The TAP the port prints (issue 10 item 10): what a TAP 13 consumer reads from each line.
@Suite("hmm selftests TAP")
struct SelftestTAPTests {
    /// A TAP consumer's view of a test line: ok or not, the description, and the directive (the text
    /// after the first unescaped " # ", whose first word is SKIP, TODO or — for kselftest — XFAIL).
    func parse(_ line: Substring) -> (ok: Bool, description: String, directive: String?) {
        let ok = line.hasPrefix("ok ")
        let rest = line.drop(while: { $0 != " " }).dropFirst().drop(while: { $0 != " " }).dropFirst()
        var i = rest.startIndex
        while i < rest.endIndex {
            if rest[i...].hasPrefix(" # ") {
                return (ok, String(rest[..<i]), String(rest[rest.index(i, offsetBy: 3)...]))
            }
            i = rest.index(after: i)
        }
        return (ok, String(rest), nil)
    }

    @Test("a skipped case is `ok N fixture.variant.case # SKIP reason`, an expected failure `# XFAIL reason`")
    func directives() throws {
        let bench = try #require(Selftests.all.first { $0.name == "hmm.benchmark_thp_migration" })
        let skip = Selftests.tapLines(number: 3, bench, .devicePrivate, .skipped("no # hugetlb\npage"))
        #expect(skip == "ok 3 hmm.hmm_device_private.benchmark_thp_migration # SKIP no   hugetlb page\n")
        let s = parse(skip.dropLast())
        #expect(s.ok && s.description == "hmm.hmm_device_private.benchmark_thp_migration")
        #expect(s.directive?.hasPrefix("SKIP ") == true)
        let pass = parse(Selftests.tapLines(number: 1, bench, .deviceCoherent, .passed).dropLast())
        #expect(pass.ok && pass.directive == nil && pass.description == "hmm.hmm_device_coherent.benchmark_thp_migration")
        let xfail = parse(Selftests.tapLines(number: 2, bench, .devicePrivate, .expectedFailure("why")).dropLast())
        #expect(xfail.ok && xfail.directive == "XFAIL why")
        let lines = Selftests.tapLines(number: 4, bench, .devicePrivate, .failed("line 1: x\ny")).split(separator: "\n")
        #expect(lines == ["# line 1: x y", "not ok 4 hmm.hmm_device_private.benchmark_thp_migration"])
    }
}
