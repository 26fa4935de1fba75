//! A mock blkif frontend for tests, fuzzing, benches and the demo.
//!
//! Owns: the frontend side of the index protocol exactly as Linux xen-blkfront drives it
//! (`SHARED_RING_INIT`, `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`, response consumption with
//! `RING_FINAL_CHECK_FOR_RESPONSES`), request encoding for every ABI, and indirect descriptor
//! page construction.
//!
//! Trusts: the backend under test only as far as a test does; it bounds what it reads by
//! `rsp_prod` and the ring size and reports nonsense as errors.
//!
//! Must never: be compiled into production (`test` or the `test-utils` feature only).

use super::abi::{
    put, ring_bytes, ring_capacity, Abi, MAX_DIRECT_SEGMENTS, MAX_INDIRECT_PAGES, MAX_SLOT_SIZE,
    PAGE_SIZE, SEGMENTS_PER_INDIRECT_PAGE, SEGMENT_SIZE, SRING_HEADER_SIZE, SRING_REQ_EVENT,
    SRING_REQ_PROD, SRING_RSP_EVENT, SRING_RSP_PROD,
};
use super::request::{op, Response, Segment};
use crate::shm::{full_barrier, OutOfBounds, SharedMem};

/// Mock frontend failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrontError {
    /// `ring-page-order` above 4.
    #[error("ring page order {0} is not supported")]
    BadOrder(u8),
    /// No free slot (`RING_FULL`).
    #[error("ring is full")]
    Full,
    /// The backend published an impossible `rsp_prod`.
    #[error("backend published rsp_prod {rsp_prod} with req_prod {req_prod}")]
    BogusRspProd {
        /// `rsp_prod` read.
        rsp_prod: u32,
        /// Requests produced.
        req_prod: u32,
    },
    /// Shared memory access failed.
    #[error("ring memory access failed")]
    Memory(#[source] OutOfBounds),
}

impl From<OutOfBounds> for FrontError {
    fn from(e: OutOfBounds) -> Self {
        FrontError::Memory(e)
    }
}

/// A request as a frontend writes it, fields unchecked (tests build invalid ones on purpose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireRequest {
    /// `struct blkif_request`: read, write, flush, barrier, or any operation code.
    Rw {
        /// `operation`.
        operation: u8,
        /// `nr_segments` as written (may disagree with `segments`).
        nr_segments: u8,
        /// `handle`.
        handle: u16,
        /// `id`.
        id: u64,
        /// `sector_number`.
        sector: u64,
        /// Segments written into `seg[]` (at most 11 are written).
        segments: Vec<Segment>,
    },
    /// `struct blkif_request_discard`.
    Discard {
        /// `flag`.
        flag: u8,
        /// `id`.
        id: u64,
        /// `sector_number`.
        sector: u64,
        /// `nr_sectors`.
        nr_sectors: u64,
    },
    /// `struct blkif_request_indirect`.
    Indirect {
        /// `indirect_op`.
        indirect_op: u8,
        /// `nr_segments`.
        nr_segments: u16,
        /// `id`.
        id: u64,
        /// `sector_number`.
        sector: u64,
        /// `indirect_grefs[]` (at most 8 are written).
        grefs: Vec<u32>,
    },
}

impl WireRequest {
    /// A read of `segments` starting at `sector`.
    pub fn read(id: u64, sector: u64, segments: Vec<Segment>) -> WireRequest {
        Self::rw(op::READ, id, sector, segments)
    }

    /// A write of `segments` starting at `sector`.
    pub fn write(id: u64, sector: u64, segments: Vec<Segment>) -> WireRequest {
        Self::rw(op::WRITE, id, sector, segments)
    }

    /// A flush without data.
    pub fn flush(id: u64) -> WireRequest {
        Self::rw(op::FLUSH_DISKCACHE, id, 0, Vec::new())
    }

    /// A request of `operation` with consistent `nr_segments`.
    pub fn rw(operation: u8, id: u64, sector: u64, segments: Vec<Segment>) -> WireRequest {
        WireRequest::Rw {
            operation,
            nr_segments: u8::try_from(segments.len()).unwrap_or(u8::MAX),
            handle: 0,
            id,
            sector,
            segments,
        }
    }

