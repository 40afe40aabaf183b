/// Writes events as a Chrome trace-event JSON file, which Perfetto (ui.perfetto.dev) and chrome://tracing
/// open: one process per machine (hub), a track per CPU thread with its faults as instants and its
/// exclusive grants and restores; per device, tracks of migration slices (each with its collect, copy and
/// finalize phases nested inside) and a counter of the bytes resident there; invalidations and host
/// (userfaultfd) events as slices on tracks of their own. Slices that overlap in time go to separate
/// tracks ("lanes"), so every track nests perfectly, as Perfetto requires of JSON traces.
///
/// Feed it records in the order a subscription delivers them (``add(_:)``); each call hands finished
/// JSON text to `sink`, so a long trace streams to its file. ``finish()`` closes the document.
public struct ChromeTraceWriter {
    private let sink: (String) -> Void
    private var first = true
    private var named: Set<String> = []
    private var lanes: [String: [UInt64]] = [:]
    private var laneTids: [String: Int] = [:]
    private var nextTid = 1_000_000
    /// Per (source, device): pages in use per pagemap slot, summed into the resident-bytes counter.
    private var resident: [String: [Int: Int]] = [:]
    private var deviceNames: [String: String] = [:]
    /// Events written, by kind.
    public private(set) var counts: [HMMEventKind: Int] = [:]

    /// A writer handing its text to `sink` (the opening bracket at once).
    public init(sink: @escaping (String) -> Void) {
        self.sink = sink
        sink("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n")
    }

    /// Adds one record's trace events.
    public mutating func add(_ record: HMMEventRecord) {
        let pid = record.source
        counts[record.event.kind, default: 0] += 1
        processName(pid)
        switch record.event {
        case .cpuFault(let e):
            thread(pid, Int(e.thread), "thread \(e.thread)")
            emit(pid, Int(e.thread), ph: "i", name: "fault \(e.hit)", cat: "cpu_fault", ts: e.start, extra: ",\"s\":\"t\"",
                 args: "\"address\":\"\(hex(e.address))\",\"access\":\"\(e.access)\",\"size\":\"\(e.size)\",\"duration_ns\":\(e.duration),\"blocked_ns\":\(e.blocked),\"succeeded\":\(e.succeeded)")
        case .migration(let e):
            let device = e.to.isSystem ? e.from : e.to
            let group = "\(pid)/\(device)"
            let tid = lane(group, pid, name: "\(deviceName(group, device)) migrations", begin: e.begin, end: e.end)
            emit(pid, tid, ph: "X", name: "migrate \(e.cause) \(e.from)→\(e.to)", cat: "migration", ts: e.begin,
                 extra: ",\"dur\":\(micro(e.end &- e.begin))",
                 args: "\"cause\":\"\(e.cause)\",\"from\":\"\(e.from)\",\"to\":\"\(e.to)\",\"address\":\"\(hex(e.address))\",\"space\":\(e.space),\"pages\":\(e.pages),\"bytes\":\(e.bytes),\"failed_pages\":\(e.failedPages),\"size\":\"\(e.size)\",\"thread\":\(e.thread)")
            var t = e.begin
            for (phase, ns) in [("collect", e.collect), ("copy", e.copy), ("finalize", e.finalize)] where ns > 0 {
                emit(pid, tid, ph: "X", name: phase, cat: "migration_phase", ts: t, extra: ",\"dur\":\(micro(ns))", args: "")
                t &+= ns
            }
            if e.pagemapSlot != 0 && !device.isSystem {
                resident[group, default: [:]][e.pagemapSlot] = e.pagemapPagesInUse
                let bytes = resident[group]!.values.reduce(0, +) << PageSize.shift
                emit(pid, 0, ph: "C", name: "\(deviceName(group, device)) resident bytes", cat: "residency", ts: e.end,
                     extra: "", args: "\"bytes\":\(bytes)")
            }
        case .eviction(let e):
            let group = "\(pid)/\(e.device)"
            let tid = lane(group, pid, name: "\(deviceName(group, e.device)) migrations", begin: e.timestamp, end: e.timestamp)
            emit(pid, tid, ph: "i", name: "evict", cat: "eviction", ts: e.timestamp, extra: ",\"s\":\"t\"",
                 args: "\"address\":\"\(hex(e.address))\",\"pages\":\(e.pages),\"needed_by\":\"\(e.neededBy.map(hex) ?? "none")\"")
        case .invalidation(let e):
            let tid = lane("\(pid)/notifiers", pid, name: "notifier invalidations", begin: e.startTime,
                           end: e.startTime &+ e.duration)
            emit(pid, tid, ph: "X", name: "invalidate \(e.event)", cat: "invalidation", ts: e.startTime,
                 extra: ",\"dur\":\(micro(e.duration))",
                 args: "\"start\":\"\(hex(e.start))\",\"end\":\"\(hex(e.end))\",\"space\":\(e.space),\"notifiers\":\(e.notifiers),\"thread\":\(e.thread)")
        case .exclusive(let e):
            thread(pid, Int(e.thread), "thread \(e.thread)")
            emit(pid, Int(e.thread), ph: "i", name: "exclusive \(e.action)", cat: "exclusive", ts: e.timestamp,
                 extra: ",\"s\":\"t\"", args: "\"address\":\"\(hex(e.address))\",\"pages\":\(e.pages)")
        case .revoke(let e):
            emit(pid, 0, ph: "i", name: "revoke \(e.reason)", cat: "revoke", ts: e.timestamp, extra: ",\"s\":\"p\"",
                 args: "\"address\":\"\(hex(e.address))\",\"pages\":\(e.pages),\"mappings\":\(e.mappings),\"space\":\(e.space)")
        case .host(let e):
            let tid = lane("\(pid)/uffd", pid, name: "userfaultfd events", begin: e.timestamp, end: e.timestamp &+ e.duration)
            emit(pid, tid, ph: "X", name: "uffd \(e.kind)", cat: "host", ts: e.timestamp, extra: ",\"dur\":\(micro(e.duration))",
                 args: "\"start\":\"\(hex(e.start))\",\"end\":\"\(hex(e.end))\",\"target\":\"\(hex(e.target))\"")
        case .policy(let e):
            let group = "\(pid)/\(e.processor)"
            let tid = lane(group, pid, name: "\(deviceName(group, e.processor)) migrations", begin: e.timestamp, end: e.timestamp)
            emit(pid, tid, ph: "i", name: "\(e.kind)", cat: "policy", ts: e.timestamp, extra: ",\"s\":\"t\"",
                 args: "\"address\":\"\(hex(e.address))\",\"bytes\":\(e.bytes),\"hint\":\"\(e.hint)\"")
        }
    }

