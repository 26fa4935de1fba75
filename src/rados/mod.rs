//! Storage engines: asynchronous block I/O on an RBD image.
//!
//! Owns: opening images ([`Image::open`]), per-thread queues ([`Queue`]) whose completions
//! arrive on an eventfd, and the engines behind them — [`librbd`] (rbd_aio_*) and an
//! in-memory engine for tests of the layers above; and counting what an image occupies
//! ([`usage`], engine-agnostic, as `rbd du` does).
//! Trusts: the cluster's answers only as far as librados/librbd validate them.
//! Must never: see a grant or a ring, run our logic on librados threads (their callbacks only
//! queue a completion and signal the eventfd), or free a buffer the cluster may still write:
//! every operation owns its buffer until its completion has been reaped.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_queue::SegQueue;
use nix::sys::eventfd::{EfdFlags, EventFd};
use thiserror::Error;

pub mod bench;
pub(crate) mod client;
pub mod direct;
pub mod librbd;
mod sys;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
mod usage;

pub use client::{config_files, ConfigFiles};
pub use usage::{usage, Counted, Usage};

/// How the pool is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolRef {
    /// By name.
    Name(String),
    /// By id (ceph-csi volume handles).
    Id(i64),
}

/// Engine selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// The direct engine where the image's features allow, librbd otherwise.
    #[default]
    Auto,
    /// The direct RADOS engine.
    Direct,
    /// librbd.
    Librbd,
}

/// What to open and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Pool.
    pub pool: PoolRef,
    /// RADOS namespace.
    pub namespace: Option<String>,
    /// Image name.
    pub image: String,
    /// Snapshot (opened read-only).
    pub snapshot: Option<String>,
    /// Client id without `client.`.
    pub client_id: String,
    /// ceph.conf; `None`: librados' default search and `$CEPH_CONF`.
    pub conf: Option<String>,
    /// Keyring file.
    pub keyring: Option<String>,
    /// Inline key (never shown: `Debug` prints it redacted).
    pub key: Option<Secret>,
    /// Extra librados options.
    pub conf_options: Vec<(String, String)>,
    /// Engine.
    pub engine: EngineChoice,
    /// librbd cache (librbd engine only).
    pub rbd_cache: bool,
    /// What the direct engine does when another client asks for the exclusive lock.
    pub lock_policy: direct::LockPolicy,
    /// Open read-only.
    pub read_only: bool,
    /// librbd's client-side encryption to load (librbd engine only).
    pub encryption: Option<Encryption>,
    /// How long closing may wait for the cluster (direct engine: releasing the lock, the
    /// watch) before the release is left to a background thread.
    pub close_wait: std::time::Duration,
    /// The clients of previous rbdback instances that served this image and died (or handed
    /// over): if one still holds the exclusive lock, the lock is broken at once instead of
    /// after unanswered lock requests (it cannot answer: it is gone).
    pub predecessors: Vec<ClientIdentity>,
    /// Blocklist the [`Self::predecessors`] not fenced yet before anything else: they may
    /// have died with writes in flight, and none of them may land after ours (no zombie
    /// writer).
    pub fence_predecessors: bool,
    /// Direct engine: how long one control-path call (header reads, lock requests, watch
    /// registration) may go unanswered once the image is open; it then fails with
    /// `ETIMEDOUT`, is logged, and is retried. Both engines: how long fencing one
    /// predecessor may wait for the monitors.
    pub control_timeout: std::time::Duration,
}

/// A secret (an inline cephx key): `Debug` and `Display` print `<redacted>`, so a spec logged
/// or kept in an error shows none; the text is reached through `Deref`, where it is handed to
/// librados.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A RADOS client session: what the cluster knows a client by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Its address as the OSDs see it (`rados_getaddrs`; what `ceph osd blocklist` takes).
    pub addr: String,
    /// Its global id (`client.<gid>` in lock owner lists).
    pub gid: u64,
    /// Already blocklisted by an earlier successor (or gone cleanly): not fenced again.
    pub fenced: bool,
}

impl ClientIdentity {
    /// `client.<gid>`, as lock owners are listed.
    pub fn entity(&self) -> String {
        format!("client.{}", self.gid)
    }
}

