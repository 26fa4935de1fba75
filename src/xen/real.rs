//! The real Xen: libxengnttab and libxenevtchn through bindgen, xenstore over
//! `/dev/xen/xenbus` or xenstored's socket.
//!
//! Owns: the C handles and every `unsafe` call into Xen's libraries.
//! Trusts: the libraries' contracts (documented in `xengnttab.h`, `xenevtchn.h`).
//! Must never: unmap a mapping twice or while a view of it lives (the view borrows the
//! [`RealMapping`]), or leave a bound port behind (handles unbind on drop).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::xenstore::Xenstore;
use super::{
    CopyDir, CopySeg, DomId, EventChannels, GrantMapping, GrantRef, GrantTable, Platform, Port,
    XenError, GNTST_GENERAL_ERROR, PAGE_SIZE,
};
use crate::shm::SharedMem;

#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    missing_docs,
    missing_debug_implementations,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks
)]
mod ffi {
    include!(concat!(env!("OUT_DIR"), "/xen_bindings.rs"));
}

const GNTCOPY_SOURCE_GREF: u16 = 1;
const GNTCOPY_DEST_GREF: u16 = 2;

/// Where the kernel exposes grant mapping.
pub const GNTDEV: &str = "/dev/xen/gntdev";
/// Where the kernel exposes event channels.
pub const EVTCHN: &str = "/dev/xen/evtchn";

fn missing(node: &str) -> Option<XenError> {
    let p = Path::new(node);
    (!p.exists()).then(|| XenError::Open {
        node: PathBuf::from(node),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such device node (is this a Xen dom0 with xen-gntdev/xen-evtchn loaded?)",
        ),
    })
}

/// The real platform (dom0 or a driver domain).
#[derive(Debug, Default, Clone, Copy)]
pub struct RealPlatform;

impl RealPlatform {
    /// The platform of the running system.
    pub fn new() -> Self {
        RealPlatform
    }
}

impl Platform for RealPlatform {
    type Gnttab = RealGnttab;
    type Evtchn = RealEvtchn;

    fn gnttab(&self) -> Result<RealGnttab, XenError> {
        RealGnttab::open()
    }

    fn evtchn(&self) -> Result<RealEvtchn, XenError> {
        RealEvtchn::open()
    }

    fn xenstore(&self) -> Result<Xenstore, XenError> {
        Xenstore::open_default().map_err(|e| match e {
            super::xenstore::XsError::Io(source) => XenError::Open {
                node: std::env::var_os("XENSTORED_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/dev/xen/xenbus")),
                source,
            },
            other => other.into(),
        })
    }
}

/// A libxengnttab handle.
#[derive(Debug)]
pub struct RealGnttab {
    h: NonNull<ffi::xengnttab_handle>,
}

// SAFETY: a xengnttab handle wraps a file descriptor; its map, unmap and copy calls are ioctls
// that the kernel serialises, and libxengnttab keeps no unsynchronised per-handle state.
unsafe impl Send for RealGnttab {}
// SAFETY: as above.
unsafe impl Sync for RealGnttab {}

impl RealGnttab {
    /// Opens `/dev/xen/gntdev`.
    pub fn open() -> Result<RealGnttab, XenError> {
        if let Some(e) = missing(GNTDEV) {
            return Err(e);
        }
        // SAFETY: NULL logger means stderr; flags 0. Returns NULL with errno on failure.
        let h = unsafe { ffi::xengnttab_open(std::ptr::null_mut(), 0) };
        NonNull::new(h)
            .map(|h| RealGnttab { h })
            .ok_or_else(|| XenError::Open {
                node: PathBuf::from(GNTDEV),
                source: std::io::Error::last_os_error(),
            })
    }

    fn map_raw(&self, domid: DomId, refs: &[GrantRef], prot: i32) -> Option<NonNull<u8>> {
        let count = u32::try_from(refs.len()).ok()?;
        let mut r = refs.to_vec();
        // SAFETY: `r` holds `count` grant references; the library returns NULL on failure or
        // a mapping of count pages that we own until xengnttab_unmap.
        let p = unsafe {
            ffi::xengnttab_map_domain_grant_refs(
                self.h.as_ptr(),
                count,
                u32::from(domid),
                r.as_mut_ptr(),
                prot,
            )
        };
        NonNull::new(p.cast::<u8>())
    }
}

impl Drop for RealGnttab {
    fn drop(&mut self) {
        // SAFETY: the handle came from xengnttab_open and is closed once, here. Mappings hold
        // an Arc'd gnttab in the device layer, so none outlives the handle.
        unsafe { ffi::xengnttab_close(self.h.as_ptr()) };
    }
}

