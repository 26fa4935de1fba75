//! What operators see of running disks: `rbdback status` over the control sockets, and the
//! Prometheus endpoint aggregating every `serve` process. Two guests are served by the
//! production backend (simulated Xen, in-memory engine), each `serve` with its own control
//! socket in one run directory, as on a host; the guests make an exact set of requests and
//! the counters must equal them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rbdback::control::{self, Commands, Server};
use rbdback::device::backend::{serve_observed, ServeConfig};
use rbdback::device::metrics::Registry;
use rbdback::device::testfront::{toolstack_attach, AttachSpec, SimBlkfront};
use rbdback::device::vbd::{ImageOpener, Options};
use rbdback::exporter::{self, Scrape};
use rbdback::rados::{Image, ImageSpec, RadosError};
use rbdback::ring::front::WireRequest;
use rbdback::ring::request::op;
use rbdback::ring::Status;
use rbdback::xen::sim::SimXen;
use rbdback::xen::xenstore::Xenstore;
use rbdback::xen::Platform;

const T: Duration = Duration::from_secs(20);

/// `rbd:mem/<MiB>`: an in-memory image; `rbd:missing/...`: refused.
struct MemOpener;

impl ImageOpener for MemOpener {
    fn open(&self, spec: &ImageSpec) -> Result<Arc<Image>, RadosError> {
        if spec.image == "gone" {
            return Err(RadosError::Invalid("image rbd/gone does not exist".into()));
        }
        Ok(Image::memory(spec.image.parse::<u64>().unwrap_or(16) << 20))
    }
}

/// One guest's `serve`, with its control socket.
struct Serve {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
    _control: Server,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Host {
    xen: Arc<SimXen>,
    dom0: Xenstore,
    run_dir: PathBuf,
    serves: Vec<Serve>,
}

impl Host {
    fn new(name: &str) -> Host {
        let xen = SimXen::start().unwrap();
        let dom0 = xen.platform().xenstore().unwrap();
        let run_dir = std::env::temp_dir().join(format!("rbdback-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        Host {
            xen,
            dom0,
            run_dir,
            serves: Vec::new(),
        }
    }

    /// Starts guest `domid`'s `serve`, as `rbdback serve` does: registry, control socket.
    fn serve(&mut self, domid: u16) {
        let platform = Arc::new(self.xen.platform());
        let disks = Arc::new(Registry::default());
        let mut commands = Commands::default();
        exporter::register_commands(&mut commands, &disks);
        let control =
            Server::start(&self.run_dir, &format!("serve-{domid}.sock"), commands).unwrap();
        let cfg = ServeConfig {
            kind: "vbd".into(),
            backend_domid: 0,
            domid,
            exit_when_empty: false,
            options: Options {
                max_queues: 4,
                ..Options::default()
            },
        };
        let (stop, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            serve_observed(platform, Arc::new(MemOpener), &cfg, &rx, &disks).unwrap();
        });
        self.serves.push(Serve {
            stop,
            thread: Some(thread),
            _control: control,
        });
    }

