//! `rbdback soak`: the demo's verified workload through the whole stack (simulated Xen, the
//! real backend, a private local Ceph cluster) for a long time, with a Ceph fault every few
//! minutes in rotation: the OSD killed and restarted, the OSD frozen for 20 s, the monitor
//! restarted, the exclusive lock taken by another client (librbd). Every 30 s it prints the
//! process's resident memory, threads and open descriptors beside the requests, errors and
//! mismatches so far; at the end it compares `rbd export` with what the guest wrote.
//!
//! Owns: its private cluster (`target/ceph-soak`, or `$RBDBACK_SOAK_DIR`) and image, both
//! removed at the end. Must never: inject faults into the shared test cluster.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::demo::{cluster_tool, export_image, rbd, start_cluster, DemoError};
use crate::device::testfront::{
    spawn_serve, toolstack_attach, toolstack_detach, AttachSpec, RunReport, SimBlkfront, Workload,
};
use crate::device::vbd::Options;
use crate::rados::{BlockOp, EngineChoice, Image, ImageSpec};
use crate::xen::sim::SimXen;
use crate::xen::{Platform, XenError};

/// Soak settings.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// How long the workload runs.
    pub minutes: u64,
    /// Time between the starts of two faults.
    pub fault_every: Duration,
    /// The private cluster's directory.
    pub dir: PathBuf,
}

impl Default for SoakOptions {
    fn default() -> Self {
        SoakOptions {
            minutes: 10,
            fault_every: Duration::from_secs(120),
            dir: std::env::var_os("RBDBACK_SOAK_DIR").map_or_else(
                || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/ceph-soak")),
                PathBuf::from,
            ),
        }
    }
}

/// The faults, in the order they come.
const FAULTS: [&str; 4] = [
    "OSD restart (SIGKILL, start after 10 s)",
    "OSD stall (SIGSTOP 20 s)",
    "monitor restart (SIGKILL, start after 5 s)",
    "exclusive lock taken by another client (librbd write)",
];

/// The image's size and the part the workload spans (the other client writes beyond it).
const IMAGE_MIB: u64 = 256;
const SPAN_MIB: u64 = 64;

/// What this process holds, from /proc/self.
fn resources() -> (u64, u64, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    (field("VmRSS:") / 1024, field("Threads:"), fds)
}

fn daemon(dir: &Path, action: &str, name: &str) -> Result<(), DemoError> {
    cluster_tool(Some(dir), &["daemon", action, name]).map(|_| ())
}

/// Another client (librbd, its own cluster connection) writes one block beyond the span:
/// it takes the exclusive lock from the backend, which asks for it back on its next write.
fn take_lock(conf: &Path, image: &str) -> Result<(), DemoError> {
    let mut spec = ImageSpec::new("rbd", image);
    spec.conf = Some(conf.display().to_string());
    spec.engine = EngineChoice::Librbd;
    let fail = |e: crate::rados::RadosError| DemoError::Rbd(crate::chain(&e));
    let img = Image::open(&spec).map_err(fail)?;
    let mut q = img.queue().map_err(fail)?;
    q.submit(
        1,
        BlockOp::Write {
            offset: (IMAGE_MIB - 1) << 20,
            buf: vec![0x5a; 4096],
        },
    )
    .map_err(|e| fail(e.error))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    while out.is_empty() && Instant::now() < deadline {
        q.reap(&mut out);
        std::thread::sleep(Duration::from_millis(10));
    }
    match out.pop() {
        Some(c) => c.result.map_err(fail),
        None => Err(DemoError::Rbd(
            "the other client's write got no answer".into(),
        )),
    }
}

fn inject(dir: &Path, conf: &Path, image: &str, n: usize) -> Result<(), DemoError> {
    match n % FAULTS.len() {
        0 => {
            daemon(dir, "kill", "osd.0")?;
            std::thread::sleep(Duration::from_secs(10));
            daemon(dir, "start", "osd.0")
        }
        1 => {
            daemon(dir, "stop", "osd.0")?;
            std::thread::sleep(Duration::from_secs(20));
            daemon(dir, "cont", "osd.0")
        }
        2 => {
            daemon(dir, "kill", "mon.a")?;
            std::thread::sleep(Duration::from_secs(5));
            daemon(dir, "start", "mon.a")
        }
        _ => take_lock(conf, image),
    }
}

/// Runs the soak; prints its progress and verdict to stdout.
pub fn run(o: &SoakOptions) -> Result<(), DemoError> {
    let conf = start_cluster(Some(&o.dir))?;
    let image = format!("rbdback-soak-{}", std::process::id());
    rbd(
        &conf,
        &[
            "create",
            "--size",
            &format!("{IMAGE_MIB}M"),
            &format!("rbd/{image}"),
        ],
    )?;
    let result = run_on(o, &conf, &image);
    let _ = rbd(&conf, &["rm", "--no-progress", &format!("rbd/{image}")]);
    let _ = cluster_tool(Some(&o.dir), &["down"]);
    result
}