/// Pages mapped through libxengnttab.
#[derive(Debug)]
pub struct RealMapping {
    h: NonNull<ffi::xengnttab_handle>,
    ptr: NonNull<u8>,
    refs: Vec<GrantRef>,
}

// SAFETY: the mapping is shared memory accessed only through SharedMem's volatile/atomic
// accessors; unmapping happens once in Drop.
unsafe impl Send for RealMapping {}

impl GrantMapping for RealMapping {
    fn mem(&self) -> SharedMem<'_> {
        // SAFETY: ptr maps refs.len() pages until Drop; the view borrows self.
        unsafe { SharedMem::from_raw(self.ptr, self.refs.len() * PAGE_SIZE) }
    }
    fn refs(&self) -> &[GrantRef] {
        &self.refs
    }
}

impl Drop for RealMapping {
    fn drop(&mut self) {
        let count = u32::try_from(self.refs.len()).unwrap_or(0);
        // SAFETY: ptr/count are exactly what xengnttab_map_domain_grant_refs returned; this is
        // the only unmap. The handle outlives the mapping (see RealGnttab's Drop).
        unsafe { ffi::xengnttab_unmap(self.h.as_ptr(), self.ptr.as_ptr().cast(), count) };
    }
}

impl GrantTable for RealGnttab {
    type Mapping = RealMapping;

    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<RealMapping, XenError> {
        if refs.is_empty() || refs.len() > 1024 {
            return Err(XenError::Invalid(format!(
                "{} grants in one mapping",
                refs.len()
            )));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        if let Some(ptr) = self.map_raw(domid, refs, prot) {
            return Ok(RealMapping {
                h: self.h,
                ptr,
                refs: refs.to_vec(),
            });
        }
        let errno = std::io::Error::last_os_error();
        // libxengnttab maps all or nothing and reports no per-grant status: find the first
        // failing grant by mapping them one by one (error path only).
        for &r in refs {
            match self.map_raw(domid, &[r], prot) {
                Some(p) => {
                    // SAFETY: a one-page mapping we just made; unmapped once here.
                    unsafe { ffi::xengnttab_unmap(self.h.as_ptr(), p.as_ptr().cast(), 1) };
                }
                None => {
                    return Err(XenError::GrantStatus {
                        gref: r,
                        domid,
                        status: GNTST_GENERAL_ERROR,
                        what: "map",
                    })
                }
            }
        }
        Err(XenError::io("map grants", errno))
    }

    fn copy(&self, segs: &mut [CopySeg<'_>]) -> Result<(), XenError> {
        let mut raw: Vec<ffi::xengnttab_grant_copy_segment_t> = Vec::with_capacity(segs.len());
        for s in segs.iter_mut() {
            let len = u16::try_from(s.dir.len()).unwrap_or(u16::MAX);
            // SAFETY: the segment is plain old data; zero is a valid bit pattern for it.
            let mut c: ffi::xengnttab_grant_copy_segment_t = unsafe { std::mem::zeroed() };
            c.len = len;
            let foreign = ffi::xengnttab_grant_copy_segment_xengnttab_copy_ptr__bindgen_ty_1 {
                ref_: s.gref,
                offset: s.offset,
                domid: s.domid,
            };
            match &mut s.dir {
                CopyDir::FromGuest { dst } => {
                    c.flags = GNTCOPY_SOURCE_GREF;
                    c.source.foreign = foreign;
                    c.dest.virt = dst.as_mut_ptr().cast();
                }
                CopyDir::ToGuest { src } => {
                    c.flags = GNTCOPY_DEST_GREF;
                    c.source.virt = src.as_ptr().cast_mut().cast();
                    c.dest.foreign = foreign;
                }
            }
            raw.push(c);
        }
        let count =
            u32::try_from(raw.len()).map_err(|_| XenError::Invalid("too many segments".into()))?;
        // SAFETY: `raw` holds `count` segments whose virt pointers point into the caller's
        // buffers, borrowed (through `segs`) for the whole call, with the given lengths.
        let rc = unsafe { ffi::xengnttab_grant_copy(self.h.as_ptr(), count, raw.as_mut_ptr()) };
        if rc != 0 {
            return Err(XenError::io("grant copy", std::io::Error::last_os_error()));
        }
        for (s, c) in segs.iter_mut().zip(&raw) {
            s.status = c.status;
        }
        Ok(())
    }
}

/// A libxenevtchn handle (non-blocking fd).
#[derive(Debug)]
pub struct RealEvtchn {
    h: NonNull<ffi::xenevtchn_handle>,
    bound: Vec<Port>,
}

// SAFETY: the handle wraps a file descriptor; it is used by one thread at a time (&mut for
// binding, and the queue thread owns it).
unsafe impl Send for RealEvtchn {}

impl RealEvtchn {
    /// Opens `/dev/xen/evtchn`.
    pub fn open() -> Result<RealEvtchn, XenError> {
        if let Some(e) = missing(EVTCHN) {
            return Err(e);
        }
        // SAFETY: NULL logger, flags 0; NULL with errno on failure.
        let h = unsafe { ffi::xenevtchn_open(std::ptr::null_mut(), 0) };
        let h = NonNull::new(h).ok_or_else(|| XenError::Open {
            node: PathBuf::from(EVTCHN),
            source: std::io::Error::last_os_error(),
        })?;
        let ev = RealEvtchn {
            h,
            bound: Vec::new(),
        };
        let fd = ev.as_fd();
        let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| XenError::io("evtchn fcntl", e.into()))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| XenError::io("evtchn fcntl", e.into()))?;
        Ok(ev)
    }
}

