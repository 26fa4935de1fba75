//! The `rbdback` command line: every subcommand and option, with the help texts operators read
//! (`--help`, the man pages, the shell completions).
//!
//! Owns only the shape of the command line (clap derive types); it must never do anything
//! itself. `src/main.rs` turns a parsed [`Cli`] into work, and `build.rs` includes this same
//! file to generate the man pages and completions into `OUT_DIR` at build time, so it may use
//! nothing but `clap` and `std`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Userspace Ceph RBD block backend for Xen: serves guests' blkif disks from RADOS.
///
/// One `rbdback serve` process per guest speaks blkif to the guest's blkfront and turns its
/// requests into RADOS I/O; `rbdback supervise` (a dom0 service) keeps one `serve` per guest
/// that has RBD disks; `rbdback csi` is the CSI node plugin for Kubernetes. Logs go to stderr;
/// RUST_LOG sets their level (for example `RUST_LOG=rbdback=debug`).
#[derive(Debug, Parser)]
#[command(
    name = "rbdback",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Log format on stderr: `text` (colour only on a terminal) or `json` (one object per
    /// line, for journald or Loki). Children of the supervisor inherit it.
    #[arg(
        long,
        value_enum,
        default_value_t = LogFormat::Text,
        global = true,
        env = "RBDBACK_LOG_FORMAT"
    )]
    pub log_format: LogFormat,

    /// The directory of the `serve` processes' control sockets (`serve-<domid>.sock`, mode
    /// 0600; the directory is created 0700, made 0711 by sandboxed backends, whose state is in
    /// its `state/guest-<domid>`). Children of the supervisor inherit it.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/run/rbdback",
        global = true,
        env = "RBDBACK_RUN_DIR"
    )]
    pub run_dir: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colour only when stderr is a terminal.
    Text,
    /// One JSON object per line (timestamp, level, target, span fields, message).
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    Serve(ServeArgs),
    #[command(hide = true)]
    ServeBroker(ServeBrokerArgs),
    Supervise(SuperviseArgs),
    Csi(CsiArgs),
    CsiCall(CsiCallArgs),
    Status(StatusArgs),
    Upgrade(UpgradeArgs),
    Demo(DemoArgs),
    RingDemo(RingDemoArgs),
    Soak(SoakArgs),
    EngineBench(EngineBenchArgs),
    Completions(CompletionsArgs),
    Man(ManArgs),
}

/// Which xenstore backend directory and domain this backend serves.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// The backend kind: the directory under `/local/domain/<backend domid>/backend/` to
    /// watch (`vbd` for the disks `xl`/libxl create).
    #[arg(long, value_name = "KIND", default_value = "vbd")]
    pub kind: String,
    /// The domain this backend runs in (0: dom0; a driver domain's id otherwise).
    #[arg(long, value_name = "DOMID", default_value_t = 0)]
    pub backend_domid: u16,
    /// Test builds: run on a simulated Xen hosted by another process, whose sockets are in
    /// DIR (rbdback::xen::sim::remote).
    #[cfg(feature = "test-utils")]
    #[arg(long, value_name = "DIR", hide = true)]
    pub sim_dir: Option<PathBuf>,
}

impl BackendArgs {
    /// The simulated Xen to run on, if any (test builds).
    pub fn sim_dir(&self) -> Option<&std::path::Path> {
        #[cfg(feature = "test-utils")]
        {
            self.sim_dir.as_deref()
        }
        #[cfg(not(feature = "test-utils"))]
        {
            None
        }
    }
}

