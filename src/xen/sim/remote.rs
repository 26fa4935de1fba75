//! The simulated hypervisor for backends in other processes: a hypercall socket in the
//! [`SimXen`](super::SimXen) directory, and [`RemotePlatform`], the backend's side of it.
//!
//! Owns: the wire protocol between a backend process and the test process that hosts the
//! simulated Xen — grant maps (the guest's memfd pages passed with `SCM_RIGHTS` and mapped by
//! the backend, as gntdev maps them), grant copies, and event channel handles (an eventfd
//! passed to the backend; pending/unmask/notify as calls).
//! Trusts: nothing a backend sends: every call goes through the same checks as the in-process
//! [`super::SimPlatform`].
//! Must never: outlive a backend's handle: when a backend's connection closes (it exited or was
//! killed), its event channels are closed as Linux closes `/dev/xen/evtchn` on process exit —
//! the guest's ends become unbound again and may be bound by the next backend
//! (`evtchn_close` in Xen's `event_channel.c`) — and its mappings vanish with its address space.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::super::xenstore::Xenstore;
use super::{copy_seg, lock, map_pages, Handle, Hypervisor, SimMapping};
use crate::fdmsg::{recv, send, Msg, MAX_FDS};
use crate::xen::{
    CopyDir, CopySeg, DomId, EventChannels, GrantRef, GrantTable, Platform, Port, XenError,
    GNTST_BAD_GNTREF, GNTST_GENERAL_ERROR,
};

/// The hypercall socket's name in the simulated Xen's directory.
pub const HYPERVISOR_SOCKET: &str = "hypervisor.sock";
/// The xenstored socket's name in the simulated Xen's directory.
pub const XENSTORED_SOCKET: &str = "xenstored.sock";

/// Grant copies are sent in chunks of this many segments (one page each at most).
const COPY_CHUNK: usize = 32;

mod op {
    pub const HELLO: u8 = 1;
    pub const MAP: u8 = 2;
    pub const COPY: u8 = 3;
    pub const EVTCHN_OPEN: u8 = 4;
    pub const BIND: u8 = 5;
    pub const UNBIND: u8 = 6;
    pub const NOTIFY: u8 = 7;
    pub const UNMASK: u8 = 8;
    pub const PENDING: u8 = 9;
    pub const RESTRICT: u8 = 10;
    pub const OK: u8 = 100;
    pub const ERR: u8 = 101;
}

fn errno_of(e: &XenError) -> u64 {
    match e {
        XenError::Evtchn { source, .. } => source.raw_os_error().unwrap_or(libc::EINVAL) as u64,
        _ => libc::EINVAL as u64,
    }
}

/// Serves the hypercall socket at `path` (a thread per backend connection).
pub(super) fn serve(path: &Path, hv: Arc<Mutex<Hypervisor>>) -> std::io::Result<()> {
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("sim-hypervisor".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let hv = Arc::clone(&hv);
                let _ = std::thread::Builder::new()
                    .name("sim-hv-conn".into())
                    .spawn(move || serve_conn(&stream, &hv));
            }
        })?;
    Ok(())
}

/// What one backend connection holds: its domain, and if it is an event channel handle, the
/// handle and the ports bound through it.
struct ConnState {
    domid: DomId,
    handle: Option<Arc<Handle>>,
    bound: Vec<Port>,
    /// The only domain this handle may bind to (`IOCTL_EVTCHN_RESTRICT_DOMID`).
    restrict: Option<DomId>,
}

fn serve_conn(stream: &UnixStream, hv: &Mutex<Hypervisor>) {
    let mut st = ConnState {
        domid: 0,
        handle: None,
        bound: Vec::new(),
        restrict: None,
    };
    while let Ok(Some((msg, _fds))) = recv(stream) {
        let (reply, fds) = handle(hv, &mut st, &msg);
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        if send(stream, &reply, &raw).is_err() {
            break;
        }
    }
    // The backend is gone (exited or killed): the kernel closes its evtchn handle.
    let mut h = lock(hv);
    for p in st.bound.drain(..) {
        h.close(st.domid, p);
    }
}

