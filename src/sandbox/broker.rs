//! The sandbox's privileged half: `rbdback serve-broker`, one per sandboxed `serve`, started
//! by it (as root, before it drops) on a socket pair, and ending when that socket closes.
//!
//! A sandboxed backend can no longer open `/dev/xen/evtchn`, reach xenstored or read its
//! disks' Ceph configuration and keyrings (root's files, typically mode 0600); a disk
//! hot-plugged after the drop needs all three. The broker hands them over, as descriptors,
//! and only its own guest's:
//!
//! - `XENSTORE`: a socket whose other end the broker forwards to xenstored through a
//!   [`proxy`] policy ([`xenstore_policy`]): the guest's backend directories (read; write only
//!   the nodes a backend writes, never `params` or the toolstack's other nodes), its error
//!   nodes, and the guest's own domain directory (read).
//! - `EVTCHN`: a new event channel handle restricted to the guest
//!   ([`Platform::evtchn_export`]).
//! - `CEPH_FILES devid`: the ceph.conf, keyring, key file and LUKS passphrase file that the
//!   disk's `params` names (read by the broker itself from xenstore, which the backend cannot
//!   write), found as librados finds them ([`crate::rados::config_files`]).
//! - `LISTENER`: the backend's seccomp listener. A call the filter does not allow stops the
//!   calling thread in the kernel; the broker names it (number, name, thread), writes the
//!   record to `<run dir>/serve-<domid>.sigsys`, logs it and kills the backend with SIGSYS
//!   (for every thread alike: librados' threads block all signals, so a SIGSYS handler in the
//!   backend would never run for them). In learning mode it lets the call go on instead and
//!   logs it (deriving the allowlist, docs/sandbox.md).
//!
//! Owns: the protocol ([`op`], over [`crate::fdmsg`]), the checks above, the client side
//! ([`Broker`]) and the platform and image opener a sandboxed backend uses through it
//! ([`Brokered`], [`ConfinedOpener`]).
//! Trusts: nothing the backend sends (it may be compromised): every request is bounded and
//! answered about the broker's own guest only; devids are numbers; paths come from xenstore.
//! Must never: answer for another guest, open a file `params` does not lead to, or outlive
//! its backend.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use tracing::{error, info, warn};

use super::{filter, SandboxError};
use crate::device::params::DiskSpec;
use crate::device::vbd::{ImageOpener, VbdId};
use crate::fdmsg::{recv, send, Msg};
use crate::rados::{self, Image, ImageSpec, RadosError};
use crate::xen::xenstore::proxy::{self, Access};
use crate::xen::xenstore::Xenstore;
use crate::xen::{DomId, Platform, XenError};

/// The requests and answers.
pub mod op {
    /// A proxied xenstore connection (answer: one socket).
    pub const XENSTORE: u8 = 1;
    /// An event channel handle restricted to the guest (answer: its descriptors).
    pub const EVTCHN: u8 = 2;
    /// The Ceph files of disk `devid` (answer: a role per descriptor, see [`super::Role`]).
    pub const CEPH_FILES: u8 = 3;
    /// The seccomp listener (one descriptor attached).
    pub const LISTENER: u8 = 4;
    /// Success.
    pub const OK: u8 = 100;
    /// Failure; the message is the data.
    pub const ERR: u8 = 101;
}

/// What a file handed over for a disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Its ceph.conf.
    Conf = 1,
    /// Its keyring.
    Keyring = 2,
    /// The `keyfile` option's file.
    Keyfile = 3,
    /// The LUKS passphrase of an encrypted image.
    Passphrase = 4,
}

impl Role {
    fn from_u64(v: u64) -> Option<Role> {
        Some(match v {
            1 => Role::Conf,
            2 => Role::Keyring,
            3 => Role::Keyfile,
            4 => Role::Passphrase,
            _ => return None,
        })
    }

    /// The copy's file name suffix.
    fn ext(self) -> &'static str {
        match self {
            Role::Conf => "conf",
            Role::Keyring => "keyring",
            Role::Keyfile => "keyfile",
            Role::Passphrase => "passphrase",
        }
    }
}

/// A Ceph file larger than this is refused (keyrings and configurations are a few KiB).
const MAX_FILE: u64 = 1 << 20;

