import BlockBackend
import EngineDoubles
import Glibc
import Hypervisor
import XenABI

/// Everything one blkif program runs against: ring A (hostile frontend)
/// and ring B (a correct bystander) on one grant table, each with its own
/// guest and disk. Kept between runs (per storage queue depth) and reset
/// by `begin`; the engines are new in every run.
final class BlkifFuzzWorld {
    /// kill -9 and restart (issue 12): the new engine recovers from the
    /// ring journal (`BlkifFuzzRing.restartEngine`). Without a journal it
    /// resumed at rsp_prod and answered requests twice or never (the
    /// programs in Tests/FuzzCorpus/blkif/findings/kill-restart-*).
    static let killRestartEnabled = true

    let findings = FuzzFindings()
    let grants: InMemoryGrantTable
    let a: BlkifFuzzRing
    let b: BlkifFuzzRing
    /// A rewrite the program armed for the middle of a step (the next grant copy batch).
    private var armed: (slot: Bool, choice: UInt8, offset: Int, length: Int)?
    private let armedBytes = UnsafeMutableRawPointer.allocate(byteCount: 32, alignment: 8)
    /// BLKIF_FUZZ_TRACE set: print each action (to replay a finding by hand).
    private let trace = getenv("BLKIF_FUZZ_TRACE") != nil

    init(queueDepth: Int) {
        let guestA = InMemoryGuest(domain: 1, pages: FuzzGuestLayout.pages, grants: FuzzGuestLayout.grants)
        let guestB = InMemoryGuest(domain: 2, pages: FuzzGuestLayout.pages, grants: FuzzGuestLayout.grants)
        grants = InMemoryGrantTable(guests: [guestA, guestB])
        a = BlkifFuzzRing(name: "ring A", domain: 1, grants: grants, guest: guestA, queueDepth: queueDepth, findings: findings)
        b = BlkifFuzzRing(name: "ring B", domain: 2, grants: grants, guest: guestB, queueDepth: 4, findings: findings)
        grants.beforeCopy = { [unowned self] in self.runArmedRewrite() }
        a.trace = trace
        b.trace = trace
    }

    deinit { armedBytes.deallocate() }

    func begin(_ c: BlkifFuzzConfiguration) {
        findings.items.removeAll(keepingCapacity: true)
        findings.action = 0
        armed = nil
        a.begin(c)
        b.begin(c.bystander)
    }

    /// Runs the actions, then the end checks of both rings.
    func run(_ bytes: inout BlkifProgramBytes) {
        var action = 0
        while !bytes.isExhausted && findings.items.isEmpty && action < 2048 {
            findings.action = action
            let op = bytes.u8()
            if trace {
                print("action \(action): op \(op) A: pvt \(a.requestProducerPrivate) req_prod \(a.header(0)) rsp_prod \(a.header(8)) outstanding \(a.engine.outstanding) pending \(a.disk.pending.count) lawful \(a.lawful)")
            }
            perform(op, &bytes)
            checkMappings()
            action += 1
        }
        findings.action = action
        if trace { print("finish: A: pvt \(a.requestProducerPrivate) req_prod \(a.header(0)) rsp_prod \(a.header(8)) outstanding \(a.engine.outstanding) pending \(a.disk.pending.count) breach \(a.engine.breach ?? "-")") }
        if findings.items.isEmpty { a.finish() }
        if findings.items.isEmpty { b.finish() }
        a.end()
        b.end()
        if findings.items.isEmpty && grants.mappedPages != 0 {
            findings.report("both rings", "after drain and release nothing is mapped", "\(grants.mappedPages) pages")
        }
    }

    /// The grant table maps only the rings' persistent grants.
    private func checkMappings() {
        let persistent = a.engine.persistentlyMappedPages + b.engine.persistentlyMappedPages
        if grants.mappedPages != persistent {
            findings.report("both rings", "only persistent grants are mapped", "\(grants.mappedPages) mapped, \(persistent) persistent")
        }
    }

    // MARK: actions

