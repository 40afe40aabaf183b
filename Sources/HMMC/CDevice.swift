import CHMM
import HMM
import HMMDevices
import HMMNative
#if canImport(Glibc)
import Glibc
#endif

// hmm_device_* and hmm_mirror_*: the test_hmm dmirror driver and its open files.

/// An open mirror file and the space it mirrors.
final class MirrorHandle: @unchecked Sendable {
    let file: MirrorFile
    init(_ file: MirrorFile) { self.file = file }
}

@_cdecl("hmm_device_create")
public func hmmDeviceCreate(
    _ machineHandle: OpaquePointer?, _ minor: Int32, _ kind: Int32, _ chunkSize: UInt64, _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "device")
        let (machine, machineID) = try HandleTable.shared.lookup(machineHandle, .machine, as: Machine.self)
        guard (0...255).contains(minor) else { throw CError(EINVAL, "device minor \(minor) is not 0…255") }
        let k: PagemapKind
        switch kind {
        case Int32(HMM_DEVICE_PRIVATE.rawValue): k = .devicePrivate
        case Int32(HMM_DEVICE_COHERENT.rawValue): k = .deviceCoherent
        default: throw CError(EINVAL, "unknown device kind \(kind)")
        }
        let chunk = chunkSize == 0 ? UInt64(256 << 20) : chunkSize
        guard chunk % UInt64(PageSize.pmd) == 0, chunk <= 64 << 30 else {
            throw CError(EINVAL, "chunk size \(chunkSize) is not a multiple of 2 MiB up to 64 GiB")
        }
        let device = try engine { () throws(HMMError) in
            try MirrorDevice(machine: machine, minor: Int(minor), kind: k, chunkSize: Int(chunk))
        }
        out.pointee = HandleTable.shared.insert(device, .device, parents: [machineID])
    }
}

@_cdecl("hmm_device_destroy")
public func hmmDeviceDestroy(_ handle: OpaquePointer?) -> Int32 {
    cCall { () throws(CError) in
        let (device, id) = try HandleTable.shared.lookup(handle, .device, as: MirrorDevice.self)
        for (child, entry) in HandleTable.shared.children(of: id) {
            if let mirror = entry.object as? MirrorHandle { mirror.file.close() }
            HandleTable.shared.remove(child)
        }
        try engine { () throws(HMMError) in try device.remove() }
        HandleTable.shared.remove(id)
    }
}

@_cdecl("hmm_mirror_open")
public func hmmMirrorOpen(_ deviceHandle: OpaquePointer?, _ spaceHandle: OpaquePointer?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    cCall { () throws(CError) in
        let out = try output(out, "mirror")
        let (device, deviceID) = try HandleTable.shared.lookup(deviceHandle, .device, as: MirrorDevice.self)
        let (space, spaceID) = try HandleTable.shared.lookup(spaceHandle, .space, as: NativeSpace.self)
        guard device.machine === space.machine else { throw CError(EINVAL, "the device and the space belong to different machines") }
        let file = try engine { () throws(HMMError) in try device.open(space) }
        out.pointee = HandleTable.shared.insert(MirrorHandle(file), .mirror, parents: [deviceID, spaceID])
    }
}

@_cdecl("hmm_mirror_close")
public func hmmMirrorClose(_ handle: OpaquePointer?) -> Int32 {
    cCall { () throws(CError) in
        let (mirror, id) = try HandleTable.shared.lookup(handle, .mirror, as: MirrorHandle.self)
        HandleTable.shared.remove(id)
        mirror.file.close()
    }
}

/// A mirror command's common part: the file, the checked page count and the buffer of `pages` pages.
private func command(
    _ handle: OpaquePointer?, _ pages: UInt64, _ buffer: UnsafeRawPointer?, bytesPerPage: Int = PageSize.base,
    optional: Bool = false
) throws(CError) -> (MirrorFile, Int, Int) {
    let (mirror, _) = try HandleTable.shared.lookup(handle, .mirror, as: MirrorHandle.self)
    guard pages > 0, pages <= 1 << 34 else { throw CError(EINVAL, "page count \(pages) out of range") }
    if buffer == nil && !optional { throw CError(EINVAL, "buffer is NULL") }
    return (mirror.file, Int(pages), Int(pages) * bytesPerPage)
}

private func store(_ r: MirrorResult, _ out: UnsafeMutablePointer<hmm_mirror_result>?) {
    out?.pointee = hmm_mirror_result(cpages: UInt64(r.cpages), faults: UInt64(r.faults))
}

