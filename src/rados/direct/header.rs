//! The image header, read through the `rbd` object class: size, layout, object prefix,
//! features, snapshot context, data pool and parent chain.
//!
//! Owns: the synchronous class-method calls that describe an image (control paths only).
//! Must never: run on a dataplane thread (these calls block).

use std::sync::Arc;

use super::super::client::{Cluster, IoCtx};
use super::super::{Errno, RadosError};
use super::codec::{self, DecodeError, ParentSpec, NOSNAP};
use super::layout::Layout;

/// RBD feature bits (`include/rbd/features.h`).
pub mod feature {
    pub const LAYERING: u64 = 1;
    pub const STRIPINGV2: u64 = 1 << 1;
    pub const EXCLUSIVE_LOCK: u64 = 1 << 2;
    pub const OBJECT_MAP: u64 = 1 << 3;
    pub const FAST_DIFF: u64 = 1 << 4;
    pub const DEEP_FLATTEN: u64 = 1 << 5;
    pub const JOURNALING: u64 = 1 << 6;
    pub const DATA_POOL: u64 = 1 << 7;
    pub const OPERATIONS: u64 = 1 << 8;
    pub const MIGRATING: u64 = 1 << 9;
    pub const NON_PRIMARY: u64 = 1 << 10;
    pub const DIRTY_CACHE: u64 = 1 << 11;
}

/// Features the direct engine honours.
pub const SUPPORTED: u64 = feature::LAYERING
    | feature::STRIPINGV2
    | feature::EXCLUSIVE_LOCK
    | feature::OBJECT_MAP
    | feature::FAST_DIFF
    | feature::DEEP_FLATTEN
    | feature::DATA_POOL
    | feature::OPERATIONS;

/// The name of the first feature in `features` the direct engine cannot honour.
pub fn unsupported(features: u64, read_only: bool) -> Option<&'static str> {
    let named: [(u64, &'static str); 4] = [
        (feature::JOURNALING, "journaling"),
        (feature::MIGRATING, "migrating (live migration in progress)"),
        (feature::NON_PRIMARY, "non-primary (mirrored image)"),
        (
            feature::DIRTY_CACHE,
            "dirty-cache (persistent write-back cache)",
        ),
    ];
    for (bit, name) in named {
        // a read-only open does not write the journal nor the mirror
        let harmless_ro = read_only && (bit == feature::JOURNALING || bit == feature::NON_PRIMARY);
        if features & bit != 0 && !harmless_ro {
            return Some(name);
        }
    }
    (features & !SUPPORTED & !named.iter().fold(0, |a, (b, _)| a | b) != 0)
        .then_some("an unknown feature bit")
}

/// A clone's parent, opened (its header at the parent snapshot).
#[derive(Debug)]
pub struct Parent {
    pub spec: ParentSpec,
    /// Bytes of the child that fall through to the parent.
    pub overlap: u64,
    pub header: Arc<Header>,
}

/// One image (or snapshot) as the data path sees it.
#[derive(Debug)]
pub struct Header {
    pub size: u64,
    pub layout: Layout,
    pub prefix: String,
    pub features: u64,
    /// Image flags ([`FLAG_OBJECT_MAP_INVALID`], fast-diff invalid).
    pub flags: u64,
    pub snap_seq: u64,
    /// Snapshot ids, newest first.
    pub snaps: Vec<u64>,
    /// Pool of the data objects (None: the header's pool).
    pub data_pool: Option<i64>,
    pub parent: Option<Parent>,
}

impl Header {
    /// The parent whose data shows through, if any (overlap > 0).
    pub fn live_parent(&self) -> Option<&Parent> {
        self.parent.as_ref().filter(|p| p.overlap > 0)
    }
}

fn bad(e: DecodeError) -> RadosError {
    RadosError::Invalid(e.to_string())
}

fn call(io: &IoCtx, oid: &str, method: &'static str, input: &[u8]) -> Result<Vec<u8>, RadosError> {
    io.exec(oid, "rbd", method, input)
        .map_err(|errno| RadosError::Call {
            what: method,
            errno,
        })
}

/// The image id of `name` (from `rbd_id.<name>`).
pub fn image_id(io: &IoCtx, name: &str) -> Result<String, RadosError> {
    match io.exec(&format!("rbd_id.{name}"), "rbd", "get_id", &[]) {
        Ok(b) => codec::string_reply(&b, "get_id").map_err(bad),
        // a format 1 image has `<name>.rbd` instead: librbd serves those
        Err(Errno(e)) if e == -libc::ENOENT && io.exists(&format!("{name}.rbd")) => {
            Err(RadosError::Unsupported {
                image: name.to_owned(),
                feature: "image format 1",
                engine: "direct",
            })
        }
        Err(Errno(e)) if e == -libc::ENOENT => Err(RadosError::NoImage {
            pool: io.pool.clone(),
            image: name.to_owned(),
        }),
        Err(errno) => Err(RadosError::Call {
            what: "get_id",
            errno,
        }),
    }
}