/// Serve one guest's RBD disks (one process per VM).
///
/// Claims every VBD under backend/<kind>/<domid>/ whose `params` is an RBD target (`rbd:` or
/// `csi:`), runs the xenbus handshake with the guest's blkfront, maps its rings and answers its
/// requests from RADOS: one control thread per VBD and one dataplane thread per ring queue. Disks
/// whose `params` is not an RBD target are never touched. Exits when the guest has no RBD disk
/// left (unless --stay). `rbdback supervise` starts it with exactly `serve --domid N --kind KIND
/// --backend-domid B` and its sandbox options.
///
/// Sandboxed by default: once its grant table, control socket and broker are open it runs as an
/// unprivileged user (--sandbox-uid-base + the guest's domid, or --sandbox-user), with no
/// capabilities, no-new-privileges, a Landlock ruleset (its state directory and the system's
/// libraries only) and a seccomp filter; a privileged broker (`serve-broker`, root) hands it
/// what hot-plugged disks need. See docs/sandbox.md.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The guest's domain id.
    #[arg(long, value_name = "N")]
    pub domid: u16,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Keep running when the guest has no RBD disk left (default: exit).
    #[arg(long)]
    pub stay: bool,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// Who a `serve` runs as, and whether it is sandboxed at all.
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Debugging only: run as root with every capability and system call (the log says so
    /// at start, loudly).
    #[arg(long)]
    pub no_sandbox: bool,
    /// Run every guest's backend as this user, UID[:GID] (numbers; default: a user per
    /// guest, see --sandbox-uid-base).
    #[arg(long, value_name = "UID[:GID]", conflicts_with = "no_sandbox")]
    pub sandbox_user: Option<String>,
    /// A user per guest: guest N's backend runs as uid and gid BASE+N (default 1879048192,
    /// 0x70000000: above systemd's container range; no passwd entries needed).
    #[arg(long, value_name = "BASE", default_value_t = 1_879_048_192)]
    pub sandbox_uid_base: u32,
    /// Deriving the system-call allowlist: a call the filter does not allow is logged and
    /// goes on instead of killing the backend.
    #[arg(long, hide = true, conflicts_with = "no_sandbox")]
    pub sandbox_learn: bool,
}

impl SandboxArgs {
    /// The same options, for a `serve` child.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.no_sandbox {
            v.push("--no-sandbox".to_owned());
        }
        if let Some(u) = &self.sandbox_user {
            v.extend(["--sandbox-user".to_owned(), u.clone()]);
        }
        v.extend([
            "--sandbox-uid-base".to_owned(),
            self.sandbox_uid_base.to_string(),
        ]);
        if self.sandbox_learn {
            v.push("--sandbox-learn".to_owned());
        }
        v
    }
}

/// The privileged half of a sandboxed `serve` (started by it; its standard input is the
/// socket to it). Not for operators.
#[derive(Debug, Args)]
pub struct ServeBrokerArgs {
    /// The guest's domain id.
    #[arg(long, value_name = "N")]
    pub domid: u16,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Let forbidden system calls go on, logging them.
    #[arg(long)]
    pub learn: bool,
}

/// The disks' default timeout policy (a disk's `params` may override both).
#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    /// Fail a request the cluster has not answered after SECS seconds with
    /// BLKIF_RSP_ERROR (0: wait for ever, the default that loses nothing). A disk's
    /// `io_timeout=` overrides it.
    #[arg(long, value_name = "SECS")]
    pub io_timeout: Option<String>,
    /// Report a disk whose oldest request has waited SECS seconds (log line and the
    /// backend's `stalled` node; default 30). A disk's `stall_warn=` overrides it.
    #[arg(long, value_name = "SECS")]
    pub stall_warn: Option<String>,
}

impl QueueArgs {
    /// The same options, for a `serve` child.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(t) = &self.io_timeout {
            v.extend(["--io-timeout".to_owned(), t.clone()]);
        }
        if let Some(w) = &self.stall_warn {
            v.extend(["--stall-warn".to_owned(), w.clone()]);
        }
        v
    }
}

