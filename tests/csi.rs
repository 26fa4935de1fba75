//! The CSI node plugin over its real gRPC socket, against the project's local Ceph cluster: a
//! client speaks CSI v1 to `rbdback::csi::serve` the way kubelet does, and the disk string the
//! plugin publishes is attached to a guest over the simulated Xen, whose writes `rbd export`
//! must show.

#![cfg(feature = "csi")]
// the helpers hand the client's `tonic::Status` back as it came
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rbdback::csi::proto::identity_client::IdentityClient;
use rbdback::csi::proto::node_client::NodeClient;
use rbdback::csi::proto::volume_capability::{
    AccessMode, AccessType, BlockVolume, Mode, MountVolume,
};
use rbdback::csi::proto::*;
use rbdback::csi::{Config, DISK_FILE, OPEN_THREAD, STAGE_RECORD, XL_DISK_FILE};
use rbdback::device::backend::{serve, ServeConfig};
use rbdback::device::testfront::{toolstack_attach, toolstack_detach, AttachSpec, SimBlkfront};
use rbdback::device::vbd::{Options, RadosOpener};
use rbdback::rados::testing::{cluster, TestCluster};
use rbdback::ring::Status as RingStatus;
use rbdback::xen::sim::SimXen;
use rbdback::xen::Platform;
use tonic::transport::Channel;
use tonic::Code;

const T: Duration = Duration::from_secs(60);
const GUEST: u16 = 12;

struct Plugin {
    dir: PathBuf,
    rt: tokio::runtime::Runtime,
    node: NodeClient<Channel>,
    identity: IdentityClient<Channel>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn start(c: &TestCluster, name: &str) -> Plugin {
    start_with(c, name, |_| {})
}

fn start_with(c: &TestCluster, name: &str, tweak: impl FnOnce(&mut Config)) -> Plugin {
    let dir = std::env::temp_dir().join(format!("rbdback-csi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("csi.sock");
    let mut cfg = Config {
        driver_name: "rbd.csi.ceph.com".into(),
        node_id: "xen-host-1".into(),
        state_dir: dir.join("state"),
        ceph_conf: Some(c.conf.display().to_string()),
        clusters: None,
        open_timeout: Duration::from_secs(30),
        stats_wait: Duration::from_secs(10),
        stats_deadline: Duration::from_secs(30),
    };
    tweak(&mut cfg);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = sock.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(rbdback::csi::serve(cfg, &s, async {
            let _ = stopped.await;
        }))
        .unwrap();
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let channel = rt.block_on(async {
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        rbdback::csi::client::connect(&sock).await.unwrap()
    });
    Plugin {
        dir,
        rt,
        node: NodeClient::new(channel.clone()),
        identity: IdentityClient::new(channel),
        _stop: stop,
    }
}

fn admin_key(c: &TestCluster) -> String {
    let keyring = c.conf.parent().unwrap().join("ceph.client.admin.keyring");
    let text = std::fs::read_to_string(&keyring).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .unwrap()
        .trim()
        .to_owned()
}

fn mount(mode: Mode) -> Option<VolumeCapability> {
    Some(VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    })
}

fn stage_req(p: &Plugin, c: &TestCluster, volume: &str, image: &str) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: p
            .dir
            .join(format!("staging-{volume}"))
            .display()
            .to_string(),
        volume_capability: mount(Mode::SingleNodeWriter),
        secrets: HashMap::from([
            ("userID".into(), "admin".into()),
            ("userKey".into(), admin_key(c)),
        ]),
        volume_context: HashMap::from([
            ("clusterID".into(), "test".into()),
            ("pool".into(), "rbd".into()),
            ("imageName".into(), image.into()),
        ]),
        ..Default::default()
    }
}

fn publish_req(stage: &NodeStageVolumeRequest, target: &Path) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: stage.volume_id.clone(),
        staging_target_path: stage.staging_target_path.clone(),
        target_path: target.display().to_string(),
        volume_capability: stage.volume_capability.clone(),
        volume_context: stage.volume_context.clone(),
        ..Default::default()
    }
}

impl Plugin {
    fn stage(&mut self, r: NodeStageVolumeRequest) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.rt.block_on(n.node_stage_volume(r)).map(drop)
    }
    fn publish(&mut self, r: NodePublishVolumeRequest) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.rt.block_on(n.node_publish_volume(r)).map(drop)
    }
    fn unpublish(&mut self, volume_id: &str, target: &Path) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        let r = NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: target.display().to_string(),
        };
        self.rt.block_on(n.node_unpublish_volume(r)).map(drop)
    }
    fn unstage(&mut self, volume_id: &str, staging: &str) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        let r = NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging.into(),
        };
        self.rt.block_on(n.node_unstage_volume(r)).map(drop)
    }
    /// NodeGetVolumeStats as kubelet asks it (the publish path and the staging path).
    fn stats(&mut self, volume_id: &str, path: &Path) -> Result<VolumeUsage, tonic::Status> {
        let mut n = self.node.clone();
        let r = NodeGetVolumeStatsRequest {
            volume_id: volume_id.into(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        };
        let mut resp = self.rt.block_on(n.node_get_volume_stats(r))?.into_inner();
        assert_eq!(resp.usage.len(), 1, "{resp:?}");
        assert_eq!(
            resp.volume_condition, None,
            "VOLUME_CONDITION is not offered"
        );
        let u = resp.usage.remove(0);
        assert_eq!(u.unit, volume_usage::Unit::Bytes as i32);
        assert_eq!(u.available, u.total - u.used);
        Ok(u)
    }
    fn expand(
        &mut self,
        volume_id: &str,
        path: &Path,
        required: i64,
    ) -> Result<i64, tonic::Status> {
        let mut n = self.node.clone();
        let r = NodeExpandVolumeRequest {
            volume_id: volume_id.into(),
            volume_path: path.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: required,
                limit_bytes: 0,
            }),
            volume_capability: mount(Mode::SingleNodeWriter),
            ..Default::default()
        };
        Ok(self
            .rt
            .block_on(n.node_expand_volume(r))?
            .into_inner()
            .capacity_bytes)
    }
}

