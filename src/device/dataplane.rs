//! The request engine of one ring queue: ring slots in, engine operations out, responses back.
//!
//! Owns: the in-flight table (guest ids, engine tags, buffers), the bound on in-flight work,
//! barrier ordering, the I/O timeout policy, and the translation of every outcome into exactly
//! one response.
//! Trusts: only what [`crate::ring`] validated; the guest's ids are checked for duplicates here.
//! Must never: block (it is called from the queue's event loop), read shared memory other than
//! through [`BackRing`], or release a buffer before the engine handed it back.
//!
//! It is written against two small seams so it can be tested without Xen or Ceph:
//! [`GrantIo`] moves bytes between guest grants and host buffers (grant copy or persistent
//! mappings), and [`EngineQueue`] is one engine queue (see `crate::rados`).
//!
//! ## Timed-out requests
//! With an `io_timeout` ([`QueueConfig::io_timeout`]), a request still unanswered after that
//! long is answered `BLKIF_RSP_ERROR` ([`Dataplane::expire`]). Its engine operation is not
//! cancelled: a write already sent may still be applied by the OSD whatever the client does
//! (`rados_aio_cancel` only stops librados waiting for it), so the request becomes an *orphan*
//! that keeps its buffer until the engine's completion arrives, which is then dropped without
//! a second answer. Until then every later request that overlaps an orphaned write or discard
//! is held back (and is itself subject to the timeout), so the late write can never land after
//! a newer write to the same sectors, and no read answered after the error sees those sectors
//! change again: they hold the old data or the new, as after any failed write.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, warn};

use super::journal::{Journal, JournalError, RingIdentity};
use super::metrics::{OpClass, QueueMetrics};
use crate::rados::{BlockOp, Completion, SubmitError};
use crate::ring::abi::{PAGE_SIZE, SECTOR_SIZE};
use crate::ring::{
    BackRing, Limits, Parsed, Request, RequestKind, RequestSlot, Response, RingError, Segment,
    Status, Transfer,
};
use crate::shm::SharedMem;

/// A whole page as a span length (4096 fits u16).
const PAGE_SPAN: u16 = 4096;

/// One contiguous piece of a guest page: grant reference, byte offset and length in the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantSpan {
    /// Grant reference.
    pub gref: u32,
    /// Offset in the granted page.
    pub offset: u16,
    /// Length in bytes.
    pub len: u16,
}

/// A grant could not be accessed (revoked, bad reference, wrong permissions).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("grant access failed for gref {gref}: {reason}")]
pub struct GrantFault {
    /// The grant that failed.
    pub gref: u32,
    /// Xen's status or the mapping error, as text.
    pub reason: String,
}

/// Moves bytes between the frontend's granted pages and host buffers.
pub trait GrantIo {
    /// Copies the spans, in order, from guest pages into `dst` (`dst.len()` is their total).
    fn copy_from_guest(&mut self, spans: &[GrantSpan], dst: &mut [u8]) -> Result<(), GrantFault>;
    /// Copies `src` into the spans, in order.
    fn copy_to_guest(&mut self, spans: &[GrantSpan], src: &[u8]) -> Result<(), GrantFault>;
}

/// One engine queue, as seen by the dataplane: [`crate::rados::Queue`] in production, a fake
/// in unit tests.
pub trait EngineQueue {
    /// Starts `op`; on refusal the operation (and its buffer) comes back with the reason.
    fn submit(&mut self, tag: u64, op: BlockOp) -> Result<(), SubmitError>;
    /// Moves finished operations into `out` without blocking.
    fn reap(&mut self, out: &mut Vec<Completion>);
}

impl EngineQueue for crate::rados::Queue {
    fn submit(&mut self, tag: u64, op: BlockOp) -> Result<(), SubmitError> {
        crate::rados::Queue::submit(self, tag, op)
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        crate::rados::Queue::reap(self, out);
    }
}

/// Why the queue must stop (the VBD is then closed with this reason).
#[derive(Debug, Error)]
pub enum DataplaneError {
    /// The frontend broke the ring protocol.
    #[error("frontend broke the ring protocol")]
    Ring(#[from] RingError),
}

/// Device-level reasons a request fails after it was validated; one place maps them to a
/// status ([`Failure::status`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Failure {
    /// The id is already in flight on this ring (a protocol error, never a reuse).
    #[error("request id {0:#x} is already in flight")]
    DuplicateId(u64),
    /// A data or indirect-descriptor grant could not be accessed.
    #[error(transparent)]
    Grant(#[from] GrantFault),
    /// The storage engine failed the operation.
    #[error("storage engine: {0}")]
    Engine(String),
    /// The backend gave the ring up (closed the VBD) before the request completed.
    #[error("the backend gave the ring up before the request completed")]
    Abandoned,
}

/// What taking over a ring from a journal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// Requests issued again.
    pub reissued: usize,
    /// Responses written again (not published before).
    pub rewritten: usize,
    /// The previous instance stopped on purpose with nothing in flight.
    pub clean: bool,
}

/// Why a ring could not be taken over.
#[derive(Debug, Error)]
pub enum ResumeError {
    /// The journal is missing, another ring's, or inconsistent.
    #[error("no usable journal")]
    Journal(#[from] JournalError),
    /// The ring's indices or memory do not fit the journal.
    #[error("the ring does not fit its journal")]
    Ring(#[from] RingError),
}

/// A request's journal entry, if the queue keeps a journal.
type Entry = Option<u16>;

impl Failure {
    /// The response status for this failure.
    pub fn status(&self) -> Status {
        Status::Error
    }
}

/// Tunables of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// At most this many bytes of guest data buffered in flight (reads and writes).
    pub max_inflight_bytes: usize,
    /// Answer a request still unanswered after this long with `BLKIF_RSP_ERROR` (`None`:
    /// wait for ever, like krbd with `osd_request_timeout=0`).
    pub io_timeout: Option<Duration>,
    /// Requests waiting longer than this are reported (log and xenstore, by the VBD).
    pub stall_warn: Duration,
}

/// The default `stall_warn`.
pub const DEFAULT_STALL_WARN: Duration = Duration::from_secs(30);

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_inflight_bytes: 64 << 20,
            io_timeout: None,
            stall_warn: DEFAULT_STALL_WARN,
        }
    }
}

/// Counters for operators (exported through logs and the demo).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Requests answered with `BLKIF_RSP_OKAY`.
    pub ok: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Requests answered with `BLKIF_RSP_EOPNOTSUPP`.
    pub unsupported: u64,
    /// Bytes read for the guest.
    pub read_bytes: u64,
    /// Bytes written for the guest.
    pub written_bytes: u64,
    /// Notifications the frontend asked for.
    pub notifications: u64,
    /// Requests answered with an error because they outlived `io_timeout`.
    pub timeouts: u64,
}

#[derive(Debug)]
enum Next {
    /// Respond when this operation completes (and, for reads, scatter the data).
    Respond,
    /// After this write completes, flush, then respond.
    FlushThenRespond,
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    operation: u8,
    /// For reads: where the data goes.
    read_spans: Option<Vec<GrantSpan>>,
    next: Next,
    bytes: usize,
    /// When the request was taken from the ring.
    taken: Instant,
    /// What it touches.
    extent: Extent,
    /// Its journal entry.
    entry: Entry,
    /// What the request counts as, and when it was started (metrics).
    class: OpClass,
    started: Instant,
    /// Bytes the request moves for the guest (counted when it succeeds).
    data: u64,
}

/// The bytes a request touches, and whether it changes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    offset: u64,
    len: u64,
    modifies: bool,
}

