//! The direct RADOS engine (krbd style): it reads the image header through the `rbd` object
//! class and addresses the `rbd_data` objects itself, with the protocols librbd's other
//! clients expect — the snapshot context on every write, the header watch, librbd's exclusive
//! lock (cookie `auto <watch handle>`, tag `internal`, hand-over through the image watcher's
//! notifies), object-map updates before an object's first write or discard, copy-up on
//! clones, and discard as remove, truncate or zero as krbd chooses.
//!
//! Owns: one image's shared state ([`Shared`]: header, lock, in-memory object map) and its
//! control thread (watch events, header refresh, lock acquisition and release); the queues'
//! I/O lives in [`queue`].
//! Trusts: the cluster's replies only after decoding them with length checks ([`codec`]).
//! Must never: run on a librados thread, block a dataplane thread (every blocking class call
//! is made by the control thread, and once the image is open each is bounded by the spec's
//! `control_timeout`: a call the cluster leaves unanswered fails with `ETIMEDOUT`, is logged
//! and retried, so the thread keeps serving stop requests, notifies and the lock), write an
//! object without holding the exclusive lock when the image has that feature, or write with a
//! snapshot context older than a snapshot whose creation it has acknowledged.

mod cls_lock;
pub mod codec;
pub(crate) mod header;
pub mod layout;
pub(crate) mod queue;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, info, warn};

use super::client::{
    json_field, json_string, AioDone, AioSink, Cluster, IoCtx, WatchEvent, WatchSink,
};
use super::{lock, EngineKind, Errno, ImageInfo, ImageSpec, RadosError};
use codec::{notify_op, objstate, ClientId, RBD_LOCK_COOKIE_PREFIX, RBD_LOCK_NAME, RBD_LOCK_TAG};
use header::{feature, Header};

/// How long a notify waits for the watchers' acks.
const NOTIFY_TIMEOUT_MS: u64 = 5000;
/// How often the holder checks that its exclusive lock is still its own.
const LOCK_CHECK: Duration = Duration::from_secs(10);
/// How often a fence that keeps failing the same way is logged as a warning.
const FENCE_WARN_EVERY: Duration = Duration::from_secs(60);
/// How long after a failed fence it is tried again when no write waits for it (a refused
/// fence: an operator must act first).
const FENCE_RETRY: Duration = Duration::from_secs(1);
const FENCE_REFUSED_RETRY: Duration = Duration::from_secs(30);
/// Discard granularity: krbd's default `alloc_size`.
pub const ALLOC_SIZE: u64 = 64 << 10;

/// What to do when another client asks for the exclusive lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockPolicy {
    /// Hand it over once in-flight writes are done, and ask for it back on the next write
    /// (librbd's and krbd's default).
    #[default]
    HandOver,
    /// Keep it: answer `-EROFS` (krbd's `exclusive` map option).
    Refuse,
}

/// The exclusive lock as this client holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LockState {
    Unlocked,
    Locked(String),
    /// Handing over: new writes wait, the lock goes when in-flight writes are done.
    Releasing(String),
}

/// Why writes could not get the lock.
#[derive(Debug, Clone)]
pub(crate) struct LockFailure {
    pub errno: Errno,
    pub why: String,
}

/// State the control thread and the queues share.
#[derive(Debug)]
pub(crate) struct State {
    pub header: Arc<Header>,
    /// Bumped on every header change (queues re-apply the snapshot context).
    pub gen: u64,
    pub lock: LockState,
    /// Image requests that entered under the lock and have not completed.
    pub writers: usize,
    /// Some queue has writes waiting for the lock.
    pub want_lock: bool,
    /// The latest acquisition failure and its sequence number.
    pub lock_failure: Option<LockFailure>,
    pub failure_seq: u64,
    /// The head object map, valid while locked (one state per object).
    pub objmap: Vec<u8>,
    /// Times the lock was handed over to another client.
    pub handovers: u64,
    /// A fatal condition (blocklisted, unsupported feature enabled live): all I/O fails.
    pub fatal: Option<String>,
    /// Queues to wake when the lock changes hands.
    pub waiters: Vec<Arc<AioSink>>,
}

/// One image opened by the direct engine.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The header's pool (control calls and object-map updates).
    pub meta: IoCtx,
    pub name: String,
    pub id: String,
    pub header_oid: String,
    pub objmap_oid: String,
    pub read_only: bool,
    pub snap_id: u64,
    pub policy: LockPolicy,
    pub state: Mutex<State>,
    /// Wakes the control thread.
    pub control: Arc<AioSink>,
    pub watch_sink: Arc<WatchSink>,
    pub watch_cookie: AtomicU64,
    pub gid: u64,
    pub stop: AtomicBool,
    pub cluster: Cluster,
    /// Previous rbdback clients of this image that are gone (`ImageSpec::predecessors`).
    pub(crate) predecessors: Vec<super::ClientIdentity>,
    /// Some of them still have to be fenced before this client takes the lock (set at open,
    /// cleared by the control thread once they are).
    pub(crate) fence_pending: AtomicBool,
    /// The spec's `control_timeout` (also the bound of one fence).
    pub(crate) control_timeout: Duration,
}

impl Shared {
    pub(crate) fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn cid(&self) -> ClientId {
        ClientId {
            gid: self.gid,
            handle: self.watch_cookie.load(Ordering::Relaxed),
        }
    }

    fn cookie(&self) -> String {
        format!(
            "{RBD_LOCK_COOKIE_PREFIX} {}",
            self.watch_cookie.load(Ordering::Relaxed)
        )
    }

    /// Marks this client fenced: the cluster blocklisted it (an operator, or another client
    /// that broke its exclusive lock), so nothing it sends can succeed again. Every request
    /// fails with the returned reason from now on.
    pub(crate) fn fenced(&self) -> String {
        let mut st = self.lock_state();
        if let Some(f) = &st.fatal {
            return f.clone();
        }
        let why = format!(
            "image {}: this client was blocklisted by the cluster (fenced by an operator, or by \
             another client that broke its exclusive lock); it must be reopened with a new client",
            self.name
        );
        warn!(image = %self.name, "{why}");
        st.fatal = Some(why.clone());
        why
    }