/// The dom0 service: keep one `rbdback serve` per guest.
///
/// Watches /local/domain/<backend domid>/backend/<kind> and keeps one `rbdback serve --domid N`
/// child for every guest that has at least one disk whose `params` is an RBD target (`rbd:` or
/// `csi:`); a child that dies is started again (a death by SIGSYS is logged with the system call
/// the sandbox refused). Start it after xenstored (the Debian package's
/// rbdback-supervise.service does). The sandbox options are passed to every `serve`.
#[derive(Debug, Args)]
pub struct SuperviseArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics (OpenMetrics text at `GET /metrics`) on this address, for
    /// example 127.0.0.1:9527: every disk of every `serve` process on the host, gathered at
    /// each scrape from their control sockets, plus the processes' CPU, memory and threads.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Replace every running backend with the rbdback binary installed now, without the guests
/// seeing an error.
///
/// Asks the supervisor (its control socket in the run directory) to hand each guest's disks
/// over, one guest at a time: the running `serve` stops taking requests, lets those in flight
/// finish (at most 5 s; what does not finish stays in its journal), releases its exclusive
/// locks and exits; a `serve` started from the installed binary resumes the rings from their
/// journals, without a xenbus state change. Then the supervisor re-executes itself from the
/// installed binary, keeping its children. Prints how long each guest's disks waited.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Only this guest's backend (the supervisor itself is then not re-executed).
    #[arg(long, value_name = "N")]
    pub domid: Option<u16>,
    /// Print the supervisor's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What every disk served on this host is doing, asked from the running `serve` processes.
///
/// Connects to every control socket in the run directory (--run-dir) and prints, per disk:
/// guest, device, image, engine, the backend's xenbus state, the features negotiated with the
/// guest (ring page order, queues, indirect segments, persistent grants), requests in flight,
/// errors, the exclusive lock as this host holds it, and the last error. Exit status 1 if a
/// `serve` process did not answer.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this guest's disks.
    #[arg(long, value_name = "N")]
    pub domid: Option<u16>,
    /// Print JSON (an array of disks) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The CSI node plugin for ceph-csi's volumes on Xen hosts.
///
/// Serves CSI v1's Identity and Node services over gRPC on a unix socket (which kubelet's
/// node-driver-registrar announces). Provisioning stays with ceph-csi's controller. Unless
/// --no-supervise it also runs the same supervisor as `rbdback supervise`. Stops on SIGTERM.
/// See docs/csi.md.
#[derive(Debug, Args)]
pub struct CsiArgs {
    /// This node's name, as Kubernetes knows it (NodeGetInfo answers it).
    #[arg(long, value_name = "ID")]
    pub node_id: String,
    /// The gRPC endpoint: a unix socket, `unix:///path`.
    #[arg(
        long,
        value_name = "URL",
        default_value = "unix:///var/lib/kubelet/plugins/rbd.csi.ceph.com/csi.sock"
    )]
    pub endpoint: String,
    /// The CSI driver name (ceph-csi's RBD driver's, so a StorageClass of ceph-csi serves
    /// both).
    #[arg(long, value_name = "NAME", default_value = "rbd.csi.ceph.com")]
    pub driver_name: String,
    /// Where staged volumes' keyrings live (mode 0700).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/rbdback/csi")]
    pub state_dir: PathBuf,
    /// The Ceph configuration every volume uses (default: librados' search, unless
    /// --clusters names the monitors).
    #[arg(long, value_name = "FILE")]
    pub ceph_conf: Option<String>,
    /// ceph-csi's cluster map (the `config.json` of its `ceph-csi-config` ConfigMap): each
    /// volume's monitors by its `clusterID`; read at every stage.
    #[arg(long, value_name = "FILE")]
    pub clusters: Option<PathBuf>,
    /// Don't run the supervisor (another `rbdback supervise` serves the guests).
    #[arg(long)]
    pub no_supervise: bool,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

