//! librados, wrapped: the cluster handle, pool contexts, synchronous class-method calls and
//! locks for the control paths, asynchronous operations for the data paths, and watch/notify.
//!
//! Owns: every `unsafe` call into librados made by the engines (librbd's own calls stay in
//! [`super::librbd`]).
//! Trusts: librados' contract: a completion's callback runs exactly once, after which librados
//! no longer touches the memory the operation was given.
//! Must never: run engine logic on a librados thread (callbacks only hand a token and a result
//! to an [`AioSink`] or a watch event to a [`WatchSink`]), or free memory an operation in
//! flight may still write (callers keep read buffers alive until the token comes back).

use std::ffi::{c_char, c_void, CString};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::sys;
use super::{lock, Errno, ImageSpec, PoolRef, RadosError, Sink};

/// Seconds librados waits for the monitors before an open fails (unreachable cluster).
pub const MOUNT_TIMEOUT_SECS: u32 = 8;

pub(crate) fn rc(rc: i32) -> Result<i32, Errno> {
    if rc < 0 {
        Err(Errno(rc))
    } else {
        Ok(rc)
    }
}

fn name(s: &str) -> Result<CString, Errno> {
    CString::new(s).map_err(|_| Errno(-libc::EINVAL))
}

pub(crate) fn cstr(s: &str, what: &str) -> Result<CString, RadosError> {
    CString::new(s).map_err(|_| RadosError::Invalid(format!("{what} contains a NUL byte")))
}

/// `s` as a JSON string literal (for monitor commands).
pub(crate) fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The value of top-level field `key` in a flat JSON object the monitors sent: a number, or a
/// string without escapes (pg ids, OSD ids); `None` if absent.
pub(crate) fn json_field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json.get(at..)?.trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        s.split('"').next()
    } else {
        rest.split([',', '}']).next().map(str::trim)
    }
}

/// `rados_mon_command` and `rados_mgr_command`.
type CommandFn = unsafe extern "C" fn(
    sys::rados_t,
    *mut *const c_char,
    usize,
    *const c_char,
    usize,
    *mut *mut c_char,
    *mut usize,
    *mut *mut c_char,
    *mut usize,
) -> i32;

/// A cluster handle (`rados_t`), shut down when the last of its holders goes: the
/// [`Cluster`], and a helper thread still inside a blocking librados call on it (see
/// [`Cluster::fence`]).
#[derive(Debug)]
struct Handle(sys::rados_t);

// SAFETY: a rados_t is internally synchronised and documented as usable from many threads.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: shut down once, by the last holder; every ioctx and image made from it is
        // dropped first (they are fields declared before the cluster in LibrbdImage, and
        // direct-engine contexts live in structures that also hold the cluster).
        unsafe { sys::rados_shutdown(self.0) };
    }
}

/// A cluster handle (`rados_t`), shut down on drop (later if a helper thread still uses it).
#[derive(Debug)]
pub(crate) struct Cluster {
    h: sys::rados_t,
    life: Arc<Handle>,
    /// The latest fence's helper thread (at most one runs at a time).
    fence_job: Mutex<Option<Arc<FenceJob>>>,
}

