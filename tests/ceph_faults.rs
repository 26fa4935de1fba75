//! Ceph faults under a checksummed workload through the whole stack (simulated Xen, the real
//! backend, the private cluster `target/ceph-faults`, one test at a time: see
//! `.config/nextest.toml`): what the guest and the operator see, and how long recovery takes.
//! Every test verifies what the guest read while it ran and compares `rbd export` with what it
//! wrote. The figures each prints go to docs/operations.md.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rbdback::device::testfront::{
    spawn_serve, toolstack_attach, toolstack_detach, AttachSpec, Done, RunReport, SimBlkfront,
    Workload,
};
use rbdback::device::vbd::Options;
use rbdback::rados::testing::{one, private_cluster, wait_all, Revive, TestCluster, MON, OSD};
use rbdback::rados::{BlockOp, EngineChoice, Image, ImageSpec};
use rbdback::ring::Status;
use rbdback::xen::sim::SimXen;
use rbdback::xen::xenstore::Xenstore;
use rbdback::xen::{Platform, XenError};

const T: Duration = Duration::from_secs(60);
const GUEST: u16 = 11;
/// The workload's span: the first 16 MiB (four objects).
const SPAN: u64 = 16 << 11;

/// Everything the backend logged in this test process (each test runs in its own).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(b);
        std::io::stderr().write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}

fn faults() -> &'static TestCluster {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("rbdback=info")),
        )
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
    private_cluster("faults")
}

/// The backend serving one guest disk on the faults cluster.
struct Rig {
    c: &'static TestCluster,
    xen: Arc<SimXen>,
    stop: mpsc::Sender<()>,
    server: JoinHandle<Result<rbdback::device::backend::ServeEnd, XenError>>,
    dom0: Xenstore,
    be: String,
    pool: String,
    image: String,
}

impl Rig {
    /// Serves a new 64 MiB image of `pool` (direct engine, 2 queues), `extra` appended to
    /// its `params`.
    fn new(pool: &str, prefix: &str, extra: &str) -> (Rig, SimBlkfront) {
        let c = faults();
        let image = format!("{prefix}-{}", std::process::id());
        c.rbd(&["create", "--size", "64M", &format!("{pool}/{image}")]);
        let xen = SimXen::start().unwrap();
        let (stop, server) = spawn_serve(&xen, GUEST, false, Options::default());
        let dom0 = xen.platform().xenstore().unwrap();
        let params = format!(
            "rbd:{pool}/{image}:conf={}:engine=direct{extra}",
            c.conf.display()
        );
        let mut spec = AttachSpec::new(&params);
        spec.queues = 2;
        let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
        let f = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
        let rig = Rig {
            c,
            xen,
            stop,
            server,
            dom0,
            be,
            pool: pool.to_owned(),
            image,
        };
        (rig, f)
    }

    fn stalled_node(&self) -> Option<String> {
        self.dom0.read(&format!("{}/stalled", self.be)).unwrap()
    }

    /// Closes the disk, stops the backend and compares `rbd export` with the model.
    fn finish(self, mut f: SimBlkfront, r: &RunReport) {
        f.close(T).unwrap();
        toolstack_detach(&self.dom0, &self.be).unwrap();
        let _ = self.stop.send(());
        self.server.join().unwrap().unwrap();
        drop(self.xen);
        let path = std::env::temp_dir().join(format!("rbdback-fault-{}", self.image));
        let p = path.display().to_string();
        let _ = std::fs::remove_file(&path);
        self.c.rbd(&[
            "export",
            "--no-progress",
            &format!("{}/{}", self.pool, self.image),
            &p,
        ]);
        let export = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let bad = r.diff_image(&export, (export.len() / 4096) as u64);
        assert!(
            bad.is_empty(),
            "{} blocks differ from what the guest wrote, e.g. {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
    }
}

/// A workload running on its own thread until stopped; every answer is kept.
struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(SimBlkfront, RunReport, Vec<Done>)>,
    t0: Instant,
}

fn start_workload(f: SimBlkfront, seed: u64) -> Running {
    start_workload_over(f, seed, SPAN)
}

