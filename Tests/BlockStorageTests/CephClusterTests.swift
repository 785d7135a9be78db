import Foundation
import Glibc
import NBDTestSupport
import SystemSupport
import Testing

/// The one-node Ceph cluster the RBD storage will be tested against
/// (issue 16): it comes up from Debian's packages on 127.0.0.1, keeps an
/// image's bytes, and keeps them across an OSD killed and restarted
/// (bluestore). A machine where it cannot start fails here, loudly.
@Suite(.serialized) struct CephClusterTests {
    @Test func aClusterKeepsAnImagesBytesAcrossAnOSDCrash() throws {
        guard getuid() == 0 else { throw CephClusterError("the Ceph tests need root") }
        let cluster = try CephCluster(store: .bluestore)
        defer { cluster.stop() }
        #expect(try cluster.ceph(["health"]).contains("HEALTH_OK"))
        // Every listening socket of the cluster is on the loopback address.
        let listening = try sh(["ss", "-ltnpH"])
        for line in listening.split(separator: "\n") where line.contains("ceph-") {
            #expect(line.contains("127.0.0.1:"), "\(line)")
        }

        let source = cluster.directory + "/source.bin"
        let copy = cluster.directory + "/copy.bin"
        try sh(["dd", "if=/dev/urandom", "of=" + source, "bs=1M", "count=8", "status=none"])
        try cluster.rbd(["import", source, "\(cluster.pool)/guest"])
        #expect(try cluster.rbd(["info", "\(cluster.pool)/guest"]).contains("size 8 MiB"))
        try cluster.rbd(["export", "\(cluster.pool)/guest", copy])
        let digest = { (path: String) in try sh(["sha256sum", path]).split(separator: " ").first.map(String.init) ?? "" }
        let before = try digest(source)
        #expect(try digest(copy) == before)

        cluster.killOSD()
        try cluster.startOSD()
        try cluster.waitForOSD(deadline: MonotonicClock.seconds() + 90)
        try sh(["rm", "-f", copy])
        try cluster.rbd(["export", "\(cluster.pool)/guest", copy], timeout: 90)
        #expect(try digest(copy) == before, "the image after the OSD's restart")
    }
}
