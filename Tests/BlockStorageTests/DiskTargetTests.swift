import Testing
@testable import BlockStorage

/// DiskTarget.parse: every form docs/hotplug.md lists, its normalised
/// spelling, and the reasons for what it refuses.
@Suite struct DiskTargetTests {
    @Test(arguments: [
        ("/var/lib/xen/guest.img", "/var/lib/xen/guest.img"),
        ("aio:/var/lib/xen/guest.img", "/var/lib/xen/guest.img"),
        ("raw:aio:file:phy:/x.img", "/x.img"),
        ("phy:/dev/vg0/guest", "/dev/vg0/guest"),
        ("/dev/mapper/vg0-guest", "/dev/mapper/vg0-guest"),
        ("//srv//./disks/a.img/", "/srv/disks/a.img"),
        ("/srv/../b.img", "/srv/../b.img"),
        ("  /padded.img \n", "/padded.img"),
        ("nbd:10.0.0.5:10809", "nbd://10.0.0.5:10809"),
        ("nbd:Storage.Example 2000", "nbd://storage.example:2000"),
        ("nbd:host", "nbd://host:10809"),
        ("nbd:[::1]:2000", "nbd://[::1]:2000"),
        ("nbd:host:2000:exportname=disk one", "nbd://host:2000/disk%20one"),
        ("nbd:unix:/run/nbd.sock", "nbd+unix:///?socket=/run/nbd.sock"),
        ("nbd:unix:/run//nbd.sock:exportname=a/b", "nbd+unix:///a/b?socket=/run/nbd.sock"),
        ("nbd://host:2000/disk", "nbd://host:2000/disk"),
        ("nbd://HOST/disk", "nbd://host:10809/disk"),
        ("nbd://user@host:7/a%20b", "nbd://host:7/a%20b"),
        ("nbd://[::1]:2000/x", "nbd://[::1]:2000/x"),
        ("nbd+unix:///disk?socket=/run/nbd.sock", "nbd+unix:///disk?socket=/run/nbd.sock"),
        ("nbds://host/secure?tls-certificates=/etc/pki/x", "nbds://host:10809/secure"),
        ("nbds+unix:///e?socket=/s&tls-psk-file=/k", "nbds+unix:///e?socket=/s"),
        ("raw:nbd:host:1", "nbd://host:1"),
        ("rbd:rbd/guest", "rbd:rbd/guest"),
        ("rbd:rbd/guest@snap1", "rbd:rbd/guest@snap1"),
        ("rbd:pool/ns/guest:id=xen:conf=/etc/ceph/ceph.conf", "rbd:pool/ns/guest"),
        ("phy:rbd:pool/guest:mon_host=10.0.0.1\\:6789", "rbd:pool/guest"),
        ("rbd:po\\:ol/a\\@b", "rbd:po\\:ol/a\\@b"),
    ])
    func normalisedForm(params: String, normalized: String) throws {
        let target = try DiskTarget.parse(params)
        #expect(target.normalized == normalized)
        #expect(target.params == params)
    }