#[test]
fn identity_and_node_describe_the_plugin() {
    let c = cluster();
    let mut p = start(c, "identity");
    let mut id = p.identity.clone();
    let info =
        p.rt.block_on(id.get_plugin_info(GetPluginInfoRequest {}))
            .unwrap()
            .into_inner();
    assert_eq!(info.name, "rbd.csi.ceph.com");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps =
        p.rt.block_on(id.get_plugin_capabilities(GetPluginCapabilitiesRequest {}))
            .unwrap()
            .into_inner();
    assert!(
        caps.capabilities.is_empty(),
        "node only: no controller service"
    );
    let probe =
        p.rt.block_on(id.probe(ProbeRequest {}))
            .unwrap()
            .into_inner();
    assert_eq!(probe.ready, Some(BoolValue { value: true }));
    let mut n = p.node.clone();
    let caps =
        p.rt.block_on(n.node_get_capabilities(NodeGetCapabilitiesRequest {}))
            .unwrap()
            .into_inner();
    use node_service_capability::{Rpc, RpcType, Type};
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .map(|c| match &c.r#type {
            Some(Type::Rpc(Rpc { r#type })) => *r#type,
            None => 0,
        })
        .collect();
    assert_eq!(
        rpcs,
        [
            RpcType::StageUnstageVolume,
            RpcType::GetVolumeStats,
            RpcType::ExpandVolume
        ]
        .map(|t| t as i32)
    );
    let info =
        p.rt.block_on(n.node_get_info(NodeGetInfoRequest {}))
            .unwrap()
            .into_inner();
    assert_eq!(info.node_id, "xen-host-1");
    let e = p.unstage("", "/x").expect_err("volume_id is required");
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[test]
fn a_published_volume_is_a_disk_a_guest_gets() {
    let c = cluster();
    let image = c.create_image("csi-vol", 16, None);
    let mut p = start(c, "publish");
    let stage = stage_req(&p, c, "vol-1", &image);
    p.stage(stage.clone()).unwrap();
    p.stage(stage.clone()).unwrap(); // idempotent
    let staging = PathBuf::from(&stage.staging_target_path);
    assert!(staging.join(STAGE_RECORD).exists());
    let keys: Vec<_> = std::fs::read_dir(p.dir.join("state/keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(keys.len(), 1);
    let mode = std::fs::metadata(&keys[0]).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "keyring readable by its owner only");
    assert!(std::fs::read_to_string(&keys[0])
        .unwrap()
        .contains(&admin_key(c)));

    let target = p.dir.join("pods/uid-1/volumes/vol-1/mount");
    p.publish(publish_req(&stage, &target)).unwrap();
    p.publish(publish_req(&stage, &target)).unwrap(); // idempotent
    let disk = std::fs::read_to_string(target.join(DISK_FILE)).unwrap();
    let disk = disk.trim();
    assert!(
        disk.starts_with(&format!("rbd:rbd/{image}:id=admin:keyring=")),
        "{disk}"
    );
    assert!(
        !disk.contains(&admin_key(c)),
        "the secret stays in the keyring file"
    );
    let xl = std::fs::read_to_string(target.join(XL_DISK_FILE)).unwrap();
    assert_eq!(
        xl.trim(),
        format!("access=rw, backendtype=phy, script=block-rbdback, target={disk}")
    );

    // what the toolstack does with it: a guest disk served by rbdback
    let data = vec![0xc5u8; 8192];
    assert_eq!(guest_writes(disk, &data), 16 << 11);
    assert!(
        c.export(&image)[1 << 20..][..8192] == data[..],
        "rbd export shows the guest's write"
    );

    p.unpublish("vol-1", &target).unwrap();
    assert!(!target.exists());
    p.unpublish("vol-1", &target).unwrap(); // idempotent
    p.unstage("vol-1", &stage.staging_target_path).unwrap();
    assert!(!staging.join(STAGE_RECORD).exists());
    assert!(!keys[0].exists(), "the keyring goes with the stage");
    p.unstage("vol-1", &stage.staging_target_path).unwrap(); // idempotent
}

#[test]
fn bad_requests_get_csi_error_codes() {
    let c = cluster();
    let image = c.create_image("csi-bad", 8, None);
    let mut p = start(c, "errors");
    let good = stage_req(&p, c, "vol-e", &image);
    let code = |p: &mut Plugin, r: NodeStageVolumeRequest| p.stage(r).unwrap_err().code();

    let mut r = good.clone();
    r.volume_id.clear();
    assert_eq!(code(&mut p, r), Code::InvalidArgument);
    let mut r = good.clone();
    r.volume_capability = None;
    assert_eq!(code(&mut p, r), Code::InvalidArgument);
    let mut r = good.clone();
    r.staging_target_path = "relative/path".into();
    assert_eq!(code(&mut p, r), Code::InvalidArgument);
    let mut r = good.clone();
    r.volume_capability = Some(VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    });
    let e = p.stage(r).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("Filesystem"), "{}", e.message());

    let mut r = good.clone();
    r.volume_context
        .insert("imageName".into(), "no-such-image".into());
    let e = p.stage(r).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert!(e.message().contains("no-such-image"), "{}", e.message());

    let mut r = good.clone();
    r.secrets.insert("userKey".into(), "not a key".into());
    assert_eq!(code(&mut p, r), Code::InvalidArgument);
    // a well-formed key that is not the user's: one character of the secret changed
    let mut r = good.clone();
    let mut key: Vec<char> = admin_key(c).chars().collect();
    key[24] = if key[24] == 'A' { 'B' } else { 'A' };
    r.secrets
        .insert("userKey".into(), key.into_iter().collect());
    let e = p.stage(r).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // failed stages leave no keyring behind
    let keys = std::fs::read_dir(p.dir.join("state/keys")).unwrap().count();
    assert_eq!(keys, 0, "keyrings of failed stages");

    // publishing what was never staged
    let target = p.dir.join("target-e");
    let e = p.publish(publish_req(&good, &target)).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(!target.exists());

    // a staging path holds one volume
    p.stage(good.clone()).unwrap();
    let mut other = good.clone();
    other.volume_id = "vol-other".into();
    assert_eq!(code(&mut p, other), Code::AlreadyExists);
    // read-only publication
    let mut r = publish_req(&good, &target);
    r.readonly = true;
    p.publish(r).unwrap();
    let xl = std::fs::read_to_string(target.join(XL_DISK_FILE)).unwrap();
    assert!(xl.starts_with("access=ro, "), "{xl}");
    p.unpublish("vol-e", &target).unwrap();
    p.unstage("vol-e", &good.staging_target_path).unwrap();
}

/// The volume id and the paths come from kubelet, untrusted: an id that could be read as a
/// path or break a record line, a path with `..` or no root, is refused with
/// `INVALID_ARGUMENT` naming the field, by every call, before anything is read or written.
#[test]
fn ids_and_paths_that_could_escape_are_refused_by_every_call() {
    let c = cluster();
    let image = c.create_image("csi-untrusted", 8, None);
    let mut p = start(c, "untrusted");
    let good = stage_req(&p, c, "vol-u", &image);
    p.stage(good.clone()).unwrap();
    let staging = PathBuf::from(&good.staging_target_path);
    let target = p.dir.join("pods/uid-u/volumes/vol-u/mount");
    p.publish(publish_req(&good, &target)).unwrap();
    let refused = |r: Result<(), tonic::Status>, field: &str| {
        let e = r.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().starts_with(field), "{}", e.message());
    };
    let long = "v".repeat(257);
    let bad_ids = [
        "../vol-u",
        "vol/u",
        "..",
        "vol-u\nvolume_id x",
        "vol\0u",
        &long,
    ];
    for id in bad_ids {
        let mut r = good.clone();
        r.volume_id = id.into();
        // a stage of it would write a record and a keyring
        r.staging_target_path = p.dir.join("staging-bad").display().to_string();
        refused(p.stage(r.clone()), "volume_id");
        let mut pr = publish_req(&good, &p.dir.join("target-bad"));
        pr.volume_id = id.into();
        refused(p.publish(pr), "volume_id");
        refused(p.unpublish(id, &target), "volume_id");
        refused(p.unstage(id, &good.staging_target_path), "volume_id");
        refused(p.stats(id, &target).map(drop), "volume_id");
        refused(p.expand(id, &target, 0).map(drop), "volume_id");
    }
    assert!(!p.dir.join("staging-bad").exists());
    assert!(!p.dir.join("target-bad").exists());
    assert_eq!(
        std::fs::read_dir(p.dir.join("state/keys")).unwrap().count(),
        1,
        "no keyring but the good volume's"
    );

    // the good volume's own paths, spelt with `..`: refused, not followed
    let dotted = |path: &Path| {
        let name = path.file_name().unwrap().to_str().unwrap();
        path.parent().unwrap().join("x/..").join(name)
    };
    refused(
        p.unstage("vol-u", &dotted(&staging).display().to_string()),
        "staging_target_path",
    );
    refused(p.unpublish("vol-u", &dotted(&target)), "target_path");
    refused(p.stats("vol-u", &dotted(&target)).map(drop), "volume_path");
    refused(
        p.expand("vol-u", &dotted(&target), 0).map(drop),
        "volume_path",
    );
    let mut r = publish_req(&good, &p.dir.join("target-dots/../target-u2"));
    refused(p.publish(r.clone()), "target_path");
    r.target_path = p.dir.join("target-u2").display().to_string();
    r.staging_target_path = dotted(&staging).display().to_string();
    refused(p.publish(r), "staging_target_path");
    let mut r = good.clone();
    r.staging_target_path = dotted(&staging).display().to_string();
    refused(p.stage(r), "staging_target_path");
    let mut r = good.clone();
    r.staging_target_path = format!("{}\n", good.staging_target_path);
    refused(p.stage(r), "staging_target_path");
    refused(
        p.unpublish("vol-u", Path::new("relative/mount")),
        "target_path",
    );
    assert!(!p.dir.join("target-u2").exists());
    assert!(target.join(DISK_FILE).exists() && staging.join(STAGE_RECORD).exists());

    p.unpublish("vol-u", &target).unwrap();
    p.unstage("vol-u", &good.staging_target_path).unwrap();
    assert!(!staging.join(STAGE_RECORD).exists());
}

/// Unstage and unpublish remove only what the plugin made for the volume they name: another
/// volume's stage or publication, or files rbdback did not write, are left alone (and the call
/// answers OK: the named volume is not there, as the CSI specification has it). A publish to
/// a target that holds another volume, the same volume with another access, or files rbdback
/// did not write is `ALREADY_EXISTS`; the same publish again is OK.
#[test]
fn unstage_and_unpublish_touch_only_their_volume_and_publish_refuses_a_taken_target() {
    let c = cluster();
    let (img_a, img_b) = (
        c.create_image("csi-own-a", 8, None),
        c.create_image("csi-own-b", 8, None),
    );
    let mut p = start(c, "own");
    let (sa, sb) = (
        stage_req(&p, c, "vol-a", &img_a),
        stage_req(&p, c, "vol-b", &img_b),
    );
    p.stage(sa.clone()).unwrap();
    p.stage(sb.clone()).unwrap();
    // A staged again: the same access is idempotent, read-only over its read-write stage is
    // incompatible (CSI: ALREADY_EXISTS), and the stage is left as it was
    let record = Path::new(&sa.staging_target_path).join(STAGE_RECORD);
    let staged_a = std::fs::read_to_string(&record).unwrap();
    p.stage(sa.clone()).unwrap();
    let mut sa_ro = sa.clone();
    sa_ro.volume_capability = mount(Mode::SingleNodeReaderOnly);
    let e = p.stage(sa_ro).unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert!(
        e.message().contains("staged") && e.message().contains("access=rw"),
        "{}",
        e.message()
    );
    assert_eq!(std::fs::read_to_string(&record).unwrap(), staged_a);
    let (ta, tb) = (p.dir.join("target-a"), p.dir.join("target-b"));
    p.publish(publish_req(&sa, &ta)).unwrap();
    p.publish(publish_req(&sb, &tb)).unwrap();
    let files = |dir: &Path| -> Vec<(String, String)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                (name, std::fs::read_to_string(e.path()).unwrap())
            })
            .collect();
        v.sort();
        v
    };
    let key_dir = p.dir.join("state/keys");
    let keys = || std::fs::read_dir(&key_dir).unwrap().count();
    let (staged_b, published_b) = (files(Path::new(&sb.staging_target_path)), files(&tb));
    assert_eq!(keys(), 2);

    // A's calls naming B's paths
    p.unpublish("vol-a", &tb).unwrap();
    assert_eq!(files(&tb), published_b, "B's publication is intact");
    p.unstage("vol-a", &sb.staging_target_path).unwrap();
    assert_eq!(files(Path::new(&sb.staging_target_path)), staged_b);
    assert_eq!(keys(), 2, "both keyrings are there");
    // A publishing over B's target
    let e = p.publish(publish_req(&sa, &tb)).unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert!(
        e.message().contains("publishes volume vol-b"),
        "{}",
        e.message()
    );
    assert_eq!(files(&tb), published_b);
    // B is still served: stats find it at its target
    p.stats("vol-b", &tb).unwrap();

    // A again, read-only this time: incompatible with its read-write publication
    let mut ro = publish_req(&sa, &ta);
    ro.readonly = true;
    let e = p.publish(ro.clone()).unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert!(
        e.message().contains("access=rw") && e.message().contains("access=ro"),
        "{}",
        e.message()
    );
    let xl = std::fs::read_to_string(ta.join(XL_DISK_FILE)).unwrap();
    assert!(xl.starts_with("access=rw, "), "{xl}");
    p.publish(publish_req(&sa, &ta)).unwrap(); // the same again: OK
                                               // a publication cut short before its xl-disk is completed by the retry
    std::fs::remove_file(ta.join(XL_DISK_FILE)).unwrap();
    p.publish(ro.clone()).unwrap();
    let xl = std::fs::read_to_string(ta.join(XL_DISK_FILE)).unwrap();
    assert!(xl.starts_with("access=ro, "), "{xl}");
    p.unpublish("vol-a", &ta).unwrap();
    assert!(!ta.exists());

    // files rbdback did not write, at a target and a staging path it never used
    let foreign = p.dir.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join(DISK_FILE), "someone else's\n").unwrap();
    let before = files(&foreign);
    let e = p.publish(publish_req(&sa, &foreign)).unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert!(e.message().contains("did not write"), "{}", e.message());
    p.unpublish("vol-a", &foreign).unwrap();
    p.unstage("vol-a", &foreign.display().to_string()).unwrap();
    std::fs::write(foreign.join(STAGE_RECORD), "not a record\n").unwrap();
    let before_rec = files(&foreign);
    p.unpublish("vol-a", &foreign).unwrap();
    p.unstage("vol-a", &foreign.display().to_string()).unwrap();
    assert_eq!(files(&foreign), before_rec, "left alone");
    assert!(before_rec.len() == before.len() + 1);
    let e = p.publish(publish_req(&sa, &foreign)).unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert_eq!(keys(), 2, "no keyring went with those calls");

    // each volume's own calls remove its own
    p.unpublish("vol-b", &tb).unwrap();
    assert!(!tb.exists());
    p.unstage("vol-b", &sb.staging_target_path).unwrap();
    p.unstage("vol-a", &sa.staging_target_path).unwrap();
    assert_eq!(keys(), 0);
    for s in [&sa, &sb] {
        assert!(!Path::new(&s.staging_target_path)
            .join(STAGE_RECORD)
            .exists());
    }
}

