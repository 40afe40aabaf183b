import HMM

#if canImport(Glibc)
import Glibc
#endif

/// A line plot of series of (x, y) points on a log2 x axis (buffer sizes, page counts, thread counts) and a
/// linear y axis from zero, drawn with the library's `SVGDocument`: axes, grid, power-of-two ticks with
/// labels, one coloured line per series, a legend and a title.
struct LinePlot: Sendable {
    /// One line of the plot.
    struct Series: Sendable {
        var name: String
        var points: [Point]
        var color: String
        var dashed: Bool
    }

    /// A point in data units (`x` > 0: the x axis is logarithmic).
    struct Point: Sendable {
        var x: Double
        var y: Double
    }

    var title: String
    var xLabel: String
    var yLabel: String
    var width: Double
    var height: Double
    /// The label of an x tick (a power of two); by default the number itself.
    var xTickLabel: @Sendable (Double) -> String
    private(set) var series: [Series] = []

    /// Colours given to series in order when `add` is not told one.
    static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]

    init(title: String, xLabel: String, yLabel: String, width: Double = 900, height: Double = 460,
         xTickLabel: @escaping @Sendable (Double) -> String = { "\(Int($0))" }) {
        self.title = title
        self.xLabel = xLabel
        self.yLabel = yLabel
        self.width = width
        self.height = height
        self.xTickLabel = xTickLabel
    }

    /// Adds a series; points with x ≤ 0 or a non-finite coordinate are dropped (they have no place on a
    /// log axis), the rest are drawn in order of x.
    mutating func add(_ name: String, points: [Point], color: String? = nil, dashed: Bool = false) {
        let kept = points.filter { $0.x > 0 && $0.x.isFinite && $0.y.isFinite }.sorted { $0.x < $1.x }
        series.append(Series(name: name, points: kept, color: color ?? Self.palette[series.count % Self.palette.count],
                             dashed: dashed))
    }

    /// The picture.
    var document: SVGDocument {
        var svg = SVGDocument(width: width, height: height)
        // The legend sits right of the plot area, as wide as its longest name (about 6.2 units a character).
        let legend = 64 + 6.2 * Double(series.map(\.name.count).max() ?? 0)
        let left = 70.0, right = width - legend, top = 44.0, bottom = height - 56
        let all = series.flatMap(\.points)
        svg.text(title, x: width / 2, y: 24, size: 15, anchor: .middle, bold: true)
        // x: powers of two from below the smallest x to above the largest.
        let lo = all.map { log2($0.x) }.min().map { $0.rounded(.down) } ?? 0
        var hi = all.map { log2($0.x) }.max().map { $0.rounded(.up) } ?? 1
        if hi <= lo { hi = lo + 1 }
        let xs = { (x: Double) in left + (log2(x) - lo) / (hi - lo) * (right - left) }
        // y: zero to a round number above the largest y, in 1/2/5 × 10^k steps.
        let (yMax, yStep) = Self.niceScale(all.map(\.y).max() ?? 1)
        let ys = { (y: Double) in bottom - y / yMax * (bottom - top) }
        var y = 0.0
        while y <= yMax + yStep / 2 {
            svg.line(x1: left, y1: ys(y), x2: right, y2: ys(y), stroke: "#e4e4e4")
            svg.text(Self.format(y, step: yStep), x: left - 6, y: ys(y) + 4, size: 11, anchor: .end)
            y += yStep
        }
        let every = max(1, Int(((hi - lo) / 10).rounded(.up)))
        for (i, e) in stride(from: lo, through: hi, by: 1).enumerated() where i % every == 0 {
            let x = xs(exp2(e))
            svg.line(x1: x, y1: top, x2: x, y2: bottom, stroke: "#eeeeee")
            svg.line(x1: x, y1: bottom, x2: x, y2: bottom + 5, stroke: "#222222")
            svg.text(xTickLabel(exp2(e)), x: x, y: bottom + 18, size: 11, anchor: .middle)
        }
        svg.line(x1: left, y1: bottom, x2: right, y2: bottom, stroke: "#222222")
        svg.line(x1: left, y1: top, x2: left, y2: bottom, stroke: "#222222")
        svg.text(xLabel, x: (left + right) / 2, y: height - 16, size: 12, anchor: .middle)
        svg.text(yLabel, x: 20, y: (top + bottom) / 2, size: 12, anchor: .middle, rotated: true)
        for s in series {
            svg.polyline(s.points.map { (x: xs($0.x), y: ys($0.y)) }, stroke: s.color, dashed: s.dashed)
        }
        // Legend, right of the plot area.
        for (i, s) in series.enumerated() {
            let ly = top + 10 + Double(i) * 22
            svg.line(x1: right + 16, y1: ly, x2: right + 44, y2: ly, stroke: s.color, width: 2, dashed: s.dashed)
            svg.text(s.name, x: right + 50, y: ly + 4, size: 11)
        }
        return svg
    }

    /// Writes the picture to `path` (created or truncated); throws an error naming the path.
    func write(to path: String) throws {
        try TextFile.write(document.rendered, to: path)
    }

    /// A top of the axis at or above `maximum` and a step that divides it into 4 to 10 ticks.
    static func niceScale(_ maximum: Double) -> (top: Double, step: Double) {
        let m = maximum > 0 && maximum.isFinite ? maximum : 1
        let magnitude = pow(10, (log10(m / 5)).rounded(.down))
        let step = [1.0, 2, 5, 10].map { $0 * magnitude }.first { m / $0 <= 8 } ?? 10 * magnitude
        return ((m / step).rounded(.up) * step, step)
    }

    private static func format(_ v: Double, step: Double) -> String {
        step >= 1 ? "\(Int(v.rounded()))" : fixed(v, step >= 0.1 ? 1 : 2)
    }
}
