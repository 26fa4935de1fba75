//! A simulated Xen for tests, benches and the demo: the same traits as [`super::real`].
//!
//! Owns: guest pages (memfd, `MAP_SHARED`), a grant table per simulated domain, event channels
//! with Xen's pending and mask behaviour (eventfds), and a [`xenstored::SimXenstored`].
//! Trusts: nothing the simulated guest passes: unknown or revoked references fail with
//! `GNTST_bad_gntref`, a read-only grant mapped or copied into for writing fails with
//! `GNTST_permission_denied`, a grant to another domain with `GNTST_bad_domain`, exactly where
//! the real hypervisor fails.
//! Must never: be used in production (`rbdback serve` uses [`super::real`]).

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
use nix::sys::uio::{pread, pwrite};

use super::xenstore::Xenstore;
use super::{
    CopyDir, CopySeg, DomId, EventChannels, GrantMapping, GrantRef, GrantTable, Platform, Port,
    XenError, GNTST_BAD_COPY_ARG, GNTST_BAD_DOMAIN, GNTST_BAD_GNTREF, GNTST_OKAY,
    GNTST_PERMISSION_DENIED, PAGE_SIZE,
};
use crate::shm::SharedMem;

pub mod remote;
pub mod xenstored;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn io(what: &'static str) -> impl Fn(nix::Error) -> XenError {
    move |e| XenError::io(what, std::io::Error::from(e))
}

