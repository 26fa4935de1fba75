//! The system calls a sandboxed `serve` may make, as two seccomp filters compiled with
//! Firecracker's `seccompiler`.
//!
//! Owns: the allowlist ([`GROUPS`] and the argument rules in [`allowlist`]), derived from what
//! `serve` really calls after it entered the sandbox (docs/sandbox.md says how: `strace -f`
//! on the test workloads, and the broker's learning mode), and the refusals ([`refusals`]):
//! calls a Ceph configuration can ask for that the sandbox answers with an error instead of a
//! kill (a new executable mapping, a socket of another family, `bind`, `clone3` so that glibc
//! falls back to `clone`, whose flags can be checked).
//! Trusts: `libc`'s system call numbers for the build target.
//! Must never: allow a call no group explains, or let a refused call pass silently: a call on
//! neither list stops the calling thread in the kernel and notifies the broker, which
//! records it and kills the process with SIGSYS ([`super::broker`]).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use super::SandboxError;
use crate::xen::real::evtchn_ioctl;

/// `SECCOMP_RET_USER_NOTIF`: the filter's answer to a call on no list (seccompiler has no
/// action for it; [`notify_on_mismatch`] puts it in place of `SECCOMP_RET_TRAP`).
const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;

/// A group of the allowlist: calls allowed with any arguments, and why.
#[derive(Debug)]
pub struct Group {
    /// The group's name (docs/sandbox.md lists the same groups).
    pub name: &'static str,
    /// Who makes these calls.
    pub why: &'static str,
    /// `(name, number)` of each call.
    pub calls: &'static [(&'static str, i64)],
}

macro_rules! calls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), libc::$name)),*]
    };
}

/// The calls allowed whatever their arguments, by group. Each call was seen in `strace -f`
/// of sandboxed `serve` processes under the test workloads (`tools/sandbox-syscalls`), unless
/// its line says why it is here anyway.
pub const GROUPS: &[Group] = &[
    Group {
        name: "memory",
        why: "the allocators (tcmalloc for the whole process) and thread stacks; new \
              executable mappings are refused (see refusals)",
        calls: calls!(SYS_brk, SYS_mmap, SYS_munmap, SYS_madvise, SYS_mprotect),
    },
    Group {
        name: "threads",
        why: "Rust's and librados' threads: futexes, restartable sequences and robust lists \
              (glibc), thread ids and CPU sets (sizing pools), exits; sched_yield (not seen: \
              crossbeam's back-off under contention on the completion queues)",
        calls: calls!(
            SYS_futex,
            SYS_rseq,
            SYS_set_robust_list,
            SYS_gettid,
            SYS_getpid,
            SYS_sched_getaffinity,
            SYS_sched_yield,
            SYS_exit,
            SYS_exit_group,
        ),
    },
    Group {
        name: "signals",
        why: "signal masks (every thread librados starts blocks all signals; serve's signal \
              thread waits for SIGTERM), Rust's stack-overflow handler and its alternate \
              stack; rt_sigreturn and restart_syscall (not seen: returning from a handler, \
              and the kernel's restart of a sleep a stop/continue interrupted)",
        calls: calls!(
            SYS_rt_sigprocmask,
            SYS_rt_sigaction,
            SYS_rt_sigtimedwait,
            SYS_sigaltstack,
            SYS_rt_sigreturn,
            SYS_restart_syscall,
        ),
    },
    Group {
        name: "time",
        why: "sleeps (librados' timers and back-offs, libxengnttab's retry of a busy map); \
              the clocks (not seen here: the vDSO answers them, but not on a clock source it \
              cannot read, which a Xen PV dom0 may have)",
        calls: calls!(
            SYS_clock_nanosleep,
            SYS_clock_gettime,
            SYS_clock_getres,
            SYS_gettimeofday,
        ),
    },
    Group {
        name: "files",
        why: "the journals (mapped files) and client record in the guest's state \
              directory, the copies of its disks' Ceph files, librados reading them; \
              Landlock decides which paths open at all",
        calls: calls!(
            SYS_openat,
            SYS_close,
            SYS_read,
            SYS_write,
            SYS_fstat,
            SYS_newfstatat,
            SYS_statx,
            SYS_ftruncate,
            SYS_fcntl,
            SYS_getdents64,
            SYS_unlinkat,
        ),
    },
    Group {
        name: "events",
        why: "waiting: the dataplane polls its event channel and eventfds, librados' \
              messenger uses epoll, eventfds and pipes, librbd's asio timerfds",
        calls: calls!(
            SYS_poll,
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_epoll_wait,
            SYS_eventfd2,
            SYS_pipe2,
            SYS_timerfd_create,
            SYS_timerfd_settime,
        ),
    },
    Group {
        name: "network",
        why: "librados' connections to the monitors and OSDs (sockets of allowed families \
              only, see socket), the broker's descriptors (sendmsg/recvmsg), the control \
              socket (accept4); getsockopt (not seen on loopback: a non-blocking connect's \
              outcome, SO_ERROR)",
        calls: calls!(
            SYS_connect,
            SYS_accept4,
            SYS_setsockopt,
            SYS_getsockopt,
            SYS_getsockname,
            SYS_sendmsg,
            SYS_recvmsg,
            SYS_sendto,
            SYS_recvfrom,
            SYS_shutdown,
        ),
    },
    Group {
        name: "host",
        why: "librados names its client after the host (uname) and seeds its nonces \
              (getrandom)",
        calls: calls!(SYS_uname, SYS_getrandom),
    },
];

