//! One blocking cluster call in flight per volume (and kind: opens at stage, size reads at
//! expand, usage counts at stats). A cluster that does not answer holds the thread that asked
//! it for as long as it stays silent; kubelet retries a call that timed out, and without this
//! every retry would leave one more such thread behind.
//!
//! Owns: the threads it starts (named for their kind, so they can be counted) and, per
//! volume, the one that is running or its result that nobody has collected yet.
//! Trusts: the work it is given to end some day (librados' own timeouts, or the cluster).
//! Must never: start a second thread for a volume whose first is still running, let more
//! than one call wait on a volume's thread (the others are told so at once), or hand out a
//! result older than its keep time or made for other parameters (a changed request).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// What became of a call.
#[derive(Debug)]
pub(crate) enum Flight<T> {
    /// The work finished: while this call waited, or before it, with nobody waiting.
    Done(T),
    /// Still running when the wait ended; it has been running this long. It goes on, and the
    /// next call for the volume waits for it (or takes its result).
    Running(Duration),
    /// Another call is waiting for this volume's work.
    Busy,
    /// Work with other parameters is running for this volume.
    Other,
}

type Outcome<T> = (T, Instant);

#[derive(Debug)]
struct Slot<T> {
    /// The parameters the work was started with.
    key: String,
    started: Instant,
    /// `None` while a call waits on it.
    rx: Option<oneshot::Receiver<Outcome<T>>>,
}

type Slots<T> = Arc<Mutex<HashMap<String, Slot<T>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The volumes' threads of one kind.
#[derive(Debug)]
pub(crate) struct Flights<T> {
    slots: Slots<T>,
    /// The threads' name.
    thread: &'static str,
    /// How long an uncollected result stays usable.
    keep: Duration,
}

/// A call waiting on a volume's thread; if the call goes away (it timed out, or its client
/// hung up and tonic dropped it), the thread's receiver goes back to the volume's slot.
struct Waiter<T> {
    slots: Slots<T>,
    volume: String,
    rx: oneshot::Receiver<Outcome<T>>,
    done: bool,
}

impl<T> Drop for Waiter<T> {
    fn drop(&mut self) {
        let mut slots = lock(&self.slots);
        if self.done {
            slots.remove(&self.volume);
            return;
        }
        let (_, rx) = oneshot::channel();
        let rx = std::mem::replace(&mut self.rx, rx);
        if let Some(slot) = slots.get_mut(&self.volume) {
            slot.rx = Some(rx);
        }
    }
}