    /// True when writes must hold the exclusive lock.
    pub(crate) fn needs_lock(&self, h: &Header) -> bool {
        !self.read_only && h.features & feature::EXCLUSIVE_LOCK != 0
    }
}

/// The direct engine's image: shared state plus its control thread.
#[derive(Debug)]
pub struct DirectImage {
    pub(crate) shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    last_size: AtomicU64,
    close_wait: Duration,
}

impl DirectImage {
    /// See [`super::Image::predecessors_fenced`].
    pub fn predecessors_fenced(&self) -> bool {
        !self.shared.fence_pending.load(Ordering::Acquire)
    }

    /// The exclusive lock as this client holds it (local state: no cluster round trip).
    pub fn lock_status(&self) -> super::LockStatus {
        let st = self.shared.lock_state();
        let state = if !self.shared.needs_lock(&st.header) {
            super::LockHold::NotUsed
        } else {
            match st.lock {
                LockState::Unlocked => super::LockHold::NotHeld,
                LockState::Locked(_) => super::LockHold::Held,
                LockState::Releasing(_) => super::LockHold::Releasing,
            }
        };
        super::LockStatus {
            state,
            handovers: st.handovers,
        }
    }

    /// Opens `spec`: connects, reads the header, refuses unsupported features, watches the
    /// header and starts the control thread.
    pub fn open(spec: &ImageSpec, policy: LockPolicy) -> Result<DirectImage, RadosError> {
        if spec.encryption.is_some() {
            // decryption (librbd's crypto layer) is not implemented here
            return Err(RadosError::Unsupported {
                image: spec.image.clone(),
                feature: "encryption (an encryption_format was given)",
                engine: "direct",
            });
        }
        let cluster = Cluster::connect(spec)?;
        let meta = cluster.ioctx(spec)?;
        let id = header::image_id(&meta, &spec.image)?;
        let read_only = spec.read_only || spec.snapshot.is_some();
        let snap_id = match &spec.snapshot {
            Some(s) => header::snap_id(&meta, &id, s)?,
            None => header::HEAD,
        };
        let h = header::read(&cluster, &meta, &id, snap_id, read_only, None)?;
        if let Some(f) = header::unsupported(h.features, read_only) {
            return Err(RadosError::Unsupported {
                image: spec.image.clone(),
                feature: f,
                engine: "direct",
            });
        }
        // Previous backends that may have died with writes in flight are fenced before any
        // write of ours: with the exclusive lock that is the control thread's first task
        // (writes wait for the lock; reads need not wait), without it here and now.
        let fence_later = !read_only && h.features & feature::EXCLUSIVE_LOCK != 0;
        if !fence_later {
            cluster.fence_predecessors(spec)?;
        }
        if h.flags & header::FLAG_OBJECT_MAP_INVALID != 0 && h.features & feature::OBJECT_MAP != 0 {
            warn!(image = %spec.image, "the image's object map is flagged invalid (rbd object-map rebuild fixes it)");
        }
        let control = AioSink::new()?;
        let watch_sink = WatchSink::new()?;
        let header_oid = format!("rbd_header.{id}");
        let gid = cluster.instance_id();
        let shared = Arc::new(Shared {
            objmap_oid: format!("rbd_object_map.{id}"),
            name: spec.image.clone(),
            id,
            read_only,
            snap_id,
            policy,
            state: Mutex::new(State {
                header: Arc::new(h),
                gen: 0,
                lock: LockState::Unlocked,
                handovers: 0,
                writers: 0,
                want_lock: false,
                lock_failure: None,
                failure_seq: 0,
                objmap: Vec::new(),
                fatal: None,
                waiters: Vec::new(),
            }),
            control,
            watch_sink,
            watch_cookie: AtomicU64::new(0),
            gid,
            stop: AtomicBool::new(false),
            header_oid,
            predecessors: spec.predecessors.clone(),
            fence_pending: AtomicBool::new(
                fence_later
                    && spec.fence_predecessors
                    && spec.predecessors.iter().any(|p| !p.fenced),
            ),
            control_timeout: spec.control_timeout,
            meta,
            cluster,
        });
        let cookie = shared
            .meta
            .watch(&shared.header_oid, &shared.watch_sink)
            .map_err(|errno| RadosError::Call {
                what: "watching the image header",
                errno,
            })?;
        shared.watch_cookie.store(cookie, Ordering::Relaxed);
        // opened: from now on no control-path call waits on a silent OSD for ever
        shared.meta.set_call_limit(Some(spec.control_timeout));
        let s2 = Arc::clone(&shared);
        let name = format!("rbd-ctl-{}", spec.image.chars().take(7).collect::<String>());
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || Control::new(s2).run())
            .map_err(RadosError::Sys)?;
        let size = shared.lock_state().header.size;
        info!(image = %spec.image, id = %shared.id, features = shared.lock_state().header.features,
              "direct engine opened image");
        Ok(DirectImage {
            shared,
            thread: Some(thread),
            last_size: AtomicU64::new(size),
            close_wait: spec.close_wait,
        })
    }

    /// Facts for [`super::Image::info`].
    pub fn info(&self) -> ImageInfo {
        let st = self.shared.lock_state();
        let h = &st.header;
        ImageInfo {
            engine: EngineKind::Direct,
            features: h.features,
            object_size: h.layout.object_size,
            read_only: self.shared.read_only,
            discard_zeroes: false,
            discard_granularity: u32::try_from(ALLOC_SIZE.min(h.layout.object_size))
                .unwrap_or(4096),
        }
    }

    /// Current size.
    pub fn size(&self) -> u64 {
        self.shared.lock_state().header.size
    }

    /// Where the byte at `offset` lives: the primary OSD of its object's placement group, as
    /// the monitors map it (`ceph osd map`).
    pub fn locate(&self, offset: u64) -> Result<String, RadosError> {
        let h = Arc::clone(&self.shared.lock_state().header);
        let objno = h.layout.map(offset, 1).first().map_or(0, |p| p.objno);
        let oid = layout::data_object(&h.prefix, objno);
        let call = |what| move |errno| RadosError::Call { what, errno };
        let pool_id = h.data_pool.unwrap_or_else(|| self.shared.meta.pool_id());
        let pool = self
            .shared
            .cluster
            .pool_name(pool_id)
            .map_err(call("rados_pool_reverse_lookup"))?;
        let cmd = format!(
            r#"{{"prefix":"osd map","pool":{},"object":{},"nspace":{},"format":"json"}}"#,
            json_string(&pool),
            json_string(&oid),
            json_string(&self.shared.meta.namespace())
        );
        let out = self
            .shared
            .cluster
            .mon_command(&cmd)
            .map_err(call("osd map"))?;
        let field = |k| json_field(&out, k).unwrap_or("?");
        let pg = field("pgid");
        // the placement group's state, from the manager's map (`ceph pg dump pgs_brief`):
        // `laggy` or `peering` says why the OSD does not answer
        let state = self
            .shared
            .cluster
            .mgr_command(r#"{"prefix":"pg dump","dumpcontents":["pgs_brief"],"format":"json"}"#)
            .ok()
            .and_then(|dump| {
                let at = dump.find(&format!(r#""pgid":"{pg}","state":""#))?;
                let rest = dump.get(at + pg.len() + 19..)?;
                rest.split('"').next().map(|s| format!(" {s}"))
            })
            .unwrap_or_default();
        Ok(format!(
            "osd.{} (placement group {pg}{state}, object {oid})",
            field("acting_primary"),
        ))
    }

    /// `Some(new)` if the size changed since the last call (the control thread refreshes
    /// the header on the header's notifies).
    pub fn refresh_size(&self) -> Result<Option<u64>, RadosError> {
        let now = self.size();
        let before = self.last_size.swap(now, Ordering::Relaxed);
        Ok((now != before).then_some(now))
    }
}

impl Drop for DirectImage {
    /// Stops the control thread, which releases the lock and the watch. When the cluster does
    /// not answer within `close_wait`, the thread is left to finish on its own (it owns the
    /// shared state, so nothing is freed under librados); a detach never hangs on a dead
    /// cluster, and the next lock owner breaks a lock we could not release.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.control.kick();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + self.close_wait;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                warn!(image = %self.shared.name, secs = self.close_wait.as_secs(),
                      "the cluster did not answer while the image was closing; its release goes on in the background");
            }
        }
    }
}