/// A guest over the simulated Xen with one disk attached by the toolstack and served by
/// rbdback, which re-reads the image's size every 300 ms.
struct Guest {
    _xen: Arc<SimXen>,
    dom0: rbdback::xen::xenstore::Xenstore,
    be: String,
    front: SimBlkfront,
    stop: mpsc::Sender<()>,
    server: std::thread::JoinHandle<()>,
}

impl Guest {
    fn attach(disk: &str) -> Guest {
        let xen = SimXen::start().unwrap();
        let platform = Arc::new(xen.platform());
        let cfg = ServeConfig {
            kind: "vbd".into(),
            backend_domid: 0,
            domid: GUEST,
            exit_when_empty: false,
            options: Options {
                resize_poll: Duration::from_millis(300),
                ..Options::default()
            },
        };
        let (stop, rx) = mpsc::channel();
        let server = std::thread::spawn(move || {
            serve(platform, Arc::new(RadosOpener), &cfg, &rx).unwrap();
        });
        let dom0 = xen.platform().xenstore().unwrap();
        let spec = AttachSpec::new(disk);
        let (be, fe) = toolstack_attach(&dom0, 0, GUEST, &spec).unwrap();
        let front = SimBlkfront::connect(xen.frontend(GUEST).unwrap(), &be, &fe, &spec, T).unwrap();
        Guest {
            _xen: xen,
            dom0,
            be,
            front,
            stop,
            server,
        }
    }

