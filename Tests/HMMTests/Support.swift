import Testing
@testable import HMM

/// Asserts that `body` throws an ``HMMError`` with `code`.
func expectError<R>(
    _ code: HMMError.Code, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> R
) {
    do {
        _ = try body()
        Issue.record("expected \(code), nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as HMMError {
        #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("expected HMMError.\(code), got \(error)", sourceLocation: sourceLocation)
    }
}

/// A machine with every test's closing check: the invariant checker.
func withMachine(
    _ config: Machine.Configuration = .init(systemMemory: 64 << 20, hugetlbPages: 2),
    sourceLocation: SourceLocation = #_sourceLocation, _ body: (Machine) throws -> Void
) throws {
    let m = try Machine(config)
    try body(m)
    do { try m.checkInvariants() } catch { Issue.record("\(error)", sourceLocation: sourceLocation) }
}

let page = UInt64(PageSize.base)
let pmdSize = UInt64(PageSize.pmd)

#if canImport(Glibc)
import Glibc
#endif

/// Tests name the library's host thread after what they use it for.
typealias TestThread = HostThread

/// Runs `body(t)` on `n` threads at once and waits for all.
func runThreads(_ n: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let threads = (0..<n).map { t in TestThread { body(t) } }
    for t in threads { t.join() }
}
