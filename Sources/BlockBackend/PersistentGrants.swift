import Hypervisor
import XenABI

/// blkif's persistent grants (feature-persistent): a frontend that offers
/// them reuses a fixed set of granted pages, so the backend maps each page
/// once, keeps it mapped while the ring is connected, and reads and writes
/// the guest's page directly (no copy). A fixed-size table, filled on first
/// use of each reference; when full, further references use grant copies.
struct PersistentGrants: ~Copyable {
    private let refs: UnsafeMutablePointer<GrantRef>
    private let pages: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    private let mappings: UnsafeMutablePointer<GrantMapping?>
    private let mask: Int
    let capacity: Int
    private(set) var count = 0
    private var request: [GrantRef] = [0]

    init(capacity: Int) {
        self.capacity = capacity
        var size = 8
        while size < capacity * 2 { size *= 2 }
        refs = .allocate(capacity: size)
        refs.initialize(repeating: 0, count: size)
        pages = .allocate(capacity: size)
        pages.initialize(repeating: nil, count: size)
        mappings = .allocate(capacity: capacity)
        mappings.initialize(repeating: nil, count: capacity)
        mask = size - 1
    }

    deinit {
        refs.deallocate()
        pages.deallocate()
        mappings.deallocate()
    }

    @inline(__always)
    private func home(_ ref: GrantRef) -> Int { Int(truncatingIfNeeded: UInt64(ref) &* 0x9E37_79B9_7F4A_7C15 >> 40) & mask }

    /// The mapped page of `ref`, mapping it writable on first use. Nil when
    /// the reference cannot be mapped writable (the caller falls back to a
    /// grant copy, which then reports the grant's error) or the table is full.
    @inline(__always)
    mutating func page(_ ref: GrantRef, domain: DomID, grants: any GrantTableHandle) -> UnsafeMutableRawPointer? {
        var i = home(ref)
        while let p = pages[i] {
            if refs[i] == ref { return p }
            i = (i + 1) & mask
        }
        guard count < capacity else { return nil }
        request[0] = ref
        guard let m = try? grants.map(domain: domain, refs: request, writable: true) else { return nil }
        refs[i] = ref
        pages[i] = m.address
        mappings[count] = m
        count += 1
        return m.address
    }

    /// Unmaps every page (the ring disconnects).
    mutating func unmapAll(_ grants: any GrantTableHandle) {
        for i in 0..<count {
            if let m = mappings[i] { grants.unmap(m) }
            mappings[i] = nil
        }
        for i in 0...mask { pages[i] = nil }
        count = 0
    }
}
