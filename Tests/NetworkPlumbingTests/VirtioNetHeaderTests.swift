import CXenBackSupport
import NetworkPlumbing
import Testing

@Suite struct VirtioNetHeaderTests {
    @Test func layoutMatchesLinuxHeader() {
        #expect(VirtioNetHeader.size == Int(xb_sizeof_virtio_net_hdr_v1))
        #expect(VirtioNetHeader.size == Int(xb_sizeof_virtio_net_hdr_mrg_rxbuf))
        #expect(Int(xb_sizeof_virtio_net_hdr) == 10)   // what the TAP itself reads and writes
        #expect(VirtioNetHeader.Offset.flags == Int(xb_offsetof_vnet_flags))
        #expect(VirtioNetHeader.Offset.gsoType == Int(xb_offsetof_vnet_gso_type))
        #expect(VirtioNetHeader.Offset.headerLength == Int(xb_offsetof_vnet_hdr_len))
        #expect(VirtioNetHeader.Offset.gsoSize == Int(xb_offsetof_vnet_gso_size))
        #expect(VirtioNetHeader.Offset.checksumStart == Int(xb_offsetof_vnet_csum_start))
        #expect(VirtioNetHeader.Offset.checksumOffset == Int(xb_offsetof_vnet_csum_offset))
        #expect(VirtioNetHeader.Offset.numBuffers == Int(xb_offsetof_vnet_num_buffers))
        #expect(VirtioNetHeader.flagNeedsChecksum == xb_VIRTIO_NET_HDR_F_NEEDS_CSUM)
        #expect(VirtioNetHeader.flagDataValid == xb_VIRTIO_NET_HDR_F_DATA_VALID)
        #expect(VirtioNetHeader.gsoNone == xb_VIRTIO_NET_HDR_GSO_NONE)
        #expect(VirtioNetHeader.gsoTCPv4 == xb_VIRTIO_NET_HDR_GSO_TCPV4)
        #expect(VirtioNetHeader.gsoUDP == xb_VIRTIO_NET_HDR_GSO_UDP)
        #expect(VirtioNetHeader.gsoTCPv6 == xb_VIRTIO_NET_HDR_GSO_TCPV6)
        #expect(VirtioNetHeader.gsoECN == xb_VIRTIO_NET_HDR_GSO_ECN)
    }

    @Test func encodesLittleEndianAtTheKernelsOffsets() {
        let header = VirtioNetHeader(flags: VirtioNetHeader.flagNeedsChecksum,
                                     gsoType: VirtioNetHeader.gsoTCPv6 | VirtioNetHeader.gsoECN,
                                     headerLength: 0x0102, gsoSize: 0x0304, checksumStart: 0x0506,
                                     checksumOffset: 0x0708, numBuffers: 0x090a)
        #expect(header.bytes == [0x01, 0x84, 0x02, 0x01, 0x04, 0x03, 0x06, 0x05, 0x08, 0x07, 0x0a, 0x09])
        // Decoding at an odd address (headers inside a frame buffer need not be aligned).
        var buffer = [UInt8](repeating: 0xee, count: 13)
        buffer.withUnsafeMutableBytes { header.encode(to: $0.baseAddress! + 1) }
        #expect(buffer[0] == 0xee)
        let decoded = buffer.withUnsafeBytes { VirtioNetHeader(from: $0.baseAddress! + 1) }
        #expect(decoded == header)
        #expect(buffer.withUnsafeBytes { VirtioNetHeader(bytes: UnsafeRawBufferPointer(rebasing: $0[0..<11])) } == nil)
    }
}

@Suite struct InterfaceNameTests {
    @Test(arguments: ["", "vif1234567.12345", "a/b", "vif1:0", "vif%d", "vif 1", ".", ".."])
    func refused(_ name: String) {
        #expect(throws: NetworkError.self) { try InterfaceName.validate(name) }
        // Refused before any system call: no root, no namespace needed.
        do {
            _ = try TapDevice.create(name: name)
            Issue.record("created \(name)")
        } catch {
            guard case .invalidName(let refused, let reason) = error else {
                Issue.record("\(error)")
                return
            }
            #expect(refused == name)
            #expect(!reason.isEmpty)
        }
        #expect(throws: NetworkError.self) { try NetworkInterface.createBridge(name) }
    }

    @Test func clearMessages() {
        #expect(throws: NetworkError.invalidName("", reason: "empty")) { try InterfaceName.validate("") }
        let long = "vif1234567.12345"
        #expect(throws: NetworkError.invalidName(long, reason: "16 bytes, at most 15 (IFNAMSIZ - 1)")) {
            try InterfaceName.validate(long)
        }
        #expect("\(NetworkError.invalidName(long, reason: "16 bytes, at most 15 (IFNAMSIZ - 1)"))"
            == "invalid interface name \"vif1234567.12345\": 16 bytes, at most 15 (IFNAMSIZ - 1)")
    }

    @Test(arguments: ["vif1.0", "vif32767.255", "v", "vif12345.678901"])
    func accepted(_ name: String) throws {
        try InterfaceName.validate(name)
    }

    @Test func queueCountChecked() {
        #expect(throws: NetworkError.invalidArgument("0 queues (1...256)")) { try TapDevice.create(name: "vif1.0", queues: 0) }
    }
}
