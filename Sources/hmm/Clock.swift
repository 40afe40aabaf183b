#if canImport(Glibc)
import Glibc
#endif

/// Monotonic nanoseconds.
func now() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Keeps a value alive so the optimizer cannot drop the work that produced it.
@_optimize(none) @inline(never)
func blackHole<T>(_ value: T) {}

/// `value` with `digits` decimals ("12.30"; no point with 0 digits; "nan"/"inf" as they are).
func fixed(_ value: Double, _ digits: Int = 2) -> String {
    if digits <= 0 && value.isFinite && abs(value) < 9e18 { return "\(Int(value.rounded()))" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let v = (value * scale).rounded() / scale
    var s = "\(v)"
    if let dot = s.firstIndex(of: ".") {
        let decimals = s.distance(from: dot, to: s.endIndex) - 1
        if decimals < digits { s += String(repeating: "0", count: digits - decimals) }
    } else if digits > 0 {
        s += "." + String(repeating: "0", count: digits)
    }
    return s
}

func pad(_ s: String, _ width: Int) -> String {
    s.count >= width ? s : s + String(repeating: " ", count: width - s.count)
}
