import Glibc

/// The blkif ring-protocol fuzz target: the input is a program for a
/// hostile frontend on ring A and a correct one on ring B (see
/// BlkifFuzzWorld.perform for the actions), run against fresh VbdEngines
/// on in-memory guests and disks, with the invariants of BlkifFuzzRing
/// checked after every step.
public enum BlkifFuzzTarget: FuzzTarget {
    public static let name = "blkif"

    public static func run(_ input: UnsafeRawBufferPointer) -> [String] {
        var bytes = BlkifProgramBytes(input)
        let configuration = BlkifFuzzConfiguration.decode(&bytes)
        let world = worlds.take(queueDepth: configuration.queueDepth)
        defer { worlds.put(world) }
        world.begin(configuration)
        world.run(&bytes)
        return world.findings.items
    }

    private static let worlds = WorldPool()
}

/// Worlds kept between runs (guests, disks, checker buffers), one per
/// storage queue depth in use; a run takes one and gives it back, so runs
/// on several threads (parallel tests) never share one.
private final class WorldPool: @unchecked Sendable {   // every access under `lock`
    private var lock = pthread_mutex_t()
    private var free: [Int: [BlkifFuzzWorld]] = [:]

    init() { pthread_mutex_init(&lock, nil) }

    func take(queueDepth: Int) -> BlkifFuzzWorld {
        pthread_mutex_lock(&lock)
        let world = free[queueDepth]?.popLast()
        pthread_mutex_unlock(&lock)
        return world ?? BlkifFuzzWorld(queueDepth: queueDepth)
    }

    func put(_ world: BlkifFuzzWorld) {
        pthread_mutex_lock(&lock)
        free[world.a.disk.queueDepth, default: []].append(world)
        pthread_mutex_unlock(&lock)
    }
}
