//! blkif requests: one slot copied out of the ring, parsed and validated into a host-owned value.
//!
//! Owns: the operation codes, the validation rules of blkif.h and Linux xen-blkback, the
//! validated [`Request`] types the device layer consumes, responses, and the single mapping of
//! every rejection to a `BLKIF_RSP_*` status ([`RequestError::status`]).
//!
//! Trusts: nothing in a slot or an indirect page: every byte is guest-chosen. The input is a
//! [`RequestSlot`], a private copy taken once (by [`super::BackRing`] or from host bytes), so the
//! parser cannot read shared memory twice (XSA-155).
//!
//! Must never: touch shared memory, panic or index out of bounds on any input, or let a
//! rejected request go unanswered (a [`Rejected`] always carries the `id` and `operation` to
//! answer with).
//!
//! Not checked here: whether a request `id` is already in flight. The ring cannot know when the
//! device layer completes a request, so the device layer keeps the in-flight set and treats a
//! duplicate id as a broken frontend.

use std::fmt;
use std::ops::Deref;

use super::abi::{
    get_u16, get_u32, get_u64, get_u8, put, Abi, MAX_DIRECT_SEGMENTS,
    MAX_INDIRECT_SEGMENTS_ABSOLUTE, MAX_SLOT_SIZE, SECTORS_PER_PAGE, SECTOR_SIZE,
    SEGMENTS_PER_INDIRECT_PAGE, SEGMENT_SIZE,
};
use crate::shm::{OutOfBounds, SharedMem};

/// `BLKIF_OP_*` codes.
pub mod op {
    /// `BLKIF_OP_READ`.
    pub const READ: u8 = 0;
    /// `BLKIF_OP_WRITE`.
    pub const WRITE: u8 = 1;
    /// `BLKIF_OP_WRITE_BARRIER`.
    pub const WRITE_BARRIER: u8 = 2;
    /// `BLKIF_OP_FLUSH_DISKCACHE`.
    pub const FLUSH_DISKCACHE: u8 = 3;
    /// `BLKIF_OP_RESERVED_1` (was the blktap "packet" op; never valid).
    pub const RESERVED_1: u8 = 4;
    /// `BLKIF_OP_DISCARD`.
    pub const DISCARD: u8 = 5;
    /// `BLKIF_OP_INDIRECT`.
    pub const INDIRECT: u8 = 6;
}

/// `BLKIF_DISCARD_SECURE`: the discard flag asking for a secure erase.
pub const DISCARD_SECURE: u8 = 1;

/// A request's `operation` byte, mapped into a total enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `BLKIF_OP_READ`.
    Read,
    /// `BLKIF_OP_WRITE`.
    Write,
    /// `BLKIF_OP_WRITE_BARRIER`.
    WriteBarrier,
    /// `BLKIF_OP_FLUSH_DISKCACHE`.
    FlushDiskcache,
    /// `BLKIF_OP_DISCARD`.
    Discard,
    /// `BLKIF_OP_INDIRECT`.
    Indirect,
    /// Any other value, including `BLKIF_OP_RESERVED_1`.
    Unsupported(u8),
}

impl From<u8> for Op {
    fn from(v: u8) -> Op {
        match v {
            op::READ => Op::Read,
            op::WRITE => Op::Write,
            op::WRITE_BARRIER => Op::WriteBarrier,
            op::FLUSH_DISKCACHE => Op::FlushDiskcache,
            op::DISCARD => Op::Discard,
            op::INDIRECT => Op::Indirect,
            other => Op::Unsupported(other),
        }
    }
}

impl Op {
    /// The wire value.
    pub fn code(self) -> u8 {
        match self {
            Op::Read => op::READ,
            Op::Write => op::WRITE,
            Op::WriteBarrier => op::WRITE_BARRIER,
            Op::FlushDiskcache => op::FLUSH_DISKCACHE,
            Op::Discard => op::DISCARD,
            Op::Indirect => op::INDIRECT,
            Op::Unsupported(v) => v,
        }
    }
}

/// `BLKIF_RSP_*`: the status of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// `BLKIF_RSP_OKAY` (0).
    Okay,
    /// `BLKIF_RSP_ERROR` (-1).
    Error,
    /// `BLKIF_RSP_EOPNOTSUPP` (-2).
    NotSupported,
}

impl Status {
    /// The wire value.
    pub fn code(self) -> i16 {
        match self {
            Status::Okay => 0,
            Status::Error => -1,
            Status::NotSupported => -2,
        }
    }

    /// Maps a wire value back (unknown values are errors).
    pub fn from_code(v: i16) -> Status {
        match v {
            0 => Status::Okay,
            -2 => Status::NotSupported,
            _ => Status::Error,
        }
    }
}

/// What the disk advertises and allows; the parser checks each request against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors (xenstore `sectors`).
    pub capacity_sectors: u64,
    /// The VBD is read-only (`mode = r`): every write, flush, barrier and discard fails.
    pub read_only: bool,
    /// `feature-max-indirect-segments` as advertised; 0 means indirect requests are not
    /// supported. Values above 4096 (8 pages of 512) are treated as 4096.
    pub max_indirect_segments: u16,
    /// `feature-flush-cache` advertised.
    pub flush: bool,
    /// `feature-barrier` advertised.
    pub barrier: bool,
    /// `feature-discard` advertised.
    pub discard: bool,
    /// `discard-secure` advertised.
    pub discard_secure: bool,
}

/// The default `feature-max-indirect-segments` rbdback advertises.
pub const DEFAULT_MAX_INDIRECT_SEGMENTS: u16 = 256;

impl Limits {
    /// A writable disk of `capacity_sectors` with flush, barrier and 256 indirect segments,
    /// no discard.
    pub fn new(capacity_sectors: u64) -> Limits {
        Limits {
            capacity_sectors,
            read_only: false,
            max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
            flush: true,
            barrier: true,
            discard: false,
            discard_secure: false,
        }
    }

    fn max_indirect(&self) -> usize {
        usize::from(self.max_indirect_segments).min(MAX_INDIRECT_SEGMENTS_ABSOLUTE)
    }
}

