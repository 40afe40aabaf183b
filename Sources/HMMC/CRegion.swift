import CHMM
import HMM
import HMMNative
#if canImport(Glibc)
import Glibc
#endif

// hmm_region_*: regions of a native space.

/// `PROT_*` bits from C.
func protection(_ bits: Int32) throws(CError) -> Protection {
    guard bits & ~7 == 0 else { throw CError(EINVAL, "unknown protection bits \(bits)") }
    return Protection(rawValue: UInt8(bits))
}

/// `[offset, offset + length)` of `region` as a byte range, checked.
func regionRange(_ region: NativeRegion, _ offset: UInt64, _ length: UInt64) throws(CError) -> Range<Int> {
    let n = try pageCount(length, "length")
    guard offset % UInt64(PageSize.base) == 0, offset <= UInt64(region.length), UInt64(n) <= UInt64(region.length) - offset else {
        throw CError(EINVAL, "range \(offset)+\(length) is not page-aligned inside the region's \(region.length) bytes")
    }
    return Int(offset)..<Int(offset) + n
}

@_cdecl("hmm_region_allocate")
public func hmmRegionAllocate(
    _ handle: OpaquePointer?, _ length: UInt64, _ prot: Int32, _ huge: Int32, _ populate: Int32,
    _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "region")
        let (space, id) = try HandleTable.shared.lookup(handle, .space, as: NativeSpace.self)
        let n = try pageCount(length, "region length")
        let p = try protection(prot)
        guard (-1...1).contains(huge) else { throw CError(EINVAL, "huge_pages must be -1, 0 or 1, got \(huge)") }
        let region = try engine { () throws(HMMError) in
            try space.allocate(length: n, protection: p, hugePages: huge < 0 ? nil : huge == 1, populate: populate != 0)
        }
        out.pointee = HandleTable.shared.handle(for: region, .region, parents: [id])
    }
}

@_cdecl("hmm_region_adopt")
public func hmmRegionAdopt(
    _ handle: OpaquePointer?, _ address: UInt64, _ length: UInt64, _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "region")
        let (space, id) = try HandleTable.shared.lookup(handle, .space, as: NativeSpace.self)
        let n = try pageCount(length, "region length")
        let region = try engine { () throws(HMMError) in try space.adopt(address: address, length: n) }
        out.pointee = HandleTable.shared.handle(for: region, .region, parents: [id])
    }
}

@_cdecl("hmm_region_range")
public func hmmRegionRange(_ handle: OpaquePointer?, _ address: UnsafeMutablePointer<UInt64>?, _ length: UnsafeMutablePointer<UInt64>?) -> Int32 {
    cCall { () throws(CError) in
        let a = try output(address, "address")
        let l = try output(length, "length")
        let (region, _) = try HandleTable.shared.lookup(handle, .region, as: NativeRegion.self)
        a.pointee = region.address
        l.pointee = UInt64(region.length)
    }
}

@_cdecl("hmm_region_protect")
public func hmmRegionProtect(_ handle: OpaquePointer?, _ offset: UInt64, _ length: UInt64, _ prot: Int32) -> Int32 {
    cCall { () throws(CError) in
        let (region, _) = try HandleTable.shared.lookup(handle, .region, as: NativeRegion.self)
        let r = try regionRange(region, offset, length)
        let p = try protection(prot)
        try engine { () throws(HMMError) in try region.protect(r, p) }
    }
}

@_cdecl("hmm_region_advise_huge")
public func hmmRegionAdviseHuge(_ handle: OpaquePointer?, _ offset: UInt64, _ length: UInt64, _ huge: Int32) -> Int32 {
    cCall { () throws(CError) in
        let (region, _) = try HandleTable.shared.lookup(handle, .region, as: NativeRegion.self)
        let r = try regionRange(region, offset, length)
        guard huge == 0 || huge == 1 else { throw CError(EINVAL, "huge must be 0 or 1, got \(huge)") }
        try engine { () throws(HMMError) in try region.advise(r, hugePages: huge == 1) }
    }
}

@_cdecl("hmm_region_residency")
public func hmmRegionResidency(_ handle: OpaquePointer?, _ offset: UInt64, _ length: UInt64, _ out: UnsafeMutablePointer<UInt8>?) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "residency")
        let (region, _) = try HandleTable.shared.lookup(handle, .region, as: NativeRegion.self)
        let r = try regionRange(region, offset, length)
        let pages = try engine { () throws(HMMError) in try region.residency(r) }
        for (i, page) in pages.enumerated() {
            let v: hmm_residency
            switch page {
            case .untouched: v = HMM_RESIDENCY_UNTOUCHED
            case .host(let huge, let zero): v = zero ? HMM_RESIDENCY_ZERO_PAGE : huge ? HMM_RESIDENCY_HOST_HUGE : HMM_RESIDENCY_HOST
            case .device: v = HMM_RESIDENCY_DEVICE_PRIVATE
            case .coherent: v = HMM_RESIDENCY_DEVICE_COHERENT
            case .exclusive: v = HMM_RESIDENCY_EXCLUSIVE
            case .revoked: v = HMM_RESIDENCY_REVOKED
            case .unmapped: v = HMM_RESIDENCY_UNMAPPED
            }
            out[i] = UInt8(v.rawValue)
        }
    }
}

@_cdecl("hmm_region_free")
public func hmmRegionFree(_ handle: OpaquePointer?) -> Int32 {
    cCall { () throws(CError) in
        let (region, id) = try HandleTable.shared.lookup(handle, .region, as: NativeRegion.self)
        HandleTable.shared.remove(id)
        region.free()
    }
}
