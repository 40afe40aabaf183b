/// Where one page is, as a residency picture shows it: the states of both engines in one vocabulary,
/// each with the character of the demos' text maps and a colour.
public enum PageResidency: Character, CaseIterable, Sendable {
    case none = "."
    case zeroPage = "z"
    case hugeZeroPage = "Z"
    case anonExclusive = "a"
    case anonShared = "s"
    case readOnly = "r"
    case absent = "-"
    case transparentHuge = "H"
    case hugetlb = "T"
    case file = "f"
    case devicePrivate = "P"
    case devicePrivateHuge = "D"
    case deviceCoherent = "C"
    case deviceExclusive = "X"
    case peerMemory = "p"
    case revoked = "!"

    /// What the state means, for a legend.
    public var label: String {
        switch self {
        case .none: return "not populated"
        case .zeroPage: return "zero page"
        case .hugeZeroPage: return "huge zero page"
        case .anonExclusive: return "RAM, private"
        case .anonShared: return "RAM, shared (COW)"
        case .readOnly: return "RAM, read-only"
        case .absent: return "unmapped / PROT_NONE"
        case .transparentHuge: return "RAM, THP"
        case .hugetlb: return "hugetlb"
        case .file: return "file / shmem"
        case .devicePrivate: return "device-private"
        case .devicePrivateHuge: return "device-private 2 MiB"
        case .deviceCoherent: return "device-coherent"
        case .deviceExclusive: return "device-exclusive"
        case .peerMemory: return "P2PDMA peer memory"
        case .revoked: return "revoked (poison)"
        }
    }

    /// Its colour: greys for nothing, greens for system RAM, blues and purples for device memory, red
    /// for lost pages.
    public var color: String {
        switch self {
        case .none: return "#f2f2f2"
        case .zeroPage: return "#d9ead3"
        case .hugeZeroPage: return "#b6d7a8"
        case .anonExclusive: return "#6aa84f"
        case .anonShared: return "#b5cf6b"
        case .readOnly: return "#93c47d"
        case .absent: return "#cccccc"
        case .transparentHuge: return "#38761d"
        case .hugetlb: return "#274e13"
        case .file: return "#e69138"
        case .devicePrivate: return "#3d85c6"
        case .devicePrivateHuge: return "#0b5394"
        case .deviceCoherent: return "#8e7cc3"
        case .deviceExclusive: return "#c27ba0"
        case .peerMemory: return "#f1c232"
        case .revoked: return "#cc0000"
        }
    }
}

/// A residency picture: one row of page cells per step (a demo's, a workload's phases), each cell
/// coloured by ``PageResidency``, with the step's label above its row and a legend of the states used.
public struct ResidencyMap: Sendable {
    public struct Row: Sendable {
        public let label: String
        public let pages: [PageResidency]
    }
    public private(set) var rows: [Row] = []

    public init() {}

    /// Adds a step's row.
    public mutating func add(_ label: String, _ pages: [PageResidency]) {
        rows.append(Row(label: label, pages: pages))
    }

    /// The picture as SVG, `title` on top; cells of `cell` pixels, at most `perLine` to a line (longer
    /// rows wrap).
    public func svg(title: String, cell: Double = 12, perLine: Int = 64) -> String {
        let margin = 16.0
        let labelHeight = 16.0
        let gap = 10.0
        let used = PageResidency.allCases.filter { s in rows.contains { $0.pages.contains(s) } }
        let widest = min(perLine, rows.map(\.pages.count).max() ?? 1)
        let width = max(2 * margin + Double(widest) * cell, 900)
        var height = margin + 28
        for r in rows { height += labelHeight + Double(max(1, (r.pages.count + perLine - 1) / perLine)) * cell + gap }
        let legendColumns = 3
        height += Double((used.count + legendColumns - 1) / legendColumns) * 18 + margin
        var doc = SVGDocument(width: width, height: height)
        doc.text(title, x: margin, y: margin + 12, size: 15, bold: true)
        var y = margin + 28
        for (n, r) in rows.enumerated() {
            // About 6 px a character at 11 px: longer labels are cut (the whole one is the cells' tooltip).
            let room = Int((width - 2 * margin) / 6.2)
            let label = "\(n + 1). \(r.label)"
            doc.text(label.count > room ? String(label.prefix(room - 1)) + "…" : label, x: margin, y: y + 12, size: 11)
            y += labelHeight
            for (i, state) in r.pages.enumerated() {
                let x = margin + Double(i % perLine) * cell
                let yy = y + Double(i / perLine) * cell
                doc.rect(x: x, y: yy, width: cell - 1, height: cell - 1, fill: state.color, stroke: "#ffffff",
                         title: "step \(n + 1), page \(i): \(state.label) — \(r.label)")
            }
            y += Double(max(1, (r.pages.count + perLine - 1) / perLine)) * cell + gap
        }
        for (k, state) in used.enumerated() {
            let x = margin + Double(k % legendColumns) * (width - 2 * margin) / Double(legendColumns)
            let yy = y + Double(k / legendColumns) * 18
            doc.rect(x: x, y: yy, width: 12, height: 12, fill: state.color, stroke: "#888888")
            doc.text("\(state.rawValue)  \(state.label)", x: x + 18, y: yy + 10, size: 11)
        }
        return doc.rendered
    }
}