/// An image formatted with `rbd encryption format`: librbd decrypts it once the passphrase is
/// loaded (`rbd_encryption_load`). The direct engine refuses such a spec by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encryption {
    /// The LUKS version the image was formatted with.
    pub format: EncryptionFormat,
    /// The file holding the passphrase (read at open, never logged; a trailing newline is
    /// part of the passphrase, as for `rbd encryption format`).
    pub passphrase_file: String,
}

/// `rbd encryption format`'s formats in Ceph 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptionFormat {
    /// LUKS1.
    Luks1,
    /// LUKS2.
    Luks2,
}

/// `pool[/namespace]/image[@snapshot]` (a pool given by id shows as `#<id>`).
impl std::fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pool {
            PoolRef::Name(n) => write!(f, "{n}/")?,
            PoolRef::Id(id) => write!(f, "#{id}/")?,
        }
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{}", self.image)?;
        if let Some(snap) = &self.snapshot {
            write!(f, "@{snap}")?;
        }
        Ok(())
    }
}

impl ImageSpec {
    /// `pool/image` with defaults (client `admin`, default conf, auto engine).
    pub fn new(pool: &str, image: &str) -> ImageSpec {
        ImageSpec {
            pool: PoolRef::Name(pool.to_owned()),
            namespace: None,
            image: image.to_owned(),
            snapshot: None,
            client_id: "admin".to_owned(),
            conf: None,
            keyring: None,
            key: None,
            conf_options: Vec::new(),
            engine: EngineChoice::Auto,
            rbd_cache: false,
            lock_policy: direct::LockPolicy::HandOver,
            read_only: false,
            encryption: None,
            close_wait: std::time::Duration::from_secs(30),
            predecessors: Vec::new(),
            fence_predecessors: false,
            control_timeout: client::CONTROL_TIMEOUT,
        }
    }
}

/// Which engine serves an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Direct RADOS.
    Direct,
    /// librbd.
    Librbd,
    /// In memory.
    Memory,
}

/// Facts about an opened image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The engine.
    pub engine: EngineKind,
    /// RBD feature bits.
    pub features: u64,
    /// Object size in bytes.
    pub object_size: u64,
    /// Opened read-only.
    pub read_only: bool,
    /// Discarded ranges read back as zeros.
    pub discard_zeroes: bool,
    /// Discard granularity in bytes.
    pub discard_granularity: u32,
}

/// Whether this client holds an image's exclusive lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockHold {
    /// No lock is needed (read-only, no `exclusive-lock` feature, in-memory image).
    NotUsed,
    /// Another client may hold it; ours is taken on the next write.
    NotHeld,
    /// This client holds it.
    Held,
    /// Handing it over to another client once in-flight writes finish.
    Releasing,
    /// The engine could not tell.
    Unknown,
}

impl LockHold {
    /// A label for status lines and metrics.
    pub fn label(self) -> &'static str {
        match self {
            LockHold::NotUsed => "not used",
            LockHold::NotHeld => "not held",
            LockHold::Held => "held",
            LockHold::Releasing => "releasing",
            LockHold::Unknown => "unknown",
        }
    }
}

/// The exclusive lock as seen from this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockStatus {
    /// Held or not.
    pub state: LockHold,
    /// Times it was handed over to another client since the image was opened.
    pub handovers: u64,
}

