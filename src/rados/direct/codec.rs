//! Ceph's little-endian wire encoding for the messages the direct engine exchanges: `rbd`
//! and `lock` class-method payloads, watch/notify messages of librbd's image watcher, notify
//! replies and the object map's bit vector.
//!
//! Owns: bytes in, values out, and the reverse. Pure: no I/O.
//! Trusts: nothing: every length is checked against the buffer; a short or malformed reply is
//! an error, never a panic.

use thiserror::Error;

/// A reply that does not decode.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed {what} reply from the cluster")]
pub struct DecodeError {
    /// What was being decoded.
    pub what: &'static str,
}

/// Appends Ceph-encoded values.
#[derive(Debug, Default)]
pub struct Enc {
    buf: Vec<u8>,
    starts: Vec<usize>,
}

impl Enc {
    pub fn new() -> Enc {
        Enc::default()
    }
    pub fn u8(mut self, v: u8) -> Enc {
        self.buf.push(v);
        self
    }
    pub fn u32(mut self, v: u32) -> Enc {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i32(mut self, v: i32) -> Enc {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Enc {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn str(mut self, s: &str) -> Enc {
        let n = u32::try_from(s.len()).unwrap_or(u32::MAX);
        self.buf.extend_from_slice(&n.to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self
    }
    /// `ENCODE_START(v, compat)`: version bytes and a length patched by [`Self::finish`].
    pub fn start(mut self, v: u8, compat: u8) -> Enc {
        self.buf.push(v);
        self.buf.push(compat);
        self.starts.push(self.buf.len());
        self.buf.extend_from_slice(&[0; 4]);
        self
    }
    /// `ENCODE_FINISH`.
    pub fn finish(mut self) -> Enc {
        if let Some(at) = self.starts.pop() {
            let len = u32::try_from(self.buf.len() - at - 4).unwrap_or(u32::MAX);
            self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
        self
    }
    pub fn done(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads Ceph-encoded values.
#[derive(Debug)]
pub struct Dec<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Dec<'a> {
    pub fn new(b: &'a [u8], what: &'static str) -> Dec<'a> {
        Dec { b, what }
    }
    fn err(&self) -> DecodeError {
        DecodeError { what: self.what }
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(self.err());
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(self.u32()? as i32)
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }
    pub fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        Ok(String::from_utf8_lossy(self.bytes(n)?).into_owned())
    }
    /// `DECODE_START`: returns (struct_v, a decoder limited to the struct's body) and moves
    /// past the body.
    pub fn start(&mut self) -> Result<(u8, Dec<'a>), DecodeError> {
        let v = self.u8()?;
        let _compat = self.u8()?;
        let len = self.u32()? as usize;
        let body = self.bytes(len)?;
        Ok((v, Dec::new(body, self.what)))
    }
    pub fn rest(&self) -> usize {
        self.b.len()
    }
}

/// `CEPH_NOSNAP`: the image head.
pub const NOSNAP: u64 = u64::MAX - 1;

// --- rbd class -------------------------------------------------------------------------------

/// `get_size(snap)` → (order, size).
pub fn size_reply(b: &[u8]) -> Result<(u8, u64), DecodeError> {
    let mut d = Dec::new(b, "get_size");
    Ok((d.u8()?, d.u64()?))
}

/// `get_features` input: snap id and read-only flag.
pub fn features_input(snap: u64, read_only: bool) -> Vec<u8> {
    Enc::new().u64(snap).u8(u8::from(read_only)).done()
}

/// `get_features` → (features, incompatible features).
pub fn features_reply(b: &[u8]) -> Result<(u64, u64), DecodeError> {
    let mut d = Dec::new(b, "get_features");
    Ok((d.u64()?, d.u64()?))
}

/// A string reply (`get_id`, `get_object_prefix`, `get_snapshot_name`).
pub fn string_reply(b: &[u8], what: &'static str) -> Result<String, DecodeError> {
    Dec::new(b, what).str()
}

/// `get_snapcontext` → (seq, snapshot ids newest first).
pub fn snapcontext_reply(b: &[u8]) -> Result<(u64, Vec<u64>), DecodeError> {
    let mut d = Dec::new(b, "get_snapcontext");
    let seq = d.u64()?;
    let n = d.u32()? as usize;
    if n > d.rest() / 8 {
        return Err(d.err());
    }
    let snaps = (0..n).map(|_| d.u64()).collect::<Result<Vec<_>, _>>()?;
    Ok((seq, snaps))
}

/// `get_stripe_unit_count` → (stripe unit, stripe count).
pub fn stripe_reply(b: &[u8]) -> Result<(u64, u64), DecodeError> {
    let mut d = Dec::new(b, "get_stripe_unit_count");
    Ok((d.u64()?, d.u64()?))
}

/// `get_data_pool` → pool id (-1: none).
pub fn data_pool_reply(b: &[u8]) -> Result<i64, DecodeError> {
    Dec::new(b, "get_data_pool").i64()
}

/// `get_flags` → flags (bit 0: object map invalid).
pub fn flags_reply(b: &[u8]) -> Result<u64, DecodeError> {
    Dec::new(b, "get_flags").u64()
}

/// A clone's parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentSpec {
    pub pool_id: i64,
    pub namespace: String,
    pub image_id: String,
    pub snap_id: u64,
}

/// `parent_get` → the parent spec (pool -1: none).
pub fn parent_get_reply(b: &[u8]) -> Result<ParentSpec, DecodeError> {
    let mut d = Dec::new(b, "parent_get");
    let (_, mut s) = d.start()?;
    Ok(ParentSpec {
        pool_id: s.i64()?,
        namespace: s.str()?,
        image_id: s.str()?,
        snap_id: s.u64()?,
    })
}

/// `parent_overlap_get` → overlap (None: no parent at this snapshot).
pub fn parent_overlap_reply(b: &[u8]) -> Result<Option<u64>, DecodeError> {
    let mut d = Dec::new(b, "parent_overlap_get");
    if d.u8()? != 0 {
        Ok(Some(d.u64()?))
    } else {
        Ok(None)
    }
}

/// Legacy `get_parent` → (spec, overlap).
pub fn get_parent_reply(b: &[u8]) -> Result<(ParentSpec, u64), DecodeError> {
    let mut d = Dec::new(b, "get_parent");
    let pool_id = d.i64()?;
    let image_id = d.str()?;
    let snap_id = d.u64()?;
    let overlap = d.u64()?;
    Ok((
        ParentSpec {
            pool_id,
            namespace: String::new(),
            image_id,
            snap_id,
        },
        overlap,
    ))
}

/// Object states in the object map.
pub mod objstate {
    pub const NONEXISTENT: u8 = 0;
    pub const EXISTS: u8 = 1;
    pub const PENDING: u8 = 2;
    pub const EXISTS_CLEAN: u8 = 3;
}

/// `object_map_update` input for one object.
pub fn object_map_update(objno: u64, new: u8, current: Option<u8>) -> Vec<u8> {
    let e = Enc::new().u64(objno).u64(objno + 1).u8(new);
    match current {
        Some(c) => e.u8(1).u8(c).done(),
        None => e.u8(0).done(),
    }
}

/// `object_map_load` → one state per object (2 bits each, first object in the top bits).
pub fn object_map_reply(b: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut d = Dec::new(b, "object_map_load");
    let header_len = d.u32()? as usize;
    let mut h = Dec::new(d.bytes(header_len)?, "object_map_load");
    let (_, mut hb) = h.start()?;
    let n = hb.u64()?;
    let nbytes = usize::try_from(n.div_ceil(4)).map_err(|_| d.err())?;
    let data = d.bytes(nbytes)?;
    let n = usize::try_from(n).map_err(|_| d.err())?;
    Ok((0..n)
        .map(|i| (data[i / 4] >> ((3 - i % 4) * 2)) & 3)
        .collect())
}

// --- lock class ----------------------------------------------------------------------------

/// The name of librbd's exclusive lock (and of the object map's lock).
pub const RBD_LOCK_NAME: &str = "rbd_lock";
/// librbd's tag for its exclusive lock.
pub const RBD_LOCK_TAG: &str = "internal";
/// librbd's cookie prefix: `auto <watch handle>`.
pub const RBD_LOCK_COOKIE_PREFIX: &str = "auto";
const LOCK_EXCLUSIVE: u8 = 1;

/// `lock.lock` input: exclusive, with a tag (which `rados_lock_exclusive` cannot set).
pub fn lock_input(name: &str, cookie: &str, tag: &str) -> Vec<u8> {
    Enc::new()
        .start(1, 1)
        .str(name)
        .u8(LOCK_EXCLUSIVE)
        .str(cookie)
        .str(tag)
        .str("")
        .u32(0)
        .u32(0)
        .u8(0)
        .finish()
        .done()
}

/// `lock.assert_locked` input.
pub fn assert_locked_input(name: &str, cookie: &str, tag: &str) -> Vec<u8> {
    Enc::new()
        .start(1, 1)
        .str(name)
        .u8(LOCK_EXCLUSIVE)
        .str(cookie)
        .str(tag)
        .finish()
        .done()
}

/// `lock.unlock` input.
pub fn unlock_input(name: &str, cookie: &str) -> Vec<u8> {
    Enc::new().start(1, 1).str(name).str(cookie).finish().done()
}

/// `lock.get_info` input.
pub fn get_info_input(name: &str) -> Vec<u8> {
    Enc::new().start(1, 1).str(name).finish().done()
}

/// Ceph's entity types, as `entity_name_t` encodes them.
const ENTITY_TYPES: [(u8, &str); 5] = [
    (0x01, "mon"),
    (0x02, "mds"),
    (0x04, "osd"),
    (0x08, "client"),
    (0x10, "mgr"),
];

/// `lock.break_lock` input; `locker` as lockers are listed (`client.4184`). `None` when the
/// name is not `<type>.<number>`.
pub fn break_lock_input(name: &str, locker: &str, cookie: &str) -> Option<Vec<u8>> {
    let (t, n) = locker.split_once('.')?;
    let ty = ENTITY_TYPES.iter().find(|(_, s)| *s == t)?.0;
    let num: i64 = n.parse().ok()?;
    Some(
        Enc::new()
            .start(1, 1)
            .str(name)
            .u8(ty)
            .u64(num as u64)
            .str(cookie)
            .finish()
            .done(),
    )
}

/// The holders of a `cls_lock` lock, as `lock.get_info` describes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lockers {
    /// Exclusive (not shared).
    pub exclusive: bool,
    /// The lock's tag (`internal` for librbd's exclusive lock).
    pub tag: String,
    /// (client `client.<gid>`, cookie, address `v1:ip:port/nonce`) per holder.
    pub holders: Vec<(String, String, String)>,
}

fn entity_name(d: &mut Dec<'_>) -> Result<String, DecodeError> {
    let ty = d.u8()?;
    let num = d.i64()?;
    let t = ENTITY_TYPES
        .iter()
        .find(|(v, _)| *v == ty)
        .map_or("unknown", |(_, s)| s);
    Ok(format!("{t}.{num}"))
}

/// `ip:port` of a `sockaddr` (family, then the rest as Linux lays it out); `family` read
/// already.
fn sockaddr(family: u16, rest: &[u8]) -> String {
    let port = |r: &[u8]| r.get(..2).map_or(0, |p| u16::from_be_bytes([p[0], p[1]]));
    match family {
        2 if rest.len() >= 6 => {
            let a = std::net::Ipv4Addr::new(rest[2], rest[3], rest[4], rest[5]);
            format!("{a}:{}", port(rest))
        }
        10 if rest.len() >= 22 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&rest[6..22]);
            format!("[{}]:{}", std::net::Ipv6Addr::from(b), port(rest))
        }
        _ => ":0".into(),
    }
}

