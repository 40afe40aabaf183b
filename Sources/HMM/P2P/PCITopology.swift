/// A PCI host bridge (root complex): the top of a PCI hierarchy (`struct pci_host_bridge`).
public final class PCIHostBridge: Sendable, CustomStringConvertible {
    /// PCI domain number.
    public let domain: Int
    /// Whether its root port is on the kernel's P2PDMA whitelist (`pci_p2pdma_whitelist`: some Intel
    /// root complexes, all Google SoCs), so traffic between devices may be routed through it.
    public let whitelisted: Bool
    /// The whitelist entry carries `REQ_SAME_HOST_BRIDGE`: peer traffic is only supported between
    /// devices under this one host bridge.
    public let requiresSameHostBridge: Bool

    init(domain: Int, whitelisted: Bool, requiresSameHostBridge: Bool) {
        self.domain = domain
        self.whitelisted = whitelisted
        self.requiresSameHostBridge = requiresSameHostBridge
    }

    public var description: String { "host bridge \(paddedHex(domain, 4))" }
}

/// A memory or I/O region a PCI function decodes (a base address register).
public struct PCIBAR: Sendable, Hashable {
    /// Bytes decoded.
    public var size: Int
    /// A memory BAR (only these can back P2PDMA memory); false for an I/O-port BAR.
    public var isMemory: Bool
    /// The BAR's address on the PCI bus (what a peer device targets).
    public var busAddress: UInt64

    public init(size: Int, isMemory: Bool = true, busAddress: UInt64 = 0) {
        self.size = size
        self.isMemory = isMemory
        self.busAddress = busAddress
    }
}

/// One PCI function (`struct pci_dev`): a bridge (root port or switch port) or an endpoint.
public final class PCIFunction: @unchecked Sendable, CustomStringConvertible, Hashable {
    /// What the function is.
    public enum Kind: Sendable, Hashable {
        /// A PCI-to-PCI bridge: a root port, or an upstream or downstream switch port.
        /// `acsRedirect`: its ACS control has request/completion redirect or egress control set
        /// (`PCI_ACS_RR | PCI_ACS_CR | PCI_ACS_EC`), so peer traffic is sent up to the root complex.
        case bridge(acsRedirect: Bool)
        /// A device function.
        case endpoint
    }

    public let kind: Kind
    /// `pci_upstream_bridge`: the bridge above, nil for a root port or a root-complex endpoint.
    public let upstream: PCIFunction?
    public let hostBridge: PCIHostBridge
    /// Bus, device and function numbers.
    public let bus: Int, device: Int, function: Int
    /// The secondary bus of a bridge (where its children sit).
    let secondaryBus: Int
    public let bars: [PCIBAR]
    /// `pdev->p2pdma`: the provider once memory was added, nil after unbind.
    let p2pdma = Locked<P2PProvider?>(nil)

    init(kind: Kind, upstream: PCIFunction?, hostBridge: PCIHostBridge, bus: Int, device: Int, function: Int,
         secondaryBus: Int, bars: [PCIBAR]) {
        self.kind = kind
        self.upstream = upstream
        self.hostBridge = hostBridge
        self.bus = bus
        self.device = device
        self.function = function
        self.secondaryBus = secondaryBus
        self.bars = bars
    }

    /// `DDDD:BB:dd.f`.
    public var name: String {
        "\(paddedHex(hostBridge.domain, 4)):\(paddedHex(bus, 2)):\(paddedHex(device, 2)).\(function)"
    }

    public var description: String { name }

    /// The key of the per-provider map-type cache (`map_types_idx`: domain << 16 | bus << 8 | devfn).
    var mapTypeIndex: Int { hostBridge.domain << 16 | bus << 8 | device << 3 | function }

    /// Whether this is a bridge with ACS redirection enabled (`pci_bridge_has_acs_redir`).
    var hasACSRedirect: Bool {
        if case .bridge(let redirect) = kind { return redirect }
        return false
    }

    /// The provider of peer-to-peer memory on this function, if any (`pdev->p2pdma`).
    public var p2pProvider: P2PProvider? { p2pdma.withLock { $0 } }

    public static func == (a: PCIFunction, b: PCIFunction) -> Bool { a === b }
    public func hash(into h: inout Hasher) { h.combine(ObjectIdentifier(self)) }
}

/// A small model of a PCI hierarchy: host bridges, root ports, switches (an upstream port and its
/// downstream ports) and endpoint functions with BARs — enough for the P2PDMA distance and routing
/// rules (`drivers/pci/p2pdma.c`) and for finding peer memory.
///
/// Thread-safe; the hierarchy only grows.
public final class PCITopology: @unchecked Sendable {
    /// `cpu_supports_p2pdma()`: the CPU routes peer traffic through its root complex (AMD Zen and later),
    /// so no whitelist is needed.
    public let cpuSupportsP2PDMA: Bool
    private let state = Locked<(functions: [PCIFunction], hostBridges: Int, nextBus: [Int: Int])>(
        (functions: [], hostBridges: 0, nextBus: [:]))

