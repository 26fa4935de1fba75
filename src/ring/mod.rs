//! The Xen blkif ring protocol as a pure library: bytes in, validated requests out;
//! responses in, bytes out.
//!
//! Owns: the wire formats of the three ABIs ([`abi`]), request validation and the mapping of
//! every rejection to a `BLKIF_RSP_*` status ([`request`]), and the backend's side of the
//! shared-ring index protocol ([`BackRing`]). A mock blkfront ([`front`]) exists for tests,
//! fuzzing and benches (`test-utils` feature).
//!
//! Trusts: nothing the frontend writes. Every slot is copied out of shared memory exactly once
//! (through [`crate::shm`]) into a [`RequestSlot`], the parser's only input.
//!
//! Must never: make a syscall, spawn a thread, know about grants, event channels or RADOS,
//! panic or index out of bounds on guest input (`clippy::indexing_slicing` and `unwrap_used`
//! are denied here), or consume more than one ring's worth of requests per call.
//!
//! Typical use by the device layer, per wake-up:
//! 1. [`BackRing::take_requests`] into a reused `Vec<RequestSlot>`;
//! 2. [`RequestSlot::parse`] each slot: `Ready(Request)`, `NeedsIndirectPages(..)` (copy the
//!    pages named by `page_grefs()`, then [`IndirectRequest::complete`]), or `Rejected` (answer
//!    with [`Rejected::response`]); the device layer also refuses a duplicate in-flight `id`;
//! 3. as I/O completes, [`BackRing::push_response`], then once per batch
//!    [`BackRing::publish_responses`] (notify if it returns true);
//! 4. before sleeping, [`BackRing::final_check_for_requests`].
//!
//! A [`RingError`] means the frontend is broken (bogus `req_prod`) or the mapping is wrong: the
//! device layer stops the ring and closes the VBD.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod abi;
mod back;
#[cfg(any(test, feature = "test-utils"))]
pub mod front;
pub mod request;

pub use abi::Abi;
pub use back::{BackRing, RingError};
pub use request::{
    Discard, IndirectRequest, Limits, Op, Parsed, Rejected, Request, RequestError, RequestKind,
    RequestSlot, Response, Segment, Segments, Status, Transfer,
};
