//! The librbd engine: rbd_aio_* on an image opened through librbd.
//!
//! Owns: the cluster connection, the pool context and the image handle of one VBD, and the
//! C completion callback, which only moves the finished operation (tag, result, buffer) into
//! the submitting queue's mailbox.
//! Trusts: librbd's contract: a completion fires exactly once, after which librbd no longer
//! touches the buffer (`rbd_aio_get_return_value` is 0 for writes, the byte count for reads).
//! Must never: free or move a buffer while its operation is in flight (the buffer lives in the
//! boxed callback context until the callback returns it), or run device logic in the callback.
//!
//! Durability: with `rbd_cache = false` (our default, set explicitly) a write completes when
//! the OSDs have committed it, so an acknowledged write is durable and flush is cheap. With
//! `rbd_cache = true` librbd acknowledges writes from its cache, and only a completed flush
//! makes them durable (the guest's flushes are passed through).

use std::ffi::{c_int, c_void};
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tracing::{info, warn};

use super::client::{cstr, Cluster, IoCtx};
use super::sys;
use super::{
    BlockOp, Completion, Encryption, EncryptionFormat, EngineKind, Errno, ImageInfo, ImageSpec,
    Mailbox, RadosError, SubmitError,
};

/// `rbd_encryption_load` with `opts` and its size.
///
/// # Safety
/// `img` is an open image and `T` is the options struct librbd expects for `format`, whose
/// pointers are valid for the call.
unsafe fn encryption_load<T>(
    img: sys::rbd_image_t,
    format: sys::rbd_encryption_format_t,
    opts: &mut T,
) -> i32 {
    // SAFETY: per this function's contract; the size passed is the struct's.
    unsafe {
        sys::rbd_encryption_load(
            img,
            format,
            std::ptr::from_mut(opts).cast(),
            std::mem::size_of::<T>(),
        )
    }
}

/// An image opened through librbd. Field order is drop order: image, ioctx, cluster.
#[derive(Debug)]
pub struct LibrbdImage {
    img: NonNull<c_void>,
    // dropped by hand, after the image is closed (see Drop)
    _io: ManuallyDrop<IoCtx>,
    _cluster: ManuallyDrop<Cluster>,
    name: String,
    read_only: bool,
    features: u64,
    obj_size: u64,
    last_size: AtomicU64,
    close_wait: std::time::Duration,
}

// SAFETY: librbd image handles are thread-safe; concurrent aio submissions from several
// threads are supported (QEMU and fio do the same).
unsafe impl Send for LibrbdImage {}
// SAFETY: as above.
unsafe impl Sync for LibrbdImage {}

impl LibrbdImage {
    /// Connects and opens the image.
    pub fn open(spec: &ImageSpec) -> Result<LibrbdImage, RadosError> {
        let cluster = Cluster::connect(spec)?;
        cluster.fence_predecessors(spec)?;
        let io = cluster.ioctx(spec)?;
        let name = cstr(&spec.image, "image name")?;
        let snap = spec
            .snapshot
            .as_deref()
            .map(|s| cstr(s, "snapshot"))
            .transpose()?;
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let read_only = spec.read_only || spec.snapshot.is_some();
        let mut img: sys::rbd_image_t = std::ptr::null_mut();
        let rc = if read_only {
            // SAFETY: valid ioctx; out-pointer to a local; strings outlive the call.
            unsafe { sys::rbd_open_read_only(io.h, name.as_ptr(), &mut img, snap_ptr) }
        } else {
            // SAFETY: as above.
            unsafe { sys::rbd_open(io.h, name.as_ptr(), &mut img, snap_ptr) }
        };
        if rc == -libc::ENOENT {
            return Err(RadosError::NoImage {
                pool: io.pool.clone(),
                image: spec.image.clone(),
            });
        }
        if rc < 0 {
            return Err(RadosError::Call {
                what: "rbd_open",
                errno: Errno(rc),
            });
        }
        let img = NonNull::new(img).ok_or(RadosError::Call {
            what: "rbd_open returned no image",
            errno: Errno(-libc::EIO),
        })?;
        let mut features = 0u64;
        // SAFETY: valid image; out-pointer to a local.
        unsafe { sys::rbd_get_features(img.as_ptr(), &mut features) };
        // SAFETY: zero is a valid rbd_image_info_t.
        let mut info: sys::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid image; the struct size is passed.
        unsafe {
            sys::rbd_stat(
                img.as_ptr(),
                &mut info,
                std::mem::size_of::<sys::rbd_image_info_t>(),
            )
        };
        let me = LibrbdImage {
            img,
            _io: ManuallyDrop::new(io),
            _cluster: ManuallyDrop::new(cluster),
            name: spec.image.clone(),
            read_only,
            features,
            obj_size: info.obj_size,
            last_size: AtomicU64::new(0),
            close_wait: spec.close_wait,
        };
        if let Some(e) = &spec.encryption {
            // on failure `me` is dropped, which closes the image
            me.load_encryption(e)?;
        }
        if !spec.predecessors.is_empty() {
            me.break_lock_of(&spec.predecessors);
        }
        me.last_size.store(me.size(), Ordering::Relaxed);
        Ok(me)
    }

