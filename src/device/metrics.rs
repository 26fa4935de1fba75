//! What an operator can see of each disk a `serve` process runs: data-path counters, the
//! negotiated features, the xenbus state, the lock and the last error.
//!
//! Owns: [`QueueMetrics`] (one per ring queue: counters the dataplane bumps where it answers
//! a request, with relaxed atomics), [`DiskStatus`] (one per VBD: what its control thread
//! knows) and [`Registry`] (the disks of one process), plus the serializable snapshots
//! ([`DiskSample`]) the control socket hands to `rbdback status` and the metrics exporter.
//! Trusts: nothing; it only stores what the device layer tells it.
//! Must never: take a lock or allocate on the data path. The dataplane touches only the
//! atomics of its own queue's [`QueueMetrics`]; locks here are taken by control threads and
//! by readers (the control socket), never by a dataplane thread.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rados::{Image, LockStatus};
use crate::xen::DomId;

use super::xenbus::XenbusState;

/// Request classes counted apart (blkif's operations; an indirect request counts as its inner
/// read or write, a barrier as a flush).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// `BLKIF_OP_READ`.
    Read = 0,
    /// `BLKIF_OP_WRITE`.
    Write = 1,
    /// `BLKIF_OP_FLUSH_DISKCACHE`, `BLKIF_OP_WRITE_BARRIER`.
    Flush = 2,
    /// `BLKIF_OP_DISCARD`.
    Discard = 3,
}

/// The classes, in index order, with their label values.
pub const OP_CLASSES: [(OpClass, &str); 4] = [
    (OpClass::Read, "read"),
    (OpClass::Write, "write"),
    (OpClass::Flush, "flush"),
    (OpClass::Discard, "discard"),
];

/// Upper bounds (microseconds, inclusive) of the latency histogram's buckets; one more
/// bucket counts everything slower.
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    50, 100, 200, 300, 500, 750, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 500_000,
    1_000_000, 5_000_000,
];
const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// One fixed-bucket latency histogram of atomics.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, us: u64) {
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn sample(&self) -> LatencySample {
        LatencySample {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum_us: self.sum_us.load(Relaxed),
        }
    }
}

/// Counters and gauges of one ring queue. The queue's dataplane thread is the only writer;
/// readers see each value on its own (relaxed), which is all a scrape needs.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    requests: [AtomicU64; 4],
    bytes: [AtomicU64; 4],
    latency: [Histogram; 4],
    status_error: AtomicU64,
    status_unsupported: AtomicU64,
    inflight_requests: AtomicU64,
    inflight_bytes: AtomicU64,
    ring_capacity: AtomicU64,
    persistent_grants: AtomicU64,
    stalled: AtomicU64,
}

