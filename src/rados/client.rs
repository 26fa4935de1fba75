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
use std::sync::Arc;

use super::sys;
use super::{Errno, ImageSpec, PoolRef, RadosError, Sink};

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

/// A cluster handle (`rados_t`), shut down on drop.
#[derive(Debug)]
pub(crate) struct Cluster {
    h: sys::rados_t,
}

// SAFETY: a rados_t is internally synchronised and documented as usable from many threads.
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
            return Err(RadosError::Connect {
                client: spec.client_id.clone(),
                what: "rados_connect".to_owned(),
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
        let c = Cluster { h };
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

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: shut down once; every ioctx and image made from it is dropped first (they
        // are fields declared before the cluster in LibrbdImage).
        unsafe { sys::rados_shutdown(self.h) };
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

    /// Fences every predecessor of `spec` not fenced yet (see `ImageSpec::predecessors`).
    pub(crate) fn fence_predecessors(&self, spec: &ImageSpec) -> Result<(), RadosError> {
        if spec.fence_predecessors {
            for who in spec.predecessors.iter().filter(|p| !p.fenced) {
                self.fence(who)?;
            }
        }
        Ok(())
    }

    /// Fences a dead predecessor: blocklists its address, then waits for the OSD map that
    /// says so, so that none of its operations still on the way can be applied after ours.
    pub(crate) fn fence(&self, who: &super::ClientIdentity) -> Result<(), RadosError> {
        self.blocklist_add(&who.addr, 0)
            .map_err(|errno| RadosError::Call {
                what: "blocklisting the previous backend's client",
                errno,
            })?;
        // SAFETY: valid, connected handle; blocks until the latest map arrived (bounded by
        // the mon op timeout set at connect).
        rc(unsafe { sys::rados_wait_for_latest_osdmap(self.h) }).map_err(|errno| {
            RadosError::Call {
                what: "waiting for the OSD map that fences the previous backend",
                errno,
            }
        })?;
        tracing::info!(addr = %who.addr, client = %who.entity(), "fenced the previous backend's client (blocklisted)");
        Ok(())
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
        let c = name(cmd)?;
        let cmds = [c.as_ptr()];
        let (mut out, mut out_len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
        let (mut st, mut st_len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
        // SAFETY: valid handle; one command string that outlives the call; out-pointers to
        // locals; librados allocates the outputs, freed below.
        let r = unsafe {
            sys::rados_mon_command(
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

    /// Blocklists a client address (`ip:port/nonce`) for `secs` seconds (0: the default).
    pub(crate) fn blocklist_add(&self, addr: &str, secs: u32) -> Result<(), Errno> {
        let a = name(addr)?;
        // SAFETY: valid handle; librados only reads the string.
        rc(unsafe { sys::rados_blocklist_add(self.h, a.as_ptr().cast_mut(), secs) }).map(|_| ())
    }
}

/// The holders of a `cls_lock` lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Lockers {
    /// Exclusive (not shared).
    pub exclusive: bool,
    /// The lock's tag (`internal` for librbd's exclusive lock).
    pub tag: String,
    /// (client `client.<gid>`, cookie, address) per holder.
    pub holders: Vec<(String, String, String)>,
}

/// The first `n` NUL-terminated strings of `buf[..len]` (empty ones included: the object
/// map's lock has an empty cookie, and the lists must stay aligned).
fn split_nul(buf: &[u8], len: usize, n: usize) -> Vec<String> {
    buf[..len.min(buf.len())]
        .split(|b| *b == 0)
        .take(n)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
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
        let ctx = IoCtx { h: io, pool };
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

    /// Calls `cls.method` on `oid` as a read and returns its output.
    pub(crate) fn exec(
        &self,
        oid: &str,
        cls: &str,
        method: &str,
        input: &[u8],
    ) -> Result<Vec<u8>, Errno> {
        let (o, c, m) = (name(oid)?, name(cls)?, name(method)?);
        // SAFETY: creates an op released below on every path.
        let op = unsafe { sys::rados_create_read_op() };
        let mut out: *mut c_char = std::ptr::null_mut();
        let mut out_len: usize = 0;
        let mut prval: i32 = 0;
        // SAFETY: valid op; `input` and the names outlive the synchronous operate below; the
        // out-pointers are locals that outlive it too.
        unsafe {
            sys::rados_read_op_exec(
                op,
                c.as_ptr(),
                m.as_ptr(),
                input.as_ptr().cast(),
                input.len(),
                &mut out,
                &mut out_len,
                &mut prval,
            )
        };
        // SAFETY: valid op and ioctx; synchronous.
        let r = unsafe { sys::rados_read_op_operate(op, self.h, o.as_ptr(), 0) };
        let data = if out.is_null() {
            Vec::new()
        } else {
            // SAFETY: librados allocated `out_len` bytes at `out`.
            let v = unsafe { std::slice::from_raw_parts(out.cast::<u8>(), out_len) }.to_vec();
            // SAFETY: freed once, as librados asks.
            unsafe { sys::rados_buffer_free(out) };
            v
        };
        // SAFETY: released once, after the operation finished.
        unsafe { sys::rados_release_read_op(op) };
        rc(r)?;
        rc(prval)?;
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

    /// Takes exclusive `cls_lock` `lock_name` on `oid` with `cookie` (no tag, no expiry).
    pub(crate) fn lock_exclusive(
        &self,
        oid: &str,
        lock_name: &str,
        cookie: &str,
    ) -> Result<(), Errno> {
        let (o, l, c, d) = (name(oid)?, name(lock_name)?, name(cookie)?, name("")?);
        // SAFETY: valid ioctx; strings outlive the synchronous call; NULL duration = forever.
        rc(unsafe {
            sys::rados_lock_exclusive(
                self.h,
                o.as_ptr(),
                l.as_ptr(),
                c.as_ptr(),
                d.as_ptr(),
                std::ptr::null_mut(),
                0,
            )
        })
        .map(|_| ())
    }

    /// Releases `cls_lock` `lock_name` held with `cookie`.
    pub(crate) fn unlock(&self, oid: &str, lock_name: &str, cookie: &str) -> Result<(), Errno> {
        let (o, l, c) = (name(oid)?, name(lock_name)?, name(cookie)?);
        // SAFETY: valid ioctx; strings outlive the synchronous call.
        rc(unsafe { sys::rados_unlock(self.h, o.as_ptr(), l.as_ptr(), c.as_ptr()) }).map(|_| ())
    }

    /// Who holds `lock_name` on `oid`.
    pub(crate) fn list_lockers(&self, oid: &str, lock_name: &str) -> Result<Lockers, Errno> {
        let (o, l) = (name(oid)?, name(lock_name)?);
        let mut cap = 1024usize;
        loop {
            let mut exclusive: i32 = 0;
            let (mut tag, mut clients, mut cookies, mut addrs) = (
                vec![0u8; cap],
                vec![0u8; cap],
                vec![0u8; cap],
                vec![0u8; cap],
            );
            let (mut tl, mut cl, mut kl, mut al) = (cap, cap, cap, cap);
            // SAFETY: valid ioctx; every buffer is passed with its capacity.
            let r = unsafe {
                sys::rados_list_lockers(
                    self.h,
                    o.as_ptr(),
                    l.as_ptr(),
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    &mut tl,
                    clients.as_mut_ptr().cast(),
                    &mut cl,
                    cookies.as_mut_ptr().cast(),
                    &mut kl,
                    addrs.as_mut_ptr().cast(),
                    &mut al,
                )
            };
            if r == -(libc::ERANGE as isize) && cap < (1 << 20) {
                cap = cap.max(tl).max(cl).max(kl).max(al) * 2;
                continue;
            }
            if r < 0 {
                return Err(Errno(i32::try_from(r).unwrap_or(-libc::EIO)));
            }
            let n = usize::try_from(r).unwrap_or(0);
            let clients = split_nul(&clients, cl, n);
            let cookies = split_nul(&cookies, kl, n);
            let addrs = split_nul(&addrs, al, n);
            let holders = clients
                .into_iter()
                .zip(cookies)
                .zip(addrs)
                .map(|((c, k), a)| (c, k, a))
                .collect();
            return Ok(Lockers {
                exclusive: exclusive != 0,
                tag: split_nul(&tag, tl, 1)
                    .into_iter()
                    .next()
                    .unwrap_or_default(),
                holders,
            });
        }
    }

    /// Breaks `client`'s hold (with `cookie`) of `lock_name` on `oid`.
    pub(crate) fn break_lock(
        &self,
        oid: &str,
        lock_name: &str,
        client: &str,
        cookie: &str,
    ) -> Result<(), Errno> {
        let (o, l, c, k) = (name(oid)?, name(lock_name)?, name(client)?, name(cookie)?);
        // SAFETY: valid ioctx; strings outlive the synchronous call.
        rc(
            unsafe {
                sys::rados_break_lock(self.h, o.as_ptr(), l.as_ptr(), c.as_ptr(), k.as_ptr())
            },
        )
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

    /// Starts watching `oid`; events go to `sink` until [`Self::unwatch`].
    pub(crate) fn watch(&self, oid: &str, sink: &Arc<WatchSink>) -> Result<u64, Errno> {
        let o = name(oid)?;
        let mut cookie = 0u64;
        // One strong reference is leaked per watch and kept for the life of the process: the
        // watch callback may still run briefly after unwatch (librados flushes callbacks
        // asynchronously), so the sink must never be freed under it.
        let arg = Arc::into_raw(Arc::clone(sink)).cast_mut().cast::<c_void>();
        // SAFETY: valid ioctx; the callbacks only read `arg`, which stays valid (leaked above).
        let r = unsafe {
            sys::rados_watch2(
                self.h,
                o.as_ptr(),
                &mut cookie,
                Some(on_watch),
                Some(on_watch_error),
                arg,
            )
        };
        if r < 0 {
            // SAFETY: the watch was not registered, so no callback holds `arg`: reclaim it.
            drop(unsafe { Arc::from_raw(arg.cast_const().cast::<WatchSink>()) });
            return Err(Errno(r));
        }
        Ok(cookie)
    }

    /// Stops watch `cookie`.
    pub(crate) fn unwatch(&self, cookie: u64) -> Result<(), Errno> {
        // SAFETY: valid ioctx; an unknown cookie is reported as an error by librados.
        rc(unsafe { sys::rados_unwatch2(self.h, cookie) }).map(|_| ())
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

    /// Runs the operation synchronously.
    pub(crate) fn operate(&self, io: &IoCtx, oid: &str) -> Result<(), Errno> {
        let o = name(oid)?;
        // SAFETY: valid op and ioctx; synchronous; NULL mtime = now.
        rc(unsafe {
            sys::rados_write_op_operate(self.h, io.h, o.as_ptr(), std::ptr::null_mut(), FULL_TRY)
        })
        .map(|_| ())
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
        submit_aio(sink, token, |comp, _| {
            // SAFETY: valid op, ioctx and completion; the op outlives the operation (caller's
            // contract); NULL mtime = now.
            unsafe {
                sys::rados_aio_write_op_operate(
                    self.h,
                    io.h,
                    comp,
                    o.as_ptr(),
                    std::ptr::null_mut(),
                    FULL_TRY,
                )
            }
        })
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
    use super::split_nul;

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

    #[test]
    fn locker_lists_keep_empty_cookies_aligned() {
        let b = b"client.1\0\0client.2\0";
        assert_eq!(split_nul(b, b.len(), 3), vec!["client.1", "", "client.2"]);
        assert_eq!(split_nul(b"\0", 1, 1), vec![""]);
        assert_eq!(split_nul(b"a\0b\0", 4, 1), vec!["a"]);
    }
}
