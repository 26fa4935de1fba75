//! The CSI node plugin (`rbdback csi`): lets Kubernetes hand RBD volumes provisioned by
//! ceph-csi's controller to Xen guests served by rbdback on this host.
//!
//! Owns: the gRPC server on its unix socket (Identity and Node services, CSI v1), the keyrings
//! it writes from the volumes' secrets (`<state dir>/keys/`, mode 0600), the stage record in
//! each staging path and the disk descriptor (and a copy of the record) in each publish path,
//! and the threads that ask the cluster on a call's behalf (`flight.rs`: one per volume and
//! kind, so a silent cluster and kubelet's retries cannot pile them up).
//! Trusts: nothing in a request: every field is checked (a volume id is one short line with
//! no `/`, a path is absolute with no `..`; else `INVALID_ARGUMENT` naming the field), the
//! disk string it builds goes through the same parser as a VBD's `params`, and the image is
//! opened once (bounded in time) before a stage succeeds, so a missing image, a bad key or an
//! unreachable cluster is named at stage time with the matching gRPC code.
//! Must never: log a secret, create a dom0 block device (rbdback serves guests, not dom0),
//! touch a path the request did not name (apart from its own keyrings), remove or overwrite
//! a file it did not write for the volume the call names (unstage and unpublish act only
//! where the stage record names that volume; a publish over another volume's, another
//! access's or foreign files is `ALREADY_EXISTS`), write through a link, resize an image
//! (ceph-csi's controller does; NodeExpandVolume only checks the new size is there), or keep
//! a kubelet call waiting on the cluster longer than its configured wait.
//!
//! What a publish gives: volumes are requested with the Filesystem access type (a block
//! volume would have to be a dom0 block device, which containerd insists on and rbdback does
//! not make). The target directory receives `disk`, the rbdback disk string (`rbd:...`), and
//! `xl-disk`, a ready `xl` disk specification without `vdev` (`access=..., backendtype=phy,
//! script=block-rbdback, target=...`): the VM's launcher adds the virtual device and attaches
//! it; the supervisor (`rbdback supervise`, which `rbdback csi` runs unless told not to)
//! starts the guest's backend.

pub mod client;
mod flight;
pub mod proto;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use thiserror::Error;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::chain;
use crate::device::params::DiskSpec;
use crate::rados::{usage, Image, ImageSpec, RadosError, Usage};
use flight::{Flight, Flights};

use proto::volume_capability::{AccessType, Mode};
use proto::*;

/// The stage record's file name in a staging directory (a publish directory holds a copy,
/// so that calls naming either path find the volume).
pub const STAGE_RECORD: &str = "rbdback-volume";
/// The publish directory's disk string file.
pub const DISK_FILE: &str = "disk";
/// The publish directory's `xl` disk specification (without `vdev`).
pub const XL_DISK_FILE: &str = "xl-disk";

/// How the plugin is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The CSI driver name kubelet knows the plugin by: ceph-csi's controller provisions the
    /// volumes, so the node plugin registers under its name (`rbd.csi.ceph.com`).
    pub driver_name: String,
    /// This node's id (`NodeGetInfo`).
    pub node_id: String,
    /// Where keyrings are written.
    pub state_dir: PathBuf,
    /// ceph.conf for the volumes (`None`: librados' default search).
    pub ceph_conf: Option<String>,
    /// ceph-csi's cluster map (`config.json` of its `ceph-csi-config` ConfigMap: a list of
    /// `{"clusterID", "monitors": [...], "rbd": {"radosNamespace"}}`), read at every stage so
    /// that a changed map needs no restart. A volume's `clusterID` picks its monitors there.
    pub clusters: Option<PathBuf>,
    /// How long a call that opens the image (the verifying open at stage time, the size
    /// read at expand time) waits for it. The open itself goes on (one per volume) and a
    /// retry takes its result.
    pub open_timeout: Duration,
    /// How long a NodeGetVolumeStats call waits for the count of used bytes.
    pub stats_wait: Duration,
    /// How long a count of used bytes may take (it goes on after the call that started it
    /// stopped waiting, one per volume).
    pub stats_deadline: Duration,
}

/// How long a result nobody waited for (an open or a count that outlived its call) stays
/// usable for the next call: kubelet's retries back off to about two minutes.
const RESULT_KEEP: Duration = Duration::from_secs(150);

/// The Identity and Node services.
#[derive(Debug, Clone)]
pub struct Plugin {
    cfg: Arc<Config>,
    /// Verifying opens at stage time.
    opens: Arc<Flights<Result<(), RadosError>>>,
    /// Size reads at expand time.
    sizes: Arc<Flights<Result<u64, RadosError>>>,
    /// Counts of used bytes.
    counts: Arc<Flights<Result<Usage, RadosError>>>,
    /// Each volume's latest count, answered while a newer one runs.
    last_usage: Arc<Mutex<HashMap<String, Usage>>>,
}

