//! The real Xen: libxengnttab through bindgen, `/dev/xen/evtchn` through its ioctls (as
//! libxenevtchn's Linux backend drives it, so a handle can be passed between processes as one
//! descriptor), xenstore over `/dev/xen/xenbus` or xenstored's socket.
//!
//! Owns: the C handles and every `unsafe` call into Xen's libraries.
//! Trusts: the libraries' contracts (documented in `xengnttab.h`, `xenevtchn.h`).
//! Must never: unmap a mapping twice or while a view of it lives (the view borrows the
//! [`RealMapping`]), or leave a bound port behind (handles unbind on drop).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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

    fn evtchn_export(&self, domid: DomId) -> Result<Vec<OwnedFd>, XenError> {
        export_evtchn(domid)
    }

    fn evtchn_import(&self, fds: Vec<OwnedFd>) -> Result<RealEvtchn, XenError> {
        match <[OwnedFd; 1]>::try_from(fds) {
            Ok([fd]) => RealEvtchn::from_fd(fd),
            Err(v) => Err(XenError::Invalid(format!(
                "an event channel handle is one descriptor, not {}",
                v.len()
            ))),
        }
    }

    fn xenstore_path(&self) -> PathBuf {
        super::xenstore::default_path()
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

/// `_IOC(_IOC_NONE, 'E', nr, size)` of `xen/sys/evtchn.h`.
const fn evtchn_ioc(nr: u32, size: usize) -> u64 {
    ((size as u64) << 16) | ((b'E' as u64) << 8) | nr as u64
}

/// The `/dev/xen/evtchn` ioctls (`xen/sys/evtchn.h`; checked against the C header in
/// `tests::ioctl_numbers_match_the_c_header`). The sandbox's system-call filter allows
/// `ioctl` with these numbers only.
pub mod evtchn_ioctl {
    use super::evtchn_ioc;
    /// `IOCTL_EVTCHN_BIND_INTERDOMAIN` (`{remote_domain, remote_port}`).
    pub const BIND_INTERDOMAIN: u64 = evtchn_ioc(1, 8);
    /// `IOCTL_EVTCHN_UNBIND` (`{port}`).
    pub const UNBIND: u64 = evtchn_ioc(3, 4);
    /// `IOCTL_EVTCHN_NOTIFY` (`{port}`).
    pub const NOTIFY: u64 = evtchn_ioc(4, 4);
    /// `IOCTL_EVTCHN_RESTRICT_DOMID` (`{domid_t domid}`).
    pub const RESTRICT_DOMID: u64 = evtchn_ioc(6, 2);
}

/// An event channel handle: an open `/dev/xen/evtchn` (non-blocking), driven with the
/// device's ioctls, `read` (the next pending port) and `write` (unmask), exactly as
/// libxenevtchn's Linux backend does. Built from a descriptor, so that a sandboxed backend
/// can use a handle its broker opened and restricted ([`Platform::evtchn_export`]).
#[derive(Debug)]
pub struct RealEvtchn {
    fd: OwnedFd,
    bound: Vec<Port>,
}

impl RealEvtchn {
    /// Opens `/dev/xen/evtchn`.
    pub fn open() -> Result<RealEvtchn, XenError> {
        RealEvtchn::from_fd(open_evtchn()?)
    }

    /// A handle over an open `/dev/xen/evtchn` descriptor (made non-blocking here).
    pub fn from_fd(fd: OwnedFd) -> Result<RealEvtchn, XenError> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| XenError::io("evtchn fcntl", e.into()))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| XenError::io("evtchn fcntl", e.into()))?;
        Ok(RealEvtchn {
            fd,
            bound: Vec::new(),
        })
    }

    fn ioctl<T>(
        &self,
        what: &'static str,
        port: Port,
        req: u64,
        arg: &mut T,
    ) -> Result<i32, XenError> {
        evtchn_ioctl_on(self.fd.as_fd(), what, port, req, arg)
    }
}

/// `ioctl(fd, req, &arg)` on an evtchn descriptor: the result, or the errno as an
/// [`XenError::Evtchn`].
fn evtchn_ioctl_on<T>(
    fd: BorrowedFd<'_>,
    what: &'static str,
    port: Port,
    req: u64,
    arg: &mut T,
) -> Result<i32, XenError> {
    // SAFETY: `req` is one of the evtchn ioctls whose argument is exactly a `T` (the structs
    // of xen/sys/evtchn.h, all plain integers), valid for the call's duration; the kernel
    // reads or writes only those bytes.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, std::ptr::from_mut(arg)) };
    if rc < 0 {
        return Err(ev_err(what, port));
    }
    Ok(rc)
}

