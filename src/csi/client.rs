//! A small CSI client (`rbdback csi-call`): one Node call to a plugin's socket, made as
//! kubelet makes it, for the real-Xen test bed and for operators checking a node by hand.
//!
//! Owns: the request it builds from its arguments and the connection for that one call.
//! Trusts: the plugin's answers (it prints them) and the files it is told to read.
//! Must never: print a secret (secrets go into the request only).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tonic::transport::{Channel, Endpoint, Uri};

use super::proto::node_client::NodeClient;
use super::proto::volume_capability::{AccessMode, AccessType, Mode, MountVolume};
use super::proto::*;
use super::XL_DISK_FILE;

/// How long one call may take (kubelet's own bound for CSI calls is about two minutes).
const CALL_TIMEOUT: Duration = Duration::from_secs(150);

/// The Node calls `csi-call` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// NodeStageVolume.
    Stage,
    /// NodePublishVolume (prints the published `xl-disk` line).
    Publish,
    /// NodeUnpublishVolume.
    Unpublish,
    /// NodeUnstageVolume.
    Unstage,
    /// NodeGetVolumeStats.
    Stats,
    /// NodeExpandVolume.
    Expand,
}

impl std::str::FromStr for Op {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Op, ClientError> {
        Ok(match s {
            "stage" => Op::Stage,
            "publish" => Op::Publish,
            "unpublish" => Op::Unpublish,
            "unstage" => Op::Unstage,
            "stats" => Op::Stats,
            "expand" => Op::Expand,
            other => return Err(ClientError::Op(other.to_owned())),
        })
    }
}

/// One call and its arguments.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// The plugin's socket.
    pub socket: PathBuf,
    /// `volume_id`.
    pub volume_id: String,
    /// `volume_context` (ceph-csi's: `clusterID`, `pool`, `imageName`, ...).
    pub context: HashMap<String, String>,
    /// `secrets` (`userID`, `userKey`).
    pub secrets: HashMap<String, String>,
    /// `staging_target_path`.
    pub staging_path: String,
    /// `target_path` (publish, unpublish); `volume_path` of stats and expand (the staging
    /// path when empty).
    pub target_path: String,
    /// A reader-only access mode and, at publish, `readonly`.
    pub read_only: bool,
    /// `capacity_range.required_bytes` of an expansion.
    pub required_bytes: i64,
}

/// Why a call could not be made or failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Not a call `csi-call` makes.
    #[error("unknown call {0:?} (stage, publish, unpublish, unstage, stats or expand)")]
    Op(String),
    /// The endpoint is not a unix socket URL.
    #[error("the endpoint must be unix:///path (got {0:?})")]
    Endpoint(String),
    /// A `key=value` argument without `=`.
    #[error("{what} {item:?} is not key=value")]
    Pair {
        /// The option.
        what: &'static str,
        /// Its value.
        item: String,
    },
    /// A file named by an argument could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A number that is not one.
    #[error("{what} {value:?} is not a number")]
    Number {
        /// The option.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// The gRPC runtime could not start.
    #[error("cannot start the gRPC runtime")]
    Runtime(#[source] std::io::Error),
    /// A required argument is missing.
    #[error("{0} is required for this call")]
    Missing(&'static str),
    /// No connection to the plugin.
    #[error("cannot connect to the plugin at {path}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The plugin answered with an error.
    #[error("{call} failed: {code:?}: {message}")]
    Status {
        /// The RPC.
        call: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The plugin's message.
        message: String,
    },
}

/// The socket path of a `unix://` endpoint.
pub fn socket_of(endpoint: &str) -> Result<PathBuf, ClientError> {
    endpoint
        .strip_prefix("unix://")
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .ok_or_else(|| ClientError::Endpoint(endpoint.to_owned()))
}

/// `key=value` items as a map; with `from_files`, each value names a file whose content
/// (without its trailing newline) is the value, so that secrets need not be arguments.
pub fn pairs(
    what: &'static str,
    items: &[&str],
    from_files: bool,
) -> Result<HashMap<String, String>, ClientError> {
    let mut out = HashMap::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| ClientError::Pair {
                what,
                item: (*item).to_owned(),
            })?;
        let v = if from_files {
            std::fs::read_to_string(v)
                .map_err(|source| ClientError::Read {
                    path: v.to_owned(),
                    source,
                })?
                .trim_end_matches('\n')
                .to_owned()
        } else {
            v.to_owned()
        };
        out.insert(k.to_owned(), v);
    }
    Ok(out)
}

/// A channel to the plugin's unix socket (gRPC over HTTP/2, as kubelet speaks it).
pub async fn connect(socket: &Path) -> Result<Channel, ClientError> {
    let path = socket.to_path_buf();
    // the URI is required by tonic and ignored by the connector
    Endpoint::from_static("http://[::]:50051")
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        })
}

