//! The `rbdback` command: parses the command line (`src/cli.rs`, clap), sets up logging and
//! runs one subcommand.
//!
//! - `rbdback serve --domid N [--kind vbd] [--backend-domid 0]`: serve one guest's RBD disks
//!   (one process per VM).
//! - `rbdback supervise [--kind vbd]`: dom0 service; keeps one `serve` process per guest that
//!   has RBD disks under `backend/<kind>`.
//! - `rbdback demo`: a guest's I/O through the whole stack (local Ceph, simulated Xen).
//! - `rbdback ring-demo`: the ring layer alone: a mock blkfront fills a blkif ring with a mixed
//!   workload (reads, writes, indirect requests, flushes, discards and some invalid requests);
//!   the back ring takes, validates and answers them against an in-memory disk; the frontend
//!   checks every status and every byte read, and the throughput is printed.
//! - `rbdback csi --node-id ID`: the CSI node plugin (gRPC on a unix socket) for volumes that
//!   ceph-csi's controller provisions; also runs the supervisor unless `--no-supervise`.
//! - `rbdback engine-bench`: one storage-engine queue at a fixed depth on an existing image
//!   (benchmark images only: it writes), without the ring; `tools/bench-engines` runs it
//!   beside fio.
//! - `rbdback completions SHELL`, `rbdback man [PAGE]`: what build.rs generated from the
//!   command line's definitions.
//!
//! Every option's description lives in `src/cli.rs` (`--help`). A malformed command line is
//! refused with clap's message and exit code 2.

use std::os::unix::fs::DirBuilderExt;
use std::process::ExitCode;
use std::sync::Arc;

use rbdback::chain;
use rbdback::control;
use rbdback::device::backend::{serve_observed, ServeConfig, ServeEnd};
use rbdback::device::dataplane::QueueConfig;
use rbdback::device::metrics::{DiskSample, Registry as Disks, Restarts};
use rbdback::device::params::parse_seconds;
use rbdback::device::supervisor::{self, SuperviseConfig, HANDOVER_EXIT};
use rbdback::device::vbd::{Options, RadosOpener};
use rbdback::exporter::Scrape;
use rbdback::xen::real::RealPlatform;
use rbdback::xen::Platform;

// The process allocates through tcmalloc, the allocator Ceph builds its own daemons with:
// linked ahead of libc, it serves librados' C++ allocations as well as ours. With glibc's
// malloc the client spent ~20 % more CPU per I/O (arena locks between the submitting thread
// and librados' messenger, which frees what the other allocated; docs/performance.md).
#[link(
    name = "libtcmalloc_minimal.so.4",
    kind = "dylib",
    modifiers = "+verbatim"
)]
extern "C" {}

mod cli;

use std::io::IsTerminal;
use std::path::Path;

use clap::Parser;
use cli::{Cli, Command, LogFormat};

/// The man pages and completions build.rs generated from `src/cli.rs`.
mod assets {
    include!(concat!(env!("OUT_DIR"), "/cli_assets.rs"));
}

fn main() -> ExitCode {
    // Malformed command lines exit with clap's message and code 2 (--help/--version with 0).
    let cli = Cli::parse();
    init_logs(cli.log_format);
    // the supervisor's serve children find their run directory here
    std::env::set_var("RBDBACK_RUN_DIR", &cli.run_dir);
    let run_dir = cli.run_dir;
    let code = match cli.command {
        Command::Serve(a) => run_serve(&a, &run_dir),
        Command::ServeBroker(a) => run_serve_broker(&a, &run_dir),
        Command::Supervise(a) => {
            let restarts = Arc::new(Restarts::default());
            match start_metrics(&a.metrics, "supervise", &run_dir, &restarts) {
                Ok(()) => match queue_defaults(&a.queue) {
                    Ok(_) => {
                        let mut child_args = a.queue.to_args();
                        child_args.extend(a.sandbox.to_args());
                        run_supervise(&a.backend, &child_args, &restarts, &run_dir)
                    }
                    Err(e) => fail(&e),
                },
                Err(code) => code,
            }
        }
        Command::Csi(a) => run_csi(a, &run_dir),
        Command::CsiCall(a) => run_csi_call(&a),
        Command::Status(a) => run_status(&a, &run_dir),
        Command::Upgrade(a) => run_upgrade(&a, &run_dir),
        Command::Demo(a) => run_full_demo(a),
        Command::RingDemo(a) => run_demo(&a),
        Command::Soak(a) => run_soak(&a),
        Command::EngineBench(a) => run_engine_bench(a),
        Command::Completions(a) => print_asset(
            assets::COMPLETIONS,
            cli::SHELLS
                .iter()
                .find(|(s, _)| *s == a.shell)
                .map_or("", |(_, f)| f),
        ),
        Command::Man(a) => match a.out_dir {
            Some(dir) => write_man_pages(&dir),
            None if a.page == "rbdback" => print_asset(assets::MAN_PAGES, "rbdback.8"),
            None => print_asset(assets::MAN_PAGES, &format!("rbdback-{}.8", a.page)),
        },
    };
    // Never run exit handlers under librados threads that may still be at work (see
    // exit_process): every command has torn down what it owns by now.
    rbdback::rados::exit_process(if code == ExitCode::SUCCESS {
        0
    } else if code == ExitCode::from(2) {
        2
    } else if code == ExitCode::from(HANDOVER_EXIT) {
        HANDOVER_EXIT
    } else {
        1
    })
}

/// Logs on stderr: RUST_LOG's filter (default `info`), colour only on a terminal, or JSON.
/// The format is put in the environment so the supervisor's `serve` children log alike.
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            std::env::set_var("RBDBACK_LOG_FORMAT", "text");
            builder.with_ansi(std::io::stderr().is_terminal()).init();
        }
        LogFormat::Json => {
            std::env::set_var("RBDBACK_LOG_FORMAT", "json");
            builder.json().with_current_span(true).init();
        }
    }
}