/// Which guest a broker works for.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The guest.
    pub domid: DomId,
    /// Our domain (0 in dom0).
    pub backend_domid: DomId,
    /// Backend kind directory (`vbd`).
    pub kind: String,
    /// Where the record of a forbidden call goes (`serve-<domid>.sigsys`).
    pub run_dir: PathBuf,
    /// Let forbidden calls go on and log them, instead of killing the backend.
    pub learn: bool,
}

/// The record of the forbidden call that killed guest `domid`'s backend, in `run_dir`.
pub fn record_path(run_dir: &Path, domid: DomId) -> PathBuf {
    run_dir.join(format!("serve-{domid}.sigsys"))
}

/// The nodes of a VBD's backend directory a backend writes (`src/device/vbd.rs`,
/// `stall.rs`); the toolstack's nodes (`params`, `mode`, `frontend`, `online`, ...) are
/// never among them.
pub const WRITABLE_NODES: &[&str] = &[
    "state",
    "multi-queue-max-queues",
    "max-ring-page-order",
    "sectors",
    "info",
    "sector-size",
    "physical-sector-size",
    "stalled",
    // an operator's request to re-open the image: the backend removes it once honoured
    "reopen",
    crate::device::vbd::IMAGE_NODE,
];

/// Whether `node` (a name in a VBD's backend directory) is one a backend writes.
fn writable_node(node: &str) -> bool {
    WRITABLE_NODES.contains(&node) || node.starts_with("feature-") || node.starts_with("discard-")
}

/// What guest `domid`'s backend may reach in xenstore: read its backend directories
/// (`backend/<kind>/<domid>`), its error nodes and the guest's own domain directory; write
/// the nodes a backend writes in each VBD's directory ([`WRITABLE_NODES`], `feature-*`,
/// `discard-*`) and the VBDs' `error` nodes.
pub fn xenstore_policy(backend_domid: DomId, kind: &str, domid: DomId) -> proxy::Policy {
    let backend = format!("/local/domain/{backend_domid}/backend/{kind}/{domid}");
    let errors = format!("/local/domain/{backend_domid}/error/backend/{kind}/{domid}");
    let guest = format!("/local/domain/{domid}");
    let under =
        |p: &str, pre: &str| p == pre || p.strip_prefix(pre).is_some_and(|r| r.starts_with('/'));
    Arc::new(move |a, p: &str| match a {
        Access::Read => under(p, &backend) || under(p, &errors) || under(p, &guest),
        Access::Write => {
            if let Some(rest) = p.strip_prefix(&errors).and_then(|r| r.strip_prefix('/')) {
                // <devid>/error
                return matches!(rest.split_once('/'), Some((d, "error")) if d.parse::<u32>().is_ok());
            }
            match p
                .strip_prefix(&backend)
                .and_then(|r| r.strip_prefix('/'))
                .and_then(|r| r.split_once('/'))
            {
                Some((devid, node)) => devid.parse::<u32>().is_ok() && writable_node(node),
                None => false,
            }
        }
    })
}

// ---------------------------------------------------------------- the broker process

/// Runs the broker for `cfg`'s guest on `sock` until the backend closes it.
pub fn run<P: Platform>(
    platform: &P,
    cfg: &BrokerConfig,
    sock: &UnixStream,
) -> Result<(), XenError> {
    let _ = std::fs::remove_file(record_path(&cfg.run_dir, cfg.domid));
    let xs = platform.xenstore()?;
    let serve = nix::unistd::getppid();
    info!(domid = cfg.domid, serve = serve.as_raw(), "broker ready");
    loop {
        let (msg, mut fds) = match recv(sock) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                warn!(error = %e, "broker: the backend's socket broke");
                break;
            }
        };
        let answer = match msg.op {
            op::XENSTORE => xenstore(platform, cfg),
            op::EVTCHN => platform
                .evtchn_export(cfg.domid)
                .map(|fds| (Vec::new(), fds))
                .map_err(|e| crate::chain(&e)),
            op::CEPH_FILES => ceph_files(&xs, cfg, msg.int(0)),
            op::LISTENER => match fds.pop() {
                Some(l) => watch_listener(l, serve, cfg).map(|()| (Vec::new(), Vec::new())),
                None => Err("no listener attached".into()),
            },
            other => Err(format!("unknown request {other}")),
        };
        let sent = match answer {
            Ok((ints, fds)) => {
                let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                send(sock, &Msg::new(op::OK, ints), &raw)
            }
            Err(e) => {
                warn!(request = msg.op, error = %e, "broker refused a request");
                let mut m = Msg::new(op::ERR, Vec::new());
                m.data = e.into_bytes();
                send(sock, &m, &[])
            }
        };
        if sent.is_err() {
            break;
        }
    }
    info!(domid = cfg.domid, "broker: the backend is gone");
    Ok(())
}

