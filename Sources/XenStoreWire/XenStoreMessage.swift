import Hypervisor
import XenABI

/// One xenstore message: the xsd_sockmsg header fields and the payload.
public struct XenStoreMessage: Equatable, Sendable {
    /// The raw xsd_sockmsg_type. Unknown values are kept so that a server can refuse them.
    public var rawType: UInt32
    public var requestID: UInt32
    public var transactionID: UInt32
    public var payload: [UInt8]

    public init(rawType: UInt32, requestID: UInt32 = 0, transactionID: UInt32 = 0, payload: [UInt8] = []) {
        self.rawType = rawType; self.requestID = requestID
        self.transactionID = transactionID; self.payload = payload
    }

    public init(_ type: XenStoreMessageType, requestID: UInt32 = 0, transactionID: UInt32 = 0, payload: [UInt8] = []) {
        self.init(rawType: type.rawValue, requestID: requestID, transactionID: transactionID, payload: payload)
    }

    /// The message type, or nil when the number is not one xs_wire.h defines.
    public var type: XenStoreMessageType? { XenStoreMessageType(rawValue: rawType) }

    public var header: XenStoreMessageHeader {
        XenStoreMessageHeader(type: rawType, reqId: requestID, txId: transactionID, len: UInt32(payload.count))
    }

    /// The 16-byte header followed by the payload, as sent on the wire.
    /// The caller keeps payloads within `XenStoreLimits.payloadMax`.
    public func encoded() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: XenStoreMessageHeader.size + payload.count)
        bytes.withUnsafeMutableBytes { raw in
            header.encode(to: raw.baseAddress!)
            if !payload.isEmpty {
                payload.withUnsafeBytes { src in
                    (raw.baseAddress! + XenStoreMessageHeader.size).copyMemory(from: src.baseAddress!, byteCount: src.count)
                }
            }
        }
        return bytes
    }
}

/// Why a byte stream cannot be split into messages any more.
public enum XenStoreFrameError: Error, Equatable, Sendable {
    /// A header announced a payload longer than XENSTORE_PAYLOAD_MAX. xenstored
    /// drops such a connection: nothing after it can be trusted to be a header.
    case payloadTooLong(UInt32)
}

/// Cuts a byte stream (a socket's input) into messages.
public struct XenStoreFrameDecoder: Sendable {
    private var buffer: [UInt8] = []
    /// Index of the first byte not yet consumed.
    private var start = 0

    public init() {}

    /// Bytes received but not yet returned as a message.
    public var bufferedByteCount: Int { buffer.count - start }

    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        buffer.append(contentsOf: bytes)
    }

    public mutating func append(contentsOf bytes: some Sequence<UInt8>) {
        buffer.append(contentsOf: bytes)
    }

    /// The next complete message; nil until enough bytes have arrived.
    public mutating func nextMessage() throws(XenStoreFrameError) -> XenStoreMessage? {
        guard bufferedByteCount >= XenStoreMessageHeader.size else { return nil }
        let header = buffer.withUnsafeBytes { XenStoreMessageHeader(decoding: $0.baseAddress! + start) }
        guard header.len <= UInt32(XenStoreLimits.payloadMax) else { throw .payloadTooLong(header.len) }
        let payloadStart = start + XenStoreMessageHeader.size
        let end = payloadStart + Int(header.len)
        guard end <= buffer.count else { return nil }
        let message = XenStoreMessage(rawType: header.type, requestID: header.reqId,
                                      transactionID: header.txId, payload: Array(buffer[payloadStart..<end]))
        start = end
        discardConsumedBytes()
        return message
    }

    /// Keeps the buffer from growing without bound while staying cheap per message.
    private mutating func discardConsumedBytes() {
        if start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
        } else if start >= 64 * 1024 {
            buffer.removeFirst(start)
            start = 0
        }
    }
}
