import Glibc
import Hypervisor
import XenABI

/// A guest's memory and grant table in plain process memory: what an engine
/// test or a fuzzer hands a data-plane engine instead of a hypervisor. The
/// test plays the guest: it writes ring slots and data pages directly, and
/// grants, revokes or write-protects pages between (or, through
/// `InMemoryGrantTable.beforeCopy`, during) the engine's steps.
public final class InMemoryGuest {
    public let domain: DomID
    public let pageCount: Int
    /// Page-aligned, `pageCount` pages; frame f is `page(f)`.
    public let memory: UnsafeMutableRawPointer
    public let grantCount: Int
    private let entries: UnsafeMutablePointer<Entry>

    struct Entry {
        var granted = false
        var readOnly = false
        var grantee: DomID = 0
        var frame: UInt32 = 0
    }

    public init(domain: DomID, pages: Int, grants: Int) {
        precondition(pages > 0 && grants > 0)
        self.domain = domain
        pageCount = pages
        grantCount = grants
        var raw: UnsafeMutableRawPointer?
        precondition(posix_memalign(&raw, XenPage.size, pages * XenPage.size) == 0, "out of memory")
        memory = raw!
        memset(memory, 0, pages * XenPage.size)
        entries = .allocate(capacity: grants)
        entries.initialize(repeating: Entry(), count: grants)
    }

    deinit {
        free(memory)
        entries.deallocate()
    }

    @inline(__always)
    public func page(_ frame: Int) -> UnsafeMutableRawPointer { memory + frame * XenPage.size }

    /// Grants `frame` to `grantee` under `ref` (replacing what `ref` granted).
    public func grant(_ ref: GrantRef, frame: Int, to grantee: DomID = 0, readOnly: Bool = false) {
        precondition(Int(ref) < grantCount && frame < pageCount)
        entries[Int(ref)] = Entry(granted: true, readOnly: readOnly, grantee: grantee, frame: UInt32(frame))
    }

    /// Ends access: later maps and copies of `ref` fail. A mapping made
    /// before stays (on Xen the guest cannot end access to a mapped grant).
    public func revoke(_ ref: GrantRef) {
        guard Int(ref) < grantCount else { return }
        entries[Int(ref)].granted = false
    }

    public func setReadOnly(_ ref: GrantRef, _ readOnly: Bool) {
        guard Int(ref) < grantCount else { return }
        entries[Int(ref)].readOnly = readOnly
    }

    /// Forgets every grant and zeroes the memory (a fuzzer reusing the guest).
    public func reset() {
        reset(zeroing: 0..<pageCount)
    }

    /// Forgets every grant and zeroes only `frames`: for a fuzzer that
    /// rewrites the other pages before each use, so a run does not pay
    /// for clearing all of them.
    public func reset(zeroing frames: Range<Int>) {
        for f in frames { memset(page(f), 0, XenPage.size) }
        entries.update(repeating: Entry(), count: grantCount)
    }

    /// Xen's checks before a map or a copy: a valid ref, granted to `grantee`,
    /// writable if asked. Returns the frame or a GNTST_ code.
    func validate(_ ref: GrantRef, grantee: DomID, write: Bool) -> (status: Int16, frame: Int) {
        guard Int(ref) < grantCount else { return (GrantStatus.badGntref, 0) }
        let e = entries[Int(ref)]
        guard e.granted, e.grantee == grantee else { return (GrantStatus.generalError, 0) }
        if write && e.readOnly { return (GrantStatus.generalError, 0) }
        return (GrantStatus.okay, Int(e.frame))
    }
}

/// `GrantTableHandle` over in-memory guests: maps return the guest's own
/// pages (so a guest that rewrites a mapped page is seen at once, as on
/// Xen), copies are memcpy after Xen's checks. It counts what is mapped so
/// a test can require that nothing is left.
public final class InMemoryGrantTable: GrantTableHandle {
    public let ownDomain: DomID
    private var guests: [InMemoryGuest]
    /// Live mappings: token -> page count.
    public private(set) var mappings: [UInt64: Int] = [:]
    private var nextToken: UInt64 = 1
    /// Copy operations performed (each one, whatever its status).
    public private(set) var copyOperations = 0
    /// Called at the start of every `copy` batch: a test or fuzzer rewrites
    /// guest memory here to play a guest racing the backend.
    public var beforeCopy: (() -> Void)?

    public init(ownDomain: DomID = 0, guests: [InMemoryGuest]) {
        self.ownDomain = ownDomain
        self.guests = guests
    }

    public var mappedPages: Int { mappings.values.reduce(0, +) }

    private func guest(_ d: DomID) -> InMemoryGuest? {
        for g in guests where g.domain == d { return g }
        return nil
    }

    /// Maps refs whose frames are consecutive in the guest's memory (rings
    /// and single data pages; the fake has no page tables to stitch others).
    public func map(domain: DomID, refs: [GrantRef], writable: Bool) throws(HypervisorError) -> GrantMapping {
        guard let g = guest(domain) else {
            throw HypervisorError("grant map", errno: ESRCH, grantStatus: GrantStatus.badDomain, detail: "dom\(domain)")
        }
        guard !refs.isEmpty else { throw HypervisorError("grant map", errno: EINVAL, detail: "no references") }
        var first = 0
        for (i, ref) in refs.enumerated() {
            let (status, frame) = g.validate(ref, grantee: ownDomain, write: writable)
            guard status == GrantStatus.okay else {
                throw HypervisorError("grant map", errno: EINVAL, grantStatus: status, detail: "dom\(domain) ref \(ref)")
            }
            if i == 0 { first = frame } else if frame != first + i {
                throw HypervisorError("grant map", errno: EINVAL, detail: "in-memory grants map consecutive frames only")
            }
        }
        let token = nextToken
        nextToken += 1
        mappings[token] = refs.count
        return GrantMapping(address: g.page(first), pageCount: refs.count, writable: writable, token: token)
    }

    public func unmap(_ mapping: GrantMapping) {
        mappings[mapping.token] = nil
    }

    public func copy(_ operations: UnsafeMutableBufferPointer<GrantCopyOperation>) {
        beforeCopy?()
        for i in operations.indices {
            copyOperations += 1
            let op = operations[i]
            guard Int(op.guestOffset) + Int(op.length) <= XenPage.size else {
                operations[i].status = GrantStatus.badCopyArg
                continue
            }
            guard let g = guest(op.domain) else {
                operations[i].status = GrantStatus.badDomain
                continue
            }
            let toGuest = op.direction == .toGuest
            let (status, frame) = g.validate(op.ref, grantee: ownDomain, write: toGuest)
            operations[i].status = status
            guard status == GrantStatus.okay else { continue }
            let bytes = g.page(frame) + Int(op.guestOffset)
            if toGuest { memcpy(bytes, op.local, Int(op.length)) } else { memcpy(op.local, bytes, Int(op.length)) }
        }
    }
}