/// A storage error, naming its cause.
#[derive(Debug, Error)]
pub enum RadosError {
    /// Could not reach or authenticate with the cluster.
    #[error("cannot connect to the Ceph cluster as client.{client}: {what} ({errno})")]
    Connect {
        /// Client id.
        client: String,
        /// What failed (e.g. `rados_connect`).
        what: String,
        /// errno (negative librados return).
        errno: Errno,
    },
    /// The pool does not exist.
    #[error("pool {0} does not exist")]
    NoPool(String),
    /// The image does not exist.
    #[error("image {pool}/{image} does not exist")]
    NoImage {
        /// Pool.
        pool: String,
        /// Image.
        image: String,
    },
    /// The image has a feature this engine cannot honour.
    #[error("image {image} has feature {feature}, which the {engine} engine does not support; use engine=librbd")]
    Unsupported {
        /// Image.
        image: String,
        /// Feature name.
        feature: &'static str,
        /// Engine name.
        engine: &'static str,
    },
    /// librbd could not load the image's encryption.
    #[error(
        "image {image}: cannot load its {format:?} encryption ({errno}): wrong passphrase, \
         or the image was not formatted with `rbd encryption format`"
    )]
    EncryptionLoad {
        /// Image.
        image: String,
        /// The format asked for.
        format: EncryptionFormat,
        /// librbd's error.
        errno: Errno,
    },
    /// A librados/librbd call failed.
    #[error("{what}: {errno}")]
    Call {
        /// The call.
        what: &'static str,
        /// The error.
        errno: Errno,
    },
    /// An I/O operation failed.
    #[error("{what} at offset {offset}: {errno}")]
    Io {
        /// Read, write, discard, flush.
        what: &'static str,
        /// Byte offset.
        offset: u64,
        /// The error.
        errno: Errno,
    },
    /// A previous client could not be fenced (blocklisted, and the OSD map that says so
    /// seen); the message names the missing capability when the monitors refused.
    #[error("cannot fence client {addr} ({step}): {errno}{}", fence_hint(.errno))]
    Fence {
        /// The client's address.
        addr: String,
        /// What failed.
        step: &'static str,
        /// The error.
        errno: Errno,
    },
    /// A write could not get the image's exclusive lock; `why` says what stands in the way.
    #[error("{what} at offset {offset}: {why}")]
    NoLock {
        /// Write, discard, write zeroes.
        what: &'static str,
        /// Byte offset.
        offset: u64,
        /// Why the lock could not be had.
        why: String,
        /// The error behind it.
        errno: Errno,
    },
    /// The cluster did not finish something in time.
    #[error("{what}: not done within {secs} s")]
    TimedOut {
        /// What was being done, and how far it got.
        what: String,
        /// The time it had.
        secs: u64,
    },
    /// Out of range or malformed request to the engine.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The queue is shutting down.
    #[error("engine queue closed")]
    Closed,
    /// The image can no longer be served by this client (blocklisted, or it gained a feature
    /// the engine cannot honour); the reason says what to do.
    #[error("{0}")]
    Unusable(String),
    /// A system resource (eventfd) could not be created.
    #[error("system error: {0}")]
    Sys(#[from] std::io::Error),
}

/// What an operator can do about a fence the monitors refused.
fn fence_hint(errno: &Errno) -> &'static str {
    match -errno.0 {
        libc::EACCES | libc::EPERM => {
            "; this client's capabilities do not allow `osd blocklist` (give it mon 'profile rbd', \
             or mon 'allow command \"osd blocklist\"')"
        }
        libc::EINVAL => "; the monitors do not take the address (or it is this client's own)",
        _ => "",
    }
}

impl RadosError {
    /// A fence that cannot succeed by retrying: the monitors refused it (capabilities, or an
    /// address they do not take).
    pub fn fence_refused(&self) -> bool {
        matches!(self, RadosError::Fence { errno, .. }
            if matches!(-errno.0, libc::EACCES | libc::EPERM | libc::EINVAL))
    }
}

/// A negative errno from librados/librbd, printed with its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = nix::errno::Errno::from_raw(self.0.saturating_abs());
        write!(f, "{} ({})", e.desc(), e)
    }
}

/// A block operation; buffers are owned by the operation and come back in its completion.
#[derive(Debug)]
pub enum BlockOp {
    /// Read `buf.len()` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Destination.
        buf: Vec<u8>,
    },
    /// Write `buf` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Data.
        buf: Vec<u8>,
    },
    /// Discard (reads of the range return zeros afterwards).
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Write zeros.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Make every completed write durable.
    Flush,
}

impl BlockOp {
    pub(crate) fn into_buf(self) -> Option<Vec<u8>> {
        match self {
            BlockOp::Read { buf, .. } | BlockOp::Write { buf, .. } => Some(buf),
            _ => None,
        }
    }
}

/// A submit that could not be taken: the operation comes back with the reason.
#[derive(Debug)]
pub struct SubmitError {
    /// The operation, with its buffer.
    pub op: BlockOp,
    /// Why.
    pub error: RadosError,
}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The tag given at submit.
    pub tag: u64,
    /// Outcome.
    pub result: Result<(), RadosError>,
    /// The operation's buffer (read data on success).
    pub buf: Option<Vec<u8>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where one owner's events land: a lock-free queue (crossbeam's `SegQueue`: completion
