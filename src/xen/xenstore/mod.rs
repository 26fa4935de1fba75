//! A xenstore client speaking `xs_wire.h` over xenstored's unix socket or `/dev/xen/xenbus`.
//!
//! Owns: one connection, a reader thread that demultiplexes replies (by `req_id`) and watch
//! events (by token), transactions with retry on `EAGAIN`.
//! Trusts: the daemon's framing only after [`wire::Msg::decode`] bounded it; values are
//! untrusted strings (other domains write them).
//! Must never: block one caller on another's request beyond the socket write, or lose a watch
//! event that arrives before the caller looks (events queue per watch).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};
use thiserror::Error;
use tracing::debug;

pub mod proxy;
pub mod wire;

pub use wire::Perm;
use wire::{ty, Msg};

/// How long a request waits for its reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a transaction is retried on `EAGAIN`.
pub const TRANSACTION_RETRIES: usize = 100;

/// A xenstore error.
#[derive(Debug, Error)]
pub enum XsError {
    /// The daemon answered with an error.
    #[error("{op} {path}: {errno}")]
    Errno {
        /// The operation.
        op: &'static str,
        /// The path.
        path: String,
        /// The errno name (`ENOENT`, `EACCES`, `EAGAIN`, ...).
        errno: String,
    },
    /// Connection I/O.
    #[error("xenstore connection")]
    Io(#[from] std::io::Error),
    /// The daemon broke the protocol.
    #[error("xenstore protocol: {0}")]
    Protocol(String),
    /// The connection is closed.
    #[error("xenstore connection closed")]
    Closed,
    /// No reply in time.
    #[error("no xenstore reply to {0} within {REPLY_TIMEOUT:?}")]
    Timeout(&'static str),
    /// A value or path too long for one message.
    #[error("xenstore request for {0} is longer than the 4096-byte payload limit")]
    TooLong(String),
}

impl XsError {
    /// The errno name, if the daemon answered with one.
    pub fn errno(&self) -> Option<&str> {
        match self {
            XsError::Errno { errno, .. } => Some(errno),
            _ => None,
        }
    }

    /// Whether the daemon said `ENOENT`.
    pub fn is_enoent(&self) -> bool {
        self.errno() == Some("ENOENT")
    }
}

/// A watch firing: the path that changed and the watch's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that changed (at or below the watched path).
    pub path: String,
    /// The watch's token.
    pub token: String,
}

struct Sink {
    tx: SyncSender<WatchEvent>,
    efd: Arc<EventFd>,
}

/// Events a watch keeps queued. A guest writing its nodes in a loop (XSA-349) cannot grow
/// our memory: past this, events are dropped — every consumer treats an event as "something
/// under the path changed, re-read it", and a full queue already guarantees a wake-up.
pub const WATCH_QUEUE_MAX: usize = 256;

struct Inner {
    writer: Mutex<Box<dyn Write + Send>>,
    pending: Mutex<HashMap<u32, Sender<Msg>>>,
    watches: Mutex<HashMap<String, Sink>>,
    next_req: AtomicU32,
    closed: AtomicBool,
    /// A handle to shut the socket down when the last user goes (ends the reader thread).
    shutdown: Mutex<Option<UnixStream>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

static TOKENS: AtomicU64 = AtomicU64::new(1);

/// A connection to xenstore. `Send + Sync`: share it with `Arc`.
pub struct Xenstore {
    inner: Arc<Inner>,
    path: PathBuf,
}

impl std::fmt::Debug for Xenstore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xenstore")
            .field("path", &self.path)
            .finish()
    }
}

