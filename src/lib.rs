//! rbdback: a userspace Ceph RBD block backend for Xen.
//!
//! Three layers that know nothing of each other, wired per virtual block device:
//! - [`ring`]: the blkif wire protocol, pure (bytes in, validated requests out).
//! - [`xen`]: grant tables, event channels and xenstore (real bindings and a simulated Xen).
//! - [`rados`]: storage engines over librados/librbd; never sees a grant or a ring.
//! - [`shm`]: the only code that touches guest-shared memory (volatile/atomic, bounds checked).
//! - [`sandbox`]: least privilege for `serve` (the drop, Landlock, seccomp) and the broker that
//!   stays privileged on its behalf.
//! - [`control`] and [`exporter`]: what operators ask a running process (the control socket of
//!   each `serve`, `rbdback status`) and the Prometheus endpoint over all of them.

pub mod control;
#[cfg(feature = "csi")]
pub mod csi;
pub mod device;
pub mod exporter;
pub mod fdmsg;
pub mod rados;
pub mod ring;
pub mod sandbox;
pub mod shm;
pub mod xen;

#[cfg(feature = "test-utils")]
pub mod demo;
#[cfg(feature = "test-utils")]
pub mod soak;

/// An error and its causes on one line (`outer: cause: root cause`), for logs, xenstore
/// `error` nodes and gRPC statuses.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
