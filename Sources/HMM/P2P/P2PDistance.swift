/// How peer-to-peer traffic between a provider and a client is routed (`enum pci_p2pdma_map_type`).
public enum P2PDMAMapType: Int, Sendable, CustomStringConvertible {
    /// `PCI_P2PDMA_MAP_NOT_SUPPORTED`: the path cannot carry peer traffic.
    case notSupported = 1
    /// `PCI_P2PDMA_MAP_BUS_ADDR`: a switch routes it directly; the client uses PCI bus addresses.
    case busAddress = 2
    /// `PCI_P2PDMA_MAP_THRU_HOST_BRIDGE`: it goes through the root complex (mapped through the IOMMU).
    case throughHostBridge = 3

    public var description: String {
        switch self {
        case .notSupported: return "not supported"
        case .busAddress: return "bus address"
        case .throughHostBridge: return "through host bridge"
        }
    }
}

/// The P2PDMA distance and routing rules (`calc_map_type_and_dist`, `pci_p2pdma_distance_many`,
/// `pci_p2pmem_find_many` in `drivers/pci/p2pdma.c`).
extension PCITopology {
    /// Routing and distance between `provider` and `client` (`calc_map_type_and_dist`).
    ///
    /// Walk up from the provider; at each ancestor, walk up from the client looking for it. The distance
    /// is the hops from the provider to the first common ancestor plus the hops from the client to it:
    /// the same function is 0, two functions of one device 2, two devices below one switch 4. Any
    /// bridge with ACS redirection on the path (the common ancestor included) sends the traffic through
    /// the host bridge; so does the lack of a common ancestor (the distance then counts both full
    /// paths). Through the host bridge is only supported when the CPU is known good or both root
    /// complexes are whitelisted (one shared root complex when its entry requires it).
    public func mapType(provider: PCIFunction, client: PCIFunction) -> (type: P2PDMAMapType, distance: Int) {
        var acsRedirects = 0
        var a: PCIFunction? = provider
        var distA = 0
        var distB = 0
        while let pa = a {
            distB = 0
            if pa.hasACSRedirect { acsRedirects += 1 }
            var bb: PCIFunction? = client
            while let pb = bb {
                if pa === pb {
                    // Common ancestor: the client's side of the path counts too.
                    var c: PCIFunction? = client
                    while let pc = c, pc !== pa {
                        if pc.hasACSRedirect { acsRedirects += 1 }
                        c = pc.upstream
                    }
                    if acsRedirects == 0 { return (.busAddress, distA + distB) }
                    return (throughHostBridge(provider, client), distA + distB)
                }
                bb = pb.upstream
                distB += 1
            }
            a = pa.upstream
            distA += 1
        }
        return (throughHostBridge(provider, client), distA + distB)
    }

    /// `cpu_supports_p2pdma() || host_bridge_whitelist()`.
    private func throughHostBridge(_ a: PCIFunction, _ b: PCIFunction) -> P2PDMAMapType {
        if cpuSupportsP2PDMA { return .throughHostBridge }
        let ha = a.hostBridge, hb = b.hostBridge
        if ha === hb { return ha.whitelisted ? .throughHostBridge : .notSupported }
        let ok = ha.whitelisted && !ha.requiresSameHostBridge && hb.whitelisted && !hb.requiresSameHostBridge
        return ok ? .throughHostBridge : .notSupported
    }

    /// `pci_p2pdma_distance_many`: the summed distance from `provider` to every client, or -1 if any
    /// client cannot reach it (or there are no clients).
    public func distance(provider: PCIFunction, clients: [PCIFunction]) -> Int {
        guard !clients.isEmpty else { return -1 }
        var total = 0
        for c in clients {
            let (type, d) = provider.p2pProvider?.cachedMapType(self, client: c) ?? mapType(provider: provider, client: c)
            if type == .notSupported { return -1 }
            total += d
        }
        return total
    }

    /// `pci_p2pmem_find_many`: among published providers every client can reach, the one with the
    /// smallest summed distance; ties are broken at random, as the kernel does to spread load.
    public func findMemory(for clients: [PCIFunction]) -> P2PProvider? {
        var best = Int.max
        var closest: [P2PProvider] = []
        for f in functions {
            guard let p = f.p2pProvider, p.isPublished else { continue }
            let d = distance(provider: f, clients: clients)
            if d < 0 || d > best { continue }
            if d < best {
                best = d
                closest.removeAll()
            }
            if closest.count < 8 { closest.append(p) }
        }
        return closest.randomElement()
    }
}