fn capability(read_only: bool) -> Option<VolumeCapability> {
    let mode = if read_only {
        Mode::SingleNodeReaderOnly
    } else {
        Mode::SingleNodeWriter
    };
    Some(VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    })
}

fn need<'a>(v: &'a str, what: &'static str) -> Result<&'a str, ClientError> {
    if v.is_empty() {
        Err(ClientError::Missing(what))
    } else {
        Ok(v)
    }
}

fn status(call: &'static str) -> impl FnOnce(tonic::Status) -> ClientError {
    move |s| ClientError::Status {
        call,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// `value` of option `what` as a number (`None`: 0).
pub fn number(what: &'static str, value: Option<&str>) -> Result<i64, ClientError> {
    value.map_or(Ok(0), |v| {
        v.parse().map_err(|_| ClientError::Number {
            what,
            value: v.to_owned(),
        })
    })
}

/// Makes the call on a runtime of its own (for a command line).
pub fn run(op: Op, c: &Call) -> Result<String, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?
        .block_on(call(op, c))
}

/// Makes the call; returns what to print (for a publish, the published `xl-disk` line).
pub async fn call(op: Op, c: &Call) -> Result<String, ClientError> {
    let mut node = NodeClient::new(connect(&c.socket).await?);
    let volume_id = need(&c.volume_id, "--volume-id")?.to_owned();
    let volume_path = if c.target_path.is_empty() {
        &c.staging_path
    } else {
        &c.target_path
    };
    match op {
        Op::Stage => {
            let staging = need(&c.staging_path, "--staging-path")?;
            node.node_stage_volume(NodeStageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging.to_owned(),
                volume_capability: capability(c.read_only),
                secrets: c.secrets.clone(),
                volume_context: c.context.clone(),
                ..Default::default()
            })
            .await
            .map_err(status("NodeStageVolume"))?;
            Ok(format!("staged {volume_id} at {staging}"))
        }
        Op::Publish => {
            let target = need(&c.target_path, "--target-path")?;
            node.node_publish_volume(NodePublishVolumeRequest {
                volume_id,
                staging_target_path: need(&c.staging_path, "--staging-path")?.to_owned(),
                target_path: target.to_owned(),
                volume_capability: capability(c.read_only),
                readonly: c.read_only,
                secrets: c.secrets.clone(),
                volume_context: c.context.clone(),
                ..Default::default()
            })
            .await
            .map_err(status("NodePublishVolume"))?;
            let xl = Path::new(target).join(XL_DISK_FILE);
            let line = std::fs::read_to_string(&xl).map_err(|source| ClientError::Read {
                path: xl.display().to_string(),
                source,
            })?;
            Ok(line.trim_end().to_owned())
        }
        Op::Unpublish => {
            let target = need(&c.target_path, "--target-path")?;
            node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: target.to_owned(),
            })
            .await
            .map_err(status("NodeUnpublishVolume"))?;
            Ok(format!("unpublished {volume_id} from {target}"))
        }
        Op::Unstage => {
            let staging = need(&c.staging_path, "--staging-path")?;
            node.node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging.to_owned(),
            })
            .await
            .map_err(status("NodeUnstageVolume"))?;
            Ok(format!("unstaged {volume_id} from {staging}"))
        }
        Op::Stats => {
            let r = node
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path: need(volume_path, "--target-path or --staging-path")?.to_owned(),
                    staging_target_path: c.staging_path.clone(),
                })
                .await
                .map_err(status("NodeGetVolumeStats"))?
                .into_inner();
            Ok(r.usage
                .iter()
                .map(|u| {
                    let unit = volume_usage::Unit::try_from(u.unit)
                        .map_or_else(|_| u.unit.to_string(), |x| format!("{x:?}").to_lowercase());
                    format!(
                        "total={} used={} available={} unit={unit}",
                        u.total, u.used, u.available
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"))
        }
        Op::Expand => {
            let r = node
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id,
                    volume_path: need(volume_path, "--target-path or --staging-path")?.to_owned(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: c.required_bytes,
                        limit_bytes: 0,
                    }),
                    staging_target_path: c.staging_path.clone(),
                    volume_capability: capability(c.read_only),
                    ..Default::default()
                })
                .await
                .map_err(status("NodeExpandVolume"))?
                .into_inner();
            Ok(format!("capacity_bytes={}", r.capacity_bytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked() {
        assert_eq!(
            socket_of("unix:///run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert!(socket_of("tcp://x:1").is_err());
        assert!(socket_of("unix://relative").is_err());
        let m = pairs("--context", &["pool=rbd", "imageName=a=b"], false).unwrap();
        assert_eq!(m["imageName"], "a=b");
        assert!(matches!(
            pairs("--context", &["novalue"], false),
            Err(ClientError::Pair { .. })
        ));
        assert!(pairs("--secret-file", &["userKey=/nonexistent/x"], true).is_err());
        assert!("frobnicate".parse::<Op>().is_err());
        assert_eq!("expand".parse::<Op>().unwrap(), Op::Expand);
    }
}
