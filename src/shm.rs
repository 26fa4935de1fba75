//! Guest-shared memory: the one module that reads and writes memory a guest can change under us.
//!
//! Owns: bounds-checked volatile copies in and out of a shared region, and the acquire/release
//! 32-bit index accesses the blkif ring protocol needs (`req_prod`, `rsp_prod`, `*_event`).
//!
//! Trusts: nothing in the memory. A [`SharedMem`] only promises that `len` bytes at `ptr` stay
//! mapped for its lifetime `'a` (whoever built it owns the mapping and outlives the view).
//!
//! Must never: hand out a Rust reference (`&[u8]`, `&T`) into shared memory — the other side
//! may write at any time, so every access is a volatile or atomic operation that copies the
//! value into host-owned memory. Never read the same bytes twice to make one decision: callers
//! copy once, then parse the copy.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

/// An access fell outside the shared region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shared memory access of {len} bytes at offset {offset} is outside the {size}-byte region")]
pub struct OutOfBounds {
    /// Offset of the attempted access.
    pub offset: usize,
    /// Length of the attempted access.
    pub len: usize,
    /// Size of the region.
    pub size: usize,
}

/// A view of `len` bytes of memory shared with another (untrusted) party.
///
/// Cheap to copy; every access is bounds checked and volatile or atomic.
#[derive(Clone, Copy)]
pub struct SharedMem<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _life: PhantomData<&'a std::cell::UnsafeCell<[u8]>>,
}

impl std::fmt::Debug for SharedMem<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMem")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: a SharedMem is a pointer to memory that is by design accessed concurrently by other
// parties; every access through it is volatile or atomic, so sharing the view between threads
// adds no hazard that a single thread does not already have.
unsafe impl Send for SharedMem<'_> {}
// SAFETY: as above: all accesses are volatile/atomic copies, no references are handed out.
unsafe impl Sync for SharedMem<'_> {}

impl<'a> SharedMem<'a> {
    /// A view of host-owned memory, for tests, the simulated Xen and the mock frontend.
    pub fn from_mut_slice(buf: &'a mut [u8]) -> Self {
        let len = buf.len();
        // A slice's pointer is never null (dangling but non-null when empty).
        let ptr = NonNull::from(buf).cast::<u8>();
        SharedMem {
            ptr,
            len,
            _life: PhantomData,
        }
    }

