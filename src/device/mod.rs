//! The device layer: one virtual block device (VBD) wired from xenstore to a storage engine.
//!
//! Owns: the xenbus handshake of each VBD, the per-queue dataplane threads, the mapping of
//! ring requests to engine operations and of their results back to responses.
//! Trusts: nothing the frontend writes (xenstore nodes, ring contents) and nothing in `params`.
//! Must never: touch guest memory except through [`crate::shm`] and [`crate::xen`], block a
//! dataplane thread on the cluster, or let one VBD's failure stop another's.

pub mod backend;
pub mod clients;
pub mod crashpoint;
pub mod dataplane;
pub mod frontend;
pub mod grants;
pub mod journal;
pub mod metrics;
pub mod params;
pub mod persistent;
pub mod queue;
pub mod stall;
pub mod supervisor;
#[cfg(any(test, feature = "test-utils"))]
pub mod testfront;
pub mod vbd;
pub mod xenbus;