impl AsFd for RealEvtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the handle is valid for self's lifetime.
        let fd = unsafe { ffi::xenevtchn_fd(self.h.as_ptr()) };
        // SAFETY: xenevtchn_fd returns the handle's open descriptor, which stays open until
        // xenevtchn_close in Drop; the borrow is tied to self.
        unsafe { BorrowedFd::borrow_raw(fd) }
    }
}

fn ev_err(what: &'static str, port: Port) -> XenError {
    XenError::Evtchn {
        what,
        port,
        source: std::io::Error::last_os_error(),
    }
}

impl EventChannels for RealEvtchn {
    fn bind_interdomain(&mut self, domid: DomId, remote: Port) -> Result<Port, XenError> {
        // SAFETY: valid handle; returns the local port or -1 with errno.
        let p =
            unsafe { ffi::xenevtchn_bind_interdomain(self.h.as_ptr(), u32::from(domid), remote) };
        let port = Port::try_from(p).map_err(|_| ev_err("bind_interdomain", remote))?;
        self.bound.push(port);
        Ok(port)
    }

    fn unbind(&mut self, port: Port) -> Result<(), XenError> {
        // SAFETY: valid handle; an unknown port is an error return, not UB.
        if unsafe { ffi::xenevtchn_unbind(self.h.as_ptr(), port) } < 0 {
            return Err(ev_err("unbind", port));
        }
        self.bound.retain(|&p| p != port);
        Ok(())
    }

    fn notify(&self, port: Port) -> Result<(), XenError> {
        // SAFETY: valid handle.
        if unsafe { ffi::xenevtchn_notify(self.h.as_ptr(), port) } < 0 {
            return Err(ev_err("notify", port));
        }
        Ok(())
    }

    fn unmask(&self, port: Port) -> Result<(), XenError> {
        // SAFETY: valid handle.
        if unsafe { ffi::xenevtchn_unmask(self.h.as_ptr(), port) } < 0 {
            return Err(ev_err("unmask", port));
        }
        Ok(())
    }

    fn pending(&self) -> Result<Option<Port>, XenError> {
        // SAFETY: valid handle; the fd is non-blocking, so this returns -1/EAGAIN when idle.
        let p = unsafe { ffi::xenevtchn_pending(self.h.as_ptr()) };
        match Port::try_from(p) {
            Ok(port) => Ok(Some(port)),
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    Ok(None)
                } else {
                    Err(XenError::Evtchn {
                        what: "pending",
                        port: 0,
                        source: e,
                    })
                }
            }
        }
    }
}

impl Drop for RealEvtchn {
    fn drop(&mut self) {
        for p in self.bound.drain(..) {
            // SAFETY: valid handle; each bound port is unbound once.
            unsafe { ffi::xenevtchn_unbind(self.h.as_ptr(), p) };
        }
        // SAFETY: closed once, here.
        unsafe { ffi::xenevtchn_close(self.h.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_xen_opening_names_the_missing_node() {
        if Path::new(GNTDEV).exists() {
            return; // a real dom0: covered by the behavioural suite instead
        }
        let e = RealGnttab::open().unwrap_err();
        assert!(e.to_string().contains("/dev/xen/gntdev"), "{e}");
        let e = RealEvtchn::open().unwrap_err();
        assert!(e.to_string().contains("/dev/xen/evtchn"), "{e}");
    }
}