/// Why a request was refused. Each variant maps to one status in [`RequestError::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The operation code is not a blkif operation we implement.
    #[error("unsupported operation {0}")]
    UnsupportedOp(u8),
    /// A valid operation whose feature the disk does not advertise.
    #[error("operation {0:?} is not advertised for this disk")]
    NotAdvertised(Op),
    /// An indirect request whose inner operation is not READ or WRITE.
    #[error("indirect request with inner operation {0} (only read and write may be indirect)")]
    BadIndirectOp(u8),
    /// `nr_segments` out of range for the operation.
    #[error("{nr} segments where {min} to {max} are allowed")]
    BadSegmentCount {
        /// Segment count in the request.
        nr: u16,
        /// Smallest allowed.
        min: u16,
        /// Largest allowed.
        max: u16,
    },
    /// A segment whose sector range is not `first_sect <= last_sect <= 7`.
    #[error("segment {index}: sectors {first}..={last} do not fit one page")]
    BadSegment {
        /// Index of the segment in the request.
        index: u16,
        /// `first_sect`.
        first: u8,
        /// `last_sect`.
        last: u8,
    },
    /// `sector_number + sectors` does not fit 64 bits.
    #[error("sector {sector} + {nr_sectors} overflows")]
    SectorOverflow {
        /// Start sector.
        sector: u64,
        /// Length in sectors.
        nr_sectors: u64,
    },
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}+{nr_sectors} reach past the disk's {capacity} sectors")]
    BeyondCapacity {
        /// Start sector.
        sector: u64,
        /// Length in sectors.
        nr_sectors: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// A request that modifies a read-only disk.
    #[error("operation {0:?} on a read-only disk")]
    ReadOnly(Op),
    /// Fewer indirect descriptor bytes than the segment count needs (device-layer input).
    #[error("indirect request needs {needed} segment descriptors, the pages given hold {got}")]
    IndirectPagesMissing {
        /// Descriptors the request declares.
        needed: usize,
        /// Descriptors available in the pages passed in.
        got: usize,
    },
}

impl RequestError {
    /// The response status for this rejection: the one place statuses are decided.
    ///
    /// blkif.h: "BLKIF_RSP_EOPNOTSUPP: the operation is not supported"; everything else is
    /// `BLKIF_RSP_ERROR`, as Linux blkback answers malformed requests.
    pub fn status(&self) -> Status {
        match self {
            RequestError::UnsupportedOp(_) | RequestError::NotAdvertised(_) => Status::NotSupported,
            RequestError::BadIndirectOp(_)
            | RequestError::BadSegmentCount { .. }
            | RequestError::BadSegment { .. }
            | RequestError::SectorOverflow { .. }
            | RequestError::BeyondCapacity { .. }
            | RequestError::ReadOnly(_)
            | RequestError::IndirectPagesMissing { .. } => Status::Error,
        }
    }
}

/// A refused request: still answered, with its own `id` and `operation`, and the ring goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request {id:#x} (operation {operation}) rejected: {error}")]
pub struct Rejected {
    /// The request's `id`.
    pub id: u64,
    /// The operation to echo in the response.
    pub operation: u8,
    /// Why.
    #[source]
    pub error: RequestError,
}

impl Rejected {
    /// The response that answers this request.
    pub fn response(&self) -> Response {
        Response {
            id: self.id,
            operation: self.operation,
            status: self.error.status(),
        }
    }
}

/// A response to write into the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// The request's `id`, echoed.
    pub id: u64,
    /// The request's operation, echoed (for indirect requests the inner operation, as Linux
    /// blkback answers and blkfront checks).
    pub operation: u8,
    /// Outcome.
    pub status: Status,
}

impl Response {
    /// Encodes this response as a whole slot of `abi`: id, operation, status and zeros in every
    /// other byte up to the slot size, so no stale bytes reach the guest (XSA-216).
    pub fn encode(&self, abi: Abi) -> [u8; MAX_SLOT_SIZE] {
        let l = abi.layout();
        let mut b = [0u8; MAX_SLOT_SIZE];
        put(&mut b, l.rsp_id, &self.id.to_le_bytes());
        put(&mut b, l.rsp_operation, &[self.operation]);
        put(&mut b, l.rsp_status, &self.status.code().to_le_bytes());
        b
    }

    /// Decodes a response slot (used by the mock frontend).
    pub fn decode(abi: Abi, b: &[u8]) -> Response {
        let l = abi.layout();
        Response {
            id: get_u64(b, l.rsp_id),
            operation: get_u8(b, l.rsp_operation),
            status: Status::from_code(i16::from_le_bytes(get_u16(b, l.rsp_status).to_le_bytes())),
        }
    }
}

/// One data segment: a granted page and the 512-byte sectors of it the request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Segment {
    /// Grant reference of the page.
    pub gref: u32,
    /// First sector used within the page (0..=7).
    pub first_sect: u8,
    /// Last sector used within the page (first_sect..=7).
    pub last_sect: u8,
}

impl Segment {
    /// Sectors covered by a validated segment (1..=8).
    pub fn sectors(&self) -> u64 {
        u64::from(self.last_sect.saturating_sub(self.first_sect)) + 1
    }

    /// Byte offset of the data in the page.
    pub fn offset_bytes(&self) -> usize {
        usize::from(self.first_sect) * 512
    }

    /// Byte length of the data.
    pub fn len_bytes(&self) -> usize {
        (usize::from(self.last_sect.saturating_sub(self.first_sect)) + 1) * 512
    }

    /// Decodes a `struct blkif_request_segment` from 8 host-owned bytes.
    fn decode(b: &[u8]) -> Segment {
        Segment {
            gref: get_u32(b, 0),
            first_sect: get_u8(b, 4),
            last_sect: get_u8(b, 5),
        }
    }

