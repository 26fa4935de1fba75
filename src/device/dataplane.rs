//! The request engine of one ring queue: ring slots in, engine operations out, responses back.
//!
//! Owns: the in-flight table (guest ids, engine tags, buffers), the bound on in-flight work,
//! barrier ordering, and the translation of every outcome into exactly one response.
//! Trusts: only what [`crate::ring`] validated; the guest's ids are checked for duplicates here.
//! Must never: block (it is called from the queue's event loop), read shared memory other than
//! through [`BackRing`], or release a buffer before the engine handed it back.
//!
//! It is written against two small seams so it can be tested without Xen or Ceph:
//! [`GrantIo`] moves bytes between guest grants and host buffers (grant copy or persistent
//! mappings), and [`EngineQueue`] is one engine queue (see `crate::rados`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;
use tracing::debug;

use super::journal::{Journal, JournalError, RingIdentity};
use crate::rados::{BlockOp, Completion, SubmitError};
use crate::ring::abi::{PAGE_SIZE, SECTOR_SIZE};
use crate::ring::{
    BackRing, Limits, Parsed, Request, RequestKind, RequestSlot, Response, RingError, Segment,
    Status, Transfer,
};
use crate::shm::SharedMem;

use super::metrics::{OpClass, QueueMetrics};

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

impl Failure {
    /// The response status for this failure.
    pub fn status(&self) -> Status {
        Status::Error
    }
}

/// Tunables of one queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// At most this many bytes of guest data buffered in flight (reads and writes).
    pub max_inflight_bytes: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_inflight_bytes: 64 << 20,
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
}

#[derive(Debug)]
enum Next {
    /// Respond when this operation completes (and, for reads, scatter the data).
    Respond,
    /// After this write completes, flush, then respond.
    FlushThenRespond,
}

/// A request's journal entry, if the queue keeps a journal.
type Entry = Option<u16>;

#[derive(Debug)]
struct InFlight {
    id: u64,
    operation: u8,
    /// What the request counts as, and when it was started (metrics).
    class: OpClass,
    started: Instant,
    /// Bytes the request moves for the guest (counted when it succeeds).
    data: u64,
    /// For reads: where the data goes.
    read_spans: Option<Vec<GrantSpan>>,
    next: Next,
    bytes: usize,
    entry: Entry,
    /// Already answered (the ring was abandoned): the engine still owns the buffer, and its
    /// completion only gives it back.
    answered: bool,
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
    deferred: VecDeque<(Request, Entry)>,
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
            reissue: VecDeque::new(),
            journal: None,
            force_notify: false,
            slots: Vec::new(),
            entries: Vec::new(),
            done: Vec::new(),
            pool: Vec::new(),
            stats: Stats::default(),
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

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Requests taken from the ring and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.inflight.values().filter(|f| !f.answered).count()
            + self.deferred.len()
            + self.reissue.len()
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
    /// their buffers; their completions are then only reaped. Says whether to notify.
    pub fn abandon(&mut self, mem: &SharedMem<'_>) -> Result<bool, RingError> {
        let why = Failure::Abandoned;
        let mut pending: Vec<(u64, u8, Entry)> = Vec::new();
        for f in self.inflight.values_mut().filter(|f| !f.answered) {
            f.answered = true;
            pending.push((f.id, f.operation, f.entry));
        }
        for (req, e) in self.deferred.drain(..) {
            pending.push((req.id, req.operation, e));
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
        self.respond(mem, id, operation, why.status(), entry)
    }

    /// Publishes the responses written so far (and records it in the journal); says whether
    /// to notify the frontend.
    fn publish(&mut self, mem: &SharedMem<'_>) -> Result<bool, RingError> {
        let notify = self.ring.publish_responses(mem)? || self.force_notify;
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
        match engine.submit(tag, op) {
            Ok(()) => {
                self.inflight_bytes += bytes;
                self.inflight.insert(tag, entry);
                Ok(())
            }
            Err(e) => {
                if let BlockOp::Read { buf, .. } | BlockOp::Write { buf, .. } = e.op {
                    self.recycle(buf);
                }
                self.ids.remove(&id);
                let why = Failure::Engine(e.error.to_string());
                self.metrics.answered(class, 0, started.elapsed());
                self.fail(mem, id, operation, &why, jentry)
            }
        }
    }

    /// Starts a validated request (its id is already registered in `ids`).
    fn start(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
        req: Request,
        jentry: Entry,
    ) -> Result<(), RingError> {
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
                    class: OpClass::Discard,
                    started,
                    data: d.nr_sectors.saturating_mul(SECTOR_SIZE),
                    read_spans: None,
                    next: Next::Respond,
                    bytes: 0,
                    entry: jentry,
                    answered: false,
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
                class: OpClass::Flush,
                started,
                data: 0,
                read_spans: None,
                next: Next::Respond,
                bytes: 0,
                entry: jentry,
                answered: false,
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
                class,
                started,
                data: t.total_bytes(),
                read_spans: None,
                next: if then_flush {
                    Next::FlushThenRespond
                } else {
                    Next::Respond
                },
                bytes: len,
                entry: jentry,
                answered: false,
            };
            self.submit(mem, engine, entry, BlockOp::Write { offset, buf })
        } else {
            let entry = InFlight {
                id,
                operation,
                class,
                started,
                data: t.total_bytes(),
                read_spans: Some(spans),
                next: Next::Respond,
                bytes: len,
                entry: jentry,
                answered: false,
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
            // Not ours (cannot happen with a faithful engine): never answer twice.
            debug!(tag = done.tag, "completion for an unknown tag ignored");
            return Ok(());
        };
        self.inflight_bytes = self.inflight_bytes.saturating_sub(entry.bytes);
        let (id, operation, jentry) = (entry.id, entry.operation, entry.entry);
        let (class, started, data) = (entry.class, entry.started, entry.data);
        if entry.answered {
            // answered when the ring was abandoned: only the buffer comes back
            if let Some(buf) = done.buf {
                self.recycle(buf);
            }
            return Ok(());
        }
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
                    class,
                    started,
                    data,
                    read_spans: None,
                    next: Next::Respond,
                    bytes: 0,
                    entry: jentry,
                    answered: false,
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
        if !self.ids.insert(req.id) {
            let why = Failure::DuplicateId(req.id);
            self.fail(mem, req.id, req.operation, &why, jentry)?;
            return Ok(None);
        }
        Ok(Some(req))
    }