/// threads never contend on a mutex with the owner) plus an eventfd that any thread (librados
/// and librbd callback threads among them) may push to; the owner polls the fd and drains.
/// The eventfd is written only when it is not already signalled, so a burst of completions
/// costs one wake-up, not one system call each.
#[derive(Debug)]
pub(crate) struct Sink<T> {
    q: SegQueue<T>,
    signalled: AtomicBool,
    efd: EventFd,
}

impl<T> Sink<T> {
    pub(crate) fn new() -> Result<Arc<Sink<T>>, RadosError> {
        Ok(Arc::new(Sink {
            q: SegQueue::new(),
            signalled: AtomicBool::new(false),
            efd: EventFd::from_flags(EfdFlags::EFD_NONBLOCK).map_err(std::io::Error::from)?,
        }))
    }

    pub(crate) fn push(&self, v: T) {
        self.q.push(v);
        self.kick();
    }

    /// Moves everything waiting into `out`; returns how many.
    pub(crate) fn drain(&self, out: &mut Vec<T>) -> usize {
        // the eventfd is consumed first, then the flag cleared, then the queue taken: an
        // event pushed after the take finds the flag clear and signals again, and one pushed
        // before it is taken here (the reverse order could leave the flag set and the eventfd
        // empty, and the owner asleep forever)
        let _ = self.efd.read();
        // a read-modify-write: it acquires what a kicker that found the flag set released
        self.signalled.swap(false, Ordering::AcqRel);
        let before = out.len();
        while let Some(v) = self.q.pop() {
            out.push(v);
        }
        out.len() - before
    }

    /// Wakes the owner (also without an event).
    pub(crate) fn kick(&self) {
        if !self.signalled.swap(true, Ordering::AcqRel) {
            let _ = self.efd.write(1);
        }
    }
}

impl<T> AsFd for Sink<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }
}

/// Where completions of one librbd or memory queue land.
pub(crate) type Mailbox = Sink<Completion>;

/// The in-memory engine's disk.
#[derive(Debug)]
struct MemDisk {
    data: Mutex<Vec<u8>>,
    /// While `Some`, completions are parked here instead of delivered (tests: requests
    /// that stay in flight as long as the test wants, like OSDs that do not answer).
    parked: Mutex<Option<Vec<Parked>>>,
}

/// A completion held back, and the mailbox it goes to.
type Parked = (Arc<Mailbox>, Completion);

/// Holds back (and then delivers) the completions of an in-memory image's operations, as a
/// cluster that stops answering would; for tests.
#[derive(Debug, Clone)]
pub struct MemoryHold {
    disk: Arc<MemDisk>,
}

impl MemoryHold {
    /// From now on, operations complete (on the disk) but their completions are held back.
    pub fn hold(&self) {
        let mut p = lock(&self.disk.parked);
        if p.is_none() {
            *p = Some(Vec::new());
        }
    }

    /// Delivers every held completion and stops holding.
    pub fn release(&self) {
        let held = lock(&self.disk.parked).take().unwrap_or_default();
        for (mailbox, c) in held {
            mailbox.push(c);
        }
    }

    /// Completions held back now.
    pub fn held(&self) -> usize {
        lock(&self.disk.parked).as_ref().map_or(0, Vec::len)
    }
}

#[derive(Debug)]
enum Engine {
    Memory(Arc<MemDisk>),
    Librbd(librbd::LibrbdImage),
    Direct(direct::DirectImage),
}

/// An opened image, shared by the queues of one VBD.
#[derive(Debug)]
pub struct Image {
    engine: Engine,
    info: ImageInfo,
}