    /// Encodes as `struct blkif_request_segment` (padding zeroed).
    pub fn encode(&self) -> [u8; SEGMENT_SIZE] {
        let mut b = [0u8; SEGMENT_SIZE];
        put(&mut b, 0, &self.gref.to_le_bytes());
        put(&mut b, 4, &[self.first_sect, self.last_sect]);
        b
    }

    /// blkif.h (`struct blkif_request_segment`): "first_sect: first sector in frame to
    /// transfer (inclusive); last_sect: last sector in frame to transfer (inclusive)", sectors
    /// being 512 bytes of a 4 KiB frame; blkback refuses `last_sect >= 8` or `last < first`.
    fn validate(&self, index: usize) -> Result<(), RequestError> {
        if self.first_sect > self.last_sect || self.last_sect >= SECTORS_PER_PAGE {
            return Err(RequestError::BadSegment {
                index: u16::try_from(index).unwrap_or(u16::MAX),
                first: self.first_sect,
                last: self.last_sect,
            });
        }
        Ok(())
    }
}

/// The segments of a request: inline for direct requests, on the heap for indirect ones.
#[derive(Clone, PartialEq, Eq)]
pub struct Segments(SegStore);

#[derive(Clone, PartialEq, Eq)]
enum SegStore {
    Inline {
        len: u8,
        segs: [Segment; MAX_DIRECT_SEGMENTS],
    },
    Heap(Vec<Segment>),
}

impl Segments {
    /// No segments.
    pub fn empty() -> Segments {
        Segments(SegStore::Inline {
            len: 0,
            segs: [Segment::default(); MAX_DIRECT_SEGMENTS],
        })
    }

    /// Segments from a list (inline if they fit).
    pub fn from_slice(s: &[Segment]) -> Segments {
        match u8::try_from(s.len()) {
            Ok(len) if s.len() <= MAX_DIRECT_SEGMENTS => {
                let mut segs = [Segment::default(); MAX_DIRECT_SEGMENTS];
                if let Some(d) = segs.get_mut(..s.len()) {
                    d.copy_from_slice(s);
                }
                Segments(SegStore::Inline { len, segs })
            }
            _ => Segments(SegStore::Heap(s.to_vec())),
        }
    }
}

impl Deref for Segments {
    type Target = [Segment];
    fn deref(&self) -> &[Segment] {
        match &self.0 {
            SegStore::Inline { len, segs } => segs.get(..usize::from(*len)).unwrap_or(&[]),
            SegStore::Heap(v) => v,
        }
    }
}

impl fmt::Debug for Segments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A validated data transfer: start sector and the pages it goes through, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// First disk sector (512-byte units).
    pub sector: u64,
    /// The segments, at least one; the data of segment `i` follows segment `i - 1` on disk.
    pub segments: Segments,
    /// Whether the segments came from indirect descriptor pages.
    pub indirect: bool,
}

impl Transfer {
    /// Sectors transferred.
    pub fn sectors(&self) -> u64 {
        self.segments.iter().map(Segment::sectors).sum()
    }

    /// Bytes transferred.
    pub fn total_bytes(&self) -> u64 {
        self.sectors() * SECTOR_SIZE
    }

    /// Byte offset on disk.
    pub fn offset_bytes(&self) -> u64 {
        // Validated: sector + sectors <= capacity, and capacity * 512 is checked by the
        // device layer when it reads the image size; saturate rather than wrap regardless.
        self.sector.saturating_mul(SECTOR_SIZE)
    }
}

/// A validated discard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discard {
    /// First sector.
    pub sector: u64,
    /// Number of sectors (may be 0: nothing to do).
    pub nr_sectors: u64,
    /// Secure erase requested and `discard-secure` advertised.
    pub secure: bool,
}

/// What a validated request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read into the segments.
    Read(Transfer),
    /// Write from the segments.
    Write(Transfer),
    /// `BLKIF_OP_FLUSH_DISKCACHE`: make completed writes durable; blkfront also sends
    /// PREFLUSH/FUA writes this way, in which case the data is written and made durable.
    Flush(Option<Transfer>),
    /// `BLKIF_OP_WRITE_BARRIER`: like `Flush`, and every earlier request must complete first.
    Barrier(Option<Transfer>),
    /// `BLKIF_OP_DISCARD`.
    Discard(Discard),
}

/// A validated request, ready for the device layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The guest's id, to echo.
    pub id: u64,
    /// The operation to echo in the response.
    pub operation: u8,
    /// What to do.
    pub kind: RequestKind,
}

impl Request {
    /// The response for this request with `status`.
    pub fn response(&self, status: Status) -> Response {
        Response {
            id: self.id,
            operation: self.operation,
            status,
        }
    }

    /// The data transfer, if the request has one.
    pub fn transfer(&self) -> Option<&Transfer> {
        match &self.kind {
            RequestKind::Read(t) | RequestKind::Write(t) => Some(t),
            RequestKind::Flush(t) | RequestKind::Barrier(t) => t.as_ref(),
            RequestKind::Discard(_) => None,
        }
    }
}

/// The first stage of an indirect request: the slot is valid, its segment list lives in
/// guest pages the device layer must copy (via the grants in [`Self::page_grefs`]) and hand
/// to [`Self::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndirectRequest {
    /// The guest's id.
    pub id: u64,
    /// Inner operation (`BLKIF_OP_READ` or `BLKIF_OP_WRITE`), echoed in the response.
    pub operation: u8,
    /// First disk sector.
    pub sector: u64,
    /// Number of segments (1..=advertised maximum).
    pub nr_segments: u16,
    grefs: [u32; super::abi::MAX_INDIRECT_PAGES],
}

impl IndirectRequest {
    /// Indirect descriptor pages the segments occupy (`INDIRECT_PAGES(nr_segments)`).
    pub fn pages_needed(&self) -> usize {
        usize::from(self.nr_segments).div_ceil(SEGMENTS_PER_INDIRECT_PAGE)
    }

    /// Grant references of the descriptor pages to copy, in order.
    pub fn page_grefs(&self) -> &[u32] {
        self.grefs.get(..self.pages_needed()).unwrap_or(&self.grefs)
    }