/// Opens `/dev/xen/evtchn` read-write, close-on-exec (as `xenevtchn_open`).
fn open_evtchn() -> Result<OwnedFd, XenError> {
    if let Some(e) = missing(EVTCHN) {
        return Err(e);
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(EVTCHN)
        .map(OwnedFd::from)
        .map_err(|source| XenError::Open {
            node: PathBuf::from(EVTCHN),
            source,
        })
}

impl AsFd for RealEvtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
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
        // struct ioctl_evtchn_bind_interdomain { unsigned int remote_domain, remote_port; }
        let mut arg: [u32; 2] = [u32::from(domid), remote];
        let p = self.ioctl(
            "bind_interdomain",
            remote,
            evtchn_ioctl::BIND_INTERDOMAIN,
            &mut arg,
        )?;
        let port = Port::try_from(p).map_err(|_| ev_err("bind_interdomain", remote))?;
        self.bound.push(port);
        Ok(port)
    }

    fn unbind(&mut self, port: Port) -> Result<(), XenError> {
        let mut arg: u32 = port;
        self.ioctl("unbind", port, evtchn_ioctl::UNBIND, &mut arg)?;
        self.bound.retain(|&p| p != port);
        Ok(())
    }

    fn notify(&self, port: Port) -> Result<(), XenError> {
        let mut arg: u32 = port;
        self.ioctl("notify", port, evtchn_ioctl::NOTIFY, &mut arg)
            .map(drop)
    }

    fn unmask(&self, port: Port) -> Result<(), XenError> {
        // the device unmasks every port written to it
        match nix::unistd::write(&self.fd, &port.to_ne_bytes()) {
            Ok(4) => Ok(()),
            Ok(_) => Err(XenError::Evtchn {
                what: "unmask",
                port,
                source: std::io::Error::from(std::io::ErrorKind::WriteZero),
            }),
            Err(e) => Err(XenError::Evtchn {
                what: "unmask",
                port,
                source: e.into(),
            }),
        }
    }

    fn pending(&self) -> Result<Option<Port>, XenError> {
        // the device reads out pending ports, 4 bytes each; non-blocking: EAGAIN when idle
        let mut b = [0u8; 4];
        match nix::unistd::read(&self.fd, &mut b) {
            Ok(4) => Ok(Some(Port::from_ne_bytes(b))),
            Ok(_) => Err(XenError::Evtchn {
                what: "pending",
                port: 0,
                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            }),
            Err(nix::errno::Errno::EAGAIN) => Ok(None),
            Err(e) => Err(XenError::Evtchn {
                what: "pending",
                port: 0,
                source: e.into(),
            }),
        }
    }
}

impl Drop for RealEvtchn {
    fn drop(&mut self) {
        for p in std::mem::take(&mut self.bound) {
            // each bound port is unbound once (closing the device would unbind them too)
            let mut arg: u32 = p;
            let _ = self.ioctl("unbind", p, evtchn_ioctl::UNBIND, &mut arg);
        }
    }
}

/// Opens `/dev/xen/evtchn` and restricts it to `domid` (`IOCTL_EVTCHN_RESTRICT_DOMID`): the
/// handle can then bind interdomain ports of that domain only, never a VIRQ or an unbound
/// port (Linux's `evtchn.c`).
fn export_evtchn(domid: DomId) -> Result<Vec<OwnedFd>, XenError> {
    let fd = open_evtchn()?;
    // struct ioctl_evtchn_restrict_domid { domid_t domid; }
    let mut arg: u16 = domid;
    evtchn_ioctl_on(
        fd.as_fd(),
        "restrict to its guest",
        0,
        evtchn_ioctl::RESTRICT_DOMID,
        &mut arg,
    )?;
    Ok(vec![fd])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_c_header() {
        // printed by a C program including <xen/sys/evtchn.h> (libxen-dev 4.17)
        assert_eq!(evtchn_ioctl::BIND_INTERDOMAIN, 0x84501);
        assert_eq!(evtchn_ioctl::UNBIND, 0x44503);
        assert_eq!(evtchn_ioctl::NOTIFY, 0x44504);
        assert_eq!(evtchn_ioctl::RESTRICT_DOMID, 0x24506);
    }

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
