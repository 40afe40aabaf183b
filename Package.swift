// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "swift-hmm",
    products: [
        .library(name: "HMM", targets: ["HMM"]),
        .library(name: "HMMDevices", targets: ["HMMDevices"]),
        .library(name: "HMMNative", targets: ["HMMNative"]),
        .library(name: "HMMMetrics", targets: ["HMMMetrics"]),
        .library(name: "ManagedMemory", targets: ["ManagedMemory"]),
        .executable(name: "hmm", targets: ["hmm"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.5.0"),
    ],
    targets: [
        .target(name: "CCycleCounter"),
        .target(name: "HMM", dependencies: ["CCycleCounter"]),
        .target(name: "HMMDevices", dependencies: ["HMM"]),
        .target(name: "CUserfaultfd", cSettings: [.define("_GNU_SOURCE")]),
        .target(name: "HMMNative", dependencies: ["HMM", "CUserfaultfd", .product(name: "Logging", package: "swift-log")]),
        .target(name: "ManagedMemory", dependencies: ["HMM", "HMMDevices", "HMMNative"]),
        .target(name: "HMMMetrics", dependencies: ["HMM", .product(name: "CoreMetrics", package: "swift-metrics")]),
        .target(name: "HMMSelftests", dependencies: ["HMM", "HMMDevices", "HMMNative", "CUserfaultfd"]),
        // libhmm: the C interface (Sources/CHMM/include/hmm.h) implemented in Swift (HMMC).
        .target(name: "CHMM", exclude: ["libhmm.map"]),
        .target(name: "HMMC", dependencies: [
            "CHMM", "HMM", "HMMDevices", "HMMNative", .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(
            name: "hmm",
            dependencies: [
                "HMM", "HMMDevices", "HMMSelftests", "HMMNative", "CUserfaultfd", "ManagedMemory",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "HMMTests", dependencies: ["HMM", "HMMDevices"]),
        .testTarget(name: "SelftestTests", dependencies: ["HMM", "HMMDevices", "HMMSelftests"]),
        .testTarget(name: "HMMNativeTests", dependencies: ["HMM", "HMMDevices", "HMMNative", "CUserfaultfd", "HMMSelftests"]),
        .testTarget(name: "ManagedMemoryTests", dependencies: ["HMM", "HMMDevices", "HMMNative", "ManagedMemory"]),
        .testTarget(name: "HMMMetricsTests", dependencies: [
            "HMM", "HMMMetrics", .product(name: "MetricsTestKit", package: "swift-metrics"),
        ]),
    ],
    swiftLanguageModes: [.v6]
)

// libhmm.so for C programs (c/build runs this with HMM_LIBHMM set): the Swift standard library linked in
// statically, so a C program needs no Swift runtime on its library path, and only the `hmm_*` functions
// exported (Sources/CHMM/libhmm.map). A plain build compiles HMMC without making the library.
if Context.environment["HMM_LIBHMM"] != nil {
    package.products.append(.library(name: "hmm-c", type: .dynamic, targets: ["HMMC"]))
    let map = Context.packageDirectory + "/Sources/CHMM/libhmm.map"
    package.targets.first { $0.name == "HMMC" }!.linkerSettings = [
        .unsafeFlags(["-static-stdlib", "-Xlinker", "--version-script=" + map, "-Xlinker", "-soname=libhmm.so"]),
    ]
}

// The DocC catalogues (Sources/*/Documentation.docc) build with swift-docc-plugin, which is added only when
// HMM_DOCS is set (as .ci/docs does), so a plain build never fetches it:
//   HMM_DOCS=1 swift package --scratch-path .build-docs generate-documentation --target HMM --warnings-as-errors
if Context.environment["HMM_DOCS"] != nil {
    package.dependencies.append(.package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"))
}
