import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// How a row's ratio is formed from one round's two samples.
///
/// Bodies return figures in the row's unit, so a rate (GB/s, pages/s) compared with a rate is
/// `measuredOverBaseline` ("0.42 × memcpy"), and so is a time compared with a time ("fault = 52 × memcpy").
/// `baselineOverMeasured` is for rows that say how many times *faster* the measured figure is than its
/// baseline when both are times ("fork = 1.47 × exit" on the exit row).
enum BenchRatio: String, Encodable, Sendable {
    case measuredOverBaseline = "measured/baseline"
    case baselineOverMeasured = "baseline/measured"

    func of(measured: Double, baseline: Double) -> Double {
        self == .measuredOverBaseline ? measured / baseline : baseline / measured
    }
}

/// One figure of a benchmark report: what was measured, against what, and how the two compare.
///
/// `value` and `baselineValue` are the medians of their samples; `ratio` is the median of the per-round
/// ratios (not the ratio of the medians: a round's two samples share the machine's state of the moment,
/// so their ratio cancels most of the noise that moves both), and `ratioQ1`…`ratioQ3` is the
/// interquartile range of those per-round ratios, `ratioMin`…`ratioMax` their full range. A row without
/// a baseline has no ratio; a row whose ratio comes from one round has no spread worth the name (the
/// quartiles equal the ratio).
struct BenchRow: Encodable, Sendable {
    var name: String
    var value: Double?
    var unit: String
    var baseline: String?
    var baselineValue: Double?
    var baselineUnit: String?
    var ratio: Double?
    var ratioConvention: BenchRatio?
    /// Rounds behind the figures (after the warm-up rounds, which are discarded).
    var pairs: Int
    /// Whether baseline and figure were measured alternately, in the same rounds.
    var interleaved: Bool
    var ratioMedian: Double?
    var ratioQ1: Double?
    var ratioQ3: Double?
    var ratioMin: Double?
    var ratioMax: Double?
    var note: String?
    /// Digits after the point in the text table (not encoded).
    var digits: Int = 2

    private enum CodingKeys: String, CodingKey {
        case name, value, unit, baseline, baselineValue, baselineUnit, ratio, ratioConvention, pairs, interleaved
        case ratioMedian, ratioQ1, ratioQ3, ratioMin, ratioMax, note
    }

    // Non-finite doubles (a bare baseline that could not run gives NaN) are written as null: JSON has no NaN.
    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        func put(_ v: Double?, _ k: CodingKeys) throws {
            if let v, v.isFinite { try c.encode(v, forKey: k) } else { try c.encodeNil(forKey: k) }
        }
        try c.encode(name, forKey: .name)
        try put(value, .value)
        try c.encode(unit, forKey: .unit)
        try c.encodeIfPresent(baseline, forKey: .baseline)
        try put(baselineValue, .baselineValue)
        try c.encodeIfPresent(baselineUnit, forKey: .baselineUnit)
        try put(ratio, .ratio)
        try c.encodeIfPresent(ratioConvention, forKey: .ratioConvention)
        try c.encode(pairs, forKey: .pairs)
        try c.encode(interleaved, forKey: .interleaved)
        try put(ratioMedian, .ratioMedian)
        try put(ratioQ1, .ratioQ1)
        try put(ratioQ3, .ratioQ3)
        try put(ratioMin, .ratioMin)
        try put(ratioMax, .ratioMax)
        try c.encodeIfPresent(note, forKey: .note)
    }
}