impl Image {
    /// Opens `spec` (bounded in time: unreachable monitors fail after the mount timeout).
    ///
    /// `Auto` takes the direct engine unless the image has a feature it cannot honour, and
    /// then librbd (logged, naming the feature).
    pub fn open(spec: &ImageSpec) -> Result<Arc<Image>, RadosError> {
        let direct = |spec: &ImageSpec| -> Result<Arc<Image>, RadosError> {
            let img = direct::DirectImage::open(spec, spec.lock_policy)?;
            let info = img.info();
            Ok(Arc::new(Image {
                engine: Engine::Direct(img),
                info,
            }))
        };
        let librbd = |spec: &ImageSpec| -> Result<Arc<Image>, RadosError> {
            let img = librbd::LibrbdImage::open(spec)?;
            let info = img.info();
            Ok(Arc::new(Image {
                engine: Engine::Librbd(img),
                info,
            }))
        };
        match spec.engine {
            EngineChoice::Direct => direct(spec),
            EngineChoice::Librbd => librbd(spec),
            EngineChoice::Auto => match direct(spec) {
                Err(RadosError::Unsupported { feature, .. }) => {
                    tracing::info!(image = %spec.image, feature,
                        "the direct engine cannot serve this image; using librbd");
                    librbd(spec)
                }
                other => other,
            },
        }
    }

    /// An in-memory image of `size` bytes (zeros), for tests and benches.
    pub fn memory(size: u64) -> Arc<Image> {
        Self::memory_with_hold(size).0
    }

    /// An in-memory image and the handle that holds back its completions (tests).
    pub fn memory_with_hold(size: u64) -> (Arc<Image>, MemoryHold) {
        let n = usize::try_from(size).unwrap_or(0);
        let disk = Arc::new(MemDisk {
            data: Mutex::new(vec![0; n]),
            parked: Mutex::new(None),
        });
        let hold = MemoryHold {
            disk: Arc::clone(&disk),
        };
        let img = Arc::new(Image {
            engine: Engine::Memory(disk),
            info: ImageInfo {
                engine: EngineKind::Memory,
                features: 0,
                object_size: 4 << 20,
                read_only: false,
                discard_zeroes: true,
                discard_granularity: 512,
            },
        });
        (img, hold)
    }

    /// This image's RADOS client (none for the in-memory engine).
    pub fn client(&self) -> Option<ClientIdentity> {
        match &self.engine {
            Engine::Memory(_) => None,
            Engine::Librbd(i) => i.cluster().identity(),
            Engine::Direct(i) => i.shared.cluster.identity(),
        }
    }

    /// Sets a librados option on the image's cluster handle while it runs (for example a
    /// debug level, or Ceph's `ms_inject_*` fault injection in tests).
    pub fn set_option(&self, key: &str, value: &str) -> Result<(), RadosError> {
        let fail = |rc| RadosError::Call {
            what: "rados_conf_set",
            errno: Errno(rc),
        };
        match &self.engine {
            Engine::Memory(_) => Ok(()),
            Engine::Librbd(i) => i.cluster().set(key, value).map_err(fail),
            Engine::Direct(i) => i.shared.cluster.set(key, value).map_err(fail),
        }
    }

    /// Where the data at byte `offset` lives (the OSD and placement group its object maps
    /// to), asking the monitors (bounded by `rados_mon_op_timeout`); `None` when the engine
    /// cannot say (librbd and memory).
    pub fn locate(&self, offset: u64) -> Result<Option<String>, RadosError> {
        match &self.engine {
            Engine::Direct(i) => i.locate(offset).map(Some),
            Engine::Librbd(_) | Engine::Memory(_) => Ok(None),
        }
    }

    /// Whether the previous clients this open was asked to fence
    /// ([`ImageSpec::predecessors`] not marked `fenced`, when
    /// [`ImageSpec::fence_predecessors`] is set) are fenced: blocklisted, and the OSD map that
    /// carries the blocklisting seen by this client, so none of their writes can land after
    /// ours.
    ///
    /// The direct engine with the exclusive lock fences them on its control thread after
    /// [`Image::open`] returned (reads need not wait; writes wait for it): false until that
    /// is done, and for as long as it fails (the reason goes to the log, and to the writes it
    /// holds up when it cannot succeed). True at once for opens that fenced before returning
    /// (librbd, the direct engine without the exclusive lock or read-only), when there is
    /// nothing to fence, and for the in-memory engine. Never goes back to false.
    pub fn predecessors_fenced(&self) -> bool {
        match &self.engine {
            Engine::Direct(i) => i.predecessors_fenced(),
            Engine::Librbd(_) | Engine::Memory(_) => true,
        }
    }