impl Extent {
    fn of(req: &Request) -> Extent {
        let t = |t: &Transfer, modifies| Extent {
            offset: t.offset_bytes(),
            len: t.total_bytes(),
            modifies,
        };
        match &req.kind {
            RequestKind::Read(tr) => t(tr, false),
            RequestKind::Write(tr) => t(tr, true),
            RequestKind::Flush(tr) | RequestKind::Barrier(tr) => tr.as_ref().map_or(
                Extent {
                    offset: 0,
                    len: 0,
                    modifies: false,
                },
                |tr| t(tr, true),
            ),
            RequestKind::Discard(d) => Extent {
                offset: d.sector.saturating_mul(SECTOR_SIZE),
                len: d.nr_sectors.saturating_mul(SECTOR_SIZE),
                modifies: true,
            },
        }
    }

    fn overlaps(&self, o: &Extent) -> bool {
        self.len > 0
            && o.len > 0
            && self.offset < o.offset.saturating_add(o.len)
            && o.offset < self.offset.saturating_add(self.len)
    }
}

/// A request taken from the ring and not started yet (behind a barrier, or overlapping an
/// orphaned write).
#[derive(Debug)]
struct Waiting {
    req: Request,
    taken: Instant,
    entry: Entry,
}

/// A request answered after `io_timeout` whose engine operation is still out: its buffer
/// belongs to the engine until the completion comes back.
#[derive(Debug)]
struct Orphan {
    extent: Extent,
    bytes: usize,
    taken: Instant,
}

impl Orphan {
    /// What is kept of a request given up while its engine operation still runs.
    fn of(e: &InFlight) -> Orphan {
        Orphan {
            extent: e.extent,
            bytes: e.bytes,
            taken: e.taken,
        }
    }
}

/// What one [`Dataplane::expire`] pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Requests answered with an error.
    pub answered: usize,
    /// The frontend asked to be notified of the published responses.
    pub notify: bool,
}

/// Requests waiting long, for stall reports ([`Dataplane::stall`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// Requests (answered after a timeout or not) whose engine operations have waited longer
    /// than `stall_warn`, or that wait behind them.
    pub stalled: usize,
    /// How long the oldest of all waiting requests has waited.
    pub oldest: Option<Duration>,
    /// Byte offset of that request (to find the OSD it waits on).
    pub oldest_offset: u64,
}

/// How often engine failures are logged at most (the first at once).
pub const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Engine failures come from the cluster, not the guest: the operator sees them, the first at
/// once and then one line per [`ERROR_LOG_EVERY`] saying how many followed, never one line per
/// request.
#[derive(Debug, Default)]
struct ErrorLog {
    quiet_until: Option<Instant>,
    unlogged: u64,
}

impl ErrorLog {
    fn note(&mut self, e: &str) {
        let now = Instant::now();
        if self.quiet_until.is_some_and(|t| now < t) {
            self.unlogged += 1;
            return;
        }
        if self.unlogged > 0 {
            warn!(
                failed = self.unlogged + 1,
                "requests failed by the storage engine since the last report, the latest: {e}"
            );
        } else {
            warn!("request failed by the storage engine: {e}");
        }
        self.unlogged = 0;
        self.quiet_until = Some(now + ERROR_LOG_EVERY);
    }
}

/// What one service pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Serviced {
    /// The frontend asked to be notified of the published responses.
    pub notify: bool,
    /// Work may remain (requests left unconsumed because of the in-flight bound).
    pub throttled: bool,
    /// Requests taken from the ring.
    pub taken: usize,
}

/// The backend state of one ring queue.
#[derive(Debug)]
pub struct Dataplane {
    ring: BackRing,
    limits: Limits,
    config: QueueConfig,
    inflight: HashMap<u64, InFlight>,
    ids: HashSet<u64>,
    next_tag: u64,
    inflight_bytes: usize,
    /// Requests held back behind a barrier until everything before it completed.
    deferred: VecDeque<Waiting>,
    /// Requests held back because they overlap an orphaned write or discard.
    held: VecDeque<Waiting>,
    /// Requests answered after `io_timeout` whose engine operations are still out, by tag.
    orphans: HashMap<u64, Orphan>,
    /// Since when the byte budget has kept requests in the ring.
    throttled_since: Option<Instant>,
    /// Requests a previous instance took and did not answer, to issue again first.
    reissue: VecDeque<(RequestSlot, Entry)>,
    journal: Option<Journal>,
    /// The next publish notifies the frontend whatever `rsp_event` says (a resumed ring:
    /// notifications sent while no backend listened were lost).
    force_notify: bool,
    slots: Vec<RequestSlot>,
    entries: Vec<Entry>,
    done: Vec<Completion>,
    pool: Vec<Vec<u8>>,
    stats: Stats,
    engine_errors: ErrorLog,
    metrics: Arc<QueueMetrics>,
}

/// The spans of a transfer, in disk order.
fn spans(t: &Transfer) -> Vec<GrantSpan> {
    t.segments
        .iter()
        .map(|s: &Segment| GrantSpan {
            gref: s.gref,
            offset: u16::try_from(s.offset_bytes()).unwrap_or(0),
            len: u16::try_from(s.len_bytes()).unwrap_or(0),
        })
        .collect()
}

impl Dataplane {
    /// A queue over a ring of `ring`'s geometry, validating against `limits`.
    pub fn new(ring: BackRing, limits: Limits, config: QueueConfig) -> Dataplane {
        Dataplane {
            ring,
            limits,
            config,
            inflight: HashMap::new(),
            ids: HashSet::new(),
            next_tag: 1,
            inflight_bytes: 0,
            deferred: VecDeque::new(),
            held: VecDeque::new(),
            orphans: HashMap::new(),
            throttled_since: None,
            reissue: VecDeque::new(),
            journal: None,
            force_notify: false,
            slots: Vec::new(),
            entries: Vec::new(),
            done: Vec::new(),
            pool: Vec::new(),
            stats: Stats::default(),
            engine_errors: ErrorLog::default(),
            metrics: Arc::new(QueueMetrics::default()),
        }
    }

    /// Counts into `metrics` (a VBD keeps one per queue across reconnects) from now on.
    pub fn with_metrics(mut self, metrics: Arc<QueueMetrics>) -> Dataplane {
        metrics.set_ring_capacity(self.ring.capacity());
        self.metrics = metrics;
        self
    }

    /// The counters this queue reports to.
    pub fn metrics(&self) -> &Arc<QueueMetrics> {
        &self.metrics
    }

    /// Keeps a crash-recovery journal of this (freshly connected) ring from now on.
    pub fn with_journal(mut self, journal: Journal) -> Dataplane {
        self.journal = Some(journal);
        self
    }

    /// Takes over a ring a previous instance of the backend served, from its journal at
    /// `path`: restores the indices, writes back the responses it wrote and did not publish
    /// (published, with a notification, by the next [`Self::service`]), and queues the
    /// requests it took and did not answer to be issued again, first.
    pub fn resume(
        ring: (crate::ring::Abi, u8),
        limits: Limits,
        config: QueueConfig,
        path: &std::path::Path,
        id: &RingIdentity,
        mem: &SharedMem<'_>,
    ) -> Result<(Dataplane, Resumed), ResumeError> {
        let (abi, order) = ring;
        let fresh = BackRing::new(abi, order)?;
        let shared_rsp_prod = fresh.shared_rsp_prod(mem)?;
        let (journal, rec) = Journal::recover(path, id, fresh.capacity(), shared_rsp_prod)?;
        let back = BackRing::resumed(abi, order, rec.req_cons, rec.rsp_prod_pvt, rec.published)?;
        for w in &rec.unpublished {
            back.rewrite_response(mem, w.pos, &w.response)?;
        }
        let info = Resumed {
            reissued: rec.unanswered.len(),
            rewritten: rec.unpublished.len(),
            clean: rec.clean,
        };
        let mut dp = Dataplane::new(back, limits, config);
        dp.reissue = rec
            .unanswered
            .into_iter()
            .map(|u| (u.slot, Some(u.entry)))
            .collect();
        dp.journal = Some(journal);
        dp.force_notify = true;
        Ok((dp, info))
    }

