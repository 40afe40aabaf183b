import Testing
@testable import HMM

/// `MemoryFile.truncate` (`ftruncate`): what mappings see when a file shrinks under them.
@Suite("ftruncate")
struct TruncateTests {
    @Test("shrinking unmaps the pages past the end — shared and private copies — and a later access is SIGBUS")
    func shrinkUnderMappings() throws {
        try withMachine { m in
            let free = m.freeFrames
            let file = try m.makeFile(size: 0)
            try file.write([UInt8](repeating: 0xAB, count: 4 * Int(page)), at: 0)
            let s = try m.makeAddressSpace()
            let shared = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.shared], file: file)
            let priv = try s.map(length: 4 * Int(page), protection: [.read, .write], flags: [.private], file: file)
            #expect(try s.load(UInt8.self, at: shared + 3 * page) == 0xAB)
            try s.store(UInt8(0xCD), at: priv + 3 * page)  // a private copy-on-write copy
            #expect(try s.load(UInt8.self, at: priv + 2 * page) == 0xAB)
            try file.truncate(to: 2 * Int(page) + 100)
            #expect(file.size == 2 * Int(page) + 100 && file.cachedPages == 3)
            #expect(try !s.pagemap(at: priv + 3 * page).present, "the private copy past the end was unmapped")
            expectError(.bus) { try s.load(UInt8.self, at: shared + 3 * page) }
            expectError(.bus) { try s.load(UInt8.self, at: priv + 3 * page) }
            // The page the file ends in stays, its tail zeroed; within the size the data is intact.
            #expect(try s.load(UInt8.self, at: shared + 2 * page + 99) == 0xAB)
            #expect(try s.load(UInt8.self, at: shared + 2 * page + 100) == 0)
            try m.checkInvariants()
            // Growing again: the old tail and the new pages read as zero.
            try file.truncate(to: 4 * Int(page))
            #expect(try s.load(UInt8.self, at: shared + 3 * page) == 0)
            var back = [UInt8](repeating: 1, count: 8)
            _ = try back.withUnsafeMutableBytes { try file.read(into: $0, at: 2 * Int(page) + 96) }
            #expect(back == [0xAB, 0xAB, 0xAB, 0xAB, 0, 0, 0, 0])
            expectError(.invalidArgument) { try file.truncate(to: -1) }
            s.exit()
            try file.truncate(to: 0)
            #expect(file.cachedPages == 0 && m.freeFrames == free)
        }
    }
}