/// Prints the generated file `name` of `set`.
fn print_asset(set: &[(&str, &str)], name: &str) -> ExitCode {
    match set.iter().find(|(f, _)| *f == name) {
        Some((_, text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        None => {
            let names: Vec<&str> = set.iter().map(|(f, _)| *f).collect();
            eprintln!("rbdback: no page {name} (there are: {})", names.join(", "));
            ExitCode::from(2)
        }
    }
}

/// Writes every man page into `dir`.
fn write_man_pages(dir: &Path) -> ExitCode {
    if let Err(e) = std::fs::create_dir_all(dir) {
        return fail(&format!("cannot create {}: {e}", dir.display()));
    }
    for (name, text) in assets::MAN_PAGES {
        let path = dir.join(name);
        if let Err(e) = std::fs::write(&path, text) {
            return fail(&format!("cannot write {}: {e}", path.display()));
        }
    }
    ExitCode::SUCCESS
}

/// `--io-timeout` and `--stall-warn`: the disks' defaults (their `params` may override them).
fn queue_defaults(a: &cli::QueueArgs) -> Result<QueueConfig, String> {
    let mut q = QueueConfig::default();
    let secs = |name: &str, key: &str, v: &Option<String>| {
        v.as_deref()
            .map(|v| parse_seconds(key, v).map_err(|e| format!("{name}: {e}")))
            .transpose()
    };
    if let Some(t) = secs("--io-timeout", "io_timeout", &a.io_timeout)? {
        q.io_timeout = (!t.is_zero()).then_some(t);
    }
    if let Some(w) = secs("--stall-warn", "stall_warn", &a.stall_warn)? {
        if w.is_zero() {
            return Err("--stall-warn must be more than 0 seconds".into());
        }
        q.stall_warn = w;
    }
    Ok(q)
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("rbdback: {msg}");
    ExitCode::FAILURE
}

/// Starts the Prometheus endpoint if `--metrics-listen` asks for one.
fn start_metrics(
    m: &cli::MetricsArgs,
    role: &'static str,
    run_dir: &Path,
    restarts: &Arc<Restarts>,
) -> Result<(), ExitCode> {
    let Some(addr) = m.metrics_listen else {
        return Ok(());
    };
    let (dir, restarts) = (run_dir.to_owned(), Arc::clone(restarts));
    let scrape = move || match Scrape::gather(role, &dir, restarts.counts()) {
        Ok(s) => s.render(),
        Err(e) => {
            tracing::warn!(error = %chain(&e), "metrics scrape");
            Scrape {
                role,
                own: rbdback::exporter::ProcessSample::current(),
                restarts: restarts.counts(),
                serves: Vec::new(),
            }
            .render()
        }
    };
    match rbdback::exporter::listen(addr, scrape) {
        Ok(_) => Ok(()),
        Err(e) => Err(fail(&format!("--metrics-listen {addr}: {e}"))),
    }
}

/// `rbdback status`: every disk of every `serve` process in the run directory.
fn run_status(a: &cli::StatusArgs, run_dir: &Path) -> ExitCode {
    let sockets = match control::serve_sockets(run_dir) {
        Ok(s) => s,
        Err(e) => return fail(&chain(&e)),
    };
    let mut disks = Vec::new();
    let mut code = ExitCode::SUCCESS;
    for (domid, path) in sockets {
        if a.domid.is_some_and(|d| d != domid) {
            continue;
        }
        let got = control::call(&path, "status", serde_json::Value::Null).and_then(|v| {
            serde_json::from_value::<Vec<DiskSample>>(v).map_err(|e| {
                control::ControlError::Protocol {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })
        });
        match got {
            Ok(d) => disks.extend(d),
            Err(e) => {
                eprintln!("rbdback: guest {domid}: {}", chain(&e));
                code = ExitCode::FAILURE;
            }
        }
    }
    if a.json {
        match serde_json::to_string_pretty(&disks) {
            Ok(j) => println!("{j}"),
            Err(e) => return fail(&e.to_string()),
        }
    } else {
        print!("{}", status_table(&disks));
    }
    code
}

/// The disks as a table, one line each.
fn status_table(disks: &[DiskSample]) -> String {
    let mut rows = vec![[
        "DOMID",
        "DEVID",
        "IMAGE",
        "ENGINE",
        "STATE",
        "RING",
        "QUEUES",
        "INDIRECT",
        "PERSISTENT",
        "INFLIGHT",
        "ERRORS",
        "LOCK",
        "LAST ERROR",
    ]
    .map(str::to_owned)];
    for d in disks {
        let n = d.negotiated;
        let dash = || "-".to_owned();
        rows.push([
            d.domid.to_string(),
            d.devid.to_string(),
            d.image.clone(),
            d.engine.clone(),
            d.state.clone(),
            n.map_or_else(dash, |n| {
                format!("order {} ({} slots)", n.ring_order, d.io.ring_capacity)
            }),
            n.map_or_else(dash, |n| n.queues.to_string()),
            n.map_or_else(dash, |n| n.indirect_segments.to_string()),
            n.map_or_else(dash, |n| if n.persistent { "yes" } else { "no" }.to_owned()),
            format!("{} ({} B)", d.io.inflight_requests, d.io.inflight_bytes),
            (d.io.status_error + d.io.status_unsupported).to_string(),
            format!("{} ({} hand-overs)", d.lock.state, d.lock.handovers),
            d.last_error.clone().unwrap_or_else(dash),
        ]);
    }
    let widths: Vec<usize> = (0..13)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn run_upgrade(a: &cli::UpgradeArgs, run_dir: &Path) -> ExitCode {
    let sock = run_dir.join(supervisor::SOCKET);
    let args = match a.domid {
        Some(d) => serde_json::json!({ "domid": d }),
        None => serde_json::Value::Null,
    };
    let report =
        match control::call_within(&sock, "upgrade", args, std::time::Duration::from_secs(600)) {
            Ok(r) => r,
            Err(e) => return fail(&format!("upgrade: {}", chain(&e))),
        };
    if a.json {
        println!("{report}");
    }
    let guests = report
        .get("guests")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut ok = true;
    for g in &guests {
        let fine = g.get("ok").and_then(serde_json::Value::as_bool) == Some(true);
        ok &= fine;
        if !a.json {
            println!(
                "domain {}: {} ({:.2} s){}",
                g.get("domid").unwrap_or(&serde_json::Value::Null),
                if fine { "handed over" } else { "FAILED" },
                g.get("seconds")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0),
                g.get("error")
                    .and_then(serde_json::Value::as_str)
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
    }
    if !a.json && guests.is_empty() {
        println!("no guest backend is running");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_serve(a: &cli::ServeArgs, run_dir: &Path) -> ExitCode {
    // SIGTERM and SIGINT are waited for by a thread of their own (blocked here, before any
    // other thread exists): they hand the rings over like `handover` on the control socket.
    let signals = {
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGTERM);
        set.add(nix::sys::signal::Signal::SIGINT);
        set
    };
    if let Err(e) = signals.thread_block() {
        tracing::warn!(error = %e, "cannot block SIGTERM: it will end the process without a handover");
    }
    // one serve per guest: a predecessor still handing over (or being killed) goes first
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
    {
        return fail(&format!("cannot create {}: {e}", run_dir.display()));
    }
    if let Err(e) = supervisor::lock_instance(run_dir, a.domid) {
        return fail(&format!(
            "cannot take {}: {e}",
            supervisor::instance_lock_path(run_dir, a.domid).display()
        ));
    }
    // the guest's own state directory: its rings' journals, its disks' Ceph files (tmpfs: /run)
    let state_dir = sandbox_state_dir(run_dir, a.domid);
    let cfg = ServeConfig {
        kind: a.backend.kind.clone(),
        backend_domid: a.backend.backend_domid,
        domid: a.domid,
        exit_when_empty: !a.stay,
        options: Options {
            state_dir: Some(state_dir),
            queue: match queue_defaults(&a.queue) {
                Ok(q) => q,
                Err(e) => return fail(&e),
            },
            ..Options::default()
        },
    };
    #[cfg(feature = "test-utils")]
    rbdback::device::crashpoint::arm_from(&run_dir.join("crash-next"));
    // bound now, served once the process is confined (root owns the run directory)
    let control = control::Server::bind(run_dir, &format!("serve-{}.sock", a.domid))
        .map_err(|e| tracing::warn!(error = %chain(&e), "no control socket: `rbdback status` and metrics will not see this guest"))
        .ok();
    let run = ServeRun {
        a,
        run_dir,
        cfg,
        control,
        signals,
    };
    let res = match a.backend.sim_dir() {
        #[cfg(feature = "test-utils")]
        Some(dir) => run.on(rbdback::xen::sim::remote::RemotePlatform::new(dir)),
        _ => run.on(RealPlatform::new()),
    };
    match res {
        Ok(ServeEnd::Empty) => ExitCode::SUCCESS,
        Ok(ServeEnd::HandedOver) => ExitCode::from(HANDOVER_EXIT),
        Err(e) => fail(&e),
    }
}

/// Guest `domid`'s state directory in `run_dir`: `state/guest-<domid>`.
fn sandbox_state_dir(run_dir: &Path, domid: u16) -> std::path::PathBuf {
    run_dir.join("state").join(format!("guest-{domid}"))
}

/// Makes guest `domid`'s state directory, owned by `user` (0700) and reachable by it (the run
/// directory and `state` get search permission for others, 0700 becoming 0711: it can pass
/// through, not list); moves in the VBD directories a
/// previous version kept directly under `state` (`<kind>-<domid>-<devid>`), so their journals
/// resume.
fn prepare_state_dir(
    run_dir: &Path,
    kind: &str,
    domid: u16,
    user: Option<rbdback::sandbox::User>,
) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = sandbox_state_dir(run_dir, domid);
    let state = run_dir.join("state");
    let err = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| err("cannot create", &dir, e))?;
    if user.is_some() {
        // search permission for others, nothing more (a shared directory keeps its mode)
        for d in [run_dir, state.as_path()] {
            let mode = std::fs::metadata(d)
                .map_err(|e| err("cannot stat", d, e))?
                .permissions()
                .mode();
            if mode & 0o011 != 0o011 {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011))
                    .map_err(|e| err("cannot set the mode of", d, e))?;
            }
        }
    }
    let old = format!("{kind}-{domid}-");
    if let Ok(entries) = std::fs::read_dir(&state) {
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_str().is_some_and(|n| n.starts_with(&old)) {
                let to = dir.join(&name);
                if let Err(e) = std::fs::rename(e.path(), &to) {
                    tracing::warn!(error = %e, to = %to.display(), "cannot move a VBD's state into the guest's directory");
                }
            }
        }
    }
    if let Some(u) = user {
        chown_tree(&dir, u).map_err(|e| err("cannot give to the sandbox user", &dir, e))?;
    }
    Ok(dir)
}

/// `chown -R` without following symbolic links.
fn chown_tree(p: &Path, u: rbdback::sandbox::User) -> std::io::Result<()> {
    std::os::unix::fs::lchown(p, Some(u.uid), Some(u.gid))?;
    if std::fs::symlink_metadata(p)?.is_dir() {
        for e in std::fs::read_dir(p)? {
            chown_tree(&e?.path(), u)?;
        }
    }
    Ok(())
}

/// What a `serve` run holds until it has a platform.
struct ServeRun<'a> {
    a: &'a cli::ServeArgs,
    run_dir: &'a Path,
    cfg: ServeConfig,
    control: Option<control::Bound>,
    signals: nix::sys::signal::SigSet,
}