/// An `entity_addr_t` as Ceph prints it (`v1:127.0.0.1:0/3560565726`), in the encoding of
/// Nautilus and later (marker 1) or the legacy one (marker 0).
fn entity_addr(d: &mut Dec<'_>) -> Result<String, DecodeError> {
    match d.u8()? {
        1 => {
            let (_, mut b) = d.start()?;
            let ty = b.u32()?;
            let nonce = b.u32()?;
            let elen = b.u32()? as usize;
            let sa = if elen >= 2 {
                let f = b.bytes(2)?;
                sockaddr(u16::from_le_bytes([f[0], f[1]]), b.bytes(elen - 2)?)
            } else {
                ":0".into()
            };
            let prefix = match ty {
                0 => return Ok("-".into()),
                1 => "v1:",
                2 => "v2:",
                4 => "cidr:",
                _ => "",
            };
            Ok(format!("{prefix}{sa}/{nonce}"))
        }
        0 => {
            // legacy: the rest of a u32 0, the nonce, a 128-byte ceph_sockaddr_storage whose
            // family is big-endian
            d.bytes(3)?;
            let nonce = d.u32()?;
            let ss = d.bytes(128)?;
            let family = u16::from_be_bytes([ss[0], ss[1]]);
            if family == 0 {
                return Ok("-".into());
            }
            Ok(format!("v1:{}/{nonce}", sockaddr(family, &ss[2..])))
        }
        _ => Err(d.err()),
    }
}

