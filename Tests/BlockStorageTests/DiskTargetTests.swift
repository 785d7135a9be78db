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
        ("disk.img", "params 'disk.img' is neither an absolute path nor an NBD export"),
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
