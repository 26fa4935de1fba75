//! Least privilege for `rbdback serve`: the process that speaks to a guest gives up root,
//! every capability, the file system beyond its own state, and every system call it does
//! not make, so that a guest who finds a bug in it owns one unprivileged process, not dom0.
//!
//! Owns: the drop ([`enter`]: resource limits, the capability bounding set, groups, gid, uid,
//! no-new-privileges, not dumpable), the Landlock ruleset ([`landlock_rules`]) and the
//! seccomp filters ([`filter`]); the privileged half that stays behind as root and hands the
//! backend what it may still have ([`broker`]).
//! Trusts: the caller to have opened, before [`enter`], everything the backend needs that it
//! could no longer open: its grant table handle, its control socket, its broker; and to call
//! [`enter`] while the process has one thread (Landlock and the capability bounding set are
//! per thread on the kernels we support; threads started later inherit them).
//! Must never: return `Ok` from [`enter`] with a privilege left (it checks the uids, the
//! capabilities and that `setuid(0)` fails), or keep going silently when the kernel lacks a
//! layer: what is not enforced is reported ([`Entered::landlock`]) and logged by the caller.
//!
//! Every `unsafe` block here is a system call without a safe wrapper in `nix`; each says why
//! its arguments are valid.

pub mod broker;
pub mod filter;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};
use nix::unistd::{Gid, Uid};
use thiserror::Error;

/// The user a sandboxed backend runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    /// Its uid.
    pub uid: u32,
    /// Its gid (its only group).
    pub gid: u32,
}

/// The default base of the per-guest uid range: guest `d`'s backend runs as uid and gid
/// `base + d`. 0x70000000 is above systemd's container range (524288..1879048191) and below
/// 2^31, where nothing on a Debian host allocates uids (docs/sandbox.md).
pub const DEFAULT_UID_BASE: u32 = 0x7000_0000;

impl User {
    /// The user of guest `domid`'s backend in the range starting at `base`.
    pub fn per_guest(base: u32, domid: u16) -> Option<User> {
        let id = base.checked_add(u32::from(domid))?;
        (id != 0 && id != u32::MAX).then_some(User { uid: id, gid: id })
    }

    /// Parses `UID[:GID]` (numbers; the gid defaults to the uid).
    pub fn parse(s: &str) -> Result<User, String> {
        let (u, g) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let num = |v: &str, what: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("{what} {v:?} is not a number"))
        };
        let uid = num(u, "uid")?;
        let gid = g.map_or(Ok(uid), |g| num(g, "gid"))?;
        if uid == 0 || gid == 0 {
            return Err("the sandbox user cannot be root (uid or gid 0)".into());
        }
        if uid == u32::MAX || gid == u32::MAX {
            return Err("uid and gid 4294967295 mean \"no change\" to the kernel".into());
        }
        Ok(User { uid, gid })
    }
}