/// One call: the reply and the descriptors it carries (duplicates, closed once sent).
fn handle(hv: &Mutex<Hypervisor>, st: &mut ConnState, msg: &Msg) -> (Msg, Vec<OwnedFd>) {
    let ok = |ints: Vec<u64>| (Msg::new(op::OK, ints), Vec::new());
    let err = |ints: Vec<u64>| (Msg::new(op::ERR, ints), Vec::new());
    let port = || Port::try_from(msg.int(0)).unwrap_or(0);
    match msg.op {
        op::HELLO => {
            st.domid = DomId::try_from(msg.int(0)).unwrap_or(DomId::MAX);
            ok(vec![])
        }
        op::MAP => map(hv, st.domid, msg),
        op::COPY => copy(hv, st.domid, msg),
        op::EVTCHN_OPEN => match Handle::new() {
            Ok(h) => match h.efd.as_fd().try_clone_to_owned() {
                Ok(fd) => {
                    st.handle = Some(h);
                    (Msg::new(op::OK, vec![]), vec![fd])
                }
                Err(_) => err(vec![libc::EMFILE as u64]),
            },
            Err(_) => err(vec![libc::EMFILE as u64]),
        },
        op::BIND => {
            let Some(h) = &st.handle else {
                return err(vec![libc::EBADF as u64]);
            };
            let (domid, remote) = (
                DomId::try_from(msg.int(0)).unwrap_or(DomId::MAX),
                Port::try_from(msg.int(1)).unwrap_or(0),
            );
            if st.restrict.is_some_and(|r| r != domid) {
                return err(vec![libc::EACCES as u64]);
            }
            match lock(hv).bind(st.domid, h, domid, remote) {
                Ok(local) => {
                    st.bound.push(local);
                    ok(vec![u64::from(local)])
                }
                Err(e) => err(vec![errno_of(&e)]),
            }
        }
        // Linux's evtchn.c: once, to a guest's domain (not 0 or a reserved id)
        op::RESTRICT => {
            let domid = DomId::try_from(msg.int(0)).unwrap_or(DomId::MAX);
            if st.restrict.is_some() {
                return err(vec![libc::EACCES as u64]);
            }
            if domid == 0 || domid >= 0x7ff0 {
                return err(vec![libc::EINVAL as u64]);
            }
            st.restrict = Some(domid);
            ok(vec![])
        }
        op::UNBIND => {
            let p = port();
            if !st.bound.contains(&p) {
                return err(vec![libc::EINVAL as u64]);
            }
            st.bound.retain(|&b| b != p);
            lock(hv).close(st.domid, p);
            ok(vec![])
        }
        op::NOTIFY => match lock(hv).notify(st.domid, port()) {
            Ok(()) => ok(vec![]),
            Err(e) => err(vec![errno_of(&e)]),
        },
        op::UNMASK => match lock(hv).unmask(st.domid, port()) {
            Ok(()) => ok(vec![]),
            Err(e) => err(vec![errno_of(&e)]),
        },
        op::PENDING => match &st.handle {
            Some(h) => ok(vec![h.pop().map_or(0, u64::from)]),
            None => err(vec![libc::EBADF as u64]),
        },
        _ => err(vec![libc::ENOSYS as u64]),
    }
}