@_cdecl("hmm_mirror_read")
public func hmmMirrorRead(
    _ handle: OpaquePointer?, _ address: UInt64, _ pages: UInt64, _ buffer: UnsafeMutableRawPointer?,
    _ result: UnsafeMutablePointer<hmm_mirror_result>?
) -> Int32 {
    cCall { () throws(CError) in
        let (file, n, bytes) = try command(handle, pages, buffer)
        let r = try engine { () throws(HMMError) in
            try file.read(address, pages: n, into: UnsafeMutableRawBufferPointer(start: buffer, count: bytes))
        }
        store(r, result)
    }
}

@_cdecl("hmm_mirror_write")
public func hmmMirrorWrite(
    _ handle: OpaquePointer?, _ address: UInt64, _ pages: UInt64, _ buffer: UnsafeRawPointer?,
    _ result: UnsafeMutablePointer<hmm_mirror_result>?
) -> Int32 {
    cCall { () throws(CError) in
        let (file, n, bytes) = try command(handle, pages, buffer)
        let r = try engine { () throws(HMMError) in
            try file.write(address, pages: n, from: UnsafeRawBufferPointer(start: buffer, count: bytes))
        }
        store(r, result)
    }
}

@_cdecl("hmm_mirror_migrate_to_device")
public func hmmMirrorMigrateToDevice(
    _ handle: OpaquePointer?, _ address: UInt64, _ pages: UInt64, _ buffer: UnsafeMutableRawPointer?,
    _ result: UnsafeMutablePointer<hmm_mirror_result>?
) -> Int32 {
    cCall { () throws(CError) in
        let (file, n, bytes) = try command(handle, pages, buffer, optional: true)
        let r = try engine { () throws(HMMError) in
            try file.migrateToDevice(address, pages: n, into: buffer.map { UnsafeMutableRawBufferPointer(start: $0, count: bytes) })
        }
        store(r, result)
    }
}

@_cdecl("hmm_mirror_migrate_to_system")
public func hmmMirrorMigrateToSystem(
    _ handle: OpaquePointer?, _ address: UInt64, _ pages: UInt64, _ result: UnsafeMutablePointer<hmm_mirror_result>?
) -> Int32 {
    cCall { () throws(CError) in
        let (file, n, _) = try command(handle, pages, nil, optional: true)
        let r = try engine { () throws(HMMError) in try file.migrateToSystem(address, pages: n) }
        store(r, result)
    }
}

@_cdecl("hmm_mirror_snapshot")
public func hmmMirrorSnapshot(
    _ handle: OpaquePointer?, _ address: UInt64, _ pages: UInt64, _ out: UnsafeMutablePointer<UInt8>?,
    _ result: UnsafeMutablePointer<hmm_mirror_result>?
) -> Int32 {
    cCall { () throws(CError) in
        let (file, n, bytes) = try command(handle, pages, out, bytesPerPage: 1)
        let r = try engine { () throws(HMMError) in
            try file.snapshot(address, pages: n, into: UnsafeMutableRawBufferPointer(start: out, count: bytes))
        }
        store(r, result)
    }
}

@_cdecl("hmm_mirror_exclusive")
public func hmmMirrorExclusive(
    _ handle: OpaquePointer?, _ address: UInt64, _ pages: UInt64, _ buffer: UnsafeMutableRawPointer?,
    _ result: UnsafeMutablePointer<hmm_mirror_result>?
) -> Int32 {
    cCall { () throws(CError) in
        let (file, n, bytes) = try command(handle, pages, buffer)
        let r = try engine { () throws(HMMError) in
            try file.makeExclusive(address, pages: n, into: UnsafeMutableRawBufferPointer(start: buffer, count: bytes))
        }
        store(r, result)
    }
}

@_cdecl("hmm_mirror_check_exclusive")
public func hmmMirrorCheckExclusive(_ handle: OpaquePointer?, _ address: UInt64, _ pages: UInt64) -> Int32 {
    cCall { () throws(CError) in
        let (file, n, _) = try command(handle, pages, nil, optional: true)
        try engine { () throws(HMMError) in try file.checkExclusive(address, pages: n) }
    }
}

@_cdecl("hmm_mirror_release")
public func hmmMirrorRelease(_ handle: OpaquePointer?) -> Int32 {
    cCall { () throws(CError) in
        let (mirror, _) = try HandleTable.shared.lookup(handle, .mirror, as: MirrorHandle.self)
        try engine { () throws(HMMError) in try mirror.file.release() }
    }
}