    /// Closes the JSON document.
    public mutating func finish() {
        sink("\n]}\n")
    }

    // MARK: tracks

    private func micro(_ ns: UInt64) -> String {
        let whole = ns / 1000
        let frac = ns % 1000
        return frac == 0 ? "\(whole)" : "\(whole)." + String(String(frac + 1000).dropFirst())
    }

    private mutating func emit(_ pid: Int, _ tid: Int, ph: String, name: String, cat: String, ts: UInt64, extra: String,
                               args: String) {
        let line = "{\"ph\":\"\(ph)\",\"name\":\"\(escape(name))\",\"cat\":\"\(cat)\",\"pid\":\(pid),\"tid\":\(tid),\"ts\":\(micro(ts))\(extra),\"args\":{\(args)}}"
        sink(first ? line : ",\n" + line)
        first = false
    }

    private mutating func metadata(_ pid: Int, _ tid: Int, _ what: String, _ name: String) {
        let line = "{\"ph\":\"M\",\"name\":\"\(what)\",\"pid\":\(pid),\"tid\":\(tid),\"args\":{\"name\":\"\(escape(name))\"}}"
        sink(first ? line : ",\n" + line)
        first = false
    }

    private mutating func processName(_ pid: Int) {
        guard named.insert("p\(pid)").inserted else { return }
        metadata(pid, 0, "process_name", "swift-hmm machine \(pid)")
    }

    private mutating func thread(_ pid: Int, _ tid: Int, _ name: String) {
        guard named.insert("t\(pid)/\(tid)").inserted else { return }
        metadata(pid, tid, "thread_name", name)
    }

    private mutating func deviceName(_ group: String, _ device: MemoryLocation) -> String {
        if let n = deviceNames[group] { return n }
        let n = device.isSystem ? "system" : "device \(deviceNames.count + 1) (\(device.kind!))"
        deviceNames[group] = n
        return n
    }

    /// The track of `group` whose last slice ended by `begin` (a new one if none), extended to `end`.
    private mutating func lane(_ group: String, _ pid: Int, name: String, begin: UInt64, end: UInt64) -> Int {
        var ends = lanes[group, default: []]
        let k = ends.firstIndex { $0 <= begin } ?? ends.count
        if k == ends.count { ends.append(end) } else { ends[k] = max(ends[k], end) }
        lanes[group] = ends
        let key = "\(group)#\(k)"
        if let tid = laneTids[key] { return tid }
        let tid = nextTid
        nextTid += 1
        laneTids[key] = tid
        thread(pid, tid, k == 0 ? name : "\(name) (\(k + 1))")
        return tid
    }

    private func escape(_ s: String) -> String {
        var out = ""
        for c in s.unicodeScalars {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            default:
                if c.value < 0x20 { out += "\\u" + String(String(c.value + 0x10000, radix: 16).dropFirst()) } else { out.unicodeScalars.append(c) }
            }
        }
        return out
    }
}
