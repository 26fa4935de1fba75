//! The back end of a blkif shared ring: consume request slots, produce responses.
//!
//! Owns: the backend's private indices (`req_cons`, `rsp_prod_pvt`) and the index protocol of
//! Xen's `io/ring.h` (`RING_HAS_UNCONSUMED_REQUESTS`, `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`,
//! `RING_FINAL_CHECK_FOR_REQUESTS`).
//!
//! Trusts: nothing the frontend writes (`req_prod`, `rsp_event`, slot contents). The memory
//! passed in each call must be the ring's pages (at least [`BackRing::ring_bytes`] bytes).
//!
//! Must never: keep a reference to shared memory between calls (each method takes the
//! [`SharedMem`] view, so the device layer owns the mapping), read a slot twice, consume more
//! than one ring's worth of requests per call or more requests than it has response slots for,
//! or publish a partially written response.

use super::abi::{
    ring_bytes, ring_capacity, Abi, SRING_HEADER_SIZE, SRING_REQ_EVENT, SRING_REQ_PROD,
    SRING_RSP_EVENT, SRING_RSP_PROD,
};
use super::request::{RequestSlot, Response};
use crate::shm::{full_barrier, OutOfBounds, SharedMem};

/// A ring-level failure: the ring cannot be used any more (the device layer closes the VBD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `ring-page-order` above the supported maximum.
    #[error("ring page order {0} is not supported (maximum 4)")]
    BadOrder(u8),
    /// The mapping is smaller than the ring.
    #[error("ring mapping of {got} bytes is smaller than the {need}-byte ring")]
    MappingTooSmall {
        /// Bytes the ring needs.
        need: usize,
        /// Bytes mapped.
        got: usize,
    },
    /// The frontend published more requests than the ring can hold (Linux blkback's
    /// "Frontend provided bogus ring requests"): it is broken or hostile.
    #[error("frontend published req_prod {req_prod} with only {rsp_prod_pvt} answered in a ring of {capacity}")]
    BogusReqProd {
        /// The `req_prod` read.
        req_prod: u32,
        /// Responses produced so far.
        rsp_prod_pvt: u32,
        /// Ring size.
        capacity: u32,
    },
    /// Recorded indices of a ring served before that cannot belong to one ring.
    #[error("recorded ring indices req_cons {req_cons}, rsp_prod_pvt {rsp_prod_pvt}, rsp_prod {rsp_prod_published} do not fit one ring")]
    BadResume {
        /// Requests consumed.
        req_cons: u32,
        /// Responses written.
        rsp_prod_pvt: u32,
        /// Responses published.
        rsp_prod_published: u32,
    },
    /// A response was pushed with no consumed request left to answer (device-layer bug).
    #[error("response pushed with no outstanding request")]
    NoOutstandingRequest,
    /// Shared memory access out of bounds (mapping too small).
    #[error("ring memory access failed")]
    Memory(#[source] OutOfBounds),
}

impl From<OutOfBounds> for RingError {
    fn from(e: OutOfBounds) -> Self {
        RingError::Memory(e)
    }
}

/// Backend state of one blkif ring; holds no reference to the ring's memory.
///
/// Every method takes the ring's memory as a [`SharedMem`]: the `2^order` pages granted as
/// `ring-ref0..N` (or `ring-ref`), mapped contiguously in that order, at least
/// [`BackRing::ring_bytes`] long and 4-byte aligned (page-aligned in practice). Passing the
/// view per call lets the device layer keep the mapping guard and the ring state side by side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackRing {
    abi: Abi,
    order: u8,
    capacity: u32,
    req_cons: u32,
    rsp_prod_pvt: u32,
    /// `rsp_prod` as we last published it (the shared copy is guest-writable).
    rsp_prod_published: u32,
}