impl ServeRun<'_> {
    /// Confines the process (unless --no-sandbox), then serves on `platform`.
    fn on<P: Platform>(self, platform: P) -> Result<ServeEnd, String>
    where
        P::Gnttab: std::fmt::Debug,
    {
        use rbdback::sandbox::{self, broker, User};
        let s = &self.a.sandbox;
        if s.no_sandbox {
            tracing::warn!(
                "!!! SANDBOX OFF (--no-sandbox): this backend runs as root with every capability                  and every system call; a guest that finds a bug in it owns dom0. Debugging only. !!!"
            );
            prepare_state_dir(self.run_dir, &self.cfg.kind, self.cfg.domid, None)?;
            return self.serve(Arc::new(platform), Arc::new(RadosOpener));
        }
        let user = match &s.sandbox_user {
            Some(u) => User::parse(u).map_err(|e| format!("--sandbox-user: {e}"))?,
            None => User::per_guest(s.sandbox_uid_base, self.cfg.domid).ok_or_else(|| {
                format!(
                    "--sandbox-uid-base {} + domid {} is not a uid",
                    s.sandbox_uid_base, self.cfg.domid
                )
            })?,
        };
        let state = prepare_state_dir(self.run_dir, &self.cfg.kind, self.cfg.domid, Some(user))?;
        let mut cmd = std::process::Command::new("/proc/self/exe");
        std::os::unix::process::CommandExt::arg0(&mut cmd, "rbdback");
        cmd.arg("serve-broker")
            .arg("--domid")
            .arg(self.cfg.domid.to_string())
            .arg("--kind")
            .arg(&self.cfg.kind)
            .arg("--backend-domid")
            .arg(self.cfg.backend_domid.to_string());
        if let Some(d) = self.a.backend.sim_dir() {
            cmd.arg("--sim-dir").arg(d);
        }
        if s.sandbox_learn {
            cmd.arg("--learn");
        }
        let broker = Arc::new(broker::Broker::spawn(cmd).map_err(|e| chain(&e))?);
        let gnttab = platform
            .gnttab()
            .map_err(|e| format!("before the sandbox: {}", chain(&e)))?;
        let entered = sandbox::enter(&sandbox::Confinement {
            user,
            state_dir: state.clone(),
        })
        .map_err(|e| format!("cannot enter the sandbox: {}", chain(&e)))?;
        broker
            .hand_listener(entered.listener)
            .map_err(|e| format!("the sandbox's broker: {e}"))?;
        tracing::info!(
            uid = user.uid,
            gid = user.gid,
            landlock = %entered.landlock,
            "sandboxed: no capabilities, no new privileges, seccomp filter on"
        );
        if s.sandbox_learn {
            tracing::warn!("sandbox LEARNING mode: forbidden system calls are logged and allowed");
        }
        let opener = broker::ConfinedOpener::new(RadosOpener, Arc::clone(&broker), &state);
        let platform = broker::Brokered::new(platform, gnttab, broker);
        self.serve(Arc::new(platform), Arc::new(opener))
    }

    /// Starts the control socket and the signal thread, and serves.
    fn serve<P: Platform>(
        self,
        platform: Arc<P>,
        opener: Arc<dyn rbdback::device::vbd::ImageOpener>,
    ) -> Result<ServeEnd, String> {
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let disks = Arc::new(Disks::default());
        let mut commands = control::Commands::default();
        rbdback::exporter::register_commands(&mut commands, &disks);
        // `handover`: leave the rings (journals kept, exclusive locks released) to the next
        // instance and exit with status 75; the supervisor starts that one at once.
        let tx = std::sync::Mutex::new(stop_tx.clone());
        commands.add("handover", move |_| {
            let _ = tx.lock().map(|t| t.send(()));
            Ok(serde_json::json!({"pid": std::process::id()}))
        });
        #[cfg(feature = "test-utils")]
        commands.add("test-forbidden-syscall", test_forbidden_syscall);
        let signals = self.signals;
        let sig_tx = stop_tx;
        let _ = std::thread::Builder::new()
            .name("rbdback-signals".into())
            .spawn(move || {
                if let Ok(sig) = signals.wait() {
                    tracing::info!(signal = %sig, "stopping: handing the rings over");
                    let _ = sig_tx.send(());
                }
            });
        // the disks are served without it: status and metrics are for operators
        let _control = self.control.and_then(|b| {
            b.serve(commands)
                .map_err(|e| tracing::warn!(error = %chain(&e), "no control socket: `rbdback status` and metrics will not see this guest"))
                .ok()
        });
        serve_observed(platform, opener, &self.cfg, &stop_rx, &disks).map_err(|e| chain(&e))
    }
}

