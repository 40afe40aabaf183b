#if canImport(Glibc)
import Glibc
#endif

/// Pool pages of a ``P2PProvider`` that a real process maps (`p2pmem_alloc_mmap` on the native
/// engine, ``P2PProvider/mapIntoHost(pages:space:)``).
///
/// The bytes live in a shared-memory file of their own. The file is mapped over the pool's frames in
/// the machine, so a peer's DMA (``Pagemap/bytes(of:)``) and the process's loads and stores reach the
/// same bytes, and `MAP_SHARED` into the process, which `fork` shares as the kernel shares a `p2pmem`
/// VMA. The file plays the part of the provider's inode: unbind truncates it to zero bytes, which
/// removes its pages from every process that maps it — the owner and any forked child — as
/// `unmap_mapping_range` does. A later touch is then `SIGBUS` (past the end of the file) and a system
/// call that reaches the range fails with `EFAULT`; the mappings themselves stay, as the kernel's
/// VMAs do.
///
/// Each page holds one frame reference (the kernel's page-table entry's). The owner's unmap gives it
/// back (``P2PProvider/releaseHostPages(_:_:)``): the machine's view of the frame gets fresh memory, the
/// file's copy is freed, and the frame goes back to the pool after its grace period (``Epoch``). A
/// mapping a forked child may still reach, or one whose unmap the engine can no longer see (its space
/// closed), is *detached*: it keeps its frames until unbind, so a frame is never handed to anyone else
/// while a process can still reach it.
///
/// Guarded by the provider's host-mapping lock (``P2PHostMappings``).
@_spi(Engine)
public final class P2PHostMemory: @unchecked Sendable {
    public let provider: P2PProvider
    /// The first of ``pages`` contiguous pool frames.
    public let first: PFN
    public let pages: Int
    /// The shared-memory file to map (`MAP_SHARED`, offset 0, ``pages`` pages); -1 once closed.
    public fileprivate(set) var descriptor: Int32
    /// The event space id of the process that mapped it.
    public let space: Int
    /// Which pages still hold their frame.
    fileprivate var held: [Bool]
    fileprivate var heldCount: Int
    /// Kept until unbind (shared with a child, or its owner closed).
    fileprivate var detached = false
    fileprivate var revoked = false

    fileprivate init(provider: P2PProvider, first: PFN, pages: Int, descriptor: Int32, space: Int) {
        self.provider = provider
        self.first = first
        self.pages = pages
        self.descriptor = descriptor
        self.space = space
        held = Array(repeating: false, count: pages)
        heldCount = 0
    }

    /// Frames still held.
    public var heldPages: Int { provider.hostMappings.lock.withLock { _ in heldCount } }

    /// Whether it keeps its frames until unbind (a `fork` may have shared it, or its owner closed).
    public var isDetached: Bool { provider.hostMappings.lock.withLock { _ in detached } }

    /// Whether unbind revoked it (its file is gone).
    public var isRevoked: Bool { provider.hostMappings.lock.withLock { _ in revoked } }

    deinit { if descriptor >= 0 { close(descriptor) } }

    fileprivate var bytes: Int { pages << PageSize.shift }

    /// Puts fresh anonymous memory behind the machine's view of page `i` onwards (`count` pages) and
    /// drops their frame references. False, with nothing dropped, if the host refused the remapping
    /// (the frames stay held: the pool never gets a frame whose bytes are still the file's).
    fileprivate func dropFrames(_ i: Int, _ count: Int) -> Bool {
        let machine = provider.machine
        let p = mmap(machine.pointer(first + i), count << PageSize.shift, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
        guard p != MAP_FAILED else { return false }
        for j in i..<i + count where held[j] {
            held[j] = false
            heldCount -= 1
            machine.putFolio(first + j)
        }
        return true
    }
}

/// A provider's host mappings, and their frame references for the invariant checker.
///
/// Lock order: this lock, then the provider's state lock (a leaf), then the epoch's.
final class P2PHostMappings: FrameReferenceHolder, @unchecked Sendable {
    let lock = Locked<[P2PHostMemory]>([])

    func forEachHeldReference(_ body: (PFN) -> Void) {
        lock.withLock { list in
            for m in list { for i in 0..<m.pages where m.held[i] { body(m.first + i) } }
        }
    }