    /// `rbd_encryption_load`: from now on librbd decrypts reads and encrypts writes, and the
    /// image's size is what the guest may use (the LUKS header excluded).
    fn load_encryption(&self, e: &Encryption) -> Result<(), RadosError> {
        let mut pass = std::fs::read(&e.passphrase_file).map_err(|err| {
            RadosError::Invalid(format!(
                "cannot read the encryption passphrase file {}: {err}",
                e.passphrase_file
            ))
        })?;
        // `alg` is ignored when loading: the LUKS header names the cipher
        let alg = sys::rbd_encryption_algorithm_t_RBD_ENCRYPTION_ALGORITHM_AES256;
        let (p, n) = (pass.as_ptr().cast(), pass.len());
        let img = self.img.as_ptr();
        let rc = match e.format {
            // SAFETY: valid image; the LUKS1 options struct for the LUKS1 format; it and the
            // passphrase it points to outlive the call.
            EncryptionFormat::Luks1 => unsafe {
                encryption_load(
                    img,
                    sys::rbd_encryption_format_t_RBD_ENCRYPTION_FORMAT_LUKS1,
                    &mut sys::rbd_encryption_luks1_format_options_t {
                        alg,
                        passphrase: p,
                        passphrase_size: n,
                    },
                )
            },
            // SAFETY: as above, LUKS2.
            EncryptionFormat::Luks2 => unsafe {
                encryption_load(
                    img,
                    sys::rbd_encryption_format_t_RBD_ENCRYPTION_FORMAT_LUKS2,
                    &mut sys::rbd_encryption_luks2_format_options_t {
                        alg,
                        passphrase: p,
                        passphrase_size: n,
                    },
                )
            },
        };
        pass.fill(0);
        if rc < 0 {
            return Err(RadosError::EncryptionLoad {
                image: self.name.clone(),
                format: e.format,
                errno: Errno(rc),
            });
        }
        Ok(())
    }

    pub(crate) fn cluster(&self) -> &Cluster {
        &self._cluster
    }

    /// Closes the image, then its pool context and cluster handle, in that order.
    ///
    /// # Safety
    /// Called once per image (by its Drop, on the closing thread or inline); nothing uses
    /// the handles afterwards.
    unsafe fn close_handles(img: NonNull<c_void>, io: IoCtx, cluster: Cluster) {
        // SAFETY: per the contract, closed once; rbd_close waits for in-flight aio.
        unsafe { sys::rbd_close(img.as_ptr()) };
        drop(io);
        drop(cluster);
    }

    /// Facts for [`super::Image::info`].
    pub fn info(&self) -> ImageInfo {
        ImageInfo {
            engine: EngineKind::Librbd,
            features: self.features,
            object_size: self.obj_size,
            read_only: self.read_only,
            discard_zeroes: true,
            discard_granularity: 512,
        }
    }

    /// Current size in bytes (librbd refreshes the header when it changed).
    pub fn size(&self) -> u64 {
        let mut s = 0u64;
        // SAFETY: valid image; out-pointer to a local.
        unsafe { sys::rbd_get_size(self.img.as_ptr(), &mut s) };
        s
    }

    /// Whether this client holds the exclusive lock (librbd takes and hands it over itself;
    /// it keeps no count of hand-overs).
    pub fn lock_status(&self) -> super::LockStatus {
        let state = if self.read_only
            || self.features & super::direct::header::feature::EXCLUSIVE_LOCK == 0
        {
            super::LockHold::NotUsed
        } else {
            let mut owner: c_int = 0;
            // SAFETY: valid image; out-pointer to a local.
            let rc = unsafe { sys::rbd_is_exclusive_lock_owner(self.img.as_ptr(), &mut owner) };
            match (rc, owner) {
                (0, 0) => super::LockHold::NotHeld,
                (0, _) => super::LockHold::Held,
                _ => super::LockHold::Unknown,
            }
        };
        super::LockStatus {
            state,
            handovers: 0,
        }
    }