fn run_on(o: &SoakOptions, conf: &Path, image: &str) -> Result<(), DemoError> {
    let xen = SimXen::start()?;
    let guest = 7;
    let (stop_serve, server) = spawn_serve(&xen, guest, true, Options::default());
    let mut spec = AttachSpec::new(&format!(
        "rbd:rbd/{image}:conf={}:engine=direct",
        conf.display()
    ));
    spec.queues = 2;
    spec.ring_order = 2;
    spec.data_pages = 1024;
    let dom0 = xen.platform().xenstore()?;
    let (be, fe) = toolstack_attach(&dom0, 0, guest, &spec).map_err(XenError::from)?;
    let mut front = SimBlkfront::connect(
        xen.frontend(guest)?,
        &be,
        &fe,
        &spec,
        Duration::from_secs(60),
    )?;
    let span = SPAN_MIB << 11;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(o.minutes * 60);
    let stop = Arc::new(AtomicBool::new(false));
    let faults: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let injector = {
        let (stop, faults) = (Arc::clone(&stop), Arc::clone(&faults));
        let (dir, conf, image, every) = (
            o.dir.clone(),
            conf.to_path_buf(),
            image.to_owned(),
            o.fault_every,
        );
        std::thread::spawn(move || {
            let mut n = 0;
            loop {
                let at = t0 + every * (u32::try_from(n).unwrap_or(u32::MAX) + 1);
                while Instant::now() < at {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                let f0 = Instant::now();
                let r = inject(&dir, &conf, &image, n);
                let line = format!(
                    "{:>5.0}s {} ({:.1} s){}",
                    (f0 - t0).as_secs_f64(),
                    FAULTS[n % FAULTS.len()],
                    f0.elapsed().as_secs_f64(),
                    r.err().map(|e| format!(": FAILED {e}")).unwrap_or_default()
                );
                println!("soak: fault {line}");
                if let Ok(mut v) = faults.lock() {
                    v.push(line);
                }
                n += 1;
            }
        })
    };
    println!(
        "soak: {} min, a fault every {} s in rotation; every 30 s: time, requests, errors, mismatches, RSS, threads, descriptors",
        o.minutes,
        o.fault_every.as_secs()
    );
    // [requests, errors, mismatches], printed every 30 s whether requests complete or not
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let printer = {
        let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
        std::thread::spawn(move || {
            let mut next = t0;
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    next += Duration::from_secs(30);
                    let (rss, threads, fds) = resources();
                    let c = |i: usize| counts[i].load(Ordering::Relaxed);
                    println!(
                        "soak: {:>5.0}s {:>9} requests {:>4} errors {:>3} mismatches  rss {rss} MiB  threads {threads}  fds {fds}",
                        t0.elapsed().as_secs_f64(),
                        c(0),
                        c(1),
                        c(2)
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let show = |r: &RunReport| {
        counts[0].store(r.completed, Ordering::Relaxed);
        counts[1].store(r.errors, Ordering::Relaxed);
        counts[2].store(r.mismatches, Ordering::Relaxed);
    };
    let w = Workload {
        qd: 16,
        write_pct: 50,
        span_sectors: span,
        seed: 0x50a4,
        verify: true,
        indirect_every: 0,
        flush_every: 0,
        latencies: false,
    };
    let report = w.run(&mut front, |_| Instant::now() < end, |r, _| show(r));
    stop.store(true, Ordering::Relaxed);
    let _ = injector.join();
    let _ = printer.join();
    let report = report?;
    let (rss, threads, fds) = resources();
    println!(
        "soak: done after {:.0} s: {} requests, {} errors, {} mismatches, {} reads checked; rss {rss} MiB, threads {threads}, fds {fds}",
        t0.elapsed().as_secs_f64(),
        report.completed,
        report.errors,
        report.mismatches,
        report.reads_checked
    );
    front.close(Duration::from_secs(60))?;
    toolstack_detach(&dom0, &be).map_err(XenError::from)?;
    let _ = stop_serve.send(());
    let _ = server.join();
    let export = export_image(conf, image)?;
    let bad = report.diff_image(&export, span / 8);
    println!(
        "soak: rbd export of the first {SPAN_MIB} MiB: {} blocks differ from what the guest wrote ({})",
        bad.len(),
        if bad.is_empty() { "PASS" } else { "FAIL" }
    );
    if !bad.is_empty() || report.mismatches > 0 {
        return Err(DemoError::Mismatch(report.mismatches.max(bad.len() as u64)));
    }
    if report.errors > 0 {
        return Err(DemoError::Errors(report.errors));
    }
    Ok(())
}