    /// The journal, if the queue keeps one.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Gives up the journal (the ring is gone for good, or the caller discards it).
    pub fn take_journal(&mut self) -> Option<Journal> {
        self.journal.take()
    }

    /// The ring is being given up for good while the guest may still wait on it: answers
    /// every request taken and not answered with `BLKIF_RSP_ERROR` -- so the guest fails them
    /// instead of waiting forever -- and publishes. Engine operations still running keep
    /// their buffers (as orphans); their completions are then only reaped. Says whether to
    /// notify.
    pub fn abandon(&mut self, mem: &SharedMem<'_>) -> Result<bool, RingError> {
        let why = Failure::Abandoned;
        let mut pending: Vec<(u64, u8, Entry)> = Vec::new();
        for (tag, e) in std::mem::take(&mut self.inflight) {
            pending.push((e.id, e.operation, e.entry));
            self.orphans.insert(tag, Orphan::of(&e));
        }
        for w in self.deferred.drain(..).chain(self.held.drain(..)) {
            pending.push((w.req.id, w.req.operation, w.entry));
        }
        for (slot, e) in self.reissue.drain(..) {
            pending.push((slot.id(), slot.operation(), e));
        }
        for (id, operation, e) in pending {
            self.ids.remove(&id);
            self.fail(mem, id, operation, &why, e)?;
        }
        self.publish(mem)
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Requests taken from the ring and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.inflight.len() + self.deferred.len() + self.held.len() + self.reissue.len()
    }

    /// The ring's indices (for resuming or diagnostics).
    pub fn ring(&self) -> &BackRing {
        &self.ring
    }

    /// Updates the disk size (online resize); later requests are checked against it.
    pub fn set_capacity(&mut self, sectors: u64) {
        self.limits.capacity_sectors = sectors;
    }

    fn buffer(&mut self, len: usize) -> Vec<u8> {
        match self.pool.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.pool.swap_remove(i);
                b.clear();
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < 64 && buf.capacity() <= (1 << 20) + PAGE_SIZE {
            self.pool.push(buf);
        }
    }

    fn respond(
        &mut self,
        mem: &SharedMem<'_>,
        id: u64,
        operation: u8,
        status: Status,
        entry: Entry,
    ) -> Result<(), RingError> {
        match status {
            Status::Okay => self.stats.ok += 1,
            Status::NotSupported => {
                self.stats.unsupported += 1;
                self.metrics.unsupported();
            }
            _ => {
                self.stats.errors += 1;
                self.metrics.error();
            }
        }
        let rsp = Response {
            id,
            operation,
            status,
        };
        // journal first: the response may overwrite the slot of a request still in flight
        if let (Some(j), Some(e)) = (self.journal.as_mut(), entry) {
            j.answer(e, self.ring.rsp_prod_pvt(), &rsp);
        }
        self.ring.push_response(mem, &rsp)?;
        crate::device::crashpoint::hit("pushed");
        if let Some(j) = &self.journal {
            j.set_rsp_prod_pvt(self.ring.rsp_prod_pvt());
        }
        Ok(())
    }

    fn fail(
        &mut self,
        mem: &SharedMem<'_>,
        id: u64,
        operation: u8,
        why: &Failure,
        entry: Entry,
    ) -> Result<(), RingError> {
        debug!(id, operation, error = %why, "request failed");
        if let Failure::Engine(e) = why {
            self.engine_errors.note(e);
        }
        self.respond(mem, id, operation, why.status(), entry)
    }

    /// Publishes the responses written so far (and records it in the journal); says whether
    /// to notify the frontend.
    fn publish(&mut self, mem: &SharedMem<'_>) -> Result<bool, RingError> {
        let notify = self.ring.publish_responses(mem)? || self.force_notify;
        crate::device::crashpoint::hit("published");
        self.force_notify = false;
        if let Some(j) = self.journal.as_mut() {
            j.published(self.ring.rsp_prod_published());
        }
        if notify {
            self.stats.notifications += 1;
        }
        Ok(notify)
    }