impl QueueMetrics {
    /// A request of `class` was answered after `took`; `bytes` moved (0 when it failed).
    #[inline]
    pub fn answered(&self, class: OpClass, bytes: u64, took: Duration) {
        let i = class as usize;
        if let (Some(r), Some(b), Some(h)) =
            (self.requests.get(i), self.bytes.get(i), self.latency.get(i))
        {
            r.fetch_add(1, Relaxed);
            if bytes > 0 {
                b.fetch_add(bytes, Relaxed);
            }
            h.observe(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        }
    }

    /// A response with `BLKIF_RSP_ERROR` went out.
    #[inline]
    pub fn error(&self) {
        self.status_error.fetch_add(1, Relaxed);
    }

    /// A response with `BLKIF_RSP_EOPNOTSUPP` went out.
    #[inline]
    pub fn unsupported(&self) {
        self.status_unsupported.fetch_add(1, Relaxed);
    }

    /// Requests taken from the ring and not yet answered, and the guest data they buffer.
    #[inline]
    pub fn set_in_flight(&self, requests: usize, bytes: usize) {
        self.inflight_requests.store(requests as u64, Relaxed);
        self.inflight_bytes.store(bytes as u64, Relaxed);
    }

    /// The ring's slots (its capacity; 0 while the queue is not connected).
    pub fn set_ring_capacity(&self, slots: u32) {
        self.ring_capacity.store(u64::from(slots), Relaxed);
    }

    /// Guest pages this queue keeps mapped (persistent grants).
    #[inline]
    pub fn set_persistent_grants(&self, pages: usize) {
        self.persistent_grants.store(pages as u64, Relaxed);
    }

    /// Requests that have waited longer than the timeout policy allows (set by that policy).
    pub fn set_stalled(&self, requests: u64) {
        self.stalled.store(requests, Relaxed);
    }

    /// The queue was disconnected: nothing is in flight or mapped any more.
    pub fn disconnected(&self) {
        self.set_in_flight(0, 0);
        self.set_persistent_grants(0);
        self.set_stalled(0);
        self.ring_capacity.store(0, Relaxed);
    }

    fn sample(&self) -> QueueSample {
        let load = |a: &[AtomicU64; 4]| a.each_ref().map(|v| v.load(Relaxed));
        QueueSample {
            requests: load(&self.requests),
            bytes: load(&self.bytes),
            latency: self.latency.each_ref().map(Histogram::sample),
            status_error: self.status_error.load(Relaxed),
            status_unsupported: self.status_unsupported.load(Relaxed),
            inflight_requests: self.inflight_requests.load(Relaxed),
            inflight_bytes: self.inflight_bytes.load(Relaxed),
            ring_capacity: self.ring_capacity.load(Relaxed),
            persistent_grants: self.persistent_grants.load(Relaxed),
            stalled: self.stalled.load(Relaxed),
        }
    }
}

/// A latency histogram's values: per-bucket counts (not cumulative; bounds in
/// [`LATENCY_BOUNDS_US`], then one for the rest) and their sum in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySample {
    /// Requests per bucket.
    pub buckets: Vec<u64>,
    /// Sum of the observed latencies in microseconds.
    pub sum_us: u64,
}

impl LatencySample {
    /// Requests observed.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn add(&mut self, o: &LatencySample) {
        if self.buckets.len() < o.buckets.len() {
            self.buckets.resize(o.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.sum_us += o.sum_us;
    }
}

/// One queue's values, or a disk's (the sum of its queues).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSample {
    /// Requests answered, by class ([`OP_CLASSES`] order).
    pub requests: [u64; 4],
    /// Bytes moved by requests that succeeded, by class.
    pub bytes: [u64; 4],
    /// Latency from start to answer, by class.
    pub latency: [LatencySample; 4],
    /// Responses with `BLKIF_RSP_ERROR`.
    pub status_error: u64,
    /// Responses with `BLKIF_RSP_EOPNOTSUPP`.
    pub status_unsupported: u64,
    /// Requests taken and not yet answered (their ring slots are outstanding: the ring's fill
    /// is this over `ring_capacity`).
    pub inflight_requests: u64,
    /// Guest data those requests buffer.
    pub inflight_bytes: u64,
    /// Ring slots.
    pub ring_capacity: u64,
    /// Persistently mapped guest pages.
    pub persistent_grants: u64,
    /// Requests the timeout policy counts as stalled.
    pub stalled: u64,
}

impl QueueSample {
    fn add(&mut self, o: &QueueSample) {
        for i in 0..4 {
            self.requests[i] += o.requests[i];
            self.bytes[i] += o.bytes[i];
            self.latency[i].add(&o.latency[i]);
        }
        self.status_error += o.status_error;
        self.status_unsupported += o.status_unsupported;
        self.inflight_requests += o.inflight_requests;
        self.inflight_bytes += o.inflight_bytes;
        self.ring_capacity += o.ring_capacity;
        self.persistent_grants += o.persistent_grants;
        self.stalled += o.stalled;
    }
}

/// What the frontend and the backend agreed on at connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    /// `ring-page-order`.
    pub ring_order: u32,
    /// Queues (`multi-queue-num-queues`, 1 without multi-queue).
    pub queues: u32,
    /// Indirect segments per request the backend accepts (`feature-max-indirect-segments`).
    pub indirect_segments: u32,
    /// Both ends use persistent grants.
    pub persistent: bool,
}

