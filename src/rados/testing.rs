//! Test support: the project's local Ceph cluster (`tools/ceph-cluster`), started once per run
//! and shared by every test process, and uniquely named images.
//!
//! Tests that need Ceph call [`cluster`]; it FAILS (panics) when the cluster cannot start, so
//! a missing cluster never turns into a silently skipped test. Tests that kill, freeze or
//! restart daemons use a [`private_cluster`] of their own instead (one per test group, run
//! one test at a time: see `.config/nextest.toml`), never the shared one.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use std::time::{Duration, Instant};

use std::sync::Arc;

use super::{BlockOp, Completion, Image, ImageSpec, Queue};

/// A running local cluster.
#[derive(Debug, Clone)]
pub struct TestCluster {
    /// Its ceph.conf (the admin keyring is referenced from it).
    pub conf: PathBuf,
    /// A private cluster's directory (`RBDBACK_CEPH_DIR`); `None` for the shared one.
    pub dir: Option<PathBuf>,
}

fn tool() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/ceph-cluster"))
}

/// ceph.conf lines of private clusters. Ceph 16's OSD keeps a placement group of a
/// single-replica pool "laggy" for ever when it was frozen for longer than its read lease
/// (`osd_heartbeat_grace` × `osd_pool_default_read_lease_ratio` = 16 s by default) with
/// client operations queued: nothing re-checks a lease no replica acknowledges, and every
/// client (ours, krbd, the `rados` tool) waits until the PG changes interval (`ceph osd down
/// 0`). The fault tests measure the backend, not that bug, so their leases outlast a 20 s
/// freeze (docs/operations.md).
pub const PRIVATE_CONF: &str = "        osd pool default read lease ratio = 4";

fn cluster_up(dir: Option<&PathBuf>) -> TestCluster {
    let mut cmd = Command::new(tool());
    if let Some(d) = dir {
        cmd.env("RBDBACK_CEPH_DIR", d)
            .env("CEPHLAB_EXTRA_CONF", PRIVATE_CONF);
    }
    let out = cmd
        .arg("up")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool().display()));
    assert!(
        out.status.success(),
        "tools/ceph-cluster up failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let conf = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("export CEPH_CONF="))
        .map(|v| PathBuf::from(v.trim()))
        .unwrap_or_else(|| panic!("no CEPH_CONF in tools/ceph-cluster output:\n{text}"));
    TestCluster {
        conf,
        dir: dir.cloned(),
    }
}

/// Starts (or joins) the local cluster.
pub fn cluster() -> &'static TestCluster {
    static C: OnceLock<TestCluster> = OnceLock::new();
    C.get_or_init(|| cluster_up(None))
}

/// Starts (or joins) private cluster `name` in `target/ceph-<name>`, for tests that inject
/// faults into its daemons. Daemons a failed test left frozen or stopped are resumed and
/// started first, so one test's failure does not become the next one's.
pub fn private_cluster(name: &str) -> &'static TestCluster {
    static C: Mutex<Vec<(String, &'static TestCluster)>> = Mutex::new(Vec::new());
    let mut all = C.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, c)) = all.iter().find(|(n, _)| n == name) {
        return c;
    }
    let dir =
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).join(format!("ceph-{name}"));
    if dir.join("ceph.conf").exists() {
        let c = TestCluster {
            conf: dir.join("ceph.conf"),
            dir: Some(dir.clone()),
        };
        c.revive();
    }
    let c: &'static TestCluster = Box::leak(Box::new(cluster_up(Some(&dir))));
    all.push((name.to_owned(), c));
    c
}

/// A daemon of a private cluster.
pub const OSD: &str = "osd.0";
/// The monitor of a private cluster.
pub const MON: &str = "mon.a";