/// Test builds: makes a system call the sandbox forbids (`syslog`, reading the size of the
/// kernel's log: a view of the host), on a thread of its own that blocks every signal, as
/// librados' threads do; `{"thread": false}` makes it on the control thread.
#[cfg(feature = "test-utils")]
fn test_forbidden_syscall(args: &serde_json::Value) -> Result<serde_json::Value, String> {
    let call = || {
        // SAFETY: SYSLOG_ACTION_SIZE_BUFFER (10) takes no buffer; the kernel only returns
        // the log's size (or an error).
        unsafe {
            libc::syscall(
                libc::SYS_syslog,
                10,
                std::ptr::null_mut::<libc::c_char>(),
                0,
            )
        }
    };
    let rc = if args.get("thread").and_then(serde_json::Value::as_bool) == Some(false) {
        call()
    } else {
        std::thread::Builder::new()
            .name("forbidden".into())
            .spawn(move || {
                let _ = nix::sys::signal::SigSet::all().thread_block();
                call()
            })
            .map_err(|e| e.to_string())?
            .join()
            .map_err(|_| "the thread panicked".to_owned())?
    };
    Ok(serde_json::json!({ "rc": rc }))
}

/// `rbdback serve-broker`: the privileged half of a sandboxed `serve`, on its standard input.
fn run_serve_broker(a: &cli::ServeBrokerArgs, run_dir: &Path) -> ExitCode {
    use rbdback::sandbox::broker::{self, BrokerConfig};
    use std::os::fd::AsFd;
    // it ends when its backend does, not when a terminal's Ctrl-C reaches the process group
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
    let sock = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => std::os::unix::net::UnixStream::from(fd),
        Err(e) => return fail(&format!("serve-broker: no socket on standard input: {e}")),
    };
    let cfg = BrokerConfig {
        domid: a.domid,
        backend_domid: a.backend.backend_domid,
        kind: a.backend.kind.clone(),
        run_dir: run_dir.to_owned(),
        learn: a.learn,
    };
    let res = match a.backend.sim_dir() {
        #[cfg(feature = "test-utils")]
        Some(dir) => broker::run(
            &rbdback::xen::sim::remote::RemotePlatform::new(dir),
            &cfg,
            &sock,
        ),
        _ => broker::run(&RealPlatform::new(), &cfg, &sock),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("serve-broker: {}", chain(&e))),
    }
}