/// The figures of one `hmm bench` run, each against a baseline measured alternately with it in the same
/// run, printed as a text table (row by row, as they are measured) or, with `--json`, as one JSON document
/// at the end.
///
/// Method. This machine is noisy (2 shared CPUs, a shared L3, neighbours in the same host): a baseline
/// measured once before or after a figure sees other conditions than the figure did, and the ratio of
/// the two moves by 2× from run to run. So a figure and its baseline are measured in *rounds* — baseline,
/// figure, baseline, figure … — and every round gives one ratio; the row reports the median of those
/// per-round ratios and their interquartile range. The first `warmup` rounds are run and discarded (they
/// pay the host's first touch of memory and the cold caches the later rounds do not). Bodies should
/// allocate and first-touch their buffers outside the timed region, and should time enough work (a
/// millisecond or more) that one timer tick or interrupt does not dominate a sample.
///
/// Use `pair(name:unit:baseline:…:baselineBody:measuredBody:)` for one figure against one baseline, or
/// `rounds(reps:warmup:_:)` plus `add(name:unit:baseline:measured:baselineSamples:…)` when one round
/// measures several figures back to back (a migration there and back against a copy there and back).
final class BenchReport {
    /// A titled group of rows (one per benchmark group run).
    struct Section: Encodable, Sendable {
        var title: String
        var rows: [BenchRow] = []
        var notes: [String] = []
        /// The host's 1-minute load average when the section started (`getloadavg`): above about 0.5
        /// something else was running on this 2-CPU machine, and ratios of figures that differ in how
        /// they use the caches move with it.
        var loadAverage: Double?
    }

    /// What the text table's ratio spread is, printed in the header and written to the JSON.
    static let spreadDescription = "interquartile range (25th-75th percentile) of the per-round ratios"

    let json: Bool
    private(set) var sections: [Section] = []

    /// `json`: collect everything and print one JSON document in `finish()`; otherwise print each row as it
    /// is added.
    init(json: Bool) {
        self.json = json
    }

    /// Starts a group of rows under `title` (printed with the column header in text mode).
    func section(_ title: String) {
        var load = [0.0, 0.0, 0.0]
        let known = getloadavg(&load, 3) >= 1
        sections.append(Section(title: title, loadAverage: known ? load[0] : nil))
        guard !json else { return }
        if sections.count > 1 { print("") }
        print(title)
        if known { print("host load average (1 min) at the start: \(fixed(load[0]))" + (load[0] > 0.5 ? " — other work is running; expect the ratios to move" : "")) }
        print("ratio: median of the per-round ratios (baseline and figure measured alternately, a warm-up "
              + "round discarded); [a-b]: their interquartile range")
        print(pad("figure", 46) + pad("value", 22) + "baseline; ratio [spread]")
    }

    /// A free line of text: printed in text mode, kept in the section's `notes` in JSON.
    func note(_ text: String) {
        if sections.isEmpty { sections.append(Section(title: "")) }
        sections[sections.count - 1].notes.append(text)
        if !json { print(text) }
    }

    /// Runs `warmup + reps` rounds of `round` and returns the last `reps` of them (the warm-up rounds are
    /// discarded). Each round measures several quantities back to back and returns them in a fixed order,
    /// so that column `k` of the result holds quantity `k` of every round: a figure and its baseline taken
    /// from two columns were measured alternately, under the same conditions.
    static func rounds(reps: Int, warmup: Int = 1, _ round: () throws -> [Double]) rethrows -> [[Double]] {
        var out: [[Double]] = []
        out.reserveCapacity(max(1, reps))
        for r in 0..<(warmup + max(1, reps)) {
            let sample = try round()
            if r >= warmup { out.append(sample) }
        }
        return out
    }

    /// Measures `measuredBody` against `baselineBody` alternately (baseline, figure, baseline, figure …,
    /// `reps` rounds after `warmup` discarded ones) and adds the row. Both bodies return one sample in the
    /// row's unit (`unit` for the figure, `baselineUnit` — `unit` when nil — for the baseline).
    @discardableResult
    func pair(name: String, unit: String, baseline: String, baselineUnit: String? = nil,
              ratio: BenchRatio = .measuredOverBaseline, digits: Int = 2, note: String? = nil,
              reps: Int, warmup: Int = 1, baselineBody: () throws -> Double,
              measuredBody: () throws -> Double) rethrows -> BenchRow {
        let samples = try Self.rounds(reps: reps, warmup: warmup) { [try baselineBody(), try measuredBody()] }
        return add(name: name, unit: unit, baseline: baseline, baselineUnit: baselineUnit, ratio: ratio,
                   digits: digits, note: note, measured: samples.map { $0[1] }, baselineSamples: samples.map { $0[0] })
    }