impl TestCluster {
    /// `tools/ceph-cluster daemon <action> <name>` on this private cluster (see `tools/ceph-up`):
    /// `kill`, `stop` (SIGSTOP), `cont`, `start` (returns once the map has it up), `restart`.
    /// Panics on the shared cluster, and when the action fails.
    pub fn daemon(&self, action: &str, name: &str) {
        let dir = self
            .dir
            .as_ref()
            .unwrap_or_else(|| panic!("daemon {action} {name}: not on the shared cluster"));
        let out = Command::new(tool())
            .env("RBDBACK_CEPH_DIR", dir)
            .args(["daemon", action, name])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool().display()));
        assert!(
            out.status.success(),
            "daemon {action} {name} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Resumes and starts every daemon of a private cluster (what a test that injected a
    /// fault must leave behind, even when it fails).
    pub fn revive(&self) {
        let Some(dir) = &self.dir else { return };
        for (action, name) in [
            ("cont", OSD),
            ("cont", MON),
            ("start", MON),
            ("start", OSD),
            ("start", "mgr.x"),
        ] {
            let _ = Command::new(tool())
                .env("RBDBACK_CEPH_DIR", dir)
                .args(["daemon", action, name])
                .output();
        }
    }

    /// Runs `<tool> -c <conf> args...` (a Ceph command-line tool, at most 10 minutes) and
    /// returns its stdout, panicking with its stderr on failure.
    pub fn tool(&self, tool: &str, args: &[&str]) -> Vec<u8> {
        let out = Command::new("timeout")
            .arg("600")
            .arg(tool)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Runs `ceph -c <conf> args...` and returns its stdout as text.
    pub fn ceph(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.tool("ceph", args)).into_owned()
    }

    /// Runs `rbd -c <conf> args...`, panicking with its stderr on failure.
    pub fn rbd(&self, args: &[&str]) -> Vec<u8> {
        self.tool("rbd", args)
    }

    /// Creates a uniquely named image of `size_mib` MiB; `features` as `rbd create
    /// --image-feature` takes them (None: Ceph's defaults). Returns its name.
    pub fn create_image(&self, prefix: &str, size_mib: u64, features: Option<&str>) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let size = format!("{size_mib}M");
        let img = format!("rbd/{name}");
        let mut args = vec!["create", "--size", &size];
        if let Some(f) = features {
            args.push("--image-feature");
            args.push(f);
        }
        args.push(&img);
        self.rbd(&args);
        name
    }

    /// An [`ImageSpec`] for `rbd/<image>` on this cluster.
    pub fn spec(&self, image: &str) -> ImageSpec {
        let mut s = ImageSpec::new("rbd", image);
        s.conf = Some(self.conf.display().to_string());
        s
    }

    /// `rbd export` of the image (or `image@snap`) as bytes.
    pub fn export(&self, image: &str) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!(
            "rbdback-export-{}-{}",
            std::process::id(),
            image.replace('@', "_")
        ));
        let _ = std::fs::remove_file(&dir);
        let path = dir.display().to_string();
        self.rbd(&["export", "--no-progress", &format!("rbd/{image}"), &path]);
        let data = std::fs::read(&dir).unwrap_or_default();
        let _ = std::fs::remove_file(&dir);
        data
    }
}

/// Resumes a private cluster's daemons when dropped: a test that injects a fault holds one,
/// so the fault ends with the test, failed or not.
#[derive(Debug)]
pub struct Revive(pub &'static TestCluster);

impl Drop for Revive {
    fn drop(&mut self) {
        self.0.revive();
    }
}

/// Reaps `q` until `n` completions arrived (at most 120 s; fewer fails the test).
pub fn wait_all(q: &mut Queue, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while out.len() < n && Instant::now() < deadline {
        q.reap(&mut out);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(out.len(), n, "completions");
    out
}

/// Submits `op` alone and waits for its completion.
pub fn one(q: &mut Queue, op: BlockOp) -> Completion {
    q.submit(0, op)
        .unwrap_or_else(|e| panic!("submit: {}", e.error));
    wait_all(q, 1).pop().unwrap_or_else(|| unreachable!())
}

/// Arms Ceph's own fault injection in `spec`: replies from OSDs can be delayed, but are not
/// until [`drop_with_silent_osds`] raises the probability.
pub fn arm_osd_delay(spec: &mut ImageSpec) {
    spec.conf_options
        .push(("ms_inject_delay_type".into(), "osd".into()));
    spec.conf_options
        .push(("ms_inject_delay_probability".into(), "0".into()));
}

/// Holds every later OSD reply to `img`'s client for up to 10 minutes, then drops `img`;
/// returns how long dropping took.
pub fn drop_with_silent_osds(img: Arc<Image>) -> Duration {
    img.set_option("ms_inject_delay_max", "600")
        .unwrap_or_else(|e| panic!("{e}"));
    img.set_option("ms_inject_delay_probability", "1")
        .unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    drop(img);
    t0.elapsed()
}
