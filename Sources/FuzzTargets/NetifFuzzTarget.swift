import EngineDoubles
import Hypervisor
import NetBackend
import NetworkPlumbing
import XenABI
import XenRing

/// The netif fuzz program: the bytes are a hostile netfront's actions
/// against one `NetQueueEngine` over an in-memory guest and TAP (slots of
/// any shape, producer indices anywhere, grants revoked or made read-only
/// between steps, frames of any size from the TAP, a full TAP, virtual
/// time, stop anywhere). `NetifFuzzChecker` checks the invariants after
/// every step.
public enum NetifFuzzTarget: FuzzTarget {
    public static let name = "netif"

    /// One action per opcode byte (the byte modulo the count).
    public enum Action: UInt8, CaseIterable, Sendable {
        case txRequest, txExtra, txPacket, txPush, txProducer
        case rxRequest, rxBuffers, rxPush, rxProducer
        case grant, revoke, readOnly, writePage, writeHeaders
        case tapFrame, tapFull, tapError
        case kick, tick, tapReadable, advanceTime, stop
        /// The guest revokes a grant while the engine copies (after it took the slot).
        case revokeDuringCopy
        /// Requests on the control ring (the hash settings), answered at once.
        case control
    }

    /// At most this many actions per run (longer inputs are cut).
    static let maxActions = 256

    public static func run(_ input: UnsafeRawBufferPointer) -> [String] {
        NetifFuzzWorld.withWorld { world in
            var bytes = FuzzBytes(input)
            let program = NetifFuzzProgram(world: world, setup: &bytes)
            var actions = 0
            while !bytes.isEmpty && actions < maxActions && program.checker.findings.isEmpty {
                let op = bytes.u8()
                program.perform(Action(rawValue: op % UInt8(Action.allCases.count))!, &bytes)
                actions += 1
            }
            if program.checker.findings.isEmpty { program.finish() }
            return program.checker.findings
        }
    }
}

/// The fuzzer's bytes, read front to back; zeros past the end.
struct FuzzBytes {
    private let bytes: UnsafeRawBufferPointer
    private var next = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    var isEmpty: Bool { next >= bytes.count }

    mutating func u8() -> UInt8 {
        guard next < bytes.count else { return 0 }
        defer { next += 1 }
        return bytes[next]
    }

    mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    mutating func bool() -> Bool { u8() & 1 != 0 }

    /// A length biased towards the edges that matter to netif.
    mutating func size() -> Int {
        switch u8() & 7 {
        case 0: 14 + Int(u8())
        case 1: 60
        case 2: 1514
        case 3: 4096 - Int(u8() & 63)
        case 4: Int(u16())
        case 5: 65_535
        case 6: Int(u8() & 15)
        default: 4096 * Int(1 + u8() & 15) + Int(u8())
        }
    }

    /// A page offset biased towards 0 and the page's end.
    mutating func offset() -> UInt16 {
        switch u8() & 3 {
        case 0: 0
        case 1: u16() & 4095
        case 2: 4096 &- UInt16(u8())
        default: u16()
        }
    }
}