#[cfg(feature = "csi")]
fn run_csi(a: cli::CsiArgs, run_dir: &Path) -> ExitCode {
    let Some(socket) = a.endpoint.strip_prefix("unix://") else {
        return fail(&format!(
            "--endpoint must be unix:///path (got {})",
            a.endpoint
        ));
    };
    let socket = socket.to_owned();
    let cfg = rbdback::csi::Config {
        driver_name: a.driver_name,
        node_id: a.node_id,
        state_dir: a.state_dir,
        ceph_conf: a.ceph_conf,
        clusters: a.clusters,
        open_timeout: std::time::Duration::from_secs(30),
        stats_wait: std::time::Duration::from_secs(10),
        stats_deadline: std::time::Duration::from_secs(60),
    };
    let restarts = Arc::new(Restarts::default());
    if let Err(code) = start_metrics(&a.metrics, "csi", run_dir, &restarts) {
        return code;
    }
    if !a.no_supervise {
        // the guests' backends: the same loop as `rbdback supervise`
        let backend = cli::BackendArgs {
            kind: "vbd".into(),
            backend_domid: 0,
            #[cfg(feature = "test-utils")]
            sim_dir: None,
        };
        let rd = run_dir.to_owned();
        if let Err(e) = std::thread::Builder::new()
            .name("supervise".into())
            .spawn(move || {
                let code = run_supervise(&backend, &[], &restarts, &rd);
                if code != ExitCode::SUCCESS {
                    tracing::error!("the supervisor stopped; the CSI plugin exits too");
                    rbdback::rados::exit_process(1);
                }
            })
        {
            return fail(&format!("cannot start the supervisor: {e}"));
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the gRPC runtime: {e}")),
    };
    // kubelet's container runtime stops the plugin with SIGTERM; a terminal with SIGINT
    let shutdown = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("CSI plugin stopping");
    };
    match rt.block_on(rbdback::csi::serve(cfg, Path::new(&socket), shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("CSI plugin on {socket}: {e}")),
    }
}

/// `&[String]` as `Vec<&str>`.
#[cfg(feature = "csi")]
fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[cfg(feature = "csi")]
fn run_csi_call(a: &cli::CsiCallArgs) -> ExitCode {
    use rbdback::csi::client::{number, pairs, run, socket_of, Call, ClientError, Op};
    let made = (|| -> Result<String, ClientError> {
        let op: Op = a.op.parse()?;
        let mut secrets = pairs("--secret", &refs(&a.secret), false)?;
        secrets.extend(pairs("--secret-file", &refs(&a.secret_file), true)?);
        let c = Call {
            socket: socket_of(&a.endpoint)?,
            volume_id: a.volume_id.clone(),
            context: pairs("--context", &refs(&a.context), false)?,
            secrets,
            staging_path: a.staging_path.clone(),
            target_path: a.target_path.clone(),
            read_only: a.read_only,
            required_bytes: number("--required-bytes", a.required_bytes.as_deref())?,
        };
        run(op, &c)
    })();
    match made {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("csi-call: {}", chain(&e))),
    }
}

#[cfg(not(feature = "csi"))]
fn run_csi_call(_a: &cli::CsiCallArgs) -> ExitCode {
    fail("this rbdback was built without the csi feature")
}

#[cfg(not(feature = "csi"))]
fn run_csi(_a: cli::CsiArgs, _run_dir: &Path) -> ExitCode {
    fail("this rbdback was built without the csi feature")
}

fn run_supervise(
    a: &cli::BackendArgs,
    queue_args: &[String],
    restarts: &Restarts,
    run_dir: &Path,
) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => replaced_exe(e),
        Err(e) => return fail(&format!("cannot find our own executable: {e}")),
    };
    let xs = match a.sim_dir() {
        #[cfg(feature = "test-utils")]
        Some(dir) => rbdback::xen::sim::remote::RemotePlatform::new(dir).xenstore(),
        _ => RealPlatform::new().xenstore(),
    };
    let xs = match xs {
        Ok(x) => x,
        Err(e) => return fail(&chain(&e)),
    };
    let (_stop_tx, stop_rx) = std::sync::mpsc::channel();
    let mut extra = vec!["--backend-domid".to_owned(), a.backend_domid.to_string()];
    extra.extend_from_slice(queue_args);
    if let Some(dir) = a.sim_dir() {
        extra.push("--sim-dir".to_owned());
        extra.push(dir.display().to_string());
    }
    let cfg = SuperviseConfig {
        kind: a.kind.clone(),
        backend_domid: a.backend_domid,
        exe,
        extra_args: extra,
        run_dir: Some(run_dir.to_owned()),
    };
    match supervisor::supervise(&xs, &cfg, &stop_rx, restarts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&chain(&e)),
    }
}

