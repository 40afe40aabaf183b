import HMM

/// What a watchdog prints when a race does not end: the engine's own view of itself, read without
/// taking any lock a stuck thread may hold (the queues' mutexes are leaves, never held across a wait).
extension NativeSpace {
    /// The reader's sequence and installs in flight, and the fault and event queues' counts.
    public func diagnostics() -> String {
        let f = faults.counts
        let e = events.counts
        return "reader sequence \(readSequence.load(ordering: .acquiring)) (odd: reading), installs in flight "
            + "\(installing.load(ordering: .acquiring)), faults pushed \(f.pushed) finished \(f.finished) queued \(f.queued), "
            + "events pushed \(e.pushed) finished \(e.finished) queued \(e.queued), closed \(hasExited)"
    }
}

extension NativeRegion {
    /// One line per page whose state word is not plain host memory: its index, address and word.
    public func diagnostics() -> [String] {
        var lines = ["\(self): \(pages) pages"]
        for i in 0..<pages where state(i) != .host {
            lines.append("  page \(i) 0x\(String(pageAddress(i), radix: 16)): \(state(i))")
        }
        return lines
    }
}