type Answer = Result<(Vec<u64>, Vec<OwnedFd>), String>;

fn xenstore<P: Platform>(platform: &P, cfg: &BrokerConfig) -> Answer {
    let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
    proxy::spawn(
        ours,
        &platform.xenstore_path(),
        &format!("/local/domain/{}", cfg.backend_domid),
        xenstore_policy(cfg.backend_domid, &cfg.kind, cfg.domid),
    )
    .map_err(|e| crate::chain(&e))?;
    Ok((Vec::new(), vec![OwnedFd::from(theirs)]))
}

/// Opens `path` for reading: a regular file of at most [`MAX_FILE`] bytes.
fn open_file(path: &Path, what: &str) -> Result<OwnedFd, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let m = f
        .metadata()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if !m.is_file() || m.len() > MAX_FILE {
        return Err(format!(
            "{what} {} is not a regular file of at most {MAX_FILE} bytes",
            path.display()
        ));
    }
    Ok(OwnedFd::from(f))
}

/// The files disk `devid` of the broker's guest needs, from its own `params`.
fn ceph_files(xs: &Xenstore, cfg: &BrokerConfig, devid: u64) -> Answer {
    let devid = u32::try_from(devid).map_err(|_| format!("devid {devid} is not a device"))?;
    let be = format!(
        "/local/domain/{}/backend/{}/{}/{devid}",
        cfg.backend_domid, cfg.kind, cfg.domid
    );
    let params = xs
        .read(&format!("{be}/params"))
        .map_err(|e| crate::chain(&e))?
        .ok_or_else(|| format!("{be} has no params"))?;
    let spec = DiskSpec::parse(&params).map_err(|e| crate::chain(&e))?;
    let files = rados::config_files(&spec.target).map_err(|e| crate::chain(&e))?;
    let mut roles = Vec::new();
    let mut fds = Vec::new();
    let mut add = |role: Role, path: Option<&Path>| -> Result<(), String> {
        if let Some(p) = path {
            fds.push(open_file(p, role.ext())?);
            roles.push(role as u64);
        }
        Ok(())
    };
    add(Role::Conf, files.conf.as_deref())?;
    add(Role::Keyring, files.keyring.as_deref())?;
    add(Role::Keyfile, files.keyfile.as_deref())?;
    let pass = spec
        .target
        .encryption
        .as_ref()
        .map(|e| e.passphrase_file.as_str());
    add(Role::Passphrase, pass.map(Path::new))?;
    Ok((roles, fds))
}

