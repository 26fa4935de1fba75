//! The Xen platform layer: the only code that talks to Xen.
//!
//! Owns: grant-table mappings and grant copies, event channels, and the xenstore client —
//! behind a few small traits ([`Platform`], [`GrantTable`], [`EventChannels`]) with two
//! implementations: [`real`] (libxengnttab and libxenevtchn through bindgen, xenstore over
//! `/dev/xen/xenbus` or xenstored's socket) and [`sim`] (memfd pages as grants, eventfds as
//! event channels, an in-process xenstored speaking the real `xs_wire.h` protocol, so the
//! production [`xenstore::Xenstore`] client is the code under test).
//! Trusts: nothing a guest controls: grant references, ports and xenstore contents are just
//! numbers and strings to it; every grant's status is checked one by one.
//! Must never: hand out a Rust reference into guest memory (mappings give [`SharedMem`]
//! views), unmap a mapping twice or while a view of it is alive (the view borrows the
//! mapping), or block a caller on another caller's xenstore request.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use thiserror::Error;

use crate::shm::SharedMem;

pub mod real;
pub mod sim;
pub mod xenstore;

/// A domain id.
pub type DomId = u16;
/// A grant reference.
pub type GrantRef = u32;
/// An event channel port.
pub type Port = u32;

/// `GNTST_okay`.
pub const GNTST_OKAY: i16 = 0;
/// `GNTST_general_error`.
pub const GNTST_GENERAL_ERROR: i16 = -1;
/// `GNTST_bad_domain`.
pub const GNTST_BAD_DOMAIN: i16 = -2;
/// `GNTST_bad_gntref`.
pub const GNTST_BAD_GNTREF: i16 = -3;
/// `GNTST_bad_copy_arg`.
pub const GNTST_BAD_COPY_ARG: i16 = -10;
/// `GNTST_permission_denied`.
pub const GNTST_PERMISSION_DENIED: i16 = -8;

/// Xen's name for a grant status (`GNTTABOP_error_msgs`).
pub fn gntst_name(status: i16) -> &'static str {
    match status {
        0 => "okay",
        -1 => "undefined error",
        -2 => "unrecognised domain id",
        -3 => "invalid grant reference",
        -4 => "invalid mapping handle",
        -5 => "invalid virtual address",
        -6 => "invalid device address",
        -7 => "no spare translation slot in the I/O MMU",
        -8 => "permission denied",
        -9 => "bad page",
        -10 => "copy arguments cross page boundary",
        -11 => "page address size too large",
        -12 => "operation not done; try again",
        _ => "unknown grant status",
    }
}