/// The id of snapshot `name` of image `id`.
pub fn snap_id(io: &IoCtx, id: &str, name: &str) -> Result<u64, RadosError> {
    let oid = format!("rbd_header.{id}");
    let (_, snaps) =
        codec::snapcontext_reply(&call(io, &oid, "get_snapcontext", &[])?).map_err(bad)?;
    for s in snaps {
        let b = match io.exec(&oid, "rbd", "get_snapshot_name", &s.to_le_bytes()) {
            Ok(b) => b,
            Err(Errno(e)) if e == -libc::ENOENT => continue,
            Err(errno) => {
                return Err(RadosError::Call {
                    what: "get_snapshot_name",
                    errno,
                })
            }
        };
        if codec::string_reply(&b, "get_snapshot_name").map_err(bad)? == name {
            return Ok(s);
        }
    }
    Err(RadosError::Invalid(format!(
        "image has no snapshot named {name:?}"
    )))
}

/// Reads the header of image `id` at `snap` (`NOSNAP`: head). The parent chain is opened
/// too, re-using `keep_parent` when it names the same parent.
pub fn read(
    cluster: &Cluster,
    io: &IoCtx,
    id: &str,
    snap: u64,
    read_only: bool,
    keep_parent: Option<&Parent>,
) -> Result<Header, RadosError> {
    let oid = format!("rbd_header.{id}");
    let (order, size) =
        codec::size_reply(&call(io, &oid, "get_size", &snap.to_le_bytes())?).map_err(bad)?;
    let (features, _incompat) = codec::features_reply(&call(
        io,
        &oid,
        "get_features",
        &codec::features_input(snap, read_only),
    )?)
    .map_err(bad)?;
    let prefix = codec::string_reply(
        &call(io, &oid, "get_object_prefix", &[])?,
        "get_object_prefix",
    )
    .map_err(bad)?;
    let (snap_seq, snaps) =
        codec::snapcontext_reply(&call(io, &oid, "get_snapcontext", &[])?).map_err(bad)?;
    let object_size = 1u64.checked_shl(u32::from(order)).unwrap_or(0);
    let (su, sc) = if features & feature::STRIPINGV2 != 0 {
        codec::stripe_reply(&call(io, &oid, "get_stripe_unit_count", &[])?).map_err(bad)?
    } else {
        (object_size, 1)
    };
    let layout = Layout::new(object_size, su, sc).map_err(|e| {
        RadosError::Invalid(format!(
            "image {id} has an unusable layout (order {order}, stripe unit {su}, count {sc}): {e}"
        ))
    })?;
    let data_pool = if features & feature::DATA_POOL != 0 {
        Some(codec::data_pool_reply(&call(io, &oid, "get_data_pool", &[])?).map_err(bad)?)
            .filter(|p| *p >= 0)
    } else {
        None
    };
    let flags = match io.exec(&oid, "rbd", "get_flags", &snap.to_le_bytes()) {
        Ok(b) => codec::flags_reply(&b).map_err(bad)?,
        Err(_) => 0,
    };
    let parent = if features & feature::LAYERING != 0 {
        read_parent(cluster, io, &oid, snap, keep_parent)?
    } else {
        None
    };
    Ok(Header {
        size,
        layout,
        prefix,
        features,
        flags,
        snap_seq,
        snaps,
        data_pool,
        parent,
    })
}

fn read_parent(
    cluster: &Cluster,
    io: &IoCtx,
    oid: &str,
    snap: u64,
    keep: Option<&Parent>,
) -> Result<Option<Parent>, RadosError> {
    let arg = snap.to_le_bytes();
    let (spec, overlap) = match io.exec(oid, "rbd", "parent_get", &arg) {
        Ok(b) => {
            let spec = codec::parent_get_reply(&b).map_err(bad)?;
            let o = codec::parent_overlap_reply(&call(io, oid, "parent_overlap_get", &arg)?)
                .map_err(bad)?;
            match o {
                Some(o) => (spec, o),
                None => return Ok(None),
            }
        }
        Err(Errno(e)) if e == -libc::EOPNOTSUPP => {
            codec::get_parent_reply(&call(io, oid, "get_parent", &arg)?).map_err(bad)?
        }
        Err(errno) => {
            return Err(RadosError::Call {
                what: "parent_get",
                errno,
            })
        }
    };
    if spec.pool_id < 0 || spec.image_id.is_empty() {
        return Ok(None);
    }
    if let Some(k) = keep.filter(|k| k.spec == spec) {
        return Ok(Some(Parent {
            spec,
            overlap,
            header: Arc::clone(&k.header),
        }));
    }
    let pio = cluster.ioctx_by_id(spec.pool_id, &spec.namespace)?;
    let header = read(cluster, &pio, &spec.image_id, spec.snap_id, true, None)?;
    Ok(Some(Parent {
        spec,
        overlap,
        header: Arc::new(header),
    }))
}

/// The head marker, re-exported for callers.
pub const HEAD: u64 = NOSNAP;

/// `RBD_FLAG_OBJECT_MAP_INVALID`: the object map may be wrong (`rbd object-map rebuild`).
pub const FLAG_OBJECT_MAP_INVALID: u64 = 1;