/// Reads the backend's seccomp notifications on a thread of their own.
fn watch_listener(
    listener: OwnedFd,
    serve: nix::unistd::Pid,
    cfg: &BrokerConfig,
) -> Result<(), String> {
    let (record, learn, domid) = (record_path(&cfg.run_dir, cfg.domid), cfg.learn, cfg.domid);
    std::thread::Builder::new()
        .name("broker-seccomp".into())
        .spawn(move || notifications(&listener, serve, &record, learn, domid))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A forbidden call, for the log and the supervisor.
fn describe(n: &libc::seccomp_notif, serve: nix::unistd::Pid) -> String {
    let nr = i64::from(n.data.nr);
    let name = filter::syscall_name(nr).unwrap_or("unknown");
    let comm = std::fs::read_to_string(format!("/proc/{}/task/{}/comm", serve.as_raw(), n.pid))
        .map(|c| c.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    format!(
        "system call {nr} ({name}) by thread {} ({comm}) at {:#x}, arguments [{}]",
        n.pid,
        n.data.instruction_pointer,
        n.data
            .args
            .iter()
            .map(|a| format!("{a:#x}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn notifications(
    listener: &OwnedFd,
    serve: nix::unistd::Pid,
    record: &Path,
    learn: bool,
    domid: DomId,
) {
    let mut learned: BTreeMap<i32, u64> = BTreeMap::new();
    loop {
        // SAFETY: an all-zero seccomp_notif is valid (plain integers) and is what
        // SECCOMP_IOCTL_NOTIF_RECV requires as input.
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: the listener is a seccomp notification descriptor; the ioctl writes one
        // seccomp_notif into `n`, which is exactly that size and alive for the call.
        let rc = unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV as _,
                std::ptr::from_mut(&mut n),
            )
        };
        if rc < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                // interrupted, or the caller died before we read it
                Some(libc::EINTR | libc::ENOENT) => continue,
                _ => return, // the backend is gone (no filter users left)
            }
        }
        let what = describe(&n, serve);
        if learn {
            let seen = learned.entry(n.data.nr).or_default();
            *seen += 1;
            if *seen == 1 {
                warn!(domid, "sandbox learning: {what}");
            }
            let mut resp = libc::seccomp_notif_resp {
                id: n.id,
                val: 0,
                error: 0,
                flags: u32::try_from(libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE).unwrap_or(1),
            };
            // SAFETY: `resp` is a seccomp_notif_resp for the notification just received,
            // alive for the call; the kernel only reads it.
            let _ = unsafe {
                libc::ioctl(
                    listener.as_raw_fd(),
                    libc::SECCOMP_IOCTL_NOTIF_SEND as _,
                    std::ptr::from_mut(&mut resp),
                )
            };
            continue;
        }
        error!(domid, "forbidden {what}: killing the backend with SIGSYS");
        let mut f = std::fs::OpenOptions::new();
        f.write(true).create(true).truncate(true).mode(0o600);
        if let Err(e) = f.open(record).and_then(|mut f| writeln!(f, "{what}")) {
            warn!(error = %e, path = %record.display(), "cannot record the forbidden call");
        }
        let _ = nix::sys::signal::kill(serve, nix::sys::signal::Signal::SIGSYS);
        // the notification stays unanswered: the process is dying
    }
}

// ---------------------------------------------------------------- the backend's side

/// The backend's connection to its broker.
#[derive(Debug)]
pub struct Broker {
    sock: Mutex<UnixStream>,
    /// The broker process (never waited for: see Drop).
    _child: Option<Child>,
}

impl Broker {
    /// Starts `cmd` (an `rbdback serve-broker` command line) with a socket pair's end as its
    /// standard input, and connects to it.
    pub fn spawn(mut cmd: Command) -> Result<Broker, SandboxError> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| SandboxError::Broker(format!("socket pair: {e}")))?;
        let child = cmd
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| SandboxError::Broker(format!("cannot start it: {e}")))?;
        Ok(Broker {
            sock: Mutex::new(ours),
            _child: Some(child),
        })
    }

    /// A broker on a socket already connected to one (tests).
    pub fn on(sock: UnixStream) -> Broker {
        Broker {
            sock: Mutex::new(sock),
            _child: None,
        }
    }

    fn call(&self, msg: &Msg, fds: &[RawFd]) -> Result<(Msg, Vec<OwnedFd>), String> {
        let s = self
            .sock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        send(&s, msg, fds).map_err(|e| format!("cannot reach the broker: {e}"))?;
        let (r, fds) = recv(&s)
            .map_err(|e| format!("no answer from the broker: {e}"))?
            .ok_or("the broker is gone")?;
        if r.op == op::OK {
            Ok((r, fds))
        } else {
            Err(format!(
                "the broker refused: {}",
                String::from_utf8_lossy(&r.data)
            ))
        }
    }

    /// A xenstore connection through the broker's proxy.
    pub fn xenstore(&self) -> Result<UnixStream, String> {
        let (_, mut fds) = self.call(&Msg::new(op::XENSTORE, Vec::new()), &[])?;
        fds.pop()
            .map(UnixStream::from)
            .ok_or_else(|| "no socket in the broker's answer".into())
    }

    /// A new event channel handle restricted to the guest, as descriptors.
    pub fn evtchn(&self) -> Result<Vec<OwnedFd>, String> {
        Ok(self.call(&Msg::new(op::EVTCHN, Vec::new()), &[])?.1)
    }

    /// The Ceph files of disk `devid`, by role.
    pub fn ceph_files(&self, devid: u32) -> Result<Vec<(Role, OwnedFd)>, String> {
        let (r, fds) = self.call(&Msg::new(op::CEPH_FILES, vec![u64::from(devid)]), &[])?;
        if r.ints.len() != fds.len() {
            return Err("the broker's answer does not match its descriptors".into());
        }
        r.ints
            .iter()
            .zip(fds)
            .map(|(&role, fd)| {
                Role::from_u64(role)
                    .map(|r| (r, fd))
                    .ok_or_else(|| format!("unknown file role {role}"))
            })
            .collect()
    }

    /// Hands the seccomp listener over.
    pub fn hand_listener(&self, listener: OwnedFd) -> Result<(), String> {
        self.call(&Msg::new(op::LISTENER, Vec::new()), &[listener.as_raw_fd()])
            .map(drop)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // closing our end ends the broker; the backend exits next and init reaps it (a
        // sandboxed backend has no wait4)
        let _ = self
            .sock
            .lock()
            .map(|s| s.shutdown(std::net::Shutdown::Both));
    }
}