    fn write(&mut self, sector: u64, data: &[u8]) {
        assert_eq!(
            self.front.write_sync(0, sector, 0, data).unwrap(),
            RingStatus::Okay
        );
    }

    fn detach(mut self) {
        self.front.close(T).unwrap();
        toolstack_detach(&self.dom0, &self.be).unwrap();
        let _ = self.stop.send(());
        self.server.join().unwrap();
    }
}

/// Attaches `disk` to a guest, writes `data` at 1 MiB, detaches; returns the disk's size in
/// sectors as the guest saw it.
fn guest_writes(disk: &str, data: &[u8]) -> u64 {
    let mut g = Guest::attach(disk);
    g.write(2048, data);
    let sectors = g.front.sectors;
    g.detach();
    sectors
}

#[test]
fn ceph_csi_cluster_map_gives_the_monitors() {
    let c = cluster();
    let image = c.create_image("csi-map", 8, None);
    let conf = std::fs::read_to_string(&c.conf).unwrap();
    let mon = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("mon host = "))
        .unwrap()
        .to_owned();
    let map = std::env::temp_dir().join(format!("rbdback-csi-map-{}.json", std::process::id()));
    std::fs::write(
        &map,
        format!(r#"[{{"clusterID":"other","monitors":["192.0.2.1:6789"]}},{{"clusterID":"lab","monitors":["{mon}"]}}]"#),
    )
    .unwrap();
    // no ceph.conf at all: monitors from the map, key from the secrets
    let m = map.clone();
    let mut p = start_with(c, "map", move |cfg| {
        cfg.ceph_conf = None;
        cfg.clusters = Some(m);
    });
    let mut stage = stage_req(&p, c, "vol-m", &image);
    stage
        .volume_context
        .insert("clusterID".into(), "lab".into());
    p.stage(stage.clone()).unwrap();
    let target = p.dir.join("target-m");
    p.publish(publish_req(&stage, &target)).unwrap();
    let disk = std::fs::read_to_string(target.join(DISK_FILE)).unwrap();
    assert!(
        disk.contains(":mon_host=") && !disk.contains(":conf="),
        "{disk}"
    );
    let data = vec![0x3cu8; 4096];
    assert_eq!(guest_writes(disk.trim(), &data), 8 << 11);
    assert!(c.export(&image)[1 << 20..][..4096] == data[..]);
    // a cluster the map does not know
    let mut r = stage_req(&p, c, "vol-n", &image);
    r.volume_context
        .insert("clusterID".into(), "nowhere".into());
    let e = p.stage(r).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("nowhere"), "{}", e.message());
    let _ = std::fs::remove_file(&map);
}