    /// P2PDMA memory never migrates: nothing to bring back.
    func evictFrames(in range: Range<UInt64>) {}
}

@_spi(Engine)
extension P2PProvider {
    /// Allocates `pages` contiguous pages from the pool for a real process to map (the first half of
    /// `p2pmem_alloc_mmap`): zeroed, each holding one frame reference, backed by a fresh shared-memory
    /// file the caller maps `MAP_SHARED` at offset 0 (``P2PHostMemory/descriptor``). `space` names the
    /// process in events.
    /// - Throws: `.invalidArgument` (`pages` out of range), `.noDevice` (unbinding or removed),
    ///   `.outOfMemory` (no contiguous room in the pool, or the host refused the file or its mapping;
    ///   nothing is taken then).
    /// Takes the host-mapping lock, then the provider's state lock.
    public func mapIntoHost(pages: Int, space: Int) throws(HMMError) -> P2PHostMemory {
        guard pages > 0, pages <= 1 << 28 else { throw .invalid("p2pmem mapping of \(pages) pages") }
        let bytes = pages << PageSize.shift
        let fd = try Arena.sharedMemoryFile(byteCount: bytes, what: "a p2pmem mapping of \(self)")
        return try hostMappings.lock.withLock { (list: inout [P2PHostMemory]) throws(HMMError) -> P2PHostMemory in
            // Unbind clears `live` before it takes this lock: a mapping made here is one it revokes.
            let first: PFN
            do throws(HMMError) { first = try takePages(pages, forKernel: false) } catch {
                close(fd)
                throw error
            }
            let memory = P2PHostMemory(provider: self, first: first, pages: pages, descriptor: fd, space: space)
            guard let pm = machine.pagemap(of: first),
                mmap(machine.pointer(first), bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) != MAP_FAILED
            else {
                returnPages(first, pages)
                throw HMMError(.outOfMemory, "cannot map \(bytes) bytes of shared memory over \(self)'s frames")
            }
            for i in 0..<pages {
                do throws(HMMError) { try pm.initFolio(first + i, order: 0) } catch {
                    // A pool page in use, or the pagemap gone: give back what was taken, map nothing.
                    _ = memory.dropFrames(0, pages)
                    returnPages(first + i, pages - i)
                    throw error
                }
                machine.frames.unlock(first + i)
                memory.held[i] = true
                memory.heldCount += 1
            }
            list.append(memory)
            machine.statistics.count(.p2pPagesMapped, pages)
            return memory
        }
    }

    /// The owner unmapped pages `range` of `memory` (`munmap` through the engine): unless the memory
    /// is detached, their frames go back to the pool after their grace period and the file's copy is
    /// freed. Nothing for pages already given back or revoked.
    /// Takes the host-mapping lock.
    public func releaseHostPages(_ memory: P2PHostMemory, _ range: Range<Int>) {
        hostMappings.lock.withLock { list in
            let r = range.clamped(to: 0..<memory.pages)
            guard !memory.detached, !r.isEmpty, memory.descriptor >= 0 else { return }
            // Free the file's copy through the machine's view of it (`MADV_REMOVE` punches the file).
            _ = madvise(machine.pointer(memory.first + r.lowerBound), r.count << PageSize.shift, MADV_REMOVE)
            guard memory.dropFrames(r.lowerBound, r.count) else { return }
            if memory.heldCount == 0 {
                close(memory.descriptor)
                memory.descriptor = -1
                list.removeAll { $0 === memory }
            }
        }
    }

    /// `memory` may now be reached where its owner cannot see the unmap (a forked child, a closed
    /// space): it keeps its frames until unbind revokes it. Takes the host-mapping lock.
    public func detachHostMemory(_ memory: P2PHostMemory) {
        hostMappings.lock.withLock { _ in memory.detached = true }
    }

    /// Unbind's revocation of every host mapping (`unmap_mapping_range` of the provider's inode): the
    /// machine's view of each frame gets fresh memory, then each file is truncated to nothing — every
    /// process mapping it gets `SIGBUS` on a touch and `EFAULT` from a system call — and closed, and the
    /// frames are dropped (back to the pool after their grace period). Returns the number of mappings
    /// revoked per event space. Takes the host-mapping lock.
    func revokeHostMappings() -> [Int: Int] {
        hostMappings.lock.withLock { list in
            var revoked: [Int: Int] = [:]
            var kept: [P2PHostMemory] = []
            for m in list {
                guard m.descriptor >= 0 else { continue }
                // The machine's view first: a peer's DMA meanwhile reaches fresh memory, never a hole.
                guard m.dropFrames(0, m.pages) else {
                    kept.append(m)
                    continue
                }
                _ = ftruncate(m.descriptor, 0)
                close(m.descriptor)
                m.descriptor = -1
                m.revoked = true
                revoked[m.space, default: 0] += 1
            }
            list = kept
            return revoked
        }
    }
}