impl Plugin {
    /// A plugin with this configuration.
    pub fn new(cfg: Config) -> Plugin {
        Plugin {
            cfg: Arc::new(cfg),
            opens: Arc::new(Flights::new(OPEN_THREAD, RESULT_KEEP)),
            sizes: Arc::new(Flights::new(SIZE_THREAD, RESULT_KEEP)),
            counts: Arc::new(Flights::new(COUNT_THREAD, RESULT_KEEP)),
            last_usage: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// The name of the threads that open images at stage time.
pub const OPEN_THREAD: &str = "csi-open";
/// The name of the threads that read images' sizes at expand time.
pub const SIZE_THREAD: &str = "csi-size";
/// The name of the threads that count used bytes.
pub const COUNT_THREAD: &str = "csi-count";

/// Serves the plugin on the unix socket `socket` until `shutdown` completes. A stale socket
/// file is replaced.
pub async fn serve(
    cfg: Config,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), std::io::Error> {
    if socket.exists() {
        std::fs::remove_file(socket)?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let keys = cfg.state_dir.join("keys");
    std::fs::create_dir_all(&keys)?;
    // keyrings hold secrets: the directory is the plugin's alone
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700))?;
    let listener = tokio::net::UnixListener::bind(socket)?;
    info!(socket = %socket.display(), driver = %cfg.driver_name, node = %cfg.node_id,
          "CSI node plugin listening");
    let plugin = Plugin::new(cfg);
    tonic::transport::Server::builder()
        .add_service(identity_server::IdentityServer::new(plugin.clone()))
        .add_service(node_server::NodeServer::new(plugin))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(std::io::Error::other)
}

/// Why a CSI call failed; each maps to the gRPC code the CSI specification gives it.
#[derive(Debug, Error)]
pub enum CsiError {
    /// A required field is empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A path field is not absolute.
    #[error("{what} must be an absolute path (got {path:?})")]
    NotAbsolute {
        /// The field.
        what: &'static str,
        /// Its value.
        path: String,
    },
    /// An identifier or path that the plugin refuses to use.
    #[error("{field} {value:?} {why}")]
    Refused {
        /// The field.
        field: &'static str,
        /// Its value (the first 64 characters of a long one).
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// Block access was asked for.
    #[error(
        "block access: rbdback serves RBD volumes to Xen guests and makes no dom0 block device; \
         request volumeMode Filesystem (the publish directory then holds the guest's disk \
         specification)"
    )]
    BlockAccess,
    /// The capability is incomplete.
    #[error("volume_capability has no {0}")]
    Capability(&'static str),
    /// The secrets are unusable.
    #[error("secrets: {0}")]
    Secrets(&'static str),
    /// The disk string built from the request does not parse.
    #[error("volume {volume}: {why}")]
    Disk {
        /// Volume id.
        volume: String,
        /// The parser's message.
        why: String,
    },
    /// The image could not be opened.
    #[error("volume {volume}")]
    Open {
        /// Volume id.
        volume: String,
        /// Why.
        #[source]
        source: RadosError,
    },
    /// The image's open has not finished.
    #[error(
        "volume {volume}: the cluster has not opened the image in {secs} s; the open goes on \
         (one per volume) and a retry takes its result"
    )]
    OpenTimeout {
        /// Volume id.
        volume: String,
        /// How long the open has been running.
        secs: u64,
    },
    /// The thread for a cluster call could not be started or died.
    #[error("volume {volume}")]
    Thread {
        /// Volume id.
        volume: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another call for the volume is waiting for the cluster.
    #[error(
        "volume {volume}: another {call} of this volume is waiting for the cluster{other}",
        other = if *.other_parameters { " (with other parameters)" } else { "" }
    )]
    Pending {
        /// Volume id.
        volume: String,
        /// The call.
        call: &'static str,
        /// The waiting call asked for something else.
        other_parameters: bool,
    },
    /// The used bytes are still being counted and no earlier count is known.
    #[error(
        "volume {volume}: its used bytes are still being counted ({secs} s so far, at most \
         {deadline} s); ask again"
    )]
    Counting {
        /// Volume id.
        volume: String,
        /// How long the count has been running.
        secs: u64,
        /// Its bound.
        deadline: u64,
    },
    /// Neither path holds the volume.
    #[error("volume {volume} is neither staged nor published at {path}")]
    NotHere {
        /// Volume id.
        volume: String,
        /// The path asked about.
        path: String,
    },
    /// A negative capacity.
    #[error("capacity_range.{0} must not be negative")]
    NegativeCapacity(&'static str),
    /// The image is smaller than asked for.
    #[error(
        "volume {volume}: image is {size} bytes, less than the {required} bytes asked for; the \
         node plugin does not grow images (ceph-csi's ControllerExpandVolume runs `rbd resize`)"
    )]
    TooSmall {
        /// Volume id.
        volume: String,
        /// The image's size.
        size: u64,
        /// `required_bytes`.
        required: u64,
    },
    /// The image is larger than allowed.
    #[error("volume {volume}: image is {size} bytes, more than the limit of {limit} bytes; images are never shrunk")]
    TooLarge {
        /// Volume id.
        volume: String,
        /// The image's size.
        size: u64,
        /// `limit_bytes`.
        limit: u64,
    },
    /// The staging or publish path holds another volume.
    #[error("{path} already {verb} volume {other}")]
    HoldsAnother {
        /// The path.
        path: String,
        /// `stages` or `publishes`.
        verb: &'static str,
        /// The volume there.
        other: String,
    },
    /// The volume is staged at the path with another access.
    #[error(
        "volume {volume} is already staged at {path} with access={staged}; this request asks \
         for access={asked} (unstage it first)"
    )]
    StagedOtherwise {
        /// Volume id.
        volume: String,
        /// The staging path.
        path: String,
        /// `ro` or `rw`, as staged.
        staged: String,
        /// `ro` or `rw`, as asked.
        asked: &'static str,
    },
    /// The volume is published at the path with another access.
    #[error(
        "volume {volume} is already published at {path} with access={published}; this request \
         asks for access={asked} (unpublish it first)"
    )]
    PublishedOtherwise {
        /// Volume id.
        volume: String,
        /// The publish path.
        path: String,
        /// `ro` or `rw`, as published.
        published: String,
        /// `ro` or `rw`, as asked.
        asked: &'static str,
    },
    /// The publish path holds files of the names the plugin writes, which it did not write.
    #[error(
        "{path} holds {file}, which rbdback did not write (no stage record of rbdback is \
         there); it is left alone"
    )]
    NotOurs {
        /// The publish path.
        path: String,
        /// The file found.
        file: &'static str,
    },
    /// Publish before stage.
    #[error("volume {volume} is not staged at {path}")]
    NotStaged {
        /// Volume id.
        volume: String,
        /// Staging path.
        path: String,
    },
    /// A file the plugin owns could not be read, written or removed.
    #[error("{what} {path}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A stage record that rbdback did not write.
    #[error("{0} is not a stage record of rbdback")]
    NotARecord(String),
    /// The cluster map is unreadable or does not name the volume's cluster.
    #[error("cluster map {path}: {why}")]
    Clusters {
        /// The map's file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

impl CsiError {
    fn io(what: &'static str, path: &Path, source: std::io::Error) -> CsiError {
        CsiError::Io {
            what,
            path: path.display().to_string(),
            source,
        }
    }

    /// The gRPC code.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            CsiError::Missing(_)
            | CsiError::NotAbsolute { .. }
            | CsiError::Refused { .. }
            | CsiError::BlockAccess
            | CsiError::Capability(_)
            | CsiError::Secrets(_)
            | CsiError::Disk { .. } => Code::InvalidArgument,
            CsiError::Open { source, .. } => match source {
                RadosError::NoPool(_) | RadosError::NoImage { .. } => Code::NotFound,
                RadosError::Connect { errno, .. }
                    if errno.0 == -libc::EACCES || errno.0 == -libc::EPERM =>
                {
                    Code::PermissionDenied
                }
                RadosError::Connect { .. } => Code::Unavailable,
                RadosError::Unsupported { .. } | RadosError::EncryptionLoad { .. } => {
                    Code::FailedPrecondition
                }
                RadosError::Invalid(_) => Code::InvalidArgument,
                RadosError::TimedOut { .. } => Code::Unavailable,
                RadosError::Call { errno, .. } if errno.0 == -libc::ETIMEDOUT => Code::Unavailable,
                _ => Code::Internal,
            },
            CsiError::OpenTimeout { .. } | CsiError::Counting { .. } => Code::Unavailable,
            CsiError::Pending { .. } => Code::Aborted,
            CsiError::NotHere { .. } => Code::NotFound,
            CsiError::NegativeCapacity(_) => Code::InvalidArgument,
            CsiError::TooSmall { .. } | CsiError::TooLarge { .. } => Code::OutOfRange,
            CsiError::HoldsAnother { .. }
            | CsiError::PublishedOtherwise { .. }
            | CsiError::StagedOtherwise { .. }
            | CsiError::NotOurs { .. } => Code::AlreadyExists,
            CsiError::NotStaged { .. } | CsiError::Clusters { .. } => Code::FailedPrecondition,
            CsiError::Thread { .. } | CsiError::Io { .. } | CsiError::NotARecord(_) => {
                Code::Internal
            }
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        Status::new(e.code(), chain(&e))
    }
}

