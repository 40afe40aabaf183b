/// A small SVG writer: the pictures swift-hmm draws (residency maps, benchmark plots) are a few hundred
/// rectangles, lines and labels, and a browser opens the text as it is. Coordinates are in user units
/// (pixels at 100 %); text is escaped.
public struct SVGDocument: Sendable {
    public let width: Double
    public let height: Double
    private var body: [String] = []

    /// An empty picture of `width` × `height` on a white background.
    public init(width: Double, height: Double) {
        self.width = width
        self.height = height
        rect(x: 0, y: 0, width: width, height: height, fill: "#ffffff")
    }

    /// A filled rectangle, with an optional stroke and tooltip (`<title>`).
    public mutating func rect(x: Double, y: Double, width: Double, height: Double, fill: String,
                              stroke: String? = nil, title: String? = nil) {
        var s = "<rect x=\"\(n(x))\" y=\"\(n(y))\" width=\"\(n(width))\" height=\"\(n(height))\" fill=\"\(fill)\""
        if let stroke { s += " stroke=\"\(stroke)\" stroke-width=\"0.5\"" }
        if let title { s += "><title>\(Self.escape(title))</title></rect>" } else { s += "/>" }
        body.append(s)
    }

    /// A straight line.
    public mutating func line(x1: Double, y1: Double, x2: Double, y2: Double, stroke: String,
                              width: Double = 1, dashed: Bool = false) {
        body.append("<line x1=\"\(n(x1))\" y1=\"\(n(y1))\" x2=\"\(n(x2))\" y2=\"\(n(y2))\" stroke=\"\(stroke)\" stroke-width=\"\(n(width))\"\(dashed ? " stroke-dasharray=\"4 3\"" : "")/>")
    }

    /// A line through `points`, with a dot at each.
    public mutating func polyline(_ points: [(x: Double, y: Double)], stroke: String, width: Double = 2,
                                  dashed: Bool = false, dots: Bool = true) {
        guard !points.isEmpty else { return }
        let p = points.map { "\(n($0.x)),\(n($0.y))" }.joined(separator: " ")
        body.append("<polyline points=\"\(p)\" fill=\"none\" stroke=\"\(stroke)\" stroke-width=\"\(n(width))\"\(dashed ? " stroke-dasharray=\"6 4\"" : "")/>")
        if dots {
            for q in points { body.append("<circle cx=\"\(n(q.x))\" cy=\"\(n(q.y))\" r=\"3\" fill=\"\(stroke)\"/>") }
        }
    }

    /// Where a text's anchor point sits in it.
    public enum Anchor: String, Sendable { case start, middle, end }

    /// A label whose baseline starts (or centres, or ends) at `(x, y)`; `rotated` turns it a quarter
    /// counter-clockwise (a y-axis title).
    public mutating func text(_ string: String, x: Double, y: Double, size: Double = 12, anchor: Anchor = .start,
                              bold: Bool = false, color: String = "#222222", rotated: Bool = false) {
        let turn = rotated ? " transform=\"rotate(-90 \(n(x)) \(n(y)))\"" : ""
        body.append("<text x=\"\(n(x))\" y=\"\(n(y))\" font-family=\"sans-serif\" font-size=\"\(n(size))\" text-anchor=\"\(anchor.rawValue)\" fill=\"\(color)\"\(bold ? " font-weight=\"bold\"" : "")\(turn)>\(Self.escape(string))</text>")
    }

    /// The document's text.
    public var rendered: String {
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(n(width))\" height=\"\(n(height))\" viewBox=\"0 0 \(n(width)) \(n(height))\">\n"
            + body.joined(separator: "\n") + "\n</svg>\n"
    }

    /// `&`, `<`, `>` and `"` as entities.
    public static func escape(_ s: String) -> String {
        var out = ""
        out.reserveCapacity(s.utf8.count)
        for c in s {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            default: out.append(c)
            }
        }
        return out
    }

    /// A coordinate with at most two decimals.
    private func n(_ v: Double) -> String {
        let r = (v * 100).rounded() / 100
        return r == r.rounded() ? "\(Int(r))" : "\(r)"
    }
}