    /// The request's id.
    pub fn id(&self) -> u64 {
        match self {
            WireRequest::Rw { id, .. }
            | WireRequest::Discard { id, .. }
            | WireRequest::Indirect { id, .. } => *id,
        }
    }

    /// Encodes the slot in `abi` (bytes past the ABI's slot size are zero).
    pub fn encode(&self, abi: Abi) -> [u8; MAX_SLOT_SIZE] {
        let l = abi.layout();
        let mut b = [0u8; MAX_SLOT_SIZE];
        match self {
            WireRequest::Rw {
                operation,
                nr_segments,
                handle,
                id,
                sector,
                segments,
            } => {
                put(&mut b, l.req_operation, &[*operation]);
                put(&mut b, l.req_nr_segments, &[*nr_segments]);
                put(&mut b, l.req_handle, &handle.to_le_bytes());
                put(&mut b, l.req_id, &id.to_le_bytes());
                put(&mut b, l.req_sector, &sector.to_le_bytes());
                for (i, s) in segments.iter().take(MAX_DIRECT_SEGMENTS).enumerate() {
                    put(&mut b, l.req_seg + i * SEGMENT_SIZE, &s.encode());
                }
            }
            WireRequest::Discard {
                flag,
                id,
                sector,
                nr_sectors,
            } => {
                put(&mut b, l.req_operation, &[op::DISCARD]);
                put(&mut b, l.discard_flag, &[*flag]);
                put(&mut b, l.req_id, &id.to_le_bytes());
                put(&mut b, l.discard_sector, &sector.to_le_bytes());
                put(&mut b, l.discard_nr_sectors, &nr_sectors.to_le_bytes());
            }
            WireRequest::Indirect {
                indirect_op,
                nr_segments,
                id,
                sector,
                grefs,
            } => {
                put(&mut b, l.req_operation, &[op::INDIRECT]);
                put(&mut b, l.ind_op, &[*indirect_op]);
                put(&mut b, l.ind_nr_segments, &nr_segments.to_le_bytes());
                put(&mut b, l.req_id, &id.to_le_bytes());
                put(&mut b, l.ind_sector, &sector.to_le_bytes());
                for (i, g) in grefs.iter().take(MAX_INDIRECT_PAGES).enumerate() {
                    put(&mut b, l.ind_grefs + 4 * i, &g.to_le_bytes());
                }
            }
        }
        b
    }
}

/// Builds the indirect descriptor pages (4096 bytes each, 512 segments per page) for
/// `segments`, as blkfront fills them.
pub fn indirect_pages(segments: &[Segment]) -> Vec<Vec<u8>> {
    segments
        .chunks(SEGMENTS_PER_INDIRECT_PAGE)
        .map(|chunk| {
            let mut page = vec![0u8; PAGE_SIZE];
            for (i, s) in chunk.iter().enumerate() {
                put(&mut page, i * SEGMENT_SIZE, &s.encode());
            }
            page
        })
        .collect()
}

