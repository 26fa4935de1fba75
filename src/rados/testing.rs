//! Test support: the project's local Ceph cluster (`tools/ceph-cluster`), started once per run
//! and shared by every test process, and uniquely named images.
//!
//! Tests that need Ceph call [`cluster`]; it FAILS (panics) when the cluster cannot start, so
//! a missing cluster never turns into a silently skipped test.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use std::time::{Duration, Instant};

use std::sync::Arc;

use super::{BlockOp, Completion, Image, ImageSpec, Queue};

/// A running local cluster.
#[derive(Debug, Clone)]
pub struct TestCluster {
    /// Its ceph.conf (the admin keyring is referenced from it).
    pub conf: PathBuf,
}

fn tool() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/ceph-cluster"))
}

/// Starts (or joins) the local cluster.
pub fn cluster() -> &'static TestCluster {
    static C: OnceLock<TestCluster> = OnceLock::new();
    C.get_or_init(|| {
        let out = Command::new(tool())
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
        TestCluster { conf }
    })
}

impl TestCluster {
    /// Runs `rbd -c <conf> args...`, panicking with its stderr on failure.
    pub fn rbd(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run rbd: {e}"));
        assert!(
            out.status.success(),
            "rbd {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
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