impl BackRing {
    /// Backend state for a freshly initialised ring (`BACK_RING_INIT`: all indices 0) of
    /// `2^order` pages laid out in `abi`.
    pub fn new(abi: Abi, order: u8) -> Result<BackRing, RingError> {
        let capacity = ring_capacity(abi, order).ok_or(RingError::BadOrder(order))?;
        Ok(BackRing {
            abi,
            order,
            capacity,
            req_cons: 0,
            rsp_prod_pvt: 0,
            rsp_prod_published: 0,
        })
    }

    /// Backend state of a ring another instance of the backend served before us, from the
    /// indices it recorded: `req_cons`, `rsp_prod_pvt`, and `rsp_prod` as published (read
    /// from the shared ring by the caller, checked against its own record). Fails on an
    /// order above 4 or indices that cannot belong to one ring (more than a ring's worth
    /// between them, or out of order).
    pub fn resumed(
        abi: Abi,
        order: u8,
        req_cons: u32,
        rsp_prod_pvt: u32,
        rsp_prod_published: u32,
    ) -> Result<BackRing, RingError> {
        let mut r = BackRing::new(abi, order)?;
        let unanswered = req_cons.wrapping_sub(rsp_prod_pvt);
        let unpublished = rsp_prod_pvt.wrapping_sub(rsp_prod_published);
        if unanswered > r.capacity || unpublished > r.capacity {
            return Err(RingError::BadResume {
                req_cons,
                rsp_prod_pvt,
                rsp_prod_published,
            });
        }
        r.req_cons = req_cons;
        r.rsp_prod_pvt = rsp_prod_pvt;
        r.rsp_prod_published = rsp_prod_published;
        Ok(r)
    }

    /// The `rsp_prod` index in the shared ring now (the frontend can write it too: a hint,
    /// checked by whoever uses it).
    pub fn shared_rsp_prod(&self, mem: &SharedMem<'_>) -> Result<u32, RingError> {
        self.check_mem(mem)?;
        Ok(mem.load_u32_acquire(SRING_RSP_PROD)?)
    }

    /// `rsp_prod` as last published.
    pub fn rsp_prod_published(&self) -> u32 {
        self.rsp_prod_published
    }

    /// Writes `rsp` (whole slot) at response position `pos`, which must be written but not
    /// yet published (`rsp_prod_published <= pos < rsp_prod_pvt`): a resumed backend puts
    /// back the responses its predecessor wrote and did not publish. Indices do not move.
    pub fn rewrite_response(
        &self,
        mem: &SharedMem<'_>,
        pos: u32,
        rsp: &Response,
    ) -> Result<(), RingError> {
        self.check_mem(mem)?;
        let ahead = pos.wrapping_sub(self.rsp_prod_published);
        if ahead >= self.rsp_prod_pvt.wrapping_sub(self.rsp_prod_published) {
            return Err(RingError::NoOutstandingRequest);
        }
        let bytes = rsp.encode(self.abi);
        let slot = bytes.get(..self.abi.slot_size()).unwrap_or(&bytes);
        mem.write(self.slot_offset(pos), slot)?;
        Ok(())
    }

    /// The ABI of the slots.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// `ring-page-order`.
    pub fn order(&self) -> u8 {
        self.order
    }

    /// Slots in the ring (`RING_SIZE`).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Bytes of ring memory the methods expect (`4096 << order`).
    pub fn ring_bytes(&self) -> usize {
        ring_bytes(self.order)
    }

