import Foundation
import Testing
import XenABI

/// The x86_32 blkif layout (BlkifX86_32) against Xen's own headers compiled
/// for i386: gcc -m32 checks each offset as a static assertion (syntax only,
/// freestanding, so no 32-bit C library is needed).
@Suite("the x86_32 blkif layout against Xen's headers compiled with -m32")
struct X86_32LayoutTests {
    static var assertions: [String] {
        typealias R = BlkifX86_32.Request
        typealias D = BlkifX86_32.Discard
        typealias I = BlkifX86_32.Indirect
        var lines: [(String, Int)] = [
            ("sizeof(union blkif_sring_entry)", BlkifX86_32.slotSize),
            ("sizeof(struct blkif_response)", BlkifX86_32.responseSize),
            ("offsetof(struct blkif_response, id)", BlkifResponse.Offset.id),
            ("offsetof(struct blkif_response, operation)", BlkifResponse.Offset.operation),
            ("offsetof(struct blkif_response, status)", BlkifResponse.Offset.status),
            ("sizeof(struct blkif_request)", BlkifX86_32.slotSize),
            ("offsetof(struct blkif_request, operation)", R.operation),
            ("offsetof(struct blkif_request, nr_segments)", R.nrSegments),
            ("offsetof(struct blkif_request, handle)", R.handle),
            ("offsetof(struct blkif_request, id)", R.id),
            ("offsetof(struct blkif_request, sector_number)", R.sectorNumber),
            ("offsetof(struct blkif_request, seg)", R.seg),
            ("sizeof(struct blkif_request_segment)", BlkifSegment.size),
            ("offsetof(struct blkif_request_discard, id)", D.id),
            ("offsetof(struct blkif_request_discard, sector_number)", D.sectorNumber),
            ("offsetof(struct blkif_request_discard, nr_sectors)", D.nrSectors),
            ("offsetof(struct blkif_request_indirect, nr_segments)", I.nrSegments),
            ("offsetof(struct blkif_request_indirect, id)", I.id),
            ("offsetof(struct blkif_request_indirect, sector_number)", I.sectorNumber),
            ("offsetof(struct blkif_request_indirect, handle)", I.handle),
            ("offsetof(struct blkif_request_indirect, indirect_grefs)", I.indirectGrefs),
        ]
        // The number of slots a ring of 1...16 pages holds, as ring.h computes it.
        for order in 0...SharedRingLayout.maxPageOrder {
            lines.append(("__CONST_RING_SIZE(blkif, \(XenPage.size << order))",
                          SharedRingLayout.slots(pages: 1 << order, entrySize: BlkifX86_32.slotSize)))
        }
        return lines.map { "_Static_assert(\($0.0) == \($0.1), \"\($0.0) is not \($0.1)\");" }
    }

    @Test("every offset, size and ring size of BlkifX86_32 is what gcc -m32 makes of xen/io/blkif.h")
    func layoutMatchesHeaders() throws {
        let source = "#include <stddef.h>\n#include <stdint.h>\n#include <xen/io/blkif.h>\n"
            + "_Static_assert(sizeof(void *) == 4, \"not compiled for i386\");\n"
            + Self.assertions.joined(separator: "\n") + "\n"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/gcc")
        p.arguments = ["-m32", "-ffreestanding", "-fsyntax-only", "-x", "c", "-"]
        let input = Pipe(), errors = Pipe()
        p.standardInput = input
        p.standardError = errors
        try p.run()
        input.fileHandleForWriting.write(Data(source.utf8))
        try input.fileHandleForWriting.close()
        let message = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "\(message)")
        #expect(Self.assertions.count == 21 + SharedRingLayout.maxPageOrder + 1)
    }

    @Test("widen then narrow gives back the x86_32 request, for each layout")
    func widenNarrowRoundTrip() {
        let narrow = UnsafeMutableRawPointer.allocate(byteCount: BlkifX86_32.slotSize, alignment: 16)
        let wide = UnsafeMutableRawPointer.allocate(byteCount: Blkif.slotSize, alignment: 16)
        let back = UnsafeMutableRawPointer.allocate(byteCount: BlkifX86_32.slotSize, alignment: 16)
        defer { narrow.deallocate(); wide.deallocate(); back.deallocate() }
        var rng = SystemRandomNumberGenerator()
        for operation in [BlkifOperation.read, BlkifOperation.write, BlkifOperation.flushDiskCache,
                          BlkifOperation.discard, BlkifOperation.indirect] {
            for i in 0..<BlkifX86_32.slotSize { narrow.storeBytes(of: UInt8.random(in: 0...255, using: &rng), toByteOffset: i, as: UInt8.self) }
            narrow.storeBytes(of: operation, as: UInt8.self)
            BlkifX86_32.widen(narrow, into: wide)
            #expect(wide.load(as: UInt8.self) == operation)
            #expect(wide.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
                    == narrow.loadUnaligned(fromByteOffset: 4, as: UInt64.self), "id at 8 from 4")
            #expect(wide.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
                    == narrow.loadUnaligned(fromByteOffset: 12, as: UInt64.self), "sector at 16 from 12")
            BlkifX86_32.narrow(UnsafeRawPointer(wide), into: back)
            // The bytes each layout defines come back; padding comes back as 0.
            let defined: Range<Int>
            switch operation {
            case BlkifOperation.indirect: defined = 0..<(BlkifX86_32.Indirect.indirectGrefs + 32)
            case BlkifOperation.discard: defined = 0..<(BlkifX86_32.Discard.nrSectors + 8)
            default: defined = 0..<BlkifX86_32.slotSize
            }
            for i in defined where !(operation == BlkifOperation.indirect && (i == 22 || i == 23)) {
                #expect(back.load(fromByteOffset: i, as: UInt8.self) == narrow.load(fromByteOffset: i, as: UInt8.self),
                        "operation \(operation), byte \(i)")
            }
        }
    }
}
