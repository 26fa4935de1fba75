//! The control thread of one VBD: reads its configuration, opens the image, runs the
//! XenbusState handshake, connects and disconnects queues, follows resizes and detaches.
//!
//! Owns: the VBD's xenstore nodes under its backend directory, its `error` node, its queues,
//! its stall report (`stalled`, [`super::stall`]) and the re-open an operator asks for
//! (`reopen`: a new client, each queue handed a new engine queue, the guest keeps its disk).
//! Trusts: nothing the frontend writes; `params` and `mode` come from the toolstack but are
//! still validated and any failure is reported (log + `error/<backend path>/error`).
//! Must never: let a failure leave its own VBD (other VBDs run in their own threads), or block
//! forever: every wait has a timeout so stop requests and removals are seen.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, info, info_span, warn};

use crate::chain;
use crate::rados::{self, Image, ImageSpec};
use crate::ring::{self, BackRing};
use crate::xen::xenstore::{Xenstore, XsError};
use crate::xen::{DomId, EventChannels, GrantMapping, GrantTable, Platform, XenError};

use super::clients;
use super::dataplane::{Dataplane, QueueConfig, ResumeError};
use super::frontend::{FrontendConfig, FrontendError, Limits};
use super::journal::{Journal, JournalError, RingIdentity};
use super::metrics::{DiskStatus, Negotiated};
use super::params::{DiskSpec, ParamsError};
use super::queue::{QueueExit, QueueHandle, QueueParts, StopMode};
use super::stall::{StallGauge, StallWatch};
use super::xenbus::{Action, Handshake, XenbusState};

/// The backend node that says how opening the disk's image went, for the hotplug script
/// (`block-rbdback add` waits for it, then reports a failure to libxl through
/// `hotplug-error`) and for operators: `opening`, `open` or `failed` (the reason is in the
/// `error` node).
pub const IMAGE_NODE: &str = "rbdback-image";

/// `info` bits (blkif.h `VDISK_*`).
const VDISK_CDROM: u32 = 1;
const VDISK_READONLY: u32 = 4;

/// Which VBD: `backend/<kind>/<domid>/<devid>` of backend domain `backend_domid`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VbdId {
    /// Backend kind (`vbd` for libxl's phy disks).
    pub kind: String,
    /// Backend domain (0 for dom0).
    pub backend_domid: DomId,
    /// Frontend domain.
    pub domid: DomId,
    /// Device id (the virtual device number).
    pub devid: u32,
}

impl VbdId {
    /// Absolute backend directory.
    pub fn backend_path(&self) -> String {
        format!(
            "/local/domain/{}/backend/{}/{}/{}",
            self.backend_domid, self.kind, self.domid, self.devid
        )
    }

    /// The node xenbus drivers report errors in (`xenbus_dev_error`: `error/<nodename>/error`).
    pub fn error_path(&self) -> String {
        format!(
            "/local/domain/{}/error/backend/{}/{}/{}/error",
            self.backend_domid, self.kind, self.domid, self.devid
        )
    }
}

/// What the backend advertises.
#[derive(Debug, Clone)]
pub struct Options {
    /// `max-ring-page-order` (0..=4).
    pub max_ring_page_order: u32,
    /// `multi-queue-max-queues`.
    pub max_queues: u32,
    /// `feature-max-indirect-segments`.
    pub max_indirect_segments: u16,
    /// Per-queue tunables.
    pub queue: QueueConfig,
    /// How often the image size is re-read for online resize.
    pub resize_poll: Duration,
    /// How long opening the image may go unanswered before the VBD says so in its `error`
    /// node (it keeps waiting: librados gives an operation no time bound of its own).
    pub open_report_after: Duration,
    /// Where each VBD keeps what outlives the process (`<dir>/<kind>-<domid>-<devid>/`: a
    /// journal per ring queue, the client address to fence): with it, a backend that dies
    /// is resumed by the next one without the guest noticing. `None`: no journal (a VBD a
    /// dead backend connected is then closed).
    pub state_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Options {
            max_ring_page_order: 4,
            max_queues: u32::try_from(cpus.clamp(1, 4)).unwrap_or(1),
            max_indirect_segments: ring::request::DEFAULT_MAX_INDIRECT_SEGMENTS,
            queue: QueueConfig::default(),
            resize_poll: Duration::from_secs(5),
            open_report_after: Duration::from_secs(30),
            state_dir: None,
        }
    }
}

