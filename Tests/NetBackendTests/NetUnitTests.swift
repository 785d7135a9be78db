@testable import NetBackend
import Testing

@Suite struct CreditSchedulerTests {
    @Test func parsesLibxlRate() {
        #expect(CreditScheduler.parseRate("1250000,20000")! == (1_250_000, 20_000))
        for bad in ["", "1", "1,", ",1", "0,100", "100,0", "-1,5", "1,2,3", "a,b", "10,99999999999"] {
            #expect(CreditScheduler.parseRate(bad) == nil, "\(bad)")
        }
    }

    @Test func spendsRefillsAndCapsTheBurst() {
        let ms = 1_000_000
        var c = CreditScheduler(bytesPerPeriod: 10_000, periodMicroseconds: 1000, now: 0)
        let r1 = c.consume(6000, now: 0)
        #expect(r1)
        let r2 = c.consume(6000, now: 1)
        #expect(!r2)          // 4000 left
        let r3 = c.consume(4000, now: 2)
        #expect(r3)
        let r4 = c.consume(1, now: ms - 1)
        #expect(!r4)
        let r5 = c.consume(6000, now: ms)
        #expect(r5)            // refilled at the period boundary
        #expect(c.nextRefill == 2 * ms)
        // Idle for a long time: credit carries over only up to the 128 KiB burst.
        let r6 = c.consume(131_072, now: 1000 * ms)
        #expect(r6)
        let r7 = c.consume(1, now: 1000 * ms)
        #expect(!r7)
        // A frame larger than one period's credit still goes, after saving up.
        var small = CreditScheduler(bytesPerPeriod: 1000, periodMicroseconds: 1000, now: 0)
        let r8 = small.consume(1500, now: 0)
        #expect(!r8)
        let r9 = small.consume(1500, now: ms)
        #expect(r9)
    }
}

@Suite struct PartialChecksumTests {
    /// Checked against a plain big-endian 16-bit one's-complement sum (RFC 1071), odd lengths included.
    @Test func completesLikeAReferenceSum() {
        for length in [20, 21, 64, 65, 1499, 1500] {
            var bytes = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
            let start = 4, offset = 6
            bytes[start + offset] = 0x12; bytes[start + offset + 1] = 0x34   // a "pseudo-header sum"
            var reference: UInt32 = 0
            var i = start
            while i < length {
                let hi = UInt32(bytes[i]), lo = i + 1 < length ? UInt32(bytes[i + 1]) : 0
                reference += hi << 8 | lo
                i += 2
            }
            while reference > 0xffff { reference = (reference & 0xffff) + (reference >> 16) }
            let expected = ~UInt16(reference)
            let ok = bytes.withUnsafeMutableBytes {
                PartialChecksum.complete($0.baseAddress!, length: length, start: start, offset: offset, isUDP: false)
            }
            #expect(ok)
            #expect(UInt16(bytes[start + offset]) << 8 | UInt16(bytes[start + offset + 1]) == expected, "length \(length)")
            // A receiver's check: the range with the checksum in place, plus
            // the pseudo-header sum it computes itself, sums to 0xffff.
            var verify: UInt32 = 0x1234
            i = start
            while i < length {
                let hi = UInt32(bytes[i]), lo = i + 1 < length ? UInt32(bytes[i + 1]) : 0
                verify += hi << 8 | lo
                i += 2
            }
            while verify > 0xffff { verify = (verify & 0xffff) + (verify >> 16) }
            #expect(verify == 0xffff, "length \(length)")
        }
    }

    @Test func refusesOffsetsOutsideTheFrame() {
        var bytes = [UInt8](repeating: 0, count: 40)
        let ok = bytes.withUnsafeMutableBytes {
            PartialChecksum.complete($0.baseAddress!, length: 40, start: 34, offset: 6, isUDP: true)
        }
        #expect(!ok)
    }
}