/// Make one CSI Node call to a plugin, as kubelet makes it (debugging, the real-Xen test bed).
///
/// OP is stage, publish (prints the published xl-disk line), unpublish, unstage, stats or
/// expand. Errors exit 1 naming the RPC, the gRPC code and its message. See docs/csi.md.
#[derive(Debug, Args)]
pub struct CsiCallArgs {
    /// stage, publish, unpublish, unstage, stats or expand.
    #[arg(value_name = "OP")]
    pub op: String,
    /// The volume handle ceph-csi's controller gave the volume.
    #[arg(long, value_name = "ID")]
    pub volume_id: String,
    /// The plugin's endpoint, `unix:///path`.
    #[arg(
        long,
        value_name = "URL",
        default_value = "unix:///var/lib/kubelet/plugins/rbd.csi.ceph.com/csi.sock"
    )]
    pub endpoint: String,
    /// A volume context entry (ceph-csi's clusterID, pool, imageName, ...); repeatable.
    #[arg(long, value_name = "KEY=VALUE")]
    pub context: Vec<String>,
    /// A secret (userID, userKey); repeatable. Prefer --secret-file: argv is world-readable.
    #[arg(long, value_name = "KEY=VALUE")]
    pub secret: Vec<String>,
    /// A secret read from a file; repeatable.
    #[arg(long, value_name = "KEY=FILE")]
    pub secret_file: Vec<String>,
    /// The staging path (stage, unstage, stats, expand).
    #[arg(long, value_name = "DIR", default_value = "")]
    pub staging_path: String,
    /// The target path (publish, unpublish, stats, expand).
    #[arg(long, value_name = "DIR", default_value = "")]
    pub target_path: String,
    /// Publish read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Expand: the size the volume must have at least (bytes).
    #[arg(long, value_name = "BYTES")]
    pub required_bytes: Option<String>,
}

/// A guest's I/O through the whole stack.
///
/// A simulated blkfront (simulated Xen: memfd grants, eventfd event channels, a real xenstore
/// protocol server) drives one VBD served by `rbdback serve` (a sandboxed child process, unless
/// --in-process) over the local Ceph cluster
/// (started on first use) or --ceph-conf's; every read is verified and the image is compared with
/// `rbd export` at the end. With --bench-image it runs on an existing image without verification
/// (benchmark mode; it writes). Needs a build with the `test-utils` feature.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// An existing cluster's ceph.conf (default: start the project's local cluster).
    #[arg(long, value_name = "FILE")]
    pub ceph_conf: Option<PathBuf>,
    /// Requests to run (default 20000).
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,
    /// Requests in flight per queue (default 32).
    #[arg(long, value_name = "N")]
    pub qd: Option<usize>,
    /// Ring queues the guest asks for (default 2).
    #[arg(long, value_name = "N")]
    pub queues: Option<u32>,
    /// Percent of requests that write (default 50).
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u32).range(0..=100))]
    pub writes: Option<u32>,
    /// MiB at the start of the disk the workload spans (default 64).
    #[arg(long, value_name = "N")]
    pub span_mib: Option<u64>,
    /// Benchmark mode: use this existing image (POOL/NAME) as it is; no verification.
    #[arg(long, value_name = "NAME")]
    pub bench_image: Option<String>,
    /// Benchmark mode: request size in KiB, 4 to 1024; over 44 goes indirect (default 4).
    #[arg(long, value_name = "KIB", requires = "bench_image")]
    pub bs_kib: Option<usize>,
    /// Benchmark mode: sequential instead of random offsets.
    #[arg(long, requires = "bench_image")]
    pub seq: bool,
    /// Run the backend on a thread of the demo (not sandboxed; the simulated event channels
    /// are then calls, not messages to another process: what tools/bench-e2e measures).
    #[arg(long)]
    pub in_process: bool,
    /// Run the `serve` child without its sandbox (what the sandbox costs, by comparison).
    #[arg(long, conflicts_with = "in_process")]
    pub no_sandbox: bool,
    /// Benchmarks only, with --in-process: keep no crash-recovery journal (serve always keeps
    /// one), to measure its cost (tools/bench-e2e's BENCH_BASE_FLAGS=--no-journal).
    #[arg(long, requires = "in_process")]
    pub no_journal: bool,
}