    fn submit(
        &mut self,
        mem: &SharedMem<'_>,
        engine: &mut impl EngineQueue,
        entry: InFlight,
        op: BlockOp,
    ) -> Result<(), RingError> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let (id, operation, bytes, jentry) = (entry.id, entry.operation, entry.bytes, entry.entry);
        let (class, started) = (entry.class, entry.started);
        let flush = matches!(op, BlockOp::Flush);
        match engine.submit(tag, op) {
            Ok(()) => {
                self.inflight_bytes += bytes;
                self.inflight.insert(tag, entry);
                if flush {
                    crate::device::crashpoint::hit("flush");
                }
                Ok(())
            }
            Err(e) => {
                if let BlockOp::Read { buf, .. } | BlockOp::Write { buf, .. } = e.op {
                    self.recycle(buf);
                }
                self.ids.remove(&id);
                self.metrics.answered(class, 0, started.elapsed());
                let why = Failure::Engine(e.error.to_string());
                self.fail(mem, id, operation, &why, jentry)
            }
        }
    }

    /// Starts a validated request (its id is already registered in `ids`), unless it
    /// overlaps an orphaned write: then it waits in `held`.
    fn start(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
        req: Request,
        taken: Instant,
        jentry: Entry,
    ) -> Result<(), RingError> {
        let extent = Extent::of(&req);
        if self
            .orphans
            .values()
            .any(|o| o.extent.modifies && o.extent.overlaps(&extent))
        {
            debug!(
                id = req.id,
                "held back behind a timed-out write to the same sectors"
            );
            self.held.push_back(Waiting {
                req,
                taken,
                entry: jentry,
            });
            return Ok(());
        }
        let (id, operation) = (req.id, req.operation);
        let started = Instant::now();
        let (write, then_flush, transfer) = match req.kind {
            RequestKind::Read(t) => (false, false, Some(t)),
            RequestKind::Write(t) => (true, false, Some(t)),
            RequestKind::Flush(t) | RequestKind::Barrier(t) => (true, true, t),
            RequestKind::Discard(d) => {
                let entry = InFlight {
                    id,
                    operation,
                    read_spans: None,
                    next: Next::Respond,
                    bytes: 0,
                    taken,
                    extent,
                    entry: jentry,
                    class: OpClass::Discard,
                    started,
                    data: d.nr_sectors.saturating_mul(SECTOR_SIZE),
                };
                let op = BlockOp::Discard {
                    offset: d.sector.saturating_mul(SECTOR_SIZE),
                    len: d.nr_sectors.saturating_mul(SECTOR_SIZE),
                };
                return self.submit(mem, engine, entry, op);
            }
        };
        let Some(t) = transfer else {
            // A flush or barrier with no data: just the flush.
            let entry = InFlight {
                id,
                operation,
                read_spans: None,
                next: Next::Respond,
                bytes: 0,
                taken,
                extent,
                entry: jentry,
                class: OpClass::Flush,
                started,
                data: 0,
            };
            return self.submit(mem, engine, entry, BlockOp::Flush);
        };
        let offset = t.offset_bytes();
        let len = usize::try_from(t.total_bytes()).unwrap_or(usize::MAX);
        let spans = spans(&t);
        let mut buf = self.buffer(len);
        let class = match (write, then_flush) {
            (false, _) => OpClass::Read,
            (true, false) => OpClass::Write,
            (true, true) => OpClass::Flush,
        };
        if write {
            if let Err(fault) = grants.copy_from_guest(&spans, &mut buf) {
                self.recycle(buf);
                self.ids.remove(&id);
                self.metrics.answered(class, 0, started.elapsed());
                return self.fail(mem, id, operation, &Failure::Grant(fault), jentry);
            }
            self.stats.written_bytes += t.total_bytes();
            let entry = InFlight {
                id,
                operation,
                read_spans: None,
                next: if then_flush {
                    Next::FlushThenRespond
                } else {
                    Next::Respond
                },
                bytes: len,
                taken,
                extent,
                entry: jentry,
                class,
                started,
                data: t.total_bytes(),
            };
            self.submit(mem, engine, entry, BlockOp::Write { offset, buf })
        } else {
            let entry = InFlight {
                id,
                operation,
                read_spans: Some(spans),
                next: Next::Respond,
                bytes: len,
                taken,
                extent,
                entry: jentry,
                class,
                started,
                data: t.total_bytes(),
            };
            self.submit(mem, engine, entry, BlockOp::Read { offset, buf })
        }
    }

    fn complete(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
        done: Completion,
    ) -> Result<(), RingError> {
        let Some(entry) = self.inflight.remove(&done.tag) else {
            if let Some(o) = self.orphans.remove(&done.tag) {
                // answered when it timed out: the buffer is ours again, nothing to answer
                debug!(tag = done.tag, waited = ?o.taken.elapsed(), "timed-out request completed late");
                self.inflight_bytes = self.inflight_bytes.saturating_sub(o.bytes);
                if let Some(buf) = done.buf {
                    self.recycle(buf);
                }
                return self.release_held(mem, grants, engine);
            }
            // Not ours (cannot happen with a faithful engine): never answer twice.
            debug!(tag = done.tag, "completion for an unknown tag ignored");
            return Ok(());
        };
        self.inflight_bytes = self.inflight_bytes.saturating_sub(entry.bytes);
        let (id, operation, jentry) = (entry.id, entry.operation, entry.entry);
        let (class, started, data) = (entry.class, entry.started, entry.data);
        let outcome = match done.result {
            Err(e) => Err(Failure::Engine(e.to_string())),
            Ok(()) => match (&entry.read_spans, &done.buf) {
                (Some(spans), Some(buf)) => match grants.copy_to_guest(spans, buf) {
                    Ok(()) => {
                        self.stats.read_bytes += buf.len() as u64;
                        Ok(())
                    }
                    Err(f) => Err(Failure::Grant(f)),
                },
                _ => Ok(()),
            },
        };
        if let Some(buf) = done.buf {
            self.recycle(buf);
        }
        match (outcome, entry.next) {
            (Ok(()), Next::FlushThenRespond) => {
                let entry = InFlight {
                    id,
                    operation,
                    read_spans: None,
                    next: Next::Respond,
                    bytes: 0,
                    taken: entry.taken,
                    extent: entry.extent,
                    entry: jentry,
                    class,
                    started,
                    data,
                };
                self.submit(mem, engine, entry, BlockOp::Flush)
            }
            (Ok(()), Next::Respond) => {
                self.ids.remove(&id);
                self.metrics.answered(class, data, started.elapsed());
                self.respond(mem, id, operation, Status::Okay, jentry)
            }
            (Err(f), _) => {
                self.ids.remove(&id);
                self.metrics.answered(class, 0, started.elapsed());
                self.fail(mem, id, operation, &f, jentry)
            }
        }
    }

    /// Validates one slot into a request, fetching indirect descriptor pages if needed.
    fn admit(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        slot: &RequestSlot,
        jentry: Entry,
    ) -> Result<Option<Request>, RingError> {
        let parsed = match slot.parse(&self.limits) {
            Ok(p) => p,
            Err(rej) => {
                debug!(id = rej.id, error = %rej.error, "request rejected");
                let rsp = rej.response();
                self.respond(mem, rsp.id, rsp.operation, rsp.status, jentry)?;
                return Ok(None);
            }
        };
        let req = match parsed {
            Parsed::Ready(r) => r,
            Parsed::NeedsIndirectPages(ind) => {
                let grefs = ind.page_grefs().to_vec();
                let mut pages = vec![0u8; grefs.len() * PAGE_SIZE];
                let spans: Vec<GrantSpan> = grefs
                    .iter()
                    .map(|&gref| GrantSpan {
                        gref,
                        offset: 0,
                        len: PAGE_SPAN,
                    })
                    .collect();
                if let Err(f) = grants.copy_from_guest(&spans, &mut pages) {
                    self.fail(mem, ind.id, ind.operation, &Failure::Grant(f), jentry)?;
                    return Ok(None);
                }
                let views: Vec<&[u8]> = pages.chunks(PAGE_SIZE).collect();
                match ind.complete(&views, &self.limits) {
                    Ok(r) => r,
                    Err(rej) => {
                        debug!(id = rej.id, error = %rej.error, "indirect request rejected");
                        let rsp = rej.response();
                        self.respond(mem, rsp.id, rsp.operation, rsp.status, jentry)?;
                        return Ok(None);
                    }
                }
            }
        };
        if matches!(slot.operation(), crate::ring::request::op::INDIRECT) {
            crate::device::crashpoint::hit("indirect");
        }
        if !self.ids.insert(req.id) {
            let why = Failure::DuplicateId(req.id);
            self.fail(mem, req.id, req.operation, &why, jentry)?;
            return Ok(None);
        }
        Ok(Some(req))
    }

    /// Admits and starts (or defers behind a barrier) one slot taken from the ring at `now`.
    fn dispatch(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
        slot: &RequestSlot,
        jentry: Entry,
        now: Instant,
    ) -> Result<(), RingError> {
        let Some(req) = self.admit(mem, grants, slot, jentry)? else {
            return Ok(());
        };
        let barrier = matches!(req.kind, RequestKind::Barrier(_));
        if barrier || !self.deferred.is_empty() {
            self.deferred.push_back(Waiting {
                req,
                taken: now,
                entry: jentry,
            });
            self.run_deferred(mem, grants, engine)
        } else {
            self.start(mem, grants, engine, req, now, jentry)
        }
    }

    fn run_deferred(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
    ) -> Result<(), RingError> {
        while let Some(front) = self.deferred.front() {
            let is_barrier = matches!(front.req.kind, RequestKind::Barrier(_));
            if is_barrier && !(self.inflight.is_empty() && self.held.is_empty()) {
                // blkif.h: a barrier waits for all earlier requests to complete.
                break;
            }
            if let Some(w) = self.deferred.pop_front() {
                self.start(mem, grants, engine, w.req, w.taken, w.entry)?;
            }
            if is_barrier {
                // And everything after it waits for the barrier itself.
                break;
            }
        }
        Ok(())
    }

    /// One pass: consume completions, take and start new requests (bounded by one ring's
    /// worth and by the in-flight byte budget), publish responses.
    pub fn service(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
    ) -> Result<Serviced, DataplaneError> {
        self.finish_completed(mem, grants, engine)?;
        // A resumed ring: what the previous instance took and did not answer goes first, in
        // ring order, through the same validation.
        while let Some((slot, jentry)) = self.reissue.pop_front() {
            self.dispatch(mem, grants, engine, &slot, jentry, Instant::now())?;
        }

        // Take requests a few at a time so the byte budget is honoured between batches, and
        // never more than one ring's worth per pass.
        let mut throttled = false;
        let mut notify = false;
        let mut total = 0;
        let mut budget = usize::try_from(self.ring.capacity()).unwrap_or(usize::MAX);
        let mut slots = std::mem::take(&mut self.slots);
        let mut entries = std::mem::take(&mut self.entries);
        while budget > 0 {
            if self.inflight_bytes >= self.config.max_inflight_bytes {
                throttled = true;
                break;
            }
            let mut limit = budget.min(16);
            if let Some(free) = self.journal.as_ref().map(Journal::free_entries) {
                if free < limit {
                    // entries of written responses come free when they are published
                    notify |= self.publish(mem)?;
                }
                limit = limit.min(self.journal.as_ref().map_or(0, Journal::free_entries));
                if limit == 0 {
                    break;
                }
            }
            let now = Instant::now();
            let taken = self.take(mem, &mut slots, &mut entries, limit)?;
            if taken == 0 {
                break;
            }
            total += taken;
            budget -= taken;
            for (slot, jentry) in slots.iter().zip(entries.iter()) {
                self.dispatch(mem, grants, engine, slot, *jentry, now)?;
            }
        }
        self.slots = slots;
        self.entries = entries;
        if !throttled {
            self.throttled_since = None;
        } else if self.throttled_since.is_none() {
            self.throttled_since = Some(Instant::now());
        }
        notify |= self.publish(mem)?;
        self.metrics
            .set_in_flight(self.in_flight(), self.inflight_bytes);
        Ok(Serviced {
            notify,
            throttled,
            taken: total,
        })
    }

    /// Takes up to `limit` requests from the ring into `slots`, recording each in the
    /// journal (before anything can answer them) with its entry in `entries`.
    fn take(
        &mut self,
        mem: &SharedMem<'_>,
        slots: &mut Vec<RequestSlot>,
        entries: &mut Vec<Entry>,
        limit: usize,
    ) -> Result<usize, RingError> {
        slots.clear();
        entries.clear();
        let first = self.ring.req_cons();
        let taken = self.ring.take_requests(mem, slots, limit)?;
        if let Some(j) = self.journal.as_mut() {
            for (slot, index) in slots.iter().zip(0u32..) {
                entries.push(j.take(first.wrapping_add(index), slot));
                crate::device::crashpoint::hit("take");
            }
            j.set_req_cons(self.ring.req_cons());
        } else {
            entries.resize(slots.len(), None);
        }
        Ok(taken)
    }

    /// While stopping: answer finished engine operations (and start barrier-held requests
    /// already taken) without taking new requests; says whether to notify.
    pub fn drain_completions(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
    ) -> Result<bool, DataplaneError> {
        self.finish_completed(mem, grants, engine)?;
        self.metrics
            .set_in_flight(self.in_flight(), self.inflight_bytes);
        Ok(self.publish(mem)?)
    }

    /// Answers every finished engine operation, then starts requests a barrier was holding
    /// if the barrier's turn has come.
    fn finish_completed(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
    ) -> Result<(), RingError> {
        let mut done = std::mem::take(&mut self.done);
        engine.reap(&mut done);
        for d in done.drain(..) {
            self.complete(mem, grants, engine, d)?;
        }
        self.done = done;
        self.run_deferred(mem, grants, engine)
    }

    /// Before sleeping: whether requests arrived meanwhile (then call [`Self::service`] again).
    pub fn final_check(&mut self, mem: &SharedMem<'_>) -> Result<bool, DataplaneError> {
        Ok(self.ring.final_check_for_requests(mem)?)
    }

    /// Engine operations still running (their buffers are the engine's until they complete),
    /// answered ones (timed out) included.
    pub fn engine_ops(&self) -> usize {
        self.inflight.len() + self.orphans.len()
    }

    /// Whether anything waits (then the queue calls [`Self::expire`] and [`Self::stall`]
    /// periodically).
    pub fn waiting(&self) -> bool {
        self.in_flight() > 0 || !self.orphans.is_empty() || self.throttled_since.is_some()
    }

    /// Starts held-back requests that no longer overlap an orphaned write, in arrival order.
    fn release_held(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
    ) -> Result<(), RingError> {
        for _ in 0..self.held.len() {
            // `start` puts it back at the end if it still overlaps one
            if let Some(w) = self.held.pop_front() {
                self.start(mem, grants, engine, w.req, w.taken, w.entry)?;
            }
        }
        Ok(())
    }

    /// The I/O timeout policy: answers every request taken more than `io_timeout` ago with
    /// `BLKIF_RSP_ERROR` (started ones become orphans that keep their buffers until the
    /// engine completes them); when the byte budget has kept requests in the ring that long,
    /// takes and fails them too (at most one ring's worth). Does nothing without a timeout.
    pub fn expire(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
        now: Instant,
    ) -> Result<Expired, DataplaneError> {
        let Some(limit) = self.config.io_timeout else {
            return Ok(Expired::default());
        };
        let late = |t: Instant| now.saturating_duration_since(t) >= limit;
        let mut named: Vec<(u64, u8, u64)> = Vec::new();
        let tags: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, e)| late(e.taken))
            .map(|(t, _)| *t)
            .collect();
        for tag in tags {
            let Some(e) = self.inflight.remove(&tag) else {
                continue;
            };
            self.orphans.insert(tag, Orphan::of(&e));
            self.ids.remove(&e.id);
            named.push((e.id, e.operation, e.extent.offset));
            self.metrics.answered(e.class, 0, e.started.elapsed());
            self.respond(mem, e.id, e.operation, Status::Error, e.entry)?;
        }
        // held and deferred requests were never started: nothing of theirs is out
        let mut expired = Vec::new();
        for queue in [&mut self.held, &mut self.deferred] {
            let (old, keep): (VecDeque<Waiting>, VecDeque<Waiting>) =
                queue.drain(..).partition(|w| late(w.taken));
            *queue = keep;
            expired.extend(old);
        }
        for w in expired {
            self.ids.remove(&w.req.id);
            named.push((w.req.id, w.req.operation, Extent::of(&w.req).offset));
            self.respond(mem, w.req.id, w.req.operation, Status::Error, w.entry)?;
        }
        let mut answered = named.len();
        if self.throttled_since.is_some_and(late) {
            // the budget is held by operations the cluster does not answer: requests must
            // not wait in the ring unanswered for longer than the timeout either
            let mut slots = std::mem::take(&mut self.slots);
            let mut entries = std::mem::take(&mut self.entries);
            let mut cap = usize::try_from(self.ring.capacity()).unwrap_or(usize::MAX);
            if self.journal.is_some() {
                self.publish(mem)?;
                cap = cap.min(self.journal.as_ref().map_or(0, Journal::free_entries));
            }
            self.take(mem, &mut slots, &mut entries, cap)?;
            for (slot, jentry) in slots.iter().zip(entries.iter()) {
                if let Some(req) = self.admit(mem, grants, slot, *jentry)? {
                    self.ids.remove(&req.id);
                    named.push((req.id, req.operation, Extent::of(&req).offset));
                    self.respond(mem, req.id, req.operation, Status::Error, *jentry)?;
                    answered += 1;
                }
            }
            self.slots = slots;
            self.entries = entries;
            self.throttled_since = Some(now);
        }
        self.stats.timeouts += answered as u64;
        if answered > 0 {
            let list: Vec<String> = named
                .iter()
                .take(8)
                .map(|(id, op, off)| format!("id {id:#x} op {op} at byte {off}"))
                .collect();
            warn!(
                requests = answered,
                timeout_s = limit.as_secs_f64(),
                "requests unanswered by the cluster after io_timeout failed to the guest: {}{}",
                list.join(", "),
                if answered > list.len() { ", ..." } else { "" }
            );
        }
        self.run_deferred(mem, grants, engine)?;
        let notify = self.publish(mem)?;
        Ok(Expired { answered, notify })
    }

    /// Requests waiting longer than `stall_warn`, and the oldest waiting request.
    pub fn stall(&self, now: Instant) -> Stall {
        let warn_after = self.config.stall_warn;
        let ages = self
            .inflight
            .values()
            .map(|e| (e.taken, e.extent.offset))
            .chain(self.orphans.values().map(|o| (o.taken, o.extent.offset)))
            .chain(
                self.held
                    .iter()
                    .chain(&self.deferred)
                    .map(|w| (w.taken, Extent::of(&w.req).offset)),
            )
            .chain(self.throttled_since.map(|t| (t, 0)))
            .map(|(t, off)| (now.saturating_duration_since(t), off));
        let mut out = Stall::default();
        for (age, off) in ages {
            if age >= warn_after {
                out.stalled += 1;
            }
            if out.oldest.is_none_or(|o| age > o) {
                out.oldest = Some(age);
                out.oldest_offset = off;
            }
        }
        out
    }
}