    /// A view of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr` must be valid for volatile reads and writes of `len` bytes for all of `'a`
    /// (typically an mmap of granted pages that the caller unmaps only after `'a` ends), and
    /// must be aligned to 4 bytes if the 32-bit atomic accessors are used.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize) -> Self {
        SharedMem {
            ptr,
            len,
            _life: PhantomData,
        }
    }

    /// Size of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw base pointer (for handing the region to a kernel interface such as grant copy).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// A sub-view of `len` bytes starting at `offset`.
    pub fn slice(&self, offset: usize, len: usize) -> Result<SharedMem<'a>, OutOfBounds> {
        self.check(offset, len)?;
        // SAFETY: offset + len <= self.len (checked above), so the new pointer and range stay
        // inside the region this view was built for, for the same lifetime.
        let ptr = unsafe { self.ptr.add(offset) };
        Ok(SharedMem {
            ptr,
            len,
            _life: PhantomData,
        })
    }

    /// Copies `dst.len()` bytes starting at `offset` out of shared memory, once.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, dst.len())?;
        let base = self.ptr.as_ptr();
        let mut i = 0;
        // 8-byte volatile loads where the shared side is aligned, bytes for the rest.
        while i < dst.len() {
            let src = base.wrapping_add(offset + i);
            if dst.len() - i >= 8 && (src as usize) % 8 == 0 {
                // SAFETY: [offset, offset + dst.len()) is inside the region (checked) and
                // `src` is 8-aligned; a volatile read copies the value without creating a reference.
                let v = unsafe { std::ptr::read_volatile(src.cast::<u64>()) };
                if let Some(d) = dst.get_mut(i..i + 8) {
                    d.copy_from_slice(&v.to_ne_bytes());
                }
                i += 8;
            } else {
                // SAFETY: src is inside the checked range.
                let v = unsafe { std::ptr::read_volatile(src) };
                if let Some(d) = dst.get_mut(i) {
                    *d = v;
                }
                i += 1;
            }
        }
        Ok(())
    }

    /// Copies `src` into shared memory at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
        self.check(offset, src.len())?;
        let base = self.ptr.as_ptr();
        let mut i = 0;
        while i < src.len() {
            let dst = base.wrapping_add(offset + i);
            match src.get(i..i + 8) {
                Some(chunk) if (dst as usize) % 8 == 0 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(chunk);
                    // SAFETY: dst..dst+8 is inside the checked range and 8-aligned.
                    unsafe { std::ptr::write_volatile(dst.cast::<u64>(), u64::from_ne_bytes(b)) };
                    i += 8;
                }
                _ => {
                    let v = src.get(i).copied().unwrap_or(0);
                    // SAFETY: dst is inside the checked range.
                    unsafe { std::ptr::write_volatile(dst, v) };
                    i += 1;
                }
            }
        }
        Ok(())
    }

    /// Fills `len` bytes at `offset` with zeros.
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        self.check(offset, len)?;
        const Z: [u8; 256] = [0; 256];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(Z.len());
            self.write(offset + done, Z.get(..n).unwrap_or(&[]))?;
            done += n;
        }
        Ok(())
    }

    fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32, OutOfBounds> {
        self.check(offset, 4)?;
        let p = self.ptr.as_ptr().wrapping_add(offset);
        if (p as usize) % 4 != 0 {
            return Err(OutOfBounds {
                offset,
                len: 4,
                size: self.len,
            });
        }
        // SAFETY: p is inside the region (checked), 4-aligned (checked), valid for the lifetime
        // of self; AtomicU32 has the size and alignment of u32 and all accesses through the
        // returned reference are atomic, which is the required discipline for memory that
        // another party writes concurrently.
        Ok(unsafe { AtomicU32::from_ptr(p.cast::<u32>()) })
    }

    /// Loads a 32-bit index with Acquire ordering (e.g. `req_prod` before reading the slots).
    pub fn load_u32_acquire(&self, offset: usize) -> Result<u32, OutOfBounds> {
        Ok(self.atomic_u32(offset)?.load(Ordering::Acquire))
    }

    /// Loads a 32-bit value with Relaxed ordering.
    pub fn load_u32(&self, offset: usize) -> Result<u32, OutOfBounds> {
        Ok(self.atomic_u32(offset)?.load(Ordering::Relaxed))
    }

    /// Stores a 32-bit index with Release ordering (e.g. `rsp_prod` after writing the slots).
    pub fn store_u32_release(&self, offset: usize, v: u32) -> Result<(), OutOfBounds> {
        self.atomic_u32(offset)?.store(v, Ordering::Release);
        Ok(())
    }

    /// Stores a 32-bit value with Relaxed ordering.
    pub fn store_u32(&self, offset: usize, v: u32) -> Result<(), OutOfBounds> {
        self.atomic_u32(offset)?.store(v, Ordering::Relaxed);
        Ok(())
    }
}