fn need<'a>(v: &'a str, what: &'static str) -> Result<&'a str, CsiError> {
    if v.is_empty() {
        Err(CsiError::Missing(what))
    } else {
        Ok(v)
    }
}

/// The longest volume id accepted, in bytes (the CSI specification asks COs for ids of at
/// most 128 bytes; ceph-csi's handles are about 80).
pub const MAX_VOLUME_ID: usize = 256;

/// The longest path accepted, in bytes (Linux's `PATH_MAX` with its terminating NUL).
const MAX_PATH: usize = 4095;

fn refused(field: &'static str, value: &str, why: impl Into<String>) -> CsiError {
    CsiError::Refused {
        field,
        value: value.chars().take(64).collect(),
        why: why.into(),
    }
}

/// A field that must be one line of at most `max` bytes.
fn one_line(v: &str, field: &'static str, max: usize) -> Result<(), CsiError> {
    if v.len() > max {
        return Err(refused(
            field,
            v,
            format!("is {} bytes long, more than {max}", v.len()),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(refused(field, v, "holds a control character"));
    }
    Ok(())
}

/// A volume id: it names files and threads and goes into stage records and disk strings, so
/// it must be one short line that cannot be read as a path.
fn need_volume_id(v: &str) -> Result<&str, CsiError> {
    let field = "volume_id";
    let v = need(v, field)?;
    one_line(v, field, MAX_VOLUME_ID)?;
    if v.contains('/') {
        return Err(refused(field, v, "holds a '/'"));
    }
    if v == "." || v == ".." {
        return Err(refused(field, v, "is a path component"));
    }
    Ok(v)
}

/// A path the request names: absolute, without `..` components (the plugin writes and
/// removes files under it) or control characters.
fn need_abs(v: &str, what: &'static str) -> Result<PathBuf, CsiError> {
    let p = Path::new(need(v, what)?);
    if !p.is_absolute() {
        return Err(CsiError::NotAbsolute {
            what,
            path: v.to_owned(),
        });
    }
    one_line(v, what, MAX_PATH)?;
    if p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(refused(what, v, "has a '..' component"));
    }
    Ok(p.to_path_buf())
}

/// Checks a capability; returns whether it only allows reading.
fn check_capability(c: Option<&VolumeCapability>) -> Result<bool, CsiError> {
    let c = c.ok_or(CsiError::Missing("volume_capability"))?;
    match &c.access_type {
        Some(AccessType::Mount(_)) => {}
        Some(AccessType::Block(_)) => return Err(CsiError::BlockAccess),
        None => return Err(CsiError::Capability("access type")),
    }
    let mode = c
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::Unknown => Err(CsiError::Capability("known access mode")),
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => Ok(true),
        _ => Ok(false),
    }
}

