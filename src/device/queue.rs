//! One dataplane thread per ring queue: waits on the event channel and the engine's
//! completion eventfd, and runs the [`Dataplane`] until told to stop.
//!
//! Owns: the ring mapping, the bound event channel, the engine queues (the current one, and
//! those a re-open replaced until their operations are back) and the thread; while requests
//! wait it applies the I/O timeout and publishes its stall gauge every [`TICK`].
//! Trusts: nothing from the guest (all of it goes through the dataplane's validation).
//! Must never: unmap the ring or drop buffers while engine operations are in flight; on stop it
//! drains with a bounded wait and leaks what did not drain rather than freeing it.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;
use tracing::{debug, info, warn};

use crate::rados;
use crate::xen::{DomId, EventChannels, GrantMapping, GrantTable, Port};

use super::dataplane::{Dataplane, EngineQueue, Stats};
use super::dataplane::{GrantFault, GrantIo, GrantSpan};
use super::grants::CopyGrants;
use super::persistent::{PersistentGrants, DEFAULT_MAX_PERSISTENT};
use super::stall::StallGauge;

/// How a queue reaches guest data: grant copy, or persistent mappings when negotiated.
#[derive(Debug)]
pub enum Access<G: GrantTable> {
    /// One hypervisor grant copy per request.
    Copy(CopyGrants<G>),
    /// A bounded set of long-lived mappings.
    Persistent(PersistentGrants<G>),
}

impl<G: GrantTable> GrantIo for Access<G> {
    fn copy_from_guest(&mut self, spans: &[GrantSpan], dst: &mut [u8]) -> Result<(), GrantFault> {
        match self {
            Access::Copy(c) => c.copy_from_guest(spans, dst),
            Access::Persistent(p) => p.copy_from_guest(spans, dst),
        }
    }

    fn copy_to_guest(&mut self, spans: &[GrantSpan], src: &[u8]) -> Result<(), GrantFault> {
        match self {
            Access::Copy(c) => c.copy_to_guest(spans, src),
            Access::Persistent(p) => p.copy_to_guest(spans, src),
        }
    }
}

/// How long a stopping queue waits for in-flight engine operations.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a queue handing its ring over (stop for an upgrade or a restart of the
/// process) waits for engine operations before leaving them to the journal.
pub const HANDOVER_DRAIN: Duration = Duration::from_secs(5);

/// Why a queue is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// The ring is given up for good (the frontend closes, the device goes away): requests
    /// still unanswered after the drain are answered with an error, the journal is deleted.
    Close,
    /// The ring is handed to the next instance of the backend (upgrade, restart): nothing is
    /// answered with an error; what did not drain stays in the journal, which is kept.
    Handover,
}

impl StopMode {
    fn code(self) -> u8 {
        match self {
            StopMode::Close => 1,
            StopMode::Handover => 2,
        }
    }

    fn from_code(c: u8) -> StopMode {
        if c == 2 {
            StopMode::Handover
        } else {
            StopMode::Close
        }
    }
}

/// While requests wait, how often the queue applies the I/O timeout and publishes its stall
/// gauge.
pub const TICK: Duration = Duration::from_millis(250);

/// Why a queue thread ended.
#[derive(Debug)]
pub enum QueueExit {
    /// Asked to stop; everything drained.
    Stopped(Stats),
    /// Asked to stop, but engine operations did not finish in time: their buffers (and the
    /// engine queue) were leaked on purpose. With [`StopMode::Close`] their requests were
    /// answered with an error; with [`StopMode::Handover`] they stay in the journal.
    Leaked(Stats, usize),
    /// The frontend broke the protocol; the VBD must be closed with this reason.
    Broken(String),
    /// An event channel or poll error.
    Failed(String),
}

/// Everything a queue thread needs; built by the VBD's connect step.
pub struct QueueParts<G: GrantTable, E: EventChannels> {
    /// Queue index (for logs).
    pub index: usize,
    /// The frontend's domain.
    pub domid: DomId,
    /// The mapped ring pages.
    pub ring_map: G::Mapping,
    /// Grant table for data copies.
    pub gnttab: Arc<G>,
    /// Event channel handle with `port` bound.
    pub evtchn: E,
    /// Our local port.
    pub port: Port,
    /// The ring's geometry and validation limits.
    pub dataplane: Dataplane,
    /// The engine queue.
    pub engine: Engines,
    /// Disk size in sectors, updated by the control thread on resize.
    pub capacity: Arc<AtomicU64>,
    /// Both ends negotiated `feature-persistent`.
    pub persistent: bool,
    /// Where the queue publishes its waiting requests (read by the VBD's stall report).
    pub stall: Arc<StallGauge>,
}

