//! `rbdback demo`: a guest's I/O through the whole stack, on the embedded default.
//!
//! A local Ceph cluster (started by `tools/ceph-cluster` unless one is given), the simulated
//! Xen, the real backend and a simulated guest whose blkfront-like frontend runs a verified
//! mixed workload through the ring. Prints progress, IOPS, latency and the verification
//! result, then cleans up.
//!
//! The backend is `rbdback serve` itself, as dom0 runs it: a child process, sandboxed (unless
//! the demo does not run as root), reaching the simulated Xen through `--sim-dir`
//! (`xen::sim::remote`). `--in-process` runs `device::backend::serve` on a thread of the demo
//! instead, as `tools/bench-e2e` does: there the simulated event channels are function calls,
//! not messages to another process, so the figures are the backend's, not the simulator's.
//!
//! Must never: leave the image, the cluster or a backend process behind after it started them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::device::backend::{serve, ServeConfig};
use crate::device::testfront::{
    run_stream, run_workload, toolstack_attach, toolstack_detach, AttachSpec, FrontTestError,
    RunReport, SimBlkfront,
};
use crate::device::vbd::{Options, RadosOpener};
use crate::ring::Abi;
use crate::xen::sim::SimXen;
use crate::xen::{Platform, XenError};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// An existing cluster's ceph.conf; `None` starts the project's local cluster.
    pub ceph_conf: Option<PathBuf>,
    /// Requests to run.
    pub requests: u64,
    /// Queue depth per queue.
    pub qd: usize,
    /// Queues to ask for.
    pub queues: u32,
    /// Percent writes.
    pub write_pct: u32,
    /// Image size in MiB.
    pub size_mib: u64,
    /// Ring page order.
    pub ring_order: u32,
    /// Benchmark mode: use this existing image as it is, don't verify reads or the export.
    pub bench_image: Option<String>,
    /// Bytes at the start of the disk the workload spans (MiB).
    pub span_mib: u64,
    /// Benchmark mode: request size in KiB (4 to 1024; over 44 goes indirect).
    pub bs_kib: usize,
    /// Benchmark mode: sequential instead of random offsets.
    pub seq: bool,
    /// Run the backend on a thread of the demo, not as a sandboxed `serve` child.
    pub in_process: bool,
    /// Run the `serve` child without its sandbox (measuring what the sandbox costs).
    pub no_sandbox: bool,
    /// With [`Self::in_process`]: keep the crash-recovery journal of every ring (as `serve`
    /// always does); off only to measure what it costs.
    pub journal: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            ceph_conf: None,
            requests: 20_000,
            qd: 32,
            queues: 2,
            write_pct: 50,
            size_mib: 256,
            ring_order: 2,
            bench_image: None,
            span_mib: 64,
            bs_kib: 4,
            seq: false,
            in_process: false,
            no_sandbox: false,
            journal: true,
        }
    }
}

/// The demo failed.
#[derive(Debug, Error)]
pub enum DemoError {
    /// The cluster tool failed.
    #[error("cannot start the local Ceph cluster: {0}")]
    Cluster(String),
    /// `rbd create`/`rm` failed.
    #[error("rbd command failed: {0}")]
    Rbd(String),
    /// Simulated Xen.
    #[error("simulated xen")]
    Xen(#[from] XenError),
    /// The simulated guest.
    #[error("simulated guest")]
    Front(#[from] FrontTestError),
    /// Data did not verify.
    #[error("{0} reads returned data that was not written")]
    Mismatch(u64),
    /// Requests failed.
    #[error("{0} requests failed")]
    Errors(u64),
    /// The backend process.
    #[error("backend: {0}")]
    Backend(String),
}

pub(crate) fn tools_dir() -> PathBuf {
    std::env::var_os("RBDBACK_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tools")))
}