const MIB: i64 = 1 << 20;

/// ceph-csi's controller grows the image (`rbd resize`, as ControllerExpandVolume does);
/// NodeExpandVolume sees the new size, the guest's backend makes the guest see it, and I/O
/// past the old end works. NodeGetVolumeStats follows: total is the image's size, used bytes
/// grow with the guest's writes (whole 4 MiB objects, from the object map).
#[test]
fn an_expanded_volume_grows_in_the_guest_and_stats_follow_its_writes() {
    let c = cluster();
    let image = c.create_image("csi-grow", 8, None);
    let mut p = start(c, "grow");
    let stage = stage_req(&p, c, "vol-g", &image);
    p.stage(stage.clone()).unwrap();
    let target = p.dir.join("pods/uid-g/volumes/vol-g/mount");
    p.publish(publish_req(&stage, &target)).unwrap();
    let u = p.stats("vol-g", &target).unwrap();
    assert_eq!((u.total, u.used), (8 * MIB, 0), "a new image holds nothing");

    let disk = std::fs::read_to_string(target.join(DISK_FILE)).unwrap();
    let mut g = Guest::attach(disk.trim());
    assert_eq!(g.front.sectors, 8 << 11);
    g.write(2048, &[0x11; 8192]);
    let u = p.stats("vol-g", &target).unwrap();
    assert_eq!((u.total, u.used), (8 * MIB, 4 * MIB), "the write's object");
    // the staging path answers too
    let staging = PathBuf::from(&stage.staging_target_path);
    assert_eq!(p.stats("vol-g", &staging).unwrap().used, 4 * MIB);

    // before the controller grew it, the node cannot give 16 MiB
    let e = p.expand("vol-g", &target, 16 * MIB).unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    assert!(
        e.message().contains("ControllerExpandVolume"),
        "{}",
        e.message()
    );
    c.rbd(&[
        "resize",
        "--no-progress",
        "--size",
        "16M",
        &format!("rbd/{image}"),
    ]);
    assert_eq!(p.expand("vol-g", &target, 16 * MIB).unwrap(), 16 * MIB);
    assert_eq!(
        p.expand("vol-g", &target, 16 * MIB).unwrap(),
        16 * MIB,
        "idempotent"
    );
    assert_eq!(
        g.front.wait_resize(T).unwrap(),
        16 << 11,
        "the guest sees 16 MiB"
    );
    // past the old end
    let data = vec![0x5a; 4096];
    g.write(12 << 11, &data);
    let (st, back) = g.front.read_sync(0, 12 << 11, 1, 4096).unwrap();
    assert_eq!((st, back), (RingStatus::Okay, data.clone()));
    let u = p.stats("vol-g", &target).unwrap();
    assert_eq!((u.total, u.used), (16 * MIB, 8 * MIB));
    g.detach();
    assert!(c.export(&image)[12 << 20..][..4096] == data[..]);

    p.unpublish("vol-g", &target).unwrap();
    p.unstage("vol-g", &stage.staging_target_path).unwrap();
    let e = p.stats("vol-g", &target).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
}