/// Why the sandbox could not be entered.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// The process already runs other threads.
    #[error("the sandbox must be entered before any thread starts ({0} threads run)")]
    Threads(usize),
    /// A system call of the drop failed.
    #[error("{what}")]
    Sys {
        /// What was attempted.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The drop did not take (a check after it failed).
    #[error("privileges remain after the drop: {0}")]
    Kept(String),
    /// The Landlock ruleset could not be built or applied.
    #[error("landlock: {0}")]
    Landlock(String),
    /// A seccomp filter could not be built.
    #[error("seccomp filter: {0}")]
    Filter(String),
    /// The broker could not be started or asked.
    #[error("broker: {0}")]
    Broker(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> SandboxError {
    let what = what.into();
    move |e| SandboxError::Sys {
        what,
        source: e.into(),
    }
}

/// What the sandbox is made of.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// The user to run as.
    pub user: User,
    /// The only directory the backend may write (its guest's state: journals, client record,
    /// copies of its disks' Ceph files); it must exist and belong to [`Confinement::user`].
    pub state_dir: PathBuf,
}

/// What [`enter`] did.
#[derive(Debug)]
pub struct Entered {
    /// The seccomp listener: a call on no list waits for whoever reads it (the broker).
    pub listener: OwnedFd,
    /// How much of the Landlock ruleset the kernel enforces.
    pub landlock: String,
}

/// Paths a backend reads after the drop, whatever its disks: the C libraries' data (glibc's
/// name service and locale files, OpenSSL's configuration that librados' crypto reads at its
/// first use), `/dev/urandom` and `/dev/null`, its own `/proc/self` (its CPU and memory for
/// the `metrics` command), the CPU topology librados and Rust read to size their thread
/// pools, and whether a kernel backend has bound one of its devices (`/sys/bus/xen-backend`).
pub const READ_ONLY: &[&str] = &[
    "/usr/lib",
    "/usr/share/zoneinfo",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/localtime",
    "/etc/ssl",
    "/usr/lib/ssl",
    "/dev/urandom",
    "/dev/null",
    "/proc/self",
    "/sys/devices/system/cpu",
    "/sys/fs/cgroup",
    "/sys/bus/xen-backend",
];

/// Number of threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

/// Applies the Landlock ruleset: read-only [`READ_ONLY`], read-write `state_dir`, nothing
/// else; no TCP `bind` (ABI 4+), no abstract unix sockets or signals outside the sandbox
/// (ABI 6+). Best effort: a kernel without Landlock (or with an older ABI) enforces what it
/// has; the returned text says what.
pub fn landlock_rules(state_dir: &Path) -> Result<String, SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError::Landlock(e.to_string());
    let abi = ABI::V6;
    let ro: Vec<&str> = READ_ONLY
        .iter()
        .copied()
        .filter(|p| Path::new(p).exists())
        .collect();
    let mut rs = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err(&e))?
        .handle_access(AccessNet::BindTcp)
        .map_err(|e| err(&e))?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    rs = rs
        .add_rules(landlock::path_beneath_rules(&ro, AccessFs::from_read(abi)))
        .map_err(|e| err(&e))?;
    rs = rs
        .add_rules(landlock::path_beneath_rules(
            [state_dir],
            AccessFs::from_all(abi),
        ))
        .map_err(|e| err(&e))?;
    let st = rs.restrict_self().map_err(|e| err(&e))?;
    Ok(match st.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced".to_owned(),
        RulesetStatus::PartiallyEnforced => {
            "partially enforced (an older kernel: some access rights are not checked)".to_owned()
        }
        RulesetStatus::NotEnforced => {
            "not enforced (the kernel has no Landlock): the file system is closed by the \
             user's permissions only"
                .to_owned()
        }
    })
}

/// Drops every capability from the bounding set (no `execve` could regain one), up to the
/// kernel's last capability.
fn drop_bounding_set() -> Result<(), SandboxError> {
    let last: i32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    for cap in 0..=last {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointer; it changes only
        // this thread's bounding set (the only thread, checked by the caller).
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break; // beyond what this kernel knows
            }
            return Err(SandboxError::Sys {
                what: format!("dropping capability {cap} from the bounding set"),
                source: e,
            });
        }
    }
    Ok(())
}

/// A `Cap*:` line of `/proc/self/status`, as a number.
fn cap_line(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Checks that the drop took: every uid and gid is the user's, no capability is left, and
/// root cannot be had back.
fn check_dropped(user: User) -> Result<(), SandboxError> {
    let r = nix::unistd::getresuid().map_err(sys("getresuid"))?;
    let g = nix::unistd::getresgid().map_err(sys("getresgid"))?;
    let want_u = Uid::from_raw(user.uid);
    let want_g = Gid::from_raw(user.gid);
    if (r.real, r.effective, r.saved) != (want_u, want_u, want_u)
        || (g.real, g.effective, g.saved) != (want_g, want_g, want_g)
    {
        return Err(SandboxError::Kept(format!("uids {r:?}, gids {g:?}")));
    }
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|source| SandboxError::Sys {
            what: "reading /proc/self/status".into(),
            source,
        })?;
    for name in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        match cap_line(&status, name) {
            Some(0) => {}
            v => return Err(SandboxError::Kept(format!("{name} {v:?}"))),
        }
    }
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(SandboxError::Kept("setuid(0) succeeded".into()));
    }
    Ok(())
}