impl<T: Send + 'static> Flights<T> {
    /// Threads named `thread`; results kept `keep` for a later call.
    pub(crate) fn new(thread: &'static str, keep: Duration) -> Flights<T> {
        Flights {
            slots: Arc::new(Mutex::new(HashMap::new())),
            thread,
            keep,
        }
    }

    /// Runs `work` for `volume` with parameters `key` on a thread of its own, unless one is
    /// running for the volume already (then this call waits for that one, if it has the same
    /// parameters and nobody else waits); waits at most `wait`.
    pub(crate) async fn run(
        &self,
        volume: &str,
        key: &str,
        wait: Duration,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Flight<T>, std::io::Error> {
        let (rx, started) = {
            let mut slots = lock(&self.slots);
            match self.take(&mut slots, volume, key) {
                Ok(Some(joined)) => joined,
                Ok(None) => {
                    let (tx, rx) = oneshot::channel();
                    std::thread::Builder::new()
                        .name(self.thread.to_owned())
                        .spawn(move || {
                            let v = work();
                            // nobody may be waiting any more: the result stays in the channel
                            let _ = tx.send((v, Instant::now()));
                        })?;
                    let started = Instant::now();
                    slots.insert(
                        volume.to_owned(),
                        Slot {
                            key: key.to_owned(),
                            started,
                            rx: None,
                        },
                    );
                    (rx, started)
                }
                Err(f) => return Ok(f),
            }
        };
        let mut w = Waiter {
            slots: Arc::clone(&self.slots),
            volume: volume.to_owned(),
            rx,
            done: false,
        };
        match tokio::time::timeout(wait, &mut w.rx).await {
            Ok(Ok((v, _))) => {
                w.done = true;
                Ok(Flight::Done(v))
            }
            Ok(Err(_)) => {
                w.done = true;
                Err(std::io::Error::other(format!(
                    "the {} thread ended without an answer",
                    self.thread
                )))
            }
            Err(_) => Ok(Flight::Running(started.elapsed())),
        }
    }

    /// What is there for `volume`: `Ok(Some(receiver))` to wait on, `Ok(None)` to start
    /// anew, or an answer.
    #[allow(clippy::type_complexity)]
    fn take(
        &self,
        slots: &mut HashMap<String, Slot<T>>,
        volume: &str,
        key: &str,
    ) -> Result<Option<(oneshot::Receiver<Outcome<T>>, Instant)>, Flight<T>> {
        let Some(slot) = slots.get_mut(volume) else {
            return Ok(None);
        };
        let Some(mut rx) = slot.rx.take() else {
            return Err(Flight::Busy);
        };
        match rx.try_recv() {
            Ok((v, finished)) => {
                let fresh = slot.key == key && finished.elapsed() <= self.keep;
                slots.remove(volume);
                if fresh {
                    Err(Flight::Done(v))
                } else {
                    Ok(None)
                }
            }
            Err(oneshot::error::TryRecvError::Empty) if slot.key != key => {
                slot.rx = Some(rx);
                Err(Flight::Other)
            }
            Err(oneshot::error::TryRecvError::Empty) => Ok(Some((rx, slot.started))),
            Err(oneshot::error::TryRecvError::Closed) => {
                slots.remove(volume);
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Work that runs until `gate` opens, counting its starts.
    fn gated(
        starts: &Arc<AtomicUsize>,
        gate: &Arc<Mutex<bool>>,
        v: u32,
    ) -> impl FnOnce() -> u32 + Send + 'static {
        let (starts, gate) = (Arc::clone(starts), Arc::clone(gate));
        move || {
            starts.fetch_add(1, Ordering::SeqCst);
            while !*lock(&gate) {
                std::thread::sleep(Duration::from_millis(5));
            }
            v
        }
    }

    #[test]
    fn a_retry_waits_for_the_running_work_and_gets_its_result() {
        let rt = rt();
        let f = Flights::new("test-flight", Duration::from_secs(60));
        let starts = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Mutex::new(false));
        let short = Duration::from_millis(50);
        for _ in 0..3 {
            let r = rt.block_on(f.run("v", "k", short, gated(&starts, &gate, 1)));
            assert!(matches!(r.unwrap(), Flight::Running(_)));
        }
        assert_eq!(
            starts.load(Ordering::SeqCst),
            1,
            "one thread for the volume"
        );
        // other parameters while it runs: refused, nothing started
        let r = rt.block_on(f.run("v", "k2", short, gated(&starts, &gate, 2)));
        assert!(matches!(r.unwrap(), Flight::Other));
        // another volume has its own
        let r = rt.block_on(f.run("w", "k", short, gated(&starts, &gate, 3)));
        assert!(matches!(r.unwrap(), Flight::Running(_)));
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        *lock(&gate) = true;
        let r = rt.block_on(f.run("v", "k", Duration::from_secs(10), || 9));
        assert!(
            matches!(r.unwrap(), Flight::Done(1)),
            "the first work's result"
        );
        // collected: the next call starts anew
        let r = rt.block_on(f.run("v", "k", Duration::from_secs(10), || 9));
        assert!(matches!(r.unwrap(), Flight::Done(9)));
    }

    #[test]
    fn a_result_nobody_waited_for_is_kept_for_the_next_call_then_forgotten() {
        let rt = rt();
        let f = Flights::new("test-flight", Duration::from_millis(300));
        let starts = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Mutex::new(false));
        let r = rt.block_on(f.run(
            "v",
            "k",
            Duration::from_millis(20),
            gated(&starts, &gate, 1),
        ));
        assert!(matches!(r.unwrap(), Flight::Running(_)));
        *lock(&gate) = true;
        std::thread::sleep(Duration::from_millis(100));
        let r = rt.block_on(f.run("v", "k", Duration::ZERO, || 2));
        assert!(matches!(r.unwrap(), Flight::Done(1)), "kept");
        // a result left for longer than the keep time is not used
        let gate2 = Arc::new(Mutex::new(false));
        let r = rt.block_on(f.run(
            "v",
            "k",
            Duration::from_millis(20),
            gated(&starts, &gate2, 3),
        ));
        assert!(matches!(r.unwrap(), Flight::Running(_)));
        *lock(&gate2) = true;
        std::thread::sleep(Duration::from_millis(400));
        let r = rt.block_on(f.run("v", "k", Duration::from_secs(10), || 4));
        assert!(matches!(r.unwrap(), Flight::Done(4)));
    }

    #[test]
    fn a_second_caller_while_one_waits_is_told_busy() {
        let rt = rt();
        let f = Arc::new(Flights::new("test-flight", Duration::from_secs(60)));
        let starts = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Mutex::new(false));
        rt.block_on(async {
            let f2 = Arc::clone(&f);
            let work = gated(&starts, &gate, 1);
            let first =
                tokio::spawn(async move { f2.run("v", "k", Duration::from_secs(10), work).await });
            tokio::time::sleep(Duration::from_millis(50)).await;
            let r = f.run("v", "k", Duration::from_secs(10), || 2).await;
            assert!(matches!(r.unwrap(), Flight::Busy));
            *lock(&gate) = true;
            assert!(matches!(first.await.unwrap().unwrap(), Flight::Done(1)));
        });
        assert_eq!(starts.load(Ordering::SeqCst), 1);
    }
}
