import ArgumentParser
import HMM
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `hmm trace -o FILE.json -- COMMAND …`: runs another `hmm` command (demo, bench, selftests) in this
/// process with every machine's events subscribed, and writes them as a Chrome trace-event file that
/// Perfetto (ui.perfetto.dev) and chrome://tracing open.
struct Trace: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run an hmm command and write its events as a timeline (Chrome trace JSON for Perfetto or chrome://tracing).",
        discussion: "Example: hmm trace -o demo.json -- demo --native")

    @Option(name: .shortAndLong, help: "The trace file to write.")
    var output: String

    @Option(help: "Slots in the event ring (a power of two); events beyond what the drain keeps up with are dropped and counted.")
    var ringSize = 1 << 18

    @Argument(parsing: .captureForPassthrough, help: "The hmm command to trace, after --: demo …, bench …, selftests ….")
    var command: [String] = []

    func run() throws {
        var args = command
        if args.first == "--" { args.removeFirst() }
        guard let name = args.first, ["demo", "bench", "selftests", "workload"].contains(name) else {
            throw ValidationError("hmm trace runs demo, bench, selftests or workload: hmm trace -o FILE -- demo")
        }
        var traced = try HMMCommand.parseAsRoot(args)
        let file = try TextFile(path: output)
        let subscription = try EventHub.subscribeToAll(capacity: ringSize)
        let drainer = TraceDrain(subscription: subscription, file: file)
        drainer.start()
        var failure: Error?
        do { try traced.run() } catch { failure = error }
        subscription.cancel()
        let writer = drainer.stop()
        try file.close()
        var summary = HMMEventKind.allCases.compactMap { k in writer.counts[k].map { "\(k) \($0)" } }.joined(separator: ", ")
        if summary.isEmpty { summary = "no events" }
        let dropped = subscription.droppedTotal
        print("hmm trace: wrote \(output): \(summary)\(dropped > 0 ? "; \(dropped) dropped (ring full)" : "")")
        if let failure { throw failure }
    }
}

/// The thread that empties the trace's ring into the file while the traced command runs.
private final class TraceDrain: @unchecked Sendable {
    private let subscription: EventSubscription
    private let stopping = Atomic<Bool>(false)
    private var writer: ChromeTraceWriter
    private var thread: HostThread?

    init(subscription: EventSubscription, file: TextFile) {
        self.subscription = subscription
        writer = ChromeTraceWriter { file.write($0) }
    }

    func start() {
        thread = HostThread { [self] in
            while !stopping.load(ordering: .acquiring) {
                if drainOnce() == 0 { usleep(2000) }
            }
        }
    }

    private func drainOnce() -> Int {
        subscription.drain { writer.add($0) }
    }

    /// Stops the thread, drains what is left and closes the document.
    func stop() -> ChromeTraceWriter {
        stopping.store(true, ordering: .releasing)
        thread?.join()
        _ = drainOnce()
        writer.finish()
        return writer
    }
}
