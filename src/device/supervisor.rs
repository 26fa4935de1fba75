//! `rbdback supervise`: keeps one `serve` process per guest that has RBD disks, and restarts
//! it the moment it dies, so that a backend crash costs a guest a stall, not its disks.
//!
//! Owns: the `serve` children (a waiter thread per child blocks in `waitpid`, so a death is
//! seen at once, not at the next poll), the restart policy ([`Backoff`]), the decision whether
//! a guest needs a backend at all ([`wanted`]: the domain exists and has an RBD disk someone
//! can serve), the report of a backend that keeps dying (log and the disks' `error` nodes),
//! adoption of `serve` processes a previous supervisor left running (they are asked to hand
//! their rings over, then started again as our children), and the live upgrade
//! (`rbdback upgrade`: every `serve` hands over to one started from the binary now installed,
//! then the supervisor re-executes itself, keeping its children); after a death, the dead
//! backend's control socket, and for a death by SIGSYS the log line naming the system call
//! its sandbox refused (the record its broker wrote, [`crate::sandbox::broker`]).
//! Trusts: xenstore's backend directories only to tell which guests have disks.
//! Must never: kill a `serve` (a stopping supervisor leaves them serving; an upgrade asks them
//! to hand over), restart in a tight loop, or start a backend for a domain that is gone.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::backend::is_rbd_params;
use super::metrics::Restarts;
use crate::control;
use crate::xen::xenstore::{Xenstore, XsError};
use crate::xen::DomId;

/// The exit status of a `serve` that handed its rings over on purpose (an upgrade, a
/// supervisor taking over, SIGTERM): started again at once, not counted as a crash.
pub const HANDOVER_EXIT: u8 = 75;

/// [`HANDOVER_EXIT`] as `waitpid` reports it.
const HANDOVER: i32 = HANDOVER_EXIT as i32;

/// Children a re-executed supervisor keeps: `domid:pid,...` in this environment variable.
pub const ADOPT_ENV: &str = "RBDBACK_ADOPT";

/// The supervisor's own control socket in the run directory.
pub const SOCKET: &str = "supervise.sock";

/// How a `serve` process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Death {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// It is gone and nobody knows how (waitpid failed).
    Unknown,
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Death::Exited(HANDOVER) => write!(f, "handed its rings over (status 75)"),
            Death::Exited(c) => write!(f, "exited with status {c}"),
            Death::Signaled(s) => {
                let name = Signal::try_from(s).map_or("unknown", Signal::as_str);
                write!(f, "was killed by signal {s} ({name})")?;
                if s == libc::SIGSYS {
                    write!(f, ": a system call its sandbox forbids")?;
                }
                Ok(())
            }
            Death::Unknown => write!(f, "is gone (its exit status is unknown)"),
        }
    }
}

/// What to do after a `serve` died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Start it again now.
    Now,
    /// Start it again after this long (it keeps dying).
    After(Duration),
    /// It ended because nothing was left to serve: start one only when a disk appears.
    WhenNeeded,
}

/// The restart policy of one guest's backend: at once after a death of a backend that ran a
/// while (a crash in service: the guest is stalled until the next one resumes) and after the
/// first death soon after start, with exponential back-off from the second such death in a row
/// (a backend that cannot run must not spin), reset by a backend that stays up.
#[derive(Debug, Clone)]
pub struct Backoff {
    quick: u32,
    /// A backend that ran at least this long died in service, not at start.
    pub min_uptime: Duration,
    /// The first wait after a quick death.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            quick: 0,
            min_uptime: Duration::from_secs(1),
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// Deaths in a row soon after start.
    pub fn quick_deaths(&self) -> u32 {
        self.quick
    }

    /// The decision after `death` of a backend that ran for `uptime`.
    pub fn after(&mut self, death: Death, uptime: Duration) -> Restart {
        match death {
            Death::Exited(0) => {
                self.quick = 0;
                Restart::WhenNeeded
            }
            Death::Exited(HANDOVER) => {
                self.quick = 0;
                Restart::Now
            }
            _ if uptime >= self.min_uptime => {
                self.quick = 0;
                Restart::Now
            }
            _ => {
                self.quick += 1;
                if self.quick == 1 {
                    // one death is not a loop yet: the guest's disk waits for no back-off
                    return Restart::Now;
                }
                let shift = self.quick.saturating_sub(2).min(16);
                let wait = self.base.saturating_mul(1 << shift).min(self.max);
                Restart::After(wait)
            }
        }
    }
}