/// `lock.get_info` reply.
pub fn lockers_reply(b: &[u8]) -> Result<Lockers, DecodeError> {
    let mut outer = Dec::new(b, "lock.get_info");
    let (_, mut d) = outer.start()?;
    let n = d.u32()?;
    let mut holders = Vec::new();
    for _ in 0..n {
        let (_, mut id) = d.start()?;
        let client = entity_name(&mut id)?;
        let cookie = id.str()?;
        let (_, mut info) = d.start()?;
        let _expiration = (info.u32()?, info.u32()?);
        let addr = entity_addr(&mut info)?;
        holders.push((client, cookie, addr));
    }
    let ty = d.u8()?;
    let tag = d.str()?;
    Ok(Lockers {
        exclusive: ty == LOCK_EXCLUSIVE || ty == 3,
        tag,
        holders,
    })
}

// --- image watcher messages ----------------------------------------------------------------

/// librbd's notify operations (the ones the engine acts on).
pub mod notify_op {
    pub const ACQUIRED_LOCK: u32 = 0;
    pub const RELEASED_LOCK: u32 = 1;
    pub const REQUEST_LOCK: u32 = 2;
    pub const HEADER_UPDATE: u32 = 3;
}

/// A client of the image watcher: (global id, watch handle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientId {
    pub gid: u64,
    pub handle: u64,
}