/// The path our executable was started from, also after a package upgrade replaced it: Linux
/// then names the old, unlinked file `<path> (deleted)`, and the new binary at `<path>` is the
/// one to start `serve` processes from.
fn replaced_exe(exe: std::path::PathBuf) -> std::path::PathBuf {
    match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(path) if Path::new(path).exists() => path.into(),
        _ => exe,
    }
}

#[cfg(feature = "test-utils")]
fn run_full_demo(a: cli::DemoArgs) -> ExitCode {
    let mut o = rbdback::demo::DemoOptions {
        ceph_conf: a.ceph_conf,
        bench_image: a.bench_image,
        seq: a.seq,
        in_process: a.in_process,
        no_sandbox: a.no_sandbox,
        journal: !a.no_journal,
        ..Default::default()
    };
    o.requests = a.requests.unwrap_or(o.requests);
    o.qd = a.qd.unwrap_or(o.qd);
    o.queues = a.queues.unwrap_or(o.queues);
    o.write_pct = a.writes.unwrap_or(o.write_pct);
    o.span_mib = a.span_mib.unwrap_or(o.span_mib);
    o.bs_kib = a.bs_kib.unwrap_or(o.bs_kib);
    match rbdback::demo::run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("demo failed: {}", chain(&e))),
    }
}

#[cfg(not(feature = "test-utils"))]
fn run_full_demo(_a: cli::DemoArgs) -> ExitCode {
    fail("demo needs the simulated guest: build with `--features test-utils`")
}

#[cfg(feature = "test-utils")]
fn run_soak(a: &cli::SoakArgs) -> ExitCode {
    let o = rbdback::soak::SoakOptions {
        minutes: a.minutes,
        fault_every: std::time::Duration::from_secs(a.fault_every),
        ..Default::default()
    };
    match rbdback::soak::run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("soak failed: {}", chain(&e))),
    }
}

#[cfg(not(feature = "test-utils"))]
fn run_soak(_a: &cli::SoakArgs) -> ExitCode {
    fail("soak needs the simulated guest: build with `--features test-utils`")
}

#[cfg(feature = "test-utils")]
fn run_demo(a: &cli::RingDemoArgs) -> ExitCode {
    let Some(abi) = rbdback::ring::Abi::from_protocol(Some(&a.abi)) else {
        return fail(&format!("unknown abi {}", a.abi));
    };
    let o = ring_demo::Options {
        abi,
        order: a.order,
        requests: a.requests,
    };
    match ring_demo::run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("ring demo: {e}")),
    }
}

#[cfg(not(feature = "test-utils"))]
fn run_demo(_a: &cli::RingDemoArgs) -> ExitCode {
    fail("ring-demo needs the mock frontend: build with `--features test-utils`")
}