impl<G: GrantTable, E: EventChannels> std::fmt::Debug for QueueParts<G, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueParts")
            .field("index", &self.index)
            .field("domid", &self.domid)
            .field("port", &self.port)
            .finish()
    }
}

/// A queue thread's engine queues: the current one takes new operations; those a re-open
/// replaced stay until every operation they have in flight is back (answered once, by tag:
/// the dataplane's tags are unique across them).
#[derive(Debug)]
pub struct Engines {
    current: rados::Queue,
    retiring: Vec<rados::Queue>,
}

impl From<rados::Queue> for Engines {
    fn from(current: rados::Queue) -> Engines {
        Engines {
            current,
            retiring: Vec::new(),
        }
    }
}

impl Engines {
    /// Makes `next` the queue new operations go to.
    fn replace(&mut self, next: rados::Queue) {
        let old = std::mem::replace(&mut self.current, next);
        if old.in_flight() > 0 {
            self.retiring.push(old);
        }
    }

    fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        std::iter::once(self.current.as_fd()).chain(self.retiring.iter().map(AsFd::as_fd))
    }
}

impl EngineQueue for Engines {
    fn submit(&mut self, tag: u64, op: rados::BlockOp) -> Result<(), rados::SubmitError> {
        self.current.submit(tag, op)
    }

    fn reap(&mut self, out: &mut Vec<rados::Completion>) {
        for r in &mut self.retiring {
            r.reap(out);
        }
        // drained: nothing of theirs is out any more (the VBD closes their image)
        self.retiring.retain(|r| r.in_flight() > 0);
        self.current.reap(out);
    }
}

/// A new engine queue handed to a running queue thread (a re-open).
#[derive(Debug)]
struct Swap {
    next: Mutex<Option<rados::Queue>>,
    efd: EventFd,
}

/// A running queue thread.
#[derive(Debug)]
pub struct QueueHandle {
    stop: Arc<EventFd>,
    mode: Arc<AtomicU8>,
    swap: Arc<Swap>,
    thread: Option<JoinHandle<QueueExit>>,
}

impl QueueHandle {
    /// Starts the thread; [`Self::is_finished`] turns true if it ends on its own.
    pub fn spawn<G, E>(parts: QueueParts<G, E>, span: tracing::Span) -> std::io::Result<QueueHandle>
    where
        G: GrantTable + 'static,
        E: EventChannels + 'static,
        G::Mapping: 'static,
    {
        let stop = Arc::new(EventFd::new().map_err(std::io::Error::from)?);
        let mode = Arc::new(AtomicU8::new(StopMode::Close.code()));
        let swap = Arc::new(Swap {
            next: Mutex::new(None),
            efd: EventFd::new().map_err(std::io::Error::from)?,
        });
        let (stop2, mode2, swap2) = (Arc::clone(&stop), Arc::clone(&mode), Arc::clone(&swap));
        let name = format!("rbdback-q{}", parts.index);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let _g = span.enter();
            run(parts, &stop2, &mode2, &swap2)
        })?;
        Ok(QueueHandle {
            stop,
            mode,
            swap,
            thread: Some(thread),
        })
    }

    /// Hands the thread a new engine queue (the image re-opened with a new client): new
    /// requests go to it, operations in flight finish on the old one.
    pub fn swap_engine(&self, next: rados::Queue) {
        *self
            .swap
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(next);
        let _ = self.swap.efd.write(1);
    }

    /// Asks the thread to stop without waiting for it (so a VBD's queues drain together;
    /// [`Self::stop`] then waits).
    pub fn ask_stop(&self, how: StopMode) {
        self.mode.store(how.code(), Ordering::Relaxed);
        let _ = self.stop.write(1);
    }

    /// Asks the thread to stop and waits for it (bounded by [`DRAIN_TIMEOUT`] or
    /// [`HANDOVER_DRAIN`] inside it).
    pub fn stop(mut self, how: StopMode) -> QueueExit {
        self.ask_stop(how);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(exit)) => exit,
            Some(Err(_)) => QueueExit::Failed("queue thread panicked".into()),
            None => QueueExit::Failed("queue thread already joined".into()),
        }
    }

    /// Whether the thread has ended by itself.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for QueueHandle {
    /// A handle dropped without [`QueueHandle::stop`] still stops its thread (without waiting).
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop.write(1);
        }
    }
}