/// `MAP domid writable refs...` → the memfd of each granted page and its page index.
fn map(hv: &Mutex<Hypervisor>, by: DomId, msg: &Msg) -> (Msg, Vec<OwnedFd>) {
    let domid = DomId::try_from(msg.int(0)).unwrap_or(DomId::MAX);
    let writable = msg.int(1) != 0;
    let refs = msg.ints.get(2..).unwrap_or(&[]);
    if refs.is_empty() || refs.len() > MAX_FDS {
        return (
            Msg::new(op::ERR, vec![0, GNTST_GENERAL_ERROR as u64]),
            Vec::new(),
        );
    }
    let h = lock(hv);
    let mut pages = Vec::with_capacity(refs.len());
    let mut fds = Vec::with_capacity(refs.len());
    for &r in refs {
        let gref = GrantRef::try_from(r).unwrap_or(GrantRef::MAX);
        match h.lookup(domid, gref, by, writable) {
            Ok(g) => match g.fd.as_fd().try_clone_to_owned() {
                Ok(fd) => {
                    pages.push(g.page as u64);
                    fds.push(fd);
                }
                Err(_) => {
                    return (
                        Msg::new(op::ERR, vec![u64::from(gref), GNTST_GENERAL_ERROR as u64]),
                        Vec::new(),
                    )
                }
            },
            Err(status) => {
                return (
                    Msg::new(op::ERR, vec![u64::from(gref), status as u64]),
                    Vec::new(),
                )
            }
        }
    }
    (Msg::new(op::OK, pages), fds)
}

/// `COPY n (domid gref offset len dir)*n` with the to-guest bytes as data → a status per
/// segment and the from-guest bytes.
fn copy(hv: &Mutex<Hypervisor>, by: DomId, msg: &Msg) -> (Msg, Vec<OwnedFd>) {
    let n = usize::try_from(msg.int(0)).unwrap_or(0).min(COPY_CHUNK);
    let mut statuses = Vec::with_capacity(n);
    let mut out = Vec::new();
    let mut data = msg.data.as_slice();
    for i in 0..n {
        let f = |k: usize| msg.int(1 + i * 5 + k);
        let len = usize::try_from(f(3)).unwrap_or(0).min(super::PAGE_SIZE + 1);
        let (domid, gref, offset) = (
            DomId::try_from(f(0)).unwrap_or(DomId::MAX),
            GrantRef::try_from(f(1)).unwrap_or(GrantRef::MAX),
            u16::try_from(f(2)).unwrap_or(u16::MAX),
        );
        let status = if f(4) == 1 {
            let (src, rest) = data.split_at(len.min(data.len()));
            data = rest;
            let mut seg = CopySeg {
                domid,
                gref,
                offset,
                dir: CopyDir::ToGuest { src },
                status: 0,
            };
            copy_seg(hv, by, &mut seg)
        } else {
            let mut buf = vec![0u8; len];
            let mut seg = CopySeg {
                domid,
                gref,
                offset,
                dir: CopyDir::FromGuest { dst: &mut buf },
                status: 0,
            };
            let st = copy_seg(hv, by, &mut seg);
            out.extend_from_slice(&buf);
            st
        };
        statuses.push(status as u64);
    }
    let mut reply = Msg::new(op::OK, statuses);
    reply.data = out;
    (reply, Vec::new())
}

/// A backend's connection to the simulated hypervisor.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
}

fn hv_err(e: std::io::Error) -> XenError {
    XenError::io("simulated hypercall", e)
}

impl Conn {
    fn open(dir: &Path) -> Result<Conn, XenError> {
        let path = dir.join(HYPERVISOR_SOCKET);
        let stream = UnixStream::connect(&path).map_err(|source| XenError::Open {
            node: path.clone(),
            source,
        })?;
        let mut c = Conn { stream };
        c.call(&Msg::new(op::HELLO, vec![0]))?;
        Ok(c)
    }

    fn call(&mut self, msg: &Msg) -> Result<(Msg, Vec<OwnedFd>), XenError> {
        send(&self.stream, msg, &[]).map_err(hv_err)?;
        recv(&self.stream).map_err(hv_err)?.ok_or_else(|| {
            hv_err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the simulated hypervisor closed the connection",
            ))
        })
    }

    /// A call whose `ERR` reply carries an errno, for event channel operations.
    fn evtchn_call(
        &mut self,
        what: &'static str,
        port: Port,
        msg: &Msg,
    ) -> Result<(Msg, Vec<OwnedFd>), XenError> {
        let (r, fds) = self.call(msg)?;
        if r.op == op::OK {
            return Ok((r, fds));
        }
        Err(XenError::Evtchn {
            what,
            port,
            source: std::io::Error::from_raw_os_error(
                i32::try_from(r.int(0)).unwrap_or(libc::EINVAL),
            ),
        })
    }
}