    /// Adds a row from per-round samples: `measured[i]` and `baselineSamples[i]` come from the same round
    /// (equal counts; see `rounds(reps:warmup:_:)`). Without a baseline (`baselineSamples` nil) the row has a
    /// value only.
    @discardableResult
    func add(name: String, unit: String, baseline: String? = nil, baselineUnit: String? = nil,
             ratio: BenchRatio = .measuredOverBaseline, digits: Int = 2, note: String? = nil,
             measured: [Double], baselineSamples: [Double]? = nil) -> BenchRow {
        precondition(baselineSamples == nil || baselineSamples!.count == measured.count,
                     "a row's figure and baseline must come from the same rounds")
        var row = BenchRow(name: name, value: Self.quantile(measured, 0.5), unit: unit, baseline: nil,
                           baselineValue: nil, baselineUnit: nil, ratio: nil, ratioConvention: nil,
                           pairs: measured.count, interleaved: false, note: note, digits: digits)
        if let base = baselineSamples, let baseline {
            let ratios = zip(measured, base).map { ratio.of(measured: $0, baseline: $1) }
            row.baseline = baseline
            row.baselineValue = Self.quantile(base, 0.5)
            row.baselineUnit = baselineUnit ?? unit
            row.ratioConvention = ratio
            row.interleaved = true
            row.ratioMedian = Self.quantile(ratios, 0.5)
            row.ratio = row.ratioMedian
            row.ratioQ1 = Self.quantile(ratios, 0.25)
            row.ratioQ3 = Self.quantile(ratios, 0.75)
            row.ratioMin = ratios.min()
            row.ratioMax = ratios.max()
        }
        append(row)
        return row
    }

    /// Adds a finished row (its figures computed by the caller).
    func append(_ row: BenchRow) {
        if sections.isEmpty { sections.append(Section(title: "")) }
        sections[sections.count - 1].rows.append(row)
        if !json { print(Self.text(row)) }
    }

    /// Ends the report: in JSON mode prints the document (nothing is printed before it), in text mode
    /// nothing more. Throws if the document cannot be encoded.
    func finish() throws {
        guard json else { return }
        struct Document: Encodable {
            var spread: String
            var ratio: String
            var sections: [Section]
        }
        try printJSON(Document(
            spread: "ratioQ1..ratioQ3: \(Self.spreadDescription); ratioMin..ratioMax: their full range",
            ratio: "median of the per-round ratios of figure and baseline, measured alternately "
                + "(pairs rounds after discarded warm-up rounds); ratioConvention says which way",
            sections: sections))
    }

    /// The `q`-quantile of `xs` (linear interpolation between order statistics; the median of an even
    /// count is the mean of the middle two). Nil for an empty array.
    static func quantile(_ xs: [Double], _ q: Double) -> Double? {
        guard !xs.isEmpty else { return nil }
        let s = xs.sorted()
        let pos = q * Double(s.count - 1)
        let lo = Int(pos.rounded(.down))
        let hi = min(lo + 1, s.count - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - Double(lo))
    }

    /// One line of the text table: name, value, then the baseline and the ratio with its spread.
    static func text(_ row: BenchRow) -> String {
        let d = row.digits
        let value = row.value.map { "\(fixed($0, d)) \(row.unit)" } ?? "-"
        var rest = ""
        if let baseline = row.baseline {
            rest = baseline
            if let b = row.baselineValue { rest += " \(fixed(b, d)) \(row.baselineUnit ?? row.unit)" }
            if let r = row.ratio {
                rest += "; \(fixed(r)) x"
                if let q1 = row.ratioQ1, let q3 = row.ratioQ3, row.pairs > 1 { rest += " [\(fixed(q1))-\(fixed(q3))]" }
            }
        }
        if let note = row.note { rest += rest.isEmpty ? note : "; \(note)" }
        return pad(row.name, 46) + pad(value, 22) + rest
    }
}
