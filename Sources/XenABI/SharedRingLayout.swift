/// The header of every DEFINE_RING_TYPES shared ring (xen/io/ring.h).
public enum SharedRingLayout {
    public enum Offset {
        public static let reqProd = 0
        public static let reqEvent = 4
        public static let rspProd = 8
        public static let rspEvent = 12
        public static let pvt = 16
        public static let pad = 20
        public static let ring = 64
    }
    public static let headerSize = 64
    /// Largest ring the backend accepts: 2^4 = 16 pages (max-ring-page-order 4).
    public static let maxPageOrder = 4

    /// __CONST_RING_SIZE: slots that fit in `pages` pages, rounded down to a power of two.
    public static func slots(pages: Int, entrySize: Int) -> Int {
        let fit = (pages * XenPage.size - headerSize) / entrySize
        precondition(fit > 0, "a ring page holds at least one entry")
        var p = 1
        while p * 2 <= fit { p *= 2 }
        return p
    }
}

/// The slot sizes of the rings this project serves (each the size of its
/// request/response union).
public enum RingEntrySize {
    public static let blkif = Blkif.slotSize
    public static let netifTx = NetifTxRequest.size
    public static let netifRx = NetifRxRequest.size
    /// The control ring's slot: its request, the larger of the two.
    public static let netifCtrl = NetifCtrlRequest.size
}
