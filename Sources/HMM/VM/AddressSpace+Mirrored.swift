import Synchronization

/// The simulated engine's side of the driver seam: an ``AddressSpace`` is a ``MirroredAddressSpace``
/// (its ``MigrationEngine`` conformance is in `AddressSpace+Migrate.swift`).
extension AddressSpace: MirroredAddressSpace {
    public var eventSpaceID: Int { id }
}

@_spi(Engine)
extension AddressSpace {
    /// The space's interval notifiers.
    public var notifierSubscriptions: NotifierSubscriptions { notifiers }

    /// Runs `body` with `mmapLock` held for writing, once the space is known to be alive.
    /// - Throws: what `body` throws, or `.noProcess` after exit.
    public func withMmapWriteLock<R>(_ body: () throws(HMMError) -> R) throws(HMMError) -> R {
        try mmapLock.withWriteLock { () throws(HMMError) -> R in
            try checkAlive()
            return try body()
        }
    }
}

extension AddressSpace {
    /// Runs `body` with `mmapLock` held for reading: what a driver wraps around ``MigrateVMA`` phases,
    /// ``AddressSpace/rangeFault(_:)`` and ``AddressSpace/makeDeviceExclusive(_:owner:_:)``.
    /// - Throws: what `body` throws, or `.noProcess` after exit.
    public func withMmapReadLock<R>(_ body: () throws(HMMError) -> R) throws(HMMError) -> R {
        try mmapLock.withReadLock { () throws(HMMError) -> R in
            try checkAlive()
            return try body()
        }
    }

    /// ``withMmapReadLock(_:)`` for a closure written without a thrown-type annotation. Swift infers
    /// `throws(any Error)` for such a closure, which the typed form cannot take; this form takes it, so
    /// `try mm.withMmapReadLock { try m.setup(); … }` compiles. Annotate the closure
    /// (`{ () throws(HMMError) in … }`) to keep the typed error.
    /// - Throws: what `body` throws, or `HMMError.noProcess` after exit.
    @_disfavoredOverload
    public func withMmapReadLock<R>(_ body: () throws -> R) throws -> R {
        try mmapLock.withReadLock { () throws -> R in
            try checkAlive()
            return try body()
        }
    }
}

extension AddressSpace {
    /// The mapping containing `address`, read without taking `mmapLock`: call it inside
    /// ``MirroredAddressSpace/withMmapReadLock(_:)``.
    public func mappingHoldingLock(containing address: UInt64) -> MappingInfo? {
        guard let i = vmaIndex(containing: address) else { return nil }
        let v = vmas[i]
        return MappingInfo(start: v.start, end: v.end, protection: v.protection, shared: v.isShared,
                           anonymous: v.file == nil || v.file!.isShmem, hugetlb: v.isHugetlb,
                           hugePageAdvice: v.flags.contains(.hugePage))
    }
}
