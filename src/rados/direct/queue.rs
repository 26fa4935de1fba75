//! One dataplane thread's I/O on a direct-engine image: image requests split into object
//! requests, each a small state machine modelled on krbd's (object-map pre-update, write,
//! copy-up from the parent, object-map post-update; reads falling through to the parent).
//!
//! Owns: its own pool contexts (so its snapshot context is set from its own thread), the
//! request table and every buffer in flight, and the requests waiting for the exclusive lock.
//! Must never: block (lock acquisition and header reads are the control thread's), free or
//! touch a buffer an operation in flight may write (a request leaves the table only when
//! nothing of it is in flight), or complete a request twice.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use tracing::{debug, warn};

use super::super::client::{AioDone, AioSink, IoCtx, WriteOp};
use super::super::{BlockOp, Completion, Errno, RadosError};
use super::codec::{self, objstate, NOSNAP, RBD_LOCK_NAME};
use super::header::{self, feature, Header};
use super::layout::{data_object, Piece};
use super::{objmap_apply, objmap_update_needed, LockState, Shared, ALLOC_SIZE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Discard,
    Zero,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Discard => "discard",
            Kind::Zero => "write zeroes",
        }
    }
}

/// Where a read lands.
#[derive(Debug, Clone, Copy)]
enum Dst {
    /// The request's buffer at this offset.
    Req(usize),
    /// Object request `obj`'s copy-up buffer at this offset.
    Copyup(usize, usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjStep {
    PreMap,
    Write,
    CopyupRead,
    SnapMaps,
    CopyupWrite,
    PostMap,
    Done,
}

#[derive(Debug)]
struct ObjReq {
    objno: u64,
    obj_off: u64,
    len: u64,
    buf_off: usize,
    /// Parent image extents of the whole object (clipped to the overlap).
    parent: Vec<(u64, u64)>,
    entire: bool,
    tail: bool,
    deletion: bool,
    copyup: bool,
    noop_if_absent: bool,
    step: ObjStep,
    pending: usize,
    copyup_buf: Vec<u8>,
    ops: Vec<WriteOp>,
    /// The object-map transition sent (new, current).
    map_update: Option<(u8, Option<u8>)>,
}

#[derive(Debug)]
struct Req {
    tag: u64,
    kind: Kind,
    offset: u64,
    buf: Vec<u8>,
    header: Arc<Header>,
    pending: usize,
    error: Option<RadosError>,
    holds_lock: bool,
    objs: Vec<ObjReq>,
}

/// Which pool context an object operation goes through.
#[derive(Debug, Clone, Copy)]
enum Ctx {
    /// The header's pool (object maps).
    Meta,
    /// The data pool, with the snapshot context.
    Data,
    /// The data pool, with an empty snapshot context (deep copy-up).
    DataNoSnap,
}

/// One read of `len` bytes at `obj_off` of object `objno` of layer `layer` (0: the image,
/// 1: its parent, ...) into `dst` of request `slot`.
#[derive(Debug, Clone, Copy)]
struct ReadAt {
    slot: usize,
    layer: usize,
    objno: u64,
    obj_off: u64,
    len: u64,
    dst: Dst,
}

/// What a token stands for.
#[derive(Debug, Clone, Copy)]
enum Target {
    Read(ReadAt),
    Obj { slot: usize, obj: usize },
}

/// A queue's own pool contexts.
#[derive(Debug)]
struct Ctxs {
    /// Data pool with the image's snapshot context (layer 0).
    io: IoCtx,
    /// Data pool with an empty snapshot context (deep copy-up).
    io_nosnap: IoCtx,
    /// Parent layers' data pools, reading at the parent snapshot.
    parents: Vec<IoCtx>,
}

/// A queue of the direct engine.
#[derive(Debug)]
pub(crate) struct DirectQueue {
    reqs: Vec<Option<Req>>,
    free: Vec<usize>,
    targets: HashMap<u64, Target>,
    next_token: u64,
    parked: VecDeque<(u64, BlockOp)>,
    ready: Vec<Completion>,
    accepted: usize,
    scratch: Vec<AioDone>,
    gen: u64,
    header: Arc<Header>,
    failure_seq: u64,
    /// Inside [`Self::reap`]: requests finishing now are handed out by it.
    reaping: bool,
    /// The queue's pool contexts (shared only so that a queue dropped with operations in
    /// flight can leak them: librados must not see them destroyed under its operations).
    ctx: Arc<Ctxs>,
    sink: Arc<AioSink>,
    shared: Arc<Shared>,
}

fn zero_fill(buf: &mut [u8], from: usize, to: usize) {
    if let Some(s) = buf.get_mut(from..to) {
        s.fill(0);
    }
}

fn layer_header(h: &Arc<Header>, layer: usize) -> Option<&Arc<Header>> {
    let mut cur = h;
    for _ in 0..layer {
        cur = &cur.parent.as_ref()?.header;
    }
    Some(cur)
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl DirectQueue {
    pub(crate) fn new(shared: Arc<Shared>) -> Result<DirectQueue, RadosError> {
        let header = Arc::clone(&shared.lock_state().header);
        let data_io = |h: &Header, meta: &IoCtx| -> Result<IoCtx, RadosError> {
            match h.data_pool {
                Some(p) => shared.cluster.ioctx_by_id(p, &meta.namespace()),
                None => meta.dup(&shared.cluster),
            }
        };
        let io = data_io(&header, &shared.meta)?;
        io.set_read_snap(shared.snap_id);
        let io_nosnap = data_io(&header, &shared.meta)?;
        let mut parents = Vec::new();
        let mut cur = &header;
        while let Some(p) = cur.parent.as_ref() {
            let pmeta = shared
                .cluster
                .ioctx_by_id(p.spec.pool_id, &p.spec.namespace)?;
            let pio = data_io(&p.header, &pmeta)?;
            pio.set_read_snap(p.spec.snap_id);
            parents.push(pio);
            cur = &p.header;
        }
        let sink = AioSink::new()?;
        let mut q = DirectQueue {
            reqs: Vec::new(),
            free: Vec::new(),
            targets: HashMap::new(),
            next_token: 1,
            parked: VecDeque::new(),
            ready: Vec::new(),
            accepted: 0,
            scratch: Vec::new(),
            gen: u64::MAX,
            header,
            failure_seq: 0,
            reaping: false,
            ctx: Arc::new(Ctxs {
                io,
                io_nosnap,
                parents,
            }),
            sink,
            shared,
        };
        {
            let mut st = q.shared.lock_state();
            st.waiters.push(Arc::clone(&q.sink));
            q.failure_seq = st.failure_seq;
        }
        q.sync_header();
        Ok(q)
    }

    /// Picks up a refreshed header (the snapshot context goes on the data context before the
    /// next write); returns the image's fatal condition, if any, read under the same lock.
    fn sync_header(&mut self) -> Option<String> {
        let (gen, h, fatal) = {
            let st = self.shared.lock_state();
            if st.gen == self.gen {
                return st.fatal.clone();
            }
            (st.gen, Arc::clone(&st.header), st.fatal.clone())
        };
        if !self.shared.read_only {
            if let Err(e) = self.ctx.io.set_write_ctx(h.snap_seq, &h.snaps) {
                warn!(image = %self.shared.name, error = %e, "cannot set the snapshot context");
            }
        }
        self.gen = gen;
        self.header = h;
        fatal
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.accepted
    }

    /// Takes `op`; its completion comes out of [`Self::reap`].
    pub(crate) fn submit(&mut self, tag: u64, op: BlockOp) {
        self.accepted += 1;
        // (writes to a read-only image never get here: `Queue::submit` refuses them)
        if let Some(f) = self.sync_header() {
            return self.finish_now(tag, op, Err(RadosError::Unusable(f)));
        }
        if matches!(op, BlockOp::Flush) {
            // acknowledged writes are already on the OSDs' stable storage
            return self.finish_now(tag, op, Ok(()));
        }
        let is_write = !matches!(op, BlockOp::Read { .. });
        if is_write && self.shared.needs_lock(&self.header) {
            if !self.parked.is_empty() || !self.enter_lock() {
                self.parked.push_back((tag, op));
                return;
            }
            self.start(tag, op, true);
        } else {
            self.start(tag, op, false);
        }
    }

    /// Counts a write in under the lock, or asks the control thread for the lock.
    fn enter_lock(&self) -> bool {
        let mut st = self.shared.lock_state();
        if matches!(st.lock, LockState::Locked(_)) {
            st.writers += 1;
            true
        } else {
            if !st.want_lock {
                st.want_lock = true;
                self.shared.control.kick();
            }
            false
        }
    }

    fn leave_lock(&self) {
        let mut st = self.shared.lock_state();
        st.writers = st.writers.saturating_sub(1);
        if st.writers == 0 && matches!(st.lock, LockState::Releasing(_)) {
            self.shared.control.kick();
        }
    }

    fn finish_now(&mut self, tag: u64, op: BlockOp, result: Result<(), RadosError>) {
        self.ready.push(Completion {
            tag,
            result,
            buf: op.into_buf(),
        });
        self.sink.kick();
    }

    fn token(&mut self, t: Target) -> u64 {
        let k = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(1);
        self.targets.insert(k, t);
        k
    }

    fn start(&mut self, tag: u64, op: BlockOp, holds_lock: bool) {
        let h = Arc::clone(&self.header);
        let (kind, offset, len, buf) = match op {
            BlockOp::Read { offset, buf } => (Kind::Read, offset, buf.len() as u64, buf),
            BlockOp::Write { offset, buf } => (Kind::Write, offset, buf.len() as u64, buf),
            BlockOp::Discard { offset, len } => (Kind::Discard, offset, len, Vec::new()),
            BlockOp::WriteZeroes { offset, len } => (Kind::Zero, offset, len, Vec::new()),
            BlockOp::Flush => (Kind::Read, 0, 0, Vec::new()),
        };
        let in_range = offset.checked_add(len).is_some_and(|e| e <= h.size);
        let req = Req {
            tag,
            kind,
            offset,
            buf,
            header: Arc::clone(&h),
            pending: 0,
            error: (!in_range).then(|| {
                RadosError::Invalid(format!(
                    "{len} bytes at {offset} reach past the image's {} bytes",
                    h.size
                ))
            }),
            holds_lock,
            objs: Vec::new(),
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.reqs[s] = Some(req);
                s
            }
            None => {
                self.reqs.push(Some(req));
                self.reqs.len() - 1
            }
        };
        if in_range {
            let pieces = h.layout.map(offset, len);
            if kind == Kind::Read {
                // held while submitting: a piece may complete at once (object map)
                if let Some(r) = self.req_mut(slot) {
                    r.pending += 1;
                }
                for p in pieces {
                    self.submit_read(slot, 0, p, Dst::Req(to_usize(p.buf_off)));
                }
                if let Some(r) = self.req_mut(slot) {
                    r.pending -= 1;
                }
            } else {
                self.plan_writes(slot, &h, kind, &pieces);
                let n = self.req(slot).map_or(0, |r| r.objs.len());
                if let Some(r) = self.req_mut(slot) {
                    r.pending += n;
                }
                for i in 0..n {
                    self.advance(slot, i, 0);
                }
            }
        }
        self.maybe_finish(slot);
    }

    fn req(&self, slot: usize) -> Option<&Req> {
        self.reqs.get(slot).and_then(Option::as_ref)
    }

    fn req_mut(&mut self, slot: usize) -> Option<&mut Req> {
        self.reqs.get_mut(slot).and_then(Option::as_mut)
    }

    fn plan_writes(&mut self, slot: usize, h: &Arc<Header>, kind: Kind, pieces: &[Piece]) {
        let os = h.layout.object_size;
        let alloc = ALLOC_SIZE.min(os);
        let overlap = h.live_parent().map_or(0, |p| p.overlap);
        let mut objs = Vec::new();
        for p in pieces {
            let (mut off, mut len) = (p.obj_off, p.len);
            let tail = off + len == os;
            if kind == Kind::Discard && (alloc != os || !tail) {
                // krbd: align to the allocation unit; too small to free anything: skip
                let a = off.div_ceil(alloc) * alloc;
                let b = (off + len) / alloc * alloc;
                if a >= b {
                    continue;
                }
                (off, len) = (a, b - a);
            }
            let entire = off == 0 && len == os;
            let tail = off + len == os;
            let parent: Vec<(u64, u64)> = if overlap > 0 {
                clip(h.layout.unmap(p.objno, 0, os), overlap)
            } else {
                Vec::new()
            };
            let has_parent = !parent.is_empty();
            let (deletion, copyup, noop_if_absent) = match kind {
                Kind::Write => (false, has_parent && !(entire && h.snaps.is_empty()), false),
                Kind::Discard => (entire && !has_parent, false, true),
                Kind::Zero => (
                    entire && !has_parent,
                    has_parent && !(entire && h.snaps.is_empty()),
                    !has_parent,
                ),
                Kind::Read => (false, false, false),
            };
            objs.push(ObjReq {
                objno: p.objno,
                obj_off: off,
                len,
                buf_off: to_usize(p.buf_off + (off - p.obj_off)),
                parent,
                entire,
                tail,
                deletion,
                copyup,
                noop_if_absent,
                step: ObjStep::PreMap,
                pending: 0,
                copyup_buf: Vec::new(),
                ops: Vec::new(),
                map_update: None,
            });
        }
        if let Some(r) = self.req_mut(slot) {
            r.objs = objs;
        }
    }

    fn fail(&mut self, slot: usize, what: &'static str, errno: i32) {
        // librados' EBLOCKLISTED: this client is fenced for good
        let fenced = (errno == -libc::ESHUTDOWN).then(|| self.shared.fenced());
        if let Some(r) = self.req_mut(slot) {
            if r.error.is_none() {
                r.error = Some(match fenced {
                    Some(why) => RadosError::Unusable(why),
                    None => RadosError::Io {
                        what,
                        offset: r.offset,
                        errno: Errno(errno),
                    },
                });
            }
        }
    }

    // --- reads --------------------------------------------------------------------------

    fn submit_read(&mut self, slot: usize, layer: usize, p: Piece, dst: Dst) {
        let Some(r) = self.req(slot) else { return };
        let Some(h) = layer_header(&r.header, layer).cloned() else {
            return self.fail(slot, "read", -libc::EIO);
        };
        if layer > self.ctx.parents.len() {
            return self.fail(slot, "read", -libc::EIO);
        }
        let Some(ptr) = self.dst_ptr(slot, dst, p.len) else {
            return self.fail(slot, "read", -libc::EIO);
        };
        let at = ReadAt {
            slot,
            layer,
            objno: p.objno,
            obj_off: p.obj_off,
            len: p.len,
            dst,
        };
        if layer == 0 && self.known_absent(p.objno) {
            // what the OSD would answer, without asking it
            self.add_pending(slot, dst, 1);
            return self.on_read(at, -i64::from(libc::ENOENT));
        }
        let oid = data_object(&h.prefix, p.objno);
        let token = self.token(Target::Read(at));
        let io = if layer == 0 {
            &self.ctx.io
        } else {
            &self.ctx.parents[layer - 1]
        };
        // SAFETY: `ptr` points into a buffer owned by request `slot` (or one of its object
        // requests), which stays in the table, unmoved on the heap and untouched, until this
        // token's completion has been handled.
        let r = unsafe { io.aio_read(&oid, ptr, to_usize(p.len), p.obj_off, &self.sink, token) };
        match r {
            Ok(()) => self.add_pending(slot, dst, 1),
            Err(e) => {
                self.targets.remove(&token);
                self.fail(slot, "read", e.0);
            }
        }
    }

    /// librbd's `object_may_exist`, inverted: while this client holds the exclusive lock
    /// (so nobody else writes) and the head object map is loaded and not flagged invalid, an
    /// object the map calls nonexistent is absent. Our own writes mark an object before
    /// writing it (pre-update), and discards unmark it only after removing it, so the map
    /// never calls an object absent while it has data.
    fn known_absent(&self, objno: u64) -> bool {
        // the header this submission plans with: images without a valid map never take the
        // shared lock here
        let h = &self.header;
        if self.shared.snap_id != NOSNAP
            || h.features & feature::OBJECT_MAP == 0
            || h.flags & header::FLAG_OBJECT_MAP_INVALID != 0
        {
            return false;
        }
        let st = self.shared.lock_state();
        if !matches!(st.lock, LockState::Locked(_)) {
            return false;
        }
        usize::try_from(objno)
            .ok()
            .and_then(|i| st.objmap.get(i))
            .is_some_and(|s| *s == objstate::NONEXISTENT)
    }

    fn add_pending(&mut self, slot: usize, dst: Dst, n: usize) {
        if let Some(r) = self.req_mut(slot) {
            match dst {
                Dst::Req(_) => r.pending += n,
                Dst::Copyup(o, _) => {
                    if let Some(o) = r.objs.get_mut(o) {
                        o.pending += n;
                    }
                }
            }
        }
    }

    fn dst_ptr(&mut self, slot: usize, dst: Dst, len: u64) -> Option<*mut u8> {
        let r = self.req_mut(slot)?;
        let (buf, off) = match dst {
            Dst::Req(off) => (&mut r.buf, off),
            Dst::Copyup(o, off) => (&mut r.objs.get_mut(o)?.copyup_buf, off),
        };
        let end = off.checked_add(to_usize(len))?;
        buf.get_mut(off..end).map(|s| s.as_mut_ptr())
    }

    fn dst_slice(&mut self, slot: usize, dst: Dst, len: u64) -> Option<&mut [u8]> {
        let r = self.req_mut(slot)?;
        let (buf, off) = match dst {
            Dst::Req(off) => (&mut r.buf, off),
            Dst::Copyup(o, off) => (&mut r.objs.get_mut(o)?.copyup_buf, off),
        };
        let end = off.checked_add(to_usize(len))?;
        buf.get_mut(off..end)
    }

    fn on_read(&mut self, at: ReadAt, rv: i64) {
        let ReadAt { slot, len, dst, .. } = at;
        if rv >= 0 {
            let n = to_usize(u64::try_from(rv).unwrap_or(0).min(len));
            if let Some(s) = self.dst_slice(slot, dst, len) {
                let l = s.len();
                zero_fill(s, n, l);
            }
        } else if rv == -i64::from(libc::ENOENT) {
            self.read_parent(at);
        } else {
            let what = if matches!(dst, Dst::Copyup(..)) {
                "copy-up read"
            } else {
                "read"
            };
            self.fail(slot, what, i32::try_from(rv).unwrap_or(-libc::EIO));
        }
        // one read of this destination is done
        match dst {
            Dst::Req(_) => {
                if let Some(r) = self.req_mut(slot) {
                    r.pending -= 1;
                }
                self.maybe_finish(slot);
            }
            Dst::Copyup(o, _) => self.drop_hold(slot, o),
        }
    }

    /// An absent object at `layer`: its bytes come from the parent within the overlap, and
    /// are zeros beyond it.
    fn read_parent(&mut self, at: ReadAt) {
        let ReadAt {
            slot,
            layer,
            objno,
            obj_off,
            len,
            dst,
        } = at;
        let Some(h) = self
            .req(slot)
            .and_then(|r| layer_header(&r.header, layer).cloned())
        else {
            return;
        };
        if let Some(s) = self.dst_slice(slot, dst, len) {
            s.fill(0);
        }
        let Some(p) = h.live_parent() else { return };
        let (overlap, playout) = (p.overlap, p.header.layout);
        let mut at = 0u64;
        for (img, n) in h.layout.unmap(objno, obj_off, len) {
            let m = overlap.saturating_sub(img).min(n);
            for piece in playout.map(img, m) {
                let d = shift(dst, to_usize(at + piece.buf_off));
                self.submit_read(slot, layer + 1, piece, d);
            }
            at += n;
        }
    }

    // --- writes -------------------------------------------------------------------------

    /// Moves object request `o` on, given the result `rv` of its last step.
    fn advance(&mut self, slot: usize, o: usize, rv: i64) {
        let Some(r) = self.req(slot) else { return };
        let h = Arc::clone(&r.header);
        let kind = r.kind;
        let failed = r.error.is_some();
        let Some(ob) = r.objs.get(o) else { return };
        let (step, objno, sent_update, noop_if_absent, deletion, copyup) = (
            ob.step,
            ob.objno,
            ob.map_update.is_some(),
            ob.noop_if_absent,
            ob.deletion,
            ob.copyup,
        );
        let zeros = ob.copyup_buf.iter().all(|b| *b == 0);
        let has_map = h.features & feature::OBJECT_MAP != 0;
        let enoent = -i64::from(libc::ENOENT);
        match step {
            ObjStep::PreMap => {
                if rv != 0 {
                    return self.obj_done(slot, o, "object map update", rv);
                }
                if !sent_update && has_map {
                    let cur = self.map_state(objno);
                    if noop_if_absent && cur == objstate::NONEXISTENT {
                        return self.obj_done(slot, o, kind.name(), 0);
                    }
                    let new = if deletion {
                        objstate::PENDING
                    } else {
                        objstate::EXISTS
                    };
                    if objmap_update_needed(cur, new) {
                        return self.map_update(slot, o, objno, new, None);
                    }
                }
                self.apply_map_update(slot, o);
                self.set_step(slot, o, ObjStep::Write);
                self.send_op(slot, o, None, copyup, true, false);
            }
            ObjStep::Write => {
                if rv == enoent && copyup {
                    return self.start_copyup(slot, o);
                }
                // removing, truncating or zeroing an absent object is done already
                if rv < 0 && !(rv == enoent && kind != Kind::Write) {
                    return self.obj_done(slot, o, kind.name(), rv);
                }
                self.post_map(slot, o);
            }
            ObjStep::CopyupRead => {
                if failed {
                    return self.obj_done(slot, o, "copy-up", -i64::from(libc::EIO));
                }
                if zeros {
                    // zeros are what an absent object reads as: no copy-up data
                    if let Some(ob) = self.req_mut(slot).and_then(|r| r.objs.get_mut(o)) {
                        ob.copyup_buf = Vec::new();
                    }
                } else if has_map && !h.snaps.is_empty() {
                    return self.snap_maps(slot, o, &h);
                }
                self.copyup_write(slot, o, &h);
            }
            ObjStep::SnapMaps => {
                if rv < 0 {
                    return self.obj_done(slot, o, "snapshot object map update", rv);
                }
                self.copyup_write(slot, o, &h);
            }
            ObjStep::CopyupWrite => {
                if rv < 0 {
                    return self.obj_done(slot, o, "copy-up", rv);
                }
                self.post_map(slot, o);
            }
            ObjStep::PostMap => {
                if rv >= 0 {
                    self.apply_map_update(slot, o);
                }
                self.obj_done(slot, o, "object map update", rv.min(0));
            }
            ObjStep::Done => {}
        }
    }

    fn set_step(&mut self, slot: usize, o: usize, s: ObjStep) {
        if let Some(ob) = self.req_mut(slot).and_then(|r| r.objs.get_mut(o)) {
            ob.step = s;
            ob.ops.clear();
        }
    }

    fn map_state(&self, objno: u64) -> u8 {
        let st = self.shared.lock_state();
        usize::try_from(objno)
            .ok()
            .and_then(|i| st.objmap.get(i).copied())
            .unwrap_or(objstate::NONEXISTENT)
    }

    fn apply_map_update(&mut self, slot: usize, o: usize) {
        let Some(ob) = self.req_mut(slot).and_then(|r| r.objs.get_mut(o)) else {
            return;
        };
        if let Some((new, cur)) = ob.map_update.take() {
            let objno = ob.objno;
            objmap_apply(&mut self.shared.lock_state().objmap, objno, new, cur);
        }
    }

    fn map_update(&mut self, slot: usize, o: usize, objno: u64, new: u8, cur: Option<u8>) {
        let op = WriteOp::new();
        let assert = codec::assert_locked_input(RBD_LOCK_NAME, "", "");
        let upd = codec::object_map_update(objno, new, cur);
        let r = op
            .exec("lock", "assert_locked", &assert)
            .and_then(|()| op.exec("rbd", "object_map_update", &upd));
        if let Some(ob) = self.req_mut(slot).and_then(|r| r.objs.get_mut(o)) {
            ob.map_update = Some((new, cur));
        }
        if let Err(e) = r {
            return self.obj_done(slot, o, "object map update", i64::from(e.0));
        }
        let oid = self.shared.objmap_oid.clone();
        if let Err(e) = self.launch(slot, o, op, Ctx::Meta, &oid, false) {
            self.obj_done(slot, o, "object map update", i64::from(e.0));
        }
    }

    /// Starts `op` on `oid` for object request `o`, keeping the op until its completion;
    /// `count`: the step waits for it through the request's pending count.
    fn launch(
        &mut self,
        slot: usize,
        o: usize,
        op: WriteOp,
        ctx: Ctx,
        oid: &str,
        count: bool,
    ) -> Result<(), Errno> {
        let token = self.token(Target::Obj { slot, obj: o });
        let io = match ctx {
            Ctx::Meta => &self.shared.meta,
            Ctx::Data => &self.ctx.io,
            Ctx::DataNoSnap => &self.ctx.io_nosnap,
        };
        match op.aio_operate(io, oid, &self.sink, token) {
            Ok(()) => {
                if let Some(ob) = self.req_mut(slot).and_then(|r| r.objs.get_mut(o)) {
                    ob.ops.push(op);
                    ob.pending += usize::from(count);
                }
                Ok(())
            }
            Err(e) => {
                self.targets.remove(&token);
                Err(e)
            }
        }
    }

    fn post_map(&mut self, slot: usize, o: usize) {
        let Some(r) = self.req(slot) else { return };
        let has_map = r.header.features & feature::OBJECT_MAP != 0;
        let Some(ob) = r.objs.get(o) else { return };
        if has_map && ob.deletion {
            let objno = ob.objno;
            self.set_step(slot, o, ObjStep::PostMap);
            self.map_update(
                slot,
                o,
                objno,
                objstate::NONEXISTENT,
                Some(objstate::PENDING),
            );
        } else {
            self.obj_done(slot, o, "write", 0);
        }
    }

    /// Builds the object request's write operation: optional copy-up data first, an
    /// existence guard when a copy-up may be needed, then the modification.
    fn build_ops(
        &self,
        slot: usize,
        o: usize,
        copyup: Option<&[u8]>,
        guard: bool,
        mods: bool,
    ) -> Option<WriteOp> {
        let r = self.req(slot)?;
        let ob = r.objs.get(o)?;
        let op = WriteOp::new();
        if let Some(d) = copyup {
            op.exec("rbd", "copyup", d).ok()?;
        }
        if guard {
            op.assert_exists();
        }
        if !mods {
            return Some(op);
        }
        let has_parent = !ob.parent.is_empty();
        match r.kind {
            Kind::Write => {
                let data = r.buf.get(ob.buf_off..ob.buf_off + to_usize(ob.len))?;
                if ob.entire {
                    op.write_full(data);
                } else {
                    op.write(data, ob.obj_off);
                }
            }
            Kind::Discard => {
                if ob.entire && !has_parent {
                    op.remove();
                } else if ob.tail {
                    op.truncate(ob.obj_off);
                } else {
                    op.zero(ob.obj_off, ob.len);
                }
            }
            Kind::Zero => {
                if ob.entire {
                    if has_parent {
                        if !ob.copyup {
                            op.create();
                        }
                        op.truncate(0);
                    } else {
                        op.remove();
                    }
                } else if ob.tail {
                    op.truncate(ob.obj_off);
                } else {
                    op.zero(ob.obj_off, ob.len);
                }
            }
            Kind::Read => return None,
        }
        Some(op)
    }

    fn send_op(
        &mut self,
        slot: usize,
        o: usize,
        copyup: Option<&[u8]>,
        guard: bool,
        mods: bool,
        nosnap: bool,
    ) {
        let Some(op) = self.build_ops(slot, o, copyup, guard, mods) else {
            return self.obj_done(slot, o, "write", -i64::from(libc::EINVAL));
        };
        let Some((oid, _)) = self.req(slot).and_then(|r| {
            r.objs
                .get(o)
                .map(|ob| (data_object(&r.header.prefix, ob.objno), ()))
        }) else {
            return;
        };
        let ctx = if nosnap { Ctx::DataNoSnap } else { Ctx::Data };
        if let Err(e) = self.launch(slot, o, op, ctx, &oid, true) {
            self.obj_done(slot, o, "write", i64::from(e.0));
        }
    }

    fn start_copyup(&mut self, slot: usize, o: usize) {
        self.set_step(slot, o, ObjStep::CopyupRead);
        let Some(r) = self.req(slot) else { return };
        let h = Arc::clone(&r.header);
        let Some(ob) = r.objs.get(o) else { return };
        // the overlap may have shrunk (flatten) since the request was planned
        let overlap = h.live_parent().map_or(0, |p| p.overlap);
        let extents = clip(ob.parent.clone(), overlap);
        let total: u64 = extents.iter().map(|e| e.1).sum();
        if total == 0 {
            if let Some(ob) = self.req_mut(slot).and_then(|r| r.objs.get_mut(o)) {
                ob.copyup_buf = Vec::new();
            }
            return self.copyup_write(slot, o, &h);
        }
        if let Some(ob) = self.req_mut(slot).and_then(|r| r.objs.get_mut(o)) {
            ob.copyup_buf = vec![0; to_usize(total)];
            ob.pending = 1; // held until every read is sent
        }
        let Some(p) = h.live_parent() else { return };
        let playout = p.header.layout;
        let mut at = 0u64;
        for (img, n) in extents {
            for piece in playout.map(img, n) {
                self.submit_read(slot, 1, piece, Dst::Copyup(o, to_usize(at + piece.buf_off)));
            }
            at += n;
        }
        self.drop_hold(slot, o);
    }

    /// Ends one pending part of object request `o` (a read or the hold kept while sending);
    /// the last one moves the request on.
    fn drop_hold(&mut self, slot: usize, o: usize) {
        let left = self
            .req_mut(slot)
            .and_then(|r| r.objs.get_mut(o))
            .map(|ob| {
                ob.pending -= 1;
                ob.pending
            });
        if left == Some(0) {
            self.advance(slot, o, 0);
        }
    }

    fn snap_maps(&mut self, slot: usize, o: usize, h: &Arc<Header>) {
        self.set_step(slot, o, ObjStep::SnapMaps);
        let Some(objno) = self
            .req(slot)
            .and_then(|r| r.objs.get(o))
            .map(|ob| ob.objno)
        else {
            return;
        };
        let fast_diff = h.features & feature::FAST_DIFF != 0;
        if let Some(ob) = self.req_mut(slot).and_then(|r| r.objs.get_mut(o)) {
            ob.pending = 1;
        }
        let n = h.snaps.len();
        for (i, snap) in h.snaps.iter().enumerate() {
            let new = if fast_diff && i + 1 < n {
                objstate::EXISTS_CLEAN
            } else {
                objstate::EXISTS
            };
            let op = WriteOp::new();
            let upd = codec::object_map_update(objno, new, None);
            if op.exec("rbd", "object_map_update", &upd).is_err() {
                continue;
            }
            let oid = format!("{}.{snap:016x}", self.shared.objmap_oid);
            if let Err(e) = self.launch(slot, o, op, Ctx::Meta, &oid, true) {
                self.fail(slot, "snapshot object map update", e.0);
            }
        }
        self.drop_hold(slot, o);
    }

    fn copyup_write(&mut self, slot: usize, o: usize, h: &Arc<Header>) {
        self.set_step(slot, o, ObjStep::CopyupWrite);
        let data = self
            .req_mut(slot)
            .and_then(|r| r.objs.get_mut(o))
            .map(|ob| std::mem::take(&mut ob.copyup_buf))
            .unwrap_or_default();
        if !data.is_empty() && !h.snaps.is_empty() {
            // deep copy-up through every snapshot, then the modification with the snapshot
            // context (krbd and librbd do the same)
            self.send_op(slot, o, Some(&data), false, false, true);
            self.send_op(slot, o, None, false, true, false);
        } else if !data.is_empty() {
            self.send_op(slot, o, Some(&data), false, true, false);
        } else {
            self.send_op(slot, o, None, false, true, false);
        }
    }

    fn obj_done(&mut self, slot: usize, o: usize, what: &'static str, rv: i64) {
        if rv < 0 {
            self.fail(slot, what, i32::try_from(rv).unwrap_or(-libc::EIO));
        }
        let was_done = self
            .req_mut(slot)
            .and_then(|r| r.objs.get_mut(o))
            .map(|ob| {
                let d = ob.step == ObjStep::Done;
                ob.step = ObjStep::Done;
                ob.ops.clear();
                ob.copyup_buf = Vec::new();
                d
            })
            .unwrap_or(true);
        if was_done {
            return;
        }
        if let Some(r) = self.req_mut(slot) {
            r.pending -= 1;
        }
        self.maybe_finish(slot);
    }

    fn maybe_finish(&mut self, slot: usize) {
        if self.req(slot).is_none_or(|r| r.pending > 0) {
            return;
        }
        let Some(r) = self.reqs.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        if r.holds_lock {
            self.leave_lock();
        }
        let buf = match r.kind {
            Kind::Read | Kind::Write => Some(r.buf),
            _ => None,
        };
        let result = match r.error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.ready.push(Completion {
            tag: r.tag,
            result,
            buf,
        });
        if !self.reaping {
            // finished while being submitted (nothing to send, or refused): the owner must
            // still be woken to reap it
            self.sink.kick();
        }
    }

    fn on_obj(&mut self, slot: usize, o: usize, rv: i64) {
        let Some(ob) = self.req_mut(slot).and_then(|r| r.objs.get_mut(o)) else {
            return;
        };
        match ob.step {
            ObjStep::Write | ObjStep::CopyupWrite | ObjStep::SnapMaps => {
                ob.pending = ob.pending.saturating_sub(1);
                if rv < 0 && ob.step != ObjStep::Write {
                    let what = if ob.step == ObjStep::SnapMaps {
                        "snapshot object map update"
                    } else {
                        "copy-up"
                    };
                    self.fail(slot, what, i32::try_from(rv).unwrap_or(-libc::EIO));
                }
                let left = self
                    .req(slot)
                    .and_then(|r| r.objs.get(o))
                    .map_or(0, |ob| ob.pending);
                if left > 0 {
                    return;
                }
                let rv = if self.req(slot).is_some_and(|r| r.error.is_some()) && rv >= 0 {
                    -i64::from(libc::EIO)
                } else {
                    rv
                };
                self.advance(slot, o, rv);
            }
            ObjStep::PreMap | ObjStep::PostMap => self.advance(slot, o, rv),
            ObjStep::CopyupRead | ObjStep::Done => {}
        }
    }

    // --- the queue's interface ----------------------------------------------------------

    /// Handles finished operations, starts writes that were waiting for the lock, and moves
    /// finished requests into `out`.
    pub(crate) fn reap(&mut self, out: &mut Vec<Completion>) {
        self.reaping = true;
        let mut done = std::mem::take(&mut self.scratch);
        self.sink.drain(&mut done);
        for d in done.drain(..) {
            match self.targets.remove(&d.token) {
                Some(Target::Read(at)) => self.on_read(at, d.rv),
                Some(Target::Obj { slot, obj }) => self.on_obj(slot, obj, d.rv),
                None => {}
            }
        }
        self.scratch = done;
        self.unpark();
        self.reaping = false;
        self.accepted = self.accepted.saturating_sub(self.ready.len());
        out.append(&mut self.ready);
    }

    fn unpark(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let failure = {
            let st = self.shared.lock_state();
            (st.failure_seq != self.failure_seq).then(|| (st.failure_seq, st.lock_failure.clone()))
        };
        if let Some((seq, f)) = failure {
            self.failure_seq = seq;
            let f = f.unwrap_or(super::LockFailure {
                errno: Errno(-libc::EIO),
                why: "exclusive lock unavailable".into(),
            });
            while let Some((tag, op)) = self.parked.pop_front() {
                let what = if matches!(op, BlockOp::Write { .. }) {
                    "write"
                } else {
                    "discard"
                };
                let offset = match &op {
                    BlockOp::Write { offset, .. }
                    | BlockOp::Discard { offset, .. }
                    | BlockOp::WriteZeroes { offset, .. } => *offset,
                    _ => 0,
                };
                // the control thread logged the reason once; each write carries it
                debug!(image = %self.shared.name, "{what} failed: {}", f.why);
                self.ready.push(Completion {
                    tag,
                    result: Err(RadosError::NoLock {
                        what,
                        offset,
                        why: f.why.clone(),
                        errno: f.errno,
                    }),
                    buf: op.into_buf(),
                });
            }
            return;
        }
        while !self.parked.is_empty() {
            if !self.enter_lock() {
                return;
            }
            let _ = self.sync_header();
            if let Some((tag, op)) = self.parked.pop_front() {
                self.start(tag, op, true);
            }
        }
    }
}

impl AsFd for DirectQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sink.as_fd()
    }
}

