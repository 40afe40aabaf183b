import ArgumentParser

@main
struct HMMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hmm",
        abstract: "swift-hmm: Linux heterogeneous memory management, simulated in userspace.",
        subcommands: [Demo.self, Bench.self, SelftestsCommand.self, Trace.self, WorkloadCommand.self, Dmirror.self],
        defaultSubcommand: Demo.self
    )
}