/// Why a VBD could not be served (written to its `error` node).
#[derive(Debug, Error)]
pub enum VbdError {
    /// A toolstack node is missing.
    #[error("backend node {0} is missing")]
    MissingNode(String),
    /// `params` is malformed.
    #[error("bad params")]
    Params(#[from] ParamsError),
    /// The image could not be opened.
    #[error("cannot open the RBD image")]
    Open(#[source] rados::RadosError),
    /// A snapshot (read-only by nature) was attached for writing.
    #[error("snapshot {0} is read-only: attach it read-only (xl disk access=ro, backend mode r)")]
    WritableSnapshot(String),
    /// Opening the image has gone unanswered for a while (still waiting).
    #[error(
        "opening {image}: no answer from the cluster for {secs} s (are the OSDs of its pool \
         down, or its placement groups inactive?); still trying"
    )]
    OpenWaiting {
        /// The image.
        image: String,
        /// Seconds waited so far.
        secs: u64,
    },
    /// The frontend's connect nodes are unusable.
    #[error("bad frontend configuration")]
    Frontend(#[from] FrontendError),
    /// Mapping rings or binding event channels failed.
    #[error("cannot connect the rings")]
    Xen(#[from] XenError),
    /// A xenstore operation failed.
    #[error("xenstore")]
    Xenstore(#[from] XsError),
    /// The storage engine refused to give a queue.
    #[error("cannot create an engine queue")]
    Engine(#[source] rados::RadosError),
    /// Spawning a thread or creating an eventfd failed.
    #[error("cannot start a queue thread")]
    Thread(#[from] std::io::Error),
    /// A queue found the frontend breaking the protocol.
    #[error("frontend broke the ring protocol: {0}")]
    Broken(String),
    /// A VBD another instance of the backend connected could not be taken over.
    #[error("cannot resume the rings a previous backend connected")]
    Resume(#[source] ResumeError),
    /// The VBD's state directory could not be made.
    #[error("cannot keep the ring's journal in {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A journal could not be created.
    #[error("cannot create the ring's journal")]
    Journal(#[from] JournalError),
    /// The image's client can serve it no more (blocklisted); requests fail until a re-open.
    #[error("{why}; write 1 to {node} to re-open the image with a new client (the guest keeps its disk)")]
    Unusable {
        /// The engine's reason.
        why: String,
        /// The node that asks for a re-open.
        node: String,
    },
    /// Re-opening the image failed; the old client still serves the disk.
    #[error("re-opening the image failed")]
    Reopen(#[source] rados::RadosError),
}

/// How a VBD's thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VbdEnd {
    /// The toolstack removed the device (or set `online` to 0 and the frontend closed).
    Removed,
    /// The process is stopping.
    Stopped,
}

/// How a watched open ended.
enum Opening {
    /// The opener returned.
    Done(Result<Arc<Image>, rados::RadosError>),
    /// The process is stopping.
    Stopped,
    /// The toolstack took the device away while it was opening.
    Removed,
}

/// Builds the engine's image description from the disk spec and the VBD's mode.
pub fn image_spec(spec: &DiskSpec, read_only: bool) -> ImageSpec {
    let mut t = spec.target.clone();
    // A snapshot is read-only whatever the mode says.
    t.read_only = read_only || t.snapshot.is_some();
    t
}

/// The queues' tunables of a disk: the serve defaults, with the disk's own `io_timeout`
/// (0: wait for ever) and `stall_warn` when its `params` set them.
pub fn queue_config(defaults: &QueueConfig, spec: &DiskSpec) -> QueueConfig {
    let mut c = *defaults;
    if let Some(t) = spec.io_timeout {
        c.io_timeout = (!t.is_zero()).then_some(t);
    }
    if let Some(w) = spec.stall_warn {
        c.stall_warn = w;
    }
    c
}

/// Opens images; tests and the demo substitute an in-memory image.
pub trait ImageOpener: Send + Sync {
    /// Opens the image `spec` describes.
    fn open(&self, spec: &ImageSpec) -> Result<Arc<Image>, rados::RadosError>;
    /// Opens the image of disk `id` (its `params` parsed into `spec`): a sandboxed backend's
    /// opener first gets the disk's Ceph files from its broker
    /// ([`crate::sandbox::broker::ConfinedOpener`]).
    fn open_disk(&self, id: &VbdId, spec: &ImageSpec) -> Result<Arc<Image>, rados::RadosError> {
        let _ = id;
        self.open(spec)
    }
}

/// The production opener: [`Image::open`].
#[derive(Debug, Default, Clone, Copy)]
pub struct RadosOpener;

impl ImageOpener for RadosOpener {
    fn open(&self, spec: &ImageSpec) -> Result<Arc<Image>, rados::RadosError> {
        Image::open(spec)
    }
}

struct Connected {
    queues: Vec<QueueHandle>,
}

struct Vbd<P: Platform> {
    id: VbdId,
    be: String,
    fe: String,
    fe_domid: DomId,
    platform: Arc<P>,
    gnttab: Arc<P::Gnttab>,
    xs: Arc<Xenstore>,
    opts: Options,
    image: Option<Arc<Image>>,
    read_only: bool,
    cdrom: bool,
    discard: bool,
    capacity: Arc<AtomicU64>,
    hs: Handshake,
    conn: Option<Connected>,
    /// This VBD's directory under [`Options::state_dir`].
    state: Option<PathBuf>,
    /// What `rbdback status` and the metrics show of this disk.
    status: Arc<DiskStatus>,
    /// The queues' tunables: the serve defaults with the disk's `io_timeout`/`stall_warn`.
    queue_cfg: QueueConfig,
    stall: StallWatch,
    /// What the image was opened as (a re-open opens it again).
    ispec: Option<ImageSpec>,
    /// Images a re-open replaced, closed once no queue holds them.
    retired: Vec<Arc<Image>>,
    /// The image's client was found unusable and that was reported.
    unusable_reported: bool,
    /// The `reopen` node could not be removed (and that was logged).
    reopen_refused: bool,
    /// The gids of the RADOS clients this instance recorded in [`CLIENT_FILE`].
    own_clients: Vec<u64>,
    /// The predecessors the current image had to fence are recorded as fenced (or there
    /// were none).
    fence_recorded: bool,
}

fn node(xs: &Xenstore, path: &str) -> Result<String, VbdError> {
    xs.read(path)?
        .ok_or_else(|| VbdError::MissingNode(path.to_owned()))
}

impl<P: Platform> Vbd<P> {
    fn write(&self, name: &str, value: &str) -> Result<(), XsError> {
        self.xs.write(&format!("{}/{name}", self.be), value)
    }

    fn report(&self, e: &dyn std::error::Error) {
        let msg = chain(e);
        warn!(error = %msg, "vbd error");
        self.status.set_last_error(Some(msg.clone()));
        // xenbus_dev_error's format: "<errno> <message>"; we have no errno, use EIO's.
        if let Err(xe) = self.xs.write(&self.id.error_path(), &format!("5 {msg}")) {
            warn!(error = %xe, "cannot write the error node");
        }
    }

    /// Opens the image on a helper thread, so that this thread keeps seeing stop requests
    /// and removals: librados bounds the monitors' answers (the mount timeout) but not the
    /// OSDs', so an open against inactive placement groups waits as long as they stay so.
    /// After `open_report_after` the VBD says so in its `error` node and keeps waiting. An
    /// abandoned open ends on its own thread, which then closes what it opened.
    fn open_watched(
        &self,
        opener: &Arc<dyn ImageOpener>,
        spec: &ImageSpec,
        stop: &Receiver<()>,
    ) -> Opening {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (o, sp, id) = (Arc::clone(opener), spec.clone(), self.id.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("rbdback-open-{}", self.id.devid))
            .spawn(move || {
                // the receiver is gone when the VBD gave up: the image is dropped (closed)
                let _ = tx.send(o.open_disk(&id, &sp));
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the opening thread; opening inline");
            return Opening::Done(opener.open_disk(&self.id, spec));
        }
        let t0 = Instant::now();
        let mut reported = false;
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(r) => return Opening::Done(r),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    // the opener panicked: its message is in the log
                    return Opening::Done(Err(rados::RadosError::Invalid(
                        "the image opener ended without an answer".into(),
                    )));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            if !matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
                return Opening::Stopped;
            }
            if matches!(self.online(), Ok(false)) {
                info!("device removed while its image was opening");
                return Opening::Removed;
            }
            if !reported && t0.elapsed() >= self.opts.open_report_after {
                reported = true;
                self.report(&VbdError::OpenWaiting {
                    image: spec.to_string(),
                    secs: t0.elapsed().as_secs(),
                });
            }
        }
    }

    fn advertise(&self) -> Result<(), XsError> {
        let o = &self.opts;
        self.xs.transaction(|tx| {
            tx.write(
                &format!("{}/feature-max-indirect-segments", self.be),
                &o.max_indirect_segments.to_string(),
            )?;
            tx.write(
                &format!("{}/multi-queue-max-queues", self.be),
                &o.max_queues.to_string(),
            )?;
            tx.write(
                &format!("{}/max-ring-page-order", self.be),
                &o.max_ring_page_order.to_string(),
            )?;
            Ok(())
        })
    }

    fn ring_limits(&self) -> ring::Limits {
        let mut l = ring::Limits::new(self.capacity.load(Ordering::Relaxed));
        l.read_only = self.read_only;
        l.max_indirect_segments = self.opts.max_indirect_segments;
        l.discard = self.discard && !self.read_only;
        l.discard_secure = false;
        l.flush = true;
        l.barrier = true;
        l
    }

    /// Reads the frontend's ring nodes (the same for a fresh connection and a takeover).
    fn frontend_config(&self) -> Result<FrontendConfig, VbdError> {
        let fe = self.fe.clone();
        let xs = Arc::clone(&self.xs);
        let mut read = |n: &str| xs.read(&format!("{fe}/{n}")).ok().flatten();
        Ok(FrontendConfig::read(
            &mut read,
            Limits {
                max_ring_page_order: self.opts.max_ring_page_order,
                max_queues: self.opts.max_queues,
                persistent: true,
            },
        )?)
    }

    fn journal_path(&self, index: usize) -> Option<PathBuf> {
        self.state.as_ref().map(|d| d.join(format!("q{index}")))
    }

    /// Starts a queue thread for every ring of `cfg`; on a failure stops those already
    /// started (`how`) and returns the error with the rings that were never started.
    fn start_queues(&mut self, cfg: &FrontendConfig, resume: bool) -> Result<(), VbdError> {
        let image = self
            .image
            .clone()
            .ok_or_else(|| VbdError::MissingNode(format!("{}/params", self.be)))?;
        let mut queues = Vec::new();
        let mut gauges = Vec::new();
        for (index, q) in cfg.queues.iter().enumerate() {
            let gauge = Arc::new(StallGauge::default());
            match self.start_queue(&image, cfg, index, q, resume, Arc::clone(&gauge)) {
                Ok(h) => {
                    queues.push(h);
                    gauges.push(gauge);
                }
                Err(e) => {
                    // Never leave a half-connected VBD: stop what already runs.
                    for h in queues {
                        let _ = h.stop(StopMode::Close);
                    }
                    return Err(e);
                }
            }
        }
        self.conn = Some(Connected { queues });
        self.stall.set_gauges(gauges);
        self.status.connected(Negotiated {
            ring_order: cfg.ring_page_order,
            queues: u32::try_from(cfg.queues.len()).unwrap_or(u32::MAX),
            indirect_segments: u32::from(self.opts.max_indirect_segments),
            persistent: cfg.persistent,
        });
        Ok(())
    }

    fn connect(&mut self) -> Result<(), VbdError> {
        let image = self
            .image
            .clone()
            .ok_or_else(|| VbdError::MissingNode(format!("{}/params", self.be)))?;
        let cfg = self.frontend_config()?;
        info!(
            abi = ?cfg.abi,
            order = cfg.ring_page_order,
            queues = cfg.queues.len(),
            "frontend connecting"
        );
        if let Some(dir) = &self.state {
            std::fs::create_dir_all(dir).map_err(|source| VbdError::StateDir {
                path: dir.clone(),
                source,
            })?;
        }
        self.start_queues(&cfg, false)?;
        let sectors = self.capacity.load(Ordering::Relaxed);
        let info = if self.read_only { VDISK_READONLY } else { 0 }
            | if self.cdrom { VDISK_CDROM } else { 0 };
        let discard = self.discard && !self.read_only;
        let granularity = image.info().discard_granularity;
        let be = self.be.clone();
        let res = self.xs.transaction(|tx| {
            let w = |n: &str, v: &str| tx.write(&format!("{be}/{n}"), v);
            w("feature-flush-cache", "1")?;
            w("feature-barrier", "1")?;
            w("feature-persistent", "1")?;
            if discard {
                w("feature-discard", "1")?;
                w("discard-granularity", &granularity.max(512).to_string())?;
                w("discard-alignment", "0")?;
                w("discard-secure", "0")?;
            } else {
                w("feature-discard", "0")?;
            }
            w("sectors", &sectors.to_string())?;
            w("info", &info.to_string())?;
            w("sector-size", "512")?;
            w("physical-sector-size", "512")?;
            Ok(())
        });
        if let Err(e) = res {
            self.disconnect(StopMode::Close);
            return Err(e.into());
        }
        Ok(())
    }

    /// Takes over the rings a previous instance of the backend connected, from their
    /// journals, writing nothing to xenstore: the frontend sees no state change.
    fn resume(&mut self) -> Result<(), VbdError> {
        let cfg = self.frontend_config()?;
        self.start_queues(&cfg, true)?;
        info!(
            queues = cfg.queues.len(),
            order = cfg.ring_page_order,
            "resumed the rings a previous backend connected"
        );
        Ok(())
    }

    /// A VBD a previous backend connected cannot be resumed: answer, with an error, every
    /// request its journals say the guest waits for, on every ring we can still reach, so
    /// the guest fails that I/O instead of hanging (the VBD is then closed).
    fn answer_what_we_know(&self) {
        let Ok(cfg) = self.frontend_config() else {
            return;
        };
        let order = u8::try_from(cfg.ring_page_order).unwrap_or(u8::MAX);
        for (index, q) in cfg.queues.iter().enumerate() {
            let Some(path) = self.journal_path(index) else {
                continue;
            };
            if !path.exists() {
                continue;
            }
            let done = (|| -> Result<usize, VbdError> {
                let map = self.gnttab.map(self.fe_domid, &q.ring_refs, true)?;
                let id = RingIdentity {
                    abi: cfg.abi,
                    order,
                    refs: q.ring_refs.clone(),
                    event_channel: q.event_channel,
                };
                let (mut dp, _) = Dataplane::resume(
                    (cfg.abi, order),
                    self.ring_limits(),
                    self.queue_cfg,
                    &path,
                    &id,
                    &map.mem(),
                )
                .map_err(VbdError::Resume)?;
                let n = dp.in_flight();
                let notify = dp
                    .abandon(&map.mem())
                    .map_err(|e| VbdError::Broken(e.to_string()))?;
                if notify {
                    let mut ev = self.platform.evtchn()?;
                    let port = ev.bind_interdomain(self.fe_domid, q.event_channel)?;
                    ev.notify(port)?;
                }
                if let Some(j) = dp.take_journal() {
                    j.discard();
                }
                Ok(n)
            })();
            match done {
                Ok(n) => warn!(
                    queue = index,
                    requests = n,
                    "answered the requests the guest waited for with errors"
                ),
                Err(e) => {
                    warn!(queue = index, error = %chain(&e), "cannot answer the ring's requests")
                }
            }
        }
    }

    fn start_queue(
        &self,
        image: &Arc<Image>,
        cfg: &FrontendConfig,
        index: usize,
        q: &super::frontend::QueueRing,
        resume: bool,
        stall: Arc<StallGauge>,
    ) -> Result<QueueHandle, VbdError> {
        let order = u8::try_from(cfg.ring_page_order).unwrap_or(u8::MAX);
        let ring_map = self.gnttab.map(self.fe_domid, &q.ring_refs, true)?;
        let id = RingIdentity {
            abi: cfg.abi,
            order,
            refs: q.ring_refs.clone(),
            event_channel: q.event_channel,
        };
        let dataplane = match (resume, self.journal_path(index)) {
            (true, Some(path)) => {
                let (dp, r) = Dataplane::resume(
                    (cfg.abi, order),
                    self.ring_limits(),
                    self.queue_cfg,
                    &path,
                    &id,
                    &ring_map.mem(),
                )
                .map_err(VbdError::Resume)?;
                info!(
                    queue = index,
                    reissued = r.reissued,
                    rewritten = r.rewritten,
                    clean = r.clean,
                    "ring resumed from its journal"
                );
                dp
            }
            (true, None) => {
                return Err(VbdError::Resume(ResumeError::Journal(
                    JournalError::Mismatch {
                        path: PathBuf::from("(no state directory)"),
                        why: "this backend keeps no journals (no --state-dir)".into(),
                    },
                )))
            }
            (false, path) => {
                let back =
                    BackRing::new(cfg.abi, order).map_err(|e| VbdError::Broken(e.to_string()))?;
                let dp = Dataplane::new(back, self.ring_limits(), self.queue_cfg);
                match path {
                    Some(p) => {
                        let entries = dp.ring().capacity();
                        dp.with_journal(Journal::create(&p, &id, entries)?)
                    }
                    None => dp,
                }
            }
        };
        let dataplane = dataplane.with_metrics(self.status.queue(index));
        let mut evtchn = self.platform.evtchn()?;
        let port = evtchn.bind_interdomain(self.fe_domid, q.event_channel)?;
        let engine = image.queue().map_err(VbdError::Engine)?.into();
        let parts = QueueParts {
            index,
            domid: self.fe_domid,
            ring_map,
            gnttab: Arc::clone(&self.gnttab),
            evtchn,
            port,
            dataplane,
            engine,
            capacity: Arc::clone(&self.capacity),
            persistent: cfg.persistent,
            stall,
        };
        Ok(QueueHandle::spawn(parts, info_span!("queue", q = index))?)
    }

    /// Stops the queues; true when every one drained (nothing left in flight).
    fn disconnect(&mut self, how: StopMode) -> bool {
        self.stall.set_gauges(Vec::new());
        self.stall.clear(&self.xs, &format!("{}/stalled", self.be));
        let mut clean = true;
        if let Some(c) = self.conn.take() {
            self.status.disconnected();
            // all drain at once: a handover waits for the slowest queue, not their sum
            for q in &c.queues {
                q.ask_stop(how);
            }
            for q in c.queues {
                match q.stop(how) {
                    QueueExit::Stopped(s) => debug!(?s, "queue stopped"),
                    QueueExit::Leaked(s, n) => {
                        clean = false;
                        warn!(?s, in_flight = n, "queue leaked buffers")
                    }
                    QueueExit::Broken(r) => {
                        clean = false;
                        warn!(reason = %r, "queue had stopped: broken frontend")
                    }
                    QueueExit::Failed(r) => {
                        clean = false;
                        warn!(reason = %r, "queue had failed")
                    }
                }
            }
            match how {
                StopMode::Close => info!("disconnected"),
                StopMode::Handover => info!("rings left to the next backend instance"),
            }
        }
        clean
    }

    /// Runs actions; returns true when the VBD is gone.
    fn execute(&mut self, actions: Vec<Action>) -> Result<bool, XsError> {
        for a in actions {
            match a {
                Action::Advertise => self.advertise()?,
                Action::Connect => {
                    if let Err(e) = self.connect() {
                        self.report(&e);
                        let more = self.hs.connect_failed();
                        return self.execute(more);
                    }
                }
                Action::Disconnect => {
                    self.disconnect(StopMode::Close);
                }
                Action::SwitchState(s) => {
                    debug!(state = %s, "backend state");
                    self.status.set_state(s);
                    self.write("state", &s.to_string())?;
                }
                Action::Remove => {
                    self.disconnect(StopMode::Close);
                    self.forget_state();
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The clients [`CLIENT_FILE`] records (none when there is no file).
    fn recorded_clients(&self) -> Vec<clients::Recorded> {
        self.state
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.join(CLIENT_FILE)).ok())
            .map(|t| clients::parse(&t))
            .unwrap_or_default()
    }

    fn write_clients(&self, recorded: &[clients::Recorded]) {
        let Some(dir) = &self.state else { return };
        let r = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(dir.join(CLIENT_FILE), clients::render(recorded)));
        if let Err(e) = r {
            warn!(error = %e, dir = %dir.display(), "cannot record the client for a successor");
        }
    }

    /// The gids of the predecessors the current image was asked to fence.
    fn to_fence(&self) -> Vec<u64> {
        self.ispec
            .as_ref()
            .filter(|s| s.fence_predecessors)
            .map(|s| {
                s.predecessors
                    .iter()
                    .filter(|p| !p.fenced)
                    .map(|p| p.gid)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records this instance's RADOS client in the state directory, after the clients that
    /// served the image before it (`before`, as [`Vbd::fence_predecessor`] read them): if it
    /// dies, the next instance fences every one that may still write before it writes, and
    /// breaks the lock of any of them at once. Predecessors are marked fenced only once the
    /// image says they are ([`Image::predecessors_fenced`]; later by [`Vbd::record_fenced`]).
    fn remember_client(&mut self, image: &Image, mut before: Vec<clients::Recorded>) {
        let Some(me) = image.client() else { return };
        let to_fence = self.to_fence();
        self.fence_recorded = to_fence.is_empty() || image.predecessors_fenced();
        if self.fence_recorded {
            clients::mark_fenced(&mut before, &to_fence, clients::now());
        }
        before.push(clients::Recorded::new(&me));
        self.own_clients.push(me.gid);
        self.write_clients(&before);
    }

    /// Records the predecessors as fenced once the image fenced them (the direct engine does
    /// it on its control thread after the open returned).
    fn record_fenced(&mut self) {
        if self.fence_recorded || !self.image.as_ref().is_some_and(|i| i.predecessors_fenced()) {
            return;
        }
        self.fence_recorded = true;
        let mut recorded = self.recorded_clients();
        clients::mark_fenced(&mut recorded, &self.to_fence(), clients::now());
        self.write_clients(&recorded);
        debug!("the previous backends' clients are recorded as fenced");
    }

    /// Records a re-open's new client after the ones in the state directory: if this process
    /// dies, the next instance fences both it and the client it replaced (which may still
    /// have had requests in flight).
    fn add_client(&mut self, image: &Image) {
        let Some(me) = image.client() else { return };
        let mut recorded = self.recorded_clients();
        recorded.push(clients::Recorded::new(&me));
        self.own_clients.push(me.gid);
        self.write_clients(&recorded);
    }

    /// Marks this instance's clients as gone cleanly: stopped on purpose with nothing in
    /// flight and every image closed, so the next instance need not fence them. Its
    /// predecessors keep their marks (one this instance never managed to fence is fenced by
    /// the next).
    fn client_left_cleanly(&self) {
        if self.state.is_none() || self.own_clients.is_empty() {
            return;
        }
        let mut recorded = self.recorded_clients();
        clients::mark_gone(&mut recorded, &self.own_clients);
        self.write_clients(&recorded);
    }

    /// What previous instances recorded about their clients: the identities the image open
    /// must fence (all but those gone cleanly or fenced recently) and whose lock it may break
    /// at once. Returns the records, for [`Vbd::remember_client`].
    fn fence_predecessor(&self, spec: &mut ImageSpec) -> Vec<clients::Recorded> {
        let recorded = self.recorded_clients();
        let now = clients::now();
        spec.predecessors = recorded.iter().map(|r| r.identity(now)).collect();
        spec.fence_predecessors = spec.predecessors.iter().any(|p| !p.fenced);
        let names: Vec<&str> = spec.predecessors.iter().map(|p| p.addr.as_str()).collect();
        info!(previous = ?names, fence = spec.fence_predecessors, "resuming after a previous backend");
        recorded
    }

    /// Deletes the VBD's state directory (the device is gone for good).
    fn forget_state(&self) {
        if let Some(dir) = &self.state {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    fn backend_state(&self) -> XenbusState {
        match self.xs.read(&format!("{}/state", self.be)) {
            Ok(Some(s)) => XenbusState::parse(&s),
            _ => XenbusState::Unknown,
        }
    }

    fn frontend_state(&self) -> XenbusState {
        match self.xs.read(&format!("{}/state", self.fe)) {
            Ok(Some(s)) => XenbusState::parse(&s),
            _ => XenbusState::Unknown,
        }
    }

    /// `online` as the toolstack sets it; a vanished backend directory counts as offline.
    fn online(&self) -> Result<bool, XsError> {
        match self.xs.read(&format!("{}/online", self.be))? {
            Some(v) => Ok(v.trim() != "0"),
            None => Ok(self.xs.read(&format!("{}/frontend", self.be))?.is_some()),
        }
    }

    fn check_resize(&mut self) {
        let Some(image) = &self.image else { return };
        match image.refresh_size() {
            Ok(Some(bytes)) => {
                let sectors = bytes / 512;
                info!(sectors, "image resized");
                self.capacity.store(sectors, Ordering::Relaxed);
                if self.conn.is_some() {
                    // blkback's xen_update_blkif_size: rewrite sectors, then state, so the
                    // frontend's watch on state fires and it re-reads the size.
                    let be = self.be.clone();
                    let state = self.hs.state();
                    let r = self.xs.transaction(|tx| {
                        tx.write(&format!("{be}/sectors"), &sectors.to_string())?;
                        tx.write(&format!("{be}/state"), &state.to_string())?;
                        Ok(())
                    });
                    if let Err(e) = r {
                        warn!(error = %e, "cannot publish the new size");
                    }
                }
            }
            Ok(None) => {}
            Err(e) => debug!(error = %chain(&e), "size refresh failed"),
        }
    }
}

/// How a new backend finds a VBD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takeover {
    /// Not handshaken yet (or only probed): probe.
    Fresh,
    /// A previous instance of the backend connected it: resume its rings from the journals.
    Resume,
    /// A previous instance closed it (Closing/Closed): go on from there.
    Adopt(XenbusState),
}

/// The clients of the instances that served a VBD, kept in its state directory (format:
/// [`clients`]).
const CLIENT_FILE: &str = "client";

/// Re-opening the image with a new client while the guest keeps its disk.
impl<P: Platform> Vbd<P> {
    /// Reports a client the cluster fenced, honours `<backend>/reopen`, and closes replaced
    /// images once their queues let go. `Some` when the process stopped while re-opening.
    fn check_reopen(
        &mut self,
        opener: &Arc<dyn ImageOpener>,
        stop: &Receiver<()>,
    ) -> Option<VbdEnd> {
        let node = format!("{}/reopen", self.be);
        if let Some(why) = self.image.as_ref().and_then(|i| i.unusable()) {
            if !self.unusable_reported {
                self.unusable_reported = true;
                self.report(&VbdError::Unusable {
                    why,
                    node: node.clone(),
                });
            }
        }
        if matches!(self.xs.read(&node), Ok(Some(_))) {
            match self.xs.rm(&node) {
                // a node that stays would ask for a re-open at every pass: none without removing it
                Err(e) => {
                    if !self.reopen_refused {
                        self.reopen_refused = true;
                        warn!(error = %e, node, "cannot remove the reopen node: not re-opening");
                    }
                }
                Ok(()) => {
                    if let Some(end) = self.reopen(opener, stop) {
                        return Some(end);
                    }
                }
            }
        }
        self.close_retired();
        None
    }

    /// Opens the image again with a new client and hands every queue an engine queue on it;
    /// requests in flight finish on the old client, none is lost or answered twice.
    fn reopen(&mut self, opener: &Arc<dyn ImageOpener>, stop: &Receiver<()>) -> Option<VbdEnd> {
        let (Some(mut spec), true) = (self.ispec.clone(), self.image.is_some()) else {
            warn!("reopen asked for, but no image is open: nothing to re-open");
            return None;
        };
        // the one being replaced is ours, alive until its requests are back: never broken,
        // never fenced here; the previous instances' clients are fenced by the new client
        // too unless the first one already did
        if self.image.as_ref().is_some_and(|i| i.predecessors_fenced()) {
            for p in &mut spec.predecessors {
                p.fenced = true;
            }
            spec.fence_predecessors = false;
        }
        info!(image = %spec, "re-opening the image with a new client");
        let t0 = Instant::now();
        let image = match self.open_watched(opener, &spec, stop) {
            Opening::Done(Ok(i)) => i,
            Opening::Done(Err(e)) => {
                self.report(&VbdError::Reopen(e));
                return None;
            }
            Opening::Stopped => return Some(VbdEnd::Stopped),
            // the removal runs its handshake with the image still open
            Opening::Removed => return None,
        };
        if let Some(c) = &self.conn {
            for q in &c.queues {
                match image.queue() {
                    Ok(eq) => q.swap_engine(eq),
                    Err(e) => {
                        // a queue that keeps the old client fails as before; say so
                        self.report(&VbdError::Reopen(e));
                    }
                }
            }
        }
        self.status.opened(&image);
        self.status.set_last_error(None);
        self.ispec = Some(spec);
        self.add_client(&image);
        self.fence_recorded = self.to_fence().is_empty() || image.predecessors_fenced();
        if let Some(old) = self.image.replace(image) {
            self.retired.push(old);
        }
        self.unusable_reported = false;
        if let Err(e) = self.xs.rm(&self.id.error_path()) {
            debug!(error = %e, "cannot remove the error node");
        }
        info!(
            secs = t0.elapsed().as_secs_f64(),
            "image re-opened with a new client"
        );
        None
    }

    /// Closes replaced images nothing uses any more, on a helper thread (closing waits for
    /// the cluster, at most the image's close_wait).
    fn close_retired(&mut self) {
        let (idle, busy): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|i| Arc::strong_count(i) == 1);
        self.retired = busy;
        for img in idle {
            let spawned = std::thread::Builder::new()
                .name("rbdback-close".into())
                .spawn(move || drop(img));
            if let Err(e) = spawned {
                warn!(error = %e, "cannot start a thread to close a replaced image");
            }
        }
    }
}

/// Serves one VBD until it is removed or `stop` fires. Never panics on bad input.
///
/// A VBD it finds already Connected (a previous `serve` died or handed over) is resumed from
/// the journals in [`Options::state_dir`] without any state change the frontend can see; if
/// that is impossible, every request the journals say the guest waits for is answered with an
/// error and the VBD is closed, once, as Linux blkback closes one. On `stop` the rings are
/// left to the next instance (journals kept, nothing written to xenstore). What it does
/// shows in `status`.
#[allow(clippy::too_many_arguments)]
pub fn run_vbd<P: Platform>(
    platform: Arc<P>,
    gnttab: Arc<P::Gnttab>,
    xs: Arc<Xenstore>,
    opener: Arc<dyn ImageOpener>,
    id: VbdId,
    opts: Options,
    stop: Receiver<()>,
    status: Arc<DiskStatus>,
) -> VbdEnd {
    let span = info_span!("vbd", domid = id.domid, devid = id.devid);
    let _g = span.enter();
    let be = id.backend_path();
    let setup = (|| -> Result<(String, DomId, String, String), VbdError> {
        let fe = node(&xs, &format!("{be}/frontend"))?;
        let fe_domid = node(&xs, &format!("{be}/frontend-id"))?
            .trim()
            .parse::<DomId>()
            .map_err(|_| VbdError::MissingNode(format!("{be}/frontend-id (not a domid)")))?;
        let params = node(&xs, &format!("{be}/params"))?;
        let mode = xs
            .read(&format!("{be}/mode"))?
            .unwrap_or_else(|| "w".into());
        Ok((fe, fe_domid, params, mode))
    })();
    let state = opts
        .state_dir
        .as_ref()
        .map(|d| d.join(format!("{}-{}-{}", id.kind, id.domid, id.devid)));
    let mut vbd = Vbd {
        id: id.clone(),
        be: be.clone(),
        fe: String::new(),
        fe_domid: 0,
        platform,
        gnttab,
        xs: Arc::clone(&xs),
        opts,
        image: None,
        read_only: false,
        cdrom: false,
        discard: true,
        capacity: Arc::new(AtomicU64::new(0)),
        hs: Handshake::new(),
        conn: None,
        state,
        status,
        queue_cfg: QueueConfig::default(),
        stall: StallWatch::default(),
        ispec: None,
        retired: Vec::new(),
        unusable_reported: false,
        reopen_refused: false,
        own_clients: Vec::new(),
        fence_recorded: true,
    };
    let image_node = |v: &str| {
        if let Err(e) = xs.write(&format!("{be}/{IMAGE_NODE}"), v) {
            warn!(error = %e, "cannot write {IMAGE_NODE}");
        }
    };
    let mut usable = false;
    let mut first: Vec<Action> = Vec::new();
    match setup {
        Err(e) => {
            vbd.report(&e);
            image_node("failed");
            first = vbd.hs.connect_failed();
        }
        Ok((fe, fe_domid, params, mode)) => {
            vbd.fe = fe;
            vbd.fe_domid = fe_domid;
            vbd.read_only = !mode.trim().starts_with('w');
            vbd.cdrom = matches!(
                xs.read(&format!("{be}/device-type"))
                    .ok()
                    .flatten()
                    .as_deref(),
                Some("cdrom")
            );
            vbd.discard = !matches!(
                xs.read(&format!("{be}/discard-enable"))
                    .ok()
                    .flatten()
                    .as_deref(),
                Some("0")
            );
            let fe_state = vbd.frontend_state();
            let takeover = match vbd.backend_state() {
                XenbusState::Connected => Takeover::Resume,
                s @ (XenbusState::Closing | XenbusState::Closed) => Takeover::Adopt(s),
                _ => Takeover::Fresh,
            };
            if takeover == Takeover::Fresh {
                // blkback's probe: advertise and wait for the frontend at once, before the
                // disk is known, so the toolstack (libxl waits 10 s for InitWait) goes on to
                // the hotplug script, which waits for the outcome of the open below.
                image_node("opening");
                let acts = vbd.hs.probe(fe_state);
                if let Err(e) = vbd.execute(acts) {
                    warn!(error = %e, "cannot write the probe nodes");
                }
            } else {
                info!(?takeover, frontend = %fe_state, "taking over a VBD a previous backend served");
            }
            let mut recorded = Vec::new();
            let opened = match DiskSpec::parse(&params) {
                Err(e) => Err(VbdError::from(e)),
                Ok(spec) if spec.target.snapshot.is_some() && !vbd.read_only => {
                    Err(VbdError::WritableSnapshot(spec.target.to_string()))
                }
                Ok(spec) => {
                    vbd.queue_cfg = queue_config(&vbd.opts.queue, &spec);
                    let mut ispec = image_spec(&spec, vbd.read_only);
                    vbd.status.set_image(
                        match &ispec.pool {
                            rados::PoolRef::Name(n) => n.clone(),
                            rados::PoolRef::Id(i) => format!("#{i}"),
                        },
                        ispec.to_string(),
                        format!("{:?}", spec.target.engine).to_lowercase(),
                    );
                    if takeover == Takeover::Resume {
                        recorded = vbd.fence_predecessor(&mut ispec);
                    }
                    info!(image = %ispec, engine = ?spec.target.engine, "opening image");
                    vbd.ispec = Some(ispec.clone());
                    match vbd.open_watched(&opener, &ispec, &stop) {
                        Opening::Done(r) => r.map_err(VbdError::Open),
                        Opening::Stopped => return VbdEnd::Stopped,
                        Opening::Removed => {
                            // libxl waits for Closed before it removes the directories
                            let _ = vbd.write("state", &XenbusState::Closed.to_string());
                            let _ = xs.rm(&id.error_path());
                            vbd.forget_state();
                            return VbdEnd::Removed;
                        }
                    }
                }
            };
            match opened {
                Ok(image) => {
                    vbd.status.opened(&image);
                    vbd.status.set_last_error(None);
                    vbd.read_only = vbd.read_only || image.info().read_only;
                    vbd.capacity.store(image.size() / 512, Ordering::Relaxed);
                    vbd.remember_client(&image, recorded);
                    vbd.image = Some(image);
                    usable = true;
                    let _ = xs.rm(&id.error_path());
                    image_node("open");
                }
                Err(e) => {
                    vbd.report(&e);
                    image_node("failed");
                }
            }
            match (takeover, usable) {
                // A disk that cannot be served stays in InitWait: the toolstack waits for
                // InitWait (libxl reads the state when its watch fires and would never see a
                // quick InitWait-then-Closing), then runs the hotplug script, which reports the
                // reason (rbdback-image = failed, the error node) and has libxl remove the
                // device; a frontend that tries to connect meanwhile is closed (below).
                (Takeover::Fresh, _) => {}
                (Takeover::Adopt(s), _) => vbd.hs = Handshake::adopt(s, fe_state),
                (Takeover::Resume, true) => match vbd.resume() {
                    Ok(()) => vbd.hs = Handshake::resumed(fe_state),
                    Err(e) => {
                        vbd.report(&e);
                        vbd.answer_what_we_know();
                        vbd.hs = Handshake::adopt(XenbusState::Connected, fe_state);
                        first = vbd.hs.connect_failed();
                    }
                },
                (Takeover::Resume, false) => {
                    vbd.answer_what_we_know();
                    vbd.hs = Handshake::adopt(XenbusState::Connected, fe_state);
                    first = vbd.hs.connect_failed();
                }
            }
        }
    }
    vbd.status.set_state(vbd.hs.state());
    if let Err(e) = vbd.execute(first) {
        warn!(error = %e, "cannot write the backend state");
    }

    let watch_fe = if vbd.fe.is_empty() {
        None
    } else {
        xs.watch(&format!("{}/state", vbd.fe)).ok()
    };
    let watch_be = xs.watch(&be).ok();
    let mut last_resize = Instant::now();
    let mut last_xs_warn: Option<Instant> = None;
    loop {
        match stop.try_recv() {
            Ok(()) | Err(TryRecvError::Disconnected) => {
                // The process stops (upgrade, restart): the rings stay with the guest, for
                // the next instance to resume. Nothing is written to xenstore.
                let drained = vbd.disconnect(StopMode::Handover);
                // closing the image releases the exclusive lock (bounded by close_wait)
                let last = vbd.image.take().map(|i| Arc::strong_count(&i) == 1);
                if drained && last != Some(false) {
                    vbd.client_left_cleanly();
                }
                return VbdEnd::Stopped;
            }
            Err(TryRecvError::Empty) => {}
        }
        // Wait for any watch (both have eventfds; a short timeout keeps the loop simple and
        // bounds how late a stop or broken-queue signal is seen).
        let mut got = false;
        if let Some(w) = &watch_fe {
            while w.try_recv().is_some() {
                got = true;
            }
        }
        if let Some(w) = &watch_be {
            let wait = if got {
                Duration::ZERO
            } else {
                Duration::from_millis(200)
            };
            if w.recv_timeout(wait).is_some() {
                while w.try_recv().is_some() {}
            }
        } else if !got {
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Some(c) = &vbd.conn {
            if c.queues.iter().any(QueueHandle::is_finished) {
                let e = VbdError::Broken("a queue stopped (see the log)".into());
                vbd.report(&e);
                let acts = vbd.hs.frontend_broken();
                if let Ok(true) = vbd.execute(acts) {
                    return VbdEnd::Removed;
                }
            }
        }
        let online = match vbd.online() {
            Ok(o) => o,
            Err(e) => {
                // the rings go on without xenstore; say so at most every 10 s, and wait
                if last_xs_warn.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10)) {
                    warn!(error = %e, "xenstore read failed");
                    last_xs_warn = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let fe_state = vbd.frontend_state();
        let acts = if online {
            match fe_state {
                _ if usable => vbd.hs.frontend_changed(fe_state, true),
                // a disk that cannot be served only follows the frontend to Closed...
                XenbusState::Closing | XenbusState::Closed | XenbusState::Unknown => {
                    vbd.hs.frontend_changed(fe_state, true)
                }
                // ...and closes (xenbus_dev_fatal) a frontend that tries to connect to it
                XenbusState::Initialised | XenbusState::Connected
                    if vbd.hs.state() == XenbusState::InitWait =>
                {
                    vbd.hs.connect_failed()
                }
                _ => Vec::new(),
            }
        } else {
            let mut a = vbd.hs.offline(fe_state);
            if !a.contains(&Action::Remove) {
                a.extend(vbd.hs.frontend_changed(fe_state, false));
            }
            a
        };
        match vbd.execute(acts) {
            Ok(true) => {
                info!("device removed");
                let _ = xs.rm(&id.error_path());
                return VbdEnd::Removed;
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, "xenstore write failed"),
        }
        if usable && last_resize.elapsed() >= vbd.opts.resize_poll {
            last_resize = Instant::now();
            vbd.check_resize();
        }
        vbd.stall.check(
            &vbd.xs,
            &format!("{be}/stalled"),
            vbd.ispec.as_ref(),
            vbd.image.as_ref(),
        );
        vbd.record_fenced();
        if vbd.check_reopen(&opener, &stop).is_some() {
            // stopped while re-opening: the rings stay with the guest for the next instance,
            // which fences this client (it is not marked as gone cleanly)
            vbd.disconnect(StopMode::Handover);
            return VbdEnd::Stopped;
        }
    }
}