/// The platform of a sandboxed backend: the grant table handle opened before the drop (one
/// per process), the xenstore connection and event channel handles from the broker.
#[derive(Debug)]
pub struct Brokered<P: Platform> {
    inner: P,
    broker: Arc<Broker>,
    gnttab: Mutex<Option<P::Gnttab>>,
}

impl<P: Platform> Brokered<P>
where
    P::Gnttab: std::fmt::Debug,
{
    /// `inner`'s platform, with `gnttab` opened before the drop and `broker` for the rest.
    pub fn new(inner: P, gnttab: P::Gnttab, broker: Arc<Broker>) -> Self {
        Brokered {
            inner,
            broker,
            gnttab: Mutex::new(Some(gnttab)),
        }
    }
}

fn broker_err(e: String) -> XenError {
    XenError::io(
        "the sandbox's broker",
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, e),
    )
}

impl<P: Platform> Platform for Brokered<P>
where
    P::Gnttab: std::fmt::Debug,
{
    type Gnttab = P::Gnttab;
    type Evtchn = P::Evtchn;

    fn gnttab(&self) -> Result<P::Gnttab, XenError> {
        self.gnttab
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                XenError::Invalid(
                    "a sandboxed backend has the one grant table handle it opened before the drop"
                        .into(),
                )
            })
    }

    fn evtchn(&self) -> Result<P::Evtchn, XenError> {
        let fds = self.broker.evtchn().map_err(broker_err)?;
        self.inner.evtchn_import(fds)
    }

    fn xenstore(&self) -> Result<Xenstore, XenError> {
        let s = self.broker.xenstore().map_err(broker_err)?;
        Ok(Xenstore::from_stream(
            s,
            Path::new("(the broker's xenstore proxy)"),
        )?)
    }

    fn xenstore_path(&self) -> PathBuf {
        self.inner.xenstore_path()
    }
}

/// Opens a sandboxed backend's images: asks the broker for the disk's Ceph files, copies them
/// into the guest's state directory (`ceph/<devid>.<role>`, mode 0600) where librados can read
/// them, opens the image with the copies (and with no admin socket or log file, which would
/// be outside what the backend may write), then removes the copies: librados keeps the key in
/// memory.
#[derive(Debug)]
pub struct ConfinedOpener<O> {
    inner: O,
    broker: Arc<Broker>,
    dir: PathBuf,
}

impl<O: ImageOpener> ConfinedOpener<O> {
    /// `inner` opening images with the files `broker` hands over, copied into `state_dir`.
    pub fn new(inner: O, broker: Arc<Broker>, state_dir: &Path) -> Self {
        ConfinedOpener {
            inner,
            broker,
            dir: state_dir.join("ceph"),
        }
    }

