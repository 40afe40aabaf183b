// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "swift-hmm",
    products: [
        .library(name: "HMM", targets: ["HMM"]),
        .executable(name: "hmm", targets: ["hmm"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0")
    ],
    targets: [
        .target(name: "HMM"),
        .executableTarget(
            name: "hmm",
            dependencies: [
                "HMM",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "HMMTests", dependencies: ["HMM"]),
    ],
    swiftLanguageModes: [.v6]
)