    /// Admits and starts (or defers behind a barrier) one slot taken from the ring.
    fn dispatch(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
        slot: &RequestSlot,
        jentry: Entry,
    ) -> Result<(), RingError> {
        let Some(req) = self.admit(mem, grants, slot, jentry)? else {
            return Ok(());
        };
        let barrier = matches!(req.kind, RequestKind::Barrier(_));
        if barrier || !self.deferred.is_empty() {
            self.deferred.push_back((req, jentry));
            self.run_deferred(mem, grants, engine)
        } else {
            self.start(mem, grants, engine, req, jentry)
        }
    }

    fn run_deferred(
        &mut self,
        mem: &SharedMem<'_>,
        grants: &mut impl GrantIo,
        engine: &mut impl EngineQueue,
    ) -> Result<(), RingError> {
        while let Some((front, _)) = self.deferred.front() {
            let is_barrier = matches!(front.kind, RequestKind::Barrier(_));
            if is_barrier && self.inflight.values().any(|f| !f.answered) {
                // blkif.h: a barrier waits for all earlier requests to complete.
                break;
            }
            if let Some((req, jentry)) = self.deferred.pop_front() {
                self.start(mem, grants, engine, req, jentry)?;
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
            self.dispatch(mem, grants, engine, &slot, jentry)?;
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
            slots.clear();
            entries.clear();
            let first = self.ring.req_cons();
            let taken = self.ring.take_requests(mem, &mut slots, limit)?;
            if taken == 0 {
                break;
            }
            if let Some(j) = self.journal.as_mut() {
                for (k, slot) in slots.iter().enumerate() {
                    let index = first.wrapping_add(u32::try_from(k).unwrap_or(u32::MAX));
                    entries.push(j.take(index, slot));
                }
                j.set_req_cons(self.ring.req_cons());
            } else {
                entries.resize(slots.len(), None);
            }
            total += taken;
            budget -= taken;
            for (slot, jentry) in slots.iter().zip(entries.iter()) {
                self.dispatch(mem, grants, engine, slot, *jentry)?;
            }
        }
        self.slots = slots;
        self.entries = entries;
        notify |= self.publish(mem)?;
        self.metrics
            .set_in_flight(self.in_flight(), self.inflight_bytes);
        Ok(Serviced {
            notify,
            throttled,
            taken: total,
        })
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

    /// Engine operations still running (their buffers are the engine's until they complete).
    pub fn engine_ops(&self) -> usize {
        self.inflight.len()
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
    }

    impl FakeEngine {
        fn new(bytes: usize) -> Self {
            FakeEngine {
                disk: vec![0; bytes],
                pending: Vec::new(),
                log: Vec::new(),
                fail_writes: false,
                hold: false,
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
            for (tag, op) in self.pending.drain(..) {
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
}