/// Installs `prog` with `flags`; returns what `seccomp(2)` returned (a listener descriptor
/// with `SECCOMP_FILTER_FLAG_NEW_LISTENER`).
fn install(prog: &seccompiler::BpfProgram, flags: libc::c_ulong) -> Result<i64, SandboxError> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len())
            .map_err(|_| SandboxError::Filter("longer than 65535 instructions".into()))?,
        filter: prog.as_ptr().cast_mut().cast(),
    };
    // SAFETY: `fprog` points at `prog`'s instructions (seccompiler's sock_filter has the
    // kernel's layout, repr(C)), both alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            std::ptr::from_ref(&fprog),
        )
    };
    if rc < 0 {
        return Err(SandboxError::Sys {
            what: "installing the seccomp filter".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(rc)
}

/// Enters the sandbox: no core dumps, an empty capability bounding set, no supplementary
/// groups, `user`'s gid and uid (which clears every capability), not dumpable,
/// no-new-privileges, the Landlock ruleset, then the seccomp filters. The process must have
/// one thread. Returns the seccomp listener, for the broker.
pub fn enter(c: &Confinement) -> Result<Entered, SandboxError> {
    let n = threads();
    if n != 1 {
        return Err(SandboxError::Threads(n));
    }
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(sys("setting RLIMIT_CORE to 0"))?;
    drop_bounding_set()?;
    let (uid, gid) = (Uid::from_raw(c.user.uid), Gid::from_raw(c.user.gid));
    nix::unistd::setgroups(&[]).map_err(sys("clearing the supplementary groups"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(sys(format!("setresgid({})", c.user.gid)))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(sys(format!("setresuid({})", c.user.uid)))?;
    check_dropped(c.user)?;
    // a dump would hold the disks' keys; and another process of the same user may not
    // ptrace or read this one's memory
    nix::sys::prctl::set_dumpable(false).map_err(sys("PR_SET_DUMPABLE"))?;
    nix::sys::prctl::set_no_new_privs().map_err(sys("PR_SET_NO_NEW_PRIVS"))?;
    let landlock = landlock_rules(&c.state_dir)?;
    for prog in filter::refusal_programs()? {
        install(&prog, 0)?;
    }
    let fd = install(
        &filter::allow_program(std::process::id())?,
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER as libc::c_ulong,
    )?;
    let fd = i32::try_from(fd)
        .map_err(|_| SandboxError::Filter(format!("seccomp returned {fd} as a descriptor")))?;
    // SAFETY: seccomp(2) with SECCOMP_FILTER_FLAG_NEW_LISTENER returned this new descriptor
    // (close-on-exec), which nothing else owns.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(Entered { listener, landlock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_parsed_and_never_root() {
        assert_eq!(
            User::parse("1000").unwrap(),
            User {
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(User::parse("1000:27").unwrap(), User { uid: 1000, gid: 27 });
        assert!(User::parse("0").is_err());
        assert!(User::parse("5:0").is_err());
        assert!(User::parse("x").unwrap_err().contains("\"x\""));
        assert!(User::parse("4294967295").is_err());
        assert_eq!(
            User::per_guest(DEFAULT_UID_BASE, 7),
            Some(User {
                uid: 0x7000_0007,
                gid: 0x7000_0007
            })
        );
        assert_eq!(User::per_guest(u32::MAX - 3, 9), None);
    }

    #[test]
    fn capability_lines_are_read_as_hex() {
        let s = "Name:\tx\nCapEff:\t000001ffffffffff\nCapBnd:\t0000000000000000\n";
        assert_eq!(cap_line(s, "CapEff:"), Some(0x1ff_ffff_ffff));
        assert_eq!(cap_line(s, "CapBnd:"), Some(0));
        assert_eq!(cap_line(s, "CapAmb:"), None);
    }
}