/// A backend's view of a simulated Xen hosted by another process (the test): the same
/// [`Platform`] as [`super::SimPlatform`], over the hypercall and xenstored sockets in `dir`.
#[derive(Debug, Clone)]
pub struct RemotePlatform {
    dir: PathBuf,
}

impl RemotePlatform {
    /// The simulated Xen whose sockets are in `dir` ([`super::SimXen::dir`]).
    pub fn new(dir: &Path) -> RemotePlatform {
        RemotePlatform {
            dir: dir.to_owned(),
        }
    }
}

impl Platform for RemotePlatform {
    type Gnttab = RemoteGnttab;
    type Evtchn = RemoteEvtchn;

    fn gnttab(&self) -> Result<RemoteGnttab, XenError> {
        Ok(RemoteGnttab {
            conn: Mutex::new(Conn::open(&self.dir)?),
        })
    }

    fn evtchn(&self) -> Result<RemoteEvtchn, XenError> {
        let mut conn = Conn::open(&self.dir)?;
        let (_, mut fds) = conn.evtchn_call("open", 0, &Msg::new(op::EVTCHN_OPEN, vec![]))?;
        let efd = fds.pop().ok_or_else(|| {
            hv_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no eventfd in the reply",
            ))
        })?;
        Ok(RemoteEvtchn {
            conn: Mutex::new(conn),
            efd,
            bound: Vec::new(),
        })
    }

    fn xenstore(&self) -> Result<Xenstore, XenError> {
        Ok(Xenstore::connect(&self.dir.join(XENSTORED_SOCKET))?)
    }

    fn xenstore_path(&self) -> PathBuf {
        self.dir.join(XENSTORED_SOCKET)
    }

    /// The handle's connection and its eventfd.
    fn evtchn_export(&self, domid: DomId) -> Result<Vec<OwnedFd>, XenError> {
        let ev = self.evtchn()?;
        let msg = Msg::new(op::RESTRICT, vec![u64::from(domid)]);
        lock(&ev.conn).evtchn_call("restrict to its guest", 0, &msg)?;
        let RemoteEvtchn { conn, efd, .. } = ev;
        let conn = conn
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(vec![OwnedFd::from(conn.stream), efd])
    }

    fn evtchn_import(&self, fds: Vec<OwnedFd>) -> Result<RemoteEvtchn, XenError> {
        match <[OwnedFd; 2]>::try_from(fds) {
            Ok([conn, efd]) => Ok(RemoteEvtchn {
                conn: Mutex::new(Conn {
                    stream: UnixStream::from(conn),
                }),
                efd,
                bound: Vec::new(),
            }),
            Err(v) => Err(XenError::Invalid(format!(
                "a simulated event channel handle is two descriptors, not {}",
                v.len()
            ))),
        }
    }
}

/// Grant maps and copies through the hypercall socket.
#[derive(Debug)]
pub struct RemoteGnttab {
    conn: Mutex<Conn>,
}