fn run<G: GrantTable + 'static, E: EventChannels + 'static>(
    mut p: QueueParts<G, E>,
    stop: &EventFd,
    mode: &AtomicU8,
    swap: &Swap,
) -> QueueExit {
    let mut grants = if p.persistent {
        Access::Persistent(PersistentGrants::new(
            Arc::clone(&p.gnttab),
            p.domid,
            DEFAULT_MAX_PERSISTENT,
        ))
    } else {
        Access::Copy(CopyGrants::new(Arc::clone(&p.gnttab), p.domid))
    };
    info!(
        queue = p.index,
        port = p.port,
        persistent = p.persistent,
        "queue started"
    );
    // Requests may already be waiting (the frontend published before we bound).
    let mut work = true;
    let mut flood = FloodLimit::new(p.index);
    let mut last_tick = Instant::now();
    loop {
        let cap = p.capacity.load(Ordering::Relaxed);
        p.dataplane.set_capacity(cap);
        let mut taken = 0;
        if work {
            let mem = p.ring_map.mem();
            loop {
                match p.dataplane.service(&mem, &mut grants, &mut p.engine) {
                    Ok(s) => {
                        taken += s.taken;
                        if s.notify {
                            if let Err(e) = p.evtchn.notify(p.port) {
                                return QueueExit::Failed(format!("notify: {e}"));
                            }
                        }
                    }
                    Err(e) => return broken(p, grants, &e),
                }
                match p.dataplane.final_check(&mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => return broken(p, grants, &e),
                }
            }
        }
        if let Access::Persistent(pg) = &grants {
            p.dataplane.metrics().set_persistent_grants(pg.mapped());
        }
        if flood.events_only && taken == 0 {
            flood.spurious();
        }
        let timeout = if p.dataplane.waiting() {
            let left = TICK.saturating_sub(last_tick.elapsed());
            PollTimeout::from(u16::try_from(left.as_millis()).unwrap_or(u16::MAX))
        } else {
            if p.stall.is_set() {
                p.stall
                    .publish(&Default::default(), p.dataplane.stats().timeouts);
            }
            PollTimeout::NONE
        };
        let (ev, eng, [st, sw]) =
            match wait(&p.evtchn, &p.engine, [Some(stop), Some(&swap.efd)], timeout) {
                Ok(r) => r,
                Err(e) => return QueueExit::Failed(format!("poll: {e}")),
            };
        if sw {
            let _ = swap.efd.read();
            let next = swap
                .next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(next) = next {
                info!(queue = p.index, "engine queue replaced (image re-opened)");
                p.engine.replace(next);
            }
        }
        if p.dataplane.waiting() && last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            match tick(&mut p, &mut grants, last_tick) {
                Ok(None) => {}
                Ok(Some(exit)) => return exit,
                Err(e) => return broken(p, grants, &e),
            }
        }
        if st {
            return drain(p, grants, StopMode::from_code(mode.load(Ordering::Relaxed)));
        }
        if ev {
            loop {
                match p.evtchn.pending() {
                    Ok(Some(port)) => {
                        if let Err(e) = p.evtchn.unmask(port) {
                            return QueueExit::Failed(format!("unmask: {e}"));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return QueueExit::Failed(format!("pending: {e}")),
                }
            }
        }
        work = ev || eng;
        flood.woke(ev, eng);
    }
}

/// Spurious event-channel notifications (no request behind them) a frontend may send per
/// second before the queue slows down; XSA-332's lesson: a guest must not make its backend
/// spin on notifications.
const SPURIOUS_PER_SEC: u32 = 2000;

/// Counts spurious wake-ups; past [`SPURIOUS_PER_SEC`] in one second each one costs the queue
/// a 1 ms sleep before it listens again (the guest's own disk slows, nothing else).
struct FloodLimit {
    queue: usize,
    window: Instant,
    count: u32,
    warned: bool,
    events_only: bool,
}

impl FloodLimit {
    fn new(queue: usize) -> FloodLimit {
        FloodLimit {
            queue,
            window: Instant::now(),
            count: 0,
            warned: false,
            events_only: false,
        }
    }

    fn woke(&mut self, ev: bool, eng: bool) {
        self.events_only = ev && !eng;
    }

    fn spurious(&mut self) {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.count = 0;
        }
        self.count += 1;
        if self.count > SPURIOUS_PER_SEC {
            if !self.warned {
                warn!(
                    queue = self.queue,
                    "event channel flood from the frontend (no requests behind the notifications); rate limiting"
                );
                self.warned = true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Applies the I/O timeout and publishes the queue's stall gauge; a ring error comes back
/// for [`broken`].
fn tick<G: GrantTable, E: EventChannels>(
    p: &mut QueueParts<G, E>,
    grants: &mut Access<G>,
    now: Instant,
) -> Result<Option<QueueExit>, super::dataplane::DataplaneError> {
    let mem = p.ring_map.mem();
    let x = p.dataplane.expire(&mem, grants, &mut p.engine, now)?;
    if x.notify {
        if let Err(e) = p.evtchn.notify(p.port) {
            return Ok(Some(QueueExit::Failed(format!("notify: {e}"))));
        }
    }
    p.stall
        .publish(&p.dataplane.stall(now), p.dataplane.stats().timeouts);
    Ok(None)
}

/// The frontend broke the ring protocol: the queue stops, but first answers every request
/// it took with an error (its response slots are still ours to write), so the guest fails
/// that I/O instead of waiting for it forever; then it lets the engine finish (bounded) so no
/// buffer is freed under RADOS.
fn broken<G: GrantTable + 'static, E: EventChannels + 'static>(
    mut p: QueueParts<G, E>,
    grants: Access<G>,
    e: &dyn std::error::Error,
) -> QueueExit {
    let msg = crate::chain(e);
    warn!(queue = p.index, error = %msg, "frontend broke the ring protocol; stopping the queue");
    let answered = p.dataplane.in_flight();
    match p.dataplane.abandon(&p.ring_map.mem()) {
        Ok(notify) => {
            if answered > 0 {
                warn!(
                    queue = p.index,
                    requests = answered,
                    "answered the requests in flight with errors"
                );
            }
            if notify {
                let _ = p.evtchn.notify(p.port);
            }
        }
        Err(e) => warn!(queue = p.index, error = %e, "cannot answer the requests in flight"),
    }
    // Every request is answered: nothing is left to resume. The journal goes now, before the
    // VBD can connect again and create the next ring's journal at the same path.
    if let Some(j) = p.dataplane.take_journal() {
        j.discard();
    }
    // The VBD closes now (as blkback does); the engine's operations are waited for on a
    // thread of their own, which owns their buffers until they complete (bounded, then
    // leaked).
    let index = p.index;
    let (tx, rx) = std::sync::mpsc::channel::<(QueueParts<G, E>, Access<G>)>();
    let span = tracing::Span::current();
    let spawned = std::thread::Builder::new()
        .name(format!("rbdback-reap{index}"))
        .spawn(move || {
            let _g = span.enter();
            if let Ok((p, grants)) = rx.recv() {
                reap(p, grants);
            }
        });
    let left = match spawned {
        Ok(_) => tx.send((p, grants)).err().map(|e| e.0),
        Err(_) => Some((p, grants)),
    };
    if let Some((p, grants)) = left {
        reap(p, grants);
    }
    QueueExit::Broken(msg)
}

/// Waits for a given-up ring's engine operations, then frees (or leaks) what they own.
fn reap<G: GrantTable, E: EventChannels>(p: QueueParts<G, E>, grants: Access<G>) {
    let index = p.index;
    if let QueueExit::Leaked(_, n) = drain(p, grants, StopMode::Close) {
        warn!(
            queue = index,
            in_flight = n,
            "engine operations of the broken ring leaked"
        );
    }
}

/// Polls the event channel, the engine queues and up to two eventfds (stop, swap); says which
/// were ready.
fn wait<E: EventChannels>(
    evtchn: &E,
    engines: &Engines,
    extra: [Option<&EventFd>; 2],
    timeout: PollTimeout,
) -> nix::Result<(bool, bool, [bool; 2])> {
    let mut fds = vec![PollFd::new(evtchn.as_fd(), PollFlags::POLLIN)];
    let extras: Vec<usize> = extra
        .iter()
        .map(|e| {
            e.map_or(usize::MAX, |efd| {
                fds.push(PollFd::new(efd.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            })
        })
        .collect();
    let first_engine = fds.len();
    fds.extend(engines.fds().map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
    loop {
        match poll(&mut fds, timeout) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    let ready = |f: &PollFd<'_>| {
        f.revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLERR))
    };
    let at = |i: usize| fds.get(i).is_some_and(ready);
    let engine = fds.iter().skip(first_engine).any(ready);
    let x = |k: usize| extras.get(k).is_some_and(|&i| at(i));
    Ok((at(0), engine, [x(0), x(1)]))
}

/// Stop: keep answering completions (so the guest sees its responses) until the engine is
/// idle or the drain time passes; new requests are not taken. Then, for [`StopMode::Close`],
/// every request still unanswered is answered with an error and the journal is deleted; for
/// [`StopMode::Handover`] they stay in the journal for the next instance.
fn drain<G: GrantTable, E: EventChannels>(
    mut p: QueueParts<G, E>,
    mut grants: Access<G>,
    how: StopMode,
) -> QueueExit {
    let limit = match how {
        StopMode::Close => DRAIN_TIMEOUT,
        StopMode::Handover => HANDOVER_DRAIN,
    };
    let deadline = Instant::now() + limit;
    while p.dataplane.engine_ops() > 0 && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let _ = wait(&p.evtchn, &p.engine, [None, None], PollTimeout::from(ms));
        let mem = p.ring_map.mem();
        match p
            .dataplane
            .drain_completions(&mem, &mut grants, &mut p.engine)
        {
            Ok(true) => {
                let _ = p.evtchn.notify(p.port);
            }
            Ok(false) => {}
            Err(e) => {
                warn!(queue = p.index, error = %crate::chain(&e), "ring broken while draining");
                break;
            }
        }
    }
    let left = p.dataplane.engine_ops();
    match how {
        StopMode::Close => {
            let unanswered = p.dataplane.in_flight();
            if unanswered > 0 {
                warn!(
                    queue = p.index,
                    requests = unanswered,
                    "requests still unanswered when the ring closes; answering them with errors"
                );
                if let Ok(true) = p.dataplane.abandon(&p.ring_map.mem()) {
                    let _ = p.evtchn.notify(p.port);
                }
            }
            if let Some(j) = p.dataplane.take_journal() {
                j.discard();
            }
        }
        StopMode::Handover => {
            if let Some(j) = p.dataplane.journal() {
                // nothing left for the next instance to issue again, or to fence
                j.set_clean(p.dataplane.in_flight() == 0 && left == 0);
            }
        }
    }
    let stats = p.dataplane.stats();
    if left > 0 {
        warn!(
            queue = p.index,
            in_flight = left,
            "engine operations did not finish in time; leaking their buffers"
        );
        // RADOS may still write into these buffers: never free them.
        std::mem::forget(p.engine);
        std::mem::forget(p.dataplane);
        return QueueExit::Leaked(stats, left);
    }
    debug!(queue = p.index, "queue drained");
    QueueExit::Stopped(stats)
}

#[cfg(test)]
mod flood_tests {
    use super::*;

    #[test]
    fn spurious_notifications_beyond_the_budget_cost_a_sleep_each() {
        let mut f = FloodLimit::new(0);
        let t = Instant::now();
        for _ in 0..SPURIOUS_PER_SEC {
            f.spurious();
        }
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "the budget is free"
        );
        assert!(!f.warned);
        let t = Instant::now();
        for _ in 0..20 {
            f.spurious();
        }
        assert!(
            t.elapsed() >= Duration::from_millis(20),
            "past it, 1 ms each"
        );
        assert!(f.warned);
    }
}