    /// Next request index to consume.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// Next response index to produce.
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// Requests consumed and not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    fn check_mem(&self, mem: &SharedMem<'_>) -> Result<(), RingError> {
        let need = self.ring_bytes();
        if mem.len() < need {
            return Err(RingError::MappingTooSmall {
                need,
                got: mem.len(),
            });
        }
        Ok(())
    }

    fn slot_offset(&self, idx: u32) -> usize {
        let i = (idx & (self.capacity - 1)) as usize;
        SRING_HEADER_SIZE + i * self.abi.slot_size()
    }

    /// Reads `req_prod` (Acquire: the slots it covers are visible after it) and checks it.
    ///
    /// ring.h `RING_REQUEST_PROD_OVERFLOW`: a frontend can never have more than a ring's
    /// worth of requests unanswered, so `req_prod - rsp_prod_pvt > size` means it is broken;
    /// so does a `req_prod` behind `req_cons` (indices only move forward).
    fn unconsumed(&self, mem: &SharedMem<'_>) -> Result<u32, RingError> {
        let req_prod = mem.load_u32_acquire(SRING_REQ_PROD)?;
        let unanswered = req_prod.wrapping_sub(self.rsp_prod_pvt);
        // A req_prod that moved back behind req_cons is just as broken (found by fuzzing:
        // req_prod - req_cons would otherwise wrap to ~4 billion).
        if unanswered > self.capacity || unanswered < self.outstanding() {
            return Err(RingError::BogusReqProd {
                req_prod,
                rsp_prod_pvt: self.rsp_prod_pvt,
                capacity: self.capacity,
            });
        }
        // Given the check above this is also <= the free response slots, i.e. exactly
        // RING_HAS_UNCONSUMED_REQUESTS.
        Ok(req_prod.wrapping_sub(self.req_cons))
    }

    /// Number of requests published and not consumed yet (`RING_HAS_UNCONSUMED_REQUESTS`).
    pub fn pending_requests(&self, mem: &SharedMem<'_>) -> Result<u32, RingError> {
        self.check_mem(mem)?;
        self.unconsumed(mem)
    }

    /// Copies up to `limit` published request slots (never more than one ring's worth) into
    /// `out`, each exactly once, and advances `req_cons`. Returns how many were taken.
    ///
    /// Parse each slot with [`RequestSlot::parse`]; every slot taken must get one response.
    pub fn take_requests(
        &mut self,
        mem: &SharedMem<'_>,
        out: &mut Vec<RequestSlot>,
        limit: usize,
    ) -> Result<usize, RingError> {
        self.check_mem(mem)?;
        let avail = self.unconsumed(mem)?;
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(limit);
        out.reserve(n);
        for _ in 0..n {
            let slot = RequestSlot::copy_from(mem, self.slot_offset(self.req_cons), self.abi)?;
            out.push(slot);
            self.req_cons = self.req_cons.wrapping_add(1);
        }
        Ok(n)
    }

    /// Writes one response into the next response slot (the whole slot: id, operation,
    /// status, zeroed padding) without publishing it.
    pub fn push_response(&mut self, mem: &SharedMem<'_>, rsp: &Response) -> Result<(), RingError> {
        self.check_mem(mem)?;
        if self.outstanding() == 0 {
            return Err(RingError::NoOutstandingRequest);
        }
        let bytes = rsp.encode(self.abi);
        let slot = bytes.get(..self.abi.slot_size()).unwrap_or(&bytes);
        mem.write(self.slot_offset(self.rsp_prod_pvt), slot)?;
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publishes the responses written so far and says whether the frontend must be notified
    /// (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).
    pub fn publish_responses(&mut self, mem: &SharedMem<'_>) -> Result<bool, RingError> {
        self.check_mem(mem)?;
        let old = self.rsp_prod_published;
        let new = self.rsp_prod_pvt;
        if old == new {
            return Ok(false);
        }
        // Release: the slots are visible before the index (xen_wmb()).
        mem.store_u32_release(SRING_RSP_PROD, new)?;
        self.rsp_prod_published = new;
        // xen_mb(): the index is visible before we read rsp_event.
        full_barrier();
        let rsp_event = mem.load_u32(SRING_RSP_EVENT)?;
        Ok(new.wrapping_sub(rsp_event) < new.wrapping_sub(old))
    }

    /// Before sleeping: says whether requests arrived, else arms `req_event` so the frontend
    /// notifies on the next one (`RING_FINAL_CHECK_FOR_REQUESTS`).
    pub fn final_check_for_requests(&mut self, mem: &SharedMem<'_>) -> Result<bool, RingError> {
        self.check_mem(mem)?;
        if self.unconsumed(mem)? > 0 {
            return Ok(true);
        }
        mem.store_u32(SRING_REQ_EVENT, self.req_cons.wrapping_add(1))?;
        full_barrier();
        Ok(self.unconsumed(mem)? > 0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::ring::front::{MockFrontend, WireRequest};
    use crate::ring::request::{Limits, Parsed, Segment, Status};

    fn seg() -> Vec<Segment> {
        vec![Segment {
            gref: 1,
            first_sect: 0,
            last_sect: 7,
        }]
    }

    fn setup(abi: Abi, order: u8) -> (Vec<u8>, MockFrontend, BackRing) {
        let buf = vec![0u8; ring_bytes(order)];
        let front = MockFrontend::new(abi, order).unwrap();
        let back = BackRing::new(abi, order).unwrap();
        (buf, front, back)
    }

    #[test]
    fn requests_round_trip_through_every_abi_and_order() {
        for abi in Abi::ALL {
            for order in 0..=4 {
                let (mut buf, mut front, mut back) = setup(abi, order);
                let mem = SharedMem::from_mut_slice(&mut buf);
                front.init_shared(&mem).unwrap();
                let cap = back.capacity();
                let mut slots = Vec::new();
                let mut rsps = Vec::new();
                // Three times around the ring so slot indices wrap.
                for round in 0..3u64 {
                    for i in 0..u64::from(cap) {
                        front
                            .queue(&mem, &WireRequest::read(round << 32 | i, i * 8, seg()))
                            .unwrap();
                    }
                    assert_eq!(
                        front.queue(&mem, &WireRequest::flush(0)),
                        Err(crate::ring::front::FrontError::Full)
                    );
                    front.push_requests(&mem).unwrap();
                    slots.clear();
                    let n = back.take_requests(&mem, &mut slots, usize::MAX).unwrap();
                    assert_eq!(n, cap as usize, "{abi} order {order}");
                    for (i, s) in slots.iter().enumerate() {
                        let Ok(Parsed::Ready(r)) = s.parse(&Limits::new(1 << 30)) else {
                            panic!("slot {i} did not parse")
                        };
                        assert_eq!(r.id, round << 32 | i as u64);
                        back.push_response(&mem, &r.response(Status::Okay)).unwrap();
                    }
                    back.publish_responses(&mem).unwrap();
                    rsps.clear();
                    assert_eq!(front.take_responses(&mem, &mut rsps).unwrap(), cap as usize);
                    for (i, r) in rsps.iter().enumerate() {
                        assert_eq!(r.id, round << 32 | i as u64);
                        assert_eq!(r.status, Status::Okay);
                    }
                }
            }
        }
    }

    #[test]
    fn take_requests_respects_limit_and_leaves_the_rest() {
        let (mut buf, mut front, mut back) = setup(Abi::Native, 0);
        let mem = SharedMem::from_mut_slice(&mut buf);
        front.init_shared(&mem).unwrap();
        for i in 0..10 {
            front.queue(&mem, &WireRequest::flush(i)).unwrap();
        }
        front.push_requests(&mem).unwrap();
        let mut slots = Vec::new();
        assert_eq!(back.take_requests(&mem, &mut slots, 4).unwrap(), 4);
        assert_eq!(back.pending_requests(&mem).unwrap(), 6);
        assert_eq!(back.take_requests(&mem, &mut slots, 100).unwrap(), 6);
        assert_eq!(back.take_requests(&mem, &mut slots, 100).unwrap(), 0);
        assert_eq!(
            slots.iter().map(|s| s.id()).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(back.outstanding(), 10);
    }

    #[test]
    fn bogus_req_prod_beyond_one_ring_is_a_broken_frontend() {
        let (mut buf, mut front, mut back) = setup(Abi::X86_32, 0);
        let mem = SharedMem::from_mut_slice(&mut buf);
        front.init_shared(&mem).unwrap();
        mem.store_u32(SRING_REQ_PROD, 33).unwrap();
        let mut slots = Vec::new();
        let e = back
            .take_requests(&mem, &mut slots, usize::MAX)
            .unwrap_err();
        assert!(matches!(e, RingError::BogusReqProd { req_prod: 33, .. }));
        assert!(slots.is_empty());
        // A req_prod "behind" req_cons is a huge unsigned distance: also refused.
        mem.store_u32(SRING_REQ_PROD, u32::MAX).unwrap();
        assert!(back.pending_requests(&mem).is_err());
    }

    #[test]
    fn req_prod_moving_backwards_is_a_broken_frontend() {
        let (mut buf, mut front, mut back) = setup(Abi::Native, 0);
        let mem = SharedMem::from_mut_slice(&mut buf);
        front.init_shared(&mem).unwrap();
        for i in 0..5 {
            front.queue(&mem, &WireRequest::flush(i)).unwrap();
        }
        front.push_requests(&mem).unwrap();
        let mut slots = Vec::new();
        assert_eq!(back.take_requests(&mem, &mut slots, usize::MAX).unwrap(), 5);
        mem.store_u32(SRING_REQ_PROD, 3).unwrap();
        assert!(matches!(
            back.take_requests(&mem, &mut slots, usize::MAX),
            Err(RingError::BogusReqProd { req_prod: 3, .. })
        ));
        assert_eq!(slots.len(), 5);
        assert_eq!(back.outstanding(), 5);
    }

    #[test]
    fn requests_beyond_free_response_slots_are_refused() {
        let (mut buf, mut front, mut back) = setup(Abi::X86_64, 0);
        let mem = SharedMem::from_mut_slice(&mut buf);
        front.init_shared(&mem).unwrap();
        for i in 0..32 {
            front.queue(&mem, &WireRequest::flush(i)).unwrap();
        }
        front.push_requests(&mem).unwrap();
        let mut slots = Vec::new();
        assert_eq!(
            back.take_requests(&mem, &mut slots, usize::MAX).unwrap(),
            32
        );
        // Nothing answered yet: a frontend claiming one more request overruns the ring.
        mem.store_u32(SRING_REQ_PROD, 33).unwrap();
        assert!(matches!(
            back.take_requests(&mem, &mut slots, usize::MAX),
            Err(RingError::BogusReqProd { .. })
        ));
        // After one response, one more request is legitimate.
        let first = Response {
            id: slots[0].id(),
            operation: slots[0].operation(),
            status: Status::Okay,
        };
        back.push_response(&mem, &first).unwrap();
        assert_eq!(back.take_requests(&mem, &mut slots, usize::MAX).unwrap(), 1);
    }

    #[test]
    fn push_response_without_outstanding_request_is_refused() {
        let (mut buf, _front, mut back) = setup(Abi::Native, 0);
        let mem = SharedMem::from_mut_slice(&mut buf);
        let rsp = Response {
            id: 1,
            operation: 0,
            status: Status::Okay,
        };
        assert_eq!(
            back.push_response(&mem, &rsp),
            Err(RingError::NoOutstandingRequest)
        );
    }

    #[test]
    fn response_overwrites_the_whole_slot() {
        for abi in Abi::ALL {
            let (mut buf, mut front, mut back) = setup(abi, 0);
            let mem = SharedMem::from_mut_slice(&mut buf);
            front.init_shared(&mem).unwrap();
            front
                .queue(
                    &mem,
                    &WireRequest::write(0xabcd, 0, vec![Segment::default(); 11]),
                )
                .unwrap();
            front.push_requests(&mem).unwrap();
            // Stale bytes everywhere in the slot.
            mem.write(SRING_HEADER_SIZE, &[0xaa; 112]).unwrap();
            let mut slots = Vec::new();
            back.take_requests(&mem, &mut slots, 1).unwrap();
            let rsp = Response {
                id: 0xabcd,
                operation: 1,
                status: Status::Error,
            };
            back.push_response(&mem, &rsp).unwrap();
            let mut slot = vec![0u8; abi.slot_size()];
            mem.read(SRING_HEADER_SIZE, &mut slot).unwrap();
            assert_eq!(slot, rsp.encode(abi)[..abi.slot_size()].to_vec(), "{abi}");
            // The next slot is untouched.
            let mut next = [0u8; 1];
            mem.read(SRING_HEADER_SIZE + abi.slot_size(), &mut next)
                .unwrap();
            assert_eq!(next[0], if abi.slot_size() < 112 { 0xaa } else { 0 });
        }
    }

    #[test]
    fn publish_notifies_only_when_rsp_event_is_crossed() {
        let (mut buf, mut front, mut back) = setup(Abi::Native, 0);
        let mem = SharedMem::from_mut_slice(&mut buf);
        front.init_shared(&mem).unwrap();
        for i in 0..4 {
            front.queue(&mem, &WireRequest::flush(i)).unwrap();
        }
        // First push crosses req_event = 1: notify.
        assert!(front.push_requests(&mem).unwrap());
        let mut slots = Vec::new();
        back.take_requests(&mem, &mut slots, usize::MAX).unwrap();
        let ok = |id| Response {
            id,
            operation: 3,
            status: Status::Okay,
        };
        // Nothing pushed: no notification.
        assert!(!back.publish_responses(&mem).unwrap());
        back.push_response(&mem, &ok(0)).unwrap();
        // rsp_event = 1 and rsp_prod goes 0 -> 1: notify.
        assert!(back.publish_responses(&mem).unwrap());
        // Frontend has not consumed yet (rsp_event still 1): 1 -> 3 does not cross it.
        back.push_response(&mem, &ok(1)).unwrap();
        back.push_response(&mem, &ok(2)).unwrap();
        assert!(!back.publish_responses(&mem).unwrap());
        // Frontend consumes and re-arms rsp_event = rsp_cons + 1 = 4.
        let mut rsps = Vec::new();
        assert_eq!(front.take_responses(&mem, &mut rsps).unwrap(), 3);
        assert_eq!(mem.load_u32(SRING_RSP_EVENT).unwrap(), 4);
        back.push_response(&mem, &ok(3)).unwrap();
        assert!(back.publish_responses(&mem).unwrap());
    }

    #[test]
    fn final_check_arms_req_event_and_sees_late_requests() {
        let (mut buf, mut front, mut back) = setup(Abi::Native, 1);
        let mem = SharedMem::from_mut_slice(&mut buf);
        front.init_shared(&mem).unwrap();
        assert!(!back.final_check_for_requests(&mem).unwrap());
        assert_eq!(mem.load_u32(SRING_REQ_EVENT).unwrap(), 1);
        front.queue(&mem, &WireRequest::flush(9)).unwrap();
        // req_event = 1 armed by the backend: the frontend's push must notify.
        assert!(front.push_requests(&mem).unwrap());
        assert!(back.final_check_for_requests(&mem).unwrap());
        let mut slots = Vec::new();
        back.take_requests(&mem, &mut slots, usize::MAX).unwrap();
        assert!(!back.final_check_for_requests(&mem).unwrap());
        assert_eq!(mem.load_u32(SRING_REQ_EVENT).unwrap(), 2);
        // A second request without re-arming would not notify: req_event stays 2 until
        // the backend sleeps again, so a push of 1 -> 3 crosses it once.
        front.queue(&mem, &WireRequest::flush(10)).unwrap();
        front.queue(&mem, &WireRequest::flush(11)).unwrap();
        assert!(front.push_requests(&mem).unwrap());
    }

    #[test]
    fn mapping_smaller_than_the_ring_is_refused() {
        let mut buf = vec![0u8; 4096];
        let mem = SharedMem::from_mut_slice(&mut buf);
        let mut back = BackRing::new(Abi::Native, 1).unwrap();
        let mut slots = Vec::new();
        assert!(matches!(
            back.take_requests(&mem, &mut slots, 1),
            Err(RingError::MappingTooSmall {
                need: 8192,
                got: 4096
            })
        ));
    }

    #[test]
    fn order_above_four_is_refused() {
        assert_eq!(BackRing::new(Abi::Native, 5), Err(RingError::BadOrder(5)));
    }
}