/// Tokens of the control thread's own asynchronous notifies.
const TOKEN_REQUEST_LOCK: u64 = 1;
const TOKEN_OTHER_NOTIFY: u64 = 2;

/// The control thread.
struct Control {
    s: Arc<Shared>,
    /// A lock request is out; its reply has not come back.
    requesting: bool,
    /// When to try acquiring again.
    retry_at: Instant,
    /// Consecutive lock requests nobody answered.
    silent: u32,
    last_check: Instant,
    /// When to try registering the header watch again (after a failed attempt).
    rewatch_at: Option<Instant>,
    /// Notifies sent and not completed (librados must not be shut down under them).
    notifies: usize,
    /// Which predecessors this thread fenced.
    fenced: Vec<bool>,
    /// When to try the fence again while no write waits for it.
    fence_at: Instant,
    /// The last fence failure logged as a warning, and when.
    fence_warned: Option<(String, Instant)>,
    /// When to try again to unlock a lock being released (after a failed unlock).
    release_at: Instant,
}

impl Control {
    fn new(s: Arc<Shared>) -> Control {
        let predecessors = s.predecessors.len();
        Control {
            s,
            requesting: false,
            retry_at: Instant::now(),
            silent: 0,
            last_check: Instant::now(),
            rewatch_at: None,
            notifies: 0,
            fenced: vec![false; predecessors],
            fence_at: Instant::now(),
            fence_warned: None,
            release_at: Instant::now(),
        }
    }

    fn run(mut self) {
        let mut events = Vec::new();
        let mut done: Vec<AioDone> = Vec::new();
        self.fence_in_background();
        loop {
            {
                let mut fds = [
                    PollFd::new(self.s.watch_sink.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.s.control.as_fd(), PollFlags::POLLIN),
                ];
                // the timeout paces lock retries and the periodic lock check
                let _ = poll(&mut fds, PollTimeout::from(250u16));
            }
            self.s.watch_sink.drain(&mut events);
            for e in events.drain(..) {
                self.on_watch(e);
            }
            self.s.control.drain(&mut done);
            for d in done.drain(..) {
                self.notifies = self.notifies.saturating_sub(1);
                if d.token == TOKEN_REQUEST_LOCK {
                    self.on_request_reply(&d);
                }
            }
            if self.s.stop.load(Ordering::Relaxed) {
                self.shutdown();
                return;
            }
            self.step();
        }
    }

    fn notify(&mut self, op: u32, token: u64) {
        self.notify_as(op, token, self.s.cid());
    }

    fn notify_as(&mut self, op: u32, token: u64, cid: ClientId) {
        let msg = codec::lock_notify(op, cid);
        match self.s.meta.aio_notify(
            &self.s.header_oid,
            &msg,
            NOTIFY_TIMEOUT_MS,
            &self.s.control,
            token,
        ) {
            Ok(()) => self.notifies += 1,
            Err(e) => warn!(image = %self.s.name, error = %e, "cannot send lock notify {op}"),
        }
    }