/// The x86_64 system calls older than their `*at` or `*1` forms, which Rust's standard
/// library (`mkdir`, `unlink` for `create_dir_all`, `remove_file`) and librados' messenger
/// (`epoll_create`) still make.
#[cfg(target_arch = "x86_64")]
pub const LEGACY: &[Group] = &[Group {
    name: "legacy (x86_64)",
    why: "Rust's std::fs (mkdir, unlink: the guest's state directory, the Ceph files' \
          copies) and librados' messenger (epoll_create)",
    calls: calls!(SYS_mkdir, SYS_unlink, SYS_epoll_create),
}];

/// No legacy calls on other architectures (they only have the new forms).
#[cfg(not(target_arch = "x86_64"))]
pub const LEGACY: &[Group] = &[];

/// Every group of calls allowed whatever their arguments.
pub fn groups() -> impl Iterator<Item = &'static Group> {
    GROUPS.iter().chain(LEGACY)
}

/// `CLONE_THREAD`: `clone` may make threads, never processes.
const CLONE_THREAD: u64 = 0x0001_0000;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(filter_err)
}

fn dword(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(filter_err)
}

fn filter_err(e: seccompiler::BackendError) -> SandboxError {
    SandboxError::Filter(e.to_string())
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conds).map_err(filter_err)
}

/// One rule per value: argument `arg` equals one of `values`.
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SandboxError> {
    values
        .iter()
        .map(|&v| rule(vec![dword(arg, SeccompCmpOp::Eq, v)?]))
        .collect()
}

/// The `ioctl` requests a sandboxed backend makes on a real Xen (the simulated one has no
/// device to ask): grant maps, unmaps and copies on gntdev (what libxengnttab's Linux backend
/// issues: an unmap first asks the mapping's offset), the event channel device's binds,
/// unbinds and notifies (`src/xen/real.rs`).
pub const IOCTLS: &[(&str, u64)] = &[
    ("IOCTL_GNTDEV_MAP_GRANT_REF", 0x0018_4700),
    ("IOCTL_GNTDEV_UNMAP_GRANT_REF", 0x0010_4701),
    ("IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR", 0x0018_4702),
    ("IOCTL_GNTDEV_GRANT_COPY", 0x0010_4708),
    (
        "IOCTL_EVTCHN_BIND_INTERDOMAIN",
        evtchn_ioctl::BIND_INTERDOMAIN,
    ),
    ("IOCTL_EVTCHN_UNBIND", evtchn_ioctl::UNBIND),
    ("IOCTL_EVTCHN_NOTIFY", evtchn_ioctl::NOTIFY),
];

/// The `prctl` options allowed: naming a thread (Rust and librados name every thread they
/// start).
pub const PRCTLS: &[u64] = &[libc::PR_SET_NAME as u64];

/// The socket families allowed: TCP to the cluster's monitors and OSDs (IPv4, and IPv6 for
/// clusters on it). No unix sockets: the backend's are all made before the drop, so a
/// compromised one cannot reach another local daemon's socket.
pub const FAMILIES: &[u64] = &[libc::AF_INET as u64, libc::AF_INET6 as u64];

/// The allowlist of a process whose pid is `pid`: every call of [`groups`], and the calls
/// whose arguments are checked: `ioctl` ([`IOCTLS`]), `prctl` ([`PRCTLS`]), `socket`
/// ([`FAMILIES`]), `clone` for threads only, and `kill`/`tgkill` of this process only (not
/// seen in the traces: `abort` raising SIGABRT, the test builds' crash points).
pub fn allowlist(pid: u32) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for g in groups() {
        for &(_, nr) in g.calls {
            m.insert(nr, Vec::new());
        }
    }
    let ioctls: Vec<u64> = IOCTLS.iter().map(|&(_, n)| n).collect();
    m.insert(libc::SYS_ioctl, one_of(1, &ioctls)?);
    m.insert(libc::SYS_prctl, one_of(0, PRCTLS)?);
    m.insert(libc::SYS_socket, {
        // the type may carry SOCK_NONBLOCK | SOCK_CLOEXEC: only the family is checked
        one_of(0, FAMILIES)?
    });
    m.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(CLONE_THREAD),
            CLONE_THREAD,
        )?])?],
    );
    let me = u64::from(pid);
    m.insert(
        libc::SYS_kill,
        vec![rule(vec![dword(0, SeccompCmpOp::Eq, me)?])?],
    );
    m.insert(
        libc::SYS_tgkill,
        vec![rule(vec![dword(0, SeccompCmpOp::Eq, me)?])?],
    );
    Ok(m)
}