/// An error of the Xen layer.
#[derive(Debug, Error)]
pub enum XenError {
    /// A `/dev/xen` node (or the xenstore socket) could not be opened.
    #[error("cannot open {}", node.display())]
    Open {
        /// The node.
        node: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A grant operation was refused for one grant.
    #[error("grant {gref} of domain {domid}: {what}: {} (status {status})", gntst_name(*status))]
    GrantStatus {
        /// The failing grant.
        gref: GrantRef,
        /// Its domain.
        domid: DomId,
        /// Xen's status (`GNTST_*`).
        status: i16,
        /// What was attempted.
        what: &'static str,
    },
    /// An event channel operation failed.
    #[error("event channel {what} (port {port})")]
    Evtchn {
        /// What was attempted.
        what: &'static str,
        /// The port.
        port: Port,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another I/O error.
    #[error("{what}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A xenstore error.
    #[error("xenstore")]
    Xenstore(#[from] xenstore::XsError),
    /// An argument the layer refuses (e.g. too many grants in one mapping).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl XenError {
    pub(crate) fn io(what: &'static str, source: std::io::Error) -> XenError {
        XenError::Io { what, source }
    }
}

/// The platform: where grant tables, event channels and xenstore connections come from.
pub trait Platform: Send + Sync + 'static {
    /// The grant table implementation.
    type Gnttab: GrantTable;
    /// The event channel implementation.
    type Evtchn: EventChannels;
    /// A grant table handle (cheap to share through `Arc`).
    fn gnttab(&self) -> Result<Self::Gnttab, XenError>;
    /// A new event channel handle (one per dataplane thread).
    fn evtchn(&self) -> Result<Self::Evtchn, XenError>;
    /// A new xenstore connection.
    fn xenstore(&self) -> Result<xenstore::Xenstore, XenError>;
    /// Where [`Platform::xenstore`] connects (xenstored's socket or `/dev/xen/xenbus`): a
    /// sandboxed backend's broker forwards its connection there
    /// ([`xenstore::proxy`]).
    fn xenstore_path(&self) -> PathBuf;
    /// A new event channel handle that can bind only ports of `domid` (Linux's
    /// `IOCTL_EVTCHN_RESTRICT_DOMID`, what `xenevtchn_restrict` and QEMU's `dm_restrict` use),
    /// as descriptors: a privileged process opens it for a sandboxed backend that cannot open
    /// `/dev/xen/evtchn` itself ([`Platform::evtchn_import`] on the other side).
    fn evtchn_export(&self, domid: DomId) -> Result<Vec<OwnedFd>, XenError> {
        let _ = domid;
        Err(XenError::Invalid(
            "this platform cannot hand event channel handles to another process".into(),
        ))
    }
    /// The event channel handle [`Platform::evtchn_export`] made, from its descriptors.
    fn evtchn_import(&self, fds: Vec<OwnedFd>) -> Result<Self::Evtchn, XenError> {
        drop(fds);
        Err(XenError::Invalid(
            "this platform cannot take event channel handles from another process".into(),
        ))
    }
}

/// Grant-table access to other domains' pages.
pub trait GrantTable: Send + Sync {
    /// A mapping of granted pages.
    type Mapping: GrantMapping;
    /// Maps `refs` of `domid` into one contiguous range, read-only or writable. All or
    /// nothing: the error names the first failing grant and its status.
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Self::Mapping, XenError>;
    /// Grant copy. Fails as a whole only when the copy could not be attempted; each
    /// segment's own outcome is in its `status` (0 = `GNTST_okay`).
    fn copy(&self, segs: &mut [CopySeg<'_>]) -> Result<(), XenError>;
}

/// Granted pages mapped into this process; dropping it unmaps them, exactly once.
pub trait GrantMapping: Send + std::fmt::Debug {
    /// The mapped bytes (`refs().len()` pages).
    fn mem(&self) -> SharedMem<'_>;
    /// The grants mapped, in order.
    fn refs(&self) -> &[GrantRef];
}

/// Direction and host buffer of one grant copy segment.
#[derive(Debug)]
pub enum CopyDir<'a> {
    /// Copy from the guest page into `dst`.
    FromGuest {
        /// Destination (its length is the copy length).
        dst: &'a mut [u8],
    },
    /// Copy `src` into the guest page.
    ToGuest {
        /// Source (its length is the copy length).
        src: &'a [u8],
    },
}

impl CopyDir<'_> {
    /// Bytes to copy.
    pub fn len(&self) -> usize {
        match self {
            CopyDir::FromGuest { dst } => dst.len(),
            CopyDir::ToGuest { src } => src.len(),
        }
    }

    /// Whether nothing is copied.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One grant copy segment: a piece of one granted page and a host buffer.
#[derive(Debug)]
pub struct CopySeg<'a> {
    /// The granting domain.
    pub domid: DomId,
    /// The grant.
    pub gref: GrantRef,
    /// Offset in the granted page.
    pub offset: u16,
    /// Direction and host buffer.
    pub dir: CopyDir<'a>,
    /// Outcome, set by [`GrantTable::copy`].
    pub status: i16,
}

impl CopySeg<'_> {
    /// Whether the segment stays within one page.
    pub fn fits_page(&self) -> bool {
        usize::from(self.offset) + self.dir.len() <= PAGE_SIZE
    }
}

/// Page size of grants.
pub const PAGE_SIZE: usize = 4096;

/// Event channels: one handle per thread; ports bound through it are unbound when it drops.
pub trait EventChannels: Send + AsFd {
    /// Binds to `remote` port of `domid`; returns our local port.
    fn bind_interdomain(&mut self, domid: DomId, remote: Port) -> Result<Port, XenError>;
    /// Unbinds a local port.
    fn unbind(&mut self, port: Port) -> Result<(), XenError>;
    /// Notifies the other end of `port`.
    fn notify(&self, port: Port) -> Result<(), XenError>;
    /// Unmasks `port` after its event was handled.
    fn unmask(&self, port: Port) -> Result<(), XenError>;
    /// The next pending port, or `None` (non-blocking; poll the fd first).
    fn pending(&self) -> Result<Option<Port>, XenError>;
}