/// Without an object map the used bytes come from asking for every object, as `rbd du`
/// does; bad stats and expand requests get the CSI specification's codes.
#[test]
fn stats_without_an_object_map_and_bad_requests() {
    let c = cluster();
    let image = c.create_image("csi-plain", 8, Some("layering"));
    let mut p = start(c, "plain");
    let stage = stage_req(&p, c, "vol-p", &image);
    p.stage(stage.clone()).unwrap();
    let staging = PathBuf::from(&stage.staging_target_path);
    assert_eq!(p.stats("vol-p", &staging).unwrap().used, 0);
    let target = p.dir.join("target-p");
    p.publish(publish_req(&stage, &target)).unwrap();
    let disk = std::fs::read_to_string(target.join(DISK_FILE)).unwrap();
    guest_writes(disk.trim(), &[0x22; 4096]);
    let u = p.stats("vol-p", &target).unwrap();
    assert_eq!((u.total, u.used), (8 * MIB, 4 * MIB));

    let code = |r: Result<VolumeUsage, tonic::Status>| r.unwrap_err().code();
    assert_eq!(code(p.stats("", &target)), Code::InvalidArgument);
    assert_eq!(code(p.stats("vol-p", Path::new(""))), Code::InvalidArgument);
    assert_eq!(
        code(p.stats("vol-p", Path::new("relative"))),
        Code::InvalidArgument
    );
    assert_eq!(code(p.stats("vol-other", &target)), Code::NotFound);
    assert_eq!(
        code(p.stats("vol-p", &p.dir.join("nowhere"))),
        Code::NotFound
    );
    let e = p.expand("vol-p", &target, -1).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let e = p.expand("vol-other", &target, 0).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert_eq!(p.expand("vol-p", &target, 0).unwrap(), 8 * MIB);
    let e = p.expand("vol-p", &target, 9 * MIB).unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    p.unpublish("vol-p", &target).unwrap();
    p.unstage("vol-p", &stage.staging_target_path).unwrap();
}

/// The cluster's ceph.conf plus Ceph's own fault injection: every reply from the OSDs comes
/// up to `max_s` seconds late (the monitors answer as usual).
fn delayed_conf(c: &TestCluster, name: &str, max_s: &str) -> String {
    let conf = std::fs::read_to_string(&c.conf).unwrap().replacen(
        "[global]\n",
        &format!(
            "[global]\n\tms inject delay type = osd\n\tms inject delay probability = 1\n\
             \tms inject delay max = {max_s}\n"
        ),
        1,
    );
    assert!(conf.contains("ms inject delay max"), "no [global] section");
    let path = std::env::temp_dir().join(format!("rbdback-csi-{name}-{}.conf", std::process::id()));
    std::fs::write(&path, conf).unwrap();
    path.display().to_string()
}

/// Ids of this process's threads named `name`.
fn threads_named(name: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let tid = e.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            (comm.trim_end() == name).then_some(tid)
        })
        .collect()
}

/// Watches this process's threads named `name` every 10 ms until stopped; then tells the
/// most that were alive at once and every thread id seen. A thread counts once it has kept
/// the name for 500 ms: threads that librados starts carry their parent's name until the
/// parent names them, which a loaded machine can delay well past one sample.
struct ThreadCensus {
    stop: Arc<std::sync::atomic::AtomicBool>,
    h: std::thread::JoinHandle<(usize, std::collections::HashSet<String>)>,
}