impl Drop for DirectQueue {
    fn drop(&mut self) {
        // let operations in flight finish (bounded): librados must not see the pool contexts
        // or the cluster go under them, and their buffers must outlive them; writes still
        // waiting for the lock are never started
        self.parked.clear();
        let deadline = std::time::Instant::now() + DROP_WAIT;
        let mut out = Vec::new();
        while !self.targets.is_empty() && std::time::Instant::now() < deadline {
            let mut fds = [nix::poll::PollFd::new(
                self.sink.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
            self.reap(&mut out);
            out.clear();
        }
        let mut st = self.shared.lock_state();
        st.waiters.retain(|w| !Arc::ptr_eq(w, &self.sink));
        drop(st);
        if !self.targets.is_empty() {
            warn!(
                in_flight = self.targets.len(),
                "direct queue dropped with operations in flight; leaking their buffers and contexts"
            );
            std::mem::forget(std::mem::take(&mut self.reqs));
            std::mem::forget(Arc::clone(&self.ctx));
            std::mem::forget(Arc::clone(&self.shared));
        }
    }
}

/// How long a dropped queue waits for its operations in flight.
const DROP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn shift(d: Dst, by: usize) -> Dst {
    match d {
        Dst::Req(off) => Dst::Req(off + by),
        Dst::Copyup(o, off) => Dst::Copyup(o, off + by),
    }
}

/// Keeps the parts of `extents` (in increasing image order) below `overlap`.
pub(crate) fn clip(extents: Vec<(u64, u64)>, overlap: u64) -> Vec<(u64, u64)> {
    extents
        .into_iter()
        .filter(|(off, _)| *off < overlap)
        .map(|(off, n)| (off, n.min(overlap - off)))
        .collect()
}