/// `tools/ceph-cluster args...` on the shared cluster, or on private cluster `dir` (started
/// with the fault tests' configuration, `rados::testing::PRIVATE_CONF`); returns its stdout.
pub(crate) fn cluster_tool(dir: Option<&Path>, args: &[&str]) -> Result<String, DemoError> {
    let tool = tools_dir().join("ceph-cluster");
    let mut cmd = Command::new(&tool);
    if let Some(d) = dir {
        cmd.env("RBDBACK_CEPH_DIR", d)
            .env("CEPHLAB_EXTRA_CONF", crate::rados::testing::PRIVATE_CONF);
    }
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| DemoError::Cluster(format!("{}: {e}", tool.display())))?;
    if !out.status.success() {
        return Err(DemoError::Cluster(format!(
            "ceph-cluster {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts (or joins) the shared cluster, or private cluster `dir`; returns its ceph.conf.
pub(crate) fn start_cluster(dir: Option<&Path>) -> Result<PathBuf, DemoError> {
    eprintln!(
        "starting the local Ceph cluster ({})",
        dir.map_or("shared".into(), |d| d.display().to_string())
    );
    let text = cluster_tool(dir, &["up"])?;
    text.lines()
        .find_map(|l| {
            l.trim()
                .trim_start_matches("export ")
                .strip_prefix("CEPH_CONF=")
                .map(|v| PathBuf::from(v.trim()))
        })
        .ok_or_else(|| DemoError::Cluster("no CEPH_CONF in the tool's output".into()))
}

pub(crate) fn rbd(conf: &PathBuf, args: &[&str]) -> Result<(), DemoError> {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .map_err(|e| DemoError::Rbd(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DemoError::Rbd(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// CPU seconds (user + system) this process has used.
fn process_cpu() -> f64 {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => 0.0,
    }
}

pub(crate) fn export_image(conf: &std::path::Path, image: &str) -> Result<Vec<u8>, DemoError> {
    let path = std::env::temp_dir().join(format!("{image}.export"));
    let _ = std::fs::remove_file(&path);
    let conf = conf.to_path_buf();
    rbd(
        &conf,
        &[
            "export",
            "--no-progress",
            &format!("rbd/{image}"),
            &path.display().to_string(),
        ],
    )?;
    let data =
        std::fs::read(&path).map_err(|e| DemoError::Rbd(format!("reading the export: {e}")))?;
    let _ = std::fs::remove_file(&path);
    Ok(data)
}

/// Runs the demo; prints its report to stdout.
pub fn run(o: &DemoOptions) -> Result<(), DemoError> {
    let conf = match &o.ceph_conf {
        Some(c) => c.clone(),
        None => start_cluster(None)?,
    };
    let image = format!("rbdback-demo-{}", std::process::id());
    rbd(
        &conf,
        &[
            "create",
            "--size",
            &format!("{}M", o.size_mib),
            &format!("rbd/{image}"),
        ],
    )?;
    let result = run_on(o, &conf, &image);
    let _ = rbd(&conf, &["rm", "--no-progress", &format!("rbd/{image}")]);
    if o.ceph_conf.is_none() {
        let _ = Command::new(tools_dir().join("ceph-cluster"))
            .arg("down")
            .status();
    }
    result
}

/// The demo's backend: a `serve` child process or a thread of the demo.
enum Backend {
    Child {
        child: std::process::Child,
        run_dir: PathBuf,
    },
    Thread {
        stop: mpsc::Sender<()>,
        thread: std::thread::JoinHandle<Result<crate::device::backend::ServeEnd, XenError>>,
        /// The rings' journals (as `serve` keeps them under its run directory).
        state: Option<PathBuf>,
    },
}

impl Backend {
    /// Starts guest `domid`'s backend on `xen`.
    fn start(xen: &Arc<SimXen>, domid: u16, o: &DemoOptions) -> Result<Backend, DemoError> {
        if o.in_process {
            let state = o.journal.then(|| {
                std::env::temp_dir().join(format!("rbdback-demo-state-{}", std::process::id()))
            });
            let cfg = ServeConfig {
                kind: "vbd".into(),
                backend_domid: 0,
                domid,
                exit_when_empty: true,
                options: Options {
                    state_dir: state.clone(),
                    ..Options::default()
                },
            };
            let (stop, stop_rx) = mpsc::channel();
            let p = Arc::new(xen.platform());
            let thread =
                std::thread::spawn(move || serve(p, Arc::new(RadosOpener), &cfg, &stop_rx));
            println!("demo: backend on a thread of the demo (--in-process: not sandboxed)");
            return Ok(Backend::Thread {
                stop,
                thread,
                state,
            });
        }
        let exe = std::env::current_exe()
            .map_err(|e| DemoError::Backend(format!("cannot find our executable: {e}")))?;
        let run_dir = std::env::temp_dir().join(format!("rbdback-demo-run-{}", std::process::id()));
        let mut cmd = Command::new(exe);
        cmd.arg("--run-dir")
            .arg(&run_dir)
            .args(["serve", "--domid", &domid.to_string(), "--sim-dir"])
            .arg(xen.dir())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let sandboxed = nix::unistd::geteuid().is_root() && !o.no_sandbox;
        if !sandboxed {
            cmd.arg("--no-sandbox");
        }
        let child = cmd
            .spawn()
            .map_err(|e| DemoError::Backend(format!("cannot start `rbdback serve`: {e}")))?;
        println!(
            "demo: backend `rbdback serve --domid {domid}` is process {} ({})",
            child.id(),
            if sandboxed {
                "sandboxed: its own uid, no capabilities, seccomp, Landlock"
            } else if o.no_sandbox {
                "NOT sandboxed: --no-sandbox"
            } else {
                "NOT sandboxed: the demo does not run as root"
            }
        );
        Ok(Backend::Child { child, run_dir })
    }

    /// The backend's CPU seconds so far, when it is a process of its own.
    fn cpu(&self) -> f64 {
        match self {
            Backend::Child { child, .. } => {
                crate::exporter::ProcessSample::of(&child.id().to_string()).cpu_seconds
            }
            Backend::Thread { .. } => 0.0,
        }
    }

    /// Waits for the backend to end (its guest has no disk left), at most 30 s.
    fn finish(self) {
        match self {
            Backend::Thread {
                stop,
                thread,
                state,
            } => {
                let _ = stop.send(());
                let _ = thread.join();
                if let Some(d) = state {
                    let _ = std::fs::remove_dir_all(d);
                }
            }
            Backend::Child { mut child, run_dir } => {
                let deadline = Instant::now() + Duration::from_secs(30);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if matches!(child.try_wait(), Ok(None)) {
                    eprintln!("demo: the backend did not exit; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                }
                let _ = std::fs::remove_dir_all(run_dir);
            }
        }
    }
}

fn run_on(o: &DemoOptions, conf: &std::path::Path, image: &str) -> Result<(), DemoError> {
    let xen = SimXen::start()?;
    let platform = Arc::new(xen.platform());
    let guest_domid = 7;
    let backend = Backend::start(&xen, guest_domid, o)?;

    let params = format!("rbd:rbd/{image}:conf={}", conf.display());
    let mut spec = AttachSpec::new(&params);
    spec.abi = Abi::X86_64;
    spec.queues = o.queues;
    spec.ring_order = o.ring_order;
    // bench streams give each slot its own data and descriptor pages
    let pages = (o.bs_kib / 4).clamp(1, 256);
    spec.data_pages = 1024.max(o.qd * (pages + 1) + 8);
    let dom0 = platform.xenstore()?;
    let (be, fe) = toolstack_attach(&dom0, 0, guest_domid, &spec).map_err(XenError::from)?;
    let guest = xen.frontend(guest_domid)?;
    let t0 = Instant::now();
    let mut front = SimBlkfront::connect(guest, &be, &fe, &spec, Duration::from_secs(60))?;
    println!(
        "demo: guest {guest_domid} connected to rbd/{image} in {:.1}s: {} sectors, {} queue(s), discard {}, indirect {}",
        t0.elapsed().as_secs_f64(),
        front.sectors,
        front.queue_count(),
        front.discard,
        front.max_indirect
    );
    let span = front.sectors.min(o.span_mib * 2048);
    let verify = o.bench_image.is_none();
    let cpu0 = process_cpu() + backend.cpu();
    let show = |total: u64, r: &RunReport| {
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        eprint!(
            "\rdemo: {}/{} requests, {:.0} IOPS, {} errors, {} mismatches   ",
            r.completed,
            total,
            r.completed as f64 / secs,
            r.errors,
            r.mismatches
        );
    };
    let pages = (o.bs_kib / 4).clamp(1, 256);
    let report = if verify || (pages == 1 && !o.seq && o.write_pct > 0 && o.write_pct < 100) {
        run_workload(
            &mut front,
            o.requests,
            o.qd,
            o.write_pct,
            span,
            0x5eed,
            verify,
            show,
        )?
    } else {
        run_stream(
            &mut front,
            o.requests,
            pages,
            o.qd,
            o.write_pct >= 50,
            o.seq,
            span,
            show,
        )?
    };
    eprintln!();
    let cpu = process_cpu() + backend.cpu() - cpu0;
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    println!(
        "demo: {} x {} KiB requests ({}% writes{}) at queue depth {} per queue in {:.2}s",
        report.completed,
        if verify { 4 } else { pages * 4 },
        o.write_pct,
        if o.seq && !verify { ", sequential" } else { "" },
        o.qd,
        secs
    );
    println!(
        "demo: {:.0} IOPS, {:.1} MiB/s, latency p50 {} us, p99 {} us, max {} us",
        report.completed as f64 / secs,
        report.bytes as f64 / secs / 1048576.0,
        report.percentile(50.0),
        report.percentile(99.0),
        report.latencies_us.last().copied().unwrap_or(0)
    );
    println!(
        "demo: process CPU {:.2}s = {:.1} us per request (backend and simulated guest together)",
        cpu,
        cpu * 1e6 / (report.completed.max(1) as f64)
    );
    let verdict = if !verify {
        "SKIPPED (bench mode)"
    } else if report.mismatches == 0 && report.errors == 0 {
        "PASS"
    } else {
        "FAIL"
    };
    println!(
        "demo: verification {verdict}: {} reads checked against what was written, {} mismatches, {} errors",
        report.reads_checked, report.mismatches, report.errors
    );
    front.close(Duration::from_secs(30))?;
    toolstack_detach(&dom0, &be).map_err(XenError::from)?;
    // the guest has no disk left: a `serve` exits by itself
    dom0.rm(&be).map_err(XenError::from)?;
    backend.finish();
    if !verify {
        return if report.errors > 0 {
            Err(DemoError::Errors(report.errors))
        } else {
            Ok(())
        };
    }
    // What the cluster holds must be what the guest wrote: compare `rbd export` with the model.
    let blocks = span / 8;
    let export = export_image(conf, image)?;
    let bad = report.diff_image(&export, blocks);
    println!(
        "demo: rbd export of the first {} MiB: {} of {} blocks differ from what the guest wrote ({})",
        blocks * 4096 / 1048576,
        bad.len(),
        blocks,
        if bad.is_empty() { "PASS" } else { "FAIL" }
    );
    if !bad.is_empty() {
        return Err(DemoError::Mismatch(bad.len() as u64));
    }
    if report.mismatches > 0 {
        return Err(DemoError::Mismatch(report.mismatches));
    }
    if report.errors > 0 {
        return Err(DemoError::Errors(report.errors));
    }
    Ok(())
}