impl ThreadCensus {
    fn start(name: &'static str) -> ThreadCensus {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let h = std::thread::spawn(move || {
            let (mut most, mut seen) = (0, std::collections::HashSet::new());
            let mut since: std::collections::HashMap<String, Instant> =
                std::collections::HashMap::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let now = threads_named(name);
                since.retain(|t, _| now.contains(t));
                for t in &now {
                    since.entry(t.clone()).or_insert_with(Instant::now);
                }
                let steady: Vec<_> = since
                    .iter()
                    .filter(|(_, t0)| t0.elapsed() >= Duration::from_millis(500))
                    .map(|(t, _)| t.clone())
                    .collect();
                most = most.max(steady.len());
                seen.extend(steady);
                std::thread::sleep(Duration::from_millis(10));
            }
            (most, seen)
        });
        ThreadCensus { stop, h }
    }

    fn finish(self) -> (usize, std::collections::HashSet<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.h.join().unwrap()
    }
}

/// A plugin whose cluster's OSDs answer up to `max_s` seconds late, whose calls wait 1 s for
/// an open; a stage request for a new volume `vol-<name>`; a census of opening threads.
fn slow_osds(name: &str, max_s: &str) -> (Plugin, NodeStageVolumeRequest, ThreadCensus) {
    let c = cluster();
    let image = c.create_image(&format!("csi-{name}"), 8, None);
    let conf = delayed_conf(c, name, max_s);
    let p = start_with(c, name, |cfg| {
        cfg.ceph_conf = Some(conf);
        cfg.open_timeout = Duration::from_secs(1);
    });
    let stage = stage_req(&p, c, &format!("vol-{name}"), &image);
    (p, stage, ThreadCensus::start(OPEN_THREAD))
}

/// OSDs that do not answer: the stage's open hangs. kubelet's retries, and calls made all at
/// once (a CO that lost its state), answer within about the open timeout (UNAVAILABLE) or at
/// once (ABORTED: another call waits), and only one opening thread ever exists.
#[test]
fn a_hanging_open_runs_once_however_often_kubelet_retries() {
    let (mut p, stage, census) = slow_osds("hang", "600");
    let prompt = Duration::from_secs(4);
    for attempt in 0..4 {
        let t0 = Instant::now();
        let e = p.stage(stage.clone()).unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
        assert!(
            e.message().contains("retry takes its result"),
            "{}",
            e.message()
        );
        assert!(
            t0.elapsed() < prompt,
            "attempt {attempt} took {:?}",
            t0.elapsed()
        );
    }
    let node = p.node.clone();
    let timed = |r: NodeStageVolumeRequest| {
        let mut n = node.clone();
        async move {
            let t0 = Instant::now();
            let code = n.node_stage_volume(r).await.unwrap_err().code();
            (code, t0.elapsed())
        }
    };
    let (a, b, d) = p.rt.block_on(async {
        tokio::join!(
            timed(stage.clone()),
            timed(stage.clone()),
            timed(stage.clone())
        )
    });
    let mut codes: Vec<_> = [a, b, d].iter().map(|(c, _)| *c).collect();
    codes.sort_by_key(|c| *c as i32);
    assert_eq!(codes, [Code::Aborted, Code::Aborted, Code::Unavailable]);
    for (code, took) in [a, b, d] {
        // "at once": well under the open's wait, with room for a loaded CI machine
        let bound = if code == Code::Aborted {
            Duration::from_secs(2)
        } else {
            prompt
        };
        assert!(took < bound, "{code:?} took {took:?}");
    }
    let (most, seen) = census.finish();
    assert_eq!((most, seen.len()), (1, 1), "opening threads: {seen:?}");
    let opener = seen.iter().next().unwrap();
    assert!(
        threads_named(OPEN_THREAD).contains(opener),
        "the open still hangs"
    );
    let staging = PathBuf::from(&stage.staging_target_path);
    assert!(!staging.join(STAGE_RECORD).exists());
    let keys = std::fs::read_dir(p.dir.join("state/keys")).unwrap().count();
    assert_eq!(keys, 0, "no keyring left by the failed stages");
}

/// OSDs that answer late: the open takes longer than a call waits. The retry that comes
/// after it finished takes its result; no second open is made.
#[test]
fn an_open_that_outlives_its_call_serves_the_retry() {
    let (mut p, stage, census) = slow_osds("late", "0.5");
    let deadline = Instant::now() + T;
    let mut waited = 0;
    loop {
        match p.stage(stage.clone()) {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
                waited += 1;
            }
        }
        assert!(Instant::now() < deadline, "never staged");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (most, seen) = census.finish();
    assert!(
        waited > 0,
        "the open was quicker than the call's wait: nothing tested"
    );
    assert_eq!((most, seen.len()), (1, 1), "opening threads: {seen:?}");
    assert!(PathBuf::from(&stage.staging_target_path)
        .join(STAGE_RECORD)
        .exists());
    p.unstage("vol-late", &stage.staging_target_path).unwrap();
}