/// `\` before the characters the disk string gives a meaning to.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ':' | '@' | '/' | '=') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

/// A file name for a volume id (which may hold any character).
fn key_file_name(volume_id: &str) -> String {
    // FNV-1a, then the id's safe characters for readability
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in volume_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let safe: String = volume_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(48)
        .collect();
    format!("{safe}-{h:016x}.keyring")
}

/// Writes `text` to `path` (mode 0600) through a temporary file, so readers never see half.
fn write_private(path: &Path, text: &str) -> Result<(), CsiError> {
    let tmp = path.with_extension("tmp");
    let io = |e| CsiError::io("cannot write", path, e);
    // a new file: one left in the (kubelet's, not our) directory, or a symlink planted there,
    // is replaced, never written through
    remove(&tmp)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Removes a file; an absent one is fine (CSI calls are retried).
fn remove(path: &Path) -> Result<(), CsiError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CsiError::io("cannot remove", path, e)),
    }
}

/// A cluster of ceph-csi's cluster map.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClusterEntry {
    monitors: Vec<String>,
    rados_namespace: Option<String>,
}

/// Finds `id` in a ceph-csi cluster map (`config.json`).
fn cluster_entry(text: &str, id: &str) -> Result<ClusterEntry, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let list = v
        .as_array()
        .ok_or_else(|| "not a JSON list of clusters".to_owned())?;
    let c = list
        .iter()
        .find(|c| c.get("clusterID").and_then(|x| x.as_str()) == Some(id))
        .ok_or_else(|| format!("no cluster with clusterID {id:?}"))?;
    let monitors: Vec<String> = c
        .get("monitors")
        .and_then(|m| m.as_array())
        .map(|m| {
            m.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if monitors.is_empty() {
        return Err(format!("cluster {id:?} lists no monitors"));
    }
    let rados_namespace = c
        .get("rbd")
        .and_then(|r| r.get("radosNamespace"))
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    Ok(ClusterEntry {
        monitors,
        rados_namespace,
    })
}

/// The stage record: the volume, the disk string built for it, and the access it was staged
/// with (`ro` or `rw`; absent in records of earlier versions, which any access matches).
struct Record {
    volume_id: String,
    disk: String,
    access: Option<String>,
}

impl Record {
    fn read(dir: &Path) -> Result<Option<Record>, CsiError> {
        let path = dir.join(STAGE_RECORD);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CsiError::io("cannot read", &path, e)),
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(' ')))
                .map(str::to_owned)
        };
        match (field("volume_id"), field("disk")) {
            (Some(volume_id), Some(disk)) => Ok(Some(Record {
                volume_id,
                disk,
                access: field("access"),
            })),
            _ => Err(CsiError::NotARecord(path.display().to_string())),
        }
    }

    fn write(&self, dir: &Path) -> Result<(), CsiError> {
        let mut text = format!("volume_id {}\ndisk {}\n", self.volume_id, self.disk);
        if let Some(a) = &self.access {
            text.push_str(&format!("access {a}\n"));
        }
        write_private(&dir.join(STAGE_RECORD), &text)
    }
}

