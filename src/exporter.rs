//! The Prometheus endpoint of `supervise` and `csi` (`--metrics-listen ADDR`): one exposition
//! for the whole host, gathered at each scrape from every `serve` process's control socket.
//!
//! Owns: the sample of a process ([`ProcessSample`], read from `/proc/self`), what a `serve`
//! process answers to `metrics` ([`ServeSample`]), the rendering of all of them as ONE
//! OpenMetrics text (each metric's `# HELP`/`# TYPE` once, every disk a labelled series;
//! prometheus-client encodes it), and a minimal HTTP/1.1 server for `GET /metrics`.
//! Trusts: the samples of its own `serve` children (root-only sockets); a child that does not
//! answer is reported as `rbdback_serve_up 0`, never fails the scrape. Must never: block the
//! supervisor's loop (it runs on its own thread) or read anything but the control sockets and
//! `/proc/self`.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use crate::control;
use crate::device::metrics::{DiskSample, Registry as Disks, LATENCY_BOUNDS_US, OP_CLASSES};

/// CPU, memory and threads of one process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessSample {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Threads.
    pub threads: u64,
}

impl ProcessSample {
    /// This process, from `/proc/self/stat` (zeros where it cannot be read).
    pub fn current() -> ProcessSample {
        ProcessSample::of("self")
    }

    /// Process `pid` (a number, or `self`), from `/proc/<pid>/stat` (zeros where it cannot
    /// be read).
    pub fn of(pid: &str) -> ProcessSample {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return ProcessSample::default();
        };
        // the command name (field 2) may hold spaces: fields are counted after its ')'
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        // after ')': state is field 3, so field N is f[N - 3]
        let field = |n: usize| {
            f.get(n - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|t| *t > 0)
            .unwrap_or(100);
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .filter(|p| *p > 0)
            .unwrap_or(4096);
        ProcessSample {
            cpu_seconds: (field(14) + field(15)) as f64 / tick as f64,
            rss_bytes: field(24).saturating_mul(u64::try_from(page).unwrap_or(4096)),
            threads: field(20),
        }
    }
}

/// What a `serve` process answers to the control command `metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServeSample {
    /// The process.
    pub process: ProcessSample,
    /// Its disks.
    pub disks: Vec<DiskSample>,
}

/// Registers `status` (every disk, as [`DiskSample`]s) and `metrics` (a [`ServeSample`]) for
/// the disks of `disks`.
pub fn register_commands(commands: &mut control::Commands, disks: &std::sync::Arc<Disks>) {
    let d = std::sync::Arc::clone(disks);
    commands.add("status", move |_| {
        serde_json::to_value(d.samples()).map_err(|e| e.to_string())
    });
    let d = std::sync::Arc::clone(disks);
    commands.add("metrics", move |_| {
        serde_json::to_value(ServeSample {
            process: ProcessSample::current(),
            disks: d.samples(),
        })
        .map_err(|e| e.to_string())
    });
}

/// One scrape's input: this process, the supervisor's restart counts, and each `serve`.
#[derive(Debug, Default)]
pub struct Scrape {
    /// The process serving the endpoint (`supervise` or `csi`).
    pub role: &'static str,
    /// Its own sample.
    pub own: ProcessSample,
    /// Backend restarts by guest.
    pub restarts: Vec<(u16, u64)>,
    /// Each `serve` process found, by guest: its sample, or `None` if it did not answer.
    pub serves: Vec<(u16, Option<ServeSample>)>,
}

impl Scrape {
    /// Asks every `serve` socket in `run_dir`.
    pub fn gather(
        role: &'static str,
        run_dir: &Path,
        restarts: Vec<(u16, u64)>,
    ) -> Result<Scrape, control::ControlError> {
        let serves = control::serve_sockets(run_dir)?
            .into_iter()
            .map(|(domid, path)| {
                let s = control::call(&path, "metrics", Value::Null)
                    .map_err(|e| warn!(error = %crate::chain(&e), "metrics of a serve process"))
                    .ok()
                    .and_then(|v| {
                        serde_json::from_value::<ServeSample>(v)
                            .map_err(|e| warn!(domid, error = %e, "bad metrics sample"))
                            .ok()
                    });
                (domid, s)
            })
            .collect();
        Ok(Scrape {
            role,
            own: ProcessSample::current(),
            restarts,
            serves,
        })
    }