/// The frontend side of one ring; like [`super::BackRing`] it holds no memory reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockFrontend {
    abi: Abi,
    order: u8,
    capacity: u32,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl MockFrontend {
    /// A frontend for a ring of `2^order` pages in `abi`.
    pub fn new(abi: Abi, order: u8) -> Result<MockFrontend, FrontError> {
        let capacity = ring_capacity(abi, order).ok_or(FrontError::BadOrder(order))?;
        Ok(MockFrontend {
            abi,
            order,
            capacity,
            req_prod_pvt: 0,
            rsp_cons: 0,
        })
    }

    /// Bytes of ring memory needed.
    pub fn ring_bytes(&self) -> usize {
        ring_bytes(self.order)
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// `SHARED_RING_INIT` + `FRONT_RING_INIT`: zero the header, `req_event = rsp_event = 1`.
    pub fn init_shared(&mut self, mem: &SharedMem<'_>) -> Result<(), FrontError> {
        mem.zero(0, SRING_HEADER_SIZE)?;
        mem.store_u32(SRING_REQ_EVENT, 1)?;
        mem.store_u32(SRING_RSP_EVENT, 1)?;
        self.req_prod_pvt = 0;
        self.rsp_cons = 0;
        Ok(())
    }

    /// Free request slots (`RING_FREE_REQUESTS`).
    pub fn free_slots(&self) -> u32 {
        self.capacity - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Requests produced and not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    fn slot_offset(&self, idx: u32) -> usize {
        SRING_HEADER_SIZE + (idx & (self.capacity - 1)) as usize * self.abi.slot_size()
    }

    /// Writes a request into the next slot (not yet visible to the backend).
    pub fn queue(&mut self, mem: &SharedMem<'_>, req: &WireRequest) -> Result<(), FrontError> {
        let bytes = req.encode(self.abi);
        self.queue_raw(mem, &bytes)
    }

    /// Writes raw slot bytes (the first `slot_size` of `bytes`, zero-padded) into the next slot.
    pub fn queue_raw(&mut self, mem: &SharedMem<'_>, bytes: &[u8]) -> Result<(), FrontError> {
        if self.free_slots() == 0 {
            return Err(FrontError::Full);
        }
        let mut slot = [0u8; MAX_SLOT_SIZE];
        let n = bytes.len().min(self.abi.slot_size());
        if let (Some(d), Some(s)) = (slot.get_mut(..n), bytes.get(..n)) {
            d.copy_from_slice(s);
        }
        let slot = slot.get(..self.abi.slot_size()).unwrap_or(&slot);
        mem.write(self.slot_offset(self.req_prod_pvt), slot)?;
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publish queued requests, say whether to notify.
    pub fn push_requests(&mut self, mem: &SharedMem<'_>) -> Result<bool, FrontError> {
        let old = mem.load_u32(SRING_REQ_PROD)?;
        let new = self.req_prod_pvt;
        mem.store_u32_release(SRING_REQ_PROD, new)?;
        full_barrier();
        let req_event = mem.load_u32(SRING_REQ_EVENT)?;
        Ok(new.wrapping_sub(req_event) < new.wrapping_sub(old))
    }

    /// Consumes every published response into `out` as blkfront's interrupt handler does
    /// (re-arming `rsp_event` with `RING_FINAL_CHECK_FOR_RESPONSES`). Returns the count.
    pub fn take_responses(
        &mut self,
        mem: &SharedMem<'_>,
        out: &mut Vec<Response>,
    ) -> Result<usize, FrontError> {
        let mut taken = 0;
        let mut buf = [0u8; MAX_SLOT_SIZE];
        loop {
            let rsp_prod = mem.load_u32_acquire(SRING_RSP_PROD)?;
            // RING_RESPONSE_PROD_OVERFLOW: more responses than requests is a broken backend.
            if rsp_prod.wrapping_sub(self.rsp_cons) > self.in_flight() {
                return Err(FrontError::BogusRspProd {
                    rsp_prod,
                    req_prod: self.req_prod_pvt,
                });
            }
            while self.rsp_cons != rsp_prod {
                let n = self.abi.slot_size();
                let dst = buf.get_mut(..n).unwrap_or(&mut []);
                mem.read(self.slot_offset(self.rsp_cons), dst)?;
                out.push(Response::decode(self.abi, dst));
                self.rsp_cons = self.rsp_cons.wrapping_add(1);
                taken += 1;
            }
            if self.rsp_cons == self.req_prod_pvt {
                mem.store_u32(SRING_RSP_EVENT, self.rsp_cons.wrapping_add(1))?;
                full_barrier();
                return Ok(taken);
            }
            // RING_FINAL_CHECK_FOR_RESPONSES.
            let now = mem.load_u32_acquire(SRING_RSP_PROD)?;
            if now != self.rsp_cons {
                continue;
            }
            mem.store_u32(SRING_RSP_EVENT, self.rsp_cons.wrapping_add(1))?;
            full_barrier();
            let now = mem.load_u32_acquire(SRING_RSP_PROD)?;
            if now == self.rsp_cons {
                return Ok(taken);
            }
        }
    }
}