    /// The spec with the copies of the disk's files in place; the copies' paths.
    fn confine(&self, devid: u32, spec: &ImageSpec) -> Result<(ImageSpec, Vec<PathBuf>), String> {
        let files = self.broker.ceph_files(devid)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let mut s = spec.clone();
        let mut copies = Vec::new();
        // librados reads a named conf or none: an empty one when the disk has none, so that
        // it never searches the default places (which the sandbox hides)
        let mut conf = None;
        for (role, fd) in files {
            let path = self.dir.join(format!("{devid}.{}", role.ext()));
            copy(fd, &path)?;
            copies.push(path.clone());
            let p = path.display().to_string();
            match role {
                Role::Conf => conf = Some(p),
                Role::Keyring => s.keyring = Some(p),
                Role::Keyfile => s.conf_options.push(("keyfile".into(), p)),
                Role::Passphrase => {
                    if let Some(e) = s.encryption.as_mut() {
                        e.passphrase_file = p;
                    }
                }
            }
        }
        if conf.is_none() {
            let path = self.dir.join(format!("{devid}.conf"));
            copy_bytes(&[], &path)?;
            copies.push(path.clone());
            conf = Some(path.display().to_string());
        }
        s.conf = conf;
        s.conf_options.push(("admin_socket".into(), String::new()));
        s.conf_options.push(("log_file".into(), String::new()));
        Ok((s, copies))
    }
}

fn copy_bytes(bytes: &[u8], to: &Path) -> Result<(), String> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true).mode(0o600);
    o.open(to)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("cannot write {}: {e}", to.display()))
}

fn copy(fd: OwnedFd, to: &Path) -> Result<(), String> {
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_FILE)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read a file the broker handed over: {e}"))?;
    copy_bytes(&bytes, to)
}

impl<O: ImageOpener> ImageOpener for ConfinedOpener<O> {
    fn open(&self, _spec: &ImageSpec) -> Result<Arc<Image>, RadosError> {
        Err(RadosError::Invalid(
            "a sandboxed backend opens images only for a disk of its guest".into(),
        ))
    }

    fn open_disk(&self, id: &VbdId, spec: &ImageSpec) -> Result<Arc<Image>, RadosError> {
        let (s, copies) = self
            .confine(id.devid, spec)
            .map_err(|e| RadosError::Invalid(format!("the disk's Ceph files: {e}")))?;
        let r = self.inner.open(&s);
        for c in copies {
            let _ = std::fs::remove_file(c);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_writes_only_its_own_nodes() {
        let p = xenstore_policy(0, "vbd", 5);
        let be = "/local/domain/0/backend/vbd/5";
        let r = |path: &str| p(Access::Read, path);
        let w = |path: &str| p(Access::Write, path);
        assert!(r(be) && r(&format!("{be}/51712/params")));
        assert!(r("/local/domain/5/device/vbd/51712/ring-ref"));
        assert!(r("/local/domain/0/error/backend/vbd/5/51712/error"));
        assert!(!r("/local/domain/0/backend/vbd/6/51712/params"));
        assert!(!r("/local/domain/0/backend/vbd/55/51712/params"));
        assert!(!r("/local/domain/6/device/vbd/51712/ring-ref"));
        assert!(!r("/local/domain/0/backend/vbd"));
        assert!(!r("/vm"));
        for node in [
            "state",
            "sectors",
            "feature-persistent",
            "discard-granularity",
            "rbdback-image",
            "stalled",
            "reopen",
        ] {
            assert!(w(&format!("{be}/51712/{node}")), "{node}");
        }
        for node in [
            "params",
            "mode",
            "frontend",
            "online",
            "hotplug-status",
            "type",
        ] {
            assert!(!w(&format!("{be}/51712/{node}")), "{node}");
        }
        assert!(!w(&format!("{be}/51712")), "the device directory");
        assert!(!w(&format!("{be}/x/state")), "not a devid");
        assert!(!w("/local/domain/5/device/vbd/51712/state"), "the frontend");
        assert!(w("/local/domain/0/error/backend/vbd/5/51712/error"));
        assert!(!w("/local/domain/0/error/backend/vbd/6/51712/error"));
        assert!(!w("/local/domain/0/error/backend/vbd/5/51712/other"));
    }
}