    /// Why this client can no longer serve the image (blocklisted by the cluster, a feature
    /// it cannot honour), once that is known; every request then fails with it.
    pub fn unusable(&self) -> Option<String> {
        match &self.engine {
            Engine::Direct(i) => i.shared.lock_state().fatal.clone(),
            Engine::Librbd(_) | Engine::Memory(_) => None,
        }
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        match &self.engine {
            Engine::Memory(d) => lock(&d.data).len() as u64,
            Engine::Librbd(i) => i.size(),
            Engine::Direct(i) => i.size(),
        }
    }

    /// Facts about the image.
    pub fn info(&self) -> ImageInfo {
        self.info.clone()
    }

    /// The exclusive lock as this client holds it (no cluster round trip).
    pub fn lock_status(&self) -> LockStatus {
        match &self.engine {
            Engine::Memory(_) => LockStatus {
                state: LockHold::NotUsed,
                handovers: 0,
            },
            Engine::Librbd(i) => i.lock_status(),
            Engine::Direct(i) => i.lock_status(),
        }
    }

    /// Re-reads the size; `Some(new)` if it changed since the last call.
    pub fn refresh_size(&self) -> Result<Option<u64>, RadosError> {
        match &self.engine {
            Engine::Memory(_) => Ok(None),
            Engine::Librbd(i) => i.refresh_size(),
            Engine::Direct(i) => i.refresh_size(),
        }
    }

    /// A queue for one dataplane thread.
    pub fn queue(self: &Arc<Self>) -> Result<Queue, RadosError> {
        let inner = match &self.engine {
            Engine::Direct(d) => QueueInner::Direct(Box::new(direct::queue::DirectQueue::new(
                Arc::clone(&d.shared),
            )?)),
            _ => QueueInner::Mailbox {
                mailbox: Mailbox::new()?,
                in_flight: 0,
            },
        };
        Ok(Queue {
            inner,
            image: Arc::clone(self),
        })
    }
}

#[derive(Debug)]
enum QueueInner {
    Mailbox {
        mailbox: Arc<Mailbox>,
        in_flight: usize,
    },
    Direct(Box<direct::queue::DirectQueue>),
}

/// One thread's queue on an image.
#[derive(Debug)]
pub struct Queue {
    // declared first: dropped before the image (the direct queue's pool contexts must go
    // before the cluster connection the image owns)
    inner: QueueInner,
    image: Arc<Image>,
}

fn check_range(offset: u64, len: u64, size: u64) -> Result<(), RadosError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(RadosError::Invalid(format!(
            "{len} bytes at {offset} reach past the image's {size} bytes"
        ))),
    }
}

impl Queue {
    /// Starts `op`; its completion (tagged `tag`) arrives through [`Self::reap`].
    pub fn submit(&mut self, tag: u64, op: BlockOp) -> Result<(), SubmitError> {
        if self.image.info.read_only && !matches!(op, BlockOp::Read { .. } | BlockOp::Flush) {
            return Err(SubmitError {
                op,
                error: RadosError::Invalid("write to a read-only image".into()),
            });
        }
        let (mailbox, in_flight) = match &mut self.inner {
            QueueInner::Direct(q) => {
                q.submit(tag, op);
                return Ok(());
            }
            QueueInner::Mailbox { mailbox, in_flight } => (mailbox, in_flight),
        };
        match &self.image.engine {
            Engine::Memory(d) => {
                let result = mem_op(d, &op);
                let buf = match op {
                    BlockOp::Read { offset, mut buf } => {
                        let data = lock(&d.data);
                        let s = usize::try_from(offset).unwrap_or(usize::MAX);
                        if let Some(src) = data.get(s..s.saturating_add(buf.len())) {
                            buf.copy_from_slice(src);
                        }
                        Some(buf)
                    }
                    other => other.into_buf(),
                };
                // the memory engine completes synchronously (unless a test holds it back)
                let c = Completion { tag, result, buf };
                match lock(&d.parked).as_mut() {
                    Some(parked) => parked.push((Arc::clone(mailbox), c)),
                    None => mailbox.push(c),
                }
                *in_flight += 1;
                Ok(())
            }
            Engine::Librbd(img) => {
                img.submit(tag, op, mailbox)?;
                *in_flight += 1;
                Ok(())
            }
            Engine::Direct(_) => Err(SubmitError {
                op,
                error: RadosError::Invalid("queue and engine disagree".into()),
            }),
        }
    }

