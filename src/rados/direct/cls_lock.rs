//! `cls_lock` on the image header and the object map, as class calls through
//! [`IoCtx::exec`] and [`IoCtx::exec_write`] — what `rados_lock_exclusive`, `rados_unlock`,
//! `rados_list_lockers` and `rados_break_lock` do inside librados — so that they are bounded
//! like every other control-path call (librados' own lock calls wait as long as the OSD does).
//!
//! Owns: nothing but the calls. Trusts: replies only after [`codec::lockers_reply`] decoded
//! them. Must never: be called from a dataplane thread (they block).

use super::super::client::IoCtx;
use super::super::Errno;
use super::codec::{self, Lockers};

/// Takes exclusive lock `name` on `oid` with `cookie` (no tag, no expiry).
pub(crate) fn lock_exclusive(io: &IoCtx, oid: &str, name: &str, cookie: &str) -> Result<(), Errno> {
    io.exec_write(oid, "lock", "lock", &codec::lock_input(name, cookie, ""))
}

/// Releases lock `name` held with `cookie`.
pub(crate) fn unlock(io: &IoCtx, oid: &str, name: &str, cookie: &str) -> Result<(), Errno> {
    io.exec_write(oid, "lock", "unlock", &codec::unlock_input(name, cookie))
}

/// Who holds lock `name` on `oid`.
pub(crate) fn list_lockers(io: &IoCtx, oid: &str, name: &str) -> Result<Lockers, Errno> {
    let b = io.exec(oid, "lock", "get_info", &codec::get_info_input(name))?;
    codec::lockers_reply(&b).map_err(|_| Errno(-libc::EIO))
}

/// Breaks `locker`'s hold (`client.<gid>`, with `cookie`) of lock `name` on `oid`.
pub(crate) fn break_lock(
    io: &IoCtx,
    oid: &str,
    name: &str,
    locker: &str,
    cookie: &str,
) -> Result<(), Errno> {
    let input = codec::break_lock_input(name, locker, cookie).ok_or(Errno(-libc::EINVAL))?;
    io.exec_write(oid, "lock", "break_lock", &input)
}