/// Where `supervise` finds guests and how it starts their backends.
#[derive(Debug, Clone)]
pub struct SuperviseConfig {
    /// Backend kind directory (`vbd`).
    pub kind: String,
    /// Our domain (0 in dom0).
    pub backend_domid: DomId,
    /// The `rbdback` binary to start `serve` from (the one installed now).
    pub exe: PathBuf,
    /// Arguments passed to every `serve` after `--domid N --kind K`.
    pub extra_args: Vec<String>,
    /// Where `serve` processes keep their control sockets and state (and the supervisor its
    /// socket); `None`: no control socket, no adoption, no upgrade (tests).
    pub run_dir: Option<PathBuf>,
}

/// The RBD disks of guest `domid` that a backend could serve: `params` names an RBD image and
/// the frontend directory the toolstack wrote still exists. Empty when the domain is gone.
pub fn wanted(xs: &Xenstore, dir: &str, domid: DomId) -> Result<BTreeSet<u32>, XsError> {
    let mut out = BTreeSet::new();
    if xs.read(&format!("/local/domain/{domid}"))?.is_none() {
        return Ok(out); // the domain is gone (libxl removes its home when it destroys it)
    }
    let ddir = format!("{dir}/{domid}");
    for dev in xs.directory(&ddir)? {
        let Ok(devid) = dev.parse::<u32>() else {
            continue;
        };
        let be = format!("{ddir}/{dev}");
        if !matches!(xs.read(&format!("{be}/params"))?, Some(p) if is_rbd_params(&p)) {
            continue;
        }
        match xs.read(&format!("{be}/frontend"))? {
            Some(fe) if xs.read(fe.trim())?.is_some() => {
                out.insert(devid);
            }
            _ => {} // a stale directory: no frontend to serve
        }
    }
    Ok(out)
}

/// One guest's backend, as the supervisor sees it.
#[derive(Debug, Default)]
struct Guest {
    pid: Option<Pid>,
    started: Option<Instant>,
    backoff: Backoff,
    /// Earliest next start.
    not_before: Option<Instant>,
    /// The disks a backend that exited with nothing left saw; none new, no new backend.
    done: Option<BTreeSet<u32>>,
    /// Said in the log that the domain is gone or has nothing to serve.
    idle_logged: bool,
}

/// What the waiter threads and the upgrade handler tell the loop.
enum Event {
    Died(DomId, Pid, Death),
}

/// The children, shared with the control socket's handlers.
type Pids = Arc<Mutex<HashMap<DomId, Pid>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Blocks in `waitpid` on `pid` and reports its death.
fn spawn_waiter(domid: DomId, pid: Pid, tx: Sender<Event>, wake: Arc<EventFd>) {
    let spawned = std::thread::Builder::new()
        .name(format!("rbdback-wait-{domid}"))
        .spawn(move || {
            let death = loop {
                match waitpid(pid, None) {
                    Ok(WaitStatus::Exited(_, c)) => break Death::Exited(c),
                    Ok(WaitStatus::Signaled(_, s, _)) => break Death::Signaled(s as i32),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break Death::Unknown,
                }
            };
            let _ = tx.send(Event::Died(domid, pid, death));
            let _ = wake.write(1);
        });
    if let Err(e) = spawned {
        warn!(domid, error = %e, "cannot start a waiter thread; the backend's death will be seen late");
    }
}

/// Children a supervisor that re-executed itself passed on (`ADOPT_ENV`), still alive and
/// ours.
fn inherited() -> Vec<(DomId, Pid)> {
    let Ok(list) = std::env::var(ADOPT_ENV) else {
        return Vec::new();
    };
    std::env::remove_var(ADOPT_ENV);
    list.split(',')
        .filter_map(|p| p.split_once(':'))
        .filter_map(|(d, p)| Some((d.parse().ok()?, Pid::from_raw(p.parse().ok()?))))
        .filter(|(_, pid)| {
            matches!(
                waitpid(*pid, Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::StillAlive)
            )
        })
        .collect()
}