/// The exclusive lock as a sample: `held`, `releasing` (handing it over), `not held`, or
/// `not used` (read-only, no exclusive-lock feature, or an engine that manages it itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockSample {
    /// The state.
    pub state: String,
    /// Times this client handed the lock to another one.
    pub handovers: u64,
}

impl From<LockStatus> for LockSample {
    fn from(l: LockStatus) -> Self {
        LockSample {
            state: l.state.label().to_owned(),
            handovers: l.handovers,
        }
    }
}

/// One disk, as `rbdback status` and the exporter see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSample {
    /// The guest.
    pub domid: DomId,
    /// The virtual device number.
    pub devid: u32,
    /// The pool (`#<id>` when named by id), empty before `params` was read.
    pub pool: String,
    /// The image as `pool/[namespace/]image[@snap]`.
    pub image: String,
    /// The engine serving it (`direct`, `librbd`, `memory`), or the choice before it opened.
    pub engine: String,
    /// The backend's xenbus state.
    pub state: String,
    /// Connected features (`None` while not connected).
    pub negotiated: Option<Negotiated>,
    /// The exclusive lock.
    pub lock: LockSample,
    /// The last error reported for this disk (its `error` node), if any.
    pub last_error: Option<String>,
    /// Counters and gauges, summed over the disk's queues.
    pub io: QueueSample,
}

/// What the control thread of a VBD knows, behind its lock.
#[derive(Debug, Default)]
struct DiskInfo {
    pool: String,
    image: String,
    engine: String,
    state: String,
    negotiated: Option<Negotiated>,
    last_error: Option<String>,
    queues: Vec<Arc<QueueMetrics>>,
    opened: Weak<Image>,
}

/// One VBD's status: written by its control thread, read by the control socket.
#[derive(Debug)]
pub struct DiskStatus {
    domid: DomId,
    devid: u32,
    info: Mutex<DiskInfo>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DiskStatus {
    /// A disk of guest `domid`, device `devid`, nothing known yet.
    pub fn new(domid: DomId, devid: u32) -> Arc<DiskStatus> {
        Arc::new(DiskStatus {
            domid,
            devid,
            info: Mutex::new(DiskInfo {
                state: format!("{:?}", XenbusState::Initialising),
                ..DiskInfo::default()
            }),
        })
    }

    /// The image from `params` (before it is opened): its pool, name and engine choice.
    pub fn set_image(&self, pool: String, image: String, engine: String) {
        let mut i = guard(&self.info);
        i.pool = pool;
        i.image = image;
        i.engine = engine;
    }

    /// The image is open: the engine that serves it, and where to ask for its lock.
    pub fn opened(&self, image: &Arc<Image>) {
        let mut i = guard(&self.info);
        i.engine = engine_label(image);
        i.opened = Arc::downgrade(image);
    }

    /// The backend switched to `state`.
    pub fn set_state(&self, state: XenbusState) {
        guard(&self.info).state = format!("{state:?}");
    }

    /// An error was reported (`None`: the error node was cleared).
    pub fn set_last_error(&self, msg: Option<String>) {
        guard(&self.info).last_error = msg;
    }

    /// Queue `index`'s counters: the same ones across reconnects, so counters only grow.
    pub fn queue(&self, index: usize) -> Arc<QueueMetrics> {
        let mut i = guard(&self.info);
        while i.queues.len() <= index {
            i.queues.push(Arc::new(QueueMetrics::default()));
        }
        i.queues
            .get(index)
            .map_or_else(|| Arc::new(QueueMetrics::default()), Arc::clone)
    }

    /// Connected with `n`.
    pub fn connected(&self, n: Negotiated) {
        guard(&self.info).negotiated = Some(n);
    }

    /// Disconnected: no negotiated features, nothing in flight.
    pub fn disconnected(&self) {
        let mut i = guard(&self.info);
        i.negotiated = None;
        for q in &i.queues {
            q.disconnected();
        }
    }

    /// A snapshot (asks the engine for the lock's state: no cluster round trip).
    pub fn sample(&self) -> DiskSample {
        let i = guard(&self.info);
        let mut io = QueueSample::default();
        for q in &i.queues {
            io.add(&q.sample());
        }
        let lock = i
            .opened
            .upgrade()
            .map_or_else(LockSample::default, |img| img.lock_status().into());
        DiskSample {
            domid: self.domid,
            devid: self.devid,
            pool: i.pool.clone(),
            image: i.image.clone(),
            engine: i.engine.clone(),
            state: i.state.clone(),
            negotiated: i.negotiated,
            lock,
            last_error: i.last_error.clone(),
            io,
        }
    }
}

fn engine_label(image: &Image) -> String {
    match image.info().engine {
        crate::rados::EngineKind::Direct => "direct",
        crate::rados::EngineKind::Librbd => "librbd",
        crate::rados::EngineKind::Memory => "memory",
    }
    .to_owned()
}

/// The disks of one `serve` process.
#[derive(Debug, Default)]
pub struct Registry {
    disks: Mutex<Vec<Arc<DiskStatus>>>,
}

impl Registry {
    /// A new disk's status, listed until [`Registry::remove`].
    pub fn add(&self, domid: DomId, devid: u32) -> Arc<DiskStatus> {
        let d = DiskStatus::new(domid, devid);
        guard(&self.disks).push(Arc::clone(&d));
        d
    }