    /// Every spelling of one export is one target.
    @Test func spellingsOfOneExportAgree() throws {
        let spellings = ["nbd:127.0.0.1:10809", "nbd:127.0.0.1 10809", "nbd:127.0.0.1", "nbd://127.0.0.1",
                         "nbd://127.0.0.1:10809/", "nbd:127.0.0.1:10809:exportname="]
        let forms = try Set(spellings.map { try DiskTarget.parse($0).normalized })
        #expect(forms == ["nbd://127.0.0.1:10809"])
        let unix = try Set(["nbd:unix:/s", "nbd+unix:///?socket=/s", "nbd+unix://?socket=//s"].map {
            try DiskTarget.parse($0).normalized
        })
        #expect(unix == ["nbd+unix:///?socket=/s"])
        // With and without TLS, one disk for a sharing check.
        #expect(DiskIdentity.keys(of: try DiskTarget.parse("nbds://h:5/x"))
            == DiskIdentity.keys(of: try DiskTarget.parse("nbd:h:5:exportname=x")))
    }

    @Test(arguments: [
        ("", "no disk target (params is empty)"),
        ("aio:", "no disk target (params is empty)"),
        ("disk.img", "params 'disk.img' is neither an absolute path, an NBD export nor an RBD image"),
        ("rbd:rbd", "malformed RBD image 'rbd:rbd': the image is named POOL/IMAGE or POOL/NAMESPACE/IMAGE"),
        ("rbd:/img", "malformed RBD image 'rbd:/img': no pool before /"),
        ("rbd:pool/", "malformed RBD image 'rbd:pool/': no image name"),
        ("rbd:a/b/c/d", "malformed RBD image 'rbd:a/b/c/d': the image is named POOL/IMAGE or POOL/NAMESPACE/IMAGE"),
        ("rbd://pool/img", "malformed RBD image 'rbd://pool/img': the image is named POOL/IMAGE or POOL/NAMESPACE/IMAGE"),
        ("rbd:p//img", "malformed RBD image 'rbd:p//img': an empty namespace"),
        ("rbd:p/img@", "malformed RBD image 'rbd:p/img@': no snapshot name after @"),
        ("rbd:p/img@a@b", "malformed RBD image 'rbd:p/img@a@b': more than one @ (a literal one is written \\@)"),
        ("rbd:p/img:conf", "malformed RBD image 'rbd:p/img:conf': option \"conf\" is not NAME=VALUE"),
        ("rbd:p/img:conf=etc/ceph.conf", "malformed RBD image 'rbd:p/img:conf=etc/ceph.conf': conf= is not an absolute path"),
        ("rbd:p/img:id=", "malformed RBD image 'rbd:p/img:id=': id= is empty"),
        ("rbd:p/img:a b=1", "malformed RBD image 'rbd:p/img:a b=1': option name \"a b\" is not a ceph setting's name"),
        ("rbd:p/img:key=SECRET:bad", "malformed RBD image 'rbd:p/img:key=<redacted>:bad': option \"bad\" is not NAME=VALUE"),
        ("nbd:host:0", "malformed NBD export 'nbd:host:0': the port must be a number from 1 to 65535"),
        ("nbd:host:port", "malformed NBD export 'nbd:host:port': the port must be a number from 1 to 65535"),
        ("nbd:a:b:c", "malformed NBD export 'nbd:a:b:c': expected HOST:PORT, HOST PORT or [IPV6]:PORT"),
        ("nbd:", "malformed NBD export 'nbd:': no host"),
        ("nbd:/tmp/socket", "malformed NBD export 'nbd:/tmp/socket': a host has no '/' (a socket is nbd:unix:PATH)"),
        ("nbd:unix:sock", "malformed NBD export 'nbd:unix:sock': nbd:unix: needs an absolute socket path"),
        ("nbd+tcp://host:1/x", "malformed NBD export 'nbd+tcp://host:1/x': nbd+tcp:// is QEMU's spelling, which libnbd does not take: write nbd://HOST:PORT/NAME"),
        ("nbd+vsock:///x", "malformed NBD export 'nbd+vsock:///x': vsock exports are not served"),
        ("nbd+unix:///x", "malformed NBD export 'nbd+unix:///x': nbd+unix:// needs ?socket=PATH"),
        ("nbd+unix://host/x?socket=/s", "malformed NBD export 'nbd+unix://host/x?socket=/s': nbd+unix:// takes no host: nbd+unix:///NAME?socket=PATH"),
        ("nbd+unix:///x?socket=rel.sock", "malformed NBD export 'nbd+unix:///x?socket=rel.sock': the socket path must be absolute"),
        ("nbd://host:99999/x", "malformed NBD export 'nbd://host:99999/x': the port must be a number from 1 to 65535"),
        ("nbd://host/%zz", "malformed NBD export 'nbd://host/%zz': a bad %-escape in the export name"),
        ("nbd://host/x?socket=/s", "malformed NBD export 'nbd://host/x?socket=/s': socket= belongs to nbd+unix:// URIs"),
        ("nbdx://host/x", "malformed NBD export 'nbdx://host/x': unknown scheme nbdx:// (nbd://, nbds://, nbd+unix://, nbds+unix://)"),
    ])
    func refusals(params: String, reason: String) {
        do {
            let target = try DiskTarget.parse(params)
            Issue.record("'\(params)' accepted as \(target.normalized)")
        } catch {
            #expect(error.description == reason)
        }
    }

    /// QEMU's rbd: form, field by field: escapes taken off, options in order,
    /// `id` without `client.`, everything else a librados setting.
    @Test func rbdFields() throws {
        let text = "rbd:pool/ns/im\\:age@sn\\@ap:id=client.xen:conf=/etc/ceph/a\\:b.conf:mon_host=10.0.0.1\\:6789:key=AQB=="
        guard case .rbd(let a) = try DiskTarget.parse(text).location else {
            Issue.record("not an RBD image")
            return
        }
        #expect(a.pool == "pool" && a.namespace == "ns" && a.image == "im:age" && a.snapshot == "sn@ap")
        #expect(a.user == "xen" && a.configPath == "/etc/ceph/a:b.conf")
        #expect(a.settings.map(\.name) == ["mon_host", "key"] && a.settings.map(\.value) == ["10.0.0.1:6789", "AQB=="])
        #expect(a.normalized == "rbd:pool/ns/im\\:age@sn\\@ap")
        #expect(a.withoutSecrets == "rbd:pool/ns/im\\:age@sn\\@ap:id=xen:conf=/etc/ceph/a\\:b.conf:mon_host=10.0.0.1\\:6789")
        // The secret never reaches a log line or status; the rest does.
        #expect(DiskTarget.redacted(text)
            == "rbd:pool/ns/im\\:age@sn\\@ap:id=client.xen:conf=/etc/ceph/a\\:b.conf:mon_host=10.0.0.1\\:6789:key=<redacted>")
        #expect(DiskTarget.redacted("aio:rbd:p/i:key=x\\:y") == "aio:rbd:p/i:key=<redacted>")
        #expect(DiskTarget.redacted("/srv/key=1.img") == "/srv/key=1.img")
        // One image for a sharing check, whoever opens it and how.
        #expect(DiskIdentity.keys(of: try DiskTarget.parse("rbd:p/i:id=a")) == DiskIdentity.keys(of: try DiskTarget.parse("rbd:p/i:conf=/c")))
        #expect(DiskIdentity.keys(of: try DiskTarget.parse("rbd:p/i")) != DiskIdentity.keys(of: try DiskTarget.parse("rbd:p/i@s")))
    }

    @Test(arguments: [
        ("/dev/vg0/guest", "vg0/guest"),
        ("phy:/dev/vg-0/lv-1", "vg-0/lv-1"),
        ("/dev/mapper/vg0-guest", "vg0/guest"),
        ("/dev/mapper/my--vg-my--lv", "my-vg/my-lv"),
        ("/dev/mapper/a----b-c", "a--b/c"),
    ])
    func logicalVolumeNames(params: String, volume: String) throws {
        #expect(try DiskTarget.parse(params).logicalVolume?.description == volume)
    }

    @Test(arguments: ["/dev/sda", "/dev/disk/by-id/x", "/var/lib/vg/lv", "/dev/mapper/nodash", "nbd:h:1"])
    func notALogicalVolume(params: String) throws {
        #expect(try DiskTarget.parse(params).logicalVolume == nil)
    }

    @Test func prefixesComeOffInAnyOrder() {
        #expect(DiskTarget.strippingFormatPrefixes("raw:aio:/x") == "/x")
        #expect(DiskTarget.strippingFormatPrefixes("phy:phy:/x") == "/x")
        #expect(DiskTarget.strippingFormatPrefixes("/x:raw:") == "/x:raw:")
    }
}