/// A workload over the first `span` sectors.
fn start_workload_over(mut f: SimBlkfront, seed: u64, span: u64) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let t0 = Instant::now();
    let thread = std::thread::spawn(move || {
        let w = Workload {
            qd: 8,
            write_pct: 60,
            span_sectors: span,
            seed,
            verify: true,
            indirect_every: 0,
            flush_every: 0,
            latencies: false,
        };
        let mut log = Vec::new();
        let r = w
            .run(&mut f, |_| !s2.load(Ordering::Relaxed), |_, d| log.push(*d))
            .unwrap();
        (f, r, log)
    });
    Running { stop, thread, t0 }
}

impl Running {
    fn stop(self) -> (SimBlkfront, RunReport, Vec<Done>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// A workload run around one fault.
struct Faulted {
    f: SimBlkfront,
    r: RunReport,
    log: Vec<Done>,
    /// When the workload started.
    t0: Instant,
    /// When the fault began and when it ended (`fault` returned).
    began: Instant,
    ended: Instant,
}

/// Runs the workload 5 s, then `fault` (it returns when the fault is over), then `settle`
/// longer, and stops the workload.
fn around(f: SimBlkfront, seed: u64, settle: Duration, fault: impl FnOnce()) -> Faulted {
    let w = start_workload(f, seed);
    std::thread::sleep(secs(5));
    let began = Instant::now();
    fault();
    let ended = Instant::now();
    std::thread::sleep(settle);
    let t0 = w.t0;
    let (f, r, log) = w.stop();
    Faulted {
        f,
        r,
        log,
        t0,
        began,
        ended,
    }
}

/// How the guest lived through a fault that ended at `resumed`.
#[derive(Debug)]
struct Recovery {
    /// From the end of the fault to the first answer.
    first_answer: Duration,
    /// From the end of the fault until every request issued before it was answered.
    backlog_answered: Duration,
    /// The longest any request waited.
    longest: Duration,
}

fn recovery(log: &[Done], resumed: Instant) -> Recovery {
    let after = |d: &Done| d.answered.saturating_duration_since(resumed);
    Recovery {
        first_answer: log
            .iter()
            .filter(|d| d.answered >= resumed)
            .map(after)
            .min()
            .expect("no answer after the fault ended"),
        backlog_answered: log
            .iter()
            .filter(|d| d.issued < resumed)
            .map(after)
            .max()
            .unwrap_or_default(),
        longest: log
            .iter()
            .map(|d| d.answered - d.issued)
            .max()
            .unwrap_or_default(),
    }
}

/// Answers per second since `t0` (what a guest's iostat would show), for the log.
fn per_second(log: &[Done], t0: Instant) -> BTreeMap<u64, (u32, u32)> {
    let mut m = BTreeMap::new();
    for d in log {
        let e = m
            .entry(d.answered.saturating_duration_since(t0).as_secs())
            .or_insert((0, 0));
        if d.status == Status::Okay {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    m
}

fn report(name: &str, log: &[Done], r: &RunReport, t0: Instant, rec: Option<&Recovery>) {
    eprintln!(
        "{name}: {} requests, {} errors, {} mismatches, {} reads checked; {rec:?}",
        r.completed, r.errors, r.mismatches, r.reads_checked
    );
    eprintln!("{name}: (ok, errors) per second: {:?}", per_second(log, t0));
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// How late after a fault ends every request it held must be answered. krbd's guest in the
/// issue's bed completed its next job 7.7 s after the OSD continued; the bound is that, so a
/// regression to the slower paths (a lock re-acquired after seconds of retries, a watch
/// re-registered on a 10 s timer, a resend after a 5 s objecter tick) fails here. Measured
/// figures: docs/operations.md.
const RECOVERY_BOUND: Duration = Duration::from_secs(8);

/// The OSD frozen (SIGSTOP) for 20 s: the default policy waits, no error reaches the guest,
/// the stall is reported (stall_warn=3) and cleared, and every held request is answered at
/// once after SIGCONT.
#[test]
fn osd_frozen_for_20s_then_continued() {
    let (rig, f) = Rig::new("rbd", "fault-stop", ":stall_warn=3");
    let _revive = Revive(rig.c);
    let (mut node, mut t_node) = (None, Instant::now());
    let x = around(f, 1, secs(15), || {
        rig.c.daemon("stop", OSD);
        std::thread::sleep(secs(10));
        (node, t_node) = (rig.stalled_node(), Instant::now());
        std::thread::sleep(secs(10));
        rig.c.daemon("cont", OSD);
    });
    let (f, r, log, t0, t_stop, t_cont) = (x.f, x.r, x.log, x.t0, x.began, x.ended);
    let rec = recovery(&log, t_cont);
    report("osd stop 20 s", &log, &r, t0, Some(&rec));
    assert_eq!((r.errors, r.mismatches), (0, 0));
    assert!(
        rec.longest >= secs(19),
        "requests waited through the freeze"
    );
    assert!(
        rec.first_answer <= rec.backlog_answered && rec.backlog_answered <= RECOVERY_BOUND,
        "{rec:?} after SIGCONT"
    );
    // the operator saw which disk, how long and where, and the report went away
    let node = node.expect("no stalled node during the freeze");
    assert!(
        node.contains("requests waiting for the cluster")
            && node.contains("osd.0 (placement group")
            && node.contains("active"),
        "{node}"
    );
    assert_eq!(rig.stalled_node(), None);
    let text = log_text();
    assert!(text.contains("disk stalled"), "no stall in the log");
    assert!(text.contains("disk recovered"), "no recovery in the log");
    eprintln!("stalled node {:?} after SIGSTOP: {node}", t_node - t_stop);
    rig.finish(f, &r);
}

/// With io_timeout=5 the requests the frozen OSD holds fail after 5 s (named in the log),
/// nothing else fails, and the disk works again after SIGCONT; data written before, during and
/// after is what the guest reads back (a failed write may or may not have landed).
#[test]
fn osd_frozen_with_io_timeout_fails_only_the_stuck_requests() {
    let (rig, f) = Rig::new("rbd", "fault-timeout", ":io_timeout=5:stall_warn=3");
    let _revive = Revive(rig.c);
    let x = around(f, 3, secs(15), || {
        rig.c.daemon("stop", OSD);
        std::thread::sleep(secs(20));
        rig.c.daemon("cont", OSD);
    });
    let (f, r, log, t0, t_stop, t_cont) = (x.f, x.r, x.log, x.t0, x.began, x.ended);
    report("osd stop 20 s, io_timeout=5", &log, &r, t0, None);
    let failed: Vec<&Done> = log.iter().filter(|d| d.status != Status::Okay).collect();
    assert!(!failed.is_empty(), "nothing timed out");
    for d in &failed {
        let waited = d.answered - d.issued;
        assert!(
            waited >= Duration::from_millis(4900) && waited < secs(7),
            "a request failed after {waited:?}"
        );
        assert!(
            d.issued >= t_stop - secs(1) && d.issued < t_cont,
            "a request failed that was issued {:?} after the OSD continued",
            d.issued.saturating_duration_since(t_cont)
        );
    }
    let after_ok = log
        .iter()
        .filter(|d| d.issued >= t_cont && d.status == Status::Okay)
        .count();
    assert!(after_ok > 100, "the disk did not work again: {after_ok}");
    assert_eq!(r.mismatches, 0);
    let text = log_text();
    assert!(
        text.contains("failed to the guest") && text.contains("io_timeout"),
        "timed-out requests not named in the log"
    );
    rig.finish(f, &r);
}

/// The OSD killed (SIGKILL) and started again 10 s later: the guest waits, sees no error.
#[test]
fn osd_killed_and_restarted_after_10s() {
    let (rig, f) = Rig::new("rbd", "fault-kill", "");
    let _revive = Revive(rig.c);
    let mut t_start = Instant::now();
    let x = around(f, 2, secs(15), || {
        rig.c.daemon("kill", OSD);
        std::thread::sleep(secs(10));
        t_start = Instant::now();
        rig.c.daemon("start", OSD); // returns once the map has it up
    });
    let (f, r, log, t0, t_up) = (x.f, x.r, x.log, x.t0, x.ended);
    let rec = recovery(&log, t_up);
    report("osd kill, restart after 10 s", &log, &r, t0, Some(&rec));
    eprintln!("osd up {:?} after its start", t_up - t_start);
    assert_eq!((r.errors, r.mismatches), (0, 0));
    assert!(
        rec.backlog_answered <= RECOVERY_BOUND,
        "{:?} after the OSD was up",
        rec.backlog_answered
    );
    rig.finish(f, &r);
}

/// The monitor killed and started again 10 s later: the data path does not need it; the
/// guest sees nothing.
#[test]
fn monitor_restarted() {
    let (rig, f) = Rig::new("rbd", "fault-mon", "");
    let _revive = Revive(rig.c);
    let x = around(f, 4, secs(10), || {
        rig.c.daemon("kill", MON);
        std::thread::sleep(secs(10));
        rig.c.daemon("start", MON);
    });
    let (f, r, log, t0, t_kill, t_up) = (x.f, x.r, x.log, x.t0, x.began, x.ended);
    report("monitor restart", &log, &r, t0, None);
    assert_eq!((r.errors, r.mismatches), (0, 0));
    let during = log
        .iter()
        .filter(|d| d.answered > t_kill && d.answered < t_up)
        .count();
    assert!(
        during > 100,
        "only {during} answers while the monitor was down"
    );
    rig.finish(f, &r);
}

/// Pool `name` on the faults cluster (created and initialised for RBD once).
fn pool(c: &TestCluster, name: &str) {
    let pools = c.ceph(&["osd", "pool", "ls"]);
    if !pools.lines().any(|l| l.trim() == name) {
        c.ceph(&["osd", "pool", "create", name, "8", "8", "replicated"]);
        c.rbd(&["pool", "init", name]);
    }
}

fn set_quota(c: &TestCluster, name: &str, bytes: u64) {
    c.ceph(&[
        "osd",
        "pool",
        "set-quota",
        name,
        "max_bytes",
        &bytes.to_string(),
    ]);
}

/// The pool's quota reached: writes fail (named: `Disk quota exceeded`), reads go on, and
/// the disk writes again once the quota is raised, with nobody touching the backend.
#[test]
fn pool_quota_reached_then_raised() {
    let c = faults();
    pool(c, "quota");
    set_quota(c, "quota", 0);
    let (rig, f) = Rig::new("quota", "fault-quota", "");
    // over 48 MiB: writes that would grow the pool keep coming after it is full
    let w = start_workload_over(f, 5, 48 << 11);
    std::thread::sleep(secs(1));
    // below what the workload has written already: the pool is full as soon as the
    // monitors see its usage
    set_quota(c, "quota", 4 << 20);
    let t_quota = Instant::now();
    let deadline = Instant::now() + secs(90);
    while !log_text().contains("EDQUOT") {
        assert!(Instant::now() < deadline, "writes never failed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let t_full = Instant::now();
    std::thread::sleep(secs(5));
    set_quota(c, "quota", 0);
    let t_raised = Instant::now();
    std::thread::sleep(secs(20));
    let t0 = w.t0;
    let (f, r, log) = w.stop();
    report("pool quota", &log, &r, t0, None);
    eprintln!(
        "writes failed {:?} after the quota was set",
        t_full - t_quota
    );
    let failed: Vec<&Done> = log.iter().filter(|d| d.status != Status::Okay).collect();
    assert!(!failed.is_empty());
    assert!(failed.iter().all(|d| d.write), "a read failed");
    let reads_while_full = log
        .iter()
        .filter(|d| {
            !d.write && d.status == Status::Okay && d.answered > t_full && d.answered < t_raised
        })
        .count();
    assert!(reads_while_full > 50, "reads stopped: {reads_while_full}");
    let last_error = failed.iter().map(|d| d.answered).max().unwrap();
    let writes_after = log
        .iter()
        .filter(|d| d.write && d.status == Status::Okay && d.issued > last_error)
        .count();
    assert!(
        writes_after > 100,
        "writes did not come back: {writes_after}"
    );
    eprintln!(
        "last write error {:?} after the quota was raised",
        last_error.saturating_duration_since(t_raised)
    );
    assert_eq!(r.mismatches, 0);
    rig.finish(f, &r);
}

/// The address of the image's watcher (our client), as `rbd status` shows it.
fn watcher(c: &TestCluster, pool: &str, image: &str) -> String {
    let st = String::from_utf8_lossy(&c.rbd(&["status", &format!("{pool}/{image}")])).into_owned();
    st.split_whitespace()
        .find_map(|w| w.strip_prefix("watcher="))
        .unwrap_or_else(|| panic!("no watcher: {st}"))
        .to_owned()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Instant::now()
}

/// An operator blocklists our client (`ceph osd blocklist add`): requests fail naming the
/// fence, the error node says how to recover, and writing `<backend>/reopen` re-opens the
/// image with a new client while the guest keeps its disk; the guest's data is intact.
#[test]
fn blocklisted_client_is_named_and_reopened_without_a_detach() {
    let (rig, f) = Rig::new("rbd", "fault-fence", "");
    let err_node = format!(
        "/local/domain/0/error/backend/vbd/{GUEST}/{}/error",
        rig.be.rsplit('/').next().unwrap()
    );
    let w = start_workload(f, 6);
    std::thread::sleep(secs(5));
    let addr = watcher(rig.c, &rig.pool, &rig.image);
    rig.c.ceph(&["osd", "blocklist", "add", &addr]);
    let t_fence = Instant::now();
    let t_named = wait_for("the fence named in the log", secs(60), || {
        log_text().contains("this client was blocklisted by the cluster")
    });
    let msg = wait_for("the error node", secs(10), || {
        rig.dom0.read(&err_node).unwrap().is_some()
    });
    let node = rig.dom0.read(&err_node).unwrap().unwrap_or_default();
    assert!(
        node.contains("blocklisted") && node.contains("/reopen"),
        "{node}"
    );
    std::thread::sleep(secs(2));
    rig.dom0.write(&format!("{}/reopen", rig.be), "1").unwrap();
    let t_reopen = Instant::now();
    wait_for("the re-open", secs(60), || {
        log_text().contains("image re-opened with a new client")
    });
    std::thread::sleep(secs(15));
    let t0 = w.t0;
    let (f, r, log) = w.stop();
    report("blocklist, re-open", &log, &r, t0, None);
    let first_ok_write = log
        .iter()
        .filter(|d| d.write && d.status == Status::Okay && d.issued > t_reopen)
        .map(|d| d.answered - t_reopen)
        .min()
        .expect("no write after the re-open");
    eprintln!(
        "fence named {:?} after the blocklist, error node {:?}; first write {first_ok_write:?} after the re-open request",
        t_named - t_fence,
        msg - t_fence
    );
    assert!(r.errors > 0, "the fence did not reach the guest");
    let late_errors = log
        .iter()
        .filter(|d| d.status != Status::Okay && d.issued > t_reopen + first_ok_write)
        .count();
    assert_eq!(late_errors, 0, "errors after the re-open");
    assert!(
        log.iter()
            .filter(|d| d.issued > t_reopen + first_ok_write)
            .count()
            > 100
    );
    assert_eq!(r.mismatches, 0);
    assert_eq!(rig.dom0.read(&err_node).unwrap(), None, "error node left");
    assert_eq!(rig.dom0.read(&format!("{}/reopen", rig.be)).unwrap(), None);
    rig.finish(f, &r);
}

/// A control-path call the frozen OSD leaves unanswered (the lock request a write needs)
/// fails after the image's control timeout (2 s here), is named in the log and retried,
/// instead of holding the control thread until the OSD answers; the write goes through once
/// the OSD continues.
#[test]
fn control_calls_are_bounded_while_the_osd_is_frozen() {
    let c = faults();
    let _revive = Revive(c);
    let image = format!("fault-ctl-{}", std::process::id());
    c.rbd(&["create", "--size", "8M", &format!("rbd/{image}")]);
    let mut spec = ImageSpec::new("rbd", &image);
    spec.conf = Some(c.conf.display().to_string());
    spec.engine = EngineChoice::Direct;
    spec.control_timeout = secs(2);
    let img = Image::open(&spec).unwrap();
    let mut q = img.queue().unwrap();
    c.daemon("stop", OSD);
    let t_stop = Instant::now();
    q.submit(
        1,
        BlockOp::Write {
            offset: 0,
            buf: vec![7; 4096],
        },
    )
    .unwrap();
    let t_named = wait_for("a lock request timing out", secs(20), || {
        let t = log_text();
        t.contains("cannot take the exclusive lock") && t.contains("ETIMEDOUT")
    });
    c.daemon("cont", OSD);
    let t_cont = Instant::now();
    let done = wait_all(&mut q, 1);
    let waited = t_cont.elapsed();
    done[0].result.as_ref().unwrap();
    eprintln!(
        "lock request timed out {:?} after SIGSTOP; the write completed {waited:?} after SIGCONT",
        t_named - t_stop
    );
    assert!(waited <= RECOVERY_BOUND, "{waited:?}");
    let back = one(
        &mut q,
        BlockOp::Read {
            offset: 0,
            buf: vec![0; 4096],
        },
    );
    assert_eq!(back.buf.unwrap(), vec![7; 4096]);
}