    /// Whether this is a write.
    pub fn is_write(&self) -> bool {
        self.operation == op::WRITE
    }

    /// A rejection of this request (e.g. the device layer failed to copy its pages).
    pub fn reject(&self, error: RequestError) -> Rejected {
        Rejected {
            id: self.id,
            operation: self.operation,
            error,
        }
    }

    /// Parses and validates the segment list from host-owned copies of the descriptor pages
    /// (`pages[i]` holds the page of `page_grefs()[i]`; 512 descriptors of 8 bytes per page).
    pub fn complete(&self, pages: &[&[u8]], limits: &Limits) -> Result<Request, Rejected> {
        self.complete_inner(pages, limits)
            .map_err(|e| self.reject(e))
    }

    fn complete_inner(&self, pages: &[&[u8]], limits: &Limits) -> Result<Request, RequestError> {
        let n = usize::from(self.nr_segments);
        let mut segs = Vec::with_capacity(n);
        for i in 0..n {
            let off = (i % SEGMENTS_PER_INDIRECT_PAGE) * SEGMENT_SIZE;
            let bytes = pages
                .get(i / SEGMENTS_PER_INDIRECT_PAGE)
                .and_then(|p| p.get(off..off + SEGMENT_SIZE))
                .ok_or(RequestError::IndirectPagesMissing { needed: n, got: i })?;
            let seg = Segment::decode(bytes);
            seg.validate(i)?;
            segs.push(seg);
        }
        let t = Transfer {
            sector: self.sector,
            segments: Segments(SegStore::Heap(segs)),
            indirect: true,
        };
        check_range(t.sector, t.sectors(), limits)?;
        let kind = if self.is_write() {
            RequestKind::Write(t)
        } else {
            RequestKind::Read(t)
        };
        Ok(Request {
            id: self.id,
            operation: self.operation,
            kind,
        })
    }
}

/// The outcome of parsing one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A complete, validated request.
    Ready(Request),
    /// A valid indirect request whose segment list must be fetched first.
    NeedsIndirectPages(IndirectRequest),
}

/// One request slot copied out of the shared ring: the only input the parser accepts.
///
/// Built by [`super::BackRing::take_requests`] (one volatile copy from shared memory) or from
/// host-owned bytes ([`RequestSlot::from_bytes`], for replay, tests and fuzzing).
#[derive(Clone, PartialEq, Eq)]
pub struct RequestSlot {
    abi: Abi,
    bytes: [u8; MAX_SLOT_SIZE],
}

impl fmt::Debug for RequestSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestSlot")
            .field("abi", &self.abi)
            .field("operation", &self.operation())
            .field("id", &self.id())
            .finish()
    }
}

/// blkif.h "sector_number ... start sector idx on disk"; blkback's `xen_vbd_translate`
/// refuses a range that wraps or ends past the disk.
fn check_range(sector: u64, nr_sectors: u64, limits: &Limits) -> Result<(), RequestError> {
    let end = sector
        .checked_add(nr_sectors)
        .ok_or(RequestError::SectorOverflow { sector, nr_sectors })?;
    if end > limits.capacity_sectors {
        return Err(RequestError::BeyondCapacity {
            sector,
            nr_sectors,
            capacity: limits.capacity_sectors,
        });
    }
    Ok(())
}

impl RequestSlot {
    /// Copies the slot at `offset` of `mem`, once.
    pub(crate) fn copy_from(
        mem: &SharedMem<'_>,
        offset: usize,
        abi: Abi,
    ) -> Result<Self, OutOfBounds> {
        let mut bytes = [0u8; MAX_SLOT_SIZE];
        let n = abi.slot_size();
        let dst = bytes.get_mut(..n).ok_or(OutOfBounds {
            offset,
            len: n,
            size: MAX_SLOT_SIZE,
        })?;
        mem.read(offset, dst)?;
        Ok(RequestSlot { abi, bytes })
    }

    /// A slot from host-owned bytes (the first `abi.slot_size()` are used, missing ones are 0).
    pub fn from_bytes(abi: Abi, src: &[u8]) -> RequestSlot {
        let mut bytes = [0u8; MAX_SLOT_SIZE];
        let n = src.len().min(abi.slot_size());
        if let (Some(d), Some(s)) = (bytes.get_mut(..n), src.get(..n)) {
            d.copy_from_slice(s);
        }
        RequestSlot { abi, bytes }
    }