    /// `Some(new)` if the size changed since the last call.
    pub fn refresh_size(&self) -> Result<Option<u64>, RadosError> {
        let now = self.size();
        let before = self.last_size.swap(now, Ordering::Relaxed);
        Ok((now != before).then_some(now))
    }

    /// Starts `op`; the completion goes to `mailbox`.
    pub(crate) fn submit(
        &self,
        tag: u64,
        op: BlockOp,
        mailbox: &Arc<Mailbox>,
    ) -> Result<(), SubmitError> {
        let (what, offset) = match &op {
            BlockOp::Read { offset, .. } => ("read", *offset),
            BlockOp::Write { offset, .. } => ("write", *offset),
            BlockOp::Discard { offset, .. } => ("discard", *offset),
            BlockOp::WriteZeroes { offset, .. } => ("write zeroes", *offset),
            BlockOp::Flush => ("flush", 0),
        };
        let ctx = Box::new(Ctx {
            tag,
            mailbox: Arc::clone(mailbox),
            op: Some(op),
            what,
            offset,
        });
        let raw = Box::into_raw(ctx);
        let mut comp: sys::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `raw` is a leaked Box reclaimed exactly once: by the callback, or below if
        // the completion or the submission could not be made.
        let rc =
            unsafe { sys::rbd_aio_create_completion(raw.cast(), Some(on_complete), &mut comp) };
        if rc < 0 {
            // SAFETY: no completion exists, so the callback will never run: reclaim the box.
            let ctx = unsafe { Box::from_raw(raw) };
            return Err(submit_err(*ctx, "rbd_aio_create_completion", rc));
        }
        let img = self.img.as_ptr();
        // SAFETY: `raw` stays valid until the callback reclaims it, which cannot happen before
        // the submission below; this is the only reference to it meanwhile.
        let op = unsafe { (*raw).op.as_mut() };
        // Buffer pointers point into the Vec owned by the context (heap data does not move),
        // valid until the callback hands the buffer back.
        let rc = match op {
            Some(BlockOp::Read { offset, buf }) => {
                // SAFETY: see above; `buf` is writable for buf.len() bytes.
                unsafe { sys::rbd_aio_read(img, *offset, buf.len(), buf.as_mut_ptr().cast(), comp) }
            }
            Some(BlockOp::Write { offset, buf }) => {
                // SAFETY: see above; `buf` is readable for buf.len() bytes.
                unsafe { sys::rbd_aio_write(img, *offset, buf.len(), buf.as_ptr().cast(), comp) }
            }
            Some(BlockOp::Discard { offset, len }) => {
                // SAFETY: valid image and completion.
                unsafe { sys::rbd_aio_discard(img, *offset, *len, comp) }
            }
            Some(BlockOp::WriteZeroes { offset, len }) => {
                let len = usize::try_from(*len).unwrap_or(0);
                // SAFETY: valid image and completion.
                unsafe { sys::rbd_aio_write_zeroes(img, *offset, len, comp, 0, 0) }
            }
            Some(BlockOp::Flush) => {
                // SAFETY: valid image and completion.
                unsafe { sys::rbd_aio_flush(img, comp) }
            }
            None => -libc::EINVAL,
        };
        if rc < 0 {
            // SAFETY: the submission failed, so librbd will not call back: release the
            // completion and reclaim the box.
            unsafe { sys::rbd_aio_release(comp) };
            // SAFETY: as above, reclaimed once.
            let ctx = unsafe { Box::from_raw(raw) };
            return Err(submit_err(*ctx, what, rc));
        }
        Ok(())
    }
}

fn submit_err(mut ctx: Ctx, what: &'static str, rc: i32) -> SubmitError {
    SubmitError {
        op: ctx.op.take().unwrap_or(BlockOp::Flush),
        error: RadosError::Call {
            what,
            errno: Errno(rc),
        },
    }
}

/// What the callback needs; owns the operation (and its buffer) while librbd works.
struct Ctx {
    tag: u64,
    mailbox: Arc<Mailbox>,
    op: Option<BlockOp>,
    what: &'static str,
    offset: u64,
}

