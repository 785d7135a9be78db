// swift-tools-version: 6.1
import PackageDescription

// Module graph (docs/ARCHITECTURE.md explains each edge):
//   XenABI <- XenRing <- BlockBackend
//   Hypervisor (protocols) <- LoopbackHypervisor, LibXenStore, XenStoreClient
//   XenStoreWire <- LoopbackXenStore, XenStoreClient
//   BlockStorage <- BlockBackend <- xenbackd
//   LoopbackXenStore <- FuzzTargets <- xenbackd-fuzz (the lab side; docs/FUZZING.md)
let strict: [SwiftSetting] = [.swiftLanguageMode(.v6)]
// Data-plane modules: their classes are confined to one thread by design, so
// the runtime's dynamic exclusivity checks (a TLS lookup on every property
// access, ~20% of a ring thread's time in profiles) buy nothing there.
let dataPlane: [SwiftSetting] = strict + [.unsafeFlags(["-enforce-exclusivity=unchecked"])]

let package = Package(
    name: "xenbackd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "xenbackd", targets: ["xenbackd"]),
        .executable(name: "xenbackd-lab", targets: ["xenbackd-lab"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
    ],
    targets: [
        // C glue: barriers/atomics on shared memory, Linux constants and
        // macros that do not import into Swift (O_DIRECT, eventfd, ioctls).
        .target(name: "CXenBackSupport"),
        .systemLibrary(name: "CLibAIO", path: "Sources/CLibAIO"),
        // liburing behind an opaque handle (its headers clash with the kernel's, which swift-system imports).
        .target(name: "CLibURing", linkerSettings: [.linkedLibrary("uring")]),
        .systemLibrary(name: "CLibNBD", path: "Sources/CLibNBD", pkgConfig: "libnbd"),
        .systemLibrary(name: "CLibXenStore", path: "Sources/CLibXenStore", pkgConfig: "xenstore"),
        // librbd + librados headers (Ceph RBD images); the libraries are dlopened (LibRBD).
        .systemLibrary(name: "CLibRBD", path: "Sources/CLibRBD"),
        // libxengnttab + libxenevtchn (module map links both; the shim defines __XEN_TOOLS__).
        .systemLibrary(name: "CXenStableLibs", path: "Sources/CXenStableLibs"),

        // Threads, locks, eventfd wakeups, the monotonic clock, system calls
        // (EINTR retried, errors as swift-system's Errno with the call named): wrapped once here.
        .target(name: "SystemSupport", dependencies: [
            "CXenBackSupport", .product(name: "SystemPackage", package: "swift-system"),
        ], swiftSettings: strict),
        .target(name: "XenABI", swiftSettings: strict),
        .target(name: "XenRing", dependencies: ["XenABI", "CXenBackSupport"], swiftSettings: strict),
        .target(name: "Hypervisor", dependencies: ["XenABI"], swiftSettings: strict),
        .target(name: "XenStoreWire", dependencies: ["Hypervisor", "XenABI", "SystemSupport"], swiftSettings: strict),
        .target(name: "XenStoreClient", dependencies: ["XenStoreWire", "Hypervisor", "CXenBackSupport", "SystemSupport"], swiftSettings: strict),
        .target(name: "LibXenStore", dependencies: ["Hypervisor", "CLibXenStore"], swiftSettings: strict),
        .target(name: "LoopbackXenStore", dependencies: [
            "XenStoreWire", "Hypervisor", "CXenBackSupport", "SystemSupport",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        .target(name: "LoopbackHypervisor", dependencies: [
            "Hypervisor", "XenABI", "CXenBackSupport", "LibXenStore", "XenStoreClient", "SystemSupport",
        ], swiftSettings: dataPlane),
        // The real Xen platform: grant tables and event channels over Xen's stable libraries.
        .target(name: "XenPlatform", dependencies: ["Hypervisor", "XenABI", "LibXenStore", "CXenStableLibs", "SystemSupport"],
                swiftSettings: strict),
        .target(name: "XenBus", dependencies: [
            "Hypervisor", "XenABI", "CXenBackSupport", "SystemSupport",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        .target(name: "BlockStorage", dependencies: ["CLibAIO", "CLibURing", "CLibNBD", "CLibRBD", "CXenBackSupport", "SystemSupport"], swiftSettings: dataPlane),
        // TAP devices, bridges and interface settings for the net backend (ioctls and rtnetlink).
        .target(name: "NetworkPlumbing", dependencies: ["CLibURing", "CXenBackSupport", "SystemSupport"], swiftSettings: strict),
        .target(name: "BlockBackend", dependencies: [
            "XenABI", "XenRing", "Hypervisor", "XenBus", "BlockStorage", "CXenBackSupport", "SystemSupport",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: dataPlane),
        // The vif driver: the netif tx/rx rings moved to and from a TAP on a bridge.
        .target(name: "NetBackend", dependencies: [
            "XenABI", "XenRing", "Hypervisor", "XenBus", "NetworkPlumbing", "CXenBackSupport", "SystemSupport",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: dataPlane),
        // Our netfront for the loopback hypervisor: joins a guest's rings to a TAP in a namespace.
        .target(name: "NetFrontend", dependencies: [
            "XenABI", "XenRing", "Hypervisor", "LoopbackHypervisor", "XenBus", "NetworkPlumbing", "CXenBackSupport", "SystemSupport",
        ], swiftSettings: dataPlane),
        .target(name: "BlockFrontend", dependencies: [
            "XenABI", "XenRing", "Hypervisor", "LoopbackHypervisor", "XenBus", "CXenBackSupport", "SystemSupport",
        ], swiftSettings: dataPlane),
        // Test doubles for the thread-free engines: guest memory and grants in
        // plain memory, a storage that completes when told, vif interfaces over
        // socket pairs (tests, fuzzers).
        .target(name: "EngineDoubles", dependencies: [
            "Hypervisor", "XenABI", "XenRing", "BlockStorage", "NetworkPlumbing", "SystemSupport",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        // Everything of the loopback world in one process: xenstored, dom0's
        // backend and simulated guests (tests, benchmark).
        .target(name: "LoopbackHost", dependencies: [
            "LoopbackXenStore", "LoopbackHypervisor", "XenStoreClient", "BlockBackend", "BlockStorage",
            "BlockFrontend", "NetBackend", "NetFrontend", "NetworkPlumbing", "XenBus", "Hypervisor", "SystemSupport",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        // The daemon's face to command lines, shared by both executables:
        // the control socket's protocol and the common options.
        .target(name: "DaemonCLI", dependencies: [
            "SystemSupport",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ], swiftSettings: strict),
        // GET /metrics over HTTP with SwiftNIO, for the daemon's --metrics-listen.
        .target(name: "MetricsEndpoint", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ], swiftSettings: strict),
        // The daemon an operator installs: what runs in dom0, and nothing of the lab.
        .executableTarget(name: "xenbackd", dependencies: [
            "DaemonCLI", "SystemSupport", "BlockBackend", "BlockStorage", "LoopbackHypervisor",
            "NetBackend", "NetworkPlumbing", "LibXenStore", "XenBus", "Hypervisor", "XenPlatform", "MetricsEndpoint",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], swiftSettings: strict),
        // The lab: the loopback xenstored, simulated guests, the live fuzzer, the benchmarks.
        .executableTarget(name: "xenbackd-lab", dependencies: [
            "DaemonCLI", "LoopbackHost", "XenStoreClient", "SystemSupport",
            "BlockBackend", "BlockFrontend", "BlockStorage", "LoopbackHypervisor", "LoopbackXenStore",
            "NetBackend", "NetFrontend", "NetworkPlumbing", "LibXenStore", "XenBus", "Hypervisor",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], swiftSettings: strict),

        // Fuzz targets: programs of hostile-guest actions, checked against invariants after
        // every step. xenbackd-fuzz is libFuzzer's binary when built with -DXENBACKD_FUZZ
        // (scripts/fuzz), and the replayer of saved inputs otherwise.
        .target(name: "FuzzTargets", dependencies: [
            "BlockBackend", "BlockStorage", "EngineDoubles", "Hypervisor", "LoopbackHypervisor", "LoopbackXenStore",
            "NetBackend", "NetworkPlumbing", "SystemSupport", "XenABI", "XenBus", "XenRing", "XenStoreWire",
            .product(name: "Logging", package: "swift-log"),
        ],
        // Optimized in debug builds too: unspecialized generics in the blkif
        // target's page stamping and checks made its 20,000-program test ten times slower.
        swiftSettings: dataPlane + [.unsafeFlags(["-O"], .when(configuration: .debug))]),
        .executableTarget(name: "xenbackd-fuzz", dependencies: ["FuzzTargets"], swiftSettings: strict),

        // Compiled against Xen's own headers; the ABI tests compare it with XenABI.
        .target(name: "XenABIReference", path: "Tests/XenABIReference"),
        // A blkfront in C written from docs/loopback-hypervisor.md alone (CFrontendTests runs it).
        .executableTarget(name: "loopback-c-frontend", path: "Tests/CFrontend", linkerSettings: [.linkedLibrary("xenstore")]),
        .testTarget(name: "XenABITests", dependencies: ["XenABI", "XenABIReference"], swiftSettings: strict),
        .testTarget(name: "XenRingTests", dependencies: ["XenRing", "XenABI", "XenABIReference"], swiftSettings: strict),
        .testTarget(name: "XenStoreTests", dependencies: [
            "LoopbackXenStore", "SystemSupport", "XenStoreClient", "LibXenStore", "Hypervisor", "XenStoreWire",
        ], swiftSettings: strict),
        // Every seed and minimised finding under Tests/FuzzCorpus, replayed without the fuzzer.
        .testTarget(name: "FuzzReplayTests", dependencies: ["FuzzTargets"], swiftSettings: strict),
        .testTarget(name: "LoopbackHypervisorTests", dependencies: ["LoopbackHypervisor", "Hypervisor", "XenABI"], swiftSettings: strict),
        // docs/ARCHITECTURE.md's module table checked against this file and the imports in Sources.
        .testTarget(name: "ArchitectureTests", swiftSettings: strict),
        // Syscall's wrappers: EINTR retried (a read interrupted by signals), typed errors.
        .testTarget(name: "SystemSupportTests", dependencies: [
            "SystemSupport", .product(name: "SystemPackage", package: "swift-system"),
        ], swiftSettings: strict),
        .testTarget(name: "XenPlatformTests", dependencies: ["XenPlatform", "Hypervisor"], swiftSettings: strict),
        // The xenbus framework stepped on an in-memory xenstore, state by state, and docs' state table checked against it.
        .testTarget(name: "XenBusTests", dependencies: [
            "XenBus", "XenABI", "Hypervisor", "EngineDoubles", .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        // NBD servers for tests (nbdkit, nbd-server: started, stopped, restarted
        // and reaped by PID) and a third client of an export over libnbd.
        .target(name: "NBDTestSupport", dependencies: ["CLibNBD", "SystemSupport"], path: "Tests/NBDTestSupport", swiftSettings: strict),
        .testTarget(name: "BlockStorageTests", dependencies: ["BlockStorage", "NBDTestSupport", "CXenBackSupport"],
                    swiftSettings: strict),
        .testTarget(name: "NetworkPlumbingTests", dependencies: ["NetworkPlumbing", "SystemSupport"], swiftSettings: strict),
        // The hotplug scripts, udev rules and install scripts, run against a loopback xenstored.
        // check-disk and the daemon's opener (BlockBackend's DiskParameters) are compared with the script here.
        .testTarget(name: "HotplugScriptTests", dependencies: [
            "LoopbackXenStore", "XenStoreClient", "Hypervisor", "SystemSupport", "NBDTestSupport", "BlockStorage", "BlockBackend",
        ], swiftSettings: strict),
        .testTarget(name: "BlockBackendTests", dependencies: [
            "LoopbackHost", "SystemSupport", "NBDTestSupport", "EngineDoubles", "DaemonCLI",
            .product(name: "Prometheus", package: "swift-prometheus"),
            "BlockBackend", "BlockFrontend", "BlockStorage", "LoopbackHypervisor", "LoopbackXenStore",
            "XenStoreClient", "LibXenStore", "XenBus", "XenABI", "Hypervisor",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        // blkback's engine stepped by hand on in-memory doubles: exact responses, no threads or files.
        .testTarget(name: "BlockEngineTests", dependencies: [
            "BlockBackend", "EngineDoubles", "BlockStorage", "XenRing", "XenABI", "Hypervisor",
        ], swiftSettings: strict),
        // The fuzz programs run on fixed inputs, without the fuzzer.
        .testTarget(name: "FuzzTargetTests", dependencies: ["FuzzTargets"], swiftSettings: strict),
        // The vif queue engine stepped alone over an in-memory guest and TAP, the netif fuzz program, InMemoryInterfaces.
        .testTarget(name: "NetEngineTests", dependencies: [
            "NetBackend", "EngineDoubles", "FuzzTargets", "NetworkPlumbing", "XenRing", "XenABI", "Hypervisor",
        ], swiftSettings: strict),
            // The net backend end to end: our netfront in namespaces, TAPs, a bridge, ping and iperf3.
        .testTarget(name: "NetBackendTests", dependencies: [
            "LoopbackHost", "NetBackend", "NetFrontend", "NetworkPlumbing", "LoopbackHypervisor", "XenStoreClient",
            "XenBus", "XenABI", "XenRing", "Hypervisor", "SystemSupport", "DaemonCLI",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
    ]
)