    public init(cpuSupportsP2PDMA: Bool = false) {
        self.cpuSupportsP2PDMA = cpuSupportsP2PDMA
    }

    /// Every function, in the order added.
    public var functions: [PCIFunction] { state.withLock { $0.functions } }

    /// Adds a host bridge (a new PCI domain).
    public func addHostBridge(whitelisted: Bool = false, requiresSameHostBridge: Bool = false) -> PCIHostBridge {
        state.withLock { s in
            defer { s.hostBridges += 1 }
            s.nextBus[s.hostBridges] = 1
            return PCIHostBridge(domain: s.hostBridges, whitelisted: whitelisted,
                                 requiresSameHostBridge: requiresSameHostBridge)
        }
    }

    /// Adds a root port on `hostBridge`'s bus 0.
    public func addRootPort(on hostBridge: PCIHostBridge, acsRedirect: Bool = false) -> PCIFunction {
        state.withLock { s in
            let dev = s.functions.filter { $0.hostBridge === hostBridge && $0.bus == 0 }.count
            let f = PCIFunction(kind: .bridge(acsRedirect: acsRedirect), upstream: nil, hostBridge: hostBridge, bus: 0,
                                device: dev, function: 0, secondaryBus: takeBus(&s, hostBridge), bars: [])
            s.functions.append(f)
            return f
        }
    }

    /// Adds a switch below `port` (a root port or a downstream port of another switch): its upstream
    /// port and `downstreamPorts` downstream ports, which are returned.
    /// - Throws: `.invalidArgument` if `port` is not a bridge or the port count is not 1…32.
    public func addSwitch(under port: PCIFunction, downstreamPorts: Int, acsRedirect: Bool = false) throws(HMMError) -> [PCIFunction] {
        guard case .bridge = port.kind else { throw .invalid("\(port) is not a bridge") }
        guard (1...32).contains(downstreamPorts) else { throw .invalid("a switch has 1…32 downstream ports, not \(downstreamPorts)") }
        return state.withLock { s in
            let hb = port.hostBridge
            let up = PCIFunction(kind: .bridge(acsRedirect: acsRedirect), upstream: port, hostBridge: hb,
                                 bus: port.secondaryBus, device: 0, function: 0, secondaryBus: takeBus(&s, hb), bars: [])
            s.functions.append(up)
            var downs: [PCIFunction] = []
            for d in 0..<downstreamPorts {
                let down = PCIFunction(kind: .bridge(acsRedirect: acsRedirect), upstream: up, hostBridge: hb,
                                       bus: up.secondaryBus, device: d, function: 0, secondaryBus: takeBus(&s, hb), bars: [])
                downs.append(down)
            }
            s.functions += downs
            return downs
        }
    }

    /// Adds a device below `port` (a root port or a downstream switch port) with `functions` functions,
    /// each decoding `bars`; returns the functions.
    /// - Throws: `.invalidArgument` if `port` is not a bridge, the function count is not 1…8, or a BAR
    ///   size is not positive.
    public func addDevice(under port: PCIFunction, functions: Int = 1, bars: [PCIBAR]) throws(HMMError) -> [PCIFunction] {
        guard case .bridge = port.kind else { throw .invalid("\(port) is not a bridge") }
        guard (1...8).contains(functions) else { throw .invalid("a device has 1…8 functions, not \(functions)") }
        guard bars.count <= 6, bars.allSatisfy({ $0.size > 0 }) else { throw .invalid("a function has up to 6 BARs of positive size") }
        return state.withLock { s in
            let dev = s.functions.filter { $0.upstream === port && $0.bus == port.secondaryBus && $0.function == 0 }.count
            let fns = (0..<functions).map {
                PCIFunction(kind: .endpoint, upstream: port, hostBridge: port.hostBridge, bus: port.secondaryBus,
                            device: dev, function: $0, secondaryBus: -1, bars: bars)
            }
            s.functions += fns
            return fns
        }
    }

    private func takeBus(_ s: inout (functions: [PCIFunction], hostBridges: Int, nextBus: [Int: Int]), _ hb: PCIHostBridge) -> Int {
        let b = s.nextBus[hb.domain, default: 1]
        s.nextBus[hb.domain] = b + 1
        return b
    }
}

/// `value` in lower-case hex, zero-padded to `width` digits.
func paddedHex(_ value: Int, _ width: Int) -> String {
    let s = String(value, radix: 16)
    return String(repeating: "0", count: max(0, width - s.count)) + s
}
