import Glibc

/// Private, zero-filled, page-aligned memory mapped straight from the
/// kernel and given back whole on unmap: for the large buffers a ring's
/// engine makes at connect and frees at disconnect. Taken from malloc they
/// came out of the heap once glibc had raised its mmap threshold (it does
/// after the first large free), and a daemon whose vifs reconnected again
/// and again grew its heap by fragments (28 to 60 MB in four minutes of
/// the live fuzzer). Pages never touched cost address space only.
public enum MappedPages {
    public static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// `byteCount` rounded up to whole pages.
    public static func roundedUp(_ byteCount: Int) -> Int { (byteCount + pageSize - 1) / pageSize * pageSize }

    /// Maps `byteCount` bytes (rounded up to pages); nil when the kernel refuses.
    public static func map(byteCount: Int) -> UnsafeMutableRawPointer? {
        guard let p = mmap(nil, roundedUp(byteCount), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              p != MAP_FAILED else { return nil }
        return p
    }

    /// Unmaps what `map(byteCount:)` returned for the same `byteCount`.
    public static func unmap(_ base: UnsafeMutableRawPointer, byteCount: Int) {
        munmap(base, roundedUp(byteCount))
    }
}
