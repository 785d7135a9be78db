import Testing
import BlockStorage

@Suite struct NBDAddressTests {
    @Test(arguments: [
        ("nbd:10.0.0.5:10809", NBDAddress(transport: .tcp(host: "10.0.0.5", port: "10809"))),
        ("nbd:10.0.0.5 10809", NBDAddress(transport: .tcp(host: "10.0.0.5", port: "10809"))),
        ("nbd:storage.example 2000", NBDAddress(transport: .tcp(host: "storage.example", port: "2000"))),
        ("  nbd:host:1  ", NBDAddress(transport: .tcp(host: "host", port: "1"))),
        ("nbd:host\t65535", NBDAddress(transport: .tcp(host: "host", port: "65535"))),
        ("nbd:host", NBDAddress(transport: .tcp(host: "host", port: "10809"))),
        ("nbd:[::1]:2000", NBDAddress(transport: .tcp(host: "::1", port: "2000"))),
        ("nbd:[fe80::1] 2000", NBDAddress(transport: .tcp(host: "fe80::1", port: "2000"))),
    ])
    func xenForms(params: String, expected: NBDAddress) throws {
        #expect(try NBDAddress.parse(params) == expected)
        #expect(NBDAddress.isNBD(params.trimmingCharacters()))
    }

    /// QEMU's legacy forms: connected with the export name, not as a URI.
    @Test(arguments: [
        ("nbd:host:2000:exportname=disk", NBDAddress(transport: .tcp(host: "host", port: "2000"), exportName: "disk")),
        ("nbd:[::1]:2000:exportname=a:b", NBDAddress(transport: .tcp(host: "::1", port: "2000"), exportName: "a:b")),
        ("nbd:unix:/run/nbd.sock", NBDAddress(transport: .unix(socketPath: "/run/nbd.sock"))),
        ("nbd:unix:/run/nbd.sock:exportname=x", NBDAddress(transport: .unix(socketPath: "/run/nbd.sock"), exportName: "x")),
    ])
    func qemuForms(params: String, expected: NBDAddress) throws {
        #expect(try NBDAddress.parse(params) == expected)
    }

    @Test(arguments: [
        ("nbd://example.com:2000/disk", NBDAddress.Transport.tcp(host: "example.com", port: "2000"), "disk", false),
        ("nbd://example.com/disk", .tcp(host: "example.com", port: "10809"), "disk", false),
        ("nbd://example.com", .tcp(host: "example.com", port: "10809"), "", false),
        ("nbd://example.com/", .tcp(host: "example.com", port: "10809"), "", false),
        ("nbd://127.0.0.1:10810/a/b%20c", .tcp(host: "127.0.0.1", port: "10810"), "a/b c", false),
        ("nbd://[::1]:2000/x", .tcp(host: "::1", port: "2000"), "x", false),
        ("nbd://user@host:7/x", .tcp(host: "host", port: "7"), "x", false),
        ("nbds://host/secure?tls-certificates=/etc/pki", .tcp(host: "host", port: "10809"), "secure", true),
        ("nbd:///x", .tcp(host: "localhost", port: "10809"), "x", false),
        ("nbd+unix:///export?socket=/run/nbd.sock", .unix(socketPath: "/run/nbd.sock"), "export", false),
        ("nbd+unix://?socket=/tmp/s", .unix(socketPath: "/tmp/s"), "", false),
        ("nbd+unix:///?socket=/tmp/a%20b.sock&other=1", .unix(socketPath: "/tmp/a b.sock"), "", false),
        ("nbds+unix:///e?socket=/s", .unix(socketPath: "/s"), "e", true),
    ])
    func uris(uri: String, transport: NBDAddress.Transport, export: String, tls: Bool) throws {
        let address = try NBDAddress.parse(uri)
        #expect(address == NBDAddress(transport: transport, exportName: export, tls: tls, uri: uri))
        #expect(address.description == uri)
        #expect(NBDAddress.isNBD(uri))
    }

    @Test(arguments: [
        "", "nbd:", "nbd::10809", "nbd:host:0", "nbd:host:65536", "nbd:host:port", "nbd:host 1 2",
        "nbd:a:b:c", "nbd:[::1", "nbd:[::1]x", "nbd:/tmp/socket", "nbd:host -1",
        "http://host/x", "nbd+vsock:///x", "nbd+unix:///x", "nbd+unix://host/x?socket=/s",
        "nbd://host:99999/x", "nbd://host/%zz", "nbd://host/x?socket=/s",
        "/var/lib/xen/disk.img", "file:/x",
    ])
    func invalid(params: String) {
        #expect(throws: StorageError.self) { try NBDAddress.parse(params) }
    }

    @Test func oldFormDescribesItself() throws {
        #expect(try NBDAddress.parse("nbd:h 5").description == "nbd:h:5")
        #expect(!NBDAddress.isNBD("/dev/vg/lv"))
        #expect(!NBDAddress.isNBD("phy:/dev/vg/lv"))
    }
}

private extension String {
    func trimmingCharacters() -> String {
        String(drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
    }
}