/// Test support: guest pages held in host memory, for unit tests, fuzzing and benches.
#[cfg(any(test, feature = "test-utils"))]
pub mod testing {
    use std::collections::{HashMap, HashSet};

    use super::{GrantFault, GrantIo, GrantSpan};
    use crate::ring::abi::PAGE_SIZE;

    /// Pages by grant reference, created (zeroed) on first use; references of 1000 and above,
    /// and revoked ones, fail like `GNTST_bad_gntref`.
    #[derive(Debug, Default)]
    pub struct MemGrants {
        /// The pages.
        pub pages: HashMap<u32, Vec<u8>>,
        /// Revoked references.
        pub revoked: HashSet<u32>,
    }

    impl MemGrants {
        fn page(&mut self, gref: u32) -> Result<&mut Vec<u8>, GrantFault> {
            if gref >= 1000 || self.revoked.contains(&gref) {
                return Err(GrantFault {
                    gref,
                    reason: "GNTST_bad_gntref".into(),
                });
            }
            Ok(self
                .pages
                .entry(gref)
                .or_insert_with(|| vec![0u8; PAGE_SIZE]))
        }

        fn span<'a>(&'a mut self, s: &GrantSpan) -> Result<&'a mut [u8], GrantFault> {
            let (o, l) = (usize::from(s.offset), usize::from(s.len));
            let gref = s.gref;
            self.page(gref)?.get_mut(o..o + l).ok_or(GrantFault {
                gref,
                reason: "GNTST_bad_copy_arg".into(),
            })
        }
    }

    impl GrantIo for MemGrants {
        fn copy_from_guest(
            &mut self,
            spans: &[GrantSpan],
            dst: &mut [u8],
        ) -> Result<(), GrantFault> {
            let mut rest = dst;
            for s in spans {
                let src = self.span(s)?;
                let (head, tail) = rest.split_at_mut(src.len().min(rest.len()));
                head.copy_from_slice(src.get(..head.len()).unwrap_or(&[]));
                rest = tail;
            }
            Ok(())
        }

        fn copy_to_guest(&mut self, spans: &[GrantSpan], src: &[u8]) -> Result<(), GrantFault> {
            let mut rest = src;
            for s in spans {
                let dst = self.span(s)?;
                let n = dst.len().min(rest.len());
                let (head, tail) = rest.split_at(n);
                if let Some(d) = dst.get_mut(..n) {
                    d.copy_from_slice(head);
                }
                rest = tail;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::testing::MemGrants;
    use super::*;
    use crate::rados::{Errno, RadosError};
    use crate::ring::abi::ring_bytes;
    use crate::ring::front::{indirect_pages, MockFrontend, WireRequest};
    use crate::ring::request::op;
    use crate::ring::Abi;

    /// A RAM disk that completes on reap; `fail_writes` makes writes fail.
    struct FakeEngine {
        disk: Vec<u8>,
        pending: Vec<(u64, BlockOp)>,
        log: Vec<&'static str>,
        fail_writes: bool,
        hold: bool,
        /// Complete (and apply) pending operations newest first, as an OSD applying a
        /// late write after a newer one would.
        lifo: bool,
    }

    impl FakeEngine {
        fn new(bytes: usize) -> Self {
            FakeEngine {
                disk: vec![0; bytes],
                pending: Vec::new(),
                log: Vec::new(),
                fail_writes: false,
                hold: false,
                lifo: false,
            }
        }
    }

    impl EngineQueue for FakeEngine {
        fn submit(&mut self, tag: u64, op: BlockOp) -> Result<(), SubmitError> {
            self.log.push(match op {
                BlockOp::Read { .. } => "read",
                BlockOp::Write { .. } => "write",
                BlockOp::Discard { .. } | BlockOp::WriteZeroes { .. } => "discard",
                BlockOp::Flush => "flush",
            });
            self.pending.push((tag, op));
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            if self.hold {
                return;
            }
            let mut pending = std::mem::take(&mut self.pending);
            if self.lifo {
                pending.reverse();
            }
            for (tag, op) in pending {
                let (result, buf) = match op {
                    BlockOp::Read { offset, mut buf } => {
                        let o = offset as usize;
                        let n = buf.len();
                        buf.copy_from_slice(&self.disk[o..o + n]);
                        (Ok(()), Some(buf))
                    }
                    BlockOp::Write { offset, buf } => {
                        if self.fail_writes {
                            (
                                Err(RadosError::Io {
                                    what: "write",
                                    offset,
                                    errno: Errno(-5),
                                }),
                                Some(buf),
                            )
                        } else {
                            let o = offset as usize;
                            self.disk[o..o + buf.len()].copy_from_slice(&buf);
                            (Ok(()), Some(buf))
                        }
                    }
                    BlockOp::Discard { offset, len } | BlockOp::WriteZeroes { offset, len } => {
                        let o = offset as usize;
                        self.disk[o..o + len as usize].fill(0);
                        (Ok(()), None)
                    }
                    BlockOp::Flush => (Ok(()), None),
                };
                out.push(Completion { tag, result, buf });
            }
        }
    }

    struct Rig {
        mem: Vec<u8>,
        front: MockFrontend,
        dp: Dataplane,
        grants: MemGrants,
        engine: FakeEngine,
    }

    impl Rig {
        fn new(abi: Abi) -> Rig {
            let mut mem = vec![0u8; ring_bytes(0)];
            let mut front = MockFrontend::new(abi, 0).unwrap();
            front
                .init_shared(&SharedMem::from_mut_slice(&mut mem))
                .unwrap();
            let mut limits = Limits::new(2048);
            limits.discard = true;
            let dp = Dataplane::new(
                BackRing::new(abi, 0).unwrap(),
                limits,
                QueueConfig::default(),
            );
            Rig {
                mem,
                front,
                dp,
                grants: MemGrants::default(),
                engine: FakeEngine::new(2048 * 512),
            }
        }

        fn send(&mut self, reqs: &[WireRequest]) -> Vec<Response> {
            let mem = SharedMem::from_mut_slice(&mut self.mem);
            for r in reqs {
                self.front.queue(&mem, r).unwrap();
            }
            self.front.push_requests(&mem).unwrap();
            self.pump()
        }

        fn pump(&mut self) -> Vec<Response> {
            let mem = SharedMem::from_mut_slice(&mut self.mem);
            for _ in 0..8 {
                self.dp
                    .service(&mem, &mut self.grants, &mut self.engine)
                    .unwrap();
            }
            let mut out = Vec::new();
            self.front.take_responses(&mem, &mut out).unwrap();
            out
        }
    }

    fn seg(gref: u32, first: u8, last: u8) -> Segment {
        Segment {
            gref,
            first_sect: first,
            last_sect: last,
        }
    }

    #[test]
    fn write_then_read_moves_data_through_grants() {
        let mut rig = Rig::new(Abi::X86_64);
        rig.grants.pages.insert(1, vec![0xab; PAGE_SIZE]);
        let rsp = rig.send(&[WireRequest::write(7, 16, vec![seg(1, 0, 7)])]);
        assert_eq!(rsp.len(), 1);
        assert_eq!((rsp[0].id, rsp[0].status), (7, Status::Okay));
        assert!(rig.engine.disk[16 * 512..24 * 512]
            .iter()
            .all(|&b| b == 0xab));
        // read sectors 17..=18 into the middle of page 2
        let rsp = rig.send(&[WireRequest::read(8, 17, vec![seg(2, 3, 4)])]);
        assert_eq!((rsp[0].id, rsp[0].status), (8, Status::Okay));
        let page = &rig.grants.pages[&2];
        assert!(page[3 * 512..5 * 512].iter().all(|&b| b == 0xab));
        assert!(page[..3 * 512].iter().all(|&b| b == 0));
        assert!(page[5 * 512..].iter().all(|&b| b == 0));
        assert_eq!(rig.dp.stats().ok, 2);
    }

    #[test]
    fn invalid_request_gets_error_and_ring_goes_on() {
        let mut rig = Rig::new(Abi::X86_32);
        let rsp = rig.send(&[
            WireRequest::read(1, 0, vec![seg(1, 5, 2)]),
            WireRequest::rw(99, 2, 0, vec![seg(1, 0, 0)]),
            WireRequest::read(3, 4096, vec![seg(1, 0, 0)]),
            WireRequest::read(4, 0, vec![seg(1, 0, 0)]),
        ]);
        let got: Vec<(u64, Status)> = rsp.iter().map(|r| (r.id, r.status)).collect();
        assert_eq!(
            got,
            vec![
                (1, Status::Error),
                (2, Status::NotSupported),
                (3, Status::Error),
                (4, Status::Okay)
            ]
        );
    }

    #[test]
    fn revoked_grant_fails_only_that_request() {
        let mut rig = Rig::new(Abi::Native);
        let rsp = rig.send(&[
            WireRequest::write(1, 0, vec![seg(1000, 0, 7)]),
            WireRequest::read(2, 0, vec![seg(1001, 0, 7)]),
            WireRequest::write(3, 8, vec![seg(5, 0, 7)]),
        ]);
        let got: Vec<(u64, Status)> = rsp.iter().map(|r| (r.id, r.status)).collect();
        assert_eq!(
            got,
            vec![(1, Status::Error), (2, Status::Error), (3, Status::Okay)]
        );
    }

    #[test]
    fn duplicate_in_flight_id_is_refused() {
        let mut rig = Rig::new(Abi::X86_64);
        rig.engine.hold = true;
        let rsp = rig.send(&[
            WireRequest::read(5, 0, vec![seg(1, 0, 7)]),
            WireRequest::read(5, 8, vec![seg(2, 0, 7)]),
        ]);
        assert_eq!(rsp.len(), 1);
        assert_eq!((rsp[0].id, rsp[0].status), (5, Status::Error));
        rig.engine.hold = false;
        let rsp = rig.pump();
        assert_eq!((rsp[0].id, rsp[0].status), (5, Status::Okay));
        assert_eq!(rig.dp.in_flight(), 0);
    }

    #[test]
    fn engine_error_becomes_error_response() {
        let mut rig = Rig::new(Abi::X86_64);
        rig.engine.fail_writes = true;
        let rsp = rig.send(&[WireRequest::write(9, 0, vec![seg(1, 0, 7)])]);
        assert_eq!((rsp[0].id, rsp[0].status), (9, Status::Error));
    }

    #[test]
    fn flush_with_data_writes_then_flushes() {
        let mut rig = Rig::new(Abi::X86_64);
        let rsp = rig.send(&[WireRequest::rw(
            op::FLUSH_DISKCACHE,
            1,
            0,
            vec![seg(1, 0, 7)],
        )]);
        assert_eq!((rsp[0].id, rsp[0].status), (1, Status::Okay));
        assert_eq!(rig.engine.log, vec!["write", "flush"]);
    }

    #[test]
    fn barrier_waits_for_earlier_requests_and_holds_later_ones() {
        let mut rig = Rig::new(Abi::X86_64);
        rig.engine.hold = true;
        let _ = rig.send(&[
            WireRequest::write(1, 0, vec![seg(1, 0, 7)]),
            WireRequest::rw(op::WRITE_BARRIER, 2, 8, vec![seg(2, 0, 7)]),
            WireRequest::read(3, 0, vec![seg(3, 0, 7)]),
        ]);
        // Only the first write reached the engine; the barrier and the read wait.
        assert_eq!(rig.engine.log, vec!["write"]);
        rig.engine.hold = false;
        let rsp = rig.pump();
        let ids: Vec<u64> = rsp.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(rig.engine.log, vec!["write", "write", "flush", "read"]);
    }

    #[test]
    fn indirect_request_reads_its_descriptor_pages() {
        let mut rig = Rig::new(Abi::X86_64);
        let segs: Vec<Segment> = (0..20).map(|i| seg(100 + i, 0, 7)).collect();
        for (i, p) in indirect_pages(&segs).into_iter().enumerate() {
            rig.grants.pages.insert(50 + i as u32, p);
        }
        for i in 0..20u32 {
            rig.grants.pages.insert(100 + i, vec![i as u8; PAGE_SIZE]);
        }
        let rsp = rig.send(&[WireRequest::Indirect {
            indirect_op: op::WRITE,
            nr_segments: 20,
            id: 77,
            sector: 0,
            grefs: vec![50],
        }]);
        assert_eq!((rsp[0].id, rsp[0].status), (77, Status::Okay));
        for i in 0..20usize {
            assert!(rig.engine.disk[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8));
        }
        // descriptor page revoked: error, ring goes on
        let rsp = rig.send(&[WireRequest::Indirect {
            indirect_op: op::READ,
            nr_segments: 20,
            id: 78,
            sector: 0,
            grefs: vec![1000],
        }]);
        assert_eq!((rsp[0].id, rsp[0].status), (78, Status::Error));
    }

    #[test]
    fn discard_zeroes_through_engine() {
        let mut rig = Rig::new(Abi::X86_64);
        rig.engine.disk.fill(0xee);
        let rsp = rig.send(&[WireRequest::Discard {
            flag: 0,
            id: 4,
            sector: 8,
            nr_sectors: 8,
        }]);
        assert_eq!((rsp[0].id, rsp[0].status), (4, Status::Okay));
        assert!(rig.engine.disk[8 * 512..16 * 512].iter().all(|&b| b == 0));
        assert!(rig.engine.disk[..8 * 512].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn byte_budget_throttles_and_resumes() {
        let mut rig = Rig::new(Abi::X86_64);
        rig.dp.config.max_inflight_bytes = 8192;
        rig.engine.hold = true;
        let reqs: Vec<WireRequest> = (0..6)
            .map(|i| WireRequest::read(i, i * 8, vec![seg(1, 0, 7)]))
            .collect();
        let _ = rig.send(&reqs);
        // 16 slots are taken per batch, so the budget applies per batch; all six fit one
        // batch, then nothing more is taken until completions come back.
        let mem = SharedMem::from_mut_slice(&mut rig.mem);
        let s = rig
            .dp
            .service(&mem, &mut rig.grants, &mut rig.engine)
            .unwrap();
        assert!(s.throttled);
        rig.engine.hold = false;
        let rsp = rig.pump();
        assert_eq!(rsp.len(), 6);
        assert!(rsp.iter().all(|r| r.status == Status::Okay));
    }

    fn with_timeout(rig: &mut Rig, secs: u64) {
        rig.dp.config.io_timeout = Some(Duration::from_secs(secs));
    }

    fn expire_at(rig: &mut Rig, later: Duration) -> Expired {
        let mem = SharedMem::from_mut_slice(&mut rig.mem);
        rig.dp
            .expire(
                &mem,
                &mut rig.grants,
                &mut rig.engine,
                Instant::now() + later,
            )
            .unwrap()
    }

    fn take(rig: &mut Rig) -> Vec<(u64, Status)> {
        let mem = SharedMem::from_mut_slice(&mut rig.mem);
        let mut out = Vec::new();
        rig.front.take_responses(&mem, &mut out).unwrap();
        out.iter().map(|r| (r.id, r.status)).collect()
    }

    #[test]
    fn without_io_timeout_nothing_expires() {
        let mut rig = Rig::new(Abi::X86_64);
        rig.engine.hold = true;
        let _ = rig.send(&[WireRequest::read(1, 0, vec![seg(1, 0, 7)])]);
        assert_eq!(expire_at(&mut rig, Duration::from_secs(3600)).answered, 0);
        assert!(take(&mut rig).is_empty());
        assert_eq!(rig.dp.in_flight(), 1);
    }

    #[test]
    fn a_request_past_io_timeout_fails_once_and_its_late_completion_is_dropped() {
        let mut rig = Rig::new(Abi::X86_64);
        with_timeout(&mut rig, 5);
        rig.engine.hold = true;
        let _ = rig.send(&[WireRequest::read(1, 0, vec![seg(1, 0, 7)])]);
        assert_eq!(expire_at(&mut rig, Duration::from_secs(2)).answered, 0);
        let e = expire_at(&mut rig, Duration::from_secs(6));
        assert_eq!(e.answered, 1);
        assert_eq!(take(&mut rig), vec![(1, Status::Error)]);
        assert_eq!(rig.dp.stats().timeouts, 1);
        // answered, but the engine still owns the buffer
        assert_eq!((rig.dp.in_flight(), rig.dp.engine_ops()), (0, 1));
        assert!(rig.dp.waiting());
        // the guest may reuse the id at once
        let _ = rig.send(&[WireRequest::read(1, 8, vec![seg(2, 0, 7)])]);
        rig.engine.hold = false;
        let rsp = rig.pump();
        assert_eq!(rsp.len(), 1, "{rsp:?}");
        assert_eq!((rsp[0].id, rsp[0].status), (1, Status::Okay));
        assert_eq!(rig.dp.engine_ops(), 0);
        assert_eq!(rig.dp.stats().errors, 1);
    }

    /// The hazard a timeout creates: the guest rewrites a block whose failed write is still
    /// out; an OSD applying the old write last would overwrite the newer data.
    #[test]
    fn a_write_overlapping_a_timed_out_write_waits_for_it() {
        let mut rig = Rig::new(Abi::X86_64);
        with_timeout(&mut rig, 5);
        rig.engine.hold = true;
        rig.engine.lifo = true;
        rig.grants.pages.insert(1, vec![0x11; PAGE_SIZE]);
        rig.grants.pages.insert(2, vec![0x22; PAGE_SIZE]);
        rig.grants.pages.insert(3, vec![0x33; PAGE_SIZE]);
        let _ = rig.send(&[WireRequest::write(1, 0, vec![seg(1, 0, 7)])]);
        assert_eq!(expire_at(&mut rig, Duration::from_secs(6)).answered, 1);
        assert_eq!(take(&mut rig), vec![(1, Status::Error)]);
        // the rewrite of those sectors waits; another block goes ahead
        let _ = rig.send(&[
            WireRequest::write(2, 4, vec![seg(2, 0, 3)]),
            WireRequest::write(3, 64, vec![seg(3, 0, 7)]),
        ]);
        assert_eq!(rig.engine.log, vec!["write", "write"]);
        assert_eq!(rig.dp.stall(Instant::now()).stalled, 0);
        rig.engine.hold = false;
        let mut rsp = rig.pump();
        rsp.sort_by_key(|r| r.id);
        let got: Vec<(u64, Status)> = rsp.iter().map(|r| (r.id, r.status)).collect();
        assert_eq!(got, vec![(2, Status::Okay), (3, Status::Okay)]);
        // the late write landed first, the newer one over it
        assert!(rig.engine.disk[..4 * 512].iter().all(|&b| b == 0x11));
        assert!(rig.engine.disk[4 * 512..8 * 512].iter().all(|&b| b == 0x22));
        assert_eq!(rig.dp.engine_ops(), 0);
    }

    #[test]
    fn a_held_back_request_times_out_without_reaching_the_engine() {
        let mut rig = Rig::new(Abi::X86_64);
        with_timeout(&mut rig, 5);
        rig.engine.hold = true;
        let _ = rig.send(&[WireRequest::write(1, 0, vec![seg(1, 0, 7)])]);
        assert_eq!(expire_at(&mut rig, Duration::from_secs(6)).answered, 1);
        let rsp = rig.send(&[WireRequest::read(2, 0, vec![seg(2, 0, 7)])]);
        let got: Vec<(u64, Status)> = rsp.iter().map(|r| (r.id, r.status)).collect();
        assert_eq!(got, vec![(1, Status::Error)]);
        let st = rig.dp.stall(Instant::now() + Duration::from_secs(40));
        assert_eq!((st.stalled, st.oldest_offset), (2, 0));
        assert!(st.oldest >= Some(Duration::from_secs(40)));
        assert_eq!(expire_at(&mut rig, Duration::from_secs(6)).answered, 1);
        assert_eq!(take(&mut rig), vec![(2, Status::Error)]);
        assert_eq!(rig.engine.log, vec!["write"]);
        rig.engine.hold = false;
        assert!(rig.pump().is_empty());
        assert!(!rig.dp.waiting());
        assert_eq!(rig.dp.stats().timeouts, 2);
    }

    #[test]
    fn requests_kept_in_the_ring_by_a_stuck_budget_fail_after_io_timeout() {
        let mut rig = Rig::new(Abi::X86_64);
        with_timeout(&mut rig, 5);
        rig.dp.config.max_inflight_bytes = 4096;
        rig.engine.hold = true;
        let reqs: Vec<WireRequest> = (0..20)
            .map(|i| WireRequest::read(i, i * 8, vec![seg(1, 0, 7)]))
            .collect();
        let _ = rig.send(&reqs);
        // one batch of 16 went in; 4 wait in the ring behind the budget
        assert_eq!(rig.dp.in_flight(), 16);
        assert_eq!(expire_at(&mut rig, Duration::from_secs(6)).answered, 20);
        let rsp = take(&mut rig);
        assert_eq!(rsp.len(), 20);
        assert!(rsp.iter().all(|(_, s)| *s == Status::Error));
        rig.engine.hold = false;
        assert!(rig.pump().is_empty());
        assert_eq!(rig.dp.engine_ops(), 0);
    }
}
