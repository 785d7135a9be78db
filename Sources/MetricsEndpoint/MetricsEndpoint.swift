import NIOCore
import NIOHTTP1
import NIOPosix

/// Serves `GET /metrics` in Prometheus's text format over HTTP/1.1, with
/// SwiftNIO on one thread of its own, so that a scrape never runs on a
/// data plane's or the control loop's thread. What to send comes from
/// `collect`, which may answer later and from any thread (the daemon
/// gathers its devices' counters on its control loop first).
public final class MetricsEndpoint: Sendable {
    /// Calls its argument once with the exposition text.
    public typealias Collect = @Sendable (_ reply: @escaping @Sendable ([UInt8]) -> Void) -> Void

    private let group: MultiThreadedEventLoopGroup
    private let channel: any Channel
    /// The address bound, as HOST:PORT (the port the kernel chose for port 0).
    public let boundAddress: String

    /// Listens on `host`:`port`. Throws what binding throws (a port in
    /// use, an address this host does not have).
    public init(host: String, port: Int, collect: @escaping Collect) throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            channel = try ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 16)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                        try channel.pipeline.syncOperations.addHandler(MetricsRequestHandler(collect: collect))
                    }
                }
                .bind(host: host, port: port)
                .wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw error
        }
        let local = channel.localAddress
        boundAddress = (local?.ipAddress.map { $0.contains(":") ? "[\($0)]" : $0 } ?? host) + ":\(local?.port ?? port)"
    }

    /// Stops listening and lets the thread go.
    public func close() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}

/// One connection's requests, answered in order: /metrics (GET or HEAD),
/// 404 for any other path, 405 for any other method.
private final class MetricsRequestHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let collect: MetricsEndpoint.Collect
    private var head: HTTPRequestHead?

    init(collect: @escaping MetricsEndpoint.Collect) { self.collect = collect }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            head = nil
            answer(h, context: context)
        }
    }

    private func answer(_ request: HTTPRequestHead, context: ChannelHandlerContext) {
        let path = request.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? request.uri
        guard path == "/metrics" else { return respond(.notFound, Array("not found: try /metrics\n".utf8), request, context) }
        guard request.method == .GET || request.method == .HEAD else {
            return respond(.methodNotAllowed, Array("GET or HEAD\n".utf8), request, context)
        }
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        collect { body in
            bound.eventLoop.execute {
                let (handler, context) = bound.value
                handler.respond(.ok, body, request, context)
            }
        }
    }

    private func respond(_ status: HTTPResponseStatus, _ body: [UInt8], _ request: HTTPRequestHead,
                         _ context: ChannelHandlerContext) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: status == .ok ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain")
        headers.add(name: "Content-Length", value: String(body.count))
        if !request.isKeepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))),
                      promise: nil)
        if request.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        }
        let keepAlive = request.isKeepAlive
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
            if !keepAlive { channel.close(promise: nil) }
        }
    }
}