    fn attach(&self, domid: u16, spec: &AttachSpec) -> SimBlkfront {
        let (be, fe) = toolstack_attach(&self.dom0, 0, domid, spec).unwrap();
        SimBlkfront::connect(self.xen.frontend(domid).unwrap(), &be, &fe, spec, T).unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.serves.clear();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

fn status_json(run_dir: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rbdback"))
        .arg("--run-dir")
        .arg(run_dir)
        .arg("status")
        .args(extra)
        .env_remove("RBDBACK_RUN_DIR")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let v = if extra.contains(&"--json") {
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    } else {
        serde_json::Value::Null
    };
    let text = if extra.contains(&"--json") {
        String::from_utf8_lossy(&o.stderr).into_owned()
    } else {
        out
    };
    (o.status.code(), v, text)
}

#[test]
fn status_json_shows_a_connected_guest_and_a_failed_disk() {
    let mut host = Host::new("status");
    host.serve(5);
    host.serve(6);
    let mut spec = AttachSpec::new("rbd:mem/16");
    spec.queues = 2;
    spec.ring_order = 1;
    let mut f = host.attach(5, &spec);
    assert_eq!(f.write_sync(0, 0, 0, &[7u8; 4096]).unwrap(), Status::Okay);
    // guest 6: a disk whose image cannot be opened
    let mut bad = AttachSpec::new("rbd:rbd/gone");
    bad.devid = 51728;
    toolstack_attach(&host.dom0, 0, 6, &bad).unwrap();
    let be6 = "/local/domain/0/backend/vbd/6/51728";
    for _ in 0..100 {
        if host
            .dom0
            .read(&format!("{be6}/rbdback-image"))
            .unwrap()
            .as_deref()
            == Some("failed")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let (code, v, err) = status_json(&host.run_dir, &["--json"]);
    assert_eq!(code, Some(0), "{err}");
    let disks = v.as_array().unwrap();
    assert_eq!(disks.len(), 2, "{v:#}");
    let d = &disks[0];
    assert_eq!(d["domid"], 5);
    assert_eq!(d["devid"], 51712);
    assert_eq!(d["pool"], "mem");
    assert_eq!(d["image"], "mem/16");
    assert_eq!(d["engine"], "memory");
    assert_eq!(d["state"], "Connected");
    assert_eq!(d["negotiated"]["ring_order"], 1);
    assert_eq!(d["negotiated"]["queues"], 2);
    assert_eq!(d["negotiated"]["indirect_segments"], 256);
    assert_eq!(d["negotiated"]["persistent"], true);
    assert_eq!(
        d["io"]["ring_capacity"],
        2 * 64,
        "two order-1 rings of 64 slots"
    );
    assert_eq!(d["io"]["requests"][1], 1, "one write");
    assert_eq!(d["io"]["inflight_requests"], 0);
    assert_eq!(d["lock"]["state"], "not used");
    assert!(d["last_error"].is_null(), "{d}");
    let b = &disks[1];
    assert_eq!(
        (b["domid"].as_u64(), b["devid"].as_u64()),
        (Some(6), Some(51728))
    );
    // InitWait: the toolstack's hotplug script reports the failure (tests/failed_attach.rs)
    assert_eq!(b["state"], "InitWait");
    assert!(b["negotiated"].is_null());
    let e = b["last_error"].as_str().unwrap();
    assert!(e.contains("image rbd/gone does not exist"), "{e}");

    // --domid filters; the table names the same disks
    let (_, v, _) = status_json(&host.run_dir, &["--json", "--domid", "6"]);
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (code, _, table) = status_json(&host.run_dir, &[]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("DOMID  DEVID  IMAGE"), "{table}");
    assert!(
        lines[1].contains("mem/16") && lines[1].contains("Connected"),
        "{table}"
    );
    assert!(lines[2].contains("does not exist"), "{table}");

    // a socket nobody answers on: named, exit status 1, the others still listed
    std::os::unix::net::UnixListener::bind(control::socket_path(&host.run_dir, 9))
        .map(drop)
        .unwrap();
    let (code, v, err) = status_json(&host.run_dir, &["--json"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("guest 9") && err.contains("serve-9.sock"),
        "{err}"
    );
    assert_eq!(v.as_array().unwrap().len(), 2);
}

/// `name{labels} value` lines of an exposition, by name and sorted labels.
fn samples(text: &str) -> HashMap<String, f64> {
    let mut m = HashMap::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = l.rsplit_once(' ').unwrap();
        m.insert(series.to_owned(), value.parse::<f64>().unwrap());
    }
    m
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in {:#?}", m.keys().collect::<Vec<_>>()))
}

#[test]
fn metrics_endpoint_counts_exactly_the_requests_of_every_guest() {
    let mut host = Host::new("metrics");
    host.serve(5);
    host.serve(6);
    let mut spec = AttachSpec::new("rbd:mem/16");
    spec.queues = 2;
    spec.data_pages = 64;
    let mut a = host.attach(5, &spec);
    let mut b = host.attach(6, &AttachSpec::new("rbd:mem/8"));

    // guest 5: 10 writes of 8 KiB on queue 0, 7 reads of 4 KiB on queue 1, 3 flushes,
    // 2 discards of 4 KiB, one unknown operation, one read past the end
    for i in 0..10 {
        assert_eq!(
            a.write_sync(0, i * 16, 0, &[7u8; 8192]).unwrap(),
            Status::Okay
        );
    }
    for i in 0..7 {
        assert_eq!(a.read_sync(1, i * 8, 0, 4096).unwrap().0, Status::Okay);
    }
    for _ in 0..3 {
        let id = a.next_id();
        assert_eq!(a.one(0, WireRequest::flush(id)).unwrap(), Status::Okay);
    }
    for i in 0..2 {
        let id = a.next_id();
        let d = WireRequest::Discard {
            flag: 0,
            id,
            sector: 512 + i * 8,
            nr_sectors: 8,
        };
        assert_eq!(a.one(1, d).unwrap(), Status::Okay);
    }
    let id = a.next_id();
    assert_eq!(
        a.one(0, WireRequest::rw(42, id, 0, Vec::new())).unwrap(),
        Status::NotSupported
    );
    let id = a.next_id();
    let beyond = WireRequest::read(id, 16 << 11, a.segments(0, 1, 4096));
    assert_eq!(a.one(0, beyond).unwrap(), Status::Error);
    // guest 6: 4 writes of 4 KiB, one a barrier
    for i in 0..3 {
        assert_eq!(
            b.write_sync(0, i * 8, 0, &[1u8; 4096]).unwrap(),
            Status::Okay
        );
    }
    let id = b.next_id();
    let segs = b.segments(0, 1, 4096);
    assert_eq!(
        b.one(0, WireRequest::rw(op::WRITE_BARRIER, id, 64, segs))
            .unwrap(),
        Status::Okay
    );

    let (dir, restarts) = (host.run_dir.clone(), vec![(6u16, 2u64)]);
    let addr = exporter::listen("127.0.0.1:0".parse().unwrap(), move || {
        Scrape::gather("supervise", &dir, restarts.clone())
            .unwrap()
            .render()
    })
    .unwrap();
    let text = exporter::fetch(addr).unwrap();
    // one exposition: each metric described once, whatever the number of disks
    assert_eq!(
        text.matches("# HELP rbdback_requests ").count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("# TYPE rbdback_request_latency_seconds histogram")
            .count(),
        1
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    let m = samples(&text);
    let a5 = r#"domid="5",devid="51712",pool="mem",image="mem/16",engine="memory""#;
    let b6 = r#"domid="6",devid="51712",pool="mem",image="mem/8",engine="memory""#;
    let s = |name: &str, labels: &str, extra: &str| get(&m, &format!("{name}{{{labels}{extra}}}"));
    assert_eq!(s("rbdback_requests_total", a5, r#",op="write""#), 10.0);
    assert_eq!(s("rbdback_requests_total", a5, r#",op="read""#), 7.0);
    assert_eq!(s("rbdback_requests_total", a5, r#",op="flush""#), 3.0);
    assert_eq!(s("rbdback_requests_total", a5, r#",op="discard""#), 2.0);
    assert_eq!(
        s("rbdback_bytes_total", a5, r#",op="write""#),
        10.0 * 8192.0
    );
    assert_eq!(s("rbdback_bytes_total", a5, r#",op="read""#), 7.0 * 4096.0);
    assert_eq!(
        s("rbdback_bytes_total", a5, r#",op="discard""#),
        2.0 * 4096.0
    );
    assert_eq!(s("rbdback_errors_total", a5, r#",status="error""#), 1.0);
    assert_eq!(
        s("rbdback_errors_total", a5, r#",status="eopnotsupp""#),
        1.0
    );
    assert_eq!(
        s("rbdback_request_latency_seconds_count", a5, r#",op="read""#),
        7.0
    );
    assert_eq!(
        get(
            &m,
            &format!(r#"rbdback_request_latency_seconds_bucket{{le="+Inf",{a5},op="write"}}"#)
        ),
        10.0
    );
    assert_eq!(s("rbdback_inflight_requests", a5, ""), 0.0);
    assert_eq!(s("rbdback_ring_slots", a5, ""), 2.0 * 32.0);
    assert_eq!(s("rbdback_ring_fill_ratio", a5, ""), 0.0);
    assert!(
        s("rbdback_persistent_grants", a5, "") >= 3.0,
        "pages the guest used stay mapped"
    );
    assert_eq!(
        s("rbdback_exclusive_lock_state", a5, r#",state="not used""#),
        1.0
    );
    assert_eq!(s("rbdback_stalled_requests", a5, ""), 0.0);
    assert_eq!(s("rbdback_disk_connected", a5, ""), 1.0);
    assert_eq!(s("rbdback_requests_total", b6, r#",op="write""#), 3.0);
    assert_eq!(
        s("rbdback_requests_total", b6, r#",op="flush""#),
        1.0,
        "the barrier"
    );
    assert_eq!(s("rbdback_bytes_total", b6, r#",op="flush""#), 4096.0);
    assert_eq!(s("rbdback_errors_total", b6, r#",status="error""#), 0.0);
    assert_eq!(get(&m, r#"rbdback_serve_up{domid="5"}"#), 1.0);
    assert_eq!(get(&m, r#"rbdback_backend_restarts_total{domid="6"}"#), 2.0);
    assert!(get(&m, r#"rbdback_process_threads{role="serve",domid="5"}"#) >= 1.0);
    assert!(
        get(
            &m,
            r#"rbdback_process_resident_memory_bytes{role="supervise",domid=""}"#
        ) > 1e6
    );
    assert!(m.contains_key(r#"rbdback_process_cpu_seconds_total{role="serve",domid="6"}"#));

    // every metric the Grafana dashboard queries is one this exposition has
    let dash = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/grafana-dashboard.json"
    ))
    .unwrap();
    let names: std::collections::HashSet<&str> =
        m.keys().map(|k| k.split('{').next().unwrap()).collect();
    let mut queried = 0;
    for (i, _) in dash.match_indices("rbdback_") {
        let name: String = dash[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        queried += 1;
        assert!(
            names.contains(name.as_str()),
            "the dashboard queries {name}, which is not exported"
        );
    }
    assert!(queried >= 15, "{queried} queries found");

    // more requests show on the next scrape
    assert_eq!(a.write_sync(0, 0, 0, &[9u8; 4096]).unwrap(), Status::Okay);
    let m = samples(&exporter::fetch(addr).unwrap());
    assert_eq!(
        get(&m, &format!(r#"rbdback_requests_total{{{a5},op="write"}}"#)),
        11.0
    );
}

#[test]
fn the_supervisor_counts_restarts_of_a_dying_backend_only() {
    use std::os::unix::fs::PermissionsExt;
    let host = Host::new("restarts");
    toolstack_attach(&host.dom0, 0, 5, &AttachSpec::new("rbd:mem/8")).unwrap();
    toolstack_attach(&host.dom0, 0, 6, &AttachSpec::new("rbd:mem/8")).unwrap();
    // a "serve" that dies at once for guest 5 and one that keeps running for guest 6
    std::fs::create_dir_all(&host.run_dir).unwrap();
    let exe = host.run_dir.join("fake-serve");
    std::fs::write(&exe, "#!/bin/sh\n[ \"$3\" = 5 ] && exit 1\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let restarts = Arc::new(rbdback::device::metrics::Restarts::default());
    let (stop, rx) = mpsc::channel();
    let (xs, r2) = (
        host.xen.platform().xenstore().unwrap(),
        Arc::clone(&restarts),
    );
    let sup = std::thread::spawn(move || {
        let cfg = rbdback::device::supervisor::SuperviseConfig {
            kind: "vbd".into(),
            backend_domid: 0,
            exe,
            extra_args: Vec::new(),
            run_dir: None,
        };
        rbdback::device::supervisor::supervise(&xs, &cfg, &rx, &r2).unwrap();
    });
    let t = std::time::Instant::now();
    while restarts.counts().first().map_or(0, |(_, n)| *n) < 2 && t.elapsed() < T {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.send(()).unwrap();
    sup.join().unwrap();
    // a stopping supervisor leaves its children serving: this test's fake ones go now
    let _ = std::process::Command::new("pkill")
        .args(["-P", &std::process::id().to_string()])
        .status();
    let counts = restarts.counts();
    assert_eq!(counts.len(), 1, "guest 6's backend never died: {counts:?}");
    assert_eq!(counts[0].0, 5);
    assert!(counts[0].1 >= 2, "{counts:?}");
    // a backend that keeps dying at start is backed off, and says so in its disks' error node
    let err = host
        .dom0
        .read("/local/domain/0/error/backend/vbd/5/51712/error")
        .unwrap()
        .unwrap_or_default();
    assert!(
        err.contains("exited with status 1")
            && err.contains("in a row")
            && err.contains("next start in"),
        "{err}"
    );
    assert!(host
        .dom0
        .read("/local/domain/0/error/backend/vbd/6/51712/error")
        .unwrap()
        .is_none());
}