/// Guest `domid`'s instance lock in `run_dir`: held by its `serve` for its whole life (and
/// released by the kernel when it dies), so at most one process serves a guest's rings.
pub fn instance_lock_path(run_dir: &Path, domid: DomId) -> PathBuf {
    run_dir.join(format!("serve-{domid}.lock"))
}

/// Takes guest `domid`'s instance lock for this process, waiting while another `serve`
/// holds it (one handing its rings over, or one a supervisor is about to kill), and writes
/// our pid in it. Held until the process ends (the kernel releases it with the descriptor:
/// no unlock call, which a sandboxed process may not make).
pub fn lock_instance(run_dir: &Path, domid: DomId) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = instance_lock_path(run_dir, domid);
    let mut waiting: Option<Instant> = None;
    loop {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                if let Some(t0) = waiting {
                    info!(
                        domid,
                        secs = t0.elapsed().as_secs_f64(),
                        "the previous serve ended; going on"
                    );
                }
                lock.set_len(0)?;
                writeln!(lock, "{}", std::process::id())?;
                std::mem::forget(lock);
                return Ok(());
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                if waiting.is_none() {
                    warn!(domid, holder = ?lock_holder(run_dir, domid).map(Pid::as_raw),
                          "another serve for this guest still runs (handing over?); waiting for it to end");
                    waiting = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((_, e)) => return Err(e.into()),
        }
    }
}

/// The pid of the `serve` holding guest `domid`'s instance lock, if one does.
pub fn lock_holder(run_dir: &Path, domid: DomId) -> Option<Pid> {
    let file = std::fs::File::open(instance_lock_path(run_dir, domid)).ok()?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        // nobody holds it (ours is released when the guard drops)
        Ok(_) => None,
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            let text = std::io::read_to_string(file).ok()?;
            text.trim().parse().ok().map(Pid::from_raw)
        }
        Err(_) => None,
    }
}

/// How long a `serve` left by a previous supervisor may take to hand its rings over before
/// it is killed (its successor then resumes them from the journals, as after a crash).
const ORPHAN_HANDOVER: Duration = Duration::from_secs(15);

/// Asks every `serve` in `run_dir` that is not one of `ours` to hand its rings over and
/// waits (bounded) for it to go: they are started again as our children (a previous
/// supervisor left them running, e.g. `systemctl restart` with `KillMode=process`). One that
/// does not answer, or is still there after [`ORPHAN_HANDOVER`], is killed: its successor
/// waits for its instance lock, so two never serve the same rings.
fn take_over_orphans(run_dir: &Path, ours: &HashMap<DomId, Pid>) {
    let Ok(sockets) = control::serve_sockets(run_dir) else {
        return;
    };
    for (domid, path) in sockets {
        if ours.contains_key(&domid) {
            continue;
        }
        match control::call(&path, "handover", Value::Null) {
            Ok(_) => info!(
                domid,
                "a serve left by a previous supervisor hands its rings over"
            ),
            Err(e) => info!(domid, error = %e, "a control socket no serve answers"),
        }
        let deadline = Instant::now() + ORPHAN_HANDOVER;
        while lock_holder(run_dir, domid).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pid) = lock_holder(run_dir, domid) {
            warn!(domid, pid = pid.as_raw(), secs = ORPHAN_HANDOVER.as_secs(),
                  "a serve left by a previous supervisor did not hand over in time; killing it (the next one resumes its rings)");
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        }
    }
}

/// After a `serve` died: its control socket is removed (a sandboxed one cannot remove it
/// itself), and for a death by SIGSYS the record its broker wrote of the forbidden call
/// (`serve-<domid>.sigsys`) is read, removed and returned.
fn after_death(run_dir: Option<&Path>, domid: DomId, death: Death) -> Option<String> {
    let run_dir = run_dir?;
    let _ = std::fs::remove_file(control::socket_path(run_dir, domid));
    let record = crate::sandbox::broker::record_path(run_dir, domid);
    let text = std::fs::read_to_string(&record).ok();
    let _ = std::fs::remove_file(&record);
    match death {
        Death::Signaled(s) if s == libc::SIGSYS => Some(
            text.map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "no record of the call (was the broker gone?)".into()),
        ),
        _ => None,
    }
}