/// The ring layer alone.
///
/// A mock blkfront fills a blkif ring with a mixed workload (reads, writes, indirect requests,
/// flushes, discards and some invalid requests); the back ring takes, validates and answers them
/// against a 64 MiB in-memory disk; the frontend checks every status and every byte read, and the
/// throughput is printed. Needs a build with the `test-utils` feature.
#[derive(Debug, Args)]
pub struct RingDemoArgs {
    /// The guest's ABI (blkif's `protocol` node).
    #[arg(long, value_name = "ABI", default_value = "x86_64-abi",
          value_parser = ["x86_64-abi", "x86_32-abi"])]
    pub abi: String,
    /// Ring page order (the ring spans 2^ORDER pages).
    #[arg(long, value_name = "ORDER", default_value_t = 2,
          value_parser = clap::value_parser!(u8).range(0..=4))]
    pub order: u8,
    /// Requests to run.
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub requests: u64,
}

/// Ceph faults in rotation under a verified workload (what tools/soak runs).
///
/// Starts a private local Ceph cluster (target/ceph-soak, or $RBDBACK_SOAK_DIR), serves one
/// disk through the whole stack (simulated Xen, the real backend) with a verified workload, and
/// every --fault-every seconds injects the next fault: an OSD killed and restarted, an OSD
/// frozen for 20 s, the monitor restarted, the exclusive lock taken by another client. Prints
/// RSS, threads, open descriptors, errors and mismatches every 30 s; compares `rbd export` with
/// the guest's model at the end. Needs a build with the `test-utils` feature.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// How long the workload runs.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub minutes: u64,
    /// Seconds between the starts of two faults.
    #[arg(long, value_name = "SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub fault_every: u64,
}

/// The storage engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// Direct RADOS (krbd-like).
    Direct,
    /// librbd.
    Librbd,
}

/// I/O patterns of `engine-bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

/// One storage-engine queue at a fixed depth on an existing image, without the ring.
///
/// For benchmark images only: it writes. tools/bench-engines runs it beside fio.
#[derive(Debug, Args)]
pub struct EngineBenchArgs {
    /// The image, POOL/NAME.
    #[arg(long, value_name = "POOL/NAME")]
    pub image: String,
    /// The cluster's ceph.conf (default: librados' search).
    #[arg(long, value_name = "FILE")]
    pub ceph_conf: Option<String>,
    /// The storage engine.
    #[arg(long, value_enum, default_value_t = Engine::Direct)]
    pub engine: Engine,
    /// The I/O pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,
    /// Request size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    pub bs: usize,
    /// Requests in flight.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub qd: usize,
    /// Run time in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub seconds: f64,
    /// MiB at the start of the image the workload spans.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub span_mib: u64,
}

/// Shells for `rbdback completions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    /// bash (install as /usr/share/bash-completion/completions/rbdback).
    Bash,
    /// zsh (install as /usr/share/zsh/vendor-completions/_rbdback).
    Zsh,
    /// fish (install as /usr/share/fish/vendor_completions.d/rbdback.fish).
    Fish,
}

/// Print a shell completion script (generated at build time) to stdout.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Print a man page (generated at build time) to stdout, or write them all to a directory.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The page: `rbdback` or a subcommand's (`serve`, `supervise`, ...).
    #[arg(
        value_name = "PAGE",
        default_value = "rbdback",
        conflicts_with = "out_dir"
    )]
    pub page: String,
    /// Write every page (rbdback.8, rbdback-serve.8, ...) into this directory instead.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// The shells completions are generated for, with their file names.
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "rbdback.bash"),
    (Shell::Zsh, "_rbdback"),
    (Shell::Fish, "rbdback.fish"),
];