/// `rbdback csi-call`, the test bed's client, against a plugin: the calls kubelet makes with
/// a ceph-csi style volume context and secrets (the key from a file), the published xl-disk
/// line on stdout (a guest's write through it reaches the image), stats and expand; a
/// refused call exits non-zero naming the gRPC code, and unstage leaves no keyring.
#[test]
fn csi_call_makes_the_calls_kubelet_makes() {
    let c = cluster();
    let image = c.create_image("csi-call", 8, None);
    let p = start(c, "call");
    let endpoint = format!("unix://{}", p.dir.join("csi.sock").display());
    let key_file = p.dir.join("user-key");
    std::fs::write(&key_file, format!("{}\n", admin_key(c))).unwrap();
    let staging = p.dir.join("staging-c").display().to_string();
    let target = p.dir.join("target-c").display().to_string();
    let run = |call: &str, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rbdback"))
            .args([
                "csi-call",
                call,
                "--endpoint",
                &endpoint,
                "--volume-id",
                "vol-c",
            ])
            .args(args)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim_end().to_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let image_ctx = format!("imageName={image}");
    let key_arg = format!("userKey={}", key_file.display());
    let stage = |image_ctx: &str| {
        #[rustfmt::skip]
        let args = [
            "--context", "clusterID=test", "--context", "pool=rbd", "--context", image_ctx,
            "--secret", "userID=admin", "--secret-file", &key_arg, "--staging-path", &staging,
        ];
        run("stage", &args)
    };
    let (ok, _, err) = stage("imageName=no-such-image");
    assert!(
        !ok && err.contains("NotFound") && err.contains("no-such-image"),
        "{err}"
    );
    let (ok, out, err) = stage(&image_ctx);
    assert!(ok, "{err}");
    assert_eq!(out, format!("staged vol-c at {staging}"));

    let (ok, xl, err) = run(
        "publish",
        &["--staging-path", &staging, "--target-path", &target],
    );
    assert!(ok, "{err}");
    let file = std::fs::read_to_string(Path::new(&target).join(XL_DISK_FILE)).unwrap();
    assert_eq!(xl, file.trim_end(), "the published xl-disk line");
    let disk = xl
        .strip_prefix("access=rw, backendtype=phy, script=block-rbdback, target=")
        .unwrap_or_else(|| panic!("{xl}"));
    assert!(!xl.contains(&admin_key(c)), "no secret on stdout");
    let data = vec![0x77u8; 4096];
    guest_writes(disk, &data);
    assert!(c.export(&image)[1 << 20..][..4096] == data[..]);

    let (ok, out, err) = run("stats", &["--target-path", &target]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        format!(
            "total={} used={} available={} unit=bytes",
            8 * MIB,
            4 * MIB,
            4 * MIB
        )
    );
    c.rbd(&[
        "resize",
        "--no-progress",
        "--size",
        "12M",
        &format!("rbd/{image}"),
    ]);
    let want = (12 * MIB).to_string();
    let (ok, out, err) = run(
        "expand",
        &["--target-path", &target, "--required-bytes", &want],
    );
    assert!(ok, "{err}");
    assert_eq!(out, format!("capacity_bytes={want}"));

    let (ok, _, err) = run("unpublish", &["--target-path", &target]);
    assert!(ok, "{err}");
    let (ok, _, err) = run("unstage", &["--staging-path", &staging]);
    assert!(ok, "{err}");
    let keys = std::fs::read_dir(p.dir.join("state/keys")).unwrap().count();
    assert_eq!(keys, 0, "unstage leaves no keyring");
    let (ok, _, err) = run("stats", &["--target-path", &target]);
    assert!(!ok && err.contains("NotFound"), "{err}");
}

/// A count of used bytes whose cluster stops answering: calls answer within their wait with
/// the latest count, one counting thread runs for the volume, and once its deadline passed
/// the next call says so (UNAVAILABLE, naming the time).
#[test]
fn stats_of_a_silent_cluster_answer_in_time_with_one_count_running() {
    let c = cluster();
    let image = c.create_image("csi-count", 8, None);
    // the disk string names this file: rewriting it changes what the next connection does
    let conf = std::env::temp_dir()
        .join(format!("rbdback-csi-count-{}.conf", std::process::id()))
        .display()
        .to_string();
    std::fs::copy(&c.conf, &conf).unwrap();
    let cfg_conf = conf.clone();
    let mut p = start_with(c, "count", move |cfg| {
        cfg.ceph_conf = Some(cfg_conf);
        cfg.stats_wait = Duration::from_secs(1);
        cfg.stats_deadline = Duration::from_secs(3);
    });
    let stage = stage_req(&p, c, "vol-n", &image);
    p.stage(stage.clone()).unwrap();
    let staging = PathBuf::from(&stage.staging_target_path);
    assert_eq!(p.stats("vol-n", &staging).unwrap().total, 8 * MIB);
    std::fs::write(
        &conf,
        std::fs::read_to_string(delayed_conf(c, "count-silent", "600")).unwrap(),
    )
    .unwrap();
    let census = ThreadCensus::start(rbdback::csi::COUNT_THREAD);
    let t0 = Instant::now();
    let mut answers = 0;
    let e = loop {
        let t = Instant::now();
        let r = p.stats("vol-n", &staging);
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "a stats call took {:?}",
            t.elapsed()
        );
        match r {
            Ok(u) => {
                assert_eq!((u.total, u.used), (8 * MIB, 0), "the latest count");
                answers += 1;
            }
            Err(e) => break e,
        }
        assert!(t0.elapsed() < T, "the count never ended");
    };
    assert!(answers >= 2, "{answers} answers from the latest count");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        e.message().contains("not done within 3 s"),
        "{}",
        e.message()
    );
    let (most, _) = census.finish();
    assert_eq!(most, 1, "counting threads at once");
}