    /// The ABI the slot is laid out in.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// The slot's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.bytes
            .get(..self.abi.slot_size())
            .unwrap_or(&self.bytes)
    }

    /// The raw `operation` byte.
    pub fn operation(&self) -> u8 {
        get_u8(&self.bytes, self.abi.layout().req_operation)
    }

    /// The `id` (at the same offset for every request kind of an ABI).
    pub fn id(&self) -> u64 {
        get_u64(&self.bytes, self.abi.layout().req_id)
    }

    /// Validates the copy into a request (or the first stage of an indirect one).
    pub fn parse(&self, limits: &Limits) -> Result<Parsed, Rejected> {
        let id = self.id();
        let raw_op = self.operation();
        let op = Op::from(raw_op);
        let reject = |operation: u8, error: RequestError| Rejected {
            id,
            operation,
            error,
        };
        match op {
            Op::Read | Op::Write | Op::WriteBarrier | Op::FlushDiskcache => self
                .parse_direct(id, op, limits)
                .map(Parsed::Ready)
                .map_err(|e| reject(raw_op, e)),
            Op::Discard => self
                .parse_discard(id, limits)
                .map(Parsed::Ready)
                .map_err(|e| reject(raw_op, e)),
            Op::Indirect => {
                // Linux blkback answers an indirect request with its inner operation.
                let inner = get_u8(&self.bytes, self.abi.layout().ind_op);
                self.parse_indirect(id, inner, limits)
                    .map(Parsed::NeedsIndirectPages)
                    .map_err(|e| reject(inner, e))
            }
            // blkif.h: unknown operations are answered with BLKIF_RSP_EOPNOTSUPP.
            Op::Unsupported(v) => Err(reject(raw_op, RequestError::UnsupportedOp(v))),
        }
    }

    fn parse_direct(&self, id: u64, op: Op, limits: &Limits) -> Result<Request, RequestError> {
        let l = self.abi.layout();
        let b = &self.bytes;
        // blkif.h "feature-barrier" / "feature-flush-cache": a frontend must not send these
        // unless advertised; answer EOPNOTSUPP so blkfront turns the feature off.
        let data_optional = match op {
            Op::WriteBarrier if !limits.barrier => return Err(RequestError::NotAdvertised(op)),
            Op::FlushDiskcache if !limits.flush => return Err(RequestError::NotAdvertised(op)),
            Op::WriteBarrier | Op::FlushDiskcache => true,
            _ => false,
        };
        // blkback: every operation but READ is a write to the VBD (flushes included).
        if limits.read_only && op != Op::Read {
            return Err(RequestError::ReadOnly(op));
        }
        // blkif.h BLKIF_MAX_SEGMENTS_PER_REQUEST; blkback: "nseg == 0" is only valid for a
        // flush (barrier and flush-diskcache both map to PREFLUSH there).
        let nseg = get_u8(b, l.req_nr_segments);
        let min: u8 = if data_optional { 0 } else { 1 };
        if usize::from(nseg) > MAX_DIRECT_SEGMENTS || nseg < min {
            return Err(RequestError::BadSegmentCount {
                nr: u16::from(nseg),
                min: u16::from(min),
                max: 11,
            });
        }
        let sector = get_u64(b, l.req_sector);
        let transfer = if nseg == 0 {
            None
        } else {
            let mut segs = [Segment::default(); MAX_DIRECT_SEGMENTS];
            for (i, s) in segs.iter_mut().enumerate().take(usize::from(nseg)) {
                let off = l.req_seg + i * SEGMENT_SIZE;
                let seg = Segment::decode(b.get(off..off + SEGMENT_SIZE).unwrap_or(&[]));
                seg.validate(i)?;
                *s = seg;
            }
            let t = Transfer {
                sector,
                segments: Segments(SegStore::Inline { len: nseg, segs }),
                indirect: false,
            };
            check_range(sector, t.sectors(), limits)?;
            Some(t)
        };
        let kind = match (op, transfer) {
            (Op::Read, Some(t)) => RequestKind::Read(t),
            (Op::Write, Some(t)) => RequestKind::Write(t),
            (Op::WriteBarrier, t) => RequestKind::Barrier(t),
            (Op::FlushDiskcache, t) => RequestKind::Flush(t),
            // Unreachable: read/write with nseg 0 was refused above.
            (_, _) => {
                return Err(RequestError::BadSegmentCount {
                    nr: 0,
                    min: 1,
                    max: 11,
                })
            }
        };
        Ok(Request {
            id,
            operation: op.code(),
            kind,
        })
    }

    fn parse_discard(&self, id: u64, limits: &Limits) -> Result<Request, RequestError> {
        let l = self.abi.layout();
        let b = &self.bytes;
        // blkif.h "feature-discard": only valid when advertised.
        if !limits.discard {
            return Err(RequestError::NotAdvertised(Op::Discard));
        }
        if limits.read_only {
            return Err(RequestError::ReadOnly(Op::Discard));
        }
        let sector = get_u64(b, l.discard_sector);
        let nr_sectors = get_u64(b, l.discard_nr_sectors);
        check_range(sector, nr_sectors, limits)?;
        // blkif.h: BLKIF_DISCARD_SECURE is "ignored if discard-secure=0".
        let secure = limits.discard_secure && get_u8(b, l.discard_flag) & DISCARD_SECURE != 0;
        Ok(Request {
            id,
            operation: op::DISCARD,
            kind: RequestKind::Discard(Discard {
                sector,
                nr_sectors,
                secure,
            }),
        })
    }

    fn parse_indirect(
        &self,
        id: u64,
        inner: u8,
        limits: &Limits,
    ) -> Result<IndirectRequest, RequestError> {
        let l = self.abi.layout();
        let b = &self.bytes;
        // blkif.h "feature-max-indirect-segments": indirect requests only when advertised.
        let max = limits.max_indirect();
        if max == 0 {
            return Err(RequestError::NotAdvertised(Op::Indirect));
        }
        // blkif.h BLKIF_OP_INDIRECT: "indirect_op ... Only BLKIF_OP_{READ,WRITE}"; blkback
        // refuses anything else.
        let write = match inner {
            op::READ => false,
            op::WRITE => true,
            other => return Err(RequestError::BadIndirectOp(other)),
        };
        if write && limits.read_only {
            return Err(RequestError::ReadOnly(Op::Write));
        }
        let nr_segments = get_u16(b, l.ind_nr_segments);
        if nr_segments == 0 || usize::from(nr_segments) > max {
            return Err(RequestError::BadSegmentCount {
                nr: nr_segments,
                min: 1,
                max: u16::try_from(max).unwrap_or(u16::MAX),
            });
        }
        let sector = get_u64(b, l.ind_sector);
        // Each segment covers at least one sector: refuse a hopeless range before the device
        // layer spends grant copies on the descriptor pages. The exact check runs in complete().
        check_range(sector, u64::from(nr_segments), limits)?;
        let mut grefs = [0u32; super::abi::MAX_INDIRECT_PAGES];
        for (i, g) in grefs.iter_mut().enumerate() {
            *g = get_u32(b, l.ind_grefs + 4 * i);
        }
        Ok(IndirectRequest {
            id,
            operation: inner,
            sector,
            nr_segments,
            grefs,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::ring::front::{indirect_pages, WireRequest};

    const CAP: u64 = 1 << 20;

    fn seg(gref: u32, first: u8, last: u8) -> Segment {
        Segment {
            gref,
            first_sect: first,
            last_sect: last,
        }
    }

    fn full(n: usize) -> Vec<Segment> {
        (100..).take(n).map(|g| seg(g, 0, 7)).collect()
    }

    fn parse_in(abi: Abi, req: &WireRequest, limits: &Limits) -> Result<Parsed, Rejected> {
        RequestSlot::from_bytes(abi, &req.encode(abi)).parse(limits)
    }

    fn parse(req: &WireRequest, limits: &Limits) -> Result<Parsed, Rejected> {
        let mut first = None;
        for abi in Abi::ALL {
            let r = parse_in(abi, req, limits);
            match &first {
                None => first = Some(r.clone()),
                Some(f) => assert_eq!(f, &r, "ABIs disagree for {abi}"),
            }
        }
        first.unwrap()
    }

    fn ready(req: &WireRequest, limits: &Limits) -> Request {
        match parse(req, limits) {
            Ok(Parsed::Ready(r)) => r,
            other => panic!("expected a ready request, got {other:?}"),
        }
    }

    fn rejected(req: &WireRequest, limits: &Limits) -> Rejected {
        match parse(req, limits) {
            Err(r) => r,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn parse_read_yields_segments_sector_and_lengths() {
        let req = WireRequest::read(0xdead_beef_0000_0001, 64, vec![seg(7, 1, 7), seg(8, 0, 3)]);
        let r = ready(&req, &Limits::new(CAP));
        assert_eq!(r.id, 0xdead_beef_0000_0001);
        assert_eq!(r.operation, op::READ);
        let RequestKind::Read(t) = &r.kind else {
            panic!("not a read: {r:?}")
        };
        assert_eq!(t.sector, 64);
        assert!(!t.indirect);
        assert_eq!(&t.segments[..], &[seg(7, 1, 7), seg(8, 0, 3)]);
        assert_eq!(t.sectors(), 11);
        assert_eq!(t.total_bytes(), 11 * 512);
        assert_eq!(t.segments[0].offset_bytes(), 512);
        assert_eq!(t.segments[0].len_bytes(), 7 * 512);
        assert_eq!(t.offset_bytes(), 64 * 512);
    }

    #[test]
    fn parse_write_with_eleven_segments_is_accepted() {
        let r = ready(&WireRequest::write(1, 0, full(11)), &Limits::new(CAP));
        assert!(matches!(&r.kind, RequestKind::Write(t) if t.segments.len() == 11));
    }

    #[test]
    fn parse_direct_request_with_twelve_segments_is_rejected() {
        let req = WireRequest::Rw {
            operation: op::WRITE,
            nr_segments: 12,
            handle: 0,
            id: 5,
            sector: 0,
            segments: full(11),
        };
        let r = rejected(&req, &Limits::new(CAP));
        assert_eq!(r.id, 5);
        assert_eq!(r.operation, op::WRITE);
        assert!(matches!(
            r.error,
            RequestError::BadSegmentCount { nr: 12, .. }
        ));
        assert_eq!(r.response().status, Status::Error);
    }

    #[test]
    fn parse_read_or_write_without_segments_is_rejected() {
        for o in [op::READ, op::WRITE] {
            let r = rejected(&WireRequest::rw(o, 9, 0, vec![]), &Limits::new(CAP));
            assert!(matches!(
                r.error,
                RequestError::BadSegmentCount { nr: 0, .. }
            ));
            assert_eq!(r.error.status(), Status::Error);
        }
    }

    #[test]
    fn parse_flush_and_barrier_without_segments_are_accepted() {
        let r = ready(&WireRequest::flush(3), &Limits::new(CAP));
        assert_eq!(r.kind, RequestKind::Flush(None));
        assert_eq!(r.operation, op::FLUSH_DISKCACHE);
        let r = ready(
            &WireRequest::rw(op::WRITE_BARRIER, 4, 0, vec![]),
            &Limits::new(CAP),
        );
        assert_eq!(r.kind, RequestKind::Barrier(None));
    }

    #[test]
    fn parse_flush_with_data_is_a_write_that_is_range_checked() {
        let r = ready(
            &WireRequest::rw(op::FLUSH_DISKCACHE, 3, 8, full(2)),
            &Limits::new(CAP),
        );
        assert!(matches!(&r.kind, RequestKind::Flush(Some(t)) if t.sectors() == 16));
        let r = rejected(
            &WireRequest::rw(op::FLUSH_DISKCACHE, 3, CAP - 1, full(1)),
            &Limits::new(CAP),
        );
        assert!(matches!(r.error, RequestError::BeyondCapacity { .. }));
    }

    #[test]
    fn parse_flush_or_barrier_not_advertised_is_not_supported() {
        let mut l = Limits::new(CAP);
        l.flush = false;
        l.barrier = false;
        let r = rejected(&WireRequest::flush(3), &l);
        assert_eq!(r.error, RequestError::NotAdvertised(Op::FlushDiskcache));
        assert_eq!(r.response().status, Status::NotSupported);
        let r = rejected(&WireRequest::rw(op::WRITE_BARRIER, 4, 0, vec![]), &l);
        assert_eq!(r.response().status, Status::NotSupported);
    }

    #[test]
    fn parse_unknown_operation_is_not_supported_and_echoes_id_and_op() {
        for o in [op::RESERVED_1, 7, 0xff] {
            let r = rejected(&WireRequest::rw(o, 0x1234, 0, vec![]), &Limits::new(CAP));
            assert_eq!(r.id, 0x1234);
            assert_eq!(r.operation, o);
            assert_eq!(r.error, RequestError::UnsupportedOp(o));
            assert_eq!(r.response().status.code(), -2);
        }
    }

    #[test]
    fn parse_segment_last_before_first_is_rejected() {
        let r = rejected(
            &WireRequest::read(1, 0, vec![seg(1, 0, 7), seg(2, 5, 4)]),
            &Limits::new(CAP),
        );
        assert_eq!(
            r.error,
            RequestError::BadSegment {
                index: 1,
                first: 5,
                last: 4
            }
        );
    }

    #[test]
    fn parse_segment_last_sect_past_page_is_rejected() {
        let r = rejected(
            &WireRequest::read(1, 0, vec![seg(1, 0, 8)]),
            &Limits::new(CAP),
        );
        assert!(matches!(r.error, RequestError::BadSegment { index: 0, .. }));
        let r = rejected(
            &WireRequest::read(1, 0, vec![seg(1, 9, 255)]),
            &Limits::new(CAP),
        );
        assert!(matches!(r.error, RequestError::BadSegment { .. }));
    }

    #[test]
    fn parse_request_ending_exactly_at_capacity_is_accepted() {
        ready(&WireRequest::read(1, CAP - 8, full(1)), &Limits::new(CAP));
    }

    #[test]
    fn parse_request_past_capacity_is_rejected() {
        let r = rejected(&WireRequest::read(1, CAP - 7, full(1)), &Limits::new(CAP));
        assert_eq!(
            r.error,
            RequestError::BeyondCapacity {
                sector: CAP - 7,
                nr_sectors: 8,
                capacity: CAP
            }
        );
    }

    #[test]
    fn parse_sector_overflow_is_rejected() {
        let r = rejected(
            &WireRequest::read(1, u64::MAX - 3, full(1)),
            &Limits::new(u64::MAX),
        );
        assert!(matches!(r.error, RequestError::SectorOverflow { .. }));
    }

    #[test]
    fn parse_write_to_read_only_disk_is_rejected_but_read_is_not() {
        let mut l = Limits::new(CAP);
        l.read_only = true;
        l.discard = true;
        ready(&WireRequest::read(1, 0, full(1)), &l);
        for req in [
            WireRequest::write(1, 0, full(1)),
            WireRequest::flush(1),
            WireRequest::rw(op::WRITE_BARRIER, 1, 0, vec![]),
            WireRequest::Discard {
                flag: 0,
                id: 1,
                sector: 0,
                nr_sectors: 8,
            },
            WireRequest::Indirect {
                indirect_op: op::WRITE,
                nr_segments: 20,
                id: 1,
                sector: 0,
                grefs: vec![1],
            },
        ] {
            let r = rejected(&req, &l);
            assert!(
                matches!(r.error, RequestError::ReadOnly(_)),
                "{req:?}: {r:?}"
            );
            assert_eq!(r.error.status(), Status::Error);
        }
    }

    #[test]
    fn parse_discard_within_capacity_is_accepted() {
        let mut l = Limits::new(CAP);
        l.discard = true;
        let r = ready(
            &WireRequest::Discard {
                flag: 0,
                id: 2,
                sector: 100,
                nr_sectors: CAP - 100,
            },
            &l,
        );
        assert_eq!(
            r.kind,
            RequestKind::Discard(Discard {
                sector: 100,
                nr_sectors: CAP - 100,
                secure: false
            })
        );
        assert_eq!(r.operation, op::DISCARD);
    }

    #[test]
    fn parse_discard_past_capacity_or_overflowing_is_rejected() {
        let mut l = Limits::new(CAP);
        l.discard = true;
        let d = |sector, nr_sectors| WireRequest::Discard {
            flag: 0,
            id: 2,
            sector,
            nr_sectors,
        };
        assert!(matches!(
            rejected(&d(100, CAP), &l).error,
            RequestError::BeyondCapacity { .. }
        ));
        assert!(matches!(
            rejected(&d(1, u64::MAX), &l).error,
            RequestError::SectorOverflow { .. }
        ));
    }

    #[test]
    fn parse_discard_not_advertised_is_not_supported() {
        let r = rejected(
            &WireRequest::Discard {
                flag: 0,
                id: 2,
                sector: 0,
                nr_sectors: 8,
            },
            &Limits::new(CAP),
        );
        assert_eq!(r.response().status, Status::NotSupported);
    }

    #[test]
    fn parse_discard_secure_flag_is_honoured_only_when_advertised() {
        let mut l = Limits::new(CAP);
        l.discard = true;
        let req = WireRequest::Discard {
            flag: DISCARD_SECURE,
            id: 2,
            sector: 0,
            nr_sectors: 8,
        };
        assert!(matches!(
            ready(&req, &l).kind,
            RequestKind::Discard(Discard { secure: false, .. })
        ));
        l.discard_secure = true;
        assert!(matches!(
            ready(&req, &l).kind,
            RequestKind::Discard(Discard { secure: true, .. })
        ));
    }

    fn indirect(op_: u8, nr: u16, sector: u64) -> WireRequest {
        WireRequest::Indirect {
            indirect_op: op_,
            nr_segments: nr,
            id: 77,
            sector,
            grefs: (1000..1008).collect(),
        }
    }

    fn first_stage(req: &WireRequest, l: &Limits) -> IndirectRequest {
        match parse(req, l) {
            Ok(Parsed::NeedsIndirectPages(i)) => i,
            other => panic!("expected indirect first stage, got {other:?}"),
        }
    }

    #[test]
    fn parse_indirect_names_only_the_pages_it_needs() {
        let l = Limits {
            max_indirect_segments: 4096,
            ..Limits::new(CAP)
        };
        let i = first_stage(&indirect(op::WRITE, 513, 0), &l);
        assert_eq!(i.pages_needed(), 2);
        assert_eq!(i.page_grefs(), &[1000, 1001]);
        assert_eq!(i.operation, op::WRITE);
        let i = first_stage(&indirect(op::READ, 4096, 0), &l);
        assert_eq!(i.page_grefs().len(), 8);
    }

    #[test]
    fn complete_indirect_parses_segments_from_pages() {
        let l = Limits::new(CAP);
        let segs: Vec<Segment> = (0..256).map(|i| seg(i, 0, 7)).collect();
        let i = first_stage(&indirect(op::READ, 256, 16), &l);
        let pages = indirect_pages(&segs);
        let refs: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
        let r = i.complete(&refs, &l).unwrap();
        assert_eq!(r.id, 77);
        assert_eq!(r.operation, op::READ);
        let RequestKind::Read(t) = &r.kind else {
            panic!("{r:?}")
        };
        assert!(t.indirect);
        assert_eq!(&t.segments[..], &segs[..]);
        assert_eq!(t.total_bytes(), 256 * 4096);
    }

    #[test]
    fn complete_indirect_spanning_two_pages_reads_the_second_page() {
        let l = Limits {
            max_indirect_segments: 1024,
            ..Limits::new(CAP)
        };
        let segs: Vec<Segment> = (0..600).map(|i| seg(i, 1, 2)).collect();
        let pages = indirect_pages(&segs);
        let refs: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
        let r = first_stage(&indirect(op::WRITE, 600, 0), &l)
            .complete(&refs, &l)
            .unwrap();
        assert_eq!(r.transfer().unwrap().segments[599], seg(599, 1, 2));
        // Only one page given: the request is answered with an error, no panic.
        let e = first_stage(&indirect(op::WRITE, 600, 0), &l)
            .complete(&refs[..1], &l)
            .unwrap_err();
        assert_eq!(
            e.error,
            RequestError::IndirectPagesMissing {
                needed: 600,
                got: 512
            }
        );
    }

    #[test]
    fn complete_indirect_with_bad_segment_is_rejected() {
        let l = Limits::new(CAP);
        let mut segs: Vec<Segment> = (0..20).map(|i| seg(i, 0, 7)).collect();
        segs[13] = seg(0, 3, 9);
        let pages = indirect_pages(&segs);
        let e = first_stage(&indirect(op::READ, 20, 0), &l)
            .complete(&[&pages[0][..]], &l)
            .unwrap_err();
        assert!(matches!(
            e.error,
            RequestError::BadSegment { index: 13, .. }
        ));
        assert_eq!(e.id, 77);
    }

    #[test]
    fn complete_indirect_past_capacity_is_rejected() {
        let l = Limits::new(1000);
        let segs: Vec<Segment> = (0..20).map(|i| seg(i, 0, 7)).collect();
        let pages = indirect_pages(&segs);
        let e = first_stage(&indirect(op::READ, 20, 900), &l)
            .complete(&[&pages[0][..]], &l)
            .unwrap_err();
        assert!(matches!(
            e.error,
            RequestError::BeyondCapacity {
                nr_sectors: 160,
                ..
            }
        ));
    }

    #[test]
    fn parse_indirect_above_advertised_segments_is_rejected() {
        let l = Limits::new(CAP);
        first_stage(&indirect(op::READ, 256, 0), &l);
        let r = rejected(&indirect(op::READ, 257, 0), &l);
        assert!(matches!(
            r.error,
            RequestError::BadSegmentCount {
                nr: 257,
                max: 256,
                ..
            }
        ));
        let r = rejected(&indirect(op::READ, 0, 0), &l);
        assert!(matches!(
            r.error,
            RequestError::BadSegmentCount { nr: 0, .. }
        ));
    }

    #[test]
    fn parse_indirect_advertised_above_eight_pages_is_capped_at_4096() {
        let l = Limits {
            max_indirect_segments: u16::MAX,
            ..Limits::new(CAP)
        };
        let r = rejected(&indirect(op::READ, 4097, 0), &l);
        assert!(matches!(
            r.error,
            RequestError::BadSegmentCount { max: 4096, .. }
        ));
    }

    #[test]
    fn parse_indirect_with_inner_op_other_than_read_write_is_rejected() {
        for inner in [
            op::FLUSH_DISKCACHE,
            op::WRITE_BARRIER,
            op::DISCARD,
            op::INDIRECT,
            200,
        ] {
            let r = rejected(&indirect(inner, 8, 0), &Limits::new(CAP));
            assert_eq!(r.error, RequestError::BadIndirectOp(inner));
            assert_eq!(r.operation, inner);
            assert_eq!(r.response().status, Status::Error);
        }
    }

    #[test]
    fn parse_indirect_when_not_advertised_is_not_supported() {
        let l = Limits {
            max_indirect_segments: 0,
            ..Limits::new(CAP)
        };
        let r = rejected(&indirect(op::READ, 8, 0), &l);
        assert_eq!(r.response().status, Status::NotSupported);
    }

    #[test]
    fn parse_indirect_hopeless_range_is_rejected_before_pages_are_fetched() {
        let r = rejected(&indirect(op::READ, 16, 990), &Limits::new(1000));
        assert!(matches!(r.error, RequestError::BeyondCapacity { .. }));
    }

    #[test]
    fn response_encoding_fills_the_whole_slot_with_zeroed_padding() {
        for abi in Abi::ALL {
            let rsp = Response {
                id: u64::MAX,
                operation: 0xff,
                status: Status::NotSupported,
            };
            let b = rsp.encode(abi);
            let l = abi.layout();
            assert_eq!(b[l.rsp_id..l.rsp_id + 8], [0xff; 8]);
            assert_eq!(b[l.rsp_operation], 0xff);
            assert_eq!(b[l.rsp_operation + 1], 0, "padding after operation");
            assert_eq!(b[l.rsp_status..l.rsp_status + 2], (-2i16).to_le_bytes());
            assert!(b[l.rsp_status + 2..].iter().all(|&x| x == 0));
            assert_eq!(Response::decode(abi, &b), rsp);
        }
    }

    #[test]
    fn x86_32_and_x86_64_place_id_differently() {
        let req = WireRequest::read(0x0102_0304_0506_0708, 0, full(1));
        let b32 = req.encode(Abi::X86_32);
        let b64 = req.encode(Abi::X86_64);
        assert_eq!(b32[4..12], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(b64[8..16], 0x0102_0304_0506_0708u64.to_le_bytes());
        // The same bytes read with the wrong ABI give a different id.
        assert_ne!(RequestSlot::from_bytes(Abi::X86_64, &b32).id(), req.id());
    }

    #[test]
    fn from_bytes_tolerates_short_and_long_input() {
        let s = RequestSlot::from_bytes(Abi::X86_32, &[op::READ]);
        assert!(s.parse(&Limits::new(CAP)).is_err());
        let s = RequestSlot::from_bytes(Abi::X86_32, &[0xffu8; 500]);
        assert_eq!(s.bytes().len(), 108);
        assert!(s.parse(&Limits::new(CAP)).is_err());
    }
}