#[cfg(feature = "test-utils")]
// Demo arithmetic: sectors of a 64 MiB disk and at most 512 * 33 page numbers, all of which fit
// every integer type they are cast to; byte patterns are truncated on purpose.
#[allow(clippy::cast_possible_truncation)]
mod ring_demo {
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};

    use rbdback::ring::abi::{ring_bytes, PAGE_SIZE};
    use rbdback::ring::front::{indirect_pages, MockFrontend, WireRequest};
    use rbdback::ring::request::op;
    use rbdback::ring::{
        Abi, BackRing, Limits, Parsed, Request, RequestKind, Segment, Status, Transfer,
    };
    use rbdback::shm::SharedMem;

    const DISK_BYTES: usize = 64 << 20;
    const DISK_SECTORS: u64 = (DISK_BYTES / 512) as u64;
    /// Data pages reserved per ring slot (the largest request below uses 32).
    const PAGES_PER_SLOT: usize = 33;

    pub struct Options {
        pub abi: Abi,
        pub order: u8,
        pub requests: u64,
    }

    /// A tiny deterministic PRNG (xorshift64*), so runs are reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// What the frontend expects back for one request.
    struct Expect {
        id: u64,
        status: Status,
        /// For reads: the pages and bytes the disk held when the read was queued.
        read: Option<(Vec<Segment>, Vec<u8>)>,
    }

    #[derive(Default)]
    struct Counts {
        reads: u64,
        writes: u64,
        indirect: u64,
        flushes: u64,
        discards: u64,
        invalid: u64,
        bytes: u64,
        verified_reads: u64,
    }

    /// The guest side: its view of the disk (`shadow`) and the pages it grants.
    struct Guest {
        rng: Rng,
        shadow: Vec<u8>,
        next_id: u64,
        counts: Counts,
    }

    impl Guest {
        /// Segments for `nsegs` pages of the slot that request `id` occupies.
        fn segments(&mut self, id: u64, cap: u64, nsegs: usize) -> Vec<Segment> {
            let base = (id % cap) as usize * PAGES_PER_SLOT;
            (0..nsegs)
                .map(|i| Segment {
                    gref: (base + i) as u32,
                    first_sect: 0,
                    last_sect: 7,
                })
                .collect()
        }

        /// Builds the next request, writing its data / descriptor pages into guest memory.
        fn next_request(&mut self, cap: u64, grants: &SharedMem<'_>) -> (WireRequest, Expect) {
            let id = self.next_id;
            self.next_id += 1;
            let dice = self.rng.below(1000);
            let sector = self.rng.below(DISK_SECTORS / 8 - 64) * 8;
            let ok = |id| Expect {
                id,
                status: Status::Okay,
                read: None,
            };
            if dice < 5 {
                self.counts.invalid += 1;
                let req = if dice < 3 {
                    let segs = self.segments(id, cap, 1);
                    WireRequest::read(id, DISK_SECTORS - 4, segs) // reaches past the end
                } else {
                    WireRequest::rw(op::RESERVED_1, id, 0, vec![])
                };
                let status = if dice < 3 {
                    Status::Error
                } else {
                    Status::NotSupported
                };
                return (
                    req,
                    Expect {
                        id,
                        status,
                        read: None,
                    },
                );
            }
            if dice < 20 {
                self.counts.flushes += 1;
                return (WireRequest::flush(id), ok(id));
            }
            if dice < 30 {
                self.counts.discards += 1;
                let nr = 8 * (1 + self.rng.below(16));
                let at = sector as usize * 512;
                self.shadow[at..at + nr as usize * 512].fill(0);
                let req = WireRequest::Discard {
                    flag: 0,
                    id,
                    sector,
                    nr_sectors: nr,
                };
                return (req, ok(id));
            }
            let indirect = dice >= 950;
            let nsegs = if indirect {
                32
            } else if dice < 600 {
                1
            } else {
                1 + self.rng.below(11) as usize
            };
            let segs = self.segments(id, cap, nsegs);
            let at = sector as usize * 512;
            let len = nsegs * PAGE_SIZE;
            self.counts.bytes += len as u64;
            let write = self.rng.below(3) == 0;
            let req_op = if write { op::WRITE } else { op::READ };
            if indirect {
                self.counts.indirect += 1;
            }
            let expect = if write {
                self.counts.writes += 1;
                let fill = (self.rng.next() & 0xff) as u8;
                for (i, s) in segs.iter().enumerate() {
                    let page: Vec<u8> = (0..PAGE_SIZE)
                        .map(|b| fill ^ (b as u8) ^ (i as u8))
                        .collect();
                    grants
                        .write(s.gref as usize * PAGE_SIZE, &page)
                        .expect("guest page in range");
                    self.shadow[at + i * PAGE_SIZE..at + (i + 1) * PAGE_SIZE]
                        .copy_from_slice(&page);
                }
                ok(id)
            } else {
                self.counts.reads += 1;
                Expect {
                    id,
                    status: Status::Okay,
                    read: Some((segs.clone(), self.shadow[at..at + len].to_vec())),
                }
            };
            let req = if indirect {
                // The descriptor page is the slot's last page.
                let desc = (id % cap) as usize * PAGES_PER_SLOT + PAGES_PER_SLOT - 1;
                let pages = indirect_pages(&segs);
                grants
                    .write(desc * PAGE_SIZE, &pages[0])
                    .expect("descriptor page in range");
                WireRequest::Indirect {
                    indirect_op: req_op,
                    nr_segments: nsegs as u16,
                    id,
                    sector,
                    grefs: vec![desc as u32],
                }
            } else {
                WireRequest::rw(req_op, id, sector, segs)
            };
            (req, expect)
        }
    }

    /// The backend side, standing in for the device layer: grant "maps" are offsets into the
    /// guest's page area, checked like a failing grant map would be.
    struct Backend {
        disk: Vec<u8>,
        limits: Limits,
    }

    impl Backend {
        fn grant_offset(grants: &SharedMem<'_>, s: &Segment) -> Option<usize> {
            let off = s.gref as usize * PAGE_SIZE + s.offset_bytes();
            (off + s.len_bytes() <= grants.len()).then_some(off)
        }

        fn transfer(&mut self, grants: &SharedMem<'_>, t: &Transfer, write: bool) -> Status {
            let mut at = t.offset_bytes() as usize;
            for s in t.segments.iter() {
                let Some(off) = Self::grant_offset(grants, s) else {
                    return Status::Error;
                };
                let Some(disk) = self.disk.get_mut(at..at + s.len_bytes()) else {
                    return Status::Error;
                };
                let r = if write {
                    grants.read(off, disk)
                } else {
                    grants.write(off, disk)
                };
                if r.is_err() {
                    return Status::Error;
                }
                at += s.len_bytes();
            }
            Status::Okay
        }

        fn execute(&mut self, grants: &SharedMem<'_>, req: &Request) -> Status {
            match &req.kind {
                RequestKind::Read(t) => self.transfer(grants, t, false),
                RequestKind::Write(t) => self.transfer(grants, t, true),
                RequestKind::Flush(t) | RequestKind::Barrier(t) => match t {
                    Some(t) => self.transfer(grants, t, true),
                    None => Status::Okay,
                },
                RequestKind::Discard(d) => {
                    let at = d.sector as usize * 512;
                    match self.disk.get_mut(at..at + d.nr_sectors as usize * 512) {
                        Some(r) => {
                            r.fill(0);
                            Status::Okay
                        }
                        None => Status::Error,
                    }
                }
            }
        }

        /// One wake-up: take everything published, validate, execute, answer, publish.
        fn service(
            &mut self,
            ring: &mut BackRing,
            mem: &SharedMem<'_>,
            grants: &SharedMem<'_>,
            slots: &mut Vec<rbdback::ring::RequestSlot>,
        ) -> Result<usize, String> {
            slots.clear();
            let n = ring
                .take_requests(mem, slots, usize::MAX)
                .map_err(|e| format!("ring broken: {e}"))?;
            for slot in slots.drain(..) {
                let rsp = match slot.parse(&self.limits) {
                    Ok(Parsed::Ready(req)) => req.response(self.execute(grants, &req)),
                    Ok(Parsed::NeedsIndirectPages(ind)) => {
                        // The device layer would grant-copy these pages; here they are copied
                        // out of the guest area.
                        let mut pages = Vec::with_capacity(ind.pages_needed());
                        for g in ind.page_grefs() {
                            let mut p = vec![0u8; PAGE_SIZE];
                            if grants.read(*g as usize * PAGE_SIZE, &mut p).is_err() {
                                break;
                            }
                            pages.push(p);
                        }
                        let refs: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
                        match ind.complete(&refs, &self.limits) {
                            Ok(req) => req.response(self.execute(grants, &req)),
                            Err(rej) => rej.response(),
                        }
                    }
                    Err(rej) => {
                        tracing::debug!("{rej}");
                        rej.response()
                    }
                };
                ring.push_response(mem, &rsp)
                    .map_err(|e| format!("respond: {e}"))?;
            }
            ring.publish_responses(mem)
                .map_err(|e| format!("publish: {e}"))?;
            Ok(n)
        }
    }

    pub fn run(o: &Options) -> Result<(), String> {
        let mut ring_buf = vec![0u8; ring_bytes(o.order)];
        let mem = SharedMem::from_mut_slice(&mut ring_buf);
        let mut front = MockFrontend::new(o.abi, o.order).map_err(|e| e.to_string())?;
        let mut back = BackRing::new(o.abi, o.order).map_err(|e| e.to_string())?;
        front.init_shared(&mem).map_err(|e| e.to_string())?;
        let cap = u64::from(back.capacity());
        let mut grant_buf = vec![0u8; cap as usize * PAGES_PER_SLOT * PAGE_SIZE];
        let grants = SharedMem::from_mut_slice(&mut grant_buf);

        let mut limits = Limits::new(DISK_SECTORS);
        limits.discard = true;
        let mut backend = Backend {
            disk: vec![0u8; DISK_BYTES],
            limits,
        };
        let mut guest = Guest {
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            shadow: vec![0u8; DISK_BYTES],
            next_id: 0,
            counts: Counts::default(),
        };
        tracing::info!(
            abi = %o.abi, order = o.order, slots = cap, requests = o.requests,
            "ring demo: mock blkfront -> BackRing -> 64 MiB in-memory disk"
        );

        let mut expect: VecDeque<Expect> = VecDeque::new();
        let mut slots = Vec::with_capacity(cap as usize);
        let mut rsps = Vec::with_capacity(cap as usize);
        let mut backend_time = Duration::ZERO;
        let mut wakeups = 0u64;
        let t0 = Instant::now();
        let mut queued = 0;
        let mut answered = 0;
        while answered < o.requests {
            while queued < o.requests && front.free_slots() > 0 {
                let (req, e) = guest.next_request(cap, &grants);
                front.queue(&mem, &req).map_err(|e| e.to_string())?;
                expect.push_back(e);
                queued += 1;
            }
            front.push_requests(&mem).map_err(|e| e.to_string())?;

            let tb = Instant::now();
            backend.service(&mut back, &mem, &grants, &mut slots)?;
            backend_time += tb.elapsed();
            wakeups += 1;

            rsps.clear();
            front
                .take_responses(&mem, &mut rsps)
                .map_err(|e| e.to_string())?;
            for r in &rsps {
                let e = expect.pop_front().ok_or("response without request")?;
                if r.id != e.id || r.status != e.status {
                    return Err(format!(
                        "request {}: expected {:?}, got id {} {:?}",
                        e.id, e.status, r.id, r.status
                    ));
                }
                if let Some((segs, want)) = e.read {
                    for (i, s) in segs.iter().enumerate() {
                        let mut got = vec![0u8; PAGE_SIZE];
                        grants
                            .read(s.gref as usize * PAGE_SIZE, &mut got)
                            .map_err(|e| e.to_string())?;
                        if got[..] != want[i * PAGE_SIZE..(i + 1) * PAGE_SIZE] {
                            return Err(format!("request {}: page {i} read back wrong data", e.id));
                        }
                    }
                    guest.counts.verified_reads += 1;
                }
                answered += 1;
            }
        }
        let total = t0.elapsed();
        if backend.disk != guest.shadow {
            return Err("final disk contents differ from what the guest wrote".into());
        }
        let c = &guest.counts;
        let secs = total.as_secs_f64();
        let bsecs = backend_time.as_secs_f64();
        println!(
            "ring demo ({}, {} slots): {} requests in {:.2}s over {} wake-ups",
            o.abi, cap, answered, secs, wakeups
        );
        println!(
            "  reads {} (all {} verified), writes {}, indirect {}, flushes {}, discards {}, invalid {} (answered with errors as expected)",
            c.reads, c.verified_reads, c.writes, c.indirect, c.flushes, c.discards, c.invalid
        );
        println!(
            "  end to end: {:.0} requests/s, {:.0} MiB/s of data",
            answered as f64 / secs,
            c.bytes as f64 / secs / 1048576.0
        );
        println!(
            "  backend (take + validate + copy data + respond): {:.0} requests/s, {:.0} MiB/s",
            answered as f64 / bsecs,
            c.bytes as f64 / bsecs / 1048576.0
        );
        println!("  final disk image matches the guest's view: OK");
        Ok(())
    }
}