    fn ack(&self, notify_id: u64, cookie: u64, payload: &[u8]) {
        if let Err(e) = self
            .s
            .meta
            .notify_ack(&self.s.header_oid, notify_id, cookie, payload)
        {
            debug!(image = %self.s.name, error = %e, "notify ack failed");
        }
    }

    fn on_watch(&mut self, e: WatchEvent) {
        match e {
            WatchEvent::Notify {
                notify_id,
                cookie,
                notifier,
                data,
            } => {
                let n = match codec::decode_notify(&data) {
                    Ok(n) => n,
                    Err(err) => {
                        warn!(image = %self.s.name, error = %err, "undecodable notify, acked");
                        self.ack(notify_id, cookie, &[]);
                        return;
                    }
                };
                debug!(image = %self.s.name, op = n.op, notifier, "notify");
                let owner = matches!(
                    self.s.lock_state().lock,
                    LockState::Locked(_) | LockState::Releasing(_)
                );
                match n.op {
                    notify_op::HEADER_UPDATE => {
                        self.refresh();
                        self.ack(notify_id, cookie, &[]);
                    }
                    notify_op::ACQUIRED_LOCK => self.ack(notify_id, cookie, &[]),
                    notify_op::RELEASED_LOCK => {
                        self.ack(notify_id, cookie, &[]);
                        if n.client != self.s.cid() {
                            self.retry_at = Instant::now();
                        }
                    }
                    notify_op::REQUEST_LOCK => {
                        if n.client == self.s.cid() || !owner {
                            self.ack(notify_id, cookie, &[]);
                            return;
                        }
                        match self.s.policy {
                            LockPolicy::Refuse => {
                                info!(image = %self.s.name, peer = n.client.gid,
                                      "refusing to hand over the exclusive lock");
                                self.ack(notify_id, cookie, &codec::response(-libc::EROFS));
                            }
                            LockPolicy::HandOver => {
                                info!(image = %self.s.name, peer = n.client.gid,
                                      "handing over the exclusive lock");
                                self.ack(notify_id, cookie, &codec::response(0));
                                let mut st = self.s.lock_state();
                                if let LockState::Locked(c) = &st.lock {
                                    st.lock = LockState::Releasing(c.clone());
                                    st.handovers += 1;
                                }
                            }
                        }
                    }
                    // maintenance operations proxied to the lock owner: we do not run them
                    // here, so the requester asks for the lock and runs them itself
                    _ if owner => self.ack(notify_id, cookie, &codec::response(-libc::EOPNOTSUPP)),
                    _ => self.ack(notify_id, cookie, &[]),
                }
            }
            WatchEvent::Error { cookie, err } => {
                // a watch cookie is librados' handle (a pointer): unwatch it exactly once,
                // and only if it is the current one (a late error of a replaced watch is old news)
                if cookie == 0 || cookie != self.s.watch_cookie.load(Ordering::Relaxed) {
                    return;
                }
                warn!(image = %self.s.name, error = %Errno(err), "header watch broke; re-watching");
                let _ = self.s.meta.unwatch(cookie);
                self.s.watch_cookie.store(0, Ordering::Relaxed);
                self.rewatch();
                // our lock cookie named the old watch: treat the lock as lost and take it again
                let lost = {
                    let mut st = self.s.lock_state();
                    match std::mem::replace(&mut st.lock, LockState::Unlocked) {
                        LockState::Locked(old) | LockState::Releasing(old) => {
                            st.objmap.clear();
                            st.want_lock = true;
                            Some(old)
                        }
                        LockState::Unlocked => None,
                    }
                };
                if let Some(old) = lost {
                    warn!(image = %self.s.name, "exclusive lock lost with the watch; re-acquiring");
                    // the cluster call is made without holding the state the queues need; if
                    // it fails (times out), the next acquisition finds the hold ours and drops
                    // it (`drop_stale_hold`)
                    if let Err(e) =
                        cls_lock::unlock(&self.s.meta, &self.s.header_oid, RBD_LOCK_NAME, &old)
                    {
                        debug!(image = %self.s.name, error = %e, "unlocking the old watch's hold failed");
                    }
                }
                self.refresh();
            }
        }
    }