    private func perform(_ op: UInt8, _ bytes: inout BlkifProgramBytes) {
        switch op {
        case 0..<48:
            let k = bytes.u8()
            let kind = FuzzRequest.Kind(rawValue: (k & 7) % 7)!
            a.writeRequest(kind, &bytes, valid: k & 0xF0 != 0xF0, avoidOverlap: false)
            if k & 0x08 != 0 {
                a.publish()
                stepA(.kicked, armIfIdle: true)
            }
        case 48..<60:
            a.writeRaw(&bytes)
        case 60..<68:
            let (choice, offset, length) = rewriteParameters(&bytes, within: Blkif.slotSize)
            a.tamperSlot(choice: choice, offset: offset, bytes: UnsafeRawBufferPointer(start: armedBytes, count: length),
                         midStep: false)
        case 68..<74:
            let (choice, offset, length) = rewriteParameters(&bytes, within: 512)
            a.tamperIndirect(choice: choice, offset: offset, bytes: UnsafeRawBufferPointer(start: armedBytes, count: length))
        case 74..<80:
            let slot = bytes.u8() & 1 == 0
            let (choice, offset, length) = rewriteParameters(&bytes, within: slot ? Blkif.slotSize : 512)
            armed = (slot, choice, offset, length)
        case 80..<100:
            a.publish()
        case 100..<104:
            a.publishAnywhere(mode: bytes.u8(), value: bytes.u32())
        case 104..<107:
            a.setEvents(requestEvent: bytes.u32(), responseEvent: bytes.u32())
        case 107..<135:
            let k = bytes.u8()
            stepA(k & 1 == 0 ? .kicked : .storageReady, armIfIdle: k & 2 == 0)
        case 135..<140:
            a.pollForWork()
        case 140..<150:
            a.changeGrant(choice: bytes.u8(), mode: bytes.u8())
        case 150..<175:
            complete(a, &bytes, errors: true)
            stepA(.storageReady, armIfIdle: true)
        case 175..<178:
            a.stopped = true
            if a.engine.requestsToReplay > 0 { a.leftInJournal = true }
            stepA(.stop, armIfIdle: true)
        case 178..<180:
            if Self.killRestartEnabled {
                let n = bytes.u8()
                let completing = { (disk: InMemoryStorage) in
                    for _ in 0..<min(Int(n) % 4, disk.pending.count) { disk.complete(0) }
                }
                if n & 0xF0 == 0xF0 {
                    // Inside the next step, at one of its first four storage submissions.
                    a.stepKilled(at: .submission(1 + Int(n >> 2) % 4), n & 2 == 0 ? .kicked : .storageReady,
                                 completing: completing)
                } else if n & 0xF0 == 0xE0 {
                    // Inside the next step, just before one of its first 64 journal stores.
                    a.stepKilled(at: .journalStore(1 + Int(bytes.u8()) % 64), n & 2 == 0 ? .kicked : .storageReady,
                                 completing: completing)
                } else {
                    a.restartEngine(completing: completing)
                }
            } else {
                stepA(.kicked, armIfIdle: true)
            }
        case 180..<215:
            let kind = FuzzRequest.Kind(rawValue: bytes.u8() % 7)!
            b.writeRequest(kind, &bytes, valid: true, avoidOverlap: true)
            b.publish()
            b.step(.kicked, armIfIdle: true)
        case 215..<235:
            b.step(bytes.u8() & 1 == 0 ? .kicked : .storageReady, armIfIdle: true)
        default:
            complete(b, &bytes, errors: false)
            b.step(.storageReady, armIfIdle: true)
        }
    }

    private func stepA(_ input: VbdEngineInput, armIfIdle: Bool) {
        a.step(input, armIfIdle: armIfIdle)
    }

    /// Which slot or page, where, and the new bytes (into `armedBytes`).
    private func rewriteParameters(_ bytes: inout BlkifProgramBytes, within size: Int) -> (UInt8, Int, Int) {
        let choice = bytes.u8()
        let offset = Int(bytes.u16()) % size
        let length = min(1 + Int(bytes.u8()) % 32, size - offset)
        bytes.copy(into: armedBytes, count: length)
        return (choice, offset, length)
    }

    /// Completes one pending operation (any, in any order) or all, with
    /// success or (ring A) an errno.
    private func complete(_ ring: BlkifFuzzRing, _ bytes: inout BlkifProgramBytes, errors: Bool) {
        let choice = bytes.u8(), e = bytes.u8()
        let disk = ring.disk
        guard !disk.pending.isEmpty else { return }
        let failure: Int32 = errors && e & 0xC0 == 0xC0 ? [EIO, ENOSPC, EINVAL, ENODATA][Int(e & 3)] : 0
        if choice & 0x80 != 0 {
            while !disk.pending.isEmpty { disk.complete(0, errno: failure) }
        } else {
            disk.complete(Int(choice) % disk.pending.count, errno: failure)
        }
    }

    /// The grant copy hook: a guest rewriting a slot or a descriptor page
    /// while the engine is in the middle of a step.
    private func runArmedRewrite() {
        guard let r = armed else { return }
        armed = nil
        let bytes = UnsafeRawBufferPointer(start: armedBytes, count: r.length)
        if r.slot {
            a.tamperSlot(choice: r.choice, offset: r.offset, bytes: bytes, midStep: a.inStep)
        } else {
            a.tamperIndirect(choice: r.choice, offset: r.offset, bytes: bytes)
        }
    }
}