/// Reads whole messages from `r` and hands each to `f` until the stream ends, breaks the
/// framing or `f` says stop (returns false).
pub(crate) fn for_each_msg(mut r: impl Read, mut f: impl FnMut(Msg) -> bool) {
    let mut buf: Vec<u8> = Vec::with_capacity(2 * (wire::HEADER_LEN + wire::PAYLOAD_MAX));
    let mut chunk = vec![0u8; wire::HEADER_LEN + wire::PAYLOAD_MAX];
    loop {
        match Msg::decode(&buf) {
            Ok(Some((msg, used))) => {
                buf.drain(..used);
                if !f(msg) {
                    return;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                debug!(error = %e, "xenstore stream corrupt; closing");
                return;
            }
        }
        match r.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn reader_loop(inner: &Inner, r: Box<dyn Read + Send>) {
    for_each_msg(r, |msg| {
        dispatch(inner, msg);
        true
    });
    inner.closed.store(true, Ordering::Release);
    // Wake every waiter: dropping the senders makes their recv fail with Disconnected.
    lock(&inner.pending).clear();
    lock(&inner.watches).clear();
}

fn dispatch(inner: &Inner, msg: Msg) {
    if msg.ty == ty::WATCH_EVENT {
        let parts = msg.strings();
        let (Some(path), Some(token)) = (parts.first(), parts.get(1)) else {
            return;
        };
        let watches = lock(&inner.watches);
        if let Some(sink) = watches.get(token) {
            // a full queue drops the event (see WATCH_QUEUE_MAX); the eventfd is readable anyway
            if sink
                .tx
                .try_send(WatchEvent {
                    path: path.clone(),
                    token: token.clone(),
                })
                .is_ok()
            {
                let _ = sink.efd.write(1);
            }
        }
        return;
    }
    if let Some(tx) = lock(&inner.pending).remove(&msg.req_id) {
        let _ = tx.send(msg);
    }
}

/// Where [`Xenstore::open_default`] connects: `$XENSTORED_PATH`, else
/// `/run/xenstored/socket` if it exists, else `/dev/xen/xenbus`.
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("XENSTORED_PATH") {
        return PathBuf::from(p);
    }
    let sock = Path::new("/run/xenstored/socket");
    if sock.exists() {
        return sock.to_owned();
    }
    PathBuf::from("/dev/xen/xenbus")
}

/// The halves of a byte stream to xenstored, and a handle that shuts it down (sockets only).
pub(crate) type RawConn = (
    Box<dyn Read + Send>,
    Box<dyn Write + Send>,
    Option<UnixStream>,
);

/// Connects to xenstored's unix socket, or opens the `/dev/xen/xenbus` character device: the
/// byte stream, no client on it.
pub(crate) fn open_raw(path: &Path) -> Result<RawConn, XsError> {
    let is_socket = std::fs::metadata(path).map(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    })?;
    if is_socket {
        let s = UnixStream::connect(path)?;
        return Ok((Box::new(s.try_clone()?), Box::new(s.try_clone()?), Some(s)));
    }
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    Ok((Box::new(f.try_clone()?), Box::new(f), None))
}

impl Xenstore {
    /// Connects to xenstored's unix socket, or opens the `/dev/xen/xenbus` character device.
    pub fn connect(path: &Path) -> Result<Xenstore, XsError> {
        let (r, w, shutdown) = open_raw(path)?;
        Self::start(r, w, shutdown, path)
    }

    /// A client over a connected stream that speaks `xs_wire.h` (a socket pair whose other
    /// end a sandboxed backend's broker forwards to xenstored); `label` names it in errors.
    pub fn from_stream(s: UnixStream, label: &Path) -> Result<Xenstore, XsError> {
        let shutdown = Some(s.try_clone()?);
        Self::start(Box::new(s.try_clone()?), Box::new(s), shutdown, label)
    }

    fn start(
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
        shutdown: Option<UnixStream>,
        path: &Path,
    ) -> Result<Xenstore, XsError> {
        let inner = Arc::new(Inner {
            writer: Mutex::new(w),
            pending: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
            next_req: AtomicU32::new(1),
            closed: AtomicBool::new(false),
            shutdown: Mutex::new(shutdown),
        });
        let reader = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("xenstore-rx".into())
            .spawn(move || reader_loop(&reader, r))?;
        Ok(Xenstore {
            inner,
            path: path.to_owned(),
        })
    }

    /// `$XENSTORED_PATH`, else `/run/xenstored/socket`, else `/dev/xen/xenbus`.
    pub fn open_default() -> Result<Xenstore, XsError> {
        Self::connect(&default_path())
    }

    /// The path this client connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and waits for its reply.
    pub(crate) fn request(
        &self,
        op: &'static str,
        ty: u32,
        tx_id: u32,
        parts: &[&str],
        tail: Option<&[u8]>,
    ) -> Result<Msg, XsError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(XsError::Closed);
        }
        let req_id = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        let msg = Msg::request(ty, req_id, tx_id, parts, tail);
        let path = parts.first().copied().unwrap_or("");
        let bytes = msg
            .encode()
            .ok_or_else(|| XsError::TooLong(path.to_owned()))?;
        let (tx, rx) = mpsc::channel();
        lock(&self.inner.pending).insert(req_id, tx);
        let written = lock(&self.inner.writer).write_all(&bytes);
        if let Err(e) = written {
            lock(&self.inner.pending).remove(&req_id);
            return Err(e.into());
        }
        let reply = match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                lock(&self.inner.pending).remove(&req_id);
                return Err(XsError::Timeout(op));
            }
            Err(RecvTimeoutError::Disconnected) => return Err(XsError::Closed),
        };
        if reply.ty == ty::ERROR {
            return Err(XsError::Errno {
                op,
                path: path.to_owned(),
                errno: reply.text(),
            });
        }
        if reply.ty != ty {
            return Err(XsError::Protocol(format!(
                "reply type {} to a request of type {ty}",
                reply.ty
            )));
        }
        Ok(reply)
    }

    /// Reads a node; `None` if it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<String>, XsError> {
        read_in(self, 0, path)
    }

    /// Writes a node (creating it and its parents).
    pub fn write(&self, path: &str, value: &str) -> Result<(), XsError> {
        write_in(self, 0, path, value)
    }

    /// Creates a node.
    pub fn mkdir(&self, path: &str) -> Result<(), XsError> {
        self.request("mkdir", ty::MKDIR, 0, &[path], None).map(drop)
    }

    /// Removes a node and everything below it; a missing node is not an error.
    pub fn rm(&self, path: &str) -> Result<(), XsError> {
        rm_in(self, 0, path)
    }

    /// Children of a node; empty if it does not exist.
    pub fn directory(&self, path: &str) -> Result<Vec<String>, XsError> {
        directory_in(self, 0, path)
    }

    /// Permissions of a node (owner first).
    pub fn get_perms(&self, path: &str) -> Result<Vec<Perm>, XsError> {
        let m = self.request("get-perms", ty::GET_PERMS, 0, &[path], None)?;
        m.strings()
            .iter()
            .map(|s| {
                Perm::parse(s).ok_or_else(|| XsError::Protocol(format!("bad permission {s:?}")))
            })
            .collect()
    }

    /// Sets the permissions of a node (owner first).
    pub fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        let enc: Vec<String> = perms.iter().map(Perm::encode).collect();
        let mut parts: Vec<&str> = vec![path];
        parts.extend(enc.iter().map(String::as_str));
        self.request("set-perms", ty::SET_PERMS, 0, &parts, None)
            .map(drop)
    }

    /// Watches `path` and everything below it. The daemon fires once on registration.
    pub fn watch(&self, path: &str) -> Result<Watch, XsError> {
        let token = format!("rbdback-{}", TOKENS.fetch_add(1, Ordering::Relaxed));
        let efd =
            Arc::new(EventFd::from_flags(EfdFlags::EFD_NONBLOCK).map_err(std::io::Error::from)?);
        let (tx, rx) = mpsc::sync_channel(WATCH_QUEUE_MAX);
        lock(&self.inner.watches).insert(
            token.clone(),
            Sink {
                tx,
                efd: Arc::clone(&efd),
            },
        );
        if let Err(e) = self.request("watch", ty::WATCH, 0, &[path, &token], None) {
            lock(&self.inner.watches).remove(&token);
            return Err(e);
        }
        Ok(Watch {
            client: Xenstore {
                inner: Arc::clone(&self.inner),
                path: self.path.clone(),
            },
            path: path.to_owned(),
            token,
            rx,
            efd,
        })
    }

    /// Runs `f` in a transaction, retrying the whole of it while the commit says `EAGAIN`.
    pub fn transaction<T>(
        &self,
        mut f: impl FnMut(&Transaction<'_>) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        for _ in 0..TRANSACTION_RETRIES {
            let m = self.request("transaction-start", ty::TRANSACTION_START, 0, &[""], None)?;
            let id: u32 = m
                .text()
                .trim()
                .parse()
                .map_err(|_| XsError::Protocol(format!("bad transaction id {:?}", m.text())))?;
            let tx = Transaction { xs: self, id };
            match f(&tx) {
                Ok(v) => {
                    match self.request("transaction-end", ty::TRANSACTION_END, id, &["T"], None) {
                        Ok(_) => return Ok(v),
                        Err(e) if e.errno() == Some("EAGAIN") => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => {
                    let _ = self.request("transaction-end", ty::TRANSACTION_END, id, &["F"], None);
                    return Err(e);
                }
            }
        }
        Err(XsError::Errno {
            op: "transaction",
            path: String::new(),
            errno: "EAGAIN".into(),
        })
    }
}

fn read_in(xs: &Xenstore, tx: u32, path: &str) -> Result<Option<String>, XsError> {
    match xs.request("read", ty::READ, tx, &[path], None) {
        Ok(m) => Ok(Some(m.text())),
        Err(e) if e.is_enoent() => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_in(xs: &Xenstore, tx: u32, path: &str, value: &str) -> Result<(), XsError> {
    xs.request("write", ty::WRITE, tx, &[path], Some(value.as_bytes()))
        .map(drop)
}

fn rm_in(xs: &Xenstore, tx: u32, path: &str) -> Result<(), XsError> {
    match xs.request("rm", ty::RM, tx, &[path], None) {
        Ok(_) => Ok(()),
        Err(e) if e.is_enoent() => Ok(()),
        Err(e) => Err(e),
    }
}

fn directory_in(xs: &Xenstore, tx: u32, path: &str) -> Result<Vec<String>, XsError> {
    match xs.request("directory", ty::DIRECTORY, tx, &[path], None) {
        Ok(m) => Ok(m.strings()),
        Err(e) if e.is_enoent() => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Operations inside a transaction (see [`Xenstore::transaction`]).
#[derive(Debug)]
pub struct Transaction<'a> {
    xs: &'a Xenstore,
    id: u32,
}

impl Transaction<'_> {
    /// Reads a node; `None` if it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<String>, XsError> {
        read_in(self.xs, self.id, path)
    }
    /// Writes a node.
    pub fn write(&self, path: &str, value: &str) -> Result<(), XsError> {
        write_in(self.xs, self.id, path, value)
    }
    /// Creates a node.
    pub fn mkdir(&self, path: &str) -> Result<(), XsError> {
        self.xs
            .request("mkdir", ty::MKDIR, self.id, &[path], None)
            .map(drop)
    }
    /// Removes a node; a missing node is not an error.
    pub fn rm(&self, path: &str) -> Result<(), XsError> {
        rm_in(self.xs, self.id, path)
    }
    /// Children of a node.
    pub fn directory(&self, path: &str) -> Result<Vec<String>, XsError> {
        directory_in(self.xs, self.id, path)
    }
}

/// A registered watch; dropping it unregisters it.
pub struct Watch {
    client: Xenstore,
    path: String,
    token: String,
    rx: Receiver<WatchEvent>,
    efd: Arc<EventFd>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("path", &self.path)
            .field("token", &self.token)
            .finish()
    }
}

impl Watch {
    /// The next event, waiting up to `d`. A watch whose connection is gone (xenstored died)
    /// delivers nothing and still waits `d`, so that a caller's loop never spins.
    pub fn recv_timeout(&self, d: Duration) -> Option<WatchEvent> {
        match self.rx.recv_timeout(d) {
            Ok(ev) => {
                let _ = self.efd.read();
                Some(ev)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(d);
                None
            }
        }
    }

    /// The next queued event, if any.
    pub fn try_recv(&self) -> Option<WatchEvent> {
        let ev = self.rx.try_recv().ok();
        if ev.is_some() {
            let _ = self.efd.read();
        }
        ev
    }

    /// The watched path.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl AsFd for Watch {
    /// Readable while events are queued.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&self.client.inner.watches).remove(&self.token);
        if !self.client.inner.closed.load(Ordering::Acquire) {
            let _ =
                self.client
                    .request("unwatch", ty::UNWATCH, 0, &[&self.path, &self.token], None);
        }
    }
}

impl Drop for Xenstore {
    fn drop(&mut self) {
        // The last handle (the reader thread holds an Arc too): shut the socket so the reader
        // thread ends. Watches hold a client clone, so this runs only when they are gone.
        if Arc::strong_count(&self.inner) <= 2 {
            self.inner.closed.store(true, Ordering::Release);
            if let Some(s) = lock(&self.inner.shutdown).take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}