    /// The OpenMetrics text of this scrape.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

type Labels = Vec<(Cow<'static, str>, Cow<'static, str>)>;

fn disk_labels(d: &DiskSample) -> Labels {
    vec![
        ("domid".into(), d.domid.to_string().into()),
        ("devid".into(), d.devid.to_string().into()),
        ("pool".into(), d.pool.clone().into()),
        ("image".into(), d.image.clone().into()),
        ("engine".into(), d.engine.clone().into()),
    ]
}

fn with(mut l: Labels, k: &'static str, v: impl Into<Cow<'static, str>>) -> Labels {
    l.push((k.into(), v.into()));
    l
}

/// The exclusive lock's states, one series each (1 for the current one).
const LOCK_STATES: [&str; 5] = ["held", "releasing", "not held", "not used", "unknown"];

impl Scrape {
    fn disks(&self) -> impl Iterator<Item = &DiskSample> {
        self.serves
            .iter()
            .filter_map(|(_, s)| s.as_ref())
            .flat_map(|s| s.disks.iter())
    }

    /// A family of counters or gauges: one descriptor, one series per (labels, value).
    fn family(
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        kind: MetricType,
        series: Vec<(Labels, f64)>,
    ) -> Result<(), std::fmt::Error> {
        if series.is_empty() {
            return Ok(());
        }
        let mut m = enc.encode_descriptor(name, help, None, kind)?;
        for (labels, v) in &series {
            let e = m.encode_family(labels)?;
            match kind {
                MetricType::Counter => ConstCounter::new(*v).encode(e)?,
                _ => ConstGauge::new(*v).encode(e)?,
            }
        }
        Ok(())
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let per_op = |f: &dyn Fn(&DiskSample, usize) -> f64| -> Vec<(Labels, f64)> {
            self.disks()
                .flat_map(|d| {
                    OP_CLASSES.iter().map(move |(c, name)| {
                        (with(disk_labels(d), "op", *name), f(d, *c as usize))
                    })
                })
                .collect()
        };
        let per_disk = |f: &dyn Fn(&DiskSample) -> f64| -> Vec<(Labels, f64)> {
            self.disks().map(|d| (disk_labels(d), f(d))).collect()
        };
        let n = |v: u64| v as f64;
        Self::family(
            &mut enc,
            "rbdback_requests",
            "Requests answered, by operation.",
            Counter,
            per_op(&|d, i| n(d.io.requests.get(i).copied().unwrap_or(0))),
        )?;
        Self::family(
            &mut enc,
            "rbdback_bytes",
            "Bytes moved by requests that succeeded, by operation (discard: bytes discarded).",
            Counter,
            per_op(&|d, i| n(d.io.bytes.get(i).copied().unwrap_or(0))),
        )?;
        let errors: Vec<(Labels, f64)> = self
            .disks()
            .flat_map(|d| {
                [
                    ("error", d.io.status_error),
                    ("eopnotsupp", d.io.status_unsupported),
                ]
                .map(|(s, v)| (with(disk_labels(d), "status", s), n(v)))
            })
            .collect();
        Self::family(
            &mut enc,
            "rbdback_errors",
            "Requests answered with an error status (BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP).",
            Counter,
            errors,
        )?;
        Self::family(
            &mut enc,
            "rbdback_inflight_requests",
            "Requests taken from the ring and not yet answered.",
            Gauge,
            per_disk(&|d| n(d.io.inflight_requests)),
        )?;
        Self::family(
            &mut enc,
            "rbdback_inflight_bytes",
            "Guest data buffered by requests in flight.",
            Gauge,
            per_disk(&|d| n(d.io.inflight_bytes)),
        )?;
        Self::family(
            &mut enc,
            "rbdback_ring_slots",
            "Ring slots over all queues (0 while disconnected).",
            Gauge,
            per_disk(&|d| n(d.io.ring_capacity)),
        )?;
        Self::family(
            &mut enc,
            "rbdback_ring_fill_ratio",
            "Outstanding ring slots over ring slots.",
            Gauge,
            per_disk(&|d| {
                if d.io.ring_capacity == 0 {
                    0.0
                } else {
                    n(d.io.inflight_requests) / n(d.io.ring_capacity)
                }
            }),
        )?;
        Self::family(
            &mut enc,
            "rbdback_persistent_grants",
            "Guest pages kept mapped (persistent grants).",
            Gauge,
            per_disk(&|d| n(d.io.persistent_grants)),
        )?;
        Self::family(
            &mut enc,
            "rbdback_stalled_requests",
            "Requests past the timeout policy's limit.",
            Gauge,
            per_disk(&|d| n(d.io.stalled)),
        )?;
        let lock: Vec<(Labels, f64)> = self
            .disks()
            .flat_map(|d| {
                LOCK_STATES.map(|s| {
                    (
                        with(disk_labels(d), "state", s),
                        if d.lock.state == s { 1.0 } else { 0.0 },
                    )
                })
            })
            .collect();
        Self::family(
            &mut enc,
            "rbdback_exclusive_lock_state",
            "The image's exclusive lock as this client holds it (1 for the current state).",
            Gauge,
            lock,
        )?;
        Self::family(
            &mut enc,
            "rbdback_exclusive_lock_handovers",
            "Times the exclusive lock was handed over to another client.",
            Counter,
            per_disk(&|d| n(d.lock.handovers)),
        )?;
        Self::family(
            &mut enc,
            "rbdback_disk_connected",
            "1 while the disk is connected to its guest.",
            Gauge,
            per_disk(&|d| if d.negotiated.is_some() { 1.0 } else { 0.0 }),
        )?;
        // the latency histogram, one per disk and operation
        if self.disks().next().is_some() {
            let mut m = enc.encode_descriptor(
                "rbdback_request_latency_seconds",
                "Time from taking a request to answering it, by operation.",
                None,
                MetricType::Histogram,
            )?;
            for d in self.disks() {
                for (c, name) in OP_CLASSES {
                    let Some(h) = d.io.latency.get(c as usize) else {
                        continue;
                    };
                    // per-bucket counts: the encoder makes them cumulative, and writes
                    // f64::MAX as le="+Inf"
                    let mut buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_US
                        .iter()
                        .zip(&h.buckets)
                        .map(|(b, v)| (*b as f64 / 1e6, *v))
                        .collect();
                    buckets.push((
                        f64::MAX,
                        h.buckets.get(LATENCY_BOUNDS_US.len()).copied().unwrap_or(0),
                    ));
                    let labels = with(disk_labels(d), "op", name);
                    m.encode_family(&labels)?.encode_histogram::<Labels>(
                        h.sum_us as f64 / 1e6,
                        h.count(),
                        &buckets,
                        None,
                    )?;
                }
            }
        }
        // processes
        let proc_labels = |role: &str, domid: Option<u16>| -> Labels {
            vec![
                ("role".into(), role.to_owned().into()),
                (
                    "domid".into(),
                    domid.map_or_else(String::new, |d| d.to_string()).into(),
                ),
            ]
        };
        let mut procs = vec![(proc_labels(self.role, None), self.own)];
        for (domid, s) in &self.serves {
            if let Some(s) = s {
                procs.push((proc_labels("serve", Some(*domid)), s.process));
            }
        }
        Self::family(
            &mut enc,
            "rbdback_process_cpu_seconds",
            "CPU time (user and system) of an rbdback process.",
            Counter,
            procs
                .iter()
                .map(|(l, p)| (l.clone(), p.cpu_seconds))
                .collect(),
        )?;
        Self::family(
            &mut enc,
            "rbdback_process_resident_memory_bytes",
            "Resident memory of an rbdback process.",
            Gauge,
            procs
                .iter()
                .map(|(l, p)| (l.clone(), n(p.rss_bytes)))
                .collect(),
        )?;
        Self::family(
            &mut enc,
            "rbdback_process_threads",
            "Threads of an rbdback process.",
            Gauge,
            procs
                .iter()
                .map(|(l, p)| (l.clone(), n(p.threads)))
                .collect(),
        )?;
        Self::family(
            &mut enc,
            "rbdback_serve_up",
            "1 if the guest's serve process answered on its control socket.",
            Gauge,
            self.serves
                .iter()
                .map(|(d, s)| {
                    (
                        vec![("domid".into(), d.to_string().into())],
                        if s.is_some() { 1.0 } else { 0.0 },
                    )
                })
                .collect(),
        )?;
        Self::family(
            &mut enc,
            "rbdback_backend_restarts",
            "serve processes the supervisor started again for a guest that still had RBD disks.",
            Counter,
            self.restarts
                .iter()
                .map(|(d, c)| (vec![("domid".into(), d.to_string().into())], n(*c)))
                .collect(),
        )?;
        Ok(())
    }
}

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `addr` from a thread; each scrape calls `scrape` for the text.
pub fn listen(
    addr: SocketAddr,
    scrape: impl Fn() -> String + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("rbdback-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = answer(s, &scrape) {
                            tracing::debug!(error = %e, "metrics connection");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "metrics accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    info!(%local, "metrics endpoint listening (GET /metrics)");
    Ok(local)
}

/// Answers one HTTP request (then closes the connection).
fn answer(mut s: TcpStream, scrape: &impl Fn() -> String) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, scrape()),
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

/// Reads `http://addr/metrics` (for tests and tools): the body, or the error.
pub fn fetch(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other(format!("bad response: {resp:.200}"))),
    }
}

/// The run directory's default, as a path.
pub fn default_run_dir() -> PathBuf {
    PathBuf::from(control::DEFAULT_RUN_DIR)
}