/// Reports a backend that keeps dying in the `error` node of each of the guest's disks.
fn report_dying(xs: &Xenstore, backend_domid: DomId, kind: &str, domid: DomId, msg: &str) {
    let Ok(devs) = xs.directory(&format!(
        "/local/domain/{backend_domid}/backend/{kind}/{domid}"
    )) else {
        return;
    };
    for dev in devs {
        let path =
            format!("/local/domain/{backend_domid}/error/backend/{kind}/{domid}/{dev}/error");
        let _ = xs.write(&path, &format!("5 {msg}"));
    }
}

/// Runs the supervisor until `stop` fires; the children keep running after it returns.
pub fn supervise(
    xs: &Xenstore,
    cfg: &SuperviseConfig,
    stop: &Receiver<()>,
    restarts: &Restarts,
) -> Result<(), XsError> {
    let dir = format!("/local/domain/{}/backend/{}", cfg.backend_domid, cfg.kind);
    let watch = xs.watch(&dir)?;
    let wake = Arc::new(
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| XsError::Io(e.into()))?,
    );
    let (tx, rx) = mpsc::channel::<Event>();
    let pids: Pids = Arc::new(Mutex::new(HashMap::new()));
    let mut guests: HashMap<DomId, Guest> = HashMap::new();
    for (domid, pid) in inherited() {
        info!(
            domid,
            pid = pid.as_raw(),
            "keeping the serve process of the supervisor we replaced"
        );
        let g = guests.entry(domid).or_default();
        g.pid = Some(pid);
        g.started = Some(Instant::now());
        lock(&pids).insert(domid, pid);
        spawn_waiter(domid, pid, tx.clone(), Arc::clone(&wake));
    }
    let reexec = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _control = cfg.run_dir.as_ref().and_then(|run_dir| {
        take_over_orphans(run_dir, &lock(&pids));
        let mut commands = control::Commands::default();
        let (p, rd, again, w) = (
            Arc::clone(&pids),
            run_dir.clone(),
            Arc::clone(&reexec),
            Arc::clone(&wake),
        );
        commands.add("upgrade", move |args| {
            let only = args.get("domid").and_then(Value::as_u64);
            let report = upgrade(&rd, &p, only.and_then(|d| DomId::try_from(d).ok()));
            if only.is_none() {
                // once this answer is out, the supervisor runs the new binary too
                let (again, w) = (Arc::clone(&again), Arc::clone(&w));
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    again.store(true, std::sync::atomic::Ordering::Relaxed);
                    let _ = w.write(1);
                });
            }
            Ok(report)
        });
        let p = Arc::clone(&pids);
        commands.add("status", move |_| {
            let l = lock(&p);
            Ok(json!({"pid": std::process::id(), "serve": l.iter().map(|(d, p)| json!({"domid": d, "pid": p.as_raw()})).collect::<Vec<_>>()}))
        });
        control::Server::start(run_dir, SOCKET, commands)
            .map_err(|e| warn!(error = %crate::chain(&e), "no supervisor control socket (no `rbdback upgrade`)"))
            .ok()
    });
    info!(dir = %dir, "supervising");
    let mut xs_failing = false;
    loop {
        if stop.try_recv().is_ok() {
            info!("supervisor stopping; the serve processes go on serving their guests");
            return Ok(());
        }
        if reexec.swap(false, std::sync::atomic::Ordering::Relaxed) {
            // returns only if the exec failed (logged): this supervisor goes on
            reexecute(cfg, &lock(&pids));
        }
        // Sleep until xenstore changes, a child dies, or the next delayed start is due.
        let now = Instant::now();
        let next = guests
            .values()
            .filter(|g| g.pid.is_none())
            .filter_map(|g| g.not_before)
            .map(|t| t.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        {
            let mut fds = [
                PollFd::new(watch.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            ];
            let ms = u16::try_from(next.as_millis()).unwrap_or(u16::MAX);
            let _ = poll(&mut fds, PollTimeout::from(ms));
        }
        let _ = wake.read();
        while watch.try_recv().is_some() {}
        while let Ok(Event::Died(domid, pid, death)) = rx.try_recv() {
            let g = guests.entry(domid).or_default();
            if g.pid != Some(pid) {
                continue;
            }
            g.pid = None;
            lock(&pids).remove(&domid);
            let uptime = g.started.map_or(Duration::ZERO, |t| t.elapsed());
            // the forbidden call, for a backend its sandbox killed
            let call = after_death(cfg.run_dir.as_deref(), domid, death);
            if let Some(c) = &call {
                warn!(
                    domid,
                    pid = pid.as_raw(),
                    signal = libc::SIGSYS,
                    "serve process killed by SIGSYS: forbidden {c}"
                );
            }
            let death_text = match &call {
                Some(c) => format!("{death}: {c}"),
                None => death.to_string(),
            };
            match g.backoff.after(death, uptime) {
                Restart::WhenNeeded => {
                    info!(domid, "serve process exited: nothing left to serve");
                    g.done = Some(wanted(xs, &dir, domid).unwrap_or_default());
                }
                Restart::Now => {
                    if death != Death::Exited(HANDOVER) {
                        restarts.restarted(domid);
                        warn!(
                            domid,
                            pid = pid.as_raw(),
                            uptime_s = uptime.as_secs(),
                            "serve process {death_text}; starting it again now"
                        );
                    } else {
                        info!(
                            domid,
                            pid = pid.as_raw(),
                            "serve process {death}; starting the next one"
                        );
                    }
                    g.not_before = None;
                }
                Restart::After(wait) => {
                    restarts.restarted(domid);
                    let msg = format!(
                        "rbdback serve for domain {domid} {death_text} {} times in a row within {} s of starting; next start in {} s",
                        g.backoff.quick_deaths(),
                        g.backoff.min_uptime.as_secs(),
                        wait.as_secs()
                    );
                    warn!(domid, "{msg}");
                    report_dying(xs, cfg.backend_domid, &cfg.kind, domid, &msg);
                    g.not_before = Some(Instant::now() + wait);
                }
            }
        }
        // A xenstore error (xenstored restarting, a transient failure) is logged and the
        // next pass tries again: the supervisor never exits on it (it would hand every guest
        // over on its restart).
        let pass = (|| -> Result<(), XsError> {
            let domids: Vec<DomId> = xs
                .directory(&dir)?
                .iter()
                .filter_map(|d| d.parse().ok())
                .collect();
            guests.retain(|d, g| g.pid.is_some() || domids.contains(d));
            for domid in domids {
                let g = guests.entry(domid).or_default();
                if g.pid.is_some() || g.not_before.is_some_and(|t| t > Instant::now()) {
                    continue;
                }
                let devs = wanted(xs, &dir, domid)?;
                let nothing_new = g.done.as_ref().is_some_and(|d| devs.is_subset(d));
                if devs.is_empty() || nothing_new {
                    if !g.idle_logged && !devs.is_empty() {
                        info!(
                            domid,
                            "no serve started: its disks were served to the end already"
                        );
                    } else if !g.idle_logged
                        && xs.read(&format!("/local/domain/{domid}"))?.is_none()
                    {
                        info!(
                            domid,
                            "no serve started: the domain is gone (stale backend directories)"
                        );
                    }
                    g.idle_logged = true;
                    continue;
                }
                g.done = None;
                g.idle_logged = false;
                let mut cmd = Command::new(&cfg.exe);
                cmd.arg("serve")
                    .arg("--domid")
                    .arg(domid.to_string())
                    .arg("--kind")
                    .arg(&cfg.kind)
                    .args(&cfg.extra_args);
                match cmd.spawn() {
                    Ok(child) => {
                        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
                        info!(domid, pid = pid.as_raw(), "started serve process");
                        g.pid = Some(pid);
                        g.started = Some(Instant::now());
                        lock(&pids).insert(domid, pid);
                        // the waiter reaps it; std's Child would not
                        drop(child);
                        spawn_waiter(domid, pid, tx.clone(), Arc::clone(&wake));
                    }
                    Err(e) => {
                        warn!(domid, error = %e, "cannot start serve process");
                        g.not_before = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            Ok(())
        })();
        match pass {
            Ok(()) => xs_failing = false,
            Err(e) => {
                if !xs_failing {
                    warn!(error = %e, "cannot read the backend directories; retrying every second");
                }
                xs_failing = true;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Hands every `serve` (or only `only`'s) over to one started from the binary installed now,
/// one guest at a time, and says how long each guest's disks waited.
fn upgrade(run_dir: &Path, pids: &Pids, only: Option<DomId>) -> Value {
    let list: Vec<(DomId, Pid)> = lock(pids)
        .iter()
        .filter(|(d, _)| only.is_none_or(|o| o == **d))
        .map(|(d, p)| (*d, *p))
        .collect();
    let mut out = Vec::new();
    for (domid, old) in list {
        let t0 = Instant::now();
        let sock = control::socket_path(run_dir, domid);
        let res = control::call(&sock, "handover", Value::Null).map_err(|e| crate::chain(&e));
        // the loop starts the next serve when the old one exits; wait until it answers
        let deadline = t0 + Duration::from_secs(60);
        let mut ok = false;
        while res.is_ok() && Instant::now() < deadline {
            let new = lock(pids).get(&domid).copied();
            if new.is_some_and(|p| p != old) && control::call(&sock, "status", Value::Null).is_ok()
            {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let secs = t0.elapsed().as_secs_f64();
        info!(domid, secs, ok, "upgraded the guest's backend");
        out.push(json!({"domid": domid, "ok": ok, "seconds": secs,
                        "error": res.err()}));
    }
    json!({"guests": out})
}

/// Runs the binary installed now in place of this supervisor, keeping its children (they
/// stay children across exec; `ADOPT_ENV` tells the new image which is whose).
fn reexecute(cfg: &SuperviseConfig, pids: &HashMap<DomId, Pid>) {
    use std::os::unix::process::CommandExt;
    let list: Vec<String> = pids
        .iter()
        .map(|(d, p)| format!("{d}:{}", p.as_raw()))
        .collect();
    let args: Vec<String> = std::env::args().skip(1).collect();
    info!(exe = %cfg.exe.display(), "supervisor re-executing the installed binary");
    let err = Command::new(&cfg.exe)
        .args(args)
        .env(ADOPT_ENV, list.join(","))
        .exec();
    warn!(error = %err, "cannot re-execute; this supervisor goes on");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_that_ran_a_while_is_restarted_at_once() {
        let mut b = Backoff::default();
        assert_eq!(
            b.after(Death::Signaled(9), Duration::from_secs(30)),
            Restart::Now
        );
        assert_eq!(
            b.after(Death::Exited(1), Duration::from_secs(2)),
            Restart::Now
        );
    }

    #[test]
    fn a_backend_that_dies_at_start_backs_off_until_one_stays_up() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(100);
        assert_eq!(b.after(Death::Signaled(6), quick), Restart::Now);
        assert_eq!(
            b.after(Death::Signaled(6), quick),
            Restart::After(Duration::from_secs(1))
        );
        assert_eq!(
            b.after(Death::Signaled(6), quick),
            Restart::After(Duration::from_secs(2))
        );
        assert_eq!(
            b.after(Death::Signaled(6), quick),
            Restart::After(Duration::from_secs(4))
        );
        for _ in 0..10 {
            b.after(Death::Exited(1), quick);
        }
        assert_eq!(
            b.after(Death::Exited(1), quick),
            Restart::After(Duration::from_secs(60))
        );
        assert_eq!(
            b.after(Death::Signaled(9), Duration::from_secs(5)),
            Restart::Now
        );
        assert_eq!(b.after(Death::Signaled(6), quick), Restart::Now);
        assert_eq!(
            b.after(Death::Signaled(6), quick),
            Restart::After(Duration::from_secs(1))
        );
    }

    #[test]
    fn a_handover_or_nothing_left_is_not_a_crash() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(10);
        assert_eq!(b.after(Death::Exited(HANDOVER), quick), Restart::Now);
        assert_eq!(b.after(Death::Exited(0), quick), Restart::WhenNeeded);
        assert_eq!(b.quick_deaths(), 0);
    }

    #[test]
    fn deaths_are_named_for_the_operator() {
        assert_eq!(
            Death::Signaled(9).to_string(),
            "was killed by signal 9 (SIGKILL)"
        );
        assert!(Death::Signaled(31).to_string().contains("sandbox forbids"));
        assert_eq!(Death::Exited(3).to_string(), "exited with status 3");
    }
}