/// Pages of one region mapped into this process (munmapped on drop).
#[derive(Debug)]
struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain shared memory; all access goes through SharedMem's
// volatile/atomic accessors, which are safe to use from any thread.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn mem(&self) -> SharedMem<'_> {
        // SAFETY: ptr..ptr+len stays mapped until self drops, and the returned view borrows
        // self; mmap returns page-aligned memory.
        unsafe { SharedMem::from_raw(self.ptr, self.len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, unmapped only here, once; no view
        // outlives self (views borrow it).
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// Maps guest pages (memfd, page index) contiguously in this process, as gntdev maps grants:
/// one reservation, then each page `MAP_FIXED` over its slot.
fn map_pages(pages: &[(BorrowedFd<'_>, usize)], writable: bool) -> Result<Region, XenError> {
    let len = pages.len() * PAGE_SIZE;
    let nz = NonZeroUsize::new(len).ok_or_else(|| XenError::Invalid("empty".into()))?;
    // SAFETY: a fresh anonymous reservation, owned by the Region built below.
    let base = unsafe { mmap_anonymous(None, nz, ProtFlags::PROT_NONE, MapFlags::MAP_PRIVATE) }
        .map_err(io("reserve mapping"))?;
    let region = Region {
        ptr: base.cast(),
        len,
    };
    let prot = if writable {
        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
    } else {
        ProtFlags::PROT_READ
    };
    let page_nz = NonZeroUsize::new(PAGE_SIZE).ok_or_else(|| XenError::Invalid("page".into()))?;
    for (i, (fd, page)) in pages.iter().enumerate() {
        let off =
            i64::try_from(page * PAGE_SIZE).map_err(|_| XenError::Invalid("offset".into()))?;
        let at = region.ptr.as_ptr().wrapping_add(i * PAGE_SIZE);
        let at = NonZeroUsize::new(at as usize);
        // SAFETY: MAP_FIXED over page i of our own reservation (inside `region`), backed by
        // the granted page of the guest's memfd; the Region unmaps the whole range once.
        unsafe {
            mmap(
                at,
                page_nz,
                prot,
                MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                *fd,
                off,
            )
        }
        .map_err(io("map granted page"))?;
    }
    Ok(region)
}

/// Guest memory of a simulated domain: `n` pages of a memfd, mapped for the guest.
#[derive(Debug)]
pub struct SimPages {
    fd: Arc<OwnedFd>,
    region: Region,
    pages: usize,
}

impl SimPages {
    fn new(pages: usize) -> Result<SimPages, XenError> {
        let len = pages
            .checked_mul(PAGE_SIZE)
            .filter(|&l| l > 0)
            .ok_or_else(|| XenError::Invalid(format!("{pages} pages")))?;
        let fd = nix::sys::memfd::memfd_create(
            c"rbdback-sim-pages",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(io("memfd_create"))?;
        let flen = i64::try_from(len).map_err(|_| XenError::Invalid("size".into()))?;
        nix::unistd::ftruncate(&fd, flen).map_err(io("ftruncate"))?;
        let nz = NonZeroUsize::new(len).ok_or_else(|| XenError::Invalid("empty".into()))?;
        // SAFETY: mapping a memfd we own, shared, at a kernel-chosen address; the mapping is
        // owned by the Region and unmapped once on drop.
        let ptr = unsafe {
            mmap(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(io("mmap guest pages"))?;
        Ok(SimPages {
            fd: Arc::new(fd),
            region: Region {
                ptr: ptr.cast(),
                len,
            },
            pages,
        })
    }

    /// All pages (the guest's view).
    pub fn mem(&self) -> SharedMem<'_> {
        self.region.mem()
    }

    /// Page `i` (empty view if out of range).
    pub fn page(&self, i: usize) -> SharedMem<'_> {
        self.region
            .mem()
            .slice(i * PAGE_SIZE, PAGE_SIZE)
            .unwrap_or_else(|_| SharedMem::from_mut_slice(&mut []))
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// Whether there are no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

#[derive(Debug, Clone)]
struct Grant {
    to: DomId,
    fd: Arc<OwnedFd>,
    page: usize,
    readonly: bool,
}

#[derive(Debug)]
struct PortState {
    owner: Arc<Handle>,
    peer: Option<(DomId, Port)>,
    /// For an unbound port: who may bind it.
    remote: DomId,
    pending: bool,
    masked: bool,
}

/// One event channel handle's delivery queue and eventfd.
#[derive(Debug)]
struct Handle {
    efd: EventFd,
    ready: Mutex<VecDeque<Port>>,
}

impl Handle {
    fn new() -> Result<Arc<Handle>, XenError> {
        Ok(Arc::new(Handle {
            efd: EventFd::from_flags(EfdFlags::EFD_NONBLOCK).map_err(io("eventfd"))?,
            ready: Mutex::new(VecDeque::new()),
        }))
    }

    /// The next pending port (the evtchn device's read), keeping the eventfd readable while
    /// more are queued.
    fn pop(&self) -> Option<Port> {
        let p = lock(&self.ready).pop_front();
        if p.is_some() {
            let _ = self.efd.read();
            if !lock(&self.ready).is_empty() {
                let _ = self.efd.write(1);
            }
        }
        p
    }
}

#[derive(Debug, Default)]
struct Hypervisor {
    grants: HashMap<(DomId, GrantRef), Grant>,
    next_ref: HashMap<DomId, GrantRef>,
    ports: HashMap<(DomId, Port), PortState>,
    next_port: HashMap<DomId, Port>,
}

impl Hypervisor {
    fn alloc_port(&mut self, dom: DomId) -> Port {
        let p = self.next_port.entry(dom).or_insert(1);
        let port = *p;
        *p += 1;
        port
    }

    /// Xen's `evtchn_set_pending` plus Linux's evtchn driver: a delivered event masks the
    /// port and queues it for the handle; while masked it only stays pending.
    fn deliver(&mut self, dom: DomId, port: Port) {
        if let Some(ps) = self.ports.get_mut(&(dom, port)) {
            if ps.masked {
                ps.pending = true;
            } else {
                ps.masked = true;
                lock(&ps.owner.ready).push_back(port);
                let _ = ps.owner.efd.write(1);
            }
        }
    }

    /// `EVTCHNOP_send`: delivered to the peer of an interdomain port; on an unbound port
    /// (its peer closed, e.g. a backend that died) silently dropped, as Xen's `evtchn_send`
    /// does; on a port that does not exist, `EINVAL`.
    fn notify(&mut self, dom: DomId, port: Port) -> Result<(), XenError> {
        let Some(ps) = self.ports.get(&(dom, port)) else {
            return Err(XenError::Evtchn {
                what: "notify",
                port,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        };
        if let Some(peer) = ps.peer {
            self.deliver(peer.0, peer.1);
        }
        Ok(())
    }

    fn unmask(&mut self, dom: DomId, port: Port) -> Result<(), XenError> {
        let ps = self.ports.get_mut(&(dom, port)).ok_or(XenError::Evtchn {
            what: "unmask",
            port,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        ps.masked = false;
        if ps.pending {
            ps.pending = false;
            self.deliver(dom, port);
        }
        Ok(())
    }

    fn close(&mut self, dom: DomId, port: Port) {
        if let Some(ps) = self.ports.remove(&(dom, port)) {
            if let Some(peer) = ps.peer {
                if let Some(pp) = self.ports.get_mut(&peer) {
                    pp.peer = None;
                }
            }
        }
    }

    /// `EVTCHNOP_bind_interdomain` by `by` through `handle`: binds `remote` of `domid` if it
    /// is unbound and offered to `by`; returns the local port.
    fn bind(
        &mut self,
        by: DomId,
        handle: &Arc<Handle>,
        domid: DomId,
        remote: Port,
    ) -> Result<Port, XenError> {
        match self.ports.get(&(domid, remote)) {
            Some(ps) if ps.peer.is_none() && ps.remote == by => {}
            _ => return Err(evtchn_err("bind_interdomain", remote, libc::EINVAL)),
        }
        let local = self.alloc_port(by);
        self.ports.insert(
            (by, local),
            PortState {
                owner: Arc::clone(handle),
                peer: Some((domid, remote)),
                remote: domid,
                pending: false,
                masked: false,
            },
        );
        if let Some(ps) = self.ports.get_mut(&(domid, remote)) {
            ps.peer = Some((by, local));
        }
        Ok(local)
    }

    fn lookup(&self, granter: DomId, gref: GrantRef, by: DomId, write: bool) -> Result<Grant, i16> {
        let g = self.grants.get(&(granter, gref)).ok_or(GNTST_BAD_GNTREF)?;
        if g.to != by {
            return Err(GNTST_BAD_DOMAIN);
        }
        if write && g.readonly {
            return Err(GNTST_PERMISSION_DENIED);
        }
        Ok(g.clone())
    }
}

/// The simulated machine: hypervisor state plus xenstored.
pub struct SimXen {
    hv: Arc<Mutex<Hypervisor>>,
    xenstored: xenstored::SimXenstored,
    dir: PathBuf,
    sock: PathBuf,
}

impl std::fmt::Debug for SimXen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimXen").field("sock", &self.sock).finish()
    }
}

impl Drop for SimXen {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl SimXen {
    /// Starts a simulated Xen with its xenstored on a socket in a fresh temporary directory,
    /// and its hypercall socket for backends in other processes ([`remote`]).
    pub fn start() -> Result<Arc<SimXen>, XenError> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rbdback-simxen-{}-{n}", std::process::id()));
        // a directory of this name is a dead process's (pids are reused; a test that panicked
        // leaves its own): its sockets would make the binds below fail, so it goes
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| XenError::io("create sim dir", e))?;
        let sock = dir.join("xenstored.sock");
        let xenstored = xenstored::SimXenstored::start(&sock)
            .map_err(|e| XenError::io("start sim xenstored", e))?;
        let hv = Arc::new(Mutex::new(Hypervisor::default()));
        remote::serve(&dir.join(remote::HYPERVISOR_SOCKET), Arc::clone(&hv))
            .map_err(|e| XenError::io("start sim hypercall server", e))?;
        Ok(Arc::new(SimXen {
            hv,
            xenstored,
            dir,
            sock,
        }))
    }

    /// The directory holding the xenstored and hypercall sockets: what a backend in another
    /// process needs ([`remote::RemotePlatform::new`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The xenstored socket.
    pub fn xenstore_path(&self) -> &Path {
        &self.sock
    }

    /// The backend's (dom0's) platform.
    pub fn platform(self: &Arc<Self>) -> SimPlatform {
        SimPlatform {
            xen: Arc::clone(self),
            domid: 0,
        }
    }

    /// A guest domain.
    pub fn frontend(self: &Arc<Self>, domid: DomId) -> Result<SimFrontend, XenError> {
        if domid == 0 {
            return Err(XenError::Invalid("domain 0 is the backend".into()));
        }
        self.xenstored.introduce(domid);
        Ok(SimFrontend {
            xen: Arc::clone(self),
            domid,
            handle: Handle::new()?,
            ports: Mutex::new(Vec::new()),
            grants: Mutex::new(Vec::new()),
        })
    }
}

/// dom0's view of the simulated Xen.
#[derive(Debug, Clone)]
pub struct SimPlatform {
    xen: Arc<SimXen>,
    domid: DomId,
}

impl Platform for SimPlatform {
    type Gnttab = SimGnttab;
    type Evtchn = SimEvtchn;

    fn gnttab(&self) -> Result<SimGnttab, XenError> {
        Ok(SimGnttab {
            xen: Arc::clone(&self.xen),
            domid: self.domid,
        })
    }

    fn evtchn(&self) -> Result<SimEvtchn, XenError> {
        Ok(SimEvtchn {
            xen: Arc::clone(&self.xen),
            domid: self.domid,
            handle: Handle::new()?,
            bound: Vec::new(),
        })
    }

    fn xenstore(&self) -> Result<Xenstore, XenError> {
        Ok(Xenstore::connect(&self.xen.sock)?)
    }

    fn xenstore_path(&self) -> PathBuf {
        self.xen.sock.clone()
    }
}

/// The simulated grant table (backend side).
#[derive(Debug)]
pub struct SimGnttab {
    xen: Arc<SimXen>,
    domid: DomId,
}

/// Granted pages mapped by the backend (real mmaps of the guest's memfd pages).
#[derive(Debug)]
pub struct SimMapping {
    region: Region,
    refs: Vec<GrantRef>,
}

impl GrantMapping for SimMapping {
    fn mem(&self) -> SharedMem<'_> {
        self.region.mem()
    }
    fn refs(&self) -> &[GrantRef] {
        &self.refs
    }
}

impl GrantTable for SimGnttab {
    type Mapping = SimMapping;

    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> Result<SimMapping, XenError> {
        if refs.is_empty() || refs.len() > 1024 {
            return Err(XenError::Invalid(format!(
                "{} grants in one mapping",
                refs.len()
            )));
        }
        let grants: Vec<Grant> = {
            let hv = lock(&self.xen.hv);
            refs.iter()
                .map(|&r| {
                    hv.lookup(domid, r, self.domid, writable).map_err(|status| {
                        XenError::GrantStatus {
                            gref: r,
                            domid,
                            status,
                            what: "map",
                        }
                    })
                })
                .collect::<Result<_, _>>()?
        };
        let pages: Vec<(BorrowedFd<'_>, usize)> =
            grants.iter().map(|g| (g.fd.as_fd(), g.page)).collect();
        let region = map_pages(&pages, writable)?;
        Ok(SimMapping {
            region,
            refs: refs.to_vec(),
        })
    }

    fn copy(&self, segs: &mut [CopySeg<'_>]) -> Result<(), XenError> {
        for seg in segs.iter_mut() {
            seg.status = copy_seg(&self.xen.hv, self.domid, seg);
        }
        Ok(())
    }
}

/// One grant copy segment done by domain `by`, with Xen's per-segment checks; returns its
/// status.
fn copy_seg(hv: &Mutex<Hypervisor>, by: DomId, seg: &mut CopySeg<'_>) -> i16 {
    if !seg.fits_page() {
        return GNTST_BAD_COPY_ARG;
    }
    let write = matches!(seg.dir, CopyDir::ToGuest { .. });
    let g = match lock(hv).lookup(seg.domid, seg.gref, by, write) {
        Ok(g) => g,
        Err(st) => return st,
    };
    let off = i64::try_from(g.page * PAGE_SIZE + usize::from(seg.offset)).unwrap_or(-1);
    let n = seg.dir.len();
    let done = match &mut seg.dir {
        CopyDir::FromGuest { dst } => pread(g.fd.as_fd(), dst, off),
        CopyDir::ToGuest { src } => pwrite(g.fd.as_fd(), src, off),
    };
    match done {
        Ok(k) if k == n => GNTST_OKAY,
        _ => super::GNTST_GENERAL_ERROR,
    }
}

/// A simulated event channel handle (backend side).
#[derive(Debug)]
pub struct SimEvtchn {
    xen: Arc<SimXen>,
    domid: DomId,
    handle: Arc<Handle>,
    bound: Vec<Port>,
}

impl AsFd for SimEvtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.handle.efd.as_fd()
    }
}

fn evtchn_err(what: &'static str, port: Port, errno: i32) -> XenError {
    XenError::Evtchn {
        what,
        port,
        source: std::io::Error::from_raw_os_error(errno),
    }
}

impl EventChannels for SimEvtchn {
    fn bind_interdomain(&mut self, domid: DomId, remote: Port) -> Result<Port, XenError> {
        let local = lock(&self.xen.hv).bind(self.domid, &self.handle, domid, remote)?;
        self.bound.push(local);
        Ok(local)
    }

    fn unbind(&mut self, port: Port) -> Result<(), XenError> {
        if !self.bound.contains(&port) {
            return Err(evtchn_err("unbind", port, libc::EINVAL));
        }
        self.bound.retain(|&p| p != port);
        lock(&self.xen.hv).close(self.domid, port);
        Ok(())
    }

    fn notify(&self, port: Port) -> Result<(), XenError> {
        lock(&self.xen.hv).notify(self.domid, port)
    }

    fn unmask(&self, port: Port) -> Result<(), XenError> {
        lock(&self.xen.hv).unmask(self.domid, port)
    }

    fn pending(&self) -> Result<Option<Port>, XenError> {
        Ok(self.handle.pop())
    }
}

impl Drop for SimEvtchn {
    fn drop(&mut self) {
        let mut hv = lock(&self.xen.hv);
        for p in self.bound.drain(..) {
            hv.close(self.domid, p);
        }
    }
}

/// A simulated guest: grants its pages, allocates event channels, talks to xenstore.
pub struct SimFrontend {
    xen: Arc<SimXen>,
    domid: DomId,
    handle: Arc<Handle>,
    ports: Mutex<Vec<Port>>,
    grants: Mutex<Vec<GrantRef>>,
}

impl std::fmt::Debug for SimFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFrontend")
            .field("domid", &self.domid)
            .finish()
    }
}

impl SimFrontend {
    /// The guest's domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Allocates `n` pages of guest memory.
    pub fn alloc_pages(&self, n: usize) -> Result<SimPages, XenError> {
        SimPages::new(n)
    }

    /// Grants page `index` of `pages` to domain `to`.
    pub fn grant(
        &self,
        pages: &SimPages,
        index: usize,
        to: DomId,
        readonly: bool,
    ) -> Result<GrantRef, XenError> {
        if index >= pages.len() {
            return Err(XenError::Invalid(format!(
                "page {index} of {}",
                pages.len()
            )));
        }
        let mut hv = lock(&self.xen.hv);
        let next = hv.next_ref.entry(self.domid).or_insert(8);
        let gref = *next;
        *next += 1;
        hv.grants.insert(
            (self.domid, gref),
            Grant {
                to,
                fd: Arc::clone(&pages.fd),
                page: index,
                readonly,
            },
        );
        lock(&self.grants).push(gref);
        Ok(gref)
    }

    /// Ends foreign access: later maps and copies of `gref` fail with `GNTST_bad_gntref`.
    pub fn revoke(&self, gref: GrantRef) -> Result<(), XenError> {
        lock(&self.xen.hv)
            .grants
            .remove(&(self.domid, gref))
            .map(drop)
            .ok_or_else(|| XenError::Invalid(format!("grant {gref} is not active")))
    }

    /// Allocates an unbound port that `remote` may bind.
    pub fn alloc_unbound(&self, remote: DomId) -> Result<Port, XenError> {
        let mut hv = lock(&self.xen.hv);
        let port = hv.alloc_port(self.domid);
        hv.ports.insert(
            (self.domid, port),
            PortState {
                owner: Arc::clone(&self.handle),
                peer: None,
                remote,
                pending: false,
                masked: false,
            },
        );
        lock(&self.ports).push(port);
        Ok(port)
    }

    /// Notifies the other end of `port`.
    pub fn notify(&self, port: Port) -> Result<(), XenError> {
        lock(&self.xen.hv).notify(self.domid, port)
    }

    /// Waits up to `timeout` for an event on `port`; consumes it and unmasks the port.
    pub fn wait(&self, port: Port, timeout: Duration) -> Result<bool, XenError> {
        let deadline = Instant::now() + timeout;
        loop {
            let hit = {
                let mut q = lock(&self.handle.ready);
                match q.iter().position(|&p| p == port) {
                    Some(i) => {
                        q.remove(i);
                        true
                    }
                    None => false,
                }
            };
            if hit {
                lock(&self.xen.hv).unmask(self.domid, port)?;
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let left = deadline - now;
            let ms = u16::try_from(left.as_millis().min(50)).unwrap_or(50);
            let mut fds = [nix::poll::PollFd::new(
                self.handle.efd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
            let _ = self.handle.efd.read();
        }
    }

    /// A xenstore connection acting as this domain.
    pub fn xenstore(&self) -> Result<Xenstore, XenError> {
        let xs = Xenstore::connect(&self.xen.sock)?;
        xs.request(
            "sim-domid",
            super::xenstore::wire::ty::CONTROL,
            0,
            &["sim-domid", &self.domid.to_string()],
            None,
        )?;
        Ok(xs)
    }
}

impl Drop for SimFrontend {
    fn drop(&mut self) {
        let mut hv = lock(&self.xen.hv);
        for p in lock(&self.ports).drain(..) {
            hv.close(self.domid, p);
        }
        // Only what this handle granted: another handle of the same domain keeps its grants.
        for g in lock(&self.grants).drain(..) {
            hv.grants.remove(&(self.domid, g));
        }
    }
}