// SAFETY: a rados_t is internally synchronised and documented as usable from many threads;
// the other fields are Send and Sync.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Connects as `client.<id>` with the spec's configuration, bounded by the mount timeout.
    pub(crate) fn connect(spec: &ImageSpec) -> Result<Cluster, RadosError> {
        let c = Cluster::configure(spec)?;
        // SAFETY: valid, configured handle; blocks at most the mount timeout.
        let rc = unsafe { sys::rados_connect(c.h) };
        if rc < 0 {
            // librados says ENOENT when no keyring of its search list exists: name the list
            let what = match c.get("keyring") {
                Ok(list) if rc == -libc::ENOENT => {
                    format!("rados_connect found no keyring (keyring = {})", list.trim())
                }
                _ => "rados_connect".to_owned(),
            };
            return Err(RadosError::Connect {
                client: spec.client_id.clone(),
                what,
                errno: Errno(rc),
            });
        }
        Ok(c)
    }

    /// A handle configured as [`Cluster::connect`] configures it (the spec's ceph.conf,
    /// `$CEPH_ARGS`, our options, the spec's options), not connected.
    fn configure(spec: &ImageSpec) -> Result<Cluster, RadosError> {
        let client = spec.client_id.clone();
        let fail = |what: &str, rc: i32| RadosError::Connect {
            client: client.clone(),
            what: what.to_owned(),
            errno: Errno(rc),
        };
        let name = cstr(&format!("client.{}", spec.client_id), "client id")?;
        let cluster_name = cstr("ceph", "cluster name")?;
        let mut h: sys::rados_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the strings outlive the call.
        let rc = unsafe { sys::rados_create2(&mut h, cluster_name.as_ptr(), name.as_ptr(), 0) };
        if rc < 0 {
            return Err(fail("rados_create2", rc));
        }
        let c = Cluster {
            h,
            life: Arc::new(Handle(h)),
            fence_job: Mutex::new(None),
        };
        let conf = spec
            .conf
            .as_deref()
            .map(|p| cstr(p, "conf path"))
            .transpose()?;
        // SAFETY: valid handle; NULL means the default search path and $CEPH_CONF.
        let rc = unsafe {
            sys::rados_conf_read_file(c.h, conf.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()))
        };
        // without a named file, no default ceph.conf is fine: `mon_host` and `keyring` may
        // come as options (as the CSI plugin's cluster map gives them), as for Ceph's tools
        if rc < 0 && !(spec.conf.is_none() && rc == -libc::ENOENT) {
            return Err(fail(
                &format!(
                    "reading {}",
                    spec.conf.as_deref().unwrap_or("the default ceph.conf")
                ),
                rc,
            ));
        }
        // SAFETY: valid handle; NULL reads $CEPH_ARGS.
        let rc = unsafe { sys::rados_conf_parse_env(c.h, std::ptr::null()) };
        if rc < 0 {
            return Err(fail("parsing $CEPH_ARGS", rc));
        }
        let t = MOUNT_TIMEOUT_SECS.to_string();
        let mut opts: Vec<(&str, &str)> = vec![
            ("client_mount_timeout", &t),
            ("rados_mon_op_timeout", &t),
            // Ceph gathers debug messages in memory up to the second level even when it
            // prints nothing; a block backend has no use for that (set them back with
            // conf_options when debugging)
            ("debug_ms", "0/0"),
            ("debug_objecter", "0/0"),
            ("debug_rados", "0/0"),
            ("debug_monc", "0/0"),
            ("debug_auth", "0/0"),
            ("debug_finisher", "0/0"),
            ("debug_rbd", "0/0"),
            ("debug_objectcacher", "0/0"),
            ("rbd_cache", if spec.rbd_cache { "true" } else { "false" }),
        ];
        if let Some(k) = &spec.keyring {
            opts.push(("keyring", k));
        }
        if let Some(k) = &spec.key {
            opts.push(("key", k));
        }
        for (k, v) in &spec.conf_options {
            opts.push((k, v));
        }
        for (k, v) in opts {
            c.set(k, v)
                .map_err(|rc| fail(&format!("setting {k}"), rc))?;
        }
        Ok(c)
    }

    /// The value of configuration option `key` (metavariables such as `$cluster` and `$name`
    /// expanded).
    pub(crate) fn get(&self, key: &str) -> Result<String, Errno> {
        let k = name(key)?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: valid handle; `buf` is writable for its length, which is passed; librados
        // writes a NUL-terminated string or fails with -ENAMETOOLONG.
        let rc =
            unsafe { sys::rados_conf_get(self.h, k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        self::rc(rc)?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        buf.truncate(end);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    pub(crate) fn set(&self, key: &str, value: &str) -> Result<(), i32> {
        let k = CString::new(key).map_err(|_| -libc::EINVAL)?;
        let v = CString::new(value).map_err(|_| -libc::EINVAL)?;
        // SAFETY: valid handle, NUL-terminated strings that outlive the call.
        let rc = unsafe { sys::rados_conf_set(self.h, k.as_ptr(), v.as_ptr()) };
        if rc < 0 {
            Err(rc)
        } else {
            Ok(())
        }
    }

    /// An I/O context on the spec's pool and namespace.
    pub(crate) fn ioctx(&self, spec: &ImageSpec) -> Result<IoCtx, RadosError> {
        let ns = spec.namespace.as_deref().unwrap_or("");
        let name = match &spec.pool {
            PoolRef::Id(id) => return self.ioctx_by_id(*id, ns),
            PoolRef::Name(n) => n,
        };
        let p = cstr(name, "pool name")?;
        let mut io: sys::rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: valid handle; out-pointer to a local.
        let r = unsafe { sys::rados_ioctx_create(self.h, p.as_ptr(), &mut io) };
        IoCtx::made(r, io, name.clone(), ns)
    }
}

/// The files librados reads to reach a disk's cluster: what a sandboxed backend, which can
/// open none of them itself, gets from its broker ([`crate::sandbox::broker`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFiles {
    /// The ceph.conf read (the spec's `conf`, else the first of librados' default search
    /// that exists); `None` when there is none.
    pub conf: Option<std::path::PathBuf>,
    /// The keyring: the spec's `keyring`, else the first existing file of the `keyring`
    /// option's search list as the configuration sets it (librados'
    /// `ceph_resolve_file_search`).
    pub keyring: Option<std::path::PathBuf>,
    /// The `keyfile` option's file (a bare key), if set.
    pub keyfile: Option<std::path::PathBuf>,
}

/// librados' default search for a ceph.conf when none is named: `$CEPH_CONF`, else
/// `/etc/ceph/ceph.conf`, `~/.ceph/ceph.conf`, `./ceph.conf` (Ceph's
/// `CEPH_CONF_FILE_DEFAULT` for a client, cluster `ceph`).
fn default_conf() -> Option<std::path::PathBuf> {
    if let Some(c) = std::env::var_os("CEPH_CONF") {
        return Some(c.into());
    }
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    [
        Some(std::path::PathBuf::from("/etc/ceph/ceph.conf")),
        home.map(|h| h.join(".ceph/ceph.conf")),
        Some(std::path::PathBuf::from("ceph.conf")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file())
}

/// The first existing file of a search list (`,`, `;` or blanks between entries).
fn first_file(list: &str) -> Option<std::path::PathBuf> {
    list.split([',', ';', ' ', '\t'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
}

/// Which files opening `spec` would read, found as librados finds them: the configuration is
/// read (no connection is made) and the `keyring` and `keyfile` options asked for.
pub fn config_files(spec: &ImageSpec) -> Result<ConfigFiles, RadosError> {
    let conf = spec
        .conf
        .as_ref()
        .map(std::path::PathBuf::from)
        .or_else(default_conf);
    let mut s = spec.clone();
    s.conf = conf.as_ref().map(|p| p.display().to_string());
    let c = Cluster::configure(&s)?;
    let get = |key: &str| {
        c.get(key).map_err(|errno| RadosError::Connect {
            client: spec.client_id.clone(),
            what: format!("reading option {key}"),
            errno,
        })
    };
    let keyring = match &spec.keyring {
        Some(k) => Some(std::path::PathBuf::from(k)),
        None => first_file(&get("keyring")?),
    };
    let keyfile = Some(get("keyfile")?)
        .filter(|k| !k.trim().is_empty())
        .map(|k| std::path::PathBuf::from(k.trim()));
    Ok(ConfigFiles {
        conf,
        keyring,
        keyfile,
    })
}

/// A pool context (`rados_ioctx_t`).
#[derive(Debug)]
pub(crate) struct IoCtx {
    pub(crate) h: sys::rados_ioctx_t,
    /// For messages: the pool's name, and `/<namespace>` when one is set.
    pub(crate) pool: String,
    /// Synchronous calls' time limit in ms (0: none); see [`IoCtx::set_call_limit`].
    limit_ms: AtomicU64,
}

// SAFETY: librados ioctx handles are thread-safe for I/O.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: destroyed once, before the cluster shuts down.
        unsafe { sys::rados_ioctx_destroy(self.h) };
    }
}

impl Cluster {
    /// This client's global id (`client.<gid>`), as lockers and notifiers see it.
    pub(crate) fn instance_id(&self) -> u64 {
        // SAFETY: valid, connected handle.
        unsafe { sys::rados_get_instance_id(self.h) }
    }

    /// A context on pool `id` (and `namespace`), as parent references name them.
    pub(crate) fn ioctx_by_id(&self, id: i64, namespace: &str) -> Result<IoCtx, RadosError> {
        let mut io: sys::rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: valid handle; out-pointer to a local.
        let r = unsafe { sys::rados_ioctx_create2(self.h, id, &mut io) };
        IoCtx::made(r, io, format!("#{id}"), namespace)
    }

    /// This session's identity (its address and global id), if librados tells.
    pub(crate) fn identity(&self) -> Option<super::ClientIdentity> {
        let mut out: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: valid, connected handle; on success librados allocates the string with
        // strdup, freed below.
        let r = unsafe { sys::rados_getaddrs(self.h, &mut out) };
        if r < 0 || out.is_null() {
            return None;
        }
        // SAFETY: a NUL-terminated string librados just allocated.
        let addr = unsafe { std::ffi::CStr::from_ptr(out) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: allocated by strdup in librados, freed once.
        unsafe { libc::free(out.cast()) };
        Some(super::ClientIdentity {
            addr,
            gid: self.instance_id(),
            fenced: false,
        })
    }

    /// Fences every predecessor of `spec` not fenced yet (see `ImageSpec::predecessors`),
    /// each bounded by the spec's `control_timeout`.
    pub(crate) fn fence_predecessors(&self, spec: &ImageSpec) -> Result<(), RadosError> {
        if spec.fence_predecessors {
            for who in spec.predecessors.iter().filter(|p| !p.fenced) {
                self.fence(&who.addr, spec.control_timeout, &|| false)?;
                tracing::info!(addr = %who.addr, client = %who.entity(),
                               "fenced the previous backend's client (blocklisted)");
            }
        }
        Ok(())
    }

    /// Fences the client at `addr` (`ip:port/nonce`): blocklists it, then waits until this
    /// client has the OSD map that carries the blocklisting, so that none of the fenced
    /// client's operations still on the way can be applied after ours (librbd's lock
    /// breaking does the same two steps). This client's own address is refused (`EINVAL`):
    /// it never fences itself.
    ///
    /// librados bounds neither step: `rados_blocklist_add` waits for the latest OSD map after
    /// its monitor command, and that wait (`Objecter::wait_for_latest_osdmap`, a
    /// `MonClient::get_version` request) has no timeout of its own, whatever
    /// `rados_mon_op_timeout` says. So both run on a helper thread and the caller waits at
    /// most `limit`, or until `abandon` returns true (asked every 100 ms); either way it gets
    /// [`RadosError::TimedOut`] naming the step. The helper keeps the cluster handle alive
    /// until librados returns (for ever, if it never does: the handle is then leaked, never
    /// shut down under it), and a later fence waits for it rather than starting another.
    pub(crate) fn fence(
        &self,
        addr: &str,
        limit: Duration,
        abandon: &dyn Fn() -> bool,
    ) -> Result<(), RadosError> {
        let refused = |step: &'static str, errno| RadosError::Fence {
            addr: addr.to_owned(),
            step,
            errno: Errno(errno),
        };
        if self.identity().is_some_and(|me| me.addr == addr) {
            return Err(refused(FENCE_STEPS[0], -libc::EINVAL));
        }
        let a = CString::new(addr).map_err(|_| refused(FENCE_STEPS[0], -libc::EINVAL))?;
        let deadline = Instant::now() + limit;
        let timed_out = |job: &FenceJob| RadosError::TimedOut {
            what: format!("fencing client {} ({})", job.addr, job.step_name()),
            secs: limit.as_secs(),
        };
        let earlier = lock(&self.fence_job).clone();
        if let Some(job) = earlier {
            match job.wait(deadline, abandon) {
                // the same fence, done meanwhile (a retry after a time-out)
                Some(0) if job.addr == addr => return Ok(()),
                Some(_) => {}
                None => return Err(timed_out(&job)),
            }
        }
        let job = Arc::new(FenceJob {
            addr: addr.to_owned(),
            step: AtomicU8::new(0),
            done: Waiter::default(),
        });
        *lock(&self.fence_job) = Some(Arc::clone(&job));
        let (j, life) = (Arc::clone(&job), Arc::clone(&self.life));
        std::thread::Builder::new()
            .name("rbd-fence".into())
            .spawn(move || {
                // SAFETY: the handle is connected and stays valid while `life` is held (it
                // is shut down only when its last holder goes); librados only reads the
                // string, which lives until the call returns.
                let mut r = unsafe { sys::rados_blocklist_add(life.0, a.as_ptr().cast_mut(), 0) };
                if r >= 0 {
                    j.step.store(1, Ordering::Release);
                    // SAFETY: as above.
                    r = unsafe { sys::rados_wait_for_latest_osdmap(life.0) };
                }
                j.done.finish(r);
            })
            .map_err(RadosError::Sys)?;
        match job.wait(deadline, abandon) {
            Some(r) if r >= 0 => Ok(()),
            Some(r) => Err(refused(job.step_name(), r)),
            None => Err(timed_out(&job)),
        }
    }

    /// The name of pool `id` (from the client's map).
    pub(crate) fn pool_name(&self, id: i64) -> Result<String, Errno> {
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: valid handle; the buffer and its length are passed.
            let r = unsafe {
                sys::rados_pool_reverse_lookup(self.h, id, buf.as_mut_ptr().cast(), buf.len())
            };
            if r == -libc::ERANGE && buf.len() < 65536 {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            let n = usize::try_from(rc(r)?).unwrap_or(0).min(buf.len());
            let name = buf[..n].split(|b| *b == 0).next().unwrap_or_default();
            return Ok(String::from_utf8_lossy(name).into_owned());
        }
    }

    /// Sends a command (JSON) to the monitors and returns their output (bounded by
    /// `rados_mon_op_timeout`).
    pub(crate) fn mon_command(&self, cmd: &str) -> Result<String, Errno> {
        self.command(sys::rados_mon_command, cmd)
    }

    /// Sends a command (JSON) to the active manager and returns its output (bounded by
    /// `rados_mon_op_timeout`).
    pub(crate) fn mgr_command(&self, cmd: &str) -> Result<String, Errno> {
        self.command(sys::rados_mgr_command, cmd)
    }

    fn command(&self, call: CommandFn, cmd: &str) -> Result<String, Errno> {
        let c = name(cmd)?;
        let cmds = [c.as_ptr()];
        let (mut out, mut out_len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
        let (mut st, mut st_len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
        // SAFETY: valid handle; one command string that outlives the call; out-pointers to
        // locals; librados allocates the outputs, freed below.
        let r = unsafe {
            call(
                self.h,
                cmds.as_ptr().cast_mut(),
                1,
                std::ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut st,
                &mut st_len,
            )
        };
        let text = if out.is_null() {
            String::new()
        } else {
            // SAFETY: librados allocated `out_len` bytes at `out`.
            let v = unsafe { std::slice::from_raw_parts(out.cast::<u8>(), out_len) };
            let t = String::from_utf8_lossy(v).into_owned();
            // SAFETY: freed once, as librados asks.
            unsafe { sys::rados_buffer_free(out) };
            t
        };
        if !st.is_null() {
            // SAFETY: as above, for the status string.
            unsafe { sys::rados_buffer_free(st) };
        }
        rc(r)?;
        Ok(text)
    }
}

impl IoCtx {
    /// Wraps what `rados_ioctx_create{,2}` returned and sets the namespace.
    fn made(
        r: i32,
        io: sys::rados_ioctx_t,
        pool: String,
        namespace: &str,
    ) -> Result<IoCtx, RadosError> {
        if r == -libc::ENOENT {
            return Err(RadosError::NoPool(pool));
        }
        if r < 0 {
            return Err(RadosError::Call {
                what: "rados_ioctx_create",
                errno: Errno(r),
            });
        }
        // the name errors show: `pool` or `pool/namespace`
        let pool = if namespace.is_empty() {
            pool
        } else {
            format!("{pool}/{namespace}")
        };
        let ctx = IoCtx {
            h: io,
            pool,
            limit_ms: AtomicU64::new(0),
        };
        let ns = cstr(namespace, "namespace")?;
        // SAFETY: valid ioctx; the string is copied by librados.
        unsafe { sys::rados_ioctx_set_namespace(ctx.h, ns.as_ptr()) };
        Ok(ctx)
    }

    /// A second context on the same pool and namespace (own snapshot read/write settings).
    pub(crate) fn dup(&self, cluster: &Cluster) -> Result<IoCtx, RadosError> {
        let mut io = cluster.ioctx_by_id(self.pool_id(), &self.namespace())?;
        io.pool = self.pool.clone();
        Ok(io)
    }

    /// Whether object `oid` exists (errors count as no).
    pub(crate) fn exists(&self, oid: &str) -> bool {
        let Ok(o) = name(oid) else { return false };
        let (mut size, mut mtime) = (0u64, 0 as libc::time_t);
        // SAFETY: valid ioctx; out-pointers to locals; synchronous.
        unsafe { sys::rados_stat(self.h, o.as_ptr(), &mut size, &mut mtime) >= 0 }
    }

    /// Pool id.
    pub(crate) fn pool_id(&self) -> i64 {
        // SAFETY: valid ioctx.
        unsafe { sys::rados_ioctx_get_id(self.h) }
    }

    /// Namespace ("" for the default).
    pub(crate) fn namespace(&self) -> String {
        let mut buf = [0u8; 256];
        // SAFETY: valid ioctx; the buffer and its length are passed.
        let r = unsafe { sys::rados_ioctx_get_namespace(self.h, buf.as_mut_ptr().cast(), 256) };
        let n = usize::try_from(r).unwrap_or(0).min(buf.len());
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Calls `cls.method` on `oid` as a read and returns its output (bounded by the
    /// context's call limit: `ETIMEDOUT` past it).
    pub(crate) fn exec(
        &self,
        oid: &str,
        cls: &str,
        method: &str,
        input: &[u8],
    ) -> Result<Vec<u8>, Errno> {
        let (o, c, m) = (name(oid)?, name(cls)?, name(method)?);
        /// What librados writes when the operation completes.
        struct Out {
            data: *mut c_char,
            len: usize,
            prval: i32,
        }
        let out = Box::into_raw(Box::new(Out {
            data: std::ptr::null_mut(),
            len: 0,
            prval: 0,
        }));
        // SAFETY: creates an op released below once librados is done with it.
        let op = unsafe { sys::rados_create_read_op() };
        // SAFETY: `out` is a live allocation; only a field's address is taken.
        let data = unsafe { &raw mut (*out).data };
        // SAFETY: as above.
        let len = unsafe { &raw mut (*out).len };
        // SAFETY: as above.
        let prval = unsafe { &raw mut (*out).prval };
        // SAFETY: valid op; librados copies the input and the names; the out-pointers point
        // into `out`, which stays allocated until the operation is settled (leaked if not).
        unsafe {
            sys::rados_read_op_exec(
                op,
                c.as_ptr(),
                m.as_ptr(),
                input.as_ptr().cast(),
                input.len(),
                data,
                len,
                prval,
            )
        };
        let called = call_bounded(self, |comp| {
            // SAFETY: valid op, ioctx and completion; the op lives until settled.
            unsafe { sys::rados_aio_read_op_operate(op, self.h, comp, o.as_ptr(), 0) }
        });
        if matches!(called, Err(Called::Unsettled)) {
            // librados may still write the outputs: they, and the op, are never freed
            return Err(Errno(-libc::ETIMEDOUT));
        }
        // SAFETY: settled: librados no longer touches `out` or the op; both freed once here.
        let out = unsafe { Box::from_raw(out) };
        let data = if out.data.is_null() {
            Vec::new()
        } else {
            // SAFETY: librados allocated `len` bytes at `data`.
            let v = unsafe { std::slice::from_raw_parts(out.data.cast::<u8>(), out.len) }.to_vec();
            // SAFETY: freed once, as librados asks.
            unsafe { sys::rados_buffer_free(out.data) };
            v
        };
        // SAFETY: as above.
        unsafe { sys::rados_release_read_op(op) };
        rc(called.map_err(|c| Errno(c.errno()))?)?;
        rc(out.prval)?;
        Ok(data)
    }

    /// Calls `cls.method` on `oid` as a write (class methods that modify the object).
    pub(crate) fn exec_write(
        &self,
        oid: &str,
        cls: &str,
        method: &str,
        input: &[u8],
    ) -> Result<(), Errno> {
        let op = WriteOp::new();
        op.exec(cls, method, input)?;
        op.operate(self, oid)
    }

    /// Limits every later synchronous call through this context ([`Self::exec`],
    /// [`Self::exec_write`], [`Self::watch`], [`Self::unwatch`]) to `limit` (`None`: as long
    /// as the cluster takes).
    pub(crate) fn set_call_limit(&self, limit: Option<Duration>) {
        let ms = limit.map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.limit_ms.store(ms, Ordering::Relaxed);
    }

    fn call_limit(&self) -> Option<Duration> {
        match self.limit_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Sets the snapshot reads come from (`NOSNAP` for the head).
    pub(crate) fn set_read_snap(&self, snap: u64) {
        // SAFETY: valid ioctx.
        unsafe { sys::rados_ioctx_snap_set_read(self.h, snap) };
    }

    /// Sets the snapshot context writes carry (`snaps` newest first).
    pub(crate) fn set_write_ctx(&self, seq: u64, snaps: &[u64]) -> Result<(), Errno> {
        let mut v: Vec<u64> = snaps.to_vec();
        let n = i32::try_from(v.len()).map_err(|_| Errno(-libc::EINVAL))?;
        // SAFETY: valid ioctx; librados copies the array.
        rc(unsafe {
            sys::rados_ioctx_selfmanaged_snap_set_write_ctx(self.h, seq, v.as_mut_ptr(), n)
        })
        .map(|_| ())
    }

    /// Acknowledges notify `notify_id` received through watch `cookie`, with `payload`.
    pub(crate) fn notify_ack(
        &self,
        oid: &str,
        notify_id: u64,
        cookie: u64,
        payload: &[u8],
    ) -> Result<(), Errno> {
        let o = name(oid)?;
        let len = i32::try_from(payload.len()).map_err(|_| Errno(-libc::EINVAL))?;
        // SAFETY: valid ioctx; librados copies the payload.
        rc(unsafe {
            sys::rados_notify_ack(
                self.h,
                o.as_ptr(),
                notify_id,
                cookie,
                payload.as_ptr().cast(),
                len,
            )
        })
        .map(|_| ())
    }

    /// Starts watching `oid`; events go to `sink` until [`Self::unwatch`] (bounded like
    /// [`Self::exec`]; a registration that times out is torn down).
    pub(crate) fn watch(&self, oid: &str, sink: &Arc<WatchSink>) -> Result<u64, Errno> {
        let o = name(oid)?;
        // librados writes the handle at submission; boxed so that it outlives a registration
        // that did not settle
        let cookie = Box::into_raw(Box::new(0u64));
        // One strong reference is leaked per watch and kept for the life of the process: the
        // watch callback may still run briefly after unwatch (librados flushes callbacks
        // asynchronously), so the sink must never be freed under it.
        let arg = Arc::into_raw(Arc::clone(sink)).cast_mut().cast::<c_void>();
        let called = call_bounded(self, |comp| {
            // SAFETY: valid ioctx and completion; the callbacks only read `arg`, which stays
            // valid (leaked above); `cookie` stays allocated until settled (leaked if not).
            unsafe {
                sys::rados_aio_watch2(
                    self.h,
                    o.as_ptr(),
                    comp,
                    cookie,
                    Some(on_watch),
                    Some(on_watch_error),
                    0,
                    arg,
                )
            }
        });
        // SAFETY: librados set the handle when the registration was submitted.
        let handle = unsafe { *cookie };
        match called {
            Ok(r) if r >= 0 => {
                // SAFETY: settled: freed once.
                drop(unsafe { Box::from_raw(cookie) });
                Ok(handle)
            }
            Ok(r) | Err(Called::Refused(r)) => {
                // SAFETY: settled (or never submitted), and no watch was registered: no
                // callback holds `arg` and librados is done with `cookie`; each reclaimed once.
                drop(unsafe { Arc::from_raw(arg.cast_const().cast::<WatchSink>()) });
                // SAFETY: as above.
                drop(unsafe { Box::from_raw(cookie) });
                Err(Errno(r))
            }
            Err(c) => {
                // not registered in time: tear the half-made watch down (the sink and the
                // handle's box stay, librados may still use them)
                if handle != 0 {
                    fire_and_forget(|comp| {
                        // SAFETY: valid ioctx; librados looks the handle up.
                        unsafe { sys::rados_aio_unwatch(self.h, handle, comp) }
                    });
                }
                Err(Errno(c.errno()))
            }
        }
    }

    /// Stops watch `cookie` (bounded like [`Self::exec`]).
    pub(crate) fn unwatch(&self, cookie: u64) -> Result<(), Errno> {
        let r = call_bounded(self, |comp| {
            // SAFETY: valid ioctx; an unknown cookie is reported as an error by librados.
            unsafe { sys::rados_aio_unwatch(self.h, cookie, comp) }
        });
        rc(r.map_err(|c| Errno(c.errno()))?).map(|_| ())
    }

    /// Sends `payload` to `oid`'s watchers; the reply arrives as `token` on `sink`
    /// ([`AioDone::reply`] holds the encoded acks).
    pub(crate) fn aio_notify(
        &self,
        oid: &str,
        payload: &[u8],
        timeout_ms: u64,
        sink: &Arc<AioSink>,
        token: u64,
    ) -> Result<(), Errno> {
        let o = name(oid)?;
        let len = i32::try_from(payload.len()).map_err(|_| Errno(-libc::EINVAL))?;
        submit_aio(sink, token, |comp, ctx| {
            // SAFETY: `ctx` stays valid until the callback reclaims it, which cannot happen
            // before this call returns: the reply out-pointers live inside it.
            let reply = unsafe { &raw mut (*ctx).reply };
            // SAFETY: as above.
            let reply_len = unsafe { &raw mut (*ctx).reply_len };
            // SAFETY: as above; librados copies the payload.
            unsafe {
                sys::rados_aio_notify(
                    self.h,
                    o.as_ptr(),
                    comp,
                    payload.as_ptr().cast(),
                    len,
                    timeout_ms,
                    reply,
                    reply_len,
                )
            }
        })
    }

    /// Asks whether `oid` exists: 0 (it does) or -errno (`-ENOENT`: it does not) arrives as
    /// `token`.
    pub(crate) fn aio_stat(&self, oid: &str, sink: &Arc<AioSink>, token: u64) -> Result<(), Errno> {
        let o = name(oid)?;
        submit_aio(sink, token, |comp, ctx| {
            // SAFETY: `ctx` stays valid until the callback reclaims it, after librados wrote
            // the size and time out-slots that live inside it.
            let size = unsafe { &raw mut (*ctx).stat_size };
            // SAFETY: as above.
            let mtime = unsafe { &raw mut (*ctx).stat_mtime };
            // SAFETY: valid ioctx and completion; librados copies the object name.
            unsafe { sys::rados_aio_stat(self.h, o.as_ptr(), comp, size, mtime) }
        })
    }

    /// Reads up to `len` bytes at `off` of `oid` into `buf`; the byte count (or -errno)
    /// arrives as `token`.
    ///
    /// # Safety
    /// `buf` must stay valid for writes of `len` bytes, and untouched, until the token has
    /// come back from `sink`.
    pub(crate) unsafe fn aio_read(
        &self,
        oid: &str,
        buf: *mut u8,
        len: usize,
        off: u64,
        sink: &Arc<AioSink>,
        token: u64,
    ) -> Result<(), Errno> {
        let o = name(oid)?;
        submit_aio(sink, token, |comp, _| {
            // SAFETY: the caller keeps `buf` valid and unaliased until the token returns.
            unsafe { sys::rados_aio_read(self.h, o.as_ptr(), comp, buf.cast(), len, off) }
        })
    }
}

/// How long a control-path call (class calls on the header, lock requests, watch
/// registration) may go unanswered once an image is open: past it the call fails with
/// `ETIMEDOUT`, is reported, and the caller retries; nothing waits on a silent OSD for ever.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a timed-out call's cancellation may take to settle before its memory is leaked.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// The two steps of a fence, for messages.
const FENCE_STEPS: [&str; 2] = [
    "blocklisting it",
    "waiting for the OSD map that carries its blocklisting",
];

/// A fence running on its helper thread ([`Cluster::fence`]).
struct FenceJob {
    addr: String,
    /// Which of [`FENCE_STEPS`] it is in.
    step: AtomicU8,
    done: Waiter,
}

impl std::fmt::Debug for FenceJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceJob")
            .field("addr", &self.addr)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl FenceJob {
    fn step_name(&self) -> &'static str {
        let [blocklisting, waiting] = FENCE_STEPS;
        if self.step.load(Ordering::Acquire) == 0 {
            blocklisting
        } else {
            waiting
        }
    }

    /// Its result, once it finished by `deadline` and before `abandon` said to stop waiting.
    fn wait(&self, deadline: Instant, abandon: &dyn Fn() -> bool) -> Option<i32> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(r) = self.done.wait(Some(left.min(Duration::from_millis(100)))) {
                return Some(r);
            }
            if left.is_zero() || abandon() {
                return None;
            }
        }
    }
}

/// A synchronous call's completion, signalled from librados' finisher thread (or a helper
/// thread).
#[derive(Default)]
struct Waiter {
    rv: Mutex<Option<i32>>,
    cv: Condvar,
}

impl Waiter {
    /// Records the result and wakes the waiters.
    fn finish(&self, rv: i32) {
        *lock(&self.rv) = Some(rv);
        self.cv.notify_all();
    }

    /// The operation's result, once it completed within `limit` (`None`: no limit).
    fn wait(&self, limit: Option<Duration>) -> Option<i32> {
        let deadline = limit.map(|l| Instant::now() + l);
        let mut rv = lock(&self.rv);
        loop {
            if let Some(r) = *rv {
                return Some(r);
            }
            rv = match deadline {
                None => self.cv.wait(rv).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.cv
                        .wait_timeout(rv, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

extern "C" fn on_waiter(comp: sys::rados_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the reference leaked for this callback at submission, reclaimed once.
    let w = unsafe { Arc::from_raw(arg.cast_const().cast::<Waiter>()) };
    // SAFETY: `comp` is this callback's completion (released by the caller, not here).
    let rv = unsafe { sys::rados_aio_get_return_value(comp) };
    w.finish(rv);
}

/// How a bounded call failed to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Called {
    /// It could not be submitted (the error).
    Refused(i32),
    /// It timed out and its cancellation settled: librados is done with its memory.
    TimedOut,
    /// It timed out and librados may still touch its memory: the caller leaks it.
    Unsettled,
}

impl Called {
    fn errno(self) -> i32 {
        match self {
            Called::Refused(e) => e,
            Called::TimedOut | Called::Unsettled => -libc::ETIMEDOUT,
        }
    }
}

/// Runs one asynchronous operation (`start` submits it with the completion given) and waits
/// for it, at most `io`'s call limit. On time out the operation is cancelled
/// (`rados_aio_cancel`: librados stops waiting for it; an OSD may still apply a write already
/// sent, so only idempotent control calls come here) and the cancellation awaited briefly.
/// Returns librados' result.
fn call_bounded(
    io: &IoCtx,
    start: impl FnOnce(sys::rados_completion_t) -> i32,
) -> Result<i32, Called> {
    let w = Arc::new(Waiter::default());
    let arg = Arc::into_raw(Arc::clone(&w)).cast_mut().cast::<c_void>();
    let mut comp: sys::rados_completion_t = std::ptr::null_mut();
    // SAFETY: `arg` is reclaimed exactly once: by the callback, or below when none will run.
    let r = unsafe { sys::rados_aio_create_completion2(arg, Some(on_waiter), &mut comp) };
    if r < 0 {
        // SAFETY: no completion, no callback: reclaim the reference.
        drop(unsafe { Arc::from_raw(arg.cast_const().cast::<Waiter>()) });
        return Err(Called::Refused(r));
    }
    let r = start(comp);
    if r < 0 {
        // SAFETY: not submitted, so no callback will run: release and reclaim, once each.
        unsafe { sys::rados_aio_release(comp) };
        // SAFETY: as above.
        drop(unsafe { Arc::from_raw(arg.cast_const().cast::<Waiter>()) });
        return Err(Called::Refused(r));
    }
    if let Some(rv) = w.wait(io.call_limit()) {
        // SAFETY: complete: released once.
        unsafe { sys::rados_aio_release(comp) };
        return Ok(rv);
    }
    // SAFETY: valid ioctx and completion (not released yet).
    unsafe { sys::rados_aio_cancel(io.h, comp) };
    if w.wait(Some(CANCEL_WAIT)).is_some() {
        // SAFETY: complete (cancelled): released once.
        unsafe { sys::rados_aio_release(comp) };
        Err(Called::TimedOut)
    } else {
        // SAFETY: releasing an unfinished completion only drops our reference: librados keeps
        // it until the operation ends (the callback still reclaims its own reference).
        unsafe { sys::rados_aio_release(comp) };
        Err(Called::Unsettled)
    }
}

/// Starts an operation nobody waits for (its completion is released at once: librados keeps it
/// until the operation ends).
fn fire_and_forget(start: impl FnOnce(sys::rados_completion_t) -> i32) {
    let mut comp: sys::rados_completion_t = std::ptr::null_mut();
    // SAFETY: no callback, no argument; out-pointer to a local.
    let r = unsafe { sys::rados_aio_create_completion2(std::ptr::null_mut(), None, &mut comp) };
    if r >= 0 {
        let _ = start(comp);
        // SAFETY: released once; librados holds its own reference while the operation runs.
        unsafe { sys::rados_aio_release(comp) };
    }
}

/// Write operations go out with `LIBRADOS_OPERATION_FULL_TRY`: when the cluster is full, or
/// the pool's quota reached, the OSD answers `ENOSPC` / `EDQUOT` at once instead of librados
/// holding the operation until space returns (its default, and what would leave a guest's
/// writes hanging without a word). Deletes still free space; everything works again by
/// itself once the pool has room.
const FULL_TRY: i32 = sys::LIBRADOS_OPERATION_FULL_TRY as i32;

/// A compound write operation (`rados_write_op_t`), released on drop.
#[derive(Debug)]
pub(crate) struct WriteOp {
    h: sys::rados_write_op_t,
}

// SAFETY: a write op is plain data owned by one thread at a time (built, then handed to
// librados, then released after its completion by the owner).
unsafe impl Send for WriteOp {}

impl WriteOp {
    pub(crate) fn new() -> WriteOp {
        // SAFETY: creates an op released in Drop.
        let h = unsafe { sys::rados_create_write_op() };
        WriteOp { h }
    }

    /// Fails the whole operation with ENOENT if the object does not exist.
    pub(crate) fn assert_exists(&self) {
        // SAFETY: valid op.
        unsafe { sys::rados_write_op_assert_exists(self.h) }
    }

    /// Creates the object (not exclusive).
    pub(crate) fn create(&self) {
        // SAFETY: valid op.
        unsafe { sys::rados_write_op_create(self.h, 0, std::ptr::null()) }
    }

    /// Writes `data` at `off` (copied).
    pub(crate) fn write(&self, data: &[u8], off: u64) {
        // SAFETY: valid op; librados copies the data.
        unsafe { sys::rados_write_op_write(self.h, data.as_ptr().cast(), data.len(), off) }
    }

    /// Replaces the whole object with `data` (copied).
    pub(crate) fn write_full(&self, data: &[u8]) {
        // SAFETY: valid op; librados copies the data.
        unsafe { sys::rados_write_op_write_full(self.h, data.as_ptr().cast(), data.len()) }
    }

    /// Removes the object.
    pub(crate) fn remove(&self) {
        // SAFETY: valid op.
        unsafe { sys::rados_write_op_remove(self.h) }
    }

    /// Truncates the object to `off`.
    pub(crate) fn truncate(&self, off: u64) {
        // SAFETY: valid op.
        unsafe { sys::rados_write_op_truncate(self.h, off) }
    }

    /// Zeroes `len` bytes at `off` (a hole where the store supports it).
    pub(crate) fn zero(&self, off: u64, len: u64) {
        // SAFETY: valid op.
        unsafe { sys::rados_write_op_zero(self.h, off, len) }
    }

    /// Calls a class method (input copied).
    pub(crate) fn exec(&self, cls: &str, method: &str, input: &[u8]) -> Result<(), Errno> {
        let (c, m) = (name(cls)?, name(method)?);
        // SAFETY: valid op; librados copies the names and the input; no return-value slot.
        unsafe {
            sys::rados_write_op_exec(
                self.h,
                c.as_ptr(),
                m.as_ptr(),
                input.as_ptr().cast(),
                input.len(),
                std::ptr::null_mut(),
            )
        };
        Ok(())
    }

    /// Submits the operation on `io` with completion `comp`; librados' result.
    ///
    /// # Safety
    /// `comp` must be a fresh completion, and the op must stay alive (unreleased) until the
    /// operation has completed.
    unsafe fn start(&self, io: &IoCtx, oid: &CString, comp: sys::rados_completion_t) -> i32 {
        // SAFETY: valid op and ioctx; the caller keeps the op alive; NULL mtime = now.
        unsafe {
            sys::rados_aio_write_op_operate(
                self.h,
                io.h,
                comp,
                oid.as_ptr(),
                std::ptr::null_mut(),
                FULL_TRY,
            )
        }
    }

    /// Runs the operation synchronously (bounded by the context's call limit).
    pub(crate) fn operate(self, io: &IoCtx, oid: &str) -> Result<(), Errno> {
        let o = name(oid)?;
        // SAFETY: the op is kept until settled (forgotten below if it is not).
        let called = call_bounded(io, |comp| unsafe { self.start(io, &o, comp) });
        if matches!(called, Err(Called::Unsettled)) {
            // librados may still read the op: never release it
            std::mem::forget(self);
        }
        rc(called.map_err(|c| Errno(c.errno()))?).map(|_| ())
    }

    /// Starts the operation; its result arrives as `token` on `sink`. The op must be kept
    /// (not dropped) until then.
    pub(crate) fn aio_operate(
        &self,
        io: &IoCtx,
        oid: &str,
        sink: &Arc<AioSink>,
        token: u64,
    ) -> Result<(), Errno> {
        let o = name(oid)?;
        // SAFETY: the caller keeps the op until its completion came back.
        submit_aio(sink, token, |comp, _| unsafe { self.start(io, &o, comp) })
    }
}

impl Drop for WriteOp {
    fn drop(&mut self) {
        // SAFETY: released once; owners drop it only after its completion (or unused).
        unsafe { sys::rados_release_write_op(self.h) }
    }
}

/// A finished asynchronous operation.
#[derive(Debug)]
pub(crate) struct AioDone {
    /// The token given at submission.
    pub token: u64,
    /// librados' return value (bytes read, 0, or -errno).
    pub rv: i64,
    /// A notify's encoded reply (acks and timeouts).
    pub reply: Vec<u8>,
}

/// Where a queue's (or the control thread's) completions land.
pub(crate) type AioSink = Sink<AioDone>;

struct AioCtx {
    token: u64,
    sink: Arc<AioSink>,
    reply: *mut c_char,
    reply_len: usize,
    /// A stat's out-slots (librados writes them before the callback runs).
    stat_size: u64,
    stat_mtime: libc::time_t,
}

/// Starts one asynchronous operation whose completion goes to `sink` as `token`: `start`
/// gets the completion and the boxed context (owned by the callback from then on) and returns
/// librados' result. On failure no callback will run, so the completion is released and the
/// context reclaimed here — the one place that protocol lives.
fn submit_aio(
    sink: &Arc<AioSink>,
    token: u64,
    start: impl FnOnce(sys::rados_completion_t, *mut AioCtx) -> i32,
) -> Result<(), Errno> {
    let raw = Box::into_raw(Box::new(AioCtx {
        token,
        sink: Arc::clone(sink),
        reply: std::ptr::null_mut(),
        reply_len: 0,
        stat_size: 0,
        stat_mtime: 0,
    }));
    let mut comp: sys::rados_completion_t = std::ptr::null_mut();
    // SAFETY: `raw` is a leaked box reclaimed exactly once, by the callback or below.
    let r = unsafe { sys::rados_aio_create_completion2(raw.cast(), Some(on_aio), &mut comp) };
    if r < 0 {
        // SAFETY: no completion exists, so no callback will run: reclaim the box.
        drop(unsafe { Box::from_raw(raw) });
        return Err(Errno(r));
    }
    let r = start(comp, raw);
    if r < 0 {
        // SAFETY: the submission failed, so librados will not call back: release the
        // completion and reclaim the box, once each.
        unsafe { sys::rados_aio_release(comp) };
        // SAFETY: as above.
        drop(unsafe { Box::from_raw(raw) });
        return Err(Errno(r));
    }
    Ok(())
}

/// Completion callback (librados thread): hand over token and result, nothing more.
extern "C" fn on_aio(comp: sys::rados_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the box leaked at submission, reclaimed only here (called once).
    let ctx = unsafe { Box::from_raw(arg.cast::<AioCtx>()) };
    // SAFETY: `comp` is this callback's completion; released once, here.
    let rv = i64::from(unsafe { sys::rados_aio_get_return_value(comp) });
    // SAFETY: as above.
    unsafe { sys::rados_aio_release(comp) };
    let reply = if ctx.reply.is_null() {
        Vec::new()
    } else {
        // SAFETY: librados allocated `reply_len` bytes for the notify reply.
        let v =
            unsafe { std::slice::from_raw_parts(ctx.reply.cast::<u8>(), ctx.reply_len) }.to_vec();
        // SAFETY: freed once, as librados asks.
        unsafe { sys::rados_buffer_free(ctx.reply) };
        v
    };
    ctx.sink.push(AioDone {
        token: ctx.token,
        rv,
        reply,
    });
}

/// A watch event.
#[derive(Debug)]
pub(crate) enum WatchEvent {
    /// A notify: ack it with [`IoCtx::notify_ack`].
    Notify {
        /// Notify id.
        notify_id: u64,
        /// The watch it came through.
        cookie: u64,
        /// The notifier's global id.
        notifier: u64,
        /// Payload.
        data: Vec<u8>,
    },
    /// The watch broke (re-register it).
    Error {
        /// The watch.
        cookie: u64,
        /// -errno.
        err: i32,
    },
}

/// Where watch events land.
pub(crate) type WatchSink = Sink<WatchEvent>;

extern "C" fn on_watch(
    arg: *mut c_void,
    notify_id: u64,
    cookie: u64,
    notifier: u64,
    data: *mut c_void,
    len: usize,
) {
    // SAFETY: `arg` is the sink leaked in `watch` (never freed).
    let sink = unsafe { &*arg.cast_const().cast::<WatchSink>() };
    let data = if data.is_null() || len == 0 {
        Vec::new()
    } else {
        // SAFETY: librados passes `len` readable bytes valid for this call.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }.to_vec()
    };
    sink.push(WatchEvent::Notify {
        notify_id,
        cookie,
        notifier,
        data,
    });
}

extern "C" fn on_watch_error(arg: *mut c_void, cookie: u64, err: i32) {
    // SAFETY: `arg` is the sink leaked in `watch` (never freed).
    let sink = unsafe { &*arg.cast_const().cast::<WatchSink>() };
    sink.push(WatchEvent::Error { cookie, err });
}

#[cfg(test)]
mod tests {
    #[test]
    fn monitor_json_is_written_and_read() {
        use super::{json_field, json_string};
        assert_eq!(json_string("a\"b\\c\n"), r#""a\"b\\c\u000a""#);
        let j = r#"{"epoch":19,"pool":"rbd","pgid":"2.2","up":[0],"acting_primary":0}"#;
        assert_eq!(json_field(j, "pgid"), Some("2.2"));
        assert_eq!(json_field(j, "acting_primary"), Some("0"));
        assert_eq!(json_field(j, "epoch"), Some("19"));
        assert_eq!(json_field(j, "missing"), None);
    }
}

/// Fault tests on the private cluster `target/ceph-faults` (one at a time with the other
/// fault tests: see `.config/nextest.toml`).
#[cfg(test)]
mod faults {
    use std::time::{Duration, Instant};

    use super::Cluster;
    use crate::rados::testing::{private_cluster, Revive, MON};
    use crate::rados::RadosError;

    /// With the monitor frozen, a fence ends by its bound with the step named (librados
    /// bounds neither the blocklist command's wait for the latest OSD map nor that wait
    /// alone); a second fence meanwhile waits for the first instead of starting another;
    /// once the monitor answers again the fence completes.
    #[test]
    fn a_fence_without_monitors_ends_by_its_bound() {
        let c = private_cluster("faults");
        let _revive = Revive(c);
        let cluster = Cluster::connect(&c.spec("none")).unwrap();
        let addr = format!("127.0.0.1:1/{}", std::process::id());
        c.daemon("stop", MON);
        let t = Instant::now();
        let e = cluster
            .fence(&addr, Duration::from_secs(2), &|| false)
            .unwrap_err();
        let took = t.elapsed();
        assert!(took < Duration::from_secs(4), "took {took:?}");
        assert!(matches!(e, RadosError::TimedOut { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains(&format!("fencing client {addr} (blocklisting it)")),
            "{e}"
        );
        // a stop request ends the wait at once
        let t = Instant::now();
        cluster
            .fence(&addr, Duration::from_secs(30), &|| true)
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        c.daemon("cont", MON);
        cluster
            .fence(&addr, Duration::from_secs(60), &|| false)
            .unwrap();
        let listed = c.ceph(&["osd", "blocklist", "ls"]);
        assert!(listed.contains(&addr), "{listed}");
        c.ceph(&["osd", "blocklist", "rm", &addr]);
    }
}