    /// Registers the header watch again. Blocklisted (another client broke our lock and
    /// fenced us): every later I/O fails with that reason. Any other failure is retried.
    fn rewatch(&mut self) {
        match self.s.meta.watch(&self.s.header_oid, &self.s.watch_sink) {
            Ok(c) => self.s.watch_cookie.store(c, Ordering::Relaxed),
            Err(e) if e.0 == -libc::ESHUTDOWN => {
                self.s.fenced();
            }
            Err(e) => {
                warn!(image = %self.s.name, error = %e, "cannot re-watch the image header; retrying");
                self.rewatch_at = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }

    /// Re-reads the header (after a header notify or a watch error).
    fn refresh(&mut self) {
        let old = Arc::clone(&self.s.lock_state().header);
        match header::read(
            &self.s.cluster,
            &self.s.meta,
            &self.s.id,
            self.s.snap_id,
            self.s.read_only,
            old.parent.as_ref(),
        ) {
            Ok(h) => {
                let mut st = self.s.lock_state();
                if let Some(f) = header::unsupported(h.features, self.s.read_only) {
                    st.fatal = Some(format!(
                        "image {} gained feature {f}, which the direct engine does not support; use engine=librbd",
                        self.s.name
                    ));
                }
                if h.size != old.size || h.snap_seq != old.snap_seq {
                    info!(image = %self.s.name, size = h.size, snap_seq = h.snap_seq, "header refreshed");
                }
                st.header = Arc::new(h);
                st.gen += 1;
            }
            Err(e) => warn!(image = %self.s.name, error = %e, "header refresh failed"),
        }
    }

    fn step(&mut self) {
        if self.rewatch_at.is_some_and(|t| Instant::now() >= t) {
            self.rewatch_at = None;
            self.rewatch();
            if self.s.watch_cookie.load(Ordering::Relaxed) != 0 {
                self.refresh();
            }
        }
        let (lock_state, want, writers) = {
            let st = self.s.lock_state();
            (st.lock.clone(), st.want_lock, st.writers)
        };
        if !want {
            self.fence_in_background();
        }
        match lock_state {
            LockState::Unlocked if want && !self.requesting && Instant::now() >= self.retry_at => {
                self.try_acquire();
            }
            LockState::Releasing(cookie) if writers == 0 && Instant::now() >= self.release_at => {
                self.release(&cookie, true);
            }
            LockState::Locked(cookie) if self.last_check.elapsed() >= LOCK_CHECK => {
                self.last_check = Instant::now();
                self.check_lock(&cookie);
            }
            _ => {}
        }
    }

    /// Notices a lock that was broken by another client.
    fn check_lock(&mut self, cookie: &str) {
        match cls_lock::list_lockers(&self.s.meta, &self.s.header_oid, RBD_LOCK_NAME) {
            Ok(l) if !l.holders.iter().any(|(_, c, _)| c == cookie) => {
                warn!(image = %self.s.name, "exclusive lock was broken by another client");
                let mut st = self.s.lock_state();
                st.lock = LockState::Unlocked;
                st.objmap.clear();
            }
            _ => {}
        }
    }

    fn fail_waiters(&mut self, errno: i32, why: String) {
        if errno == -libc::ETIMEDOUT {
            // a bounded call the cluster left unanswered: the writes keep waiting (their
            // io_timeout, if any, applies) and the lock is tried again
            warn!(image = %self.s.name, "{why}; retrying");
            return;
        }
        let why = if errno == -libc::ESHUTDOWN {
            self.s.fenced()
        } else {
            why
        };
        warn!(image = %self.s.name, "{why}");
        self.fail_parked(errno, why);
    }

    /// Fails the writes waiting for the lock with `why` (logged by the caller).
    fn fail_parked(&mut self, errno: i32, why: String) {
        let mut st = self.s.lock_state();
        st.lock_failure = Some(LockFailure {
            errno: Errno(errno),
            why,
        });
        st.failure_seq += 1;
        st.want_lock = false;
        for w in &st.waiters {
            w.kick();
        }
    }

    /// Blocklists the previous backends that may still write (see `ImageSpec::predecessors`)
    /// and waits for the OSD map that says so; until that is done no lock is taken, so no
    /// write of ours goes out. Each fence is bounded by the control timeout (and a stop
    /// request); `Ok` once every one is done, which [`DirectImage::predecessors_fenced`]
    /// then reports.
    fn fence(&mut self) -> Result<(), RadosError> {
        if !self.s.fence_pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let s = Arc::clone(&self.s);
        for (who, done) in s.predecessors.iter().zip(self.fenced.iter_mut()) {
            if who.fenced || *done {
                continue;
            }
            s.cluster.fence(&who.addr, s.control_timeout, &|| {
                s.stop.load(Ordering::Relaxed)
            })?;
            info!(image = %s.name, addr = %who.addr, client = %who.entity(),
                  "fenced the previous backend's client (blocklisted)");
            *done = true;
        }
        self.fence_warned = None;
        s.fence_pending.store(false, Ordering::Release);
        Ok(())
    }

    /// Logs a failed fence: as a warning when it is new or the last warning is old, else at
    /// debug level (a fence retried every second must not flood the log).
    fn fence_failed(&mut self, e: &RadosError, consequence: &str) {
        let msg = crate::chain(e);
        let warned = self
            .fence_warned
            .as_ref()
            .is_some_and(|(m, at)| *m == msg && at.elapsed() < FENCE_WARN_EVERY);
        if warned {
            debug!(image = %self.s.name, error = %msg, "cannot fence a previous backend yet");
        } else {
            warn!(image = %self.s.name, error = %msg, "cannot fence a previous backend; {consequence}");
            self.fence_warned = Some((msg, Instant::now()));
        }
    }

    /// Fences the predecessors while no write waits for the lock (at open, and retries), so
    /// that they are reported fenced as soon as possible.
    fn fence_in_background(&mut self) {
        if !self.s.fence_pending.load(Ordering::Acquire) || Instant::now() < self.fence_at {
            return;
        }
        if let Err(e) = self.fence() {
            let refused = e.fence_refused();
            self.fence_failed(&e, "writes will fail until it is");
            self.fence_at = Instant::now()
                + if refused {
                    FENCE_REFUSED_RETRY
                } else {
                    FENCE_RETRY
                };
        }
    }

    /// What writes waiting for a fence the monitors refused fail with.
    fn fence_refusal(&self, e: &RadosError) -> String {
        format!(
            "image {}: no write may go out before the previous backend is fenced, and the \
             fence was refused: {}",
            self.s.name,
            crate::chain(e)
        )
    }

    /// `client.<gid>` of this client, as lock owner lists name it.
    fn entity(&self) -> String {
        format!("client.{}", self.s.gid)
    }

    /// Drops a hold of the header lock that this client took under an earlier watch (whose
    /// unlock failed or timed out when the watch was replaced): ours to unlock, never a peer
    /// to ask for it or to fence. False when the unlock failed (waiting writes are told).
    fn drop_stale_hold(&mut self, stale: &str) -> bool {
        info!(image = %self.s.name, cookie = %stale,
              "the exclusive lock is held by this client under an earlier watch; unlocking it");
        match cls_lock::unlock(&self.s.meta, &self.s.header_oid, RBD_LOCK_NAME, stale) {
            Ok(()) => true,
            Err(Errno(e)) if e == -libc::ENOENT => true,
            Err(e) => {
                self.retry_at = Instant::now() + Duration::from_secs(1);
                self.fail_waiters(
                    e.0,
                    format!("cannot unlock this client's earlier hold of the exclusive lock: {e}"),
                );
                false
            }
        }
    }

    fn try_acquire(&mut self) {
        if let Err(e) = self.fence() {
            self.retry_at = Instant::now() + FENCE_RETRY;
            if e.fence_refused() {
                // it cannot succeed until an operator acts: the writes fail by name (reads
                // go on), as the librbd engine's open would
                self.fence_failed(&e, "writes fail until it is");
                let why = self.fence_refusal(&e);
                let errno = match &e {
                    RadosError::Fence { errno, .. } => errno.0,
                    _ => -libc::EACCES,
                };
                self.fail_parked(errno, why);
            } else {
                self.fence_failed(&e, "writes wait");
            }
            return;
        }
        for _ in 0..3 {
            let cookie = self.s.cookie();
            let input = codec::lock_input(RBD_LOCK_NAME, &cookie, RBD_LOCK_TAG);
            match self
                .s
                .meta
                .exec_write(&self.s.header_oid, "lock", "lock", &input)
            {
                Ok(()) => return self.acquired(cookie),
                Err(Errno(e)) if e == -libc::EEXIST => return self.acquired(cookie),
                Err(Errno(e)) if e == -libc::EBUSY => {}
                Err(e) => {
                    self.retry_at = Instant::now() + Duration::from_secs(1);
                    return self.fail_waiters(e.0, format!("cannot take the exclusive lock: {e}"));
                }
            }
            let lockers =
                match cls_lock::list_lockers(&self.s.meta, &self.s.header_oid, RBD_LOCK_NAME) {
                    Ok(l) => l,
                    Err(e) => {
                        self.retry_at = Instant::now() + Duration::from_secs(1);
                        return self
                            .fail_waiters(e.0, format!("cannot list the lock's holders: {e}"));
                    }
                };
            let Some((client, hcookie, _addr)) = lockers.holders.first().cloned() else {
                continue; // released meanwhile: try again
            };
            if client == self.entity() {
                if hcookie == cookie {
                    return self.acquired(cookie);
                }
                if !self.drop_stale_hold(&hcookie) {
                    return;
                }
                continue;
            }
            if self.s.predecessors.iter().any(|p| p.entity() == client) {
                // the holder is the backend we replace: it is gone and cannot answer a
                // request (librbd would wait for its watch to time out, ~30 s)
                // it was fenced (blocklisted) before this image opened, or it stopped with
                // nothing in flight: breaking its lock is all that is left to do
                info!(image = %self.s.name, holder = %client,
                      "the exclusive lock is held by a previous backend that is gone; breaking it");
                if let Err(e) = cls_lock::break_lock(
                    &self.s.meta,
                    &self.s.header_oid,
                    RBD_LOCK_NAME,
                    &client,
                    &hcookie,
                ) {
                    warn!(image = %self.s.name, error = %e, "breaking the lock failed");
                }
                continue;
            }
            if lockers.tag != RBD_LOCK_TAG
                || !lockers.exclusive
                || !hcookie.starts_with(RBD_LOCK_COOKIE_PREFIX)
            {
                self.retry_at = Instant::now() + Duration::from_secs(5);
                return self.fail_waiters(
                    -libc::EBUSY,
                    format!(
                        "image {} is locked by another mechanism ({client}, cookie {hcookie:?}, tag {:?})",
                        self.s.name, lockers.tag
                    ),
                );
            }
            debug!(image = %self.s.name, holder = %client, "requesting the exclusive lock");
            self.requesting = true;
            self.notify(notify_op::REQUEST_LOCK, TOKEN_REQUEST_LOCK);
            return;
        }
    }

    fn on_request_reply(&mut self, d: &AioDone) {
        self.requesting = false;
        let answer = codec::notify_acks(&d.reply)
            .ok()
            .and_then(|a| codec::owner_response(&a).ok().flatten());
        match answer {
            Some(0) => {
                self.silent = 0;
                // the owner hands over; RELEASED_LOCK brings us back sooner
                self.retry_at = Instant::now() + Duration::from_millis(2 * NOTIFY_TIMEOUT_MS);
            }
            Some(r) if r == -libc::EROFS => {
                self.silent = 0;
                self.retry_at = Instant::now() + Duration::from_secs(1);
                self.fail_waiters(
                    r,
                    format!(
                        "the exclusive lock's owner refuses to release image {}",
                        self.s.name
                    ),
                );
            }
            Some(r) => {
                self.retry_at = Instant::now() + Duration::from_secs(1);
                debug!(image = %self.s.name, result = r, "lock request answered with an error");
            }
            None => {
                self.silent += 1;
                if self.silent >= 2 {
                    self.silent = 0;
                    self.break_dead_owner();
                }
                self.retry_at = Instant::now();
            }
        }
    }

    /// The holder answered no lock request: fence it (blocklisted, and the OSD map that says
    /// so seen, as librbd does before breaking a lock) and break its lock (krbd does the same
    /// once its watch is gone). A hold of our own (an earlier watch's) is unlocked instead:
    /// this client never fences itself.
    fn break_dead_owner(&mut self) {
        let Ok(l) = cls_lock::list_lockers(&self.s.meta, &self.s.header_oid, RBD_LOCK_NAME) else {
            return;
        };
        let Some((client, cookie, addr)) = l.holders.first().cloned() else {
            return;
        };
        if client == self.entity() {
            self.drop_stale_hold(&cookie);
            return;
        }
        warn!(image = %self.s.name, holder = %client, %addr,
              "exclusive lock holder does not answer; blocklisting it and breaking its lock");
        let s = Arc::clone(&self.s);
        if let Err(e) = s
            .cluster
            .fence(&addr, s.control_timeout, &|| s.stop.load(Ordering::Relaxed))
        {
            if e.fence_refused() {
                self.retry_at = Instant::now() + FENCE_RETRY;
                let why = format!(
                    "image {}: the exclusive lock's holder {client} does not answer and \
                     cannot be fenced: {}",
                    self.s.name,
                    crate::chain(&e)
                );
                let errno = match &e {
                    RadosError::Fence { errno, .. } => errno.0,
                    _ => -libc::EACCES,
                };
                return self.fail_waiters(errno, why);
            }
            warn!(image = %self.s.name, error = %crate::chain(&e), "blocklisting the holder failed");
            return;
        }
        if let Err(e) = cls_lock::break_lock(
            &self.s.meta,
            &self.s.header_oid,
            RBD_LOCK_NAME,
            &client,
            &cookie,
        ) {
            warn!(image = %self.s.name, error = %e, "breaking the lock failed");
        }
    }

    fn acquired(&mut self, cookie: String) {
        let objmap = match self.open_object_map() {
            Ok(m) => m,
            Err(f) => {
                let _ = cls_lock::unlock(&self.s.meta, &self.s.header_oid, RBD_LOCK_NAME, &cookie);
                self.retry_at = Instant::now() + Duration::from_secs(1);
                return self.fail_waiters(f.errno.0, f.why);
            }
        };
        info!(image = %self.s.name, %cookie, "exclusive lock acquired");
        self.silent = 0;
        self.last_check = Instant::now();
        {
            let mut st = self.s.lock_state();
            st.lock = LockState::Locked(cookie);
            st.objmap = objmap;
            st.want_lock = false;
            for w in &st.waiters {
                w.kick();
            }
        }
        self.notify(notify_op::ACQUIRED_LOCK, TOKEN_OTHER_NOTIFY);
    }

    /// Locks and loads the head object map (when the image has one).
    fn open_object_map(&self) -> Result<Vec<u8>, LockFailure> {
        let fail = |what: &'static str| {
            move |errno: Errno| LockFailure {
                errno,
                why: format!("cannot {what} the object map: {errno}"),
            }
        };
        let h = Arc::clone(&self.s.lock_state().header);
        if h.features & feature::OBJECT_MAP == 0 {
            return Ok(Vec::new());
        }
        let oid = &self.s.objmap_oid;
        match cls_lock::lock_exclusive(&self.s.meta, oid, RBD_LOCK_NAME, "") {
            Ok(()) => {}
            Err(Errno(e)) if e == -libc::EEXIST => {}
            Err(Errno(e)) if e == -libc::EBUSY => {
                // a previous owner died holding it; we hold the header lock, so it is ours
                if let Ok(l) = cls_lock::list_lockers(&self.s.meta, oid, RBD_LOCK_NAME) {
                    for (client, cookie, _) in l.holders {
                        let _ = cls_lock::break_lock(
                            &self.s.meta,
                            oid,
                            RBD_LOCK_NAME,
                            &client,
                            &cookie,
                        );
                    }
                }
                cls_lock::lock_exclusive(&self.s.meta, oid, RBD_LOCK_NAME, "")
                    .map_err(fail("lock"))?;
            }
            Err(e) => return Err(fail("lock")(e)),
        }
        let b = self
            .s
            .meta
            .exec(oid, "rbd", "object_map_load", &[])
            .map_err(fail("load"))?;
        let map = codec::object_map_reply(&b).map_err(|e| LockFailure {
            errno: Errno(-libc::EIO),
            why: e.to_string(),
        })?;
        let want = h.layout.num_objects(h.size);
        if map.len() as u64 != want {
            warn!(image = %self.s.name, map = map.len(), objects = want, "object map size differs from the image's");
        }
        Ok(map)
    }

    /// Unlocks the object map and the header. Only once the header's unlock succeeded (or
    /// found the lock gone) is the lock marked released and, with `notify`, announced; when
    /// it failed (timed out) the lock is still ours: the state stays as it was (new writes
    /// keep waiting), the failure is logged, the unlock is retried a second later, and false
    /// comes back.
    fn release(&mut self, cookie: &str, notify: bool) -> bool {
        let has_map = self.s.lock_state().header.features & feature::OBJECT_MAP != 0;
        if has_map {
            let _ = cls_lock::unlock(&self.s.meta, &self.s.objmap_oid, RBD_LOCK_NAME, "");
        }
        match cls_lock::unlock(&self.s.meta, &self.s.header_oid, RBD_LOCK_NAME, cookie) {
            Ok(()) => {}
            Err(Errno(e)) if e == -libc::ENOENT => {}
            Err(e) => {
                warn!(image = %self.s.name, error = %e,
                      "unlocking the header failed; the lock is still ours, retrying");
                self.release_at = Instant::now() + Duration::from_secs(1);
                return false;
            }
        }
        let wanted = {
            let mut st = self.s.lock_state();
            st.lock = LockState::Unlocked;
            st.objmap.clear();
            st.want_lock
        };
        info!(image = %self.s.name, "exclusive lock released");
        if notify {
            self.notify(notify_op::RELEASED_LOCK, TOKEN_OTHER_NOTIFY);
        }
        // give the requester time to take it before asking for it back
        if wanted {
            self.retry_at = Instant::now() + Duration::from_millis(500);
        }
        true
    }

    fn shutdown(&mut self) {
        let lock = self.s.lock_state().lock.clone();
        let cid = self.s.cid();
        // one attempt: a lock we could not release is broken by its next owner
        let released = match lock {
            LockState::Locked(c) | LockState::Releasing(c) => self.release(&c, false),
            LockState::Unlocked => false,
        };
        // the watch goes first, so the RELEASED_LOCK notify below does not wait for an
        // acknowledgement from ourselves
        let cookie = self.s.watch_cookie.swap(0, Ordering::Relaxed);
        if cookie != 0 {
            let _ = self.s.meta.unwatch(cookie);
        }
        if released {
            self.notify_as(notify_op::RELEASED_LOCK, TOKEN_OTHER_NOTIFY, cid);
        }
        // every notify must complete before the pool context and the cluster go
        let deadline = Instant::now() + Duration::from_millis(2 * NOTIFY_TIMEOUT_MS + 1000);
        let mut done = Vec::new();
        while self.notifies > 0 && Instant::now() < deadline {
            let mut fds = [PollFd::new(self.s.control.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(100u16));
            self.notifies = self
                .notifies
                .saturating_sub(self.s.control.drain(&mut done));
            done.clear();
        }
        if self.notifies > 0 {
            warn!(image = %self.s.name, "notifies still in flight at close; leaking the cluster handle");
            std::mem::forget(Arc::clone(&self.s));
        }
    }
}

/// Object-map bookkeeping shared with the queues (krbd's rules).
pub(crate) fn objmap_update_needed(cur: u8, new: u8) -> bool {
    !(cur == new
        || (new == objstate::PENDING && cur == objstate::NONEXISTENT)
        || (new == objstate::NONEXISTENT && cur != objstate::PENDING))
}

/// Applies a completed update to the in-memory map (krbd's rules).
pub(crate) fn objmap_apply(map: &mut [u8], objno: u64, new: u8, current: Option<u8>) {
    if let Some(s) = usize::try_from(objno).ok().and_then(|i| map.get_mut(i)) {
        let ok = match current {
            None => true,
            Some(c) => c == *s || (c == objstate::EXISTS && *s == objstate::EXISTS_CLEAN),
        };
        if ok {
            *s = new;
        }
    }
}

/// The lock protocol on the shared test cluster, with state only this crate can reach.
#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{cls_lock, codec, LockState, RBD_LOCK_NAME, RBD_LOCK_TAG};
    use crate::rados::testing::{cluster, one};
    use crate::rados::{BlockOp, Engine, EngineChoice, Image};

    /// A hold of the header lock under this client's own entity but a stale cookie (an
    /// earlier watch's, whose unlock timed out when the watch was replaced) is unlocked
    /// and the lock taken: the client never asks itself for the lock, and never blocklists
    /// itself as a dead owner.
    #[test]
    fn a_stale_hold_of_our_own_is_unlocked_never_fenced() {
        let c = cluster();
        let name = c.create_image("direct-stale", 4, None);
        let mut spec = c.spec(&name);
        spec.engine = EngineChoice::Direct;
        let img = Image::open(&spec).unwrap();
        let Engine::Direct(d) = &img.engine else {
            panic!("not the direct engine")
        };
        let s = &d.shared;
        // watch handles are pointers: never 1
        let stale = format!("{} 1", codec::RBD_LOCK_COOKIE_PREFIX);
        let input = codec::lock_input(RBD_LOCK_NAME, &stale, RBD_LOCK_TAG);
        s.meta
            .exec_write(&s.header_oid, "lock", "lock", &input)
            .unwrap();
        let mut q = img.queue().unwrap();
        let t = Instant::now();
        let r = one(
            &mut q,
            BlockOp::Write {
                offset: 0,
                buf: vec![5; 4096],
            },
        );
        r.result.unwrap();
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        assert_eq!(img.unusable(), None);
        let me = img.client().unwrap();
        let listed = c.ceph(&["osd", "blocklist", "ls"]);
        assert!(!listed.contains(&me.addr), "blocklisted itself: {listed}");
        let l = cls_lock::list_lockers(&s.meta, &s.header_oid, RBD_LOCK_NAME).unwrap();
        let cookies: Vec<&str> = l.holders.iter().map(|h| h.1.as_str()).collect();
        assert_eq!(cookies, [s.cookie().as_str()]);
        assert!(matches!(s.lock_state().lock, LockState::Locked(_)));
    }
}

/// Fault tests on the private cluster `target/ceph-faults` (one at a time with the other
/// fault tests: see `.config/nextest.toml`).
#[cfg(test)]
mod faults {
    use std::time::{Duration, Instant};