/// A lock notify (`AcquiredLock`, `ReleasedLock`, `RequestLock`) from `cid`.
pub fn lock_notify(op: u32, cid: ClientId) -> Vec<u8> {
    let e = Enc::new().start(2, 1).u32(op).u64(cid.gid).u64(cid.handle);
    if op == notify_op::REQUEST_LOCK {
        e.u8(0).finish().done() // force = false
    } else {
        e.finish().done()
    }
}

/// A decoded notify: its op and, for lock ops, the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub op: u32,
    pub client: ClientId,
}

/// Decodes a `NotifyMessage` (empty payload: a legacy header update).
pub fn decode_notify(b: &[u8]) -> Result<Notify, DecodeError> {
    if b.is_empty() {
        return Ok(Notify {
            op: notify_op::HEADER_UPDATE,
            client: ClientId::default(),
        });
    }
    let mut d = Dec::new(b, "NotifyMessage");
    let (v, mut body) = d.start()?;
    let op = body.u32()?;
    let client = if v >= 2
        && matches!(
            op,
            notify_op::ACQUIRED_LOCK | notify_op::RELEASED_LOCK | notify_op::REQUEST_LOCK
        ) {
        ClientId {
            gid: body.u64()?,
            handle: body.u64()?,
        }
    } else {
        ClientId::default()
    };
    Ok(Notify { op, client })
}

/// `ResponseMessage(result)`: what a lock owner answers.
pub fn response(result: i32) -> Vec<u8> {
    Enc::new().start(1, 1).i32(result).finish().done()
}