/// Calls refused with an error, not a kill: things a Ceph configuration or a C library may
/// try that a sandboxed backend must not do, and can do without.
pub fn refusals() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let exec = libc::PROT_EXEC as u64;
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // no new executable memory: a plugin librados would load late fails to load (EPERM)
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        m.insert(
            nr,
            vec![rule(vec![cond(2, SeccompCmpOp::MaskedEq(exec), exec)?])?],
        );
    }
    // glibc's pthread_create tries clone3 (whose flags seccomp cannot see) and falls back to
    // clone on ENOSYS
    m.insert(libc::SYS_clone3, Vec::new());
    // other socket families (unix; netlink, which getaddrinfo may try): EAFNOSUPPORT
    m.insert(
        libc::SYS_socket,
        vec![rule(
            FAMILIES
                .iter()
                .map(|&f| dword(0, SeccompCmpOp::Ne, f))
                .collect::<Result<_, _>>()?,
        )?],
    );
    // an admin socket or a client bind a configuration asks for
    m.insert(libc::SYS_bind, Vec::new());
    m.insert(libc::SYS_listen, Vec::new());
    Ok(m)
}

/// The errno each refusal answers with.
pub fn refusal_errno(nr: i64) -> u32 {
    let e = match nr {
        libc::SYS_clone3 => libc::ENOSYS,
        libc::SYS_socket => libc::EAFNOSUPPORT,
        libc::SYS_bind | libc::SYS_listen => libc::EACCES,
        _ => libc::EPERM,
    };
    e.unsigned_abs()
}

/// The target architecture of this build, as seccompiler names it.
fn arch() -> Result<seccompiler::TargetArch, SandboxError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Filter(e.to_string()))
}

/// Replaces the `SECCOMP_RET_TRAP` returns of a compiled filter by
/// `SECCOMP_RET_USER_NOTIF`: a call on no list waits in the kernel for the broker.
fn notify_on_mismatch(prog: &mut BpfProgram) -> usize {
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    let mut n = 0;
    for i in prog.iter_mut() {
        if i.code == BPF_RET_K && i.k == libc::SECCOMP_RET_TRAP {
            i.k = SECCOMP_RET_USER_NOTIF;
            n += 1;
        }
    }
    n
}

/// The allowlist filter of process `pid`: allowed calls return, every other call is handed
/// to the broker (user notification).
pub fn allow_program(pid: u32) -> Result<BpfProgram, SandboxError> {
    let f = SeccompFilter::new(
        allowlist(pid)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        arch()?,
    )
    .map_err(filter_err)?;
    let mut prog = BpfProgram::try_from(f).map_err(|e| SandboxError::Filter(e.to_string()))?;
    if notify_on_mismatch(&mut prog) == 0 {
        return Err(SandboxError::Filter(
            "the compiled allowlist has no mismatch return".into(),
        ));
    }
    Ok(prog)
}

/// The refusal filters, one per errno (a seccompiler filter has one match action).
pub fn refusal_programs() -> Result<Vec<BpfProgram>, SandboxError> {
    let mut by_errno: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for (nr, rules) in refusals()? {
        by_errno
            .entry(refusal_errno(nr))
            .or_default()
            .insert(nr, rules);
    }
    by_errno
        .into_iter()
        .map(|(errno, rules)| {
            let f = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno),
                arch()?,
            )
            .map_err(filter_err)?;
            BpfProgram::try_from(f).map_err(|e| SandboxError::Filter(e.to_string()))
        })
        .collect()
}

mod names {
    include!(concat!(env!("OUT_DIR"), "/syscall_names.rs"));
}

/// The name of system call `nr` on this architecture (`None` when unknown).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    names::SYSCALL_NAMES
        .binary_search_by_key(&nr, |&(n, _)| n)
        .ok()
        .and_then(|i| names::SYSCALL_NAMES.get(i))
        .map(|&(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allowed_call_is_in_one_group_and_named_by_the_table() {
        let mut seen = std::collections::HashSet::new();
        for g in groups() {
            for &(name, nr) in g.calls {
                assert!(seen.insert(nr), "{name} is in two groups");
                if cfg!(target_arch = "x86_64") {
                    assert_eq!(syscall_name(nr), name.strip_prefix("SYS_"), "{name}");
                }
            }
        }
        // what the sandbox must never allow
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_setuid,
            libc::SYS_process_vm_readv,
            libc::SYS_syslog,
            libc::SYS_open_by_handle_at,
        ] {
            assert!(!allowlist(1).unwrap().contains_key(&nr), "{nr} allowed");
        }
    }

    #[test]
    fn the_filters_compile_and_end_in_a_notification() {
        let prog = allow_program(1234).unwrap();
        assert!(prog.len() < 4096);
        assert!(prog.iter().any(|i| i.k == SECCOMP_RET_USER_NOTIF));
        assert!(!prog.iter().any(|i| i.k == libc::SECCOMP_RET_TRAP));
        assert_eq!(refusal_programs().unwrap().len(), 4);
    }

    #[test]
    fn calls_are_named_by_number() {
        if cfg!(target_arch = "x86_64") {
            assert_eq!(syscall_name(libc::SYS_syslog), Some("syslog"));
            assert_eq!(syscall_name(0), Some("read"));
        }
        assert_eq!(syscall_name(-1), None);
    }
}