/// librbd's completion callback (runs on a librbd thread): hand the result over, nothing more.
extern "C" fn on_complete(comp: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the Box leaked in submit, reclaimed only here (librbd calls back once).
    let mut ctx = unsafe { Box::from_raw(arg.cast::<Ctx>()) };
    // SAFETY: `comp` is the completion this callback was registered on; released once.
    let rv = unsafe { sys::rbd_aio_get_return_value(comp) };
    // SAFETY: as above.
    unsafe { sys::rbd_aio_release(comp) };
    let op = ctx.op.take();
    let result = match (&op, rv) {
        (_, rv) if rv < 0 => Err(RadosError::Io {
            what: ctx.what,
            offset: ctx.offset,
            errno: Errno(i32::try_from(rv).unwrap_or(-libc::EIO)),
        }),
        (Some(BlockOp::Read { buf, .. }), rv) if usize::try_from(rv).ok() != Some(buf.len()) => {
            Err(RadosError::Io {
                what: "short read",
                offset: ctx.offset,
                errno: Errno(-libc::EIO),
            })
        }
        _ => Ok(()),
    };
    ctx.mailbox.push(Completion {
        tag: ctx.tag,
        result,
        buf: op.and_then(BlockOp::into_buf),
    });
}

/// The handles of an image being closed, moved to the closing thread.
struct Closing {
    img: NonNull<c_void>,
    io: IoCtx,
    cluster: Cluster,
}

// SAFETY: librbd and librados handles may be used and released from any thread; after the
// move only the closing thread holds these.
unsafe impl Send for Closing {}

impl LibrbdImage {
    /// Breaks the exclusive lock if `who` (a previous backend that is gone) holds it:
    /// librbd blocklists the owner and breaks the lock at once, instead of waiting for the
    /// dead owner's watch to time out.
    fn break_lock_of(&self, gone: &[super::ClientIdentity]) {
        let mut mode: sys::rbd_lock_mode_t = 0;
        let mut owners: [*mut std::ffi::c_char; 4] = [std::ptr::null_mut(); 4];
        let mut n: usize = owners.len();
        // SAFETY: valid image; out-pointers to locals sized by `n`.
        let r = unsafe {
            sys::rbd_lock_get_owners(self.img.as_ptr(), &mut mode, owners.as_mut_ptr(), &mut n)
        };
        if r < 0 {
            return; // -ENOENT: nobody holds it
        }
        let listed: Vec<String> = owners
            .iter()
            .take(n.min(owners.len()))
            .filter(|p| !p.is_null())
            .map(|p| {
                // SAFETY: a NUL-terminated string librbd filled in.
                let c = unsafe { std::ffi::CStr::from_ptr(*p) };
                c.to_string_lossy().into_owned()
            })
            .collect();
        // SAFETY: the array and count librbd filled in, released once.
        unsafe { sys::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
        for owner in listed
            .iter()
            .filter(|o| gone.iter().any(|g| g.entity() == **o))
        {
            let Ok(c) = std::ffi::CString::new(owner.as_str()) else {
                continue;
            };
            // SAFETY: valid image; the owner string outlives the call.
            let r = unsafe { sys::rbd_lock_break(self.img.as_ptr(), mode, c.as_ptr()) };
            if r < 0 {
                warn!(image = %self.name, %owner, errno = r, "cannot break the previous backend's lock");
            } else {
                info!(image = %self.name, %owner, "broke the exclusive lock of the previous backend");
            }
        }
    }
}

impl Drop for LibrbdImage {
    /// `rbd_close` releases the exclusive lock and the watch, which needs the OSDs: it runs
    /// on a thread of its own, waited for at most `close_wait`; past that it goes on in the
    /// background (it owns the handles), so a detach never hangs on a silent cluster.
    fn drop(&mut self) {
        // SAFETY: taken exactly once, here; the fields are not touched afterwards.
        let io = unsafe { ManuallyDrop::take(&mut self._io) };
        // SAFETY: as above.
        let cluster = unsafe { ManuallyDrop::take(&mut self._cluster) };
        let c = Closing {
            img: self.img,
            io,
            cluster,
        };
        // whoever takes the handles out of the slot closes them: the thread, or this one
        // when no thread can be started
        let slot = Arc::new(Mutex::new(Some(c)));
        let close = |slot: &Mutex<Option<Closing>>| {
            let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(c) = taken {
                // SAFETY: the handles leave the slot once, so this is their only close.
                unsafe { LibrbdImage::close_handles(c.img, c.io, c.cluster) };
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = Arc::clone(&slot);
        let spawned = std::thread::Builder::new()
            .name("rbd-close".into())
            .spawn(move || {
                close(&s2);
                let _ = tx.send(());
            });
        match spawned {
            Ok(_) => {
                if rx.recv_timeout(self.close_wait).is_err() {
                    warn!(image = %self.name, secs = self.close_wait.as_secs(),
                          "the cluster did not answer while the image was closing; its release goes on in the background");
                }
            }
            Err(e) => {
                warn!(image = %self.name, error = %e, "cannot start a closing thread; closing here");
                close(&slot);
            }
        }
    }
}
