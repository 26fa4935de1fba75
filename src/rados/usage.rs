//! What an image occupies in the cluster, counted as `rbd du` counts an image's head: whole
//! `rbd_data` objects that exist, the last one clipped at the image's end. With a valid object
//! map the map says which objects exist (one read, fast-diff's semantics: any state but
//! NONEXISTENT); without one every object the image spans is asked for (`rbd du`'s slow path),
//! a window of stats in flight at a time.
//!
//! Owns: its own short-lived cluster connection (no engine, no watch, no lock: it reads the
//! header and the map as `rbd du` does, beside whatever client writes the image).
//! Trusts: the header and the object map as the cluster returns them, after decoding.
//! Must never: write anything, or outlive its deadline by more than one operation timeout:
//! every cluster operation gets `rados_osd_op_timeout`, and operations still in flight after
//! that are left to librados (their contexts leaked, as the direct queue does) rather than
//! shut down under it.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::client::{AioDone, AioSink, Cluster, IoCtx};
use super::direct::codec::{self, objstate};
use super::direct::header::{self, feature, Header, FLAG_OBJECT_MAP_INVALID};
use super::direct::layout::Layout;
use super::direct::queue::clip;
use super::{Errno, ImageSpec, RadosError};

/// Existence checks in flight at once during a scan.
const SCAN_WINDOW: u64 = 32;

/// An image's space, as [`usage`] counted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// The image's size in bytes.
    pub size: u64,
    /// Bytes of the image whose objects exist (whole objects, clipped at the image's end).
    pub used: u64,
    /// Objects the image spans.
    pub objects: u64,
    /// How existence was learnt.
    pub counted: Counted,
}

/// Where [`Usage::used`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// The image's object map (valid: the invalid flag was clear).
    ObjectMap,
    /// One stat per object (no object map, or one flagged invalid).
    Scan,
}

/// Counts what `spec`'s image occupies, answering by `deadline` (plus, for operations
/// started just before it, one operation timeout). A count the deadline cuts short is an
/// error ([`RadosError::TimedOut`]) that says how far it got, never a smaller number.
pub fn usage(spec: &ImageSpec, deadline: Instant) -> Result<Usage, RadosError> {
    let budget = deadline.saturating_duration_since(Instant::now());
    let secs = budget.as_secs() + u64::from(budget.subsec_nanos() > 0);
    let op_secs = secs.max(1);
    let mut spec = spec.clone();
    spec.conf_options
        .push(("rados_osd_op_timeout".into(), op_secs.to_string()));
    // an operation librados timed out is the deadline, said as such
    let timed_out = |what: String| {
        move |e: RadosError| match e {
            RadosError::Call { errno, .. } if errno.0 == -libc::ETIMEDOUT => {
                RadosError::TimedOut { what, secs }
            }
            e => e,
        }
    };
    let cluster = Cluster::connect(&spec)?;
    let meta = cluster.ioctx(&spec)?;
    let h = (|| {
        let id = header::image_id(&meta, &spec.image)?;
        let snap = match &spec.snapshot {
            Some(s) => header::snap_id(&meta, &id, s)?,
            None => header::HEAD,
        };
        let h = header::read(&cluster, &meta, &id, snap, true, None)?;
        Ok::<_, RadosError>((id, snap, h))
    })();
    let (id, snap, h) = h.map_err(timed_out(format!("reading the header of image {spec}")))?;
    let objects = h.layout.num_objects(h.size);
    let usage = |used, counted| Usage {
        size: h.size,
        used,
        objects,
        counted,
    };
    if let Some(map) = object_map(&meta, &id, snap, &h, objects, &spec.image) {
        let exists = map
            .iter()
            .take(usize::try_from(objects).unwrap_or(usize::MAX))
            .enumerate()
            .filter(|(_, s)| **s != objstate::NONEXISTENT)
            .map(|(o, _)| o as u64);
        return Ok(usage(
            allocated(&h.layout, h.size, exists),
            Counted::ObjectMap,
        ));
    }
    let io = match h.data_pool {
        Some(p) => cluster.ioctx_by_id(p, &meta.namespace())?,
        None => meta.dup(&cluster)?,
    };
    io.set_read_snap(snap);
    let what = format!("counting the objects of image {spec}");
    let grace = deadline + Duration::from_secs(op_secs + 1);
    let (found, left) = scan(&io, &h, objects, deadline, grace, &what, secs);
    if left > 0 {
        tracing::warn!(image = %spec, in_flight = left,
            "the cluster did not answer object stats; leaving them to librados");
        // librados may still complete them: their contexts must outlive the connection
        std::mem::forget(io);
        std::mem::forget(meta);
        std::mem::forget(cluster);
    }
    found.map(|exists| {
        usage(
            allocated(&h.layout, h.size, exists.into_iter()),
            Counted::Scan,
        )
    })
}