/// Whether the stage record in `dir` is `volume_id`'s (so that `call` may remove what the
/// plugin made there for it); says why not in the log when another volume's record or a file
/// rbdback did not write is there.
fn held(dir: &Path, volume_id: &str, call: &'static str) -> Result<bool, CsiError> {
    match Record::read(dir) {
        Ok(Some(rec)) if rec.volume_id == volume_id => Ok(true),
        Ok(None) => {
            info!(volume = %volume_id, path = %dir.display(), call, "the volume is not there (done before?): nothing to do");
            Ok(false)
        }
        Ok(Some(rec)) => {
            warn!(volume = %volume_id, path = %dir.display(), other = %rec.volume_id, call,
                  "the path holds another volume: left alone");
            Ok(false)
        }
        Err(CsiError::NotARecord(record)) => {
            warn!(volume = %volume_id, path = %dir.display(), record, call,
                  "the path holds a record rbdback did not write: left alone");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The access (`ro` or `rw`) of the publication in `target`, as its `xl-disk` says.
fn published_access(target: &Path) -> Option<String> {
    let text = std::fs::read_to_string(target.join(XL_DISK_FILE)).ok()?;
    let access = text.strip_prefix("access=")?.split(',').next()?.trim();
    Some(access.to_owned())
}

impl Plugin {
    fn keyring_path(&self, volume_id: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("keys")
            .join(key_file_name(volume_id))
    }

    /// The disk string for a stage request, its keyring written first when secrets came.
    fn disk_string(&self, r: &NodeStageVolumeRequest) -> Result<String, CsiError> {
        let ctx = &r.volume_context;
        let cluster = match (&self.cfg.clusters, ctx.get("clusterID")) {
            (Some(path), Some(id)) => {
                let bad = |why: String| CsiError::Clusters {
                    path: path.display().to_string(),
                    why,
                };
                let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
                Some(cluster_entry(&text, id).map_err(bad)?)
            }
            _ => None,
        };
        let mut disk = match (ctx.get("pool"), ctx.get("imageName")) {
            (Some(pool), Some(image)) if !pool.is_empty() && !image.is_empty() => {
                let ns = ctx
                    .get("radosNamespace")
                    .filter(|n| !n.is_empty())
                    .or(cluster.as_ref().and_then(|c| c.rados_namespace.as_ref()))
                    .map(|n| format!("{}/", esc(n)))
                    .unwrap_or_default();
                format!("rbd:{}/{ns}{}", esc(pool), esc(image))
            }
            // a ceph-csi volume handle names the pool (by id) and the image itself
            _ => format!("csi:{}", esc(&r.volume_id)),
        };
        if let (Some(user), Some(key)) = (r.secrets.get("userID"), r.secrets.get("userKey")) {
            let bad =
                |s: &str| s.is_empty() || s.chars().any(|c| c.is_control() || "[]".contains(c));
            if bad(user) || bad(key) {
                return Err(CsiError::Secrets(
                    "userID and userKey must be non-empty single-line values",
                ));
            }
            let base64 = key.len() % 4 == 0
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c));
            if !base64 {
                return Err(CsiError::Secrets(
                    "userKey is not a cephx key (base64, as `ceph auth get-key` prints)",
                ));
            }
            let path = self.keyring_path(&r.volume_id);
            write_private(&path, &format!("[client.{user}]\n\tkey = {key}\n"))?;
            disk.push_str(&format!(
                ":id={}:keyring={}",
                esc(user),
                esc(&path.to_string_lossy())
            ));
        }
        if let Some(conf) = &self.cfg.ceph_conf {
            disk.push_str(&format!(":conf={}", esc(conf)));
        }
        if let Some(c) = &cluster {
            disk.push_str(&format!(":mon_host={}", esc(&c.monitors.join(","))));
        }
        Ok(disk)
    }

    async fn stage(&self, r: NodeStageVolumeRequest) -> Result<(), CsiError> {
        let volume_id = need_volume_id(&r.volume_id)?.to_owned();
        let staging = need_abs(&r.staging_target_path, "staging_target_path")?;
        let read_only = check_capability(r.volume_capability.as_ref())?;
        let access = if read_only { "ro" } else { "rw" };
        let staged_before = match Record::read(&staging)? {
            Some(old) if old.volume_id != volume_id => {
                return Err(CsiError::HoldsAnother {
                    path: staging.display().to_string(),
                    verb: "stages",
                    other: old.volume_id,
                })
            }
            // staged before: the same access is idempotent, another is refused (CSI: an
            // incompatible volume_capability is ALREADY_EXISTS)
            Some(old) => match old.access {
                Some(staged) if staged != access => {
                    return Err(CsiError::StagedOtherwise {
                        volume: volume_id,
                        path: staging.display().to_string(),
                        staged,
                        asked: access,
                    })
                }
                _ => true,
            },
            None => false,
        };
        let result = self
            .verify_and_record(&r, &volume_id, &staging, read_only)
            .await;
        // a failed first stage leaves no secret behind, unless another call's stage of the
        // volume is still under way
        if !staged_before && matches!(&result, Err(e) if !matches!(e, CsiError::Pending { .. })) {
            let _ = remove(&self.keyring_path(&volume_id));
        }
        result
    }

    async fn verify_and_record(
        &self,
        r: &NodeStageVolumeRequest,
        volume_id: &str,
        staging: &Path,
        read_only: bool,
    ) -> Result<(), CsiError> {
        let volume_id = volume_id.to_owned();
        let disk = self.disk_string(r)?;
        let mut spec = DiskSpec::parse(&disk)
            .map_err(|e| CsiError::Disk {
                volume: volume_id.clone(),
                why: chain(&e),
            })?
            .target;
        spec.read_only = read_only;
        info!(volume = %volume_id, image = %spec, "staging: checking the image opens");
        // the image is closed on the opening thread too (closing may wait for the cluster)
        let key = format!("{disk} read_only={read_only}");
        let open = move || Image::open(&spec).map(drop);
        let flight = self
            .opens
            .run(&volume_id, &key, self.cfg.open_timeout, open)
            .await;
        match self.landed(&volume_id, "NodeStageVolume", flight)? {
            Ok(()) => {}
            Err(source) => {
                let e = CsiError::Open {
                    volume: volume_id,
                    source,
                };
                warn!(error = %chain(&e), "stage refused");
                return Err(e);
            }
        }
        std::fs::create_dir_all(staging).map_err(|e| CsiError::io("cannot create", staging, e))?;
        Record {
            volume_id: volume_id.clone(),
            disk,
            access: Some(if read_only { "ro" } else { "rw" }.to_owned()),
        }
        .write(staging)?;
        info!(volume = %volume_id, staging = %staging.display(), "staged");
        Ok(())
    }

    fn unstage(&self, r: &NodeUnstageVolumeRequest) -> Result<(), CsiError> {
        let volume_id = need_volume_id(&r.volume_id)?;
        let staging = need_abs(&r.staging_target_path, "staging_target_path")?;
        // only what this volume's stage made: CSI answers OK for a volume not staged there
        if !held(&staging, volume_id, "unstage")? {
            return Ok(());
        }
        // the record goes last, so that a retry after a failure here still finds it
        remove(&self.keyring_path(volume_id))?;
        remove(&staging.join(STAGE_RECORD))?;
        self.last_usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(volume_id);
        info!(volume = %volume_id, staging = %staging.display(), "unstaged");
        Ok(())
    }

    fn publish(&self, r: &NodePublishVolumeRequest) -> Result<(), CsiError> {
        let volume_id = need_volume_id(&r.volume_id)?;
        let staging = need_abs(&r.staging_target_path, "staging_target_path")?;
        let target = need_abs(&r.target_path, "target_path")?;
        let read_only = check_capability(r.volume_capability.as_ref())? || r.readonly;
        let rec = Record::read(&staging)?
            .filter(|rec| rec.volume_id == volume_id)
            .ok_or_else(|| CsiError::NotStaged {
                volume: volume_id.to_owned(),
                path: staging.display().to_string(),
            })?;
        let access = if read_only { "ro" } else { "rw" };
        let path = || target.display().to_string();
        match Record::read(&target) {
            Ok(Some(old)) if old.volume_id != volume_id => {
                return Err(CsiError::HoldsAnother {
                    path: path(),
                    verb: "publishes",
                    other: old.volume_id,
                })
            }
            // published before: the same access is idempotent, another is refused (a
            // publication without its xl-disk, cut short, is made again)
            Ok(Some(_)) => match published_access(&target) {
                Some(published) if published != access => {
                    return Err(CsiError::PublishedOtherwise {
                        volume: volume_id.to_owned(),
                        path: path(),
                        published,
                        asked: access,
                    })
                }
                _ => {}
            },
            // the record is written first: files without one are someone else's
            Ok(None) => {
                if let Some(file) = [DISK_FILE, XL_DISK_FILE]
                    .into_iter()
                    .find(|f| std::fs::symlink_metadata(target.join(f)).is_ok())
                {
                    return Err(CsiError::NotOurs { path: path(), file });
                }
            }
            Err(CsiError::NotARecord(_)) => {
                return Err(CsiError::NotOurs {
                    path: path(),
                    file: STAGE_RECORD,
                })
            }
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&target).map_err(|e| CsiError::io("cannot create", &target, e))?;
        let xl = format!(
            "access={access}, backendtype=phy, script=block-rbdback, target={}",
            rec.disk
        );
        rec.write(&target)?;
        write_private(&target.join(DISK_FILE), &format!("{}\n", rec.disk))?;
        write_private(&target.join(XL_DISK_FILE), &format!("{xl}\n"))?;
        info!(volume = %volume_id, target = %target.display(), access, "published");
        Ok(())
    }

    fn unpublish(&self, r: &NodeUnpublishVolumeRequest) -> Result<(), CsiError> {
        let volume_id = need_volume_id(&r.volume_id)?;
        let target = need_abs(&r.target_path, "target_path")?;
        // only what this volume's publish made: CSI answers OK for a volume not published there
        if !held(&target, volume_id, "unpublish")? {
            return Ok(());
        }
        remove(&target.join(DISK_FILE))?;
        remove(&target.join(XL_DISK_FILE))?;
        remove(&target.join(STAGE_RECORD))?;
        // the directory goes too when nothing else is in it (kubelet may also remove it)
        let _ = std::fs::remove_dir(&target);
        info!(volume = %volume_id, target = %target.display(), "unpublished");
        Ok(())
    }

    /// What became of a cluster call made through a [`Flights`]: its result, or the error
    /// that says it is still running or that another call waits for it.
    fn landed<T>(
        &self,
        volume: &str,
        call: &'static str,
        flight: Result<Flight<T>, std::io::Error>,
    ) -> Result<T, CsiError> {
        match flight.map_err(|source| CsiError::Thread {
            volume: volume.to_owned(),
            source,
        })? {
            Flight::Done(v) => Ok(v),
            Flight::Running(since) => Err(CsiError::OpenTimeout {
                volume: volume.to_owned(),
                secs: since.as_secs(),
            }),
            f @ (Flight::Busy | Flight::Other) => Err(CsiError::Pending {
                volume: volume.to_owned(),
                call,
                other_parameters: matches!(f, Flight::Other),
            }),
        }
    }

    /// The volume at `path` (a staging or publish directory), or at `staging` when `path`
    /// holds no record (a publication made before publish directories had one): its image,
    /// opened read-only.
    fn volume_at(
        &self,
        volume_id: &str,
        path: &Path,
        staging: &str,
    ) -> Result<(String, ImageSpec), CsiError> {
        let mut rec = Record::read(path)?;
        if rec.is_none() && !staging.is_empty() {
            rec = Record::read(&need_abs(staging, "staging_target_path")?)?;
        }
        let rec = rec
            .filter(|r| r.volume_id == volume_id)
            .ok_or_else(|| CsiError::NotHere {
                volume: volume_id.to_owned(),
                path: path.display().to_string(),
            })?;
        let mut spec = DiskSpec::parse(&rec.disk)
            .map_err(|e| CsiError::Disk {
                volume: volume_id.to_owned(),
                why: chain(&e),
            })?
            .target;
        spec.read_only = true;
        Ok((rec.disk, spec))
    }

    async fn stats(&self, r: &NodeGetVolumeStatsRequest) -> Result<Usage, CsiError> {
        let volume_id = need_volume_id(&r.volume_id)?;
        let path = need_abs(&r.volume_path, "volume_path")?;
        let (disk, spec) = self.volume_at(volume_id, &path, &r.staging_target_path)?;
        let deadline = self.cfg.stats_deadline;
        let count = move || usage(&spec, Instant::now() + deadline);
        let flight = self
            .counts
            .run(volume_id, &disk, self.cfg.stats_wait, count)
            .await
            .map_err(|source| CsiError::Thread {
                volume: volume_id.to_owned(),
                source,
            })?;
        let last = || {
            self.last_usage
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(volume_id)
                .copied()
        };
        match flight {
            Flight::Done(Ok(u)) => {
                self.last_usage
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(volume_id.to_owned(), u);
                Ok(u)
            }
            Flight::Done(Err(source)) => Err(CsiError::Open {
                volume: volume_id.to_owned(),
                source,
            }),
            // a count is running (for this call or an earlier one): the latest one answers
            Flight::Running(since) => last().ok_or(CsiError::Counting {
                volume: volume_id.to_owned(),
                secs: since.as_secs(),
                deadline: deadline.as_secs(),
            }),
            Flight::Busy | Flight::Other => last().ok_or(CsiError::Pending {
                volume: volume_id.to_owned(),
                call: "NodeGetVolumeStats",
                other_parameters: false,
            }),
        }
    }

    async fn expand(&self, r: &NodeExpandVolumeRequest) -> Result<u64, CsiError> {
        let volume_id = need_volume_id(&r.volume_id)?;
        let path = need_abs(&r.volume_path, "volume_path")?;
        if r.volume_capability.is_some() {
            check_capability(r.volume_capability.as_ref())?;
        }
        let range = r.capacity_range.clone().unwrap_or_default();
        let required = u64::try_from(range.required_bytes)
            .map_err(|_| CsiError::NegativeCapacity("required_bytes"))?;
        let limit = u64::try_from(range.limit_bytes)
            .map_err(|_| CsiError::NegativeCapacity("limit_bytes"))?;
        let (disk, spec) = self.volume_at(volume_id, &path, &r.staging_target_path)?;
        // a fresh open reads the header as it is now (the controller's `rbd resize` done)
        let size = move || Image::open(&spec).map(|img| img.size());
        let flight = self
            .sizes
            .run(volume_id, &disk, self.cfg.open_timeout, size)
            .await;
        let size = self
            .landed(volume_id, "NodeExpandVolume", flight)?
            .map_err(|source| CsiError::Open {
                volume: volume_id.to_owned(),
                source,
            })?;
        if size < required {
            return Err(CsiError::TooSmall {
                volume: volume_id.to_owned(),
                size,
                required,
            });
        }
        if limit > 0 && size > limit {
            return Err(CsiError::TooLarge {
                volume: volume_id.to_owned(),
                size,
                limit,
            });
        }
        info!(volume = %volume_id, bytes = size, "expanded: the guest's backend follows the new size");
        Ok(size)
    }
}

#[tonic::async_trait]
impl identity_server::Identity for Plugin {
    async fn get_plugin_info(
        &self,
        _r: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.cfg.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: HashMap::from([("backend".to_owned(), "rbdback (Xen)".to_owned())]),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _r: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // node only: ceph-csi's controller provisions
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(&self, _r: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let keys = self.cfg.state_dir.join("keys");
        if !keys.is_dir() {
            return Err(Status::failed_precondition(format!(
                "state directory {} is missing",
                keys.display()
            )));
        }
        Ok(Response::new(ProbeResponse {
            ready: Some(BoolValue { value: true }),
        }))
    }
}

#[tonic::async_trait]
impl node_server::Node for Plugin {
    async fn node_stage_volume(
        &self,
        r: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        self.stage(r.into_inner()).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        r: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        self.unstage(r.get_ref())?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        r: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        self.publish(r.get_ref())?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        self.unpublish(r.get_ref())?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let u = self.stats(r.get_ref()).await?;
        let bytes = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage: vec![VolumeUsage {
                available: bytes(u.size.saturating_sub(u.used)),
                total: bytes(u.size),
                used: bytes(u.used),
                unit: volume_usage::Unit::Bytes as i32,
            }],
            volume_condition: None,
        }))
    }

    async fn node_expand_volume(
        &self,
        r: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let size = self.expand(r.get_ref()).await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _r: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::{Rpc, RpcType, Type};
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: [
                RpcType::StageUnstageVolume,
                RpcType::GetVolumeStats,
                RpcType::ExpandVolume,
            ]
            .into_iter()
            .map(|t| NodeServiceCapability {
                r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _r: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_values_parse_back() {
        let disk = format!(
            "rbd:{}/{}:keyring={}",
            esc("po:ol"),
            esc("im@g=e"),
            esc("/a:b")
        );
        let s = DiskSpec::parse(&disk).unwrap().target;
        assert_eq!(s.image, "im@g=e");
        assert_eq!(s.keyring.as_deref(), Some("/a:b"));
    }

    #[test]
    fn cluster_maps_as_ceph_csi_writes_them() {
        let map = r#"[{"clusterID":"a","monitors":["10.0.0.1:6789","10.0.0.2:6789"]},
                      {"clusterID":"b","monitors":["[v2:10.1.0.1:3300]"],
                       "rbd":{"radosNamespace":"tenant"}}]"#;
        assert_eq!(
            cluster_entry(map, "a").unwrap(),
            ClusterEntry {
                monitors: vec!["10.0.0.1:6789".into(), "10.0.0.2:6789".into()],
                rados_namespace: None,
            }
        );
        assert_eq!(
            cluster_entry(map, "b").unwrap().rados_namespace.as_deref(),
            Some("tenant")
        );
        assert!(cluster_entry(map, "c").unwrap_err().contains("no cluster"));
        assert!(cluster_entry(r#"[{"clusterID":"a"}]"#, "a")
            .unwrap_err()
            .contains("no monitors"));
        assert!(cluster_entry("{", "a").is_err());
        assert!(cluster_entry("{}", "a").unwrap_err().contains("list"));
    }

    #[test]
    fn volume_ids_and_paths_that_could_escape_are_refused_by_name() {
        let refused = |e: CsiError, field: &str, why: &str| {
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
            let m = e.to_string();
            assert!(m.starts_with(field) && m.contains(why), "{m}");
        };
        assert_eq!(
            need_volume_id("0001-0009-ceph-0000000000000002-abc").unwrap(),
            "0001-0009-ceph-0000000000000002-abc"
        );
        assert!(need_volume_id(&"v".repeat(MAX_VOLUME_ID)).is_ok());
        let long = "v".repeat(MAX_VOLUME_ID + 1);
        refused(need_volume_id(&long).unwrap_err(), "volume_id", "257 bytes");
        assert!(need_volume_id(&long).unwrap_err().to_string().len() < 200);
        for id in ["a\nvolume_id b", "a\0", "a\u{7f}b"] {
            refused(need_volume_id(id).unwrap_err(), "volume_id", "control");
        }
        for id in ["../../etc", "a/b", "/"] {
            refused(need_volume_id(id).unwrap_err(), "volume_id", "'/'");
        }
        for id in [".", ".."] {
            refused(need_volume_id(id).unwrap_err(), "volume_id", "component");
        }
        assert!(matches!(
            need_volume_id(""),
            Err(CsiError::Missing("volume_id"))
        ));

        let ok = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv-1/mount";
        assert_eq!(need_abs(ok, "target_path").unwrap(), Path::new(ok));
        assert!(need_abs("/a/..b/c../.x", "target_path").is_ok());
        for p in ["/a/../etc", "/a/b/..", "/.."] {
            refused(
                need_abs(p, "target_path").unwrap_err(),
                "target_path",
                "'..'",
            );
        }
        refused(
            need_abs("/a\nb", "staging_target_path").unwrap_err(),
            "staging_target_path",
            "control",
        );
        let long = format!("/{}", "d".repeat(MAX_PATH));
        refused(
            need_abs(&long, "target_path").unwrap_err(),
            "target_path",
            "bytes long",
        );
        let e = need_abs("a/b", "target_path").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().starts_with("target_path"), "{e}");
    }

    #[test]
    fn private_files_are_not_written_through_a_planted_link() {
        let d = std::env::temp_dir().join(format!("rbdback-csi-write-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let victim = d.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("disk.tmp")).unwrap();
        write_private(&d.join(DISK_FILE), "rbd:p/i\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(
            std::fs::read_to_string(d.join(DISK_FILE)).unwrap(),
            "rbd:p/i\n"
        );
        let mode = std::fs::metadata(d.join(DISK_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn key_files_are_distinct_and_safe() {
        let a = key_file_name("0001-0009-ceph-0000000000000002-abc");
        let b = key_file_name("0001-0009-ceph-0000000000000002-abd");
        assert_ne!(a, b);
        let c = key_file_name("../../etc/passwd");
        assert!(!c.contains('/') && !c.contains(".."), "{c}");
    }

    #[test]
    fn capabilities_are_checked() {
        use volume_capability::{AccessMode, BlockVolume, MountVolume};
        let cap = |t: Option<AccessType>, mode: Mode| VolumeCapability {
            access_type: t,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        };
        let mount = || Some(AccessType::Mount(MountVolume::default()));
        assert!(!check_capability(Some(&cap(mount(), Mode::SingleNodeWriter))).unwrap());
        assert!(check_capability(Some(&cap(mount(), Mode::MultiNodeReaderOnly))).unwrap());
        let e = check_capability(Some(&cap(
            Some(AccessType::Block(BlockVolume {})),
            Mode::SingleNodeWriter,
        )))
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(Status::from(e).code(), tonic::Code::InvalidArgument);
        assert!(check_capability(Some(&cap(mount(), Mode::Unknown))).is_err());
        assert!(check_capability(Some(&cap(None, Mode::SingleNodeWriter))).is_err());
        assert!(check_capability(None).is_err());
    }
}
