// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "swift-hmm",
    products: [
        .library(name: "HMM", targets: ["HMM"]),
        .library(name: "HMMDevices", targets: ["HMMDevices"]),
        .executable(name: "hmm", targets: ["hmm"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0")
    ],
    targets: [
        .target(name: "HMM"),
        .target(name: "HMMDevices", dependencies: ["HMM"]),
        .target(name: "HMMSelftests", dependencies: ["HMM", "HMMDevices"]),
        .executableTarget(
            name: "hmm",
            dependencies: [
                "HMM", "HMMDevices", "HMMSelftests",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "HMMTests", dependencies: ["HMM", "HMMDevices"]),
        .testTarget(name: "SelftestTests", dependencies: ["HMM", "HMMDevices", "HMMSelftests"]),
    ],
    swiftLanguageModes: [.v6]
)
