//! Stall reports: which of a VBD's requests have waited too long for the cluster, and where.
//!
//! Owns: the gauges each queue thread publishes ([`StallGauge`], read by the VBD and by
//! metrics), and the VBD's report built from them ([`StallWatch`]): a log line naming the disk,
//! the oldest request's age and the OSD it waits on, and a `stalled` node under the backend
//! directory, both cleared when the disk recovers.
//! Trusts: the engine's answer about where an object lives (it asks the monitors).
//! Must never: block the VBD's thread on the cluster (finding the OSD runs on a helper thread,
//! bounded by the monitors' operation timeout), or write xenstore on every check (the node is
//! rewritten when the report changes, at most every [`REFRESH`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::rados::{Image, ImageSpec};
use crate::xen::xenstore::Xenstore;

use super::dataplane::Stall;

/// How often a standing report's node is rewritten (the oldest request's age in it).
pub const REFRESH: Duration = Duration::from_secs(5);
/// How often a standing stall is logged again.
const RELOG: Duration = Duration::from_secs(60);

/// One queue's view of its waiting requests, published by its thread (lock-free: plain
/// atomics, read by whoever reports).
#[derive(Debug, Default)]
pub struct StallGauge {
    stalled: AtomicU64,
    oldest_ms: AtomicU64,
    oldest_offset: AtomicU64,
    timeouts: AtomicU64,
}

/// A snapshot of one gauge (or of a VBD's gauges together).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StallReading {
    /// Requests waiting longer than `stall_warn` (answered after a timeout or not).
    pub stalled: u64,
    /// Age of the oldest waiting request (zero: none waits).
    pub oldest: Duration,
    /// Byte offset of that request.
    pub oldest_offset: u64,
    /// Requests failed by `io_timeout` so far.
    pub timeouts: u64,
}

impl StallGauge {
    /// Publishes a queue's state (called by its thread).
    pub fn publish(&self, s: &Stall, timeouts: u64) {
        let ms = s
            .oldest
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.stalled.store(s.stalled as u64, Ordering::Relaxed);
        self.oldest_offset.store(s.oldest_offset, Ordering::Relaxed);
        self.oldest_ms.store(ms, Ordering::Relaxed);
        self.timeouts.store(timeouts, Ordering::Relaxed);
    }

    /// What was last published.
    pub fn read(&self) -> StallReading {
        StallReading {
            stalled: self.stalled.load(Ordering::Relaxed),
            oldest: Duration::from_millis(self.oldest_ms.load(Ordering::Relaxed)),
            oldest_offset: self.oldest_offset.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
        }
    }

    /// Whether anything is published (then an idle queue clears it).
    pub fn is_set(&self) -> bool {
        self.oldest_ms.load(Ordering::Relaxed) != 0 || self.stalled.load(Ordering::Relaxed) != 0
    }
}

/// The VBD's gauges read together: the stalled requests summed, the oldest one kept.
pub fn combined(gauges: &[Arc<StallGauge>]) -> StallReading {
    let mut all = StallReading::default();
    for g in gauges {
        let r = g.read();
        all.stalled += r.stalled;
        all.timeouts += r.timeouts;
        if r.oldest > all.oldest {
            all.oldest = r.oldest;
            all.oldest_offset = r.oldest_offset;
        }
    }
    all
}

/// A stall being reported.
#[derive(Debug)]
struct Standing {
    since: Instant,
    written: Instant,
    logged: Instant,
    /// Where the oldest request waits, once known.
    place: Option<String>,
    /// The report as last written.
    text: String,
    /// The answer of the helper thread that asks the cluster.
    locating: Option<Receiver<String>>,
    /// When the cluster was last asked (again every [`RELOG`]: a placement group's state
    /// changes, `laggy` may come only after the OSD woke up).
    located: Option<Instant>,
}

/// The VBD's stall report: checks its queues' gauges and says when requests wait too long
/// for the cluster (`<backend>/stalled` and the log) and when they no longer do.
#[derive(Debug, Default)]
pub struct StallWatch {
    gauges: Vec<Arc<StallGauge>>,
    standing: Option<Standing>,
}