/// A notify reply: per acknowledging watcher (gid, cookie, payload).
pub fn notify_acks(b: &[u8]) -> Result<Vec<(u64, u64, Vec<u8>)>, DecodeError> {
    if b.is_empty() {
        return Ok(Vec::new());
    }
    let mut d = Dec::new(b, "notify reply");
    let n = d.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let gid = d.u64()?;
        let cookie = d.u64()?;
        let len = d.u32()? as usize;
        out.push((gid, cookie, d.bytes(len)?.to_vec()));
    }
    Ok(out)
}

/// The lock owner's answer among `acks`: `Some(result)` if one watcher sent a
/// `ResponseMessage`.
pub fn owner_response(acks: &[(u64, u64, Vec<u8>)]) -> Result<Option<i32>, DecodeError> {
    let mut found = None;
    for (_, _, p) in acks {
        if p.is_empty() {
            continue;
        }
        let mut d = Dec::new(p, "ResponseMessage");
        let (_, mut body) = d.start()?;
        found = Some(body.i32()?);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_start_patches_the_length() {
        let b = Enc::new().start(2, 1).u32(7).finish().done();
        assert_eq!(b, vec![2, 1, 4, 0, 0, 0, 7, 0, 0, 0]);
        let mut d = Dec::new(&b, "t");
        let (v, mut body) = d.start().unwrap();
        assert_eq!((v, body.u32().unwrap(), d.rest()), (2, 7, 0));
    }

    /// A `lock.get_info` reply as an OSD of Ceph 16 encodes it: one exclusive holder whose
    /// address is in the Nautilus encoding, one in the legacy one.
    #[test]
    fn lockers_decode_with_addresses_as_ceph_prints_them() {
        let mut sa = vec![2u8, 0, 0x1a, 0x85, 127, 0, 0, 1];
        sa.extend_from_slice(&[0; 8]);
        let mut legacy = vec![0u8; 128];
        legacy[..8].copy_from_slice(&[0, 2, 0, 0, 10, 0, 0, 9]);
        // Enc cannot append raw bytes: the sockaddrs are spliced in and lengths patched
        let addr_v2 = {
            let mut a = Enc::new()
                .u8(1)
                .start(1, 1)
                .u32(1)
                .u32(3_560_565_726)
                .u32(16)
                .done();
            a.extend_from_slice(&sa);
            // marker, version, compat, then the length
            let body = a.len() - 7;
            a[3..7].copy_from_slice(&u32::try_from(body).unwrap().to_le_bytes());
            a
        };
        let addr_legacy = {
            let mut a = Enc::new().u8(0).u8(0).u8(0).u8(0).u32(42).done();
            a.extend_from_slice(&legacy);
            a
        };
        let info = |addr: &[u8]| {
            let mut i = Enc::new().start(1, 1).u32(0).u32(0).done();
            i.extend_from_slice(addr);
            i.extend_from_slice(&Enc::new().str("").done());
            let body = i.len() - 6;
            i[2..6].copy_from_slice(&u32::try_from(body).unwrap().to_le_bytes());
            i
        };
        let id = |num: u64, cookie: &str| {
            Enc::new()
                .start(1, 1)
                .u8(0x08)
                .u64(num)
                .str(cookie)
                .finish()
                .done()
        };
        let mut body = Enc::new().u32(2).done();
        body.extend(id(4184, "auto 1234"));
        body.extend(info(&addr_v2));
        body.extend(id(77, ""));
        body.extend(info(&addr_legacy));
        body.extend(Enc::new().u8(1).str("internal").done());
        let mut reply = Enc::new()
            .u8(1)
            .u8(1)
            .u32(u32::try_from(body.len()).unwrap())
            .done();
        reply.extend(body);
        let l = lockers_reply(&reply).unwrap();
        assert!(l.exclusive);
        assert_eq!(l.tag, "internal");
        assert_eq!(
            l.holders,
            vec![
                (
                    "client.4184".to_owned(),
                    "auto 1234".to_owned(),
                    "v1:127.0.0.1:6789/3560565726".to_owned()
                ),
                (
                    "client.77".to_owned(),
                    String::new(),
                    "v1:10.0.0.9:0/42".to_owned()
                ),
            ]
        );
        // every truncation is an error, never a panic
        for n in 0..reply.len() {
            assert!(lockers_reply(&reply[..n]).is_err(), "{n}");
        }
        assert_eq!(
            break_lock_input("rbd_lock", "client.4184", "auto 1"),
            Some(
                Enc::new()
                    .start(1, 1)
                    .str("rbd_lock")
                    .u8(8)
                    .u64(4184)
                    .str("auto 1")
                    .finish()
                    .done()
            )
        );
        assert_eq!(break_lock_input("rbd_lock", "nobody", ""), None);
    }

    #[test]
    fn short_replies_are_errors_not_panics() {
        assert!(size_reply(&[12, 0, 0]).is_err());
        assert!(snapcontext_reply(&Enc::new().u64(1).u32(1000).done()).is_err());
        assert!(string_reply(&Enc::new().u32(10).done(), "x").is_err());
        assert!(decode_notify(&[2, 1, 200, 0, 0, 0]).is_err());
        assert!(notify_acks(&Enc::new().u32(1).u64(1).done()).is_err());
        assert!(object_map_reply(&Enc::new().u32(100).done()).is_err());
    }

    #[test]
    fn snapcontext_and_parent_decode() {
        let b = Enc::new().u64(9).u32(2).u64(9).u64(4).done();
        assert_eq!(snapcontext_reply(&b).unwrap(), (9, vec![9, 4]));
        let p = Enc::new()
            .start(1, 1)
            .u64(3)
            .str("ns")
            .str("abc")
            .u64(5)
            .finish()
            .done();
        assert_eq!(
            parent_get_reply(&p).unwrap(),
            ParentSpec {
                pool_id: 3,
                namespace: "ns".into(),
                image_id: "abc".into(),
                snap_id: 5
            }
        );
        assert_eq!(
            parent_overlap_reply(&[1, 8, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
            Some(8)
        );
        assert_eq!(parent_overlap_reply(&[0]).unwrap(), None);
    }

    #[test]
    fn object_map_bits_are_msb_first() {
        let header = Enc::new().start(1, 1).u64(5).finish().done();
        let b = Enc::new()
            .u32(u32::try_from(header.len()).unwrap())
            .done()
            .into_iter()
            .chain(header)
            .chain([0b01_00_11_10, 0b10_00_00_00])
            .collect::<Vec<_>>();
        assert_eq!(object_map_reply(&b).unwrap(), vec![1, 0, 3, 2, 2]);
    }

    #[test]
    fn lock_notifies_round_trip() {
        let cid = ClientId { gid: 41, handle: 7 };
        for op in [
            notify_op::ACQUIRED_LOCK,
            notify_op::RELEASED_LOCK,
            notify_op::REQUEST_LOCK,
        ] {
            let n = decode_notify(&lock_notify(op, cid)).unwrap();
            assert_eq!(n, Notify { op, client: cid });
        }
        assert_eq!(decode_notify(&[]).unwrap().op, notify_op::HEADER_UPDATE);
    }

    #[test]
    fn the_owner_answer_is_found_among_acks() {
        let reply = Enc::new()
            .u32(2)
            .u64(1)
            .u64(2)
            .u32(0)
            .u64(3)
            .u64(4)
            .u32(10)
            .done()
            .into_iter()
            .chain(response(-30))
            .collect::<Vec<_>>();
        let acks = notify_acks(&reply).unwrap();
        assert_eq!(acks.len(), 2);
        assert_eq!(owner_response(&acks).unwrap(), Some(-30));
        assert_eq!(owner_response(&acks[..1]).unwrap(), None);
    }

    #[test]
    fn lock_input_layout() {
        let b = lock_input("rbd_lock", "auto 1", "internal");
        let mut d = Dec::new(&b, "t");
        let (v, mut s) = d.start().unwrap();
        assert_eq!(v, 1);
        assert_eq!(s.str().unwrap(), "rbd_lock");
        assert_eq!(s.u8().unwrap(), 1);
        assert_eq!(s.str().unwrap(), "auto 1");
        assert_eq!(s.str().unwrap(), "internal");
        assert_eq!(s.str().unwrap(), "");
        assert_eq!(
            (s.u32().unwrap(), s.u32().unwrap(), s.u8().unwrap()),
            (0, 0, 0)
        );
        assert_eq!(s.rest(), 0);
    }
}