    /// Moves finished operations into `out` (non-blocking).
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        match &mut self.inner {
            QueueInner::Direct(q) => q.reap(out),
            QueueInner::Mailbox { mailbox, in_flight } => {
                let n = mailbox.drain(out);
                *in_flight = in_flight.saturating_sub(n);
            }
        }
    }

    /// Operations submitted and not reaped.
    pub fn in_flight(&self) -> usize {
        match &self.inner {
            QueueInner::Direct(q) => q.in_flight(),
            QueueInner::Mailbox { in_flight, .. } => *in_flight,
        }
    }
}

impl AsFd for Queue {
    /// Readable when completions are waiting.
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            QueueInner::Direct(q) => q.as_fd(),
            QueueInner::Mailbox { mailbox, .. } => mailbox.as_fd(),
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        if let QueueInner::Mailbox { in_flight, .. } = &self.inner {
            if *in_flight > 0 {
                // Buffers of unfinished librbd operations are owned by their completions,
                // which keep the mailbox alive; nothing to free here.
                tracing::warn!(
                    in_flight = *in_flight,
                    "engine queue dropped with operations in flight"
                );
            }
        }
    }
}

fn mem_op(d: &MemDisk, op: &BlockOp) -> Result<(), RadosError> {
    let mut data = lock(&d.data);
    let size = data.len() as u64;
    let at = |o: u64| usize::try_from(o).unwrap_or(usize::MAX);
    match op {
        BlockOp::Read { offset, buf } => check_range(*offset, buf.len() as u64, size),
        BlockOp::Write { offset, buf } => {
            check_range(*offset, buf.len() as u64, size)?;
            if let Some(dst) = data.get_mut(at(*offset)..at(*offset) + buf.len()) {
                dst.copy_from_slice(buf);
            }
            Ok(())
        }
        BlockOp::Discard { offset, len } | BlockOp::WriteZeroes { offset, len } => {
            check_range(*offset, *len, size)?;
            if let Some(dst) = data.get_mut(at(*offset)..at(*offset) + at(*len)) {
                dst.fill(0);
            }
            Ok(())
        }
        BlockOp::Flush => Ok(()),
    }
}

/// Ends the process with `code` without running exit handlers or C++ static destructors.
///
/// A process that used librados may still have librados threads at work when it is done: an
/// open abandoned because its device went away (it may be inside `rados_connect`), a lock
/// release left to finish in the background after `close_wait`, a cluster handle leaked on
/// purpose because operations were still in flight. `exit()` runs the C++ static destructors
/// under those threads, which then touch destroyed globals and abort the process
/// (`terminate called after throwing an instance of 'std::out_of_range' what(): map::at`
/// was seen in the real Xen bed when `serve` exited). Ceph's own tools met the same class and
/// end with `_exit` when librados may still be running (Ceph tracker 44526 and 44566: "exit
/// runs all kinds of shutdown work that will interfere with the running librados threads").
/// Everything rbdback owns is torn down before this is called; stdout and stderr are flushed.
pub fn exit_process(code: u8) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit ends the process at once; it touches no memory of ours, and the only
    // buffered state (Rust's stdout/stderr) was flushed above.
    unsafe { libc::_exit(i32::from(code)) }
}

#[cfg(test)]
mod sink_tests {
    use super::Sink;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;

    /// Producers racing the owner's drain never leave it asleep with events waiting.
    #[test]
    fn no_wakeup_is_lost() {
        let sink = Sink::<u32>::new().unwrap();
        let n = 200_000u32;
        let producers: Vec<_> = (0..3)
            .map(|p| {
                let s = std::sync::Arc::clone(&sink);
                std::thread::spawn(move || {
                    for i in 0..n / 3 {
                        s.push(i);
                        if (i + p) % 1000 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        let want = (n / 3 * 3) as usize;
        while got.len() < want {
            let mut fds = [PollFd::new(sink.as_fd(), PollFlags::POLLIN)];
            let ready = poll(&mut fds, PollTimeout::from(2000u16)).unwrap();
            assert!(
                ready > 0,
                "asleep with {} of {want} events taken",
                got.len()
            );
            sink.drain(&mut got);
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(got.len(), want);
    }
}