/// A full memory barrier (Xen's `mb()` / `xen_mb()`), as `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`
/// and `RING_FINAL_CHECK_FOR_REQUESTS` need between publishing an index and reading an event index.
pub fn full_barrier() {
    fence(Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creating_a_file_over_a_mapped_one_leaves_the_mapping_alone() {
        let p = std::env::temp_dir().join(format!("rbdback-shm-{}", std::process::id()));
        let old = MappedFile::open(&p, 4096, true).unwrap();
        old.mem().store_u32(4092, 7).unwrap();
        let new = MappedFile::open(&p, 4096, true).unwrap();
        // the old mapping keeps its pages and data (a truncated file would SIGBUS here)
        assert_eq!(old.mem().load_u32(4092).unwrap(), 7);
        assert_eq!(new.mem().load_u32(4092).unwrap(), 0);
        new.mem().store_u32(0, 1).unwrap();
        assert_eq!(old.mem().load_u32(0).unwrap(), 0, "two files");
        drop(old);
        let again = MappedFile::open(&p, 4096, false).unwrap();
        assert_eq!(
            again.mem().load_u32(0).unwrap(),
            1,
            "the path names the new one"
        );
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn read_write_roundtrip_at_unaligned_offsets() {
        let mut buf = vec![0u8; 64];
        let mem = SharedMem::from_mut_slice(&mut buf);
        let data: Vec<u8> = (0..37).collect();
        mem.write(3, &data).unwrap();
        let mut out = vec![0u8; 37];
        mem.read(3, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn access_past_the_end_is_rejected() {
        let mut buf = vec![0u8; 16];
        let mem = SharedMem::from_mut_slice(&mut buf);
        let mut out = [0u8; 4];
        assert!(mem.read(13, &mut out).is_err());
        assert!(mem.write(usize::MAX, &out).is_err());
        assert!(mem.slice(8, 9).is_err());
        assert!(mem.load_u32(14).is_err());
    }

    #[test]
    fn misaligned_atomic_is_rejected() {
        let mut buf = vec![0u8; 16];
        let mem = SharedMem::from_mut_slice(&mut buf);
        let aligned = (mem.as_ptr() as usize) % 4 == 0;
        assert!(aligned, "Vec<u8> of 16 bytes is allocator-aligned");
        assert!(mem.load_u32(1).is_err());
        mem.store_u32_release(4, 0xdead_beef).unwrap();
        assert_eq!(mem.load_u32_acquire(4).unwrap(), 0xdead_beef);
    }

    #[test]
    fn zero_clears_range_only() {
        let mut buf = vec![0xffu8; 600];
        let mem = SharedMem::from_mut_slice(&mut buf);
        mem.zero(10, 500).unwrap();
        let mut out = vec![0u8; 600];
        mem.read(0, &mut out).unwrap();
        assert!(out[..10].iter().all(|&b| b == 0xff));
        assert!(out[10..510].iter().all(|&b| b == 0));
        assert!(out[510..].iter().all(|&b| b == 0xff));
    }
}

/// A file mapped shared into this process: memory that outlives the process, for the
/// crash-recovery journal a later instance of rbdback reads after this one died. Accessed
/// only through [`SharedMem`] views (volatile), like guest memory: a future reader is
/// another party, and a process killed at any instruction leaves exactly the stores it
/// executed (the page cache holds them; nothing is buffered in the process).
#[derive(Debug)]
pub struct MappedFile {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a shared file mapping; every access goes through SharedMem's volatile/atomic
// accessors, which are safe from any thread.
unsafe impl Send for MappedFile {}
// SAFETY: as above.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps `len` bytes of `path`. With `create`, a new file of `len` zero bytes replaces
    /// any file at `path` (which is unlinked, never truncated: another mapping of it, e.g. a
    /// closing ring's, keeps its pages); otherwise it must exist and be exactly `len` bytes
    /// long.
    pub fn open(path: &std::path::Path, len: usize, create: bool) -> std::io::Result<MappedFile> {
        use std::os::unix::fs::OpenOptionsExt;
        if create {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .mode(0o600)
            .open(path)?;
        let want = u64::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        if create {
            file.set_len(want)?;
        } else if file.metadata()?.len() != want {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not {len} bytes long", path.display()),
            ));
        }
        let nz = std::num::NonZeroUsize::new(len).ok_or(std::io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh shared mapping of a file we opened read-write and checked (or made)
        // `len` bytes long, at a kernel-chosen address; owned by the returned value and
        // unmapped once on drop. rbdback never truncates a journal file (a new one replaces
        // the path), so the pages stay backed while mapped.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                nz,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }
        .map_err(std::io::Error::from)?;
        Ok(MappedFile {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The mapped bytes.
    pub fn mem(&self) -> SharedMem<'_> {
        // SAFETY: ptr..ptr+len stays mapped until self drops; the view borrows self.
        unsafe { SharedMem::from_raw(self.ptr, self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned, unmapped only here; views borrow self.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}