impl GrantTable for RemoteGnttab {
    type Mapping = SimMapping;

    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> Result<SimMapping, XenError> {
        if refs.is_empty() || refs.len() > MAX_FDS {
            return Err(XenError::Invalid(format!(
                "{} grants in one mapping",
                refs.len()
            )));
        }
        let mut ints = vec![u64::from(domid), u64::from(writable)];
        ints.extend(refs.iter().map(|&r| u64::from(r)));
        let (r, fds) = lock(&self.conn).call(&Msg::new(op::MAP, ints))?;
        if r.op != op::OK {
            return Err(XenError::GrantStatus {
                gref: GrantRef::try_from(r.int(0)).unwrap_or(0),
                domid,
                status: i16::try_from(r.int(1) as i64).unwrap_or(GNTST_BAD_GNTREF),
                what: "map",
            });
        }
        if fds.len() != refs.len() || r.ints.len() != refs.len() {
            return Err(XenError::Invalid("grant map reply does not match".into()));
        }
        let pages: Vec<(BorrowedFd<'_>, usize)> = fds
            .iter()
            .zip(&r.ints)
            .map(|(f, &p)| (f.as_fd(), usize::try_from(p).unwrap_or(usize::MAX)))
            .collect();
        let region = map_pages(&pages, writable)?;
        Ok(SimMapping {
            region,
            refs: refs.to_vec(),
        })
    }

    fn copy(&self, segs: &mut [CopySeg<'_>]) -> Result<(), XenError> {
        let mut conn = lock(&self.conn);
        for chunk in segs.chunks_mut(COPY_CHUNK) {
            let mut ints = vec![chunk.len() as u64];
            let mut data = Vec::new();
            for s in chunk.iter() {
                let (dir, len) = match &s.dir {
                    CopyDir::FromGuest { dst } => (0, dst.len()),
                    CopyDir::ToGuest { src } => {
                        data.extend_from_slice(src);
                        (1, src.len())
                    }
                };
                ints.extend([
                    u64::from(s.domid),
                    u64::from(s.gref),
                    u64::from(s.offset),
                    len as u64,
                    dir,
                ]);
            }
            let mut msg = Msg::new(op::COPY, ints);
            msg.data = data;
            let (r, _) = conn.call(&msg)?;
            if r.op != op::OK || r.ints.len() != chunk.len() {
                return Err(XenError::Invalid("grant copy reply does not match".into()));
            }
            let mut from = r.data.as_slice();
            for (s, &st) in chunk.iter_mut().zip(&r.ints) {
                s.status = i16::try_from(st as i64).unwrap_or(GNTST_GENERAL_ERROR);
                if let CopyDir::FromGuest { dst } = &mut s.dir {
                    let (head, rest) = from.split_at(dst.len().min(from.len()));
                    if s.status == 0 {
                        dst.copy_from_slice(head);
                    }
                    from = rest;
                }
            }
        }
        Ok(())
    }
}

/// An event channel handle through the hypercall socket: the connection is the handle.
#[derive(Debug)]
pub struct RemoteEvtchn {
    conn: Mutex<Conn>,
    efd: OwnedFd,
    bound: Vec<Port>,
}

impl AsFd for RemoteEvtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }
}

impl EventChannels for RemoteEvtchn {
    fn bind_interdomain(&mut self, domid: DomId, remote: Port) -> Result<Port, XenError> {
        let msg = Msg::new(op::BIND, vec![u64::from(domid), u64::from(remote)]);
        let (r, _) = lock(&self.conn).evtchn_call("bind_interdomain", remote, &msg)?;
        let local = Port::try_from(r.int(0)).map_err(|_| XenError::Invalid("port".into()))?;
        self.bound.push(local);
        Ok(local)
    }

    fn unbind(&mut self, port: Port) -> Result<(), XenError> {
        let msg = Msg::new(op::UNBIND, vec![u64::from(port)]);
        lock(&self.conn).evtchn_call("unbind", port, &msg)?;
        self.bound.retain(|&p| p != port);
        Ok(())
    }

    fn notify(&self, port: Port) -> Result<(), XenError> {
        let msg = Msg::new(op::NOTIFY, vec![u64::from(port)]);
        lock(&self.conn).evtchn_call("notify", port, &msg).map(drop)
    }

    fn unmask(&self, port: Port) -> Result<(), XenError> {
        let msg = Msg::new(op::UNMASK, vec![u64::from(port)]);
        lock(&self.conn).evtchn_call("unmask", port, &msg).map(drop)
    }

    fn pending(&self) -> Result<Option<Port>, XenError> {
        let (r, _) = lock(&self.conn).evtchn_call("pending", 0, &Msg::new(op::PENDING, vec![]))?;
        Ok(Port::try_from(r.int(0)).ok().filter(|&p| p != 0))
    }
}