    use super::{cls_lock, LockState, RBD_LOCK_NAME};
    use crate::rados::testing::{one, private_cluster, Revive, OSD};
    use crate::rados::{BlockOp, Engine, EngineChoice, Image, LockHold};

    /// A hand-over whose unlock times out (the OSD frozen past the control timeout) keeps
    /// the lock: still releasing, nothing announced, the unlock retried until it goes
    /// through once the OSD answers; the cluster then holds no lock of ours.
    #[test]
    fn a_release_whose_unlock_times_out_keeps_the_lock_until_unlocked() {
        let c = private_cluster("faults");
        let _revive = Revive(c);
        let name = c.create_image("release", 4, None);
        let mut spec = c.spec(&name);
        spec.engine = EngineChoice::Direct;
        spec.control_timeout = Duration::from_secs(1);
        let img = Image::open(&spec).unwrap();
        let mut q = img.queue().unwrap();
        let w = one(
            &mut q,
            BlockOp::Write {
                offset: 0,
                buf: vec![3; 4096],
            },
        );
        w.result.unwrap();
        assert_eq!(img.lock_status().state, LockHold::Held);
        let Engine::Direct(d) = &img.engine else {
            panic!("not the direct engine")
        };
        let s = &d.shared;
        c.daemon("stop", OSD);
        // what a peer's lock request does (a notify cannot reach us through a frozen OSD)
        {
            let mut st = s.lock_state();
            if let LockState::Locked(cookie) = &st.lock {
                st.lock = LockState::Releasing(cookie.clone());
            }
        }
        s.control.kick();
        std::thread::sleep(Duration::from_secs(5));
        assert_eq!(
            img.lock_status().state,
            LockHold::Releasing,
            "the unlock timed out: the lock is still ours"
        );
        c.daemon("cont", OSD);
        let t = Instant::now();
        while img.lock_status().state != LockHold::NotHeld {
            assert!(t.elapsed() < Duration::from_secs(30), "never released");
            std::thread::sleep(Duration::from_millis(50));
        }
        let l = cls_lock::list_lockers(&s.meta, &s.header_oid, RBD_LOCK_NAME).unwrap();
        assert!(l.holders.is_empty(), "still locked: {:?}", l.holders);
    }
}