impl StallWatch {
    /// Watches these queues' gauges (a reconnect gives new ones).
    pub fn set_gauges(&mut self, gauges: Vec<Arc<StallGauge>>) {
        self.gauges = gauges;
    }

    /// The standing report (what the `stalled` node says), if the disk is stalled.
    pub fn report(&self) -> Option<&str> {
        self.standing.as_ref().map(|s| s.text.as_str())
    }

    /// The queues' gauges read together (for metrics and status).
    pub fn reading(&self) -> StallReading {
        combined(&self.gauges)
    }

    /// Checks the gauges; reports a new stall, refreshes a standing one, clears a past one.
    /// `node` is the absolute path of the `stalled` node; `disk` names the image in the log;
    /// `image` answers where an offset's data lives.
    pub fn check(
        &mut self,
        xs: &Xenstore,
        node: &str,
        disk: Option<&ImageSpec>,
        image: Option<&Arc<Image>>,
    ) {
        let disk = || disk.map(ToString::to_string).unwrap_or_default();
        let now = Instant::now();
        let r = combined(&self.gauges);
        if r.stalled == 0 {
            if let Some(s) = self.standing.take() {
                info!(
                    disk = disk(),
                    stalled_for_s = s.since.elapsed().as_secs(),
                    "disk recovered: no request waits for the cluster any more"
                );
                if let Err(e) = xs.rm(node) {
                    warn!(error = %e, "cannot remove the stalled node");
                }
            }
            return;
        }
        let fresh = self.standing.is_none();
        let s = self.standing.get_or_insert_with(|| Standing {
            since: now,
            written: now,
            logged: now,
            place: None,
            text: String::new(),
            locating: None,
            located: None,
        });
        let mut changed = fresh;
        if s.locating.is_none() && s.located.is_none_or(|t| now.duration_since(t) >= RELOG) {
            s.located = Some(now);
            s.locating = image.map(|img| locate(img, r.oldest_offset));
        }
        if let Some(rx) = &s.locating {
            match rx.try_recv() {
                Ok(place) => {
                    changed |= s.place.as_deref() != Some(place.as_str());
                    s.place = Some(place);
                    s.locating = None;
                }
                Err(TryRecvError::Disconnected) => {
                    s.place = Some("unknown (the cluster did not say)".into());
                    s.locating = None;
                }
                Err(TryRecvError::Empty) => {}
            }
        }
        let place = s.place.as_deref().unwrap_or("(asking the cluster)");
        let text = format!(
            "{} requests waiting for the cluster, the oldest for {} s (byte {}); it waits on {place}",
            r.stalled,
            r.oldest.as_secs(),
            r.oldest_offset
        );
        if fresh || (changed && s.place.is_some()) || now.duration_since(s.logged) >= RELOG {
            s.logged = now;
            warn!(
                disk = disk(),
                stalled = r.stalled,
                oldest_s = r.oldest.as_secs(),
                offset = r.oldest_offset,
                timeouts = r.timeouts,
                "disk stalled: {text}"
            );
        }
        s.text.clone_from(&text);
        if changed || now.duration_since(s.written) >= REFRESH {
            s.written = now;
            if let Err(e) = xs.write(node, &text) {
                warn!(error = %e, "cannot write the stalled node");
            }
        }
    }

    /// Removes the report (the disk disconnects).
    pub fn clear(&mut self, xs: &Xenstore, node: &str) {
        if self.standing.take().is_some() {
            let _ = xs.rm(node);
        }
    }
}

/// Asks the cluster, on a helper thread, where the data at `offset` lives.
fn locate(image: &Arc<Image>, offset: u64) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let img = Arc::clone(image);
    let spawned = std::thread::Builder::new()
        .name("rbdback-locate".into())
        .spawn(move || {
            let place = match img.locate(offset) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    "unknown (the librbd engine does not say where its objects live)".into()
                }
                Err(e) => format!("unknown ({})", crate::chain(&e)),
            };
            let _ = tx.send(place);
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the thread that finds the OSD");
    }
    rx
}