    /// Forgets `disk` (its VBD ended).
    pub fn remove(&self, disk: &Arc<DiskStatus>) {
        guard(&self.disks).retain(|d| !Arc::ptr_eq(d, disk));
    }

    /// Every disk's snapshot, by device.
    pub fn samples(&self) -> Vec<DiskSample> {
        let disks: Vec<Arc<DiskStatus>> = guard(&self.disks).clone();
        let mut v: Vec<DiskSample> = disks.iter().map(|d| d.sample()).collect();
        v.sort_by_key(|d| (d.domid, d.devid));
        v
    }
}

/// Backend restarts the supervisor made, by guest (`serve` processes started again while
/// their guest still had RBD disks).
#[derive(Debug, Default)]
pub struct Restarts {
    by_domid: Mutex<std::collections::BTreeMap<DomId, u64>>,
}

impl Restarts {
    /// One more restart for `domid`.
    pub fn restarted(&self, domid: DomId) {
        *guard(&self.by_domid).entry(domid).or_insert(0) += 1;
    }

    /// Restarts so far, by guest.
    pub fn counts(&self) -> Vec<(DomId, u64)> {
        guard(&self.by_domid)
            .iter()
            .map(|(d, n)| (*d, *n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_first_bucket_whose_bound_is_not_below_it() {
        let q = QueueMetrics::default();
        q.answered(OpClass::Read, 4096, Duration::from_micros(50));
        q.answered(OpClass::Read, 4096, Duration::from_micros(51));
        q.answered(OpClass::Write, 0, Duration::from_secs(60));
        let s = q.sample();
        let read = &s.latency[0];
        assert_eq!(read.buckets[0], 1, "50 us: the 50 us bucket");
        assert_eq!(read.buckets[1], 1, "51 us: the 100 us bucket");
        assert_eq!(read.sum_us, 101);
        assert_eq!(s.latency[1].buckets[BUCKETS - 1], 1, "beyond the bounds");
        assert_eq!(s.requests, [2, 1, 0, 0]);
        assert_eq!(s.bytes, [8192, 0, 0, 0]);
    }

    #[test]
    fn a_disk_sums_its_queues_and_keeps_counters_across_reconnects() {
        let d = DiskStatus::new(3, 51712);
        d.queue(0).answered(OpClass::Flush, 0, Duration::ZERO);
        d.queue(1).answered(OpClass::Flush, 0, Duration::ZERO);
        d.queue(1).set_in_flight(5, 4096);
        d.disconnected();
        d.queue(1)
            .answered(OpClass::Discard, 1 << 20, Duration::ZERO);
        let s = d.sample();
        assert_eq!(s.io.requests, [0, 0, 2, 1]);
        assert_eq!(s.io.bytes[3], 1 << 20);
        assert_eq!(s.io.inflight_requests, 0, "disconnect clears the gauges");
        assert_eq!(s.io.latency[2].count(), 2);
    }
}