/// The object map at `snap`, when the image has a valid one that covers every object.
fn object_map(
    meta: &IoCtx,
    id: &str,
    snap: u64,
    h: &Header,
    objects: u64,
    image: &str,
) -> Option<Vec<u8>> {
    if h.features & feature::OBJECT_MAP == 0 {
        return None;
    }
    if h.flags & FLAG_OBJECT_MAP_INVALID != 0 {
        tracing::info!(
            image,
            "object map flagged invalid: counting object by object"
        );
        return None;
    }
    let oid = if snap == header::HEAD {
        format!("rbd_object_map.{id}")
    } else {
        format!("rbd_object_map.{id}.{snap:016x}")
    };
    let map = match meta.exec(&oid, "rbd", "object_map_load", &[]) {
        Ok(b) => codec::object_map_reply(&b).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match map {
        // as librbd's diff: a map shorter than the image is not trusted
        Ok(m) if m.len() as u64 >= objects => Some(m),
        Ok(m) => {
            tracing::info!(
                image,
                map = m.len(),
                objects,
                "object map shorter than the image: counting object by object"
            );
            None
        }
        Err(e) => {
            tracing::info!(image, error = %e, "object map unreadable: counting object by object");
            None
        }
    }
}

/// Bytes of the image that the objects `exists` hold, each whole, clipped at `size`.
fn allocated(layout: &Layout, size: u64, exists: impl Iterator<Item = u64>) -> u64 {
    exists
        .flat_map(|o| clip(layout.unmap(o, 0, layout.object_size), size))
        .map(|(_, n)| n)
        .sum()
}

/// Stats every object of the image, [`SCAN_WINDOW`] at a time, until `deadline`; returns
/// the objects that exist (or why not all were learnt) and how many stats were still in
/// flight at `grace`.
fn scan(
    io: &IoCtx,
    h: &Header,
    objects: u64,
    deadline: Instant,
    grace: Instant,
    what: &str,
    secs: u64,
) -> (Result<Vec<u64>, RadosError>, usize) {
    let sink = match AioSink::new() {
        Ok(s) => s,
        Err(e) => return (Err(e), 0),
    };
    let mut exists = Vec::new();
    let (mut next, mut in_flight, mut checked) = (0u64, 0usize, 0u64);
    let mut failure: Option<RadosError> = None;
    let mut done: Vec<AioDone> = Vec::new();
    loop {
        let now = Instant::now();
        while failure.is_none() && next < objects && (in_flight as u64) < SCAN_WINDOW {
            if now >= deadline {
                failure = Some(RadosError::TimedOut {
                    what: format!("{what}: {checked} of {objects} checked"),
                    secs,
                });
                break;
            }
            let oid = super::direct::layout::data_object(&h.prefix, next);
            match io.aio_stat(&oid, &sink, next) {
                Ok(()) => in_flight += 1,
                Err(errno) => {
                    failure = Some(RadosError::Call {
                        what: "rados_aio_stat",
                        errno,
                    })
                }
            }
            next += 1;
        }
        if in_flight == 0 && (failure.is_some() || next >= objects) {
            break;
        }
        if now >= grace {
            break;
        }
        let mut fds = [PollFd::new(sink.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(100u16));
        sink.drain(&mut done);
        for d in done.drain(..) {
            in_flight = in_flight.saturating_sub(1);
            checked += 1;
            match d.rv {
                0 => exists.push(d.token),
                rv if rv == -i64::from(libc::ENOENT) => {}
                rv if failure.is_none() => {
                    let errno = Errno(i32::try_from(rv).unwrap_or(-libc::EIO));
                    failure = Some(if errno.0 == -libc::ETIMEDOUT {
                        RadosError::TimedOut {
                            what: format!("{what}: {checked} of {objects} checked"),
                            secs,
                        }
                    } else {
                        RadosError::Call {
                            what: "stat of a data object",
                            errno,
                        }
                    });
                }
                _ => {}
            }
        }
    }
    let result = match failure {
        Some(e) => Err(e),
        None if in_flight > 0 => Err(RadosError::TimedOut {
            what: format!("{what}: {checked} of {objects} checked"),
            secs,
        }),
        None => Ok(exists),
    };
    (result, in_flight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_objects_are_counted_and_the_last_is_clipped() {
        let l = Layout::new(4 << 20, 4 << 20, 1).unwrap();
        // 9 MiB: objects of 4, 4 and 1 MiB
        assert_eq!(allocated(&l, 9 << 20, [0, 2].into_iter()), 5 << 20);
        assert_eq!(allocated(&l, 9 << 20, 0..3), 9 << 20);
        assert_eq!(allocated(&l, 9 << 20, std::iter::empty()), 0);
    }

    #[test]
    fn striped_objects_count_their_pieces_inside_the_image() {
        // 64 KiB stripe units over 4 objects of 1 MiB; the image is 1.5 stripe sets
        let l = Layout::new(1 << 20, 64 << 10, 4).unwrap();
        let size = 6 << 20;
        // every object of the first set is whole
        assert_eq!(allocated(&l, size, 0..4), 4 << 20);
        // objects of the second set are half inside the image
        assert_eq!(allocated(&l, size, 4..8), 2 << 20);
        assert_eq!(allocated(&l, size, 0..l.num_objects(size)), size);
    }
}