fn run_engine_bench(a: cli::EngineBenchArgs) -> ExitCode {
    use rbdback::rados::bench::{self, BenchConfig, Pattern};
    use rbdback::rados::{EngineChoice, ImageSpec};
    let Some((pool, image)) = a.image.split_once('/') else {
        return fail(&format!("--image {:?}: POOL/NAME", a.image));
    };
    let mut spec = ImageSpec::new(pool, image);
    spec.conf = a.ceph_conf;
    spec.engine = match a.engine {
        cli::Engine::Direct => EngineChoice::Direct,
        cli::Engine::Librbd => EngineChoice::Librbd,
    };
    let pattern = match a.rw {
        cli::Rw::Randread => Pattern::RandRead,
        cli::Rw::Randwrite => Pattern::RandWrite,
        cli::Rw::Read => Pattern::Read,
        cli::Rw::Write => Pattern::Write,
    };
    let Ok(duration) = std::time::Duration::try_from_secs_f64(a.seconds) else {
        return fail(&format!("--seconds {}: not a duration", a.seconds));
    };
    let cfg = BenchConfig {
        spec,
        pattern,
        bs: a.bs,
        qd: a.qd,
        duration,
        span: a.span_mib << 20,
    };
    match bench::run(&cfg) {
        Ok(r) => {
            println!(
                "engine-bench: {:.0} IOPS, {:.1} MiB/s, lat mean {:.1} us p50 {:.1} us p99 {:.1} us, {} ios in {:.1} s",
                r.iops(),
                r.mib_s(),
                r.mean_us(),
                r.pct_us(50),
                r.pct_us(99),
                r.ios,
                r.secs
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}
