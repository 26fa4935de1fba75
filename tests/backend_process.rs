//! The `rbdback` binary as dom0 runs it, over the simulated Xen hosted by this test process
//! (the backend reaches it through `--sim-dir`, see `rbdback::xen::sim::remote`) and the local
//! Ceph cluster: how `serve` exits, and what a guest sees when it dies.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rbdback::device::testfront::{toolstack_attach, toolstack_detach, AttachSpec, SimBlkfront};
use rbdback::rados::testing::cluster;
use rbdback::ring::Status;
use rbdback::xen::sim::SimXen;
use rbdback::xen::xenstore::Xenstore;
use rbdback::xen::Platform;

const T: Duration = Duration::from_secs(60);

fn params(image: &str) -> String {
    format!("rbd:rbd/{image}:conf={}", cluster().conf.display())
}

/// A `rbdback` child process and its log.
struct Proc {
    child: Child,
    log: PathBuf,
    sim_dir: PathBuf,
}

impl Proc {
    fn spawn(xen: &SimXen, args: &[&str], name: &str) -> Proc {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let log = std::env::temp_dir().join(format!(
            "rbdback-{name}-{}-{}.log",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rbdback"))
            .args(args)
            .arg("--sim-dir")
            .arg(xen.dir())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        Proc {
            child,
            log,
            sim_dir: xen.dir().to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
        // a supervisor leaves its serve children running: they belong to this test too
        let _ = Command::new("pkill")
            .args([
                "-KILL",
                "-f",
                "--",
                &format!("--sim-dir {}", self.sim_dir.display()),
            ])
            .status();
    }
}

fn wait_for(xs: &Xenstore, path: &str, want: &str) {
    let deadline = Instant::now() + T;
    while xs.read(path).unwrap().as_deref() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{path} never became {want} (it is {:?})",
            xs.read(path).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// issue 18.3: `serve` exits cleanly -- status 0, no C++ exception, no signal -- when the
/// guest goes away while its disks are in every state: an open that failed (Closing), one
/// still opening against OSDs that do not answer, one connected, one whose frontend is
/// closing, and one detached before.
#[test]
fn serve_exits_cleanly_with_disks_in_every_state() {
    let c = cluster();
    let xen = SimXen::start().unwrap();
    let dom0 = xen.platform().xenstore().unwrap();
    const GUEST: u16 = 21;
    let good = c.create_image("exit", 16, None);
    let good2 = c.create_image("exit", 16, None);
    let good3 = c.create_image("exit", 16, None);
    let slow = c.create_image("exit", 16, None);
    let run_dir = std::env::temp_dir().join(format!("rbdback-exit-{}", std::process::id()));
    let rd = run_dir.display().to_string();
    let mut serve = Proc::spawn(
        &xen,
        &[
            "--run-dir",
            &rd,
            "serve",
            "--domid",
            &GUEST.to_string(),
            "--kind",
            "vbd",
        ],
        "serve-exit",
    );
    let attach = |devid: u32, params: &str| {
        let mut spec = AttachSpec::new(params);
        spec.devid = devid;
        let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
        (spec, be, fe)
    };
    // connected
    let (spec, be, fe) = attach(51712, &params(&good));
    let mut connected =
        SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
    assert_eq!(
        connected.write_sync(0, 0, 0, &[7u8; 4096]).unwrap(),
        rbdback::ring::Status::Okay
    );
    // open failed (the disk stays in InitWait, rbdback-image=failed: see failed_attach.rs)
    let (_, bad_be, _) = attach(51728, "rbd:rbd/no-such-image-here");
    wait_for(&dom0, &format!("{bad_be}/rbdback-image"), "failed");
    // frontend closing
    let (spec3, be3, fe3) = attach(51744, &params(&good2));
    let closing =
        SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be3, &fe3, &spec3, T).unwrap();
    closing
        .xenstore()
        .write(&format!("{fe3}/state"), "5")
        .unwrap();
    wait_for(&dom0, &format!("{be3}/state"), "5");
    // detached
    let (spec4, be4, fe4) = attach(51760, &params(&good3));
    let mut detached =
        SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be4, &fe4, &spec4, T).unwrap();
    toolstack_detach(&dom0, &be4).unwrap();
    detached.close(T).unwrap();
    // still opening: every OSD reply held back for up to 10 minutes
    let slow_params = format!(
        "{}:ms_inject_delay_type=osd:ms_inject_delay_probability=1:ms_inject_delay_max=600",
        params(&slow)
    );
    attach(51776, &slow_params);
    // still connecting: a monitor nobody listens on (librados keeps hunting for one)
    attach(
        51792,
        "rbd:rbd/any:mon_host=127.0.0.1\\:9:id=admin:key=AQBHLcdl2Xq0JxAAwgDY1h6nD3pbkEV7mP8bGQ==",
    );
    std::thread::sleep(Duration::from_secs(2));
    // the guest powers off: libxl destroys the domain and removes every device directory
    drop((connected, closing));
    dom0.rm(&format!("/local/domain/{GUEST}/device")).unwrap();
    dom0.rm(&format!("/local/domain/0/backend/vbd/{GUEST}"))
        .unwrap();
    let status = serve.wait(T).expect("serve did not exit");
    let log = serve.log();
    assert!(
        status.success(),
        "serve exited with {status:?}; log:\n{log}"
    );
    assert!(!log.contains("terminate called"), "log:\n{log}");
    assert!(log.contains("no device left"), "log:\n{log}");
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// A simulated Xen, its dom0 xenstore, a fresh run directory and a supervisor on them.
fn supervised(name: &str) -> (std::sync::Arc<SimXen>, Xenstore, PathBuf, Proc) {
    let xen = SimXen::start().unwrap();
    let dom0 = xen.platform().xenstore().unwrap();
    let run_dir = std::env::temp_dir().join(format!("rbdback-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    let rd = run_dir.display().to_string();
    let sup = Proc::spawn(
        &xen,
        &["--run-dir", &rd, "supervise"],
        &format!("supervise-{name}"),
    );
    (xen, dom0, run_dir, sup)
}

/// The guest's verified I/O on `front` (queue depth 8, half writes over `span_sectors`) on a
/// thread of its own, until `stop` is set: the instant of every answer in `answers`; the
/// thread gives back the workload's report and the frontend.
#[allow(clippy::type_complexity)]
fn verified_io(
    mut front: SimBlkfront,
    span_sectors: u64,
    seed: u64,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    std::thread::JoinHandle<(
        Result<rbdback::device::testfront::RunReport, rbdback::device::testfront::FrontTestError>,
        SimBlkfront,
    )>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let (s2, a2) = (Arc::clone(&stop), Arc::clone(&answers));
    let worker = std::thread::spawn(move || {
        let w = rbdback::device::testfront::Workload {
            qd: 8,
            write_pct: 50,
            span_sectors,
            seed,
            verify: true,
            indirect_every: 0,
            flush_every: 0,
            latencies: false,
        };
        let r = w.run(
            &mut front,
            |_| !s2.load(Ordering::Relaxed),
            |_, d| a2.lock().unwrap().push(d.answered),
        );
        (r, front)
    });
    (stop, answers, worker)
}

/// The guest saw its backend Connected all along, and no protocol violation.
fn assert_stayed_connected(states: &rbdback::device::testfront::BackendStates) {
    let seen = states.seen();
    assert!(
        seen.iter()
            .all(|(b, _)| *b == rbdback::device::xenbus::XenbusState::Connected),
        "the backend state changed: {seen:?}"
    );
    assert_eq!(states.violations(), Vec::<String>::new());
}

/// A little deterministic PRNG for kill instants.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The pid of guest `domid`'s `serve`, as the supervisor knows it.
fn serve_pid(run_dir: &std::path::Path, domid: u16) -> Option<i32> {
    let st = rbdback::control::call(
        &run_dir.join(rbdback::device::supervisor::SOCKET),
        "status",
        serde_json::Value::Null,
    )
    .ok()?;
    st.get("serve")?
        .as_array()?
        .iter()
        .find(|s| s.get("domid").and_then(serde_json::Value::as_u64) == Some(u64::from(domid)))?
        .get("pid")?
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
}

fn wait_new_serve(run_dir: &std::path::Path, domid: u16, old: i32) -> i32 {
    let deadline = Instant::now() + T;
    loop {
        if let Some(p) = serve_pid(run_dir, domid).filter(|p| *p != old) {
            return p;
        }
        assert!(Instant::now() < deadline, "no new serve after pid {old}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Median and max of `v`.
fn median_max(v: &mut [Duration]) -> (Duration, Duration) {
    v.sort_unstable();
    (
        v.get(v.len() / 2).copied().unwrap_or_default(),
        v.last().copied().unwrap_or_default(),
    )
}

/// issue 13: `serve` is killed (SIGKILL) at random instants and at chosen points of the
/// journal protocol (a batch half recorded, a response written and not published, rsp_prod
/// published and not recorded, a flush in flight, an indirect request admitted) while a
/// verified workload runs; the supervisor starts the next one at once, which resumes the
/// ring. The guest sees no error, no mismatch, nothing answered twice, no state change, and
/// `rbd export` equals what it wrote. Prints the time from each kill to the first request the
/// next instance answered (`RBDBACK_KILLS=N` sets the number of kills, default 50).
#[test]
fn a_backend_killed_at_any_instant_is_resumed_without_the_guest_seeing_an_error() {
    use rbdback::device::testfront::{BackendStates, Workload};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let kills: usize = std::env::var("RBDBACK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let c = cluster();
    let image = c.create_image("kill", 64, None);
    let (xen, dom0, run_dir, _sup) = supervised("kill");
    const GUEST: u16 = 23;
    let mut spec = AttachSpec::new(&params(&image));
    spec.queues = 2;
    spec.ring_order = 1;
    spec.data_pages = 512;
    let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
    let mut front = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
    let states = BackendStates::watch(front.domain(), &be, &fe).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let writes: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let (s2, a2, w2) = (Arc::clone(&stop), Arc::clone(&answers), Arc::clone(&writes));
    let worker = std::thread::spawn(move || {
        let w = Workload {
            qd: 8,
            write_pct: 50,
            span_sectors: 32 << 11,
            seed: 0x5eed,
            verify: true,
            indirect_every: 7,
            flush_every: 5,
            latencies: false,
        };
        let r = w.run(
            &mut front,
            |_| !s2.load(Ordering::Relaxed),
            |_, d| {
                a2.lock().unwrap().push(d.answered);
                if d.write {
                    w2.lock().unwrap().push(d.answered);
                }
            },
        );
        (r, front)
    });
    let points = [
        "take",
        "pushed",
        "published",
        "freeing",
        "flush",
        "indirect",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut pid = wait_new_serve(&run_dir, GUEST, 0);
    let mut killed_at = Vec::new();
    let mut by_point = Vec::new();
    // the guest has seen an answer after `t` (the resumed instance serves)
    let answered_after = |t: Instant| {
        let deadline = Instant::now() + T;
        while !answers.lock().unwrap().iter().rev().any(|a| *a > t) {
            assert!(Instant::now() < deadline, "no answer after a restart");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Each kill comes at a random instant of the guest's I/O once the backend has run for the
    // supervisor's min_uptime: kills in quicker succession are a crash loop, which is backed
    // off (the supervisor's unit tests); the crash points below are such quick deaths, one at
    // a time, which are restarted at once.
    let mut started = Instant::now();
    for k in 0..kills {
        if let Some(t) = killed_at.last() {
            answered_after(*t);
        }
        let up = Duration::from_millis(1100).saturating_sub(started.elapsed());
        std::thread::sleep(up + Duration::from_millis(rng.below(700)));
        if k % 5 == 4 {
            // the next serve kills itself at this point of the protocol
            let point = points[(k / 5) % points.len()];
            let n = 1 + rng.below(40);
            std::fs::write(run_dir.join("crash-next"), format!("{point}:{n}")).unwrap();
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
                .unwrap();
            killed_at.push(Instant::now());
            pid = wait_new_serve(&run_dir, GUEST, pid);
            // it dies at the point (or, for a point the workload did not reach in 10 s, is
            // killed here), then the one after it serves normally
            let t = Instant::now();
            let armed = pid;
            let deadline = t + Duration::from_secs(10);
            loop {
                if serve_pid(&run_dir, GUEST).is_some_and(|p| p != armed) {
                    by_point.push((point, true));
                    break;
                }
                if Instant::now() >= deadline {
                    by_point.push((point, false));
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(armed),
                        nix::sys::signal::SIGKILL,
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            killed_at.push(Instant::now());
            pid = wait_new_serve(&run_dir, GUEST, armed);
        } else {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
                .unwrap();
            killed_at.push(Instant::now());
            pid = wait_new_serve(&run_dir, GUEST, pid);
        }
        started = Instant::now();
    }
    // let the last instance answer a while, then stop the guest's workload
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (report, mut front) = worker.join().unwrap();
    let report = report.expect("the guest's workload (an unknown or second answer fails it)");
    assert_eq!(report.errors, 0, "guest-visible errors");
    assert_eq!(
        report.mismatches, 0,
        "reads that did not match what was written"
    );
    assert!(report.completed > 1000, "{} requests", report.completed);
    assert_stayed_connected(&states);
    let hit: Vec<_> = by_point
        .iter()
        .filter(|(_, h)| *h)
        .map(|(p, _)| *p)
        .collect();
    for p in points.iter().take(kills / 5) {
        assert!(
            hit.contains(p),
            "crash point {p} never reached: {by_point:?}"
        );
    }
    // time from each kill to the first answer after it
    let answers = answers.lock().unwrap().clone();
    let mut gaps: Vec<Duration> = killed_at
        .iter()
        .filter_map(|k| answers.iter().find(|a| *a > k).map(|a| *a - *k))
        .collect();
    let (med, max) = median_max(&mut gaps);
    let writes = writes.lock().unwrap().clone();
    let mut wgaps: Vec<Duration> = killed_at
        .iter()
        .filter_map(|k| writes.iter().find(|a| *a > k).map(|a| *a - *k))
        .collect();
    let (wmed, wmax) = median_max(&mut wgaps);
    println!(
        "kill-to-first-answer over {} kills ({} requests, {} reads verified): median {:.0} ms, max {:.0} ms; first write answered: median {:.0} ms, max {:.0} ms",
        gaps.len(),
        report.completed,
        report.reads_checked,
        med.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0,
        wmed.as_secs_f64() * 1000.0,
        wmax.as_secs_f64() * 1000.0
    );
    toolstack_detach(&dom0, &be).unwrap();
    front.close(T).unwrap();
    drop(front);
    let export = c.export(&image);
    let diff = report.diff_image(&export, (32 << 20) / 4096);
    assert!(diff.is_empty(), "rbd export differs in blocks {diff:?}");
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// issue 13: `rbdback upgrade` replaces every running backend (and the supervisor) while a
/// verified workload runs: the guest sees no error and no state change, the supervisor keeps
/// the same pid (it re-executes itself) and the serve a new one; prints how long the guest's
/// disk waited.
#[test]
fn a_live_upgrade_is_invisible_to_the_guest() {
    use rbdback::device::testfront::BackendStates;
    use std::sync::atomic::Ordering;
    let c = cluster();
    let image = c.create_image("upgrade", 64, None);
    let (xen, dom0, run_dir, mut sup) = supervised("upgrade");
    const GUEST: u16 = 24;
    let spec = AttachSpec::new(&params(&image));
    let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
    let front = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
    let states = BackendStates::watch(front.domain(), &be, &fe).unwrap();
    let (stop, answers, worker) = verified_io(front, 32 << 11, 0xab);
    let upgrades: usize = std::env::var("RBDBACK_UPGRADES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut pid = wait_new_serve(&run_dir, GUEST, 0);
    let mut handovers = Vec::new();
    let mut windows = Vec::new();
    for _ in 0..upgrades {
        std::thread::sleep(Duration::from_secs(2));
        let t0 = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_rbdback"))
            .arg("--run-dir")
            .arg(&run_dir)
            .args(["upgrade", "--json"])
            .output()
            .unwrap();
        let took = t0.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "upgrade failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let guests = report["guests"].as_array().unwrap();
        assert_eq!(guests.len(), 1, "{report}");
        assert_eq!(guests[0]["ok"], serde_json::Value::Bool(true), "{report}");
        handovers.push(Duration::from_secs_f64(
            guests[0]["seconds"].as_f64().unwrap_or(0.0),
        ));
        windows.push((t0, took));
        let after = wait_new_serve(&run_dir, GUEST, pid);
        assert_ne!(pid, after);
        pid = after;
        // the supervisor re-executed itself: same process, new image, still our child
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            sup.child.try_wait().unwrap().is_none(),
            "the supervisor exited"
        );
    }
    let log = sup.log();
    assert!(log.contains("re-executing the installed binary"), "{log}");
    assert!(
        log.contains("keeping the serve process of the supervisor we replaced"),
        "{log}"
    );
    // the disk keeps working after the upgrade
    let n = answers.lock().unwrap().len();
    let deadline = Instant::now() + T;
    while answers.lock().unwrap().len() < n + 100 {
        assert!(Instant::now() < deadline, "no answers after the upgrade");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let (report, mut front) = worker.join().unwrap();
    let report = report.expect("the guest's workload");
    assert_eq!((report.errors, report.mismatches), (0, 0));
    assert_stayed_connected(&states);
    // the longest the guest waited for any answer during each upgrade
    let answers = answers.lock().unwrap().clone();
    let mut stalls: Vec<Duration> = windows
        .iter()
        .map(|(t0, took)| {
            answers
                .windows(2)
                .filter(|w| w[1] > *t0 && w[0] < *t0 + *took)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default()
        })
        .collect();
    let (hmed, hmax) = median_max(&mut handovers);
    let (smed, smax) = median_max(&mut stalls);
    println!(
        "live upgrade over {upgrades} upgrades: handover median {:.0} ms, max {:.0} ms; longest gap between the guest's answers median {:.0} ms, max {:.0} ms",
        hmed.as_secs_f64() * 1000.0,
        hmax.as_secs_f64() * 1000.0,
        smed.as_secs_f64() * 1000.0,
        smax.as_secs_f64() * 1000.0
    );
    toolstack_detach(&dom0, &be).unwrap();
    front.close(T).unwrap();
    drop(front);
    let export = c.export(&image);
    assert!(report.diff_image(&export, (32 << 20) / 4096).is_empty());
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// issue 18.4: the supervisor starts no backend for a domain that is gone (stale backend
/// directories left behind), none for disks whose frontend is gone, and after a backend that
/// exited with nothing left none again until a disk appears; each decision is logged.
#[test]
fn the_supervisor_does_not_restart_backends_nobody_needs() {
    let xen = SimXen::start().unwrap();
    let dom0 = xen.platform().xenstore().unwrap();
    let run_dir = std::env::temp_dir().join(format!("rbdback-nostart-{}", std::process::id()));
    let rd = run_dir.display().to_string();
    // domain 31 is gone: only its backend directory is left (no /local/domain/31)
    let stale = "/local/domain/0/backend/vbd/31/51712";
    dom0.write(&format!("{stale}/params"), "rbd:rbd/x").unwrap();
    dom0.write(
        &format!("{stale}/frontend"),
        "/local/domain/31/device/vbd/51712",
    )
    .unwrap();
    // domain 32 exists, but its disk's frontend directory is gone
    let _d32 = xen.frontend(32).unwrap();
    let orphan = "/local/domain/0/backend/vbd/32/51712";
    dom0.write(&format!("{orphan}/params"), "rbd:rbd/y")
        .unwrap();
    dom0.write(
        &format!("{orphan}/frontend"),
        "/local/domain/32/device/vbd/51712",
    )
    .unwrap();
    let sup = Proc::spawn(&xen, &["--run-dir", &rd, "supervise"], "supervise-nostart");
    std::thread::sleep(Duration::from_secs(4));
    let log = sup.log();
    assert!(!log.contains("started serve process"), "{log}");
    assert!(
        log.contains("domid=31") && log.contains("the domain is gone"),
        "{log}"
    );
    // a disk that can be served appears for domain 32: a backend starts, serves, and when
    // the disk goes the backend exits and is not started again
    let c = cluster();
    let image = c.create_image("nostart", 8, None);
    let mut spec = AttachSpec::new(&params(&image));
    spec.devid = 51728;
    let (be, fe) = toolstack_attach(&dom0, 0, 32, &spec).unwrap();
    let mut f = SimBlkfront::connect(xen.frontend(32).unwrap(), &be, &fe, &spec, T).unwrap();
    toolstack_detach(&dom0, &be).unwrap();
    f.close(T).unwrap();
    dom0.rm(&be).unwrap();
    let deadline = Instant::now() + T;
    while !sup.log().contains("nothing left to serve") {
        assert!(Instant::now() < deadline, "{}", sup.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    let log = sup.log();
    assert_eq!(log.matches("started serve process").count(), 1, "{log}");
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// The fields of `/proc/<pid>/status` the sandbox sets: the uids, CapEff, Seccomp, NoNewPrivs.
fn proc_status(pid: i32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// issue 15: the supervisor's backends run sandboxed (a user per guest, no capabilities,
/// no-new-privileges, seccomp). One that makes a system call its filter forbids (a test-only
/// control command calls `syslog` on a thread that blocks every signal, as librados' threads
/// do) dies by SIGSYS; the supervisor's log names the signal and the call (number and name);
/// the next backend resumes both of the guest's disks (one on the direct engine, one on
/// librbd) from their journals, and the guest's verified workloads on both see no error and
/// no state change.
#[test]
fn a_forbidden_system_call_kills_the_backend_and_the_next_one_resumes_every_disk() {
    use rbdback::device::testfront::{BackendStates, Workload};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let c = cluster();
    let direct = c.create_image("sigsys", 64, None);
    // librbd without exclusive-lock: a dead client's lock would hold the next open ~30 s
    let librbd = c.create_image("sigsys", 64, Some("layering"));
    let (xen, dom0, run_dir, sup) = supervised("sigsys");
    const GUEST: u16 = 25;
    let disks = [
        (51712, params(&direct)),
        (51728, format!("{}:engine=librbd", params(&librbd))),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    let mut states = Vec::new();
    for (devid, p) in &disks {
        let mut spec = AttachSpec::new(p);
        spec.devid = *devid;
        spec.data_pages = 256;
        let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
        let mut front =
            SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
        states.push(BackendStates::watch(front.domain(), &be, &fe).unwrap());
        let (s2, a2, d) = (Arc::clone(&stop), Arc::clone(&answers), *devid);
        workers.push(std::thread::spawn(move || {
            let w = Workload {
                qd: 8,
                write_pct: 50,
                span_sectors: 32 << 11,
                seed: u64::from(d),
                verify: true,
                indirect_every: 7,
                flush_every: 5,
                latencies: false,
            };
            w.run(
                &mut front,
                |_| !s2.load(Ordering::Relaxed),
                |_, r| a2.lock().unwrap().push((d, r.answered)),
            )
        }));
    }
    let pid = wait_new_serve(&run_dir, GUEST, 0);
    let answered_by_both_after = |t: Instant| {
        let deadline = Instant::now() + T;
        loop {
            let a = answers.lock().unwrap();
            if disks
                .iter()
                .all(|(d, _)| a.iter().any(|(x, at)| x == d && *at > t))
            {
                return;
            }
            drop(a);
            assert!(
                Instant::now() < deadline,
                "a disk got no answer after {t:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    answered_by_both_after(Instant::now());
    // what the real Xen bed checks from dom0: the guest's own uid, no capabilities, a seccomp
    // filter, no new privileges
    let st = proc_status(pid);
    let uid = (0x7000_0000u32 + u32::from(GUEST)).to_string();
    assert_eq!(
        st.get("Uid")
            .map(|u| u.split_whitespace().all(|x| x == uid)),
        Some(true),
        "{st:?}"
    );
    assert_eq!(
        st.get("CapEff").map(String::as_str),
        Some("0000000000000000")
    );
    assert_eq!(
        st.get("CapBnd").map(String::as_str),
        Some("0000000000000000")
    );
    assert_eq!(st.get("Seccomp").map(String::as_str), Some("2"));
    assert_eq!(st.get("NoNewPrivs").map(String::as_str), Some("1"));
    // the operator's views of a sandboxed backend still work: status and metrics (its own
    // /proc/self/stat)
    let sock = rbdback::control::socket_path(&run_dir, GUEST);
    let m = rbdback::control::call(&sock, "metrics", serde_json::Value::Null).unwrap();
    assert!(m["process"]["rss_bytes"].as_u64().unwrap_or(0) > 0, "{m}");
    assert!(m["process"]["threads"].as_u64().unwrap_or(0) > 1, "{m}");
    assert_eq!(m["disks"].as_array().map(Vec::len), Some(2), "{m}");
    // the forbidden call: the connection dies with the process
    let t0 = Instant::now();
    assert!(
        rbdback::control::call(&sock, "test-forbidden-syscall", serde_json::json!({})).is_err(),
        "the backend answered after a forbidden system call"
    );
    let next = wait_new_serve(&run_dir, GUEST, pid);
    answered_by_both_after(Instant::now());
    let restarted = t0.elapsed();
    let log = sup.log();
    let line = log
        .lines()
        .find(|l| l.contains("killed by SIGSYS"))
        .unwrap_or_else(|| panic!("no SIGSYS line in the supervisor's log:\n{log}"));
    assert!(
        line.contains(&format!("system call {} (syslog)", libc::SYS_syslog))
            && line.contains("thread")
            && line.contains(&format!("pid={pid}")),
        "{line}"
    );
    assert!(
        log.contains("was killed by signal 31 (SIGSYS): a system call its sandbox forbids"),
        "{log}"
    );
    assert_eq!(
        proc_status(next).get("Seccomp").map(String::as_str),
        Some("2")
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for (w, s) in workers.into_iter().zip(&states) {
        let r = w.join().unwrap().expect("the guest's workload");
        assert_eq!((r.errors, r.mismatches), (0, 0), "guest-visible errors");
        assert!(r.completed > 100, "{} requests", r.completed);
        assert_stayed_connected(s);
    }
    println!("{line}");
    println!(
        "forbidden call to the next backend answering both disks: {:.0} ms",
        restarted.as_secs_f64() * 1000.0
    );
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// Found in review: a supervisor that gave up waiting for an orphan's handover started a
/// second `serve` beside it. Each `serve` holds its guest's instance lock for its whole life:
/// a second one for the same guest waits, touching nothing, until the first is gone, then
/// resumes the rings. The guest sees no error and no state change.
#[test]
fn a_second_serve_for_a_guest_waits_until_the_first_is_gone() {
    use rbdback::device::testfront::BackendStates;
    use std::sync::atomic::Ordering;
    let c = cluster();
    let image = c.create_image("twice", 16, None);
    let xen = SimXen::start().unwrap();
    let dom0 = xen.platform().xenstore().unwrap();
    let run_dir = std::env::temp_dir().join(format!("rbdback-twice-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    let rd = run_dir.display().to_string();
    const GUEST: u16 = 26;
    let g = GUEST.to_string();
    let mut first = Proc::spawn(
        &xen,
        &["--run-dir", &rd, "serve", "--domid", &g],
        "serve-first",
    );
    let spec = AttachSpec::new(&params(&image));
    let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
    let front = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
    let states = BackendStates::watch(front.domain(), &be, &fe).unwrap();
    let (stop, answers, worker) = verified_io(front, 16 << 11, 0x26);
    std::thread::sleep(Duration::from_secs(1));
    let second = Proc::spawn(
        &xen,
        &["--run-dir", &rd, "serve", "--domid", &g],
        "serve-second",
    );
    let deadline = Instant::now() + T;
    while !second
        .log()
        .contains("another serve for this guest still runs")
    {
        assert!(Instant::now() < deadline, "{}", second.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // the first goes on serving alone
    std::thread::sleep(Duration::from_secs(2));
    let n = answers.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        answers.lock().unwrap().len() > n,
        "the first serve stopped answering"
    );
    assert!(!second.log().contains("vbd claimed"), "{}", second.log());
    // the first hands over (SIGTERM, as systemd stops it); the second takes the rings
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(first.child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(
        first.wait(T).and_then(|s| s.code()),
        Some(75),
        "{}",
        first.log()
    );
    while !second.log().contains("the previous serve ended") {
        assert!(Instant::now() < deadline, "{}", second.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let n = answers.lock().unwrap().len();
    while answers.lock().unwrap().len() < n + 200 {
        assert!(
            Instant::now() < deadline,
            "no answers from the second serve"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let (report, _front) = worker.join().unwrap();
    let report = report.expect("the guest's workload");
    assert_eq!((report.errors, report.mismatches), (0, 0));
    assert_stayed_connected(&states);
    drop(second);
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// The successor of a killed backend must fence (blocklist) its client before it writes. When
/// it cannot (this client's caps lack `osd blocklist`), the guest's writes fail (reads go
/// on), the log names the missing cap, and the state directory keeps the dead client
/// recorded as unfenced, so no later instance skips the fence either. Once the operator grants
/// the caps and asks for a re-open, the new client fences it, writes go through, and the
/// record says fenced only now, with the address in the cluster's blocklist.
#[test]
fn a_predecessor_is_recorded_fenced_only_once_the_cluster_blocklisted_it() {
    use rbdback::device::clients::{self, Mark};
    let c = cluster();
    let image = c.create_image("nofence", 16, None);
    let who = format!("client.nofence{}", std::process::id());
    let key = c.ceph(&[
        "auth",
        "get-or-create",
        &who,
        "mon",
        "allow r",
        "osd",
        "allow rwx pool=rbd",
    ]);
    let (xen, dom0, run_dir, sup) = supervised("nofence");
    let keyring = run_dir.with_extension("keyring");
    std::fs::write(&keyring, key).unwrap();
    const GUEST: u16 = 27;
    let p = format!(
        "{}:id={}:keyring={}",
        params(&image),
        who.trim_start_matches("client."),
        keyring.display()
    );
    let spec = AttachSpec::new(&p);
    let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
    let mut f = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
    let a = vec![0xa5u8; 4096];
    assert_eq!(f.write_sync(0, 0, 0, &a).unwrap(), Status::Okay);
    let pid = wait_new_serve(&run_dir, GUEST, 0);
    let file = run_dir
        .join("state")
        .join(format!("guest-{GUEST}"))
        .join(format!("vbd-{GUEST}-{}", spec.devid))
        .join("client");
    let read = || clients::parse(&std::fs::read_to_string(&file).unwrap_or_default());
    let first = read();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].mark, Mark::Unfenced);
    // past the supervisor's min_uptime, so the restart comes at once
    std::thread::sleep(Duration::from_millis(1200));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let pid2 = wait_new_serve(&run_dir, GUEST, pid);
    // the successor cannot fence it: writes fail, reads are served
    let deadline = Instant::now() + T;
    loop {
        let st = f.write_sync(0, 8, 0, &a).unwrap();
        if st == Status::Error {
            break;
        }
        assert!(Instant::now() < deadline, "writes never failed: {st:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (st, data) = f.read_sync(0, 0, 0, 4096).unwrap();
    assert_eq!((st, data == a), (Status::Okay, true));
    assert!(
        sup.log().contains("do not allow `osd blocklist`"),
        "the log does not name the missing cap:\n{}",
        sup.log()
    );
    let now = read();
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(
        (now[0].gid, now[0].mark),
        (first[0].gid, Mark::Unfenced),
        "recorded fenced, never blocklisted"
    );
    assert!(!c.ceph(&["osd", "blocklist", "ls"]).contains(&first[0].addr));
    // the operator grants the caps and has the disk re-opened with a new client
    c.ceph(&[
        "auth",
        "caps",
        &who,
        "mon",
        "profile rbd",
        "osd",
        "profile rbd pool=rbd",
    ]);
    dom0.write(&format!("{be}/reopen"), "1").unwrap();
    let deadline = Instant::now() + T;
    while f.write_sync(0, 8, 0, &a).unwrap() != Status::Okay {
        assert!(Instant::now() < deadline, "writes never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + T;
    loop {
        let now = read();
        if matches!(now[0].mark, Mark::Fenced(_)) {
            break;
        }
        assert!(Instant::now() < deadline, "never recorded fenced: {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(c.ceph(&["osd", "blocklist", "ls"]).contains(&first[0].addr));
    assert_eq!(
        serve_pid(&run_dir, GUEST),
        Some(pid2),
        "the backend restarted"
    );
    f.close(T).unwrap();
    let _ = std::fs::remove_file(&keyring);
    c.ceph(&["auth", "del", &who]);
}
